"""``rmt det train|eval|predict``: detection and instance segmentation (added to the command by rmt.cli)."""
from __future__ import annotations

from ..cliutils import non_negative_int, positive_int, print_json, print_results, probability
from ..training.config import add_config_flags, config_from_flags
from .config import DetConfig
from .evaluate import evaluate_checkpoint
from .predict import predict
from .train import train

__all__ = ["add_commands"]


def _cmd_train(args) -> int:
    cfg = config_from_flags(DetConfig, args, demo="shapes")
    result = train(cfg)
    if result.final:
        f = result.final
        text = (f"done: {cfg.arch} with {cfg.backbone} on {'the bundled shapes' if cfg.data is None else cfg.data}, "
                f"{cfg.epochs} epochs; box AP {f['bbox_AP']:.3f} / AP50 {f['bbox_AP50']:.3f}")
        if "segm_AP" in f:
            text += f", mask AP {f['segm_AP']:.3f} / AP50 {f['segm_AP50']:.3f}"
        print(text + f" (best box AP {result.best_value:.3f} at epoch {result.best_at}). Run: {result.output}")
    return 0


def _cmd_eval(args) -> int:
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
    print(text + f" ({result['precision']})")
    return 0


def _describe(result) -> str:
    found = ", ".join(f"{d['label']} {d['score']:.2f}" for d in result["detections"]) or "nothing"
    return f"{result['path']}: {found}" + (f" -> {result['output']}" if result["output"] else "")


def _cmd_predict(args) -> int:
    results = predict(args.checkpoint, args.images, output=args.output, score_thresh=args.score_thresh,
                      device=args.device, draw=not args.no_draw)
    return print_results(results, "rmt det predict", args.json, _describe)


def add_commands(subparsers) -> None:
    """``rmt det`` with ``train``, ``eval`` and ``predict``."""
    parser = subparsers.add_parser(
        "det", help="object detection / instance segmentation (Mask R-CNN, Cascade, RetinaNet, ...)",
        description="Detectors from torchvision (Mask R-CNN, Faster R-CNN, RetinaNet, Cascade Mask R-CNN) on an "
                    "RMT backbone with an FPN: train on COCO-format data, COCO AP, pictures of predictions.")
    tasks = parser.add_subparsers(dest="det_command", metavar="COMMAND")
    tasks.required = True

    p = tasks.add_parser(
        "train", help="train a detector (default: Mask R-CNN, RMT-T, bundled shapes)",
        description="Train a detector. Configs: shapes (the CPU demo, default), mask_rcnn_1x, mask_rcnn_3x, "
                    "cascade_mask_rcnn_3x, retinanet_1x, faster_rcnn_1x (configs/detection/*.yaml). Under torchrun, "
                    "trains with DDP. --resume auto continues OUTPUT/last.pth. Exit status as for rmt train.")
    p.add_argument("--config", default=None, help="YAML config: a path or a bundled name (default: shapes)")
    add_config_flags(p, DetConfig)
    p.set_defaults(func=_cmd_train)

    p = tasks.add_parser("eval", help="COCO box/mask AP of a trained detector")
    p.add_argument("--checkpoint", required=True, help="a detection run's model.safetensors, best.pth or last.pth, a "
                   "model folder (rmt convert), or an official mmdet RMT .pth")
    p.add_argument("--data", default=None, help="COCO-format root (default: the run's data); its categories must be "
                                                "the model's classes")
    p.add_argument("--split", default=None, help="split (default: the run's val_split)")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--workers", type=non_negative_int, default=0)
    p.add_argument("--max-samples", type=positive_int, default=None, help="evaluate only the first N images")
    p.add_argument("--device", default="auto")
    p.add_argument("--verbose", action="store_true", help="print COCOeval's full table")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_eval)

    p = tasks.add_parser("predict", help="detect objects in images; write PNGs with boxes and masks",
                         description="Detect objects in images. Unreadable images are reported on stderr and "
                                     "skipped; the exit status is 1 when any was.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", required=True, help="a detection run's model.safetensors, best.pth or last.pth, a "
                   "model folder (rmt convert), or an official mmdet RMT .pth")
    p.add_argument("--output", default=None,
                   help="folder for <stem>_det.png (default: predictions/; inputs sharing a stem get "
                        "<stem>-2_det.png, -3, ... in the order given), or a .png name for one image")
    p.add_argument("--score-thresh", type=probability, default=0.5, help="keep detections scoring at least this")
    p.add_argument("--no-draw", action="store_true", help="only print the detections")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help='one JSON object per image: {"path", "output", "detections": '
                                                        '[{"label", "index", "score", "box"}]}, or {"path", "error"}')
    p.set_defaults(func=_cmd_predict)
