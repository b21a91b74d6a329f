"""The ``rmt`` command: a thin layer over the Python API.

Each subcommand parses its flags and calls one documented function. Errors caused by the user's
input (:class:`rmt.errors.RMTError`) print one line and exit with status 2; ``--debug`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Dict, List, Optional, Sequence

from .errors import RMTError

__all__ = ["main", "build_parser", "format_table"]


def format_table(rows: Sequence[Dict[str, object]], columns: Sequence[tuple]) -> str:
    """Plain-text table. ``columns``: ``(key, header, format)`` with a ``str.format`` spec."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(k) is None else format(row[k], f) for k, _, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=None, sort_keys=False))


# ------------------------------------------------------------------------------------- models
def _cmd_models(args) -> int:
    from .tools.flops import variants_table

    rows = variants_table()
    if args.json:
        _print_json(rows)
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
    from .tools.flops import model_facts

    kwargs = {}
    if args.token_label:
        kwargs["token_label"] = True
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    facts = model_facts(args.model, tuple(args.img_size), **kwargs)
    if args.json:
        _print_json(facts)
    else:
        h, w = args.img_size
        print(f"{args.model} at {h}x{w}: {facts['params']:,} params, {facts['gflops']:.3f} GFLOPs (multiply-adds)")
    return 0


def _add_flops(sub) -> None:
    p = sub.add_parser("flops", help="parameters and GFLOPs (multiply-adds) of a model at any input size")
    p.add_argument("model", help="model name, e.g. rmt_s or rmt_s.tl_in1k")
    p.add_argument("--img-size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--token-label", action="store_true", help="count the token-labelling model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_flops)


# ------------------------------------------------------------------------------------ convert
def _cmd_convert(args) -> int:
    from .models.weights import convert_checkpoint

    name, path = convert_checkpoint(args.input, args.output, model_name=args.model, use_ema=args.use_ema)
    print(f"converted {args.input} -> {path} ({name})")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert an official checkpoint (.pth) to rmt's .safetensors")
    p.add_argument("input", help="official checkpoint (.pth), or one of ours")
    p.add_argument("output", help="output .safetensors file")
    p.add_argument("--model", default=None, help="variant (default: read off the weights)")
    p.add_argument("--use-ema", action="store_true", help="take the EMA weights when the file has them")
    p.set_defaults(func=_cmd_convert)


# -------------------------------------------------------------------------------------- main
_COMMANDS: List[Callable] = [_add_models, _add_flops, _add_convert]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser = argparse.ArgumentParser(prog="rmt", description=__doc__.splitlines()[0], parents=[common])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    original_add = sub.add_parser

    def add_parser(name, **kwargs):  # every subcommand accepts --debug too
        kwargs.setdefault("parents", []).append(common)
        return original_add(name, **kwargs)

    sub.add_parser = add_parser
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except RMTError as e:
        if args.debug:
            raise
        print(f"rmt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rmt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
