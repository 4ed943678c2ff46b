"""``mdk``: the mdkernels command line.

mdk info                                   versions and capabilities
mdk demo [--quick] [--out DIR] [--methods adaface,...]   distillation on generated identities (CPU)
mdk train --data train.rec --val val.bin --method arcface|adaface|...|hinton [--config cfg.json] [--resume]
mdk eval CHECKPOINT TARGET                 a checkpoint on a verification .bin or an image folder
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from mdkernels.info import info

    print(json.dumps(info(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mdkernels.train.demo import run_demo

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else ()
    run_demo(out=args.out, preset="quick" if args.quick else args.preset, progress=not args.no_progress,
             methods=methods)  # fmt: skip
    return 0


def _close_process_group() -> None:
    """Tear down the process group the trainer started under torchrun. Left to interpreter exit, gloo's
    threads can outlive it and abort the process ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _cmd_train(args: argparse.Namespace) -> int:
    from mdkernels.train.trainer import TrainConfig, train

    values = {}
    if args.config:
        with open(args.config) as f:
            values.update(json.load(f))
    for field in dataclasses.fields(TrainConfig):
        v = getattr(args, field.name, None)
        if v is not None:
            values[field.name] = v
    cfg = TrainConfig.from_dict(values)
    if not cfg.data and not args.resume:
        raise SystemExit("mdk train: --data (a train.rec or an image folder) is required")
    try:
        result = train(cfg, resume=args.resume, overrides=set(values))
    except ValueError as err:
        if args.resume and "--resume" in str(err):
            raise SystemExit(f"mdk train: {err}") from None
        raise
    finally:
        _close_process_group()
    metrics = {k: v for k, v in result["metrics"].items() if k != "roc"}
    print(json.dumps({"checkpoint": result["checkpoint"], "step": result["step"], **metrics}, indent=1))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mdkernels.train.trainer import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.target, flip=not args.no_flip, max_pairs=args.max_pairs)
    metrics.pop("roc")
    print(json.dumps(metrics, indent=1))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib
    import os

    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(f"bench.bench_{args.op}")
    except ImportError as err:
        raise SystemExit(f"mdk bench runs from a checkout of mdkernels (bench/ is not installed): {err}") from err
    module.main(args.rest)
    return 0


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from mdkernels.train.trainer import METHODS, TrainConfig

    for field in dataclasses.fields(TrainConfig):
        name = "--" + field.name.replace("_", "-")
        # torchrun rejects --s and --m as ambiguous prefixes of its own options: longer aliases
        names = [name, *{"s": ["--scale"], "m": ["--margin"]}.get(field.name, [])]
        kind = field.type if isinstance(field.type, str) else field.type.__name__
        if "bool" in kind:
            p.add_argument(*names, dest=field.name, action=argparse.BooleanOptionalAction, default=None)
        elif field.name == "method":
            p.add_argument(*names, dest=field.name, choices=METHODS, default=None)
        else:
            conv = int if kind.startswith("int") else float if kind.startswith("float") else str
            p.add_argument(*names, dest=field.name, type=conv, default=None,
                           help=f"default: {field.default!r}")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mdk", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print versions and what this install can run")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("demo", help="distil a teacher into students on generated identities (CPU)")
    p.add_argument("--quick", action="store_true", help="one seed, fewer epochs (about 3 minutes on 2 cores)")
    p.add_argument("--preset", default="full", choices=["full", "quick", "tiny"])
    p.add_argument("--out", default="mdk_demo", help="output folder (default: mdk_demo)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--methods", default="", help="extra students of the margin family, comma-separated, e.g. "
                   "adaface,curricularface,magface,elasticface,subcenter (the default table is unchanged)")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("train", help="train a backbone with a margin loss or a distillation method")
    p.add_argument("--config", help="JSON file of TrainConfig fields; flags override it")
    p.add_argument("--resume", action="store_true", help="continue exactly from <out>/last.pt")
    _add_train_flags(p)
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("bench", help="run a benchmark from a checkout: mdk bench margin_ce --suite cpu")
    p.add_argument("op", choices=["margin_ce", "margin_family", "distill", "l2norm"], help="bench/bench_<op>.py")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own arguments (see its --help)")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("eval", help="evaluate a checkpoint on a .bin verification set or an image folder")
    p.add_argument("checkpoint")
    p.add_argument("target", help="a verification .bin, or an image folder (pairs are drawn from it)")
    p.add_argument("--no-flip", action="store_true", help="no flip test-time augmentation")
    p.add_argument("--max-pairs", type=int, default=3000)
    p.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
