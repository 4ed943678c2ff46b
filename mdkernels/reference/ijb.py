"""insightface's IJB-B/C scoring, eagerly and independently of :mod:`mdkernels.eval.ijb`: the oracle its tests
compare with. Plain Python loops and float64 throughout; written from insightface's ``eval_ijbc.py`` and
``ijb_1n.py`` as they behave, not from the fast module.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ijb_image_features", "ijb_template_features", "ijb_roc", "ijb_tar_at_far", "ijb_identification"]


def ijb_image_features(raw, faceness, flip="add", norm_score=True, detector_score=True):
    raw = np.asarray(raw, dtype=np.float64)
    half = raw.shape[1] // 2
    rows = []
    for i in range(len(raw)):
        if flip == "add":
            v = [raw[i, j] + raw[i, half + j] for j in range(half)]
        elif flip == "concat":
            v = list(raw[i])
        else:
            v = list(raw[i, :half])
        if not norm_score:
            n = math.sqrt(sum(a * a for a in v))
            v = [a / n for a in v]
        if detector_score:
            v = [a * float(faceness[i]) for a in v]
        rows.append(v)
    return np.array(rows)


def ijb_template_features(feats, templates, medias, choose=None):
    """{template id: normalised feature}: per template, per media the mean of its images, summed, normalised."""
    groups: dict[int, dict[int, list[int]]] = {}
    for i, (t, m) in enumerate(zip(templates, medias, strict=True)):
        groups.setdefault(int(t), {}).setdefault(int(m), []).append(i)
    wanted = sorted(set(int(t) for t in (templates if choose is None else choose)))
    out = {}
    for t in wanted:
        total = np.zeros(feats.shape[1])
        for rows in groups[t].values():
            total += sum(feats[r] for r in rows) / len(rows)
        n = math.sqrt(float(total @ total))
        out[t] = total / n if n > 0 else total
    return out


def ijb_roc(label, score):
    """Every distinct threshold from the top, then the collinear middle points dropped (scikit-learn's rule),
    then ``(0, 0)`` first. Returns ``(fpr, tpr)`` lists."""
    pairs = sorted(zip(score, label, strict=True), key=lambda p: -p[0])
    pos = sum(1 for _, y in pairs if y)
    neg = len(pairs) - pos
    pts = []
    tp = fp = 0
    for k, (s, y) in enumerate(pairs):
        tp += int(bool(y))
        fp += int(not y)
        if k == len(pairs) - 1 or pairs[k + 1][0] != s:
            pts.append((fp, tp))
    if len(pts) > 2:
        kept = [pts[0]]
        for k in range(1, len(pts) - 1):
            (f0, t0), (f1, t1), (f2, t2) = pts[k - 1], pts[k], pts[k + 1]
            if f0 - 2 * f1 + f2 != 0 or t0 - 2 * t1 + t2 != 0:
                kept.append(pts[k])
        kept.append(pts[-1])
        pts = kept
    pts = [(0, 0)] + pts
    return [f / neg for f, _ in pts], [t / pos for _, t in pts]


def ijb_tar_at_far(fpr, tpr, far):
    """The TAR of the ROC point nearest ``far`` in FAR; of equally near points, the last one on the ROC."""
    best = None
    for f, t in zip(fpr, tpr, strict=True):
        d = abs(f - far)
        if best is None or d <= best[0]:
            best = (d, t)
    return best[1]


def ijb_identification(probe, probe_ids, gallery, gallery_ids, ks=(1, 5, 10), fpirs=(1e-2, 1e-1)):
    sims = np.asarray(probe, dtype=np.float64) @ np.asarray(gallery, dtype=np.float64).T
    mates = [list(gallery_ids).index(s) for s in probe_ids]
    out = {}
    for k in ks:
        hits = 0
        for i, m in enumerate(mates):
            better = sum(1 for j in range(sims.shape[1]) if j != m and sims[i, j] > sims[i, m])
            hits += better < k
        out[f"top{k}"] = hits / len(mates)
    negatives = sorted((sims[i, j] for i, m in enumerate(mates) for j in range(sims.shape[1]) if j != m),
                       reverse=True)  # fmt: skip
    for f in fpirs:
        th = negatives[math.ceil(len(mates) * f) - 1]
        out[f"tpir@fpir={f:.0e}".replace("e-0", "e-")] = sum(sims[i, m] > th for i, m in enumerate(mates)) / len(mates)
    return out
