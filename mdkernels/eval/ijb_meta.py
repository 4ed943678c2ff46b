"""IJB-B / IJB-C meta files in insightface's layout, parsed and cross-checked line by line (see :mod:`.ijb`).

Every fault (a missing file, a short line, a template with no image, two lists naming different images) raises
one ``ValueError``/``FileNotFoundError`` naming the file and the line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def _err(path: Path, line: int | None, msg: str) -> ValueError:
    return ValueError(f"{path}:{line}: {msg}" if line else f"{path}: {msg}")


@dataclass
class IJBMeta:
    """An IJB folder's meta files, parsed and cross-checked."""

    root: Path
    target: str  # "IJBC" or "IJBB"
    names: list[str]
    landmarks: np.ndarray  # (N, 5, 2) float32
    faceness: np.ndarray  # (N,) float32
    templates: np.ndarray  # (N,) int64
    medias: np.ndarray  # (N,) int64
    p1: np.ndarray
    p2: np.ndarray
    label: np.ndarray
    gallery: tuple[np.ndarray, np.ndarray] | None = None  # (templates, subject ids), G1+G2 (or S1+S2) rows
    probes: tuple[np.ndarray, np.ndarray] | None = None
    files: dict = field(default_factory=dict)

    @property
    def image_dir(self) -> Path:
        return self.root / "loose_crop"


def detect_target(root: Path) -> str:
    found = [t for t in ("IJBC", "IJBB") if (root / "meta" / f"{t.lower()}_face_tid_mid.txt").is_file()]
    if not found:
        raise FileNotFoundError(f"{root / 'meta'}: no ijbc_face_tid_mid.txt or ijbb_face_tid_mid.txt (is {root} an "
                                "IJB folder in insightface's layout: meta/ and loose_crop/?)")  # fmt: skip
    if len(found) > 1:
        raise ValueError(f"{root / 'meta'} holds both IJB-B and IJB-C files: pass --target IJBC or IJBB")
    return found[0]


def is_ijb_folder(root: str | Path) -> bool:
    meta = Path(root) / "meta"
    return meta.is_dir() and any((meta / f"{t}_face_tid_mid.txt").is_file() for t in ("ijbc", "ijbb"))


