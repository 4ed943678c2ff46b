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

from mdkernels.data.datasets import ImageFolderDataset, decode_image


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a verification .bin holds only bytes, lists and bools"
        )


# Opcodes that build bytes, lists, tuples, bools, ints and None, and nothing else (no globals, no
# extension registry, no persistent ids, no object construction, no BUILD).
_SAFE_OPCODES = {
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT",
    "GET", "BINGET", "LONG_BINGET", "EMPTY_LIST", "APPEND", "APPENDS", "LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1",
    "TUPLE2", "TUPLE3", "NEWTRUE", "NEWFALSE", "NONE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1",
    "LONG4", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BINSTRING", "SHORT_BINSTRING", "BYTEARRAY8",
    "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
}  # fmt: skip


def _check_opcodes(data: bytes, path: Path) -> None:
    import pickletools

    refused = None
    try:
        for op, _, pos in pickletools.genops(data):
            if op.name not in _SAFE_OPCODES:
                refused = f"{path}: refusing to load a pickle using {op.name} at byte {pos}: a verification .bin holds "
                refused += "only bytes, lists and bools"
                break
    except Exception as err:  # pickletools' own errors: a truncated or garbled file
        raise ValueError(f"{path}: corrupt or truncated .bin ({type(err).__name__}: {err})") from err
    if refused:
        raise ValueError(refused)


def load_bin(path: str | Path, size: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """``(images (2N, 3, S, S) in [-1, 1], issame (N,) bool)`` from an insightface verification ``.bin``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification set not found: {path}")
    data = path.read_bytes()
    _check_opcodes(data, path)  # first a scan: only data opcodes; then an unpickler that resolves nothing
    try:
        obj = _NoGlobals(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: not a verification .bin ({err})") from err
    except Exception as err:
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
    accs, ths = [], []
    for chunk in np.array_split(np.arange(len(scores)), folds):  # contiguous folds, as insightface's KFold
        test = np.zeros(len(scores), dtype=bool)
        test[chunk] = True
        t = _best_threshold(scores[~test], issame[~test])
        accs.append(((scores[test] >= t) == issame[test]).mean())
        ths.append(t)
    return float(np.mean(accs)), float(np.std(accs)), ths


def roc(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(far, tar)`` over every threshold, far ascending."""
    scores, issame = np.asarray(scores, dtype=np.float64), np.asarray(issame, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, same = scores[order], issame[order]
    # one point per distinct threshold: tied scores are accepted or rejected together
    last = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    tar = np.concatenate([[0.0], np.cumsum(same)[last] / max(same.sum(), 1)])
    far = np.concatenate([[0.0], np.cumsum(~same)[last] / max((~same).sum(), 1)])
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


def load_eval_model(checkpoint: str, network: str | None = None) -> tuple[torch.nn.Module, int]:
    """``(model in eval mode, input size)``: an mdk checkpoint, an exported ``.onnx`` (run with onnxruntime), or
    an insightface backbone file (``network`` names it)."""
    if str(checkpoint).endswith(".onnx"):
        from mdkernels.interop.onnx import OnnxBackbone

        model = OnnxBackbone(checkpoint)
        return model, model.input_size
    from mdkernels.interop.onnx import backbone_for_export

    return backbone_for_export(checkpoint, network)


def evaluate_checkpoint(checkpoint: str, target: str, *, flip: bool = True, max_pairs: int = 3000,
                        network: str | None = None) -> dict:  # fmt: skip
    """``mdk eval`` on a verification ``.bin`` or on pairs drawn from an image folder (see :func:`load_eval_model`
    for the models it reads)."""
    model, size = load_eval_model(checkpoint, network)
    if str(target).endswith(".bin"):
        images, issame = load_bin(target, size)
        return verify(model, images, issame, flip=flip)
    ds = ImageFolderDataset(target, size=size, train=False)
    pairs, issame = folder_pairs(ds.labels, max_pairs)
    needed = sorted(set(pairs.flatten().tolist()))
    pos = {k: i for i, k in enumerate(needed)}
    imgs = torch.stack([ds[k][0] for k in needed])
    order = torch.tensor([pos[k] for k in pairs.flatten().tolist()])
    return verify(model, imgs[order], issame, flip=flip)
