"""``rmt train``, ``rmt eval``, ``rmt predict``, ``rmt demo`` and ``rmt token-labels`` (added to the command by
rmt.cli).

Each command parses its flags, calls one function of this package, and prints what it did.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..cliutils import non_negative_int, port_number, positive_int, print_json, print_results
from ..runtime.classifier import iter_predictions, load_classifier
from ..tools.quantize import EXPORTED_SUFFIXES, load_exported_classifier
from ..training.config import add_config_flags, config_from_flags
from .config import ClassificationConfig
from .demo import load_demo, serve
from .evaluate import evaluate_checkpoint
from .token_labels import generate_token_labels
from .train import train

__all__ = ["add_commands"]


def _cmd_train(args) -> int:
    cfg = config_from_flags(ClassificationConfig, args, demo="digits")
    result = train(cfg)
    if result.final:
        f = result.final
        print(f"done: {cfg.model} on {'the bundled digits' if cfg.data is None else cfg.data}, "
              f"{len(result.history)} epochs; best val top-1 {result.best_value:.2f}% (epoch {result.best_at}), "
              f"final top-1 {f['val_top1']:.2f}% / top-5 {f['val_top5']:.2f}%, "
              f"{f.get('images_per_second', 0):.0f} train img/s. Run: {result.output}")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a classifier (default: RMT-T on the bundled digits)",
        description="Train an RMT classifier. With no --config and no --data, trains RMT-T on the bundled digits "
                    "(configs/classification/digits.yaml); with --data DIR and no --config, uses the paper's ImageNet "
                    "recipe. Under torchrun, trains with DDP. A run directory (--output) belongs to one run: continue "
                    "a run with --resume auto, or replace it with --overwrite. Exit status: 0 done, 2 bad input, "
                    "3 the loss went NaN, 128+N stopped by signal N (after saving last.pth).")
    p.add_argument("--config", default=None,
                   help="YAML config: a path or a bundled name (digits, rmt_s, rmt_s_tl, ...)")
    add_config_flags(p, ClassificationConfig)
    p.set_defaults(func=_cmd_train)


def _cmd_eval(args) -> int:
    result = evaluate_checkpoint(args.model, args.checkpoint, data=args.data, split=args.split,
                                 batch_size=args.batch_size, workers=args.workers, device=args.device,
                                 amp=args.amp, progress=not args.json)
    if args.json:
        print_json(result)
    else:
        print(f"{result['model']} ({args.checkpoint}): top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%, "
              f"loss {result['loss']:.4f} on {result['images']} images ({result['precision']})")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 and loss of a checkpoint (ours or official)")
    p.add_argument("--model", default=None, help="model name (default: the checkpoint's, for our files)")
    p.add_argument("--checkpoint", required=True,
                   help=".safetensors / .pth (ours or official), a run's best.pth, or a Hub-layout model folder")
    p.add_argument("--data", default=None, help="image folder root (default: the digits test split)")
    p.add_argument("--split", default="val", help="sub-folder of --data to evaluate (default: val)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=non_negative_int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="precision (default: none, float32, which reproduces published accuracy)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_eval)


def _describe(result) -> str:
    return "\n".join([result["path"]] + [f"  {e['prob']:7.2%}  {e['label']}  [{e['index']}]" for e in result["topk"]])


def _cmd_predict(args) -> int:
    if Path(args.checkpoint).suffix in EXPORTED_SUFFIXES:
        classifier = load_exported_classifier(args.checkpoint)
    else:
        classifier = load_classifier(args.model, args.checkpoint, args.device, args.amp)
    print(f"rmt predict: on {classifier.device} in {classifier.precision}", file=sys.stderr)
    predictions = iter_predictions(classifier, args.inputs, topk=args.topk, batch_size=args.batch_size)
    return print_results((p.to_dict() for p in predictions), "rmt predict", args.json, _describe)


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="top-k classes of image files or folders",
        description="Classify images with an RMT checkpoint: the top-k classes and their probabilities. "
                    "Class names are the checkpoint's own (our run checkpoints), ImageNet-1k's for 1000-class "
                    "models, else class_<i>. Unreadable files are reported on stderr and skipped; the exit "
                    "status is 1 when any was.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders searched recursively")
    p.add_argument("--model", default=None, help="model name, e.g. rmt_s (default: the checkpoint's, for our files)")
    p.add_argument("--checkpoint", required=True,
                   help="official .pth, our .safetensors, a run's best.pth, or a model exported by rmt export (.onnx "
                        "run in ONNX Runtime, OpenVINO .xml; float32 or int8, on the CPU)")
    p.add_argument("--topk", type=positive_int, default=None,
                   help="classes to show per image (default: 5, or all of a model with fewer)")
    p.add_argument("--json", action="store_true", help='one JSON object per image: {"path", "topk": '
                                                        '[{"label", "index", "prob"}]}, plus "error" (and an '
                                                        'empty topk) for a file that could not be read')
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default="auto",
                   help="precision: auto (default) is bf16 where the device computes it natively (CUDA, CPUs with "
                        "AVX512-BF16 or AMX), else float32; none is float32")
    p.set_defaults(func=_cmd_predict)


def _cmd_demo(args) -> int:
    demo = load_demo(args.model, args.checkpoint, args.device, args.amp)

    def ready(url: str) -> None:
        print(f"rmt demo: {demo.name} on {demo.classifier.device} in {demo.classifier.precision} at {url} "
              f"(Ctrl+C stops it)", flush=True)

    serve(demo, host=args.host, port=args.port, share=args.share, ready=ready)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="a local web page: top-5 classes and MaSA's decay and attention of a point you click",
        description="Serve a web page (Gradio; pip install \"rmt[demo]\") to try a classifier on an uploaded "
                    "image or a bundled example: the top-5 classes, and for a point clicked on the picture the "
                    "MaSA attention of every stage and the decay and attention of each head, over the picture.")
    p.add_argument("--checkpoint", default=None,
                   help="official .pth, our .safetensors, a run's best.pth or a model folder")
    p.add_argument("--model", default=None,
                   help="model name, e.g. rmt_s (default: the checkpoint's); without --checkpoint: random weights")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default="auto",
                   help="precision of the predictions, as for rmt predict (the maps are drawn in float32)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port_number, default=7860, help="port (default: 7860)")
    p.add_argument("--share", action="store_true",
                   help="also make a public link through Gradio's share servers (off by default; contacts the "
                        "internet)")
    p.set_defaults(func=_cmd_demo)


def _cmd_token_labels(args) -> int:
    result = generate_token_labels(args.teacher, args.data, args.output, checkpoint=args.checkpoint,
                                   img_size=args.img_size, topk=args.topk, batch_size=args.batch_size,
                                   workers=args.workers, device=args.device, overwrite=args.overwrite)
    h, w = result["grid"] or (0, 0)
    print(f"wrote {result['images']} label maps ({h}x{w}, top-{args.topk} of {result['num_classes']} classes) "
          f"to {result['output']}" + (f"; skipped {result['skipped']} unreadable images" if result["skipped"] else ""))
    return 0


def _add_token_labels(sub) -> None:
    p = sub.add_parser("token-labels", help="generate dense token labels for token-labelling training from a teacher")
    p.add_argument("--teacher", required=True, help="teacher: an rmt_* model or any timm model name")
    p.add_argument("--checkpoint", default=None, help="the teacher's weights")
    p.add_argument("--data", required=True, help="the training image folder (DATA/train)")
    p.add_argument("--output", required=True, help="label directory to write (OUTPUT/<class>/<stem>.pt)")
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="teacher input size (default: its pretrained_cfg's)")
    p.add_argument("--topk", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--workers", type=non_negative_int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that is not empty, replacing its class folders of the same names (once "
                        "all the new maps are written)")
    p.set_defaults(func=_cmd_token_labels)


def add_commands(subparsers) -> None:
    """Add this package's subcommands to the ``rmt`` parser."""
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_predict(subparsers)
    _add_demo(subparsers)
    _add_token_labels(subparsers)
