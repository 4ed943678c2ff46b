"""Verification evaluation: insightface ``.bin`` sets, 10-fold accuracy (LFW protocol), TAR@FAR, ROC.

``.bin`` files are pickles of ``(list of encoded images, list of bools)``. They are read with an
unpickler that resolves no class or function at all, so a crafted pickle raises instead of running
code. Only bytes, lists, tuples and bools are accepted.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from mdkernels.train.data import decode_image


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a verification .bin holds only bytes, lists and bools"
        )


def load_bin(path: str | Path, size: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """``(images (2N, 3, S, S) in [-1, 1], issame (N,) bool)`` from an insightface verification ``.bin``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification set not found: {path}")
    try:
        with open(path, "rb") as f:
            obj = _NoGlobals(io.BytesIO(f.read()), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: not a verification .bin ({err})") from err
    except (EOFError, ValueError, IndexError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: corrupt or truncated .bin ({type(err).__name__}: {err})") from err
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    bins, issame = obj
    if not (isinstance(bins, (list, tuple)) and all(isinstance(b, (bytes, bytearray)) for b in bins)):
        raise ValueError(f"{path}: the images must be a list of encoded-image bytes")
    if not (isinstance(issame, (list, tuple)) and all(isinstance(v, (bool, np.bool_)) for v in issame)):
        raise ValueError(f"{path}: issame must be a list of bools")
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs (need 2 per pair)")
    imgs = torch.stack([decode_image(bytes(b), size, f"{path}[{i}]") for i, b in enumerate(bins)])
    return imgs, np.asarray(issame, dtype=bool)


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256, flip: bool = True,
          device: str | torch.device = "cpu") -> torch.Tensor:  # fmt: skip
    """L2-normalised embeddings; ``flip=True`` adds the horizontally flipped image's embedding first."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device)
        e = model(x).float()
        if flip:
            e = e + model(x.flip(-1)).float()
        out.append(torch.nn.functional.normalize(e, dim=1).cpu())
    model.train(was_training)
    return torch.cat(out)


def _best_threshold(scores: np.ndarray, issame: np.ndarray) -> float:
    cand = np.unique(scores)
    if len(cand) > 400:  # enough resolution for a best-accuracy threshold
        cand = np.quantile(scores, np.linspace(0, 1, 400))
    acc = [((scores >= t) == issame).mean() for t in cand]
    return float(cand[int(np.argmax(acc))])


def kfold_accuracy(scores: np.ndarray, issame: np.ndarray, folds: int = 10) -> tuple[float, float, list[float]]:
    """LFW protocol: per fold, the best threshold on the other folds, accuracy on this one.

    Returns ``(mean, std, thresholds)``; scores are similarities (higher = same identity).
    """
    scores, issame = np.asarray(scores, dtype=np.float64), np.asarray(issame, dtype=bool)
    idx = np.arange(len(scores))
    accs, ths = [], []
    for k in range(folds):
        test = idx % folds == k
        t = _best_threshold(scores[~test], issame[~test])
        accs.append(((scores[test] >= t) == issame[test]).mean())
        ths.append(t)
    return float(np.mean(accs)), float(np.std(accs)), ths


def roc(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(far, tar)`` over every threshold, far ascending."""
    scores, issame = np.asarray(scores, dtype=np.float64), np.asarray(issame, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    same = issame[order]
    tar = np.concatenate([[0.0], np.cumsum(same) / max(same.sum(), 1)])
    far = np.concatenate([[0.0], np.cumsum(~same) / max((~same).sum(), 1)])
    return far, tar


def tar_at_far(scores: np.ndarray, issame: np.ndarray, far_target: float) -> float:
    """Largest TAR whose FAR does not exceed ``far_target`` (0 when no impostor pair is that rare)."""
    far, tar = roc(scores, issame)
    ok = far <= far_target
    return float(tar[ok].max()) if ok.any() else 0.0


def verify(model, images: torch.Tensor, issame: np.ndarray, *, flip: bool = True, device="cpu") -> dict:
    """Every metric of a verification set: accuracy (10-fold), TAR@FAR=1e-3/1e-4, and the ROC."""
    emb = embed(model, images, flip=flip, device=device)
    scores = (emb[0::2] * emb[1::2]).sum(1).numpy()
    acc, std, ths = kfold_accuracy(scores, issame)
    far, tar = roc(scores, issame)
    return {"accuracy": acc, "accuracy_std": std, "threshold": float(np.mean(ths)),
            "tar@far=1e-3": tar_at_far(scores, issame, 1e-3), "tar@far=1e-4": tar_at_far(scores, issame, 1e-4),
            "roc": (far, tar), "pairs": int(len(issame))}  # fmt: skip


def folder_pairs(labels: list[int], max_pairs: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Balanced genuine/impostor index pairs from an image folder's labels (for ``mdk eval`` on folders)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    by_id = {k: np.flatnonzero(labels == k) for k in np.unique(labels)}
    multi = [v for v in by_id.values() if len(v) > 1]
    if not multi or len(by_id) < 2:
        raise ValueError("an image folder for verification needs identities with 2+ images and 2+ identities")
    pairs, same = [], []
    for i in range(max_pairs):
        if i % 2 == 0:
            v = multi[rng.integers(len(multi))]
            a, b = rng.choice(v, 2, replace=False)
        else:
            a, b = rng.choice(len(labels), 2, replace=False)
            if labels[a] == labels[b]:
                continue
        pairs.append((a, b))
        same.append(labels[a] == labels[b])
    return np.asarray(pairs), np.asarray(same)
