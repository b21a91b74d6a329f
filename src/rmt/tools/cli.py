"""`rmt` subcommands of rmt.tools (registered by rmt.cli): ``export``, ``visualize``.

Each command parses its flags, calls one function of :mod:`rmt.tools.predict`,
:mod:`rmt.tools.export` or :mod:`rmt.tools.visualize`, and prints what it did.
"""
from __future__ import annotations

import json


def _print_json(obj) -> None:
    print(json.dumps(obj), flush=True)


# ------------------------------------------------------------------------------------- export
def _cmd_export(args) -> int:
    from .export import export_model

    result = export_model(args.model, args.output, args.format, checkpoint=args.checkpoint,
                          img_size=tuple(args.img_size) if args.img_size else None,
                          dynamic_size=False if args.static_size else None, verify=not args.no_verify,
                          atol=args.atol, opset=args.opset)
    if args.json:
        _print_json(result.to_dict())
        return 0
    c, h, w = result.input_size
    print(f"wrote {result.path} ({result.format}, example input {c}x{h}x{w}; dynamic: {', '.join(result.dynamic)})")
    for check in result.checks:
        print(f"  input {'x'.join(map(str, check['shape']))}: max abs diff vs PyTorch {check['max_abs_diff']:.3g}")
    if result.checks:
        print(f"verified: max abs diff {result.max_abs_diff:.3g} <= {args.atol:g}")
    else:
        print("not verified (--no-verify)")
    return 0


def _add_export(sub) -> None:
    from .export import FORMATS

    p = sub.add_parser(
        "export", help="export a classifier to ONNX, TorchScript or a torch.export program",
        description="Export a classifier (images -> logits) with a dynamic batch (and dynamic height/width where "
                    "the format allows), then load the file back and compare it with PyTorch on random inputs.")
    p.add_argument("--model", default=None, help="model name, e.g. rmt_s (default: the checkpoint's, for our files)")
    p.add_argument("--checkpoint", required=True, help="official .pth, our .safetensors, or a run's best.pth")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, help="file to write (.onnx, .pt, .pt2)")
    p.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="example input size (default: the model's evaluation size)")
    p.add_argument("--static-size", action="store_true", help="fix height and width (the batch stays dynamic)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest max abs difference accepted (default: 1e-4)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=_cmd_export)


# ---------------------------------------------------------------------------------- visualize
def _cmd_decay(args) -> int:
    from .visualize import visualize_decay

    result = visualize_decay(args.model, args.output, checkpoint=args.checkpoint, grid=args.grid, dpi=args.dpi)
    if args.json:
        _print_json(result)
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
    from .visualize import visualize_attention

    result = visualize_attention(args.image, args.model, args.output, checkpoint=args.checkpoint,
                                 query=tuple(args.query), block=args.block, img_size=args.img_size,
                                 cam=args.cam, device=args.device, dpi=args.dpi)
    if args.json:
        _print_json(result)
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
    d.add_argument("--grid", type=int, default=21, help="tokens per side around the centre (default: 21)")
    d.add_argument("--dpi", type=int, default=110, help="resolution of the PNG (default: 110)")
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
    a.add_argument("--query", type=float, nargs=2, default=[0.5, 0.5], metavar=("ROW", "COL"),
                   help="query point as fractions of the image height and width (default: 0.5 0.5, the centre)")
    a.add_argument("--block", type=int, default=-1, help="block of each stage (default: -1, the last)")
    a.add_argument("--img-size", type=int, default=None, help="input size (default: the model's evaluation size)")
    a.add_argument("--cam", action="store_true", help="add a Grad-CAM map of the predicted class")
    a.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    a.add_argument("--dpi", type=int, default=110, help="resolution of the PNG (default: 110)")
    a.add_argument("--json", action="store_true", help="print what was drawn as one JSON object")
    a.set_defaults(func=_cmd_attention)


def add_commands(subparsers) -> None:
    """Add this package's subcommands to the `rmt` parser."""
    _add_export(subparsers)
    _add_visualize(subparsers)