def _lines(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (an IJB folder in insightface's layout needs it)")
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                yield i, line.split()


def _int(path, i, s, what):
    try:
        return int(s)
    except ValueError:
        raise _err(path, i, f"{what} {s!r} is not an integer") from None


def read_meta(root: str | Path, target: str | None = None) -> IJBMeta:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"IJB folder not found: {root}")
    target = (target or detect_target(root)).upper()
    if target not in ("IJBC", "IJBB"):
        raise ValueError(f"--target must be IJBC or IJBB, got {target!r}")
    t, meta = target.lower(), root / "meta"
    if not (root / "loose_crop").is_dir():
        raise FileNotFoundError(f"{root / 'loose_crop'}: missing (the IJB images)")

    tid_path = meta / f"{t}_face_tid_mid.txt"
    names, templates, medias, rows = [], [], [], []
    for i, f in _lines(tid_path):
        if len(f) != 3:
            raise _err(tid_path, i, f"expected 3 fields (image template media), got {len(f)}")
        names.append(f[0])
        templates.append(_int(tid_path, i, f[1], "template id"))
        medias.append(_int(tid_path, i, f[2], "media id"))
        rows.append(i)

    lmk_path = meta / f"{t}_name_5pts_score.txt"
    lmk, score, lmk_lines = [], [], []
    for i, f in _lines(lmk_path):
        if len(f) != 12:
            raise _err(lmk_path, i, f"expected 12 fields (image, 10 landmark coordinates, faceness score), got "
                                    f"{len(f)}")  # fmt: skip
        k = len(lmk)
        if k >= len(names) or f[0] != names[k]:
            other = f"line {rows[k]} has {names[k]!r}" if k < len(names) else "has no more lines"
            raise _err(lmk_path, i, f"names image {f[0]!r} where {tid_path.name} {other}: the two files must list "
                                    "the same images in the same order")  # fmt: skip
        try:
            vals = [float(v) for v in f[1:]]
        except ValueError:
            raise _err(lmk_path, i, "landmarks and score must be numbers") from None
        if not all(math.isfinite(v) for v in vals):
            raise _err(lmk_path, i, "a landmark or the score is not finite")
        lmk.append(vals[:10])
        score.append(vals[10])
        lmk_lines.append(i)
    if len(lmk) != len(names):
        raise _err(lmk_path, None, f"{len(lmk)} images, but {tid_path.name} lists {len(names)}")

    pair_path = meta / f"{t}_template_pair_label.txt"
    known = set(templates)
    p1, p2, label = [], [], []
    for i, f in _lines(pair_path):
        if len(f) != 3:
            raise _err(pair_path, i, f"expected 3 fields (template1 template2 label), got {len(f)}")
        a, b, lab = (_int(pair_path, i, v, w) for v, w in zip(f, ("template", "template", "label"), strict=True))
        for tid in (a, b):
            if tid not in known:
                raise _err(pair_path, i, f"template {tid} has no image in {tid_path.name}")
        if lab not in (0, 1):
            raise _err(pair_path, i, f"label must be 0 or 1, got {lab}")
        p1.append(a)
        p2.append(b)
        label.append(lab)
    if not label:
        raise _err(pair_path, None, "no template pairs")
    if len(set(label)) < 2:
        raise _err(pair_path, None, "needs both genuine (1) and impostor (0) pairs for an ROC")

    out = IJBMeta(root=root, target=target, names=names,
                  landmarks=np.asarray(lmk, dtype=np.float32).reshape(-1, 5, 2),
                  faceness=np.asarray(score, dtype=np.float32), templates=np.asarray(templates, dtype=np.int64),
                  medias=np.asarray(medias, dtype=np.int64), p1=np.asarray(p1, dtype=np.int64),
                  p2=np.asarray(p2, dtype=np.int64), label=np.asarray(label, dtype=np.int64),
                  files={"tid_mid": tid_path, "5pts": lmk_path, "pairs": pair_path,
                         "5pts_lines": lmk_lines})  # fmt: skip

    g1, g2 = ("G1", "G2") if target == "IJBC" else ("S1", "S2")
    csvs = [meta / f"{t}_1N_gallery_{g1}.csv", meta / f"{t}_1N_gallery_{g2}.csv", meta / f"{t}_1N_probe_mixed.csv"]
    present = [p.is_file() for p in csvs]
    if any(present) and not all(present):
        missing = [p.name for p, ok in zip(csvs, present, strict=True) if not ok]
        raise FileNotFoundError(f"{meta}: 1:N needs {', '.join(p.name for p in csvs)}; missing {', '.join(missing)}")
    if all(present):
        g = [_read_1n_csv(p, known, tid_path.name) for p in csvs[:2]]
        out.gallery = (np.concatenate([g[0][0], g[1][0]]), np.concatenate([g[0][1], g[1][1]]))
        out.probes = _read_1n_csv(csvs[2], known, tid_path.name)
        out.files["1:N"] = csvs
    return out


def _read_1n_csv(path: Path, known: set, tid_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(template ids, subject ids) of a 1:N list: a header row, then TEMPLATE_ID,SUBJECT_ID,... per image."""
    tids, sids = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if i == 1 or not line.strip():
                continue
            cols = line.strip().split(",")
            if len(cols) < 2:
                raise _err(path, i, "expected TEMPLATE_ID,SUBJECT_ID,... (comma-separated)")
            tid, sid = _int(path, i, cols[0], "template id"), _int(path, i, cols[1], "subject id")
            if tid not in known:
                raise _err(path, i, f"template {tid} has no image in {tid_name}")
            tids.append(tid)
            sids.append(sid)
    if not tids:
        raise _err(path, None, "no templates (a header row, then one row per image)")
    return np.asarray(tids, dtype=np.int64), np.asarray(sids, dtype=np.int64)
