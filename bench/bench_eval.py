"""Evaluation at scale: identification against a million distractors, and IJB images per second.

    python -m bench.bench_eval identify          # 3,530 probes, 80 gallery identities, 1,000,000 distractors, D=512
    python -m bench.bench_eval ijb --network r50 # images/s of the IJB pipeline (decode, align, flip, embed)

``identify`` writes synthetic unit embeddings to an ``.npy`` (memory-mapped, like a cached distractor set) and times
:func:`mdkernels.eval.identify.identification_curve` over all of them: the search alone, the part that grows with
the distractors (embedding is once per model, then cached); its row goes to bench/results/<device>.csv as op
``cosine_topk``, variant ``identify``. ``ijb`` times :func:`mdkernels.eval.ijb.evaluate_ijb` on a generated folder
with an insightface network (random weights: speed only) and extrapolates to IJB-C's 469,375 images. Both write a
record (the figures, the device, versions, commit, date) to bench/results/<device>_eval.jsonl; the IJB rate is no op
of the registry, so it has no CSV row.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import harness

OPS: list[str] = []  # an application benchmark: its search rows are the cosine_topk op's (variant "identify")
IJBC_IMAGES = 469_375


def synthetic_embeddings(path: Path, n: int, d: int, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng(seed)
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
        arr[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    arr.flush()
    return np.load(path, mmap_mode="r")


def run_identify(probes: int, identities: int, distractors: int, d: int, device: str, workdir: Path) -> dict:
    from mdkernels.eval.identify import identification_curve

    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((identities, d)).astype(np.float32)
    who = rng.integers(0, identities, probes)
    probe = gallery[who] + rng.standard_normal((probes, d)).astype(np.float32) * 3.2  # cosine ~0.3 to the mate
    t0 = time.perf_counter()
    dis = synthetic_embeddings(workdir / "distractors.npy", distractors, d)
    made = time.perf_counter() - t0
    res = identification_curve(probe, who, gallery, np.arange(identities), dis, device=device)
    print(f"identify: {probes} probes x ({identities} gallery + {distractors:,} distractors), D={d}: search "
          f"{res['search_seconds']:.1f} s (writing the .npy: {made:.1f} s)")  # fmt: skip
    for c in res["curve"]:
        print(f"  {c['distractors']:>9,} distractors: rank-1 {100 * c['rank1']:.2f}%  rank-5 {100 * c['rank5']:.2f}%")
    record = {"what": "identify", "probes": probes, "identities": identities, "distractors": distractors, "D": d,
              "search_seconds": round(res["search_seconds"], 2), "npy_write_seconds": round(made, 1),
              "rank1": res["curve"][-1]["rank1"], "rank5": res["curve"][-1]["rank5"]}  # fmt: skip
    row = harness.base_row("cosine_topk", device, "identify")
    row["record"] = record
    row.update(provider="mdk", mode="identify", B=probes, D=d, C=distractors, dtype="float32",
               ms_median=1e3 * res["search_seconds"], ms_p20="", ms_p80="", peak_mem_bytes="",
               tflops=round(2 * probes * distractors * d / res["search_seconds"] / 1e12, 3))  # fmt: skip
    return row


def run_ijb(network: str, images: int, batch: int, workers: int, device: str, workdir: Path) -> dict:
    from mdkernels.eval import ijb
    from mdkernels.eval.synth_ijb import make_ijb_folder
    from mdkernels.models.backbones import build_backbone

    subjects = max(2, images // 12)
    truth = make_ijb_folder(workdir / "IJBC", subjects=subjects, templates_per_subject=3, seed=0,
                            impostor_pairs=4 * subjects)  # fmt: skip
    model = build_backbone(network, embedding_size=512).eval()
    ijb.evaluate_ijb(model, workdir / "IJBC", batch_size=batch, workers=workers, device=device, progress=False)  # warm
    res = ijb.evaluate_ijb(model, workdir / "IJBC", batch_size=batch, workers=workers, device=device, progress=False)
    rate = res["images_per_s"]
    hours = IJBC_IMAGES / rate / 3600
    print(f"ijb: {network}, {truth['images']} images, batch {batch}, {workers} workers on {device}: {rate:.1f} images/s"
          f" (image and flip) -> IJB-C's {IJBC_IMAGES:,} images in {hours:.1f} h")  # fmt: skip
    return {"record": {"what": "ijb", "network": network, "images": truth["images"], "batch": batch,
                       "workers": workers, "images_per_s": round(rate, 2), "ijbc_images": IJBC_IMAGES,
                       "ijbc_hours": round(hours, 1)}}  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("identify")
    a.add_argument("--probes", type=int, default=3530)
    a.add_argument("--identities", type=int, default=80)
    a.add_argument("--distractors", type=int, default=1_000_000)
    a.add_argument("--D", type=int, default=512)
    b = sub.add_parser("ijb")
    b.add_argument("--network", default="r50")
    b.add_argument("--images", type=int, default=256)
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--workers", type=int, default=max(0, (os.cpu_count() or 1) - 1))
    for q in (a, b):
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        q.add_argument("--workdir", help="where the synthetic data go (default: a temporary folder)")
        q.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.what == "identify":
            row = run_identify(args.probes, args.identities, args.distractors, args.D, args.device, work)
        else:
            row = run_ijb(args.network, args.images, args.batch, args.workers, args.device, work)
    if not args.no_save:
        record = row.pop("record")
        print("appended to", harness.append_record(record, args.device, "eval"))
        if "op" in row:
            print("appended to", harness.append_rows([row], args.device))


if __name__ == "__main__":
    main()
