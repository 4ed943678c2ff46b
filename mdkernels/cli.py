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
        from mdkernels.interop.insightface_config import load_insightface_config, to_train_config

        mapped, ignored, notes = to_train_config(load_insightface_config(args.insightface_config))
        values.update(mapped)
        if ignored:
            print(f"mdk train: ignored insightface keys: {', '.join(f'{k} ({why})' for k, why in ignored.items())}",
                  file=sys.stderr)  # fmt: skip
        for note in notes:
            print(f"mdk train: {note}", file=sys.stderr)
    if args.config:
        with open(args.config) as f:
            try:
                loaded = json.load(f)
            except ValueError as err:
                raise ValueError(f"--config {args.config} is not valid JSON ({err})") from err
        TrainConfig.from_dict(loaded, f"--config {args.config}")  # its keys and types, named, before any flag
        values.update(loaded)
    for field in dataclasses.fields(TrainConfig):
        v = getattr(args, field.name, None)
        if v is not None:
            values[field.name] = v
    cfg = TrainConfig.from_dict(values, "the training configuration (flags over --config)")
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
    from pathlib import Path

    from mdkernels.eval import ijb
    from mdkernels.eval.verification import evaluate_checkpoint, load_eval_model

    if args.identify is not None or args.gallery is not None or args.distractors is not None:
        return _cmd_identify(args)
    if args.target is None:
        raise ValueError("mdk eval needs a TARGET (a .bin, an image folder or an IJB folder) or --identify PROBES "
                         "--gallery GALLERY")  # fmt: skip
    if ijb.is_ijb_folder(args.target) or args.ijb_target:
        model, size = load_eval_model(args.checkpoint, args.network)
        if size != 112:
            raise ValueError(f"{args.checkpoint}: IJB evaluation aligns to 112 x 112, the model takes {size} x {size}")
        if args.no_flip and args.flip != "add":
            raise ValueError("--no-flip and --flip concat contradict each other: pass one")
        flip = "none" if args.no_flip else args.flip
        plot = None if args.no_plot else (args.plot or _default_plot(args.json, f"{args.ijb_target or 'ijb'}_roc"))
        res = ijb.evaluate_ijb(model, args.target, target=args.ijb_target, flip=flip,
                               norm_score=not args.no_norm_score, detector_score=not args.no_detector_score,
                               batch_size=args.batch_size, workers=args.workers, device=args.device, warp=args.warp,
                               progress=not args.no_progress, cache_dir=_cache_dir(args),
                               model_digest=_digest(args), roc_png=plot, label=Path(args.checkpoint).stem)  # fmt: skip
        res["model"] = str(args.checkpoint)
        print(ijb.table(res), file=sys.stderr)
        out = ijb.public(res)
    else:
        for flag in ("batch_size", "workers", "device", "cache"):
            if getattr(args, flag) != _EVAL_DEFAULTS.get(flag):
                name = "--" + flag.replace("_", "-")
                raise ValueError(f"{name} applies to IJB folders and --identify, not to {args.target}")
        out = evaluate_checkpoint(args.checkpoint, args.target, flip=not args.no_flip, max_pairs=args.max_pairs,
                                  network=args.network)  # fmt: skip
        out.pop("roc")
    if args.json:
        ijb.write_json(out, args.json)
    print(json.dumps(out, indent=1))
    return 0


_EVAL_DEFAULTS = {"batch_size": 128, "workers": None, "device": None, "cache": None}


def _default_plot(json_path, stem):
    from pathlib import Path

    if json_path:
        return Path(json_path).with_suffix("").as_posix() + ".png"
    return f"{stem.lower()}.png"


def _cache_dir(args):
    return None if args.cache is None else args.cache


def _digest(args):
    if args.cache is None:
        return None
    from mdkernels.eval import embcache

    return embcache.file_digest(args.checkpoint) + (f":{args.network}" if args.network else "")


