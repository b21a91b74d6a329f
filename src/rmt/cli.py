"""The ``rmt`` command: assembles the subcommands that each package adds (classification,
detection, segmentation, tools) and turns errors into one line and an exit status.

Exit statuses (rmt.errors): 0 success; 1 an internal error (a bug: ``--debug`` shows the traceback)
or, for ``predict``, some inputs could not be read; 2 bad input from the user (a path, a name, a
value, a file the file system refused); 3 training stopped on a non-finite loss; 128+N a run stopped
by signal N after saving. Without ``--debug`` no command prints a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, List, Optional, Sequence

from .classification import cli as classification_cli
from .cliutils import format_table, print_json
from .detection import cli as detection_cli
from .errors import RMTError, RunInterrupted
from .runtime import keep_freed_memory
from .segmentation import cli as segmentation_cli
from .tools import cli as tools_cli

__all__ = ["main", "build_parser"]

_print_json = print_json


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
    from .models.factory import convert_checkpoint

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


# ---------------------------------------------------------------------------------- benchmark
def _cmd_benchmark(args) -> int:
    import torch

    from .tools.benchmark import DEFAULT_PEERS, benchmark

    if args.threads is not None:
        if args.threads <= 0:
            raise RMTError("--threads must be positive")
        torch.set_num_threads(args.threads)
    models = list(args.models)
    if not args.no_peers:
        peers = args.peers if args.peers is not None else \
            [f"reference:{m}" for m in models if m.startswith("rmt_")] + list(DEFAULT_PEERS)
        models += [p for p in peers if p not in models]
    modes = ["infer", "train"] if args.mode == "both" else [args.mode]
    rows = []
    for mode in modes:
        def progress(i, n, mode=mode):
            if not args.json and sys.stderr.isatty():
                print(f"\r{mode}: round {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)

        results = benchmark(models, batch_size=args.batch_size, img_size=tuple(args.img_size), mode=mode,
                            warmup=args.warmup, iters=args.iters, device=args.device,
                            compile_model=args.compile, channels_last=args.channels_last,
                            memory=not args.no_memory, amp=args.amp, progress=progress)
        first = results[0]
        for r in results:
            row = r.to_dict()
            row["speedup_of_first"] = first.img_per_s and first.img_per_s / r.img_per_s
            rows.append(row)
    if args.json:
        _print_json(rows)
        return 0
    h, w = args.img_size
    print(f"batch {args.batch_size}, {h}x{w}, {args.device}{', autocast ' + args.amp if args.amp else ''}, "
          f"{torch.get_num_threads()} threads, median of {args.iters} interleaved rounds after {args.warmup} warm-up"
          f"{'; freed memory kept (rmt.runtime)' if keep_freed_memory() else ''}")
    print(format_table(rows, [("model", "model", ""), ("mode", "mode", ""), ("img_per_s", "img/s", ".1f"),
                              ("ms_per_batch", "ms/batch", ".0f"), ("peak_mb", "peak MB", ".0f"),
                              ("speedup_of_first", f"{rows[0]['model']} speed-up", ".2f")]))
    return 0


def _add_benchmark(sub) -> None:
    p = sub.add_parser("benchmark", help="throughput and peak memory, side by side with peers",
                       description="Time models interleaved in one process: img/s (median of rounds after "
                                   "warm-up) and peak tensor memory. By default each rmt_* model is compared "
                                   "with its straightforward reference implementation, swin_tiny and "
                                   "convnext_tiny.")
    p.add_argument("models", nargs="+", help="rmt_s, reference:rmt_s, or timm model names")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    p.add_argument("--mode", choices=["infer", "features", "train", "both"], default="infer",
                   help="infer: images -> logits; features: images -> last feature map; train: forward, "
                        "backward and AdamW step; both: infer and train (default: infer)")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast the forward (default: float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--iters", type=int, default=5, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per model first")
    p.add_argument("--peers", nargs="*", default=None, help="models to compare with (default: reference + timm)")
    p.add_argument("--no-peers", action="store_true", help="time only the given models")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile every model first")
    p.add_argument("--channels-last", action="store_true", help="channels-last inputs and weights")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_cmd_benchmark)


# -------------------------------------------------------------------------------------- main
_COMMANDS: List[Callable] = [_add_models, _add_flops, _add_convert, _add_benchmark]
# packages that add their own subcommands: each module has `add_commands(subparsers)`
_COMMAND_MODULES = (classification_cli, tools_cli, detection_cli, segmentation_cli)


class _Parser(argparse.ArgumentParser):
    """The parser of ``rmt`` and of every subcommand: each takes ``--debug`` (one flag, accepted
    wherever it is given), and a usage mistake is one line and exit status 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show tracebacks instead of one-line errors")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rmt", description="RMT (Retentive Networks Meet Vision Transformers): models, training, "
                                             "evaluation and tools.")
    parser.set_defaults(debug=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")  # subcommand parsers are _Parser too
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    for module in _COMMAND_MODULES:
        module.add_commands(sub)
    return parser


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``rmt``; returns the exit status (see rmt.errors for what each means)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage mistake (one line, status 2): a status to return, as for the rest
        return int(e.code or 0)
    keep_freed_memory()  # see rmt.runtime: fewer page faults, 10-20% faster CPU training steps
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("rmt").setLevel(logging.DEBUG if args.debug else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, RunInterrupted):
            print(f"rmt: {e}", file=sys.stderr)
        elif isinstance(e, RMTError):
            print(f"rmt: error: {_one_line(e)}", file=sys.stderr)
        elif isinstance(e, OSError):  # the file system refused: a path, a permission, a full disk
            where = f": {e.filename}" if e.filename else ""
            print(f"rmt: error: {e.strerror or _one_line(e)}{where}", file=sys.stderr)
            return 2
        else:
            print(f"rmt: internal error: {type(e).__name__}: {_one_line(e)[:500]} (run with --debug for the "
                  f"traceback, and please report it)", file=sys.stderr)
            return 1
        return e.exit_status
    except KeyboardInterrupt:
        print("rmt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
