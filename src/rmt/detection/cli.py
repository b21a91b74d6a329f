"""`rmt det train|eval|predict`: detection and instance segmentation (registered by rmt.cli)."""
from __future__ import annotations

import sys

from ..dense.cli import add_subcommand, add_task_parser, add_train_command, print_json


def _train(cfg) -> int:
    from .train import train

    result = train(cfg)
    if result.stopped_early or not result.final:
        return 0
    f = result.final
    text = (f"done: {cfg.arch} with {cfg.backbone} on {'the bundled shapes' if cfg.data is None else cfg.data}, "
            f"{cfg.epochs} epochs; box AP {f['bbox_AP']:.3f} / AP50 {f['bbox_AP50']:.3f}")
    if "segm_AP" in f:
        text += f", mask AP {f['segm_AP']:.3f} / AP50 {f['segm_AP50']:.3f}"
    print(text + f" (best box AP {result.best_value:.3f} at iteration {result.best_iteration}). Run: {result.output}")
    return 0


def _cmd_eval(args) -> int:
    from .predict import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, device=args.device,
                                 batch_size=args.batch_size, workers=args.workers, max_samples=args.max_samples,
                                 verbose=args.verbose and not args.json, progress=not args.json)
    if args.json:
        print_json(result)
        return 0
    text = (f"{result['arch']} ({args.checkpoint}) on {result['data']}/{result['split']}, {result['images']} images: "
            f"box AP {result['bbox_AP']:.3f}, AP50 {result['bbox_AP50']:.3f}, AP75 {result['bbox_AP75']:.3f}")
    if result["masks"]:
        text += f"; mask AP {result['segm_AP']:.3f}, AP50 {result['segm_AP50']:.3f}, AP75 {result['segm_AP75']:.3f}"
    print(text)
    return 0


def _cmd_predict(args) -> int:
    from .predict import predict

    results = predict(args.checkpoint, args.images, output=args.output, score_thresh=args.score_thresh,
                      device=args.device, draw=not args.no_draw)
    for r in results:
        if args.json:
            print_json(r)
            continue
        found = ", ".join(f"{d['class']} {d['score']:.2f}" for d in r["detections"]) or "nothing"
        print(f"{r['image']}: {found}" + (f" -> {r['output']}" if r["output"] else ""))
    sys.stdout.flush()
    return 0


def add_commands(subparsers) -> None:
    """``rmt det`` with ``train``, ``eval`` and ``predict``."""
    from ..dense.config import DetConfig

    tasks = add_task_parser(
        subparsers, "det", help="object detection / instance segmentation (Mask R-CNN, Cascade, RetinaNet, ...)",
        description="Detectors from torchvision (Mask R-CNN, Faster R-CNN, RetinaNet, Cascade Mask R-CNN) on an "
                    "RMT backbone with an FPN: train on COCO-format data, COCO AP, pictures of predictions.")
    add_train_command(
        tasks, DetConfig, "shapes", _train, help="train a detector (default: Mask R-CNN, RMT-T, bundled shapes)",
        description="Train a detector. Configs: det_shapes (the CPU demo, default), det_mask_rcnn_1x, "
                    "det_mask_rcnn_3x, det_cascade_mask_rcnn_3x, det_retinanet_1x, ... (configs/det_*.yaml). "
                    "Under torchrun, trains with DDP. --resume auto continues OUTPUT/last.pth.")

    p = add_subcommand(tasks, "eval", help="COCO box/mask AP of a trained detector")
    p.add_argument("--checkpoint", required=True, help="a detection run's best.pth, last.pth or model.safetensors")
    p.add_argument("--data", default=None, help="COCO-format root (default: the run's data)")
    p.add_argument("--split", default=None, help="split (default: the run's val_split)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--device", default="auto")
    p.add_argument("--verbose", action="store_true", help="print COCOeval's full table")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_eval)

    p = add_subcommand(tasks, "predict", help="detect objects in images; write PNGs with boxes and masks")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", required=True, help="a detection run's best.pth, last.pth or model.safetensors")
    p.add_argument("--output", default=None,
                   help="folder for <stem>_det.png (default: predictions/), or a .png name for one image")
    p.add_argument("--score-thresh", type=float, default=0.5, help="keep detections scoring at least this")
    p.add_argument("--no-draw", action="store_true", help="only print the detections")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.set_defaults(func=_cmd_predict)
