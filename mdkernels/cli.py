"""``mdk``: the mdkernels command line.

mdk info                                   versions and capabilities
mdk demo [--quick] [--out DIR] [--methods adaface,...]   distillation on generated identities (CPU)
mdk train --data train.rec --val val.bin --method arcface|adaface|...|hinton [--config cfg.json] [--resume]
mdk train --insightface-config configs/ms1mv3_r50.py [flags]   an arcface_torch config file
mdk eval MODEL TARGET                      a checkpoint or .onnx on a verification .bin or an image folder
mdk import-insightface RUN_DIR --network r100 --out teacher.pt   an arcface_torch run as an mdk teacher
mdk reshard SRC --world R --out DIR [--layout mdk|insightface]   centers re-split for R ranks
mdk export CHECKPOINT OUT.onnx [--network r50]                   the backbone for deployment

Errors print one line (MDK_TRACEBACK=1 shows the traceback).
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
    if args.insightface_config:
        from mdkernels.train.insightface_config import load_insightface_config, to_train_config

        mapped, ignored, notes = to_train_config(load_insightface_config(args.insightface_config))
        values.update(mapped)
        if ignored:
            print(f"mdk train: ignored insightface keys: {', '.join(f'{k} ({why})' for k, why in ignored.items())}",
                  file=sys.stderr)  # fmt: skip
        for note in notes:
            print(f"mdk train: {note}", file=sys.stderr)
    if args.config:
        with open(args.config) as f:
            values.update(json.load(f))
    for field in dataclasses.fields(TrainConfig):
        v = getattr(args, field.name, None)
        if v is not None:
            values[field.name] = v
    cfg = TrainConfig.from_dict(values)
    if not cfg.data and not args.resume:
        raise ValueError("--data (a train.rec or an image folder) is required")
    try:
        result = train(cfg, resume=args.resume, overrides=set(values), overwrite=args.overwrite)
    finally:
        _close_process_group()
    metrics = {k: v for k, v in result["metrics"].items() if k != "roc"}
    print(json.dumps({"checkpoint": result["checkpoint"], "step": result["step"], **metrics}, indent=1))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mdkernels.train.trainer import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.target, flip=not args.no_flip, max_pairs=args.max_pairs,
                                  network=args.network)  # fmt: skip
    metrics.pop("roc")
    print(json.dumps(metrics, indent=1))
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from mdkernels.train import insightface

    print(json.dumps(insightface.import_run(args.run_dir, args.network, args.out, num_classes=args.num_classes),
                     indent=1))  # fmt: skip
    return 0


def _cmd_reshard(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mdkernels.train import insightface

    if args.world < 1:
        raise ValueError(f"--world must be >= 1, got {args.world}")
    full = insightface.load_full_centers(args.src, args.num_classes)
    if args.layout == "insightface":
        src = Path(args.src)  # an arcface_torch run: carry its backbone, step and optimizer state over
        source = src if src.is_dir() and not any(src.glob("centers_rank*_of*.pt")) else None
        paths = insightface.write_insightface_shards(full, args.out, args.world, source=source)
    else:
        paths = insightface.write_mdk_shards(full, args.out, args.world)
    print(json.dumps({"classes": full.shape[0], "embedding_size": full.shape[1], "world": args.world,
                      "layout": args.layout, "files": [str(p) for p in paths]}, indent=1))  # fmt: skip
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from mdkernels.train.export import OnnxBackbone, backbone_for_export, export_onnx

    model, size = backbone_for_export(args.checkpoint, args.network)
    path = export_onnx(model, args.out, input_size=size, opset=args.opset)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = torch.nn.functional.normalize(model(x).float(), dim=1)
    b = torch.nn.functional.normalize(OnnxBackbone(path)(x), dim=1)
    print(json.dumps({"onnx": str(path), "input": ["N", 3, size, size], "embedding_size": int(a.shape[1]),
                      "max_abs_diff_normalised": float((a - b).abs().max())}, indent=1))  # fmt: skip
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
    p.add_argument("--quick", action="store_true", help="one seed, fewer epochs (about a third of the full run)")
    p.add_argument("--preset", default="full", choices=["full", "quick", "tiny"])
    p.add_argument("--out", default="mdk_demo", help="output folder (default: mdk_demo)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--methods", default="", help="extra students of the margin family, comma-separated, e.g. "
                   "adaface,curricularface,magface,elasticface,subcenter (the default table is unchanged)")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("train", help="train a backbone with a margin loss or a distillation method")
    p.add_argument("--config", help="JSON file of TrainConfig fields; flags override it")
    p.add_argument("--insightface-config", help="an arcface_torch configs/<job>.py (over configs/base.py); the "
                   "JSON --config and flags override it")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue exactly from <out>/last.pt")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a run")
    _add_train_flags(p)
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("bench", help="run a benchmark from a checkout: mdk bench margin_ce --suite cpu")
    p.add_argument("op", choices=["margin_ce", "margin_family", "distill", "l2norm"], help="bench/bench_<op>.py")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own arguments (see its --help)")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("eval", help="evaluate a model on a .bin verification set or an image folder")
    p.add_argument("checkpoint", help="an mdk checkpoint, an exported .onnx, or an insightface model.pt (--network)")
    p.add_argument("--network", help="the insightface network of a model.pt/backbone.pth (r18 .. r200, mbf, ...)")
    p.add_argument("target", help="a verification .bin, or an image folder (pairs are drawn from it)")
    p.add_argument("--no-flip", action="store_true", help="no flip test-time augmentation")
    p.add_argument("--max-pairs", type=int, default=3000)
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("import-insightface", help="an arcface_torch run directory as an mdk teacher checkpoint")
    p.add_argument("run_dir", help="holds model.pt (or backbone.pth) and the per-rank center shards")
    p.add_argument("--network", required=True, help="its insightface network: r18 r34 r50 r100 r200 mbf mbf_large")
    p.add_argument("--num-classes", type=int, help="checked against the shards' total")
    p.add_argument("--out", required=True, help="the mdk teacher checkpoint to write (teacher.pt)")
    p.set_defaults(func=_cmd_import)
    p = sub.add_parser("reshard", help="re-split class centers over another number of ranks")
    p.add_argument("src", help="an arcface_torch run dir, a folder of mdk shards, an mdk checkpoint or a tensor")
    p.add_argument("--world", type=int, required=True, help="the new number of ranks R'")
    p.add_argument("--out", required=True, help="the folder to write the R' shard files into")
    p.add_argument("--layout", choices=["mdk", "insightface"], default="mdk",
                   help="mdk: centers_rank{r}_of{R}.pt for mdk train --init-centers; insightface: "
                   "checkpoint_gpu_{r}.pt for arcface_torch")  # fmt: skip
    p.add_argument("--num-classes", type=int, help="checked against the source")
    p.set_defaults(func=_cmd_reshard)
    p = sub.add_parser("export", help="export a backbone to ONNX (input 'data' N x 3 x 112 x 112)")
    p.add_argument("checkpoint", help="an mdk checkpoint, or an insightface model.pt/backbone.pth with --network")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--network", help="the insightface network of a model.pt/backbone.pth")
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def run(argv: list[str] | None = None) -> int:
    """The ``mdk`` console script: :func:`main` with a user error (bad input, a missing or corrupt file)
    printed as one line instead of a traceback; ``MDK_TRACEBACK=1`` re-raises."""
    import os

    try:
        return main(argv)
    except (ValueError, OSError, RuntimeError, FloatingPointError) as err:
        if os.environ.get("MDK_TRACEBACK") == "1":
            raise
        command = next((a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")), "")
        message = " ".join(str(err).split())
        print(f"mdk {command}: error: {message}" if command else f"mdk: error: {message}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()


if __name__ == "__main__":
    sys.exit(run())
