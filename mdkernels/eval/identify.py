"""Identification against distractors, as MegaFace's curve: ``mdk eval MODEL --identify PROBES --gallery GALLERY
[--distractors DIR_OR_NPY]``.

Probes and gallery are folders of identities (``root/<identity>/<image>``, aligned crops); each probe is searched
against the gallery plus the first 10, 100, 1,000, ... distractors (then all of them), and counts as found at rank
r when fewer than r non-mated entries score above its best gallery mate (ties count for the mate). Distractors are
a folder of aligned images (searched recursively) or an ``(N, D)`` ``.npy`` of embeddings (memory-mapped, any
norm). Every embedding set is cached on disk (:mod:`.embcache`), so a million distractors are embedded once per
model.

The search is :func:`mdkernels.cosine_topk` over distractor blocks ``[0, 10), [10, 100), ...``: the top-k of a
prefix is the merge of its blocks' top-k, so the whole curve costs one pass over the distractors and never holds a
probes x distractors matrix.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from mdkernels.data.datasets import IMG_EXT

RANKS = (1, 5)


def identity_folder(root: str | Path) -> tuple[list[Path], list[str]]:
    """Images and identity names of ``root/<identity>/<image>``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"identity folder not found: {root}")
    paths, names = [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMG_EXT)
        paths += files
        names += [d.name] * len(files)
    if not paths:
        raise ValueError(f"{root} holds no images in identity folders (expected {root}/<identity>/<image>)")
    return paths, names


def image_list(root: str | Path) -> list[Path]:
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXT and p.is_file())
    if not files:
        raise ValueError(f"{root} holds no images ({', '.join(IMG_EXT)})")
    return files


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from mdkernels.data.datasets import decode_image

        try:
            return decode_image(self.paths[i].read_bytes(), self.size, str(self.paths[i])), ""
        except (ValueError, OSError) as err:
            return torch.zeros(3, self.size, self.size), " ".join(str(err).split())[:200]


@torch.no_grad()
def embed_paths(model, paths: list[Path], *, size: int = 112, flip: bool = True, batch_size: int = 128,
                workers: int = 0, device="cpu", progress: bool = True, cache_dir=None, model_digest: str | None = None,
                what: str = "images") -> np.ndarray:  # fmt: skip
    """L2-normalised float32 embeddings of image files (the flipped image's embedding added first)."""
    from mdkernels.eval import embcache
    from mdkernels.progress import Progress

    model.eval()

    def produce(start: int):
        from mdkernels.eval.ijb import loader_context, worker_init

        loader = torch.utils.data.DataLoader(_Images(paths[start:], size), batch_size=batch_size,
                                             num_workers=workers, shuffle=False,
                                             worker_init_fn=worker_init if workers else None,
                                             multiprocessing_context=loader_context(workers))  # fmt: skip
        with Progress(len(paths), f"embedding {what}", "img", enabled=progress) as bar:
            bar.update(start)
            for x, errs in loader:
                bad = next((e for e in errs if e), None)
                if bad:
                    raise ValueError(bad)
                x = x.to(device)
                e = model(x).float()
                if flip:
                    e = e + model(x.flip(-1)).float()
                bar.update(len(x))
                yield torch.nn.functional.normalize(e, dim=1).cpu().numpy()

    parts = None
    if cache_dir is not None:
        parts = {"what": "images", "model": model_digest, "list": embcache.listing_digest(paths), "size": size,
                 "flip": flip}  # fmt: skip
    return embcache.cached_rows(cache_dir, parts, len(paths), produce)


