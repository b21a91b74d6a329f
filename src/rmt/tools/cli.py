"""`rmt` subcommands of rmt.tools (registered by rmt.cli): ``models``, ``flops``, ``convert``,
``benchmark``, ``export``, ``visualize``.

Each command parses its flags, calls one documented function (of :mod:`rmt.tools` or
:mod:`rmt.models`), and prints what it did.
"""
from __future__ import annotations

import sys
import tempfile

import torch

from ..cliutils import format_table, non_negative_int, positive_float, positive_int, print_json, probability
from ..errors import RMTError
from ..runtime.memory import keep_freed_memory
from .benchmark import BACKENDS, DEFAULT_PEERS, ONNX_BACKENDS, benchmark, profile_onnx
from .convert import convert
from .export import FORMATS, QUANTIZE, export_model
from .flops import model_facts, variants_table
from .visualize import visualize_attention, visualize_decay

__all__ = ["add_commands"]


# ------------------------------------------------------------------------------------- models
def _cmd_models(args) -> int:
    rows = variants_table()
    if args.json:
        print_json(rows)
        return 0
    print(format_table(rows, [("model", "model", ""), ("params", "params", ",d"), ("gflops", "GFLOPs@224", ".2f"),
                              ("top1", "top-1 (paper)", ".1f")]))
    print("\nGFLOPs are multiply-adds (the paper's convention). Weights: download the official checkpoints "
          "and load them with --checkpoint / pretrained_cfg_overlay=dict(file=...).")
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="table of the RMT variants: params, GFLOPs, paper top-1")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=_cmd_models)


# -------------------------------------------------------------------------------------- flops
def _cmd_flops(args) -> int:
    kwargs = {}
    if args.token_label:
        kwargs["token_label"] = True
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    facts = model_facts(args.model, tuple(args.img_size), **kwargs)
    if args.json:
        print_json(facts)
    else:
        h, w = args.img_size
        print(f"{args.model} at {h}x{w}: {facts['params']:,} params, {facts['gflops']:.3f} GFLOPs (multiply-adds)")
    return 0


def _add_flops(sub) -> None:
    p = sub.add_parser("flops", help="parameters and GFLOPs (multiply-adds) of a model at any input size")
    p.add_argument("model", help="model name, e.g. rmt_s or rmt_s.tl_in1k")
    p.add_argument("--img-size", type=positive_int, nargs=2, default=[224, 224], metavar=("H", "W"))
    p.add_argument("--num-classes", type=positive_int, default=None)
    p.add_argument("--token-label", action="store_true", help="count the token-labelling model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_flops)


# ------------------------------------------------------------------------------------ convert
def _cmd_convert(args) -> int:
    task, name, path = convert(args.input, args.output, model_name=args.model, use_ema=args.use_ema,
                               hub=True if args.hub else None, overwrite=args.overwrite)
    kind = "Hub-layout folder: config.json, model.safetensors, README.md" if path.is_dir() else "safetensors"
    print(f"converted {args.input} -> {path} ({name}; {kind})" if task == "classification" else
          f"converted {args.input} -> {path} ({task}: {name}; {kind})")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert a checkpoint (official .pth, a run's) to rmt's .safetensors or a Hub-ready folder",
        description="Convert an official checkpoint (or a run checkpoint, or one of ours) to one .safetensors "
                    "file, or -- when OUTPUT has no suffix, or with --hub -- to a folder (config.json, "
                    "model.safetensors, README.md). A classifier's folder is in timm's Hugging Face Hub layout: "
                    "it loads with timm.create_model('local-dir:OUTPUT', pretrained=True) and, uploaded, with "
                    "'hf-hub:USER/REPO'. Segmentation files (official mmseg RMT Semantic FPN / UperNet "
                    "checkpoints, a seg run's) become a segmentation model file or folder for rmt seg "
                    "eval|predict --checkpoint.")
    p.add_argument("input", help="official checkpoint (.pth), a run checkpoint, one of ours, or a model folder")
    p.add_argument("output", help="output .safetensors file, or a folder (no suffix) for the Hub layout")
    p.add_argument("--hub", action="store_true", help="write a Hub-layout folder whatever OUTPUT's name")
    p.add_argument("--model", default=None, help="classification: the variant (default: read off the weights)")
    p.add_argument("--use-ema", action="store_true", help="classification: take the EMA weights when the file "
                                                          "has them")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that is not empty, replacing its config.json, model.safetensors and "
                        "README.md (other files are kept; the old ones stay until the new ones are written)")
    p.set_defaults(func=_cmd_convert)


