"""Small IJB-B/C folders in insightface's layout, made of textured synthetic faces, for tests and benchmarks.

Each image is a rendered 112 x 112 face (:func:`mdkernels.data.datasets.render`) placed into a larger "loose crop"
by a known random similarity transform; its five landmarks are that transform applied to the ArcFace template, so
alignment should recover the rendered face. Subjects own several templates, templates several media, media
several frames; the pair list mixes genuine and impostor template pairs, and the 1:N lists put one template of
each subject into gallery G1 or G2 (IJB-B: S1/S2) and the others into the mixed probe list.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mdkernels.data.datasets import identity_params, render
from mdkernels.eval import align as A


def random_similarity(rng: np.random.Generator, out_w: int, out_h: int) -> np.ndarray:
    """A 3 x 3 similarity placing a 112 x 112 crop inside an ``out_w x out_h`` image (rotation, scale, shift)."""
    ang, scale = rng.uniform(-0.35, 0.35), rng.uniform(0.8, 1.25)
    c, s = scale * np.cos(ang), scale * np.sin(ang)
    m = np.array([[c, -s, 0.0], [s, c, 0.0], [0, 0, 1.0]])
    corners = m[:2, :2] @ np.array([[0, 112, 0, 112], [0, 0, 112, 112]], dtype=np.float64)
    lo, hi = corners.min(1), corners.max(1)
    room = np.array([out_w, out_h]) - (hi - lo)
    m[:2, 2] = -lo + rng.uniform(0.1, 0.9, 2) * np.maximum(room, 0)
    return m


def make_ijb_folder(root: str | Path, *, target: str = "IJBC", subjects: int = 8, templates_per_subject: int = 3,
                    media_per_template: tuple[int, int] = (1, 3), frames_per_media: tuple[int, int] = (1, 3),
                    impostor_pairs: int = 40, loose: tuple[int, int] = (196, 208), one_n: bool = True,
                    seed: int = 0, fmt: str = "jpg") -> dict:  # fmt: skip
    """Writes ``root/meta`` and ``root/loose_crop``; returns what a test checks against: per image the transform
    (loose from aligned) and the rendered aligned face, and the subject of each template."""
    from PIL import Image

    t = target.lower()
    root = Path(root)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "loose_crop").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    people = [identity_params(rng) for _ in range(subjects)]
    tid_lines, lmk_lines, truth = [], [], {"transforms": [], "aligned": [], "template_subject": {}, "names": []}
    tid, mid, img_no = 0, 0, 0
    subject_templates: dict[int, list[int]] = {}
    template_rows: dict[int, list[str]] = {}
    for s, person in enumerate(people):
        for _ in range(templates_per_subject):
            tid += 1
            truth["template_subject"][tid] = s
            subject_templates.setdefault(s, []).append(tid)
            for _ in range(rng.integers(media_per_template[0], media_per_template[1] + 1)):
                mid += 1
                for _ in range(rng.integers(frames_per_media[0], frames_per_media[1] + 1)):
                    img_no += 1
                    name = f"{img_no}.{fmt}"
                    face = render(person, A.IMAGE_SIZE, rng, variation=0.5)
                    m = random_similarity(rng, *loose)
                    bg = rng.integers(0, 256, (loose[1], loose[0], 3), dtype=np.uint8)
                    placed = A.warp_affine_numpy(face, m[:2], loose)
                    inside = A.warp_affine_numpy(np.full_like(face, 255), m[:2], loose) == 255
                    img = np.where(inside, placed, bg // 3)
                    save = {"jpg": {"quality": 95}, "png": {}}[fmt]
                    Image.fromarray(img).save(root / "loose_crop" / name, **save)
                    lm = (m[:2, :2] @ A.ARCFACE_TEMPLATE.T.astype(np.float64)).T + m[:2, 2]
                    score = rng.uniform(0.6, 1.0)
                    tid_lines.append(f"{name} {tid} {mid}")
                    lmk_lines.append(" ".join([name] + [f"{v:.3f}" for v in lm.reshape(-1)] + [f"{score:.5f}"]))
                    template_rows.setdefault(tid, []).append(name)
                    truth["transforms"].append(m)
                    truth["aligned"].append(face)
                    truth["names"].append(name)
    pairs = []
    for ts in subject_templates.values():
        pairs += [(a, b, 1) for i, a in enumerate(ts) for b in ts[i + 1 :]]
    all_t = sorted(truth["template_subject"])
    while sum(1 for p in pairs if p[2] == 0) < impostor_pairs:
        a, b = rng.choice(all_t, 2, replace=False)
        if truth["template_subject"][a] != truth["template_subject"][b]:
            pairs.append((int(a), int(b), 0))
    order = rng.permutation(len(pairs))
    (root / "meta" / f"{t}_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    (root / "meta" / f"{t}_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
    (root / "meta" / f"{t}_template_pair_label.txt").write_text(
        "\n".join(f"{pairs[i][0]} {pairs[i][1]} {pairs[i][2]}" for i in order) + "\n")  # fmt: skip
    if one_n:
        g_names = ("G1", "G2") if target.upper() == "IJBC" else ("S1", "S2")
        half = (subjects + 1) // 2
        groups = {g_names[0]: range(half), g_names[1]: range(half, subjects)}
        head = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
        for g, subj in groups.items():
            rows = [f"{subject_templates[s][0]},{s + 1000},{n}" for s in subj
                    for n in template_rows[subject_templates[s][0]]]  # fmt: skip
            (root / "meta" / f"{t}_1N_gallery_{g}.csv").write_text(head + "\n".join(rows) + "\n")
        probe = [f"{tt},{s + 1000},{n}" for s in range(subjects) for tt in subject_templates[s][1:]
                 for n in template_rows[tt]]  # fmt: skip
        (root / "meta" / f"{t}_1N_probe_mixed.csv").write_text(head + "\n".join(probe) + "\n")
    truth.update(root=root, images=img_no, templates=tid, pairs=len(pairs))
    return truth
