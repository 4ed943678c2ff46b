"""``mdk demo``: teacher -> student distillation end to end on generated identities, on the CPU.

1. Generate a data set of synthetic identities (insightface RecordIO) and a verification ``.bin`` of
   pairs of held-out identities.
2. Train a teacher (IResNet-18 layout, width 0.5) with ArcFace.
3. Train a student (MobileFaceNet layout, width 0.25) without distillation (ArcFace) and with each of
   MarginDistillation, ProxylessKD, angular, triplet, Hinton KD and AdaDistill, over several seeds.
4. Evaluate every model on the held-out pairs (10-fold accuracy, TAR@FAR), print a table, and write
   ``results.json`` plus PNG plots (training curves, ROC) to ``--out``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from mdkernels.data import datasets as D
from mdkernels.train.config import DISTILL, FAMILY
from mdkernels.train.trainer import TrainConfig, train

STUDENT_METHODS = ("arcface", "margindistill", "proxyless", "angular", "triplet", "hinton", "adadistill")

PRESETS = {
    # full: <= 10 min on 2 CPU cores; quick: <= 3 min
    "full": dict(identities=80, per_identity=16, pairs=600, teacher_epochs=8, student_epochs=4, seeds=(0, 1, 2)),
    "quick": dict(identities=60, per_identity=16, pairs=400, teacher_epochs=6, student_epochs=3, seeds=(0,)),
    "tiny": dict(identities=12, per_identity=8, pairs=60, teacher_epochs=1, student_epochs=1, seeds=(0,)),  # tests
}

EMB, SIZE = 128, 32


def _common(out: Path, data: dict, epochs: int, seed: int, progress: bool) -> dict:
    return dict(data=data["train"], val=data["val"], epochs=epochs, batch_size=64, lr=0.1, warmup_epochs=0.5,
                seed=seed, workers=0, input_size=SIZE, embedding_size=EMB, s=32.0, progress=progress,
                tensorboard=False)  # fmt: skip


def run_demo(out: str | Path = "mdk_demo", preset: str = "full", progress: bool = True, plots: bool = True,
             methods: tuple[str, ...] = ()) -> list:  # fmt: skip
    """The demo; ``methods``: margin-family methods (``FAMILY``) trained as extra students without a
    teacher, added to the table after the default ones."""
    bad = [m for m in methods if m not in FAMILY]
    if bad:
        raise ValueError(f"--methods takes margin-family methods {FAMILY}, got {bad}")
    students = (*STUDENT_METHODS, *[m for m in methods if m not in STUDENT_METHODS])
    p = PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_start = time.perf_counter()
    print(f"mdk demo ({preset}): generating {p['identities']} identities x {p['per_identity']} images, "
          f"{p['pairs']} held-out verification pairs -> {out}")  # fmt: skip
    data = D.generate_dataset(out / "data", identities=p["identities"], per_identity=p["per_identity"],
                              heldout_identities=40, pairs=p["pairs"], size=SIZE, fmt="rec", seed=1234)  # fmt: skip
    rows = []
    teacher_cfg = TrainConfig(out=str(out / "teacher"), method="arcface", backbone="iresnet18", width=0.5,
                              **_common(out, data, p["teacher_epochs"], 0, progress))  # fmt: skip
    rows.append(_run("teacher", teacher_cfg, seed=0))
    teacher_ckpt = str(out / "teacher" / "last.pt")
    for seed in p["seeds"]:
        for method in students:
            cfg = TrainConfig(out=str(out / f"{method}_seed{seed}"), method=method, backbone="mobilefacenet",
                              width=0.25, teacher=teacher_ckpt if method in DISTILL else None,
                              **_common(out, data, p["student_epochs"], seed, progress))  # fmt: skip
            rows.append(_run(method, cfg, seed))
    summary = _summarise(rows, students)
    total = time.perf_counter() - t_start
    machine = f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    report = {"preset": preset, "seeds": list(p["seeds"]), "machine": machine, "seconds": round(total, 1),
              "summary": summary, "runs": rows}  # fmt: skip
    (out / "results.json").write_text(json.dumps([*summary, *rows], indent=1))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    _print_table(summary, preset, total, machine)
    if plots:
        _plots(out, rows)
    return summary


def _run(method: str, cfg: TrainConfig, seed: int) -> dict:
    t0 = time.perf_counter()
    result = train(cfg, overwrite=True)  # the demo owns its output folder
    m = result["metrics"]
    far, tar = m.pop("roc")
    np.save(Path(cfg.out) / "roc.npy", np.stack([far, tar]))
    return {"method": method, "seed": seed, "accuracy": round(m["accuracy"], 4),
            "accuracy_std": round(m["accuracy_std"], 4), "tar@far=1e-3": round(m["tar@far=1e-3"], 4),
            "tar@far=1e-4": round(m["tar@far=1e-4"], 4), "train_seconds": round(time.perf_counter() - t0, 1),
            "out": cfg.out}  # fmt: skip


def _summarise(rows: list, students: tuple[str, ...] = STUDENT_METHODS) -> list:
    out = []
    for method in ["teacher", *students]:
        mine = [r for r in rows if r["method"] == method]
        acc = np.array([r["accuracy"] for r in mine])
        tar = np.array([r["tar@far=1e-3"] for r in mine])
        out.append({"method": method, "summary": True, "seeds": len(mine),
                    "accuracy": round(float(acc.mean()), 4), "accuracy_spread": round(float(acc.std()), 4),
                    "tar@far=1e-3": round(float(tar.mean()), 4)})  # fmt: skip
    return out


def _print_table(summary: list, preset: str, seconds: float, machine: str) -> None:
    print(f"\nmdk demo ({preset}) on {machine}, {seconds / 60:.1f} min; verification on held-out identities")
    print(f"{'method':>14} | {'seeds':>5} | {'accuracy (10-fold)':>20} | {'TAR@FAR=1e-3':>12}")
    base = next(r for r in summary if r["method"] == "arcface")["accuracy"]
    for r in summary:
        delta = "" if r["method"] in ("teacher", "arcface") else f" ({100 * (r['accuracy'] - base):+.1f} pt)"
        acc = f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_spread']:.1f}{delta}"
        print(f"{r['method']:>14} | {r['seeds']:>5} | {acc:>20} | {100 * r['tar@far=1e-3']:>11.1f}%")


def _plots(out: Path, rows: list) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG plots (pip install matplotlib)")
        return
    first = [r for r in rows if r["seed"] == rows[0]["seed"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in first:
        with open(Path(r["out"]) / "log.csv") as f:
            log = [row for row in csv.DictReader(f) if row.get("loss")]
        ax.plot([int(x["step"]) for x in log], [float(x["loss"]) for x in log], label=r["method"])
    ax.set(xlabel="step", ylabel="training loss", title="mdk demo: training curves (seed 0)", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=110)
    fig, ax = plt.subplots(figsize=(5, 5))
    for r in first:
        far, tar = np.load(Path(r["out"]) / "roc.npy")
        ax.plot(np.maximum(far, 1e-4), tar, label=f"{r['method']} ({100 * r['accuracy']:.1f}%)")
    ax.set(xscale="log", xlabel="FAR", ylabel="TAR", title="held-out verification ROC (seed 0)", xlim=(1e-3, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close("all")
    print(f"plots: {out / 'training_curves.png'}, {out / 'roc.png'}")


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))
