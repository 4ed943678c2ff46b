"""IJB-B / IJB-C evaluation, step for step as insightface computes it.

insightface's pipeline (``recognition/arcface_torch/eval_ijbc.py`` for 1:1, ``recognition/_evaluation_/ijb/
ijb_1n.py`` for 1:N), and what this module does at each step:

1. Read ``meta/<t>_face_tid_mid.txt`` (image, template, media), ``meta/<t>_template_pair_label.txt`` (template
   pairs and labels) and ``meta/<t>_name_5pts_score.txt`` (image, five landmarks, faceness score), ``t`` being
   ``ijbc`` or ``ijbb``; the images are under ``loose_crop/``.
2. Align each image to the 112 x 112 ArcFace template by a five-point similarity (:mod:`.align`).
3. Embed the image and its horizontal flip ((x / 255 - 0.5) / 0.5, fp32) and add the two (test mode F2).
4. Keep the feature norm (N1) and multiply by the faceness score (D1).
5. Average the images of a media (a video's frames), add the media of a template, L2-normalise the template.
6. Score each template pair by cosine.
7. 1:1: TAR at FAR 1e-6 ... 1e-1 from scikit-learn's ``roc_curve`` (intermediate points dropped), taking for
   each FAR the ROC point whose FAR is *nearest* to it, above or below (ties: the larger TAR).
8. 1:N: gallery templates from ``<t>_1N_gallery_G1/G2.csv`` (IJB-B: ``_S1/_S2``), probes from
   ``<t>_1N_probe_mixed.csv``; top-1/5/10 of the mated gallery template, and TPIR at FPIR 1e-2 and 1e-1 with
   insightface's threshold: the ceil(FPIR x probes)-th largest non-mated score over all probe-gallery pairs.

The other test modes are options: ``flip="concat"`` (F1), ``flip="none"`` (F0), ``norm_score=False`` (N0),
``detector_score=False`` (D0). Deviations, each deliberate:

- A pair or a 1:N list naming a template that has no image raises (insightface scores it against template 0 or
  gets a zero template).
- Every meta file is checked line by line; a bad line, an unreadable image or landmarks outside the image raise
  one error naming the file and line (insightface fails later, or not at all).
- Rows of ``name_5pts_score`` must name the same images as ``face_tid_mid`` in the same order (insightface
  assumes it).
- 1:N templates are normalised as 1:1 ones (a zero template stays zero; insightface's 1:N divides by its norm).
- Without OpenCV, images are decoded with Pillow and warped in numpy (:mod:`.align`); with OpenCV, as insightface.
- Any embedding width (insightface's 1:1 script assumes 512).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from mdkernels.eval import align as A
from mdkernels.eval.ijb_meta import IJBMeta, detect_target, is_ijb_folder, read_meta  # noqa: F401 (re-exported)

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIRS = (1e-2, 1e-1)
TOPK = (1, 5, 10)
FLIP_MODES = ("add", "concat", "none")


def _far_key(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


# ----------------------------------------------------------------------------------------------------------------
# images


def imread_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB: ``cv2.imread`` (as insightface) where OpenCV is installed, else Pillow."""
    if A.have_cv2():
        import cv2

        img = cv2.imread(str(path))  # BGR; channels are warped independently, so RGB order here is the same
        if img is None:
            raise OSError("OpenCV cannot read it (missing, empty or not an image)")
        return img[:, :, ::-1]
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)