def _cmd_identify(args: argparse.Namespace) -> int:
    from mdkernels.eval import identify, ijb
    from mdkernels.eval.verification import load_eval_model

    if args.identify is None or args.gallery is None:
        raise ValueError("identification needs both --identify PROBES and --gallery GALLERY")
    if args.target is not None:
        raise ValueError(f"give either a TARGET ({args.target}) or --identify/--gallery, not both")
    model, size = load_eval_model(args.checkpoint, args.network)
    plot = None if args.no_plot else (args.plot or _default_plot(args.json, "identification"))
    res = identify.evaluate_identification(model, args.identify, args.gallery, args.distractors, size=size,
                                           flip=not args.no_flip, batch_size=args.batch_size,
                                           workers=args.workers, device=args.device,
                                           progress=not args.no_progress, cache_dir=_cache_dir(args),
                                           model_digest=_digest(args), plot=plot)  # fmt: skip
    res["model"] = str(args.checkpoint)
    if args.json:
        ijb.write_json(res, args.json)
    print(json.dumps(res, indent=1))
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from mdkernels.train import teacher

    print(json.dumps(teacher.import_run(args.run_dir, args.network, args.out, num_classes=args.num_classes),
                     indent=1))  # fmt: skip
    return 0


def _cmd_reshard(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mdkernels.interop import insightface

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

    from mdkernels.interop.onnx import OnnxBackbone, backbone_for_export, export_onnx

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
    from mdkernels.train.config import GROUPS, HELP
    from mdkernels.train.trainer import METHODS, TrainConfig

    groups = {g: p.add_argument_group(g) for g in GROUPS}
    for field in dataclasses.fields(TrainConfig):
        name = "--" + field.name.replace("_", "-")
        group, text = HELP[field.name]
        g = groups[group]
        # torchrun rejects --s and --m as ambiguous prefixes of its own options: longer aliases
        names = [name, *{"s": ["--scale"], "m": ["--margin"]}.get(field.name, [])]
        kind = field.type if isinstance(field.type, str) else field.type.__name__
        default = field.default
        if "bool" in kind:
            g.add_argument(*names, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{text} (default: {'on' if default else 'off'})")  # fmt: skip
        elif field.name == "method":
            g.add_argument(*names, dest=field.name, choices=METHODS, default=None, metavar="METHOD",
                           help=f"{text}: {', '.join(METHODS)} (default: {default})")  # fmt: skip
        else:
            conv = int if kind.startswith("int") else float if kind.startswith("float") else str
            shown = "" if default in (None, "") else f" (default: {default})"
            g.add_argument(*names, dest=field.name, type=conv, default=None, help=text + shown)


TRAIN_DOC = """Train a backbone with a margin loss, a margin-family head or a distillation method.

  mdk train --data data/train.rec --val data/lfw.bin --method arcface --backbone r50 --out runs/teacher
  mdk train --data data/train.rec --val data/lfw.bin --method margindistill --teacher runs/teacher/last.pt \\
            --backbone mbf --out runs/student
  mdk train --insightface-config configs/ms1mv3_r50.py           an arcface_torch config file
  torchrun --nproc_per_node=8 -m mdkernels.cli train ... --sharded  centers split over the ranks

Settings come from the defaults, then --insightface-config, then --config JSON, then the flags below.
--resume continues a run exactly (step, optimizer, RNG, data position); a killed run loses nothing saved.
"""


EVAL_DOC = """Evaluate a model (an mdk checkpoint, an exported .onnx, or an insightface model.pt with --network).

  mdk eval MODEL lfw.bin                      10-fold accuracy, TAR@FAR (insightface .bin sets)
  mdk eval MODEL IJBC/ --json ijbc.json       IJB-C 1:1 TAR@FAR=1e-6..1e-1 and 1:N, as insightface computes them
  mdk eval MODEL --identify PROBES --gallery GALLERY --distractors D.npy
                                              rank-1/5 against 10, 100, ... distractors (MegaFace's curve)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mdk", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print versions and what this install can run")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("demo", help="distil a teacher into students on generated identities (CPU)")
    p.add_argument("--quick", action="store_true", help="one seed, fewer epochs (about a third of the full run)")
    p.add_argument("--preset", default="full", choices=["full", "quick", "tiny"],
                   help="full (3 seeds, 3 to 5 min on 2 cores), quick (--quick) or tiny (a smoke test)")
    p.add_argument("--out", default="mdk_demo", help="output folder (default: mdk_demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--methods", default="", help="extra students of the margin family, comma-separated, e.g. "
                   "adaface,curricularface,magface,elasticface,subcenter (the default table is unchanged)")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("train", help="train a backbone with a margin loss or a distillation method",
                       description=TRAIN_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file of TrainConfig fields; flags override it")
    p.add_argument("--insightface-config", help="an arcface_torch configs/<job>.py (over configs/base.py); the "
                   "JSON --config and flags override it")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue exactly from <out>/last.pt")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a run")
    _add_train_flags(p)
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("bench", help="run a benchmark from a checkout: mdk bench margin_ce --suite cpu")
    p.add_argument("op", choices=["margin_ce", "margin_family", "distill", "l2norm", "cosine_topk"],
                   help="bench/bench_<op>.py")  # fmt: skip
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own arguments (see its --help)")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("eval", help="evaluate a model: a .bin set, an image folder, IJB-B/C, or identification",
                       description=EVAL_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="MODEL",
                   help="an mdk checkpoint, an exported .onnx, or an insightface model.pt/backbone.pth (--network)")
    p.add_argument("target", metavar="TARGET", nargs="?",
                   help="a verification .bin, an image folder (pairs are drawn from it), or an IJB-B/C folder in "
                   "insightface's layout (meta/, loose_crop/)")  # fmt: skip
    p.add_argument("--network", help="the insightface network of a model.pt/backbone.pth (r18 .. r200, mbf, ...)")
    p.add_argument("--json", metavar="OUT.json", help="also write the metrics to this file")
    p.add_argument("--no-flip", action="store_true", help="embed the image alone (IJB test mode F0)")
    g = p.add_argument_group("verification sets (.bin, image folders)")
    g.add_argument("--max-pairs", type=int, default=3000, help="pairs drawn from an image folder (default 3000)")
    g = p.add_argument_group("IJB-B / IJB-C (insightface's pipeline; the defaults are its test mode N1D1F2)")
    g.add_argument("--target", dest="ijb_target", choices=["IJBC", "IJBB"],
                   help="which set, when meta/ holds both (default: the one present)")
    g.add_argument("--flip", choices=["add", "concat"], default="add",
                   help="add the flipped image's embedding (F2, default) or concatenate it (F1)")
    g.add_argument("--no-norm-score", action="store_true", help="normalise each image's feature first (N0)")
    g.add_argument("--no-detector-score", action="store_true", help="no faceness-score weighting (D0)")
    g.add_argument("--warp", choices=["auto", "cv2", "numpy"], default="auto",
                   help="alignment warp: OpenCV as insightface (auto: when installed) or numpy")
    g = p.add_argument_group("identification against distractors (MegaFace-style)")
    g.add_argument("--identify", metavar="PROBES", help="probe images, PROBES/<identity>/<image>")
    g.add_argument("--gallery", metavar="GALLERY", help="gallery images, GALLERY/<identity>/<image>")
    g.add_argument("--distractors", metavar="DIR_OR_NPY",
                   help="a folder of aligned images, or an (N, D) .npy of embeddings (memory-mapped)")
    g = p.add_argument_group("running (IJB and identification)")
    g.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers decoding and aligning images (default: CPUs - 1, at most 8)")
    g.add_argument("--device", help="where the model runs (default: cuda when available, else cpu)")
    g.add_argument("--cache", metavar="DIR", help="cache embeddings here (resumed after a crash; reused per model)")
    g.add_argument("--plot", metavar="PNG", help="the ROC (IJB) or identification curve (default: next to --json, "
                   "else ./<target>_roc.png or ./identification.png)")  # fmt: skip
    g.add_argument("--no-plot", action="store_true", help="no plot")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
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
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
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
