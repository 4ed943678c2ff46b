"""``mdk``: the mdkernels command line (``mdk info``, ``mdk demo``; train/eval/bench come later)."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from mdkernels.info import info

    print(json.dumps(info(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mdkernels.demo import run_demo

    run_demo(steps=args.steps, num_classes=args.classes, seed=args.seed, backend=args.backend, out=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdk", description="mdkernels: fused margin softmax and distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print versions and what this install can run")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("demo", help="train an ArcFace head on generated identities (CPU, seconds)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--classes", type=int, default=1000, help="identities in the generated set (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "reference"])
    p.add_argument("--out", default=None, help="write the loss curve as JSON to this file")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
