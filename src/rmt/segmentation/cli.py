"""`rmt seg train|eval|predict`: semantic segmentation (registered by rmt.cli)."""
from __future__ import annotations

import sys

from ..dense.cli import add_subcommand, add_task_parser, add_train_command, print_json


def _train(cfg) -> int:
    from .train import train

    result = train(cfg)
    if result.stopped_early or not result.final:
        return 0
    f = result.final
    print(f"done: {cfg.arch} with {cfg.backbone} on {'the bundled shapes' if cfg.data is None else cfg.data}, "
          f"{cfg.max_iters} iterations; mIoU {f['mIoU']:.2f}%, mAcc {f['mAcc']:.2f}%, aAcc {f['aAcc']:.2f}% "
          f"(best mIoU {result.best_value:.2f}% at iteration {result.best_iteration}). Run: {result.output}")
    return 0


def _cmd_eval(args) -> int:
    from .predict import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, device=args.device,
                                 mode=args.mode, workers=args.workers, max_samples=args.max_samples,
                                 progress=not args.json)
    if args.json:
        print_json(result)
        return 0
    print(f"{result['arch']} ({args.checkpoint}) on {result['data']}/{result['split']}, {result['images']} images: "
          f"mIoU {result['mIoU']:.2f}%, mAcc {result['mAcc']:.2f}%, aAcc {result['aAcc']:.2f}%")
    if args.per_class:
        for name, iou in result["IoU"].items():
            acc = result["Acc"][name]
            print(f"  {name:20s} IoU {'-' if iou is None else f'{iou:6.2f}'}  Acc {'-' if acc is None else f'{acc:6.2f}'}")
    return 0


def _cmd_predict(args) -> int:
    from .predict import predict

    results = predict(args.checkpoint, args.images, output=args.output, device=args.device, mode=args.mode,
                      alpha=args.alpha, draw=not args.no_draw)
    for r in results:
        if args.json:
            print_json(r)
            continue
        classes = ", ".join(f"{name} {share:.0%}" for name, share in list(r["classes"].items())[:6])
        print(f"{r['image']}: {classes}" + (f" -> {r['output']}" if r["output"] else ""))
    sys.stdout.flush()
    return 0


def add_commands(subparsers) -> None:
    """``rmt seg`` with ``train``, ``eval`` and ``predict``."""
    from ..dense.config import SegConfig

    tasks = add_task_parser(
        subparsers, "seg", help="semantic segmentation (UperNet, Semantic FPN)",
        description="Semantic segmentation with an RMT backbone and a UperNet or Semantic FPN head: train on "
                    "ADE20K-layout data, mIoU / mAcc / aAcc, colour-coded pictures of predictions.")
    add_train_command(
        tasks, SegConfig, "shapes", _train, help="train a segmentor (default: UperNet, RMT-T, bundled shapes)",
        description="Train a segmentor. Configs: seg_shapes (the CPU demo, default), seg_upernet_160k, "
                    "seg_semantic_fpn_80k (configs/seg_*.yaml). Under torchrun, trains with DDP. --resume auto "
                    "continues OUTPUT/last.pth.")

    modes = ["whole", "slide"]
    p = add_subcommand(tasks, "eval", help="mIoU / mAcc / aAcc of a trained segmentor")
    p.add_argument("--checkpoint", required=True, help="a segmentation run's best.pth, last.pth or model.safetensors")
    p.add_argument("--data", default=None, help="ADE20K-layout root (default: the run's data)")
    p.add_argument("--split", default=None, help="split (default: the run's val_split)")
    p.add_argument("--mode", choices=modes, default=None, help="inference mode (default: the run's test_mode)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--device", default="auto")
    p.add_argument("--per-class", action="store_true", help="also print each class's IoU and accuracy")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_eval)

    p = add_subcommand(tasks, "predict", help="segment images; write colour-coded PNGs")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", required=True, help="a segmentation run's best.pth, last.pth or model.safetensors")
    p.add_argument("--output", default=None,
                   help="folder for <stem>_seg.png (default: predictions/), or a .png name for one image")
    p.add_argument("--mode", choices=modes, default=None, help="inference mode (default: the run's test_mode)")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours")
    p.add_argument("--no-draw", action="store_true", help="only print the class shares")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.set_defaults(func=_cmd_predict)
