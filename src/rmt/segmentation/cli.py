"""``rmt seg train|eval|predict``: semantic segmentation (added to the command by rmt.cli)."""
from __future__ import annotations

from ..cliutils import non_negative_int, positive_int, print_json, print_results, probability
from ..training.config import add_config_flags, config_from_flags
from .config import SegConfig
from .evaluate import evaluate_checkpoint
from .predict import predict
from .train import train

__all__ = ["add_commands"]

CHECKPOINT_HELP = ("a segmentation run's model.safetensors, best.pth or last.pth, a folder written by rmt convert, "
                   "or an official mmseg RMT Semantic FPN / UperNet .pth")


def _cmd_train(args) -> int:
    cfg = config_from_flags(SegConfig, args, demo="shapes")
    result = train(cfg)
    if result.final:
        f = result.final
        print(f"done: {cfg.arch} with {cfg.backbone} on {'the bundled shapes' if cfg.data is None else cfg.data}, "
              f"{cfg.max_iters} iterations; mIoU {f['mIoU']:.2f}%, mAcc {f['mAcc']:.2f}%, aAcc {f['aAcc']:.2f}% "
              f"(best mIoU {result.best_value:.2f}% at iteration {result.best_at}). Run: {result.output}")
    return 0


def _cmd_eval(args) -> int:
    result = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, device=args.device,
                                 mode=args.mode, workers=args.workers, max_samples=args.max_samples,
                                 progress=not args.json)
    if args.json:
        print_json(result)
        return 0
    print(f"{result['arch']} ({args.checkpoint}) on {result['data']}/{result['split']}, {result['images']} images: "
          f"mIoU {result['mIoU']:.2f}%, mAcc {result['mAcc']:.2f}%, aAcc {result['aAcc']:.2f}% ({result['precision']})")
    if args.per_class:
        for name, iou in result["IoU"].items():
            acc = result["Acc"][name]
            iou_text, acc_text = ("-" if v is None else f"{v:6.2f}" for v in (iou, acc))
            print(f"  {name:20s} IoU {iou_text}  Acc {acc_text}")
    return 0


def _describe(result) -> str:
    classes = ", ".join(f"{c['label']} {c['fraction']:.0%}" for c in result["classes"][:6])
    return f"{result['path']}: {classes}" + (f" -> {result['output']}" if result["output"] else "")


def _cmd_predict(args) -> int:
    results = predict(args.checkpoint, args.images, output=args.output, device=args.device, mode=args.mode,
                      alpha=args.alpha, draw=not args.no_draw)
    return print_results(results, "rmt seg predict", args.json, _describe)


def add_commands(subparsers) -> None:
    """``rmt seg`` with ``train``, ``eval`` and ``predict``."""
    parser = subparsers.add_parser(
        "seg", help="semantic segmentation (UperNet, Semantic FPN)",
        description="Semantic segmentation with an RMT backbone and a UperNet or Semantic FPN head: train on "
                    "ADE20K-layout data, mIoU / mAcc / aAcc, colour-coded pictures of predictions.")
    tasks = parser.add_subparsers(dest="seg_command", metavar="COMMAND")
    tasks.required = True

    p = tasks.add_parser(
        "train", help="train a segmentor (default: UperNet, RMT-T, bundled shapes)",
        description="Train a segmentor. Configs: shapes (the CPU demo, default), upernet_160k, semantic_fpn_80k "
                    "(configs/segmentation/*.yaml). Under torchrun, trains with DDP. --resume auto continues "
                    "OUTPUT/last.pth. Exit status as for rmt train.")
    p.add_argument("--config", default=None, help="YAML config: a path or a bundled name (default: shapes)")
    add_config_flags(p, SegConfig)
    p.set_defaults(func=_cmd_train)

    modes = ["whole", "slide"]
    p = tasks.add_parser("eval", help="mIoU / mAcc / aAcc of a trained segmentor",
                         description="mIoU / mAcc / aAcc (as mmseg reports them) of a segmentor on ADE20K-layout "
                                     "data, images prepared by the official ADE20K test pipeline. The data's class "
                                     "list, when it has one, must be the model's.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data", default=None, help="ADE20K-layout root (default: the run's data)")
    p.add_argument("--split", default=None, help="split (default: the run's val_split)")
    p.add_argument("--mode", choices=modes, default=None, help="inference mode (default: the run's test_mode)")
    p.add_argument("--workers", type=non_negative_int, default=0)
    p.add_argument("--max-samples", type=positive_int, default=None, help="evaluate only the first N images")
    p.add_argument("--device", default="auto")
    p.add_argument("--per-class", action="store_true", help="also print each class's IoU and accuracy")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_eval)

    p = tasks.add_parser("predict", help="segment images; write colour-coded PNGs",
                         description="Segment images. Unreadable images are reported on stderr and skipped; the "
                                     "exit status is 1 when any was.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--output", default=None,
                   help="folder for <stem>_seg.png (default: predictions/; inputs sharing a stem get "
                        "<stem>-2_seg.png, -3, ... in the order given), or a .png name for one image")
    p.add_argument("--mode", choices=modes, default=None, help="inference mode (default: the run's test_mode)")
    p.add_argument("--alpha", type=probability, default=0.5, help="opacity of the class colours")
    p.add_argument("--no-draw", action="store_true", help="only print the class shares")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help='one JSON object per image: {"path", "output", "classes": '
                                                        '[{"label", "index", "fraction"}]}, or {"path", "error"}')
    p.set_defaults(func=_cmd_predict)