# ---------------------------------------------------------------------------------- benchmark
def _cmd_benchmark(args) -> int:
    if args.threads is not None:
        if args.threads <= 0:
            raise RMTError("--threads must be positive")
        torch.set_num_threads(args.threads)
    backends = list(dict.fromkeys(args.backend))
    if args.profile and not any(b in ONNX_BACKENDS for b in backends):
        raise RMTError("--profile shows ONNX Runtime's operators: add --backend onnxruntime (or onnxruntime-int8)")
    models = list(args.models)
    if not args.no_peers:
        peers = args.peers if args.peers is not None else \
            [f"reference:{m}" for m in models if m.startswith("rmt_") and backends == ["eager"]] + list(DEFAULT_PEERS)
        models += [p for p in peers if p not in models]
    modes = ["infer", "train"] if args.mode == "both" else [args.mode]
    rows, profiles = [], {}
    with tempfile.TemporaryDirectory() as tmp:  # the exports outlive the timing when they are profiled
        export_dir = args.export_dir or (tmp if args.profile else None)
        for mode in modes:
            def progress(i, n, mode=mode):
                if not args.json and sys.stderr.isatty():
                    print(f"\r{mode}: round {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)

            results = benchmark(models, batch_size=args.batch_size, img_size=tuple(args.img_size), mode=mode,
                                warmup=args.warmup, iters=args.iters, device=args.device,
                                compile_model=args.compile, channels_last=args.channels_last,
                                memory=not args.no_memory, amp=args.amp, progress=progress, backends=backends,
                                export_dir=export_dir)
            first = results[0]
            for r in results:
                row = r.to_dict()
                row["speedup_of_first"] = first.img_per_s and first.img_per_s / r.img_per_s
                rows.append(row)
            if args.profile:
                for r in results:
                    if r.backend in ONNX_BACKENDS:
                        profiles[f"{r.model} [{r.backend}]"] = profile_onnx(r.export_path, args.batch_size,
                                                                             tuple(args.img_size))
    if args.json:
        print_json({"results": rows, "profiles": profiles} if args.profile else rows)
        return 0
    h, w = args.img_size
    print(f"batch {args.batch_size}, {h}x{w}, {args.device}{', autocast ' + args.amp if args.amp else ''}, "
          f"{torch.get_num_threads()} threads, median of {args.iters} interleaved rounds after {args.warmup} warm-up"
          f"{'; freed memory kept (rmt.runtime)' if keep_freed_memory() else ''}")
    multi = backends != ["eager"]
    for row in rows:
        row["label"] = f"{row['model']} [{row['backend']}]" if multi else row["model"]
    columns = [("label", "model", ""), ("mode", "mode", ""), ("img_per_s", "img/s", ".1f"),
               ("ms_per_batch", "ms/batch", ".0f"), ("peak_mb", "peak MB", ".0f"),
               ("speedup_of_first", f"{rows[0]['label']} speed-up", ".2f")]
    if multi:
        columns.insert(5, ("parity", "max abs diff", ".2g"))
    print(format_table(rows, columns))
    for label, ops in profiles.items():
        print(f"\n{label}: ONNX Runtime profile, ms per run by operator type")
        print(format_table(ops[:12], [("op", "operator", ""), ("nodes", "nodes", "d"), ("ms", "ms", ".1f"),
                                      ("share", "share", ".1%")]))
    return 0


def _add_benchmark(sub) -> None:

    p = sub.add_parser("benchmark", help="throughput and peak memory, side by side with peers",
                       description="Time models interleaved in one process: img/s (median of rounds after "
                                   "warm-up) and peak tensor memory. By default each rmt_* model is compared "
                                   "with its straightforward reference implementation, swin_tiny and "
                                   "convnext_tiny. With --backend onnxruntime / onnxruntime-int8, every model is "
                                   "also exported (fixed shape) and timed in ONNX Runtime, float32 or statically "
                                   "quantized int8, in the same interleaved loop (openvino / openvino-int8: the "
                                   "same in OpenVINO, int8 by NNCF); eager-bf16 is eager under bf16 autocast; "
                                   "eager-int8 is PyTorch's own int8 path (dynamically quantized linear layers).")
    p.add_argument("models", nargs="+", help="rmt_s, reference:rmt_s, or timm model names")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--img-size", type=positive_int, nargs=2, default=[224, 224], metavar=("H", "W"))
    p.add_argument("--mode", choices=["infer", "features", "train", "both"], default="infer",
                   help="infer: images -> logits; features: images -> last feature map; train: forward, "
                        "backward and AdamW step; both: infer and train (default: infer)")
    p.add_argument("--backend", nargs="+", choices=BACKENDS, default=["eager"], metavar="BACKEND",
                   help=f"where each model runs, one row per backend: {', '.join(BACKENDS)} (default: eager); "
                        "e.g. --backend eager eager-bf16 onnxruntime onnxruntime-int8 openvino openvino-int8")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast the forward (default: float32)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--iters", type=positive_int, default=5, help="timed rounds")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed iterations per model first")
    p.add_argument("--peers", nargs="*", default=None,
                   help="models to compare with (default: reference + timm; timm only with the int8 and ONNX Runtime "
                        "backends)")
    p.add_argument("--no-peers", action="store_true", help="time only the given models")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile every model first")
    p.add_argument("--channels-last", action="store_true", help="channels-last inputs and weights")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile each ONNX Runtime row with its profiler: time per operator type")
    p.add_argument("--export-dir", default=None,
                   help="keep the ONNX/OpenVINO exports here, and reuse them in later runs (default: a temporary "
                        "folder)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_cmd_benchmark)


# ------------------------------------------------------------------------------------- export
def _cmd_export(args) -> int:
    result = export_model(args.model, args.output, args.format, checkpoint=args.checkpoint,
                          img_size=tuple(args.img_size) if args.img_size else None,
                          dynamic_size=False if args.static_size else None, verify=not args.no_verify,
                          atol=args.atol, opset=args.opset, static=args.static, batch_size=args.batch_size,
                          quantize=args.quantize, calib_data=args.calib_data, eval_data=args.eval_data,
                          calib_images=args.calib_images, progress=not args.json and sys.stderr.isatty())
    if args.json:
        print_json(result.to_dict())
        return 0
    c, h, w = result.input_size
    float_path = result.quantization["float_path"] if result.quantization else result.path
    shape = f"input {result.batch_size}x{c}x{h}x{w}, static" if result.batch_size else \
        f"example input {c}x{h}x{w}; dynamic: {', '.join(result.dynamic)}"
    print(f"wrote {float_path} ({result.format}, {shape})")
    for check in result.checks:
        print(f"  input {'x'.join(map(str, check['shape']))}: max abs diff vs PyTorch {check['max_abs_diff']:.3g}")
    if result.checks:
        print(f"verified: max abs diff {result.max_abs_diff:.3g} <= {args.atol:g}")
    else:
        print("not verified (--no-verify)")
    q = result.quantization
    if q:
        print(f"wrote {q['int8_path']} (int8, static quantization: {q['int8_mb']:.1f} MB, float32 "
              f"{q['float_mb']:.1f} MB), calibrated on {q['calib_images']} images of {q['calibration']}")
        print(f"accuracy on {q['eval_images']} images of {q['evaluation']}: float32 top-1 {q['float_top1']:.2f}% "
              f"(top-5 {q['float_top5']:.2f}%), int8 top-1 {q['int8_top1']:.2f}% (top-5 {q['int8_top5']:.2f}%): "
              f"{q['top1_drop']:+.2f} points lost; same top-1 class for {q['agreement']:.2f}% of the images")
    return 0


def _add_export(sub) -> None:

    p = sub.add_parser(
        "export", help="export a classifier to ONNX or OpenVINO (float32 or int8), TorchScript or a torch.export "
                       "program",
        description="Export a classifier (images -> logits) with a dynamic batch (and dynamic height/width where "
                    "the format allows), then load the file back and compare it with PyTorch on random inputs. "
                    "--static writes a fixed-shape ONNX graph without control flow (for TensorRT); --quantize int8 "
                    "writes a statically quantized ONNX model (NNCF-quantized OpenVINO IR with --format openvino) and "
                    "reports its top-1 beside float32's.")
    p.add_argument("--model", default=None, help="model name, e.g. rmt_s (default: the checkpoint's, for our files)")
    p.add_argument("--checkpoint", required=True,
                   help="official .pth, our .safetensors, a run's best.pth, or a model folder (rmt convert)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, help="file to write (.onnx, .pt, .pt2, .xml for OpenVINO)")
    p.add_argument("--img-size", type=positive_int, nargs=2, metavar=("H", "W"), default=None,
                   help="example input size (default: the model's evaluation size)")
    p.add_argument("--static-size", action="store_true", help="fix height and width (the batch stays dynamic)")
    p.add_argument("--static", action="store_true",
                   help="ONNX: fix every dimension (batch: --batch-size), MaSA tables as constants, no control flow")
    p.add_argument("--batch-size", type=positive_int, default=None, help="the batch of a --static export (default: 1)")
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="ONNX, OpenVINO: write a statically quantized model to --output, the float32 one beside "
                        "it (NAME.fp32.onnx, NAME.fp32.xml), and compare their accuracy")
    p.add_argument("--calib-data", default=None,
                   help="folder of images to calibrate int8 on (default: the run's own training images)")
    p.add_argument("--calib-images", type=positive_int, default=256, help="calibration images at most (default: 256)")
    p.add_argument("--eval-data", default=None,
                   help="image folder with class sub-folders to measure top-1 on (default: the run's validation split)")
    p.add_argument("--atol", type=positive_float, default=1e-4,
                   help="largest max abs difference accepted (default: 1e-4)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch")
    p.add_argument("--opset", type=positive_int, default=None,
                   help="ONNX opset (default 23: MaSA's attention as ONNX's Attention operator; "
                   "an earlier opset writes it in plain ops)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=_cmd_export)


# ---------------------------------------------------------------------------------- visualize
def _cmd_decay(args) -> int:
    result = visualize_decay(args.model, args.output, checkpoint=args.checkpoint, grid=args.grid, dpi=args.dpi)
    if args.json:
        print_json(result)
        return 0
    print(f"wrote {result['output']}: gamma_t = exp(lambda_t) per head; weight gamma_t^d at Manhattan distance d")
    for stage in result["stages"]:
        kind = "decomposed" if stage["decomposed"] else "full"
        gammas = " ".join(f"{g:.3f}" for g in stage["gamma"])
        halves = " ".join(f"{d:.1f}" for d in stage["half_distance"])
        print(f"  stage {stage['stage']} ({kind}, {stage['heads']} heads): gamma {gammas}\n"
              f"      distance where the weight halves: {halves}")
    return 0


def _cmd_attention(args) -> int:
    result = visualize_attention(args.image, args.model, args.output, checkpoint=args.checkpoint,
                                 query=tuple(args.query), block=args.block, img_size=args.img_size,
                                 cam=args.cam, device=args.device, dpi=args.dpi)
    if args.json:
        print_json(result)
        return 0
    best = result["prediction"]
    h, w = result["input_size"]
    print(f"wrote {result['output']}: input {h}x{w}, predicted {best['label']} ({best['prob']:.2%})")
    for s in result["stages"]:
        kind = "decomposed" if s["decomposed"] else "full"
        print(f"  stage {s['stage']} ({kind}, block {s['block'] + 1}, {s['grid'][0]}x{s['grid'][1]} tokens, "
              f"mean of {s['heads']} heads): query token {tuple(s['query'])}, peak weight {s['peak']:.4f} at "
              f"{tuple(s['peak_at'])}, mean Manhattan distance of the weight {s['mean_distance']:.2f} tokens")
    if "cam" in result:
        cam = result["cam"]
        print(f"  Grad-CAM of {cam['label']} [{cam['index']}] on the last stage ({cam['grid'][0]}x{cam['grid'][1]})")
    return 0


def _add_visualize(sub) -> None:
    p = sub.add_parser("visualize", help="pictures of MaSA: the spatial decay per head, the attention of a point",
                       description="Draw what MaSA does: `decay` (the spatial decay of every head) or "
                                   "`attention` (where one query point attends, per stage, on an image).")
    kinds = p.add_subparsers(dest="picture", metavar="PICTURE")
    kinds.required = True

    d = kinds.add_parser("decay", help="the spatial decay gamma_t^(|dr|+|dc|) of every head of every stage",
                         description="One panel per head, one row per stage: gamma_t ** (Manhattan distance to "
                                     "the centre token), gamma_t = exp(lambda_t), "
                                     "lambda_t = log(1 - 2^(-init_value - heads_range * t / heads)).")
    d.add_argument("--model", default=None, help="model name, e.g. rmt_s")
    d.add_argument("--checkpoint", default=None, help="optional: read the decay buffers from these weights")
    d.add_argument("--output", required=True, help="PNG file to write")
    d.add_argument("--grid", type=positive_int, default=21, help="tokens per side around the centre (default: 21)")
    d.add_argument("--dpi", type=positive_int, default=110, help="resolution of the PNG (default: 110)")
    d.add_argument("--json", action="store_true", help="print the per-head rates as one JSON object")
    d.set_defaults(func=_cmd_decay)

    a = kinds.add_parser("attention", help="the attention of a query point per stage, over an image",
                         description="Where a query point attends in one block of every stage (full and "
                                     "decomposed MaSA passes combined into one weight per token, heads "
                                     "averaged), overlaid on the image as the model sees it.")
    a.add_argument("image", help="an image file")
    a.add_argument("--model", default=None, help="model name, e.g. rmt_s (default: the checkpoint's, for our files)")
    a.add_argument("--checkpoint", required=True, help="official .pth, our .safetensors, or a run's best.pth")
    a.add_argument("--output", required=True, help="PNG file to write")
    a.add_argument("--query", type=probability, nargs=2, default=[0.5, 0.5], metavar=("ROW", "COL"),
                   help="query point as fractions of the image height and width (default: 0.5 0.5, the centre)")
    a.add_argument("--block", type=int, default=-1, help="block of each stage (default: -1, the last)")
    a.add_argument("--img-size", type=positive_int, default=None,
                   help="input size (default: the model's evaluation size)")
    a.add_argument("--cam", action="store_true", help="add a Grad-CAM map of the predicted class")
    a.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    a.add_argument("--dpi", type=positive_int, default=110, help="resolution of the PNG (default: 110)")
    a.add_argument("--json", action="store_true", help="print what was drawn as one JSON object")
    a.set_defaults(func=_cmd_attention)


def add_commands(subparsers) -> None:
    """Add this package's subcommands to the `rmt` parser."""
    _add_models(subparsers)
    _add_flops(subparsers)
    _add_convert(subparsers)
    _add_benchmark(subparsers)
    _add_export(subparsers)
    _add_visualize(subparsers)