def load_npy(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a readable .npy ({err})") from err
    if arr.ndim != 2 or arr.dtype.kind != "f":
        raise ValueError(f"{path}: distractor embeddings must be an (N, D) float array, got {arr.shape} {arr.dtype}")
    return arr


def curve_sizes(n: int) -> list[int]:
    """0, 10, 100, ... (powers of ten below ``n``), and ``n``."""
    sizes, p = [0], 10
    while p < n:
        sizes.append(p)
        p *= 10
    if n:
        sizes.append(n)
    return sizes


def identification_curve(probe: np.ndarray, probe_labels, gallery: np.ndarray, gallery_labels,
                         distractors: np.ndarray | None = None, ranks=RANKS, sizes: list[int] | None = None,
                         block_rows: int = 262_144, backend: str = "auto", device="cpu") -> dict:  # fmt: skip
    """Rank-r identification rates against the gallery plus each prefix of ``distractors`` in ``sizes``."""
    from mdkernels.search import cosine_topk_search

    probe_labels, gallery_labels = np.asarray(probe_labels), np.asarray(gallery_labels)
    known = set(gallery_labels.tolist())
    missing = [p for p in dict.fromkeys(probe_labels.tolist()) if p not in known]
    if missing:
        raise ValueError(f"probe identity {missing[0]!r} has no gallery image ({len(missing)} such identities): "
                         "every probe identity needs one in --gallery")  # fmt: skip
    if distractors is not None and distractors.shape[1] != probe.shape[1]:
        raise ValueError(f"distractor embeddings are {distractors.shape[1]}-d, the model's are {probe.shape[1]}-d")
    pn = probe / np.maximum(np.linalg.norm(probe, axis=1, keepdims=True), 1e-12)
    gn = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    sim = pn.astype(np.float32) @ gn.astype(np.float32).T
    same = probe_labels[:, None] == gallery_labels[None, :]
    mate = np.where(same, sim, -np.inf).max(1)
    gallery_above = (np.where(same, -np.inf, sim) > mate[:, None]).sum(1)
    n = 0 if distractors is None else len(distractors)
    sizes = curve_sizes(n) if sizes is None else sorted(set(sizes))
    if sizes and sizes[-1] > n:
        raise ValueError(f"a curve point of {sizes[-1]} distractors, but there are {n}")
    k = max(ranks)
    q = torch.from_numpy(np.ascontiguousarray(pn, dtype=np.float32)).to(device)
    best = torch.full((len(pn), k), -float("inf"))
    curve, t0, done = [], time.perf_counter(), 0
    for size in sizes:
        while done < size:
            stop = min(size, done + block_rows)
            block = torch.from_numpy(np.array(distractors[done:stop], dtype=np.float32)).to(device)  # a copy: mmap
            vals, _ = cosine_topk_search(q, block, k, backend=backend)
            vals = vals.float().cpu()
            if vals.shape[1] < k:
                vals = torch.cat([vals, torch.full((len(vals), k - vals.shape[1]), -float("inf"))], 1)
            best = torch.cat([best, vals], 1).topk(k, dim=1).values
            done = stop
        above = gallery_above + (best.numpy() > mate[:, None]).sum(1)
        curve.append({"distractors": size, **{f"rank{r}": float(np.mean(above < r)) for r in ranks}})
    return {"probes": int(len(pn)), "gallery": int(len(gn)), "distractors": n, "curve": curve,
            **{f"rank{r}": curve[-1][f"rank{r}"] for r in ranks},
            "search_seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip


def plot_curve(result: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [c for c in result["curve"] if c["distractors"] > 0]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key in [k for k in result["curve"][0] if k.startswith("rank")]:
        ax.plot([c["distractors"] for c in pts], [100 * c[key] for c in pts], marker="o",
                label=key.replace("rank", "rank-"))  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("distractors")
    ax.set_ylabel("identification rate (%)")
    ax.grid(linestyle="--")
    ax.legend()
    from mdkernels.eval.ijb import save_figure

    return save_figure(fig, path)


def evaluate_identification(model, probes: str | Path, gallery: str | Path, distractors: str | Path | None = None, *,
                            size: int = 112, flip: bool = True, batch_size: int = 128, workers: int | None = None,
                            device=None,
                            progress: bool = True, cache_dir=None, model_digest: str | None = None,
                            plot: str | Path | None = None, backend: str = "auto") -> dict:  # fmt: skip
    from mdkernels.eval.ijb import default_workers

    workers = default_workers() if workers is None else workers
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(model, torch.nn.Module) and not hasattr(model, "session"):
        model = model.to(device)
    kw = dict(size=size, flip=flip, batch_size=batch_size, workers=workers, device=device, progress=progress,
              cache_dir=cache_dir, model_digest=model_digest)  # fmt: skip
    p_paths, p_names = identity_folder(probes)
    g_paths, g_names = identity_folder(gallery)
    t0 = time.perf_counter()
    p_emb = embed_paths(model, p_paths, what="probes", **kw)
    g_emb = embed_paths(model, g_paths, what="gallery", **kw)
    d_emb = None
    if distractors is not None:
        distractors = Path(distractors)
        if distractors.suffix == ".npy":
            d_emb = load_npy(distractors)
        elif distractors.is_dir():
            d_emb = embed_paths(model, image_list(distractors), what="distractors", **kw)
        else:
            raise FileNotFoundError(f"--distractors: {distractors} is neither a folder of images nor an .npy file")
    embed_s = time.perf_counter() - t0
    out = identification_curve(p_emb, p_names, g_emb, g_names, d_emb, backend=backend, device=device)
    out["embed_seconds"] = round(embed_s, 3)
    out["device"] = str(device)
    if plot is not None and out["distractors"]:
        out["plot"] = str(plot_curve(out, plot))
    return out