class AlignedFaces(torch.utils.data.Dataset):
    """Item ``i``: ``(aligned uint8 (112, 112, 3) RGB, i, error)``; the error is '' or one line naming the meta file
    and line (raised by the caller, so a worker's failure reads as one line too)."""

    def __init__(self, meta: IJBMeta, indices=None, warp: str = "auto", size: int = A.IMAGE_SIZE) -> None:
        self.meta, self.warp, self.size = meta, warp, size
        self.indices = np.arange(len(meta.names)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        m = self.meta
        where = f"{m.files['5pts']}:{m.files['5pts_lines'][i]}"
        path = m.image_dir / m.names[i]
        blank = torch.zeros(self.size, self.size, 3, dtype=torch.uint8)
        try:
            img = np.ascontiguousarray(imread_rgb(path))
        except Exception as err:
            return blank, i, f"{where}: cannot read image {path} ({' '.join(str(err).split())[:160]})"
        h, w = img.shape[:2]
        lm = m.landmarks[i]
        if (lm < 0).any() or (lm[:, 0] > w).any() or (lm[:, 1] > h).any():
            pts = lm.reshape(-1).round(1).tolist()
            return blank, i, f"{where}: landmarks {pts} lie outside the {w}x{h} image {path}"
        try:
            out = A.align_face(img, lm, self.size, self.warp)
        except ValueError as err:
            return blank, i, f"{where}: {err}"
        return torch.from_numpy(np.ascontiguousarray(out)), i, ""


def default_workers() -> int:
    """DataLoader workers when ``--workers`` is not given: the CPUs less one (the main process runs the model),
    at most 8."""
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def loader_context(workers: int):
    """Worker processes start from a fresh forkserver, not a fork of this process: a fork inherits OpenCV's thread
    pool without its threads, and the first OpenCV call in the worker then waits forever."""
    if not workers:
        return None
    import multiprocessing as mp

    return mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")


def worker_init(_):
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    torch.set_num_threads(1)


def to_model_input(batch_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) RGB -> float (B, 3, H, W), (x / 255 - 0.5) / 0.5 as insightface."""
    return batch_uint8.permute(0, 3, 1, 2).float().div_(255).sub_(0.5).div_(0.5)


@torch.no_grad()
def embed_images(model, meta: IJBMeta, *, flip: bool = True, batch_size: int = 128, workers: int = 0,
                 device="cpu", warp: str = "auto", progress: bool = True, cache_dir=None,
                 model_digest: str | None = None) -> np.ndarray:  # fmt: skip
    """(N, 2D) float32 rows ``[embedding(image) | embedding(flipped image)]`` (``flip=False``: (N, D))."""
    from mdkernels.eval import embcache
    from mdkernels.progress import Progress

    model.eval()
    n = len(meta.names)

    def produce(start: int):
        ds = AlignedFaces(meta, np.arange(start, n), warp)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, shuffle=False,
                                             worker_init_fn=worker_init if workers else None,
                                             multiprocessing_context=loader_context(workers),
                                             pin_memory=torch.device(device).type == "cuda")  # fmt: skip
        with Progress(n, f"embedding {meta.target} images", "img", enabled=progress) as bar:
            bar.update(start)
            for imgs, _, errs in loader:
                bad = next((e for e in errs if e), None)
                if bad:
                    raise ValueError(bad)
                x = to_model_input(imgs.to(device, non_blocking=True))
                if flip:
                    f = model(torch.cat([x, x.flip(-1)])).float()
                    f = torch.cat([f[: len(x)], f[len(x) :]], 1)
                else:
                    f = model(x).float()
                bar.update(len(x))
                yield f.cpu().numpy()

    parts = None
    if cache_dir is not None:
        parts = {"what": "ijb", "model": model_digest, "images": str(meta.image_dir.resolve()),
                 "list": embcache.file_digest(meta.files["5pts"]), "flip": flip, "warp": _warp_name(warp)}  # fmt: skip
    return embcache.cached_rows(cache_dir, parts, n, produce)


def _warp_name(warp: str) -> str:
    return ("cv2" if A.have_cv2() else "numpy") if warp == "auto" else warp


# ----------------------------------------------------------------------------------------------------------------
# features, templates, scores


def image_features(raw: np.ndarray, faceness: np.ndarray, *, flip: str = "add", norm_score: bool = True,
                   detector_score: bool = True, halves: bool = True) -> np.ndarray:  # fmt: skip
    """Per-image features of a test mode: F2 adds the flip's half (``flip="add"``), F1 concatenates, F0 keeps the
    image's half; N0 normalises each row; D1 multiplies by the faceness score. float32, as insightface.
    ``halves=False``: ``raw`` holds the image's embedding alone (embedded without the flip; F0 only)."""
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    raw = np.asarray(raw, dtype=np.float32)
    if not halves and flip != "none":
        raise ValueError(f"flip={flip!r} needs the flipped images' embeddings")
    if flip == "none":
        feats = raw[:, : raw.shape[1] // 2] if halves else raw
    elif flip == "add":
        feats = raw[:, : raw.shape[1] // 2] + raw[:, raw.shape[1] // 2 :]
    else:
        feats = raw
    if not norm_score:
        feats = feats / np.sqrt(np.sum(feats**2, -1, keepdims=True))
    if detector_score:
        feats = feats * np.asarray(faceness, dtype=np.float32)[:, None]
    return feats


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm; a zero row stays zero (scikit-learn's ``normalize``)."""
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))
    norm[norm == 0] = 1.0
    return x / norm[:, None]


def template_features(feats: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      choose: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``(unique template ids (sorted), L2-normalised template features (T, D) float64)``: each media's images
    averaged, a template's media summed (float32), then normalised, for the templates in ``choose`` (all)."""
    templates, medias = np.asarray(templates), np.asarray(medias)
    wanted = np.unique(templates if choose is None else choose)
    order = np.lexsort((medias, templates))  # stable: a group's images keep their file order
    t_sorted, m_sorted = templates[order], medias[order]
    t_start = np.searchsorted(t_sorted, wanted, side="left")
    t_end = np.searchsorted(t_sorted, wanted, side="right")
    out = np.zeros((len(wanted), feats.shape[1]), dtype=np.float64)
    for k, (a, b) in enumerate(zip(t_start, t_end, strict=True)):
        if a == b:
            raise ValueError(f"template {wanted[k]} has no image")
        rows, meds = order[a:b], m_sorted[a:b]
        cuts = np.flatnonzero(np.diff(meds)) + 1
        media_feats = [np.mean(feats[g], axis=0) for g in np.split(rows, cuts)]
        out[k] = np.sum(np.stack(media_feats), axis=0)
    return wanted, normalize_rows(out)


def pair_scores(tfeats: np.ndarray, tids: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    """Cosine of each template pair (float64)."""
    pos = np.searchsorted(tids, p1), np.searchsorted(tids, p2)
    for p, q in zip(pos, (p1, p2), strict=True):
        bad = (p >= len(tids)) | (tids[np.minimum(p, len(tids) - 1)] != q)
        if bad.any():
            raise ValueError(f"template {q[np.flatnonzero(bad)[0]]} has no feature")
    out = np.empty(len(p1), dtype=np.float64)
    for s in range(0, len(p1), 100_000):
        a, b = tfeats[pos[0][s : s + 100_000]], tfeats[pos[1][s : s + 100_000]]
        out[s : s + 100_000] = np.sum(a * b, -1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# metrics


def roc_curve(label: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` as scikit-learn's ``roc_curve(label, score)`` (``drop_intermediate=True``): one
    point per distinct score from the highest down, collinear points dropped, ``(0, 0)`` prepended."""
    label = np.asarray(label).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    order = np.argsort(score, kind="mergesort")[::-1]
    s, y = score[order], label[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y, dtype=np.float64)[last]
    fps = 1.0 + last - tps
    thr = s[last]
    if len(fps) > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    fps, tps, thr = np.r_[0.0, fps], np.r_[0.0, tps], np.r_[np.inf, thr]
    return fps / fps[-1], tps / tps[-1], thr


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, fars=FARS) -> dict[str, float]:
    """insightface's pick: for each FAR, the ROC point with the nearest FAR (which may exceed it); among equally
    near points, the last on the ROC (the larger FAR, then the larger TAR)."""
    fpr_r, tpr_r = np.flipud(fpr), np.flipud(tpr)
    out = {}
    for far in fars:
        i = int(np.argmin(np.abs(fpr_r - far)))  # the first in the flipped order: the last ROC point of the ties
        out[f"tar@far={_far_key(far)}"] = float(tpr_r[i])
    return out


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def identification(probe_feats: np.ndarray, probe_ids: np.ndarray, gallery_feats: np.ndarray,
                   gallery_ids: np.ndarray, topk=TOPK, fpirs=FPIRS, chunk: int = 2048) -> dict[str, float]:  # fmt: skip
    """insightface's 1:N (``ijb_1n.py``): each probe has exactly one gallery template of its subject; top-k counts
    probes whose mate is among the k best scores; TPIR at FPIR f is the share of probes whose mate scores above the
    ceil(f x probes)-th largest non-mated score of all probe-gallery pairs. Ties in the ranking count in the mate's
    favour."""
    gallery_ids = np.asarray(gallery_ids)
    where = {}
    for j, sid in enumerate(gallery_ids.tolist()):
        where.setdefault(sid, []).append(j)
    mate = np.empty(len(probe_ids), dtype=np.int64)
    for i, sid in enumerate(np.asarray(probe_ids).tolist()):
        hits = where.get(sid, [])
        if len(hits) != 1:
            raise ValueError(f"subject {sid} has {len(hits)} gallery templates (insightface's 1:N needs exactly one)")
        mate[i] = hits[0]
    q = len(probe_ids)
    need = [math.ceil(q * f) for f in fpirs]
    if max(need) > q * (len(gallery_ids) - 1):
        raise ValueError(f"too few non-mated pairs ({q * (len(gallery_ids) - 1)}) for FPIR {max(fpirs)}")
    pos = np.empty(q, dtype=np.float64)
    rank = np.empty(q, dtype=np.int64)
    top_neg = np.empty(0, dtype=np.float64)
    for s in range(0, q, chunk):
        sim = probe_feats[s : s + chunk] @ gallery_feats.T
        rows = np.arange(len(sim))
        pos[s : s + len(sim)] = sim[rows, mate[s : s + chunk]]
        rank[s : s + len(sim)] = (sim > pos[s : s + len(sim), None]).sum(1)
        sim[rows, mate[s : s + chunk]] = -np.inf
        flat = np.concatenate([top_neg, sim.ravel()])
        k = min(max(need), len(flat))
        top_neg = np.partition(flat, len(flat) - k)[len(flat) - k :]
    top_neg = np.sort(top_neg)[::-1]
    out = {f"top{k}": float(np.mean(rank < k)) for k in topk}
    for f, n_ in zip(fpirs, need, strict=True):
        out[f"tpir@fpir={_far_key(f)}"] = float(np.mean(pos > top_neg[n_ - 1]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# the whole evaluation


def mode_name(flip: str, norm_score: bool, detector_score: bool) -> str:
    return f"N{int(norm_score)}D{int(detector_score)}F{ {'none': 0, 'concat': 1, 'add': 2}[flip]}"


def evaluate_features(meta: IJBMeta, raw: np.ndarray, *, flip: str = "add", norm_score: bool = True,
                      detector_score: bool = True, halves: bool = True) -> dict:  # fmt: skip
    """Steps 4-8 from the per-image embeddings ``raw`` (``[image | flip]`` halves unless ``halves=False``)."""
    feats = image_features(raw, meta.faceness, flip=flip, norm_score=norm_score, detector_score=detector_score,
                           halves=halves)  # fmt: skip
    tids, tfeats = template_features(feats, meta.templates, meta.medias)
    score = pair_scores(tfeats, tids, meta.p1, meta.p2)
    fpr, tpr, _ = roc_curve(meta.label, score)
    out = {"target": meta.target, "pairs": int(len(score)), **tar_at_far(fpr, tpr), "auc": auc(fpr, tpr),
           "images": len(meta.names), "templates": int(len(tids)),
           "mode": mode_name(flip, norm_score, detector_score)}  # fmt: skip
    if meta.gallery is not None:
        g_t, g_s = _first_subject(*meta.gallery)
        p_t, p_s = _first_subject(*meta.probes)
        _, g_f = template_features(feats, meta.templates, meta.medias, g_t)
        _, p_f = template_features(feats, meta.templates, meta.medias, p_t)
        out["1:N"] = identification(p_f, p_s, g_f, g_s)
    out["_roc"] = (fpr, tpr)
    out["_scores"] = score
    return out


def _first_subject(tids: np.ndarray, sids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique templates (sorted) and the subject id of each one's first row, as ``np.unique(return_index=True)``."""
    u, first = np.unique(tids, return_index=True)
    return u, sids[first]


def plot_roc(result: dict, path: str | Path, label: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr = result["_roc"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(np.flipud(fpr), np.flipud(tpr), lw=1, label=f"{label or 'model'} (AUC = {100 * result['auc']:.4f} %)")
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 0.1)
    ax.set_ylim(0.3, 1.0)
    ax.set_xticks(list(FARS[:-1]) + [0.1])
    ax.grid(linestyle="--", linewidth=1)
    ax.set_xlabel("False Positive Rate")
    ax.set_ylabel("True Positive Rate")
    ax.set_title(f"ROC on {result['target']} ({result['mode']})")
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG (its folder made) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(result: dict) -> str:
    """The TAR table as insightface prints it (percent, two decimals)."""
    head = ["Methods"] + [str(f) for f in FARS]
    row = [f"{result.get('model', 'model')}-{result['target']}"]
    row += [f"{100 * result[f'tar@far={_far_key(f)}']:.2f}" for f in FARS]
    widths = [max(len(a), len(b)) for a, b in zip(head, row, strict=True)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def fmt(cells):
        return "|" + "|".join(f" {c:^{w}} " for c, w in zip(cells, widths, strict=True)) + "|"

    return "\n".join([line, fmt(head), line, fmt(row), line])


def evaluate_ijb(model, root: str | Path, *, target: str | None = None, flip: str = "add", norm_score: bool = True,
                 detector_score: bool = True, batch_size: int = 128, workers: int | None = None, device=None,
                 warp: str = "auto", progress: bool = True, cache_dir=None, model_digest: str | None = None,
                 roc_png: str | Path | None = None, label: str = "") -> dict:  # fmt: skip
    """The whole of IJB-B/C on ``model`` (``(B, 3, 112, 112)`` in [-1, 1] -> ``(B, D)``); see the module doc."""
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    meta = read_meta(root, target)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if workers is None:
        workers = default_workers()
    if isinstance(model, torch.nn.Module) and not hasattr(model, "session"):
        model = model.to(device)
    t0 = time.perf_counter()
    raw = embed_images(model, meta, flip=flip != "none", batch_size=batch_size, workers=workers, device=device,
                       warp=warp, progress=progress, cache_dir=cache_dir, model_digest=model_digest)  # fmt: skip
    seconds = time.perf_counter() - t0
    out = evaluate_features(meta, raw, flip=flip, norm_score=norm_score, detector_score=detector_score,
                            halves=flip != "none")  # fmt: skip
    out.update({"embed_seconds": round(seconds, 3), "images_per_s": round(len(meta.names) / max(seconds, 1e-9), 2),
                "device": str(device), "warp": _warp_name(warp), "workers": workers})  # fmt: skip
    if roc_png is not None:
        out["roc_png"] = str(plot_roc(out, roc_png, label))
    return out


def public(result: dict) -> dict:
    """The JSON-able part of a result (no arrays)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(public(result), indent=1))
    os.replace(tmp, path)
    return path
