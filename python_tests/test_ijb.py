"""IJB-B/C evaluation as insightface computes it, and identification against distractors.

Oracles: the functions insightface's evaluation itself calls (scikit-image's ``SimilarityTransform.estimate``,
``cv2.warpAffine``, scikit-learn's ``roc_curve``), the independent eager reference
(:mod:`mdkernels.reference.ijb`), and generated folders whose true transforms and identities are known.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch

from mdkernels.eval import align as A
from mdkernels.eval import identify as I
from mdkernels.eval import ijb
from mdkernels.eval import synth_ijb as S
from mdkernels.reference import ijb as R


class Pixels(torch.nn.Module):
    """A model that needs no training: 16 x 16 average-pooled pixels, centred. Aligned crops of one synthetic
    identity look alike, so it separates identities only when the alignment is right."""

    def forward(self, x):
        f = torch.nn.functional.avg_pool2d(x, 7).flatten(1)
        return f - f.mean(1, keepdim=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb") / "IJBC"
    truth = S.make_ijb_folder(root, subjects=8, templates_per_subject=3, seed=0, impostor_pairs=60)
    return root, truth


# --- alignment ----------------------------------------------------------------------------------------------


def test_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = S.random_similarity(rng, 200, 220)  # aligned -> loose
        lm = ((m[:2, :2] @ A.ARCFACE_TEMPLATE.T.astype(np.float64)).T + m[:2, 2]).astype(np.float32)
        est = A.estimate_similarity(lm, A.ARCFACE_TEMPLATE)  # loose -> aligned
        np.testing.assert_allclose(est, np.linalg.inv(m), atol=2e-4)
        est64 = A.estimate_similarity(lm.astype(np.float64), A.ARCFACE_TEMPLATE.astype(np.float64))
        np.testing.assert_allclose(est64, np.linalg.inv(m), atol=2e-4)


def test_similarity_equals_scikit_image_as_insightface_calls_it():
    skimage_transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(1)
    for _ in range(200):
        lm = (A.ARCFACE_TEMPLATE * rng.uniform(0.5, 4) + rng.uniform(-50, 300, 2) + rng.normal(0, 3, (5, 2)))
        lm = lm.astype(np.float32)  # insightface parses float32 landmarks
        t = skimage_transform.SimilarityTransform()
        with warnings.catch_warnings():  # the call insightface makes (scikit-image 0.26 deprecates it)
            warnings.simplefilter("ignore", FutureWarning)
            t.estimate(lm, A.ARCFACE_TEMPLATE)
        np.testing.assert_allclose(A.estimate_similarity(lm, A.ARCFACE_TEMPLATE), t.params, rtol=1e-6, atol=1e-5)


def test_five_points_from_68():
    lm = np.arange(136, dtype=np.float32).reshape(68, 2)
    five = A.five_points(lm)
    np.testing.assert_array_equal(five[0], (lm[36] + lm[39]) / 2)
    np.testing.assert_array_equal(five[1], (lm[42] + lm[45]) / 2)
    np.testing.assert_array_equal(five[2:], lm[[30, 48, 54]])
    with pytest.raises(ValueError, match="landmarks must be"):
        A.five_points(np.zeros((4, 2)))


def test_numpy_warp_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(2)
    differ = total = 0
    for _ in range(30):
        img = cv2.GaussianBlur(rng.integers(0, 256, (240, 200, 3), dtype=np.uint8), (5, 5), 1.5)
        lm = (A.ARCFACE_TEMPLATE * rng.uniform(0.8, 2) + rng.uniform(0, 40, 2) + rng.normal(0, 2, (5, 2)))
        m = A.estimate_similarity(lm.astype(np.float32), A.ARCFACE_TEMPLATE)[:2]
        ours, theirs = A.warp_affine(img, m, backend="numpy"), A.warp_affine(img, m, backend="cv2")
        d = np.abs(ours.astype(int) - theirs.astype(int))
        assert d.max() <= 1
        differ, total = differ + int((d > 0).sum()), total + d.size
    assert differ / total < 1e-3  # measured 6e-5 against OpenCV 5.1


def test_numpy_warp_exact_on_an_integer_shift():
    img = np.random.default_rng(3).integers(0, 256, (150, 140, 3), dtype=np.uint8)
    m = np.array([[1.0, 0, -10], [0, 1.0, -20]])  # dst(x, y) = src(x + 10, y + 20)
    out = A.warp_affine_numpy(img, m, 112)
    np.testing.assert_array_equal(out, img[20:132, 10:122])
    m = np.array([[1.0, 0, 50], [0, 1.0, 0]])  # the left 50 columns fall outside: border 0
    out = A.warp_affine_numpy(img, m, 112)
    assert (out[:, :50] == 0).all() and (out[:, 50:] == img[:112, : 112 - 50]).all()


def _blur(img):
    """A 5 x 5 box blur (the resamplings and JPEG differ at edges, not in the low frequencies)."""
    x = img.astype(float)
    k = np.ones(5) / 5
    x = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 0, x)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 1, x)[6:-6, 6:-6]


@pytest.mark.parametrize("backend", ["cv2", "numpy"])
def test_alignment_recovers_the_rendered_face(folder, backend):
    pytest.importorskip("cv2")
    root, truth = folder
    meta = ijb.read_meta(root)
    for i in range(0, len(meta.names), 7):
        img = np.ascontiguousarray(ijb.imread_rgb(meta.image_dir / meta.names[i]))
        want = _blur(truth["aligned"][i])
        err = np.abs(_blur(A.align_face(img, meta.landmarks[i], backend=backend)) - want).mean()
        off = np.abs(_blur(A.align_face(img, meta.landmarks[i] + 3.0, backend=backend)) - want).mean()
        assert err < 3.0 and off > 2 * err, (i, err, off)  # 3 px off is visibly worse


# --- metrics against scikit-learn and the reference ------------------------------------------------------------


def _scores_with_ties(rng, n):
    label = rng.random(n) < 0.3
    score = np.round(rng.normal(label * 1.5, 1.0), 1)  # rounding makes many ties
    return label.astype(int), score


def test_roc_curve_equals_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(4)
    for n in (3, 10, 200, 5000):
        label, score = _scores_with_ties(rng, n)
        if len(set(label)) < 2:
            label[0], label[1] = 0, 1
        fpr, tpr, thr = ijb.roc_curve(label, score)
        f2, t2, th2 = metrics.roc_curve(label, score)
        np.testing.assert_array_equal(fpr, f2)
        np.testing.assert_array_equal(tpr, t2)
        np.testing.assert_array_equal(thr[1:], th2[1:])
        rf, rt = R.ijb_roc(label, score)
        np.testing.assert_allclose(fpr, rf, rtol=0, atol=1e-15)
        np.testing.assert_allclose(tpr, rt, rtol=0, atol=1e-15)


def test_tar_ties_go_to_the_later_roc_point():
    # 10 genuine and 1000 impostor pairs. By hand, threshold by threshold: 0.99 -> (FAR 0, TAR .1); 0.98 -> (0, .2);
    # 0.97 -> (0, .3); 0.6 -> (.001, .3); 0.55 -> (.002, .3); 0.5 ... 0.07 -> (.002, .4) ... (.002, 1); -0.5 -> (1, 1).
    # Collinear middle points dropped (the first point always stays) and (0, 0) prepended, the ROC is
    # (0,0) (0,.1) (0,.3) (.002,.3) (.002,1) (1,1).
    genuine = np.array([0.99, 0.98, 0.97, 0.5, 0.49, 0.48, 0.1, 0.09, 0.08, 0.07])
    impostor = np.r_[0.6, 0.55, np.full(998, -0.5)]
    label = np.r_[np.ones(10), np.zeros(1000)].astype(int)
    score = np.r_[genuine, impostor]
    fpr, tpr, _ = ijb.roc_curve(label, score)
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.002, 0.002, 1])
    np.testing.assert_allclose(tpr, [0, 0.1, 0.3, 0.3, 1, 1])
    got = ijb.tar_at_far(fpr, tpr, (1e-3, 2e-3, 1e-1))
    # FAR 1e-3 is exactly as near to FAR 0 (TAR .3) as to FAR .002 (TAR .3 and 1): the last of them on the ROC wins,
    # so insightface reports TAR 1.0 at "FAR 1e-3" from a point whose FAR is 2e-3
    assert got["tar@far=1e-3"] == 1.0
    assert got["tar@far=2e-3"] == 1.0
    assert got["tar@far=1e-1"] == 1.0
    for far in (1e-3, 2e-3, 1e-1):
        assert got[f"tar@far={ijb._far_key(far)}"] == R.ijb_tar_at_far(*R.ijb_roc(label, score), far)


def test_tar_nearest_point_exceeds_the_far():
    # impostor scores 1.0 (one) then 0.0 (999): FARs on the ROC are 0, 0.001, 1. Genuine: 0.5 for 4, -1 for 6.
    label = np.r_[np.ones(10), np.zeros(1000)].astype(int)
    score = np.r_[np.full(4, 0.5), np.full(6, -1.0), [1.0], np.zeros(999)]
    fpr, tpr, _ = ijb.roc_curve(label, score)
    got = ijb.tar_at_far(fpr, tpr, (8e-4, 1e-5))
    # ROC: (0,0), (0.001, 0) [threshold 1.0], (0.001, 0.4) [0.5], (1, 0.4) [0.0], (1, 1) [-1]
    assert got["tar@far=8e-4"] == pytest.approx(0.4)  # nearest to 8e-4 is FAR 1e-3 (not 0): TAR 0.4 above it
    assert got["tar@far=1e-5"] == 0.0


@pytest.mark.parametrize("flip", ["add", "concat", "none"])
@pytest.mark.parametrize("norm_score,detector_score", [(True, True), (False, True), (True, False), (False, False)])
def test_image_and_template_features_match_the_reference(flip, norm_score, detector_score):
    rng = np.random.default_rng(5)
    n, d = 60, 6
    raw = rng.normal(size=(n, 2 * d)).astype(np.float32)
    face = rng.uniform(0.2, 1.0, n).astype(np.float32)
    templates = rng.integers(0, 9, n)
    medias = rng.integers(0, 5, n) + 10 * templates  # media ids unique within a template, some shared frames
    feats = ijb.image_features(raw, face, flip=flip, norm_score=norm_score, detector_score=detector_score)
    ref = R.ijb_image_features(raw, face, flip, norm_score, detector_score)
    np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-6)
    tids, tf = ijb.template_features(feats, templates, medias)
    ref_t = R.ijb_template_features(ref, templates, medias)
    assert tids.tolist() == sorted(ref_t)
    np.testing.assert_allclose(tf, np.stack([ref_t[t] for t in tids.tolist()]), rtol=1e-5, atol=1e-6)


def test_zero_template_stays_zero_and_unknown_templates_raise():
    feats = np.zeros((3, 4), np.float32)
    feats[2] = 1
    tids, tf = ijb.template_features(feats, np.array([1, 1, 2]), np.array([5, 5, 6]))
    assert (tf[0] == 0).all() and np.allclose(tf[1], 0.5)
    with pytest.raises(ValueError, match="template 3 has no feature"):
        ijb.pair_scores(tf, tids, np.array([1]), np.array([3]))
    with pytest.raises(ValueError, match="template 7 has no image"):
        ijb.template_features(feats, np.array([1, 1, 2]), np.array([5, 5, 6]), choose=np.array([7]))


def test_identification_matches_the_reference():
    rng = np.random.default_rng(6)
    g, q, d = 30, 200, 8
    gallery = rng.normal(size=(g, d))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    gids = rng.permutation(1000)[:g]
    who = rng.integers(0, g, q)
    probe = gallery[who] + rng.normal(0, 0.35, (q, d))
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    got = ijb.identification(probe, gids[who], gallery, gids, chunk=37)  # chunks: the running top of negatives
    ref = R.ijb_identification(probe, gids[who], gallery, gids)
    assert got.keys() == ref.keys()
    for k in got:
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k
    assert 0.2 < got["top1"] < 1.0 and got["top1"] <= got["top5"] <= got["top10"]  # the case is not trivial
    with pytest.raises(ValueError, match="subject 5 has 0 gallery templates"):
        ijb.identification(probe[:2], np.array([5, 5]), gallery, gids + 100)


# --- the whole pipeline ---------------------------------------------------------------------------------------


def test_pipeline_equals_the_reference_on_a_generated_folder(folder):
    root, truth = folder
    meta = ijb.read_meta(root)
    model = Pixels()
    res = ijb.evaluate_ijb(model, root, workers=0, progress=False, batch_size=16)
    assert res["target"] == "IJBC" and res["pairs"] == truth["pairs"] and res["images"] == truth["images"]
    assert res["mode"] == "N1D1F2"
    # the same images embedded again, and every later step by the reference
    raw = ijb.embed_images(model, meta, progress=False)
    feats = R.ijb_image_features(raw, meta.faceness)
    tf = R.ijb_template_features(feats, meta.templates, meta.medias)
    score = np.array([tf[a] @ tf[b] for a, b in zip(meta.p1, meta.p2, strict=True)])
    np.testing.assert_allclose(res["_scores"], score, rtol=0, atol=1e-6)
    fpr, tpr = R.ijb_roc(meta.label, res["_scores"])
    for far in ijb.FARS:
        assert res[f"tar@far={ijb._far_key(far)}"] == R.ijb_tar_at_far(fpr, tpr, far)
    (gt, gs), (pt, ps) = meta.gallery, meta.probes
    gu, gfirst = np.unique(gt, return_index=True)
    pu, pfirst = np.unique(pt, return_index=True)
    gtf = R.ijb_template_features(feats, meta.templates, meta.medias, gu)
    ptf = R.ijb_template_features(feats, meta.templates, meta.medias, pu)
    ref = R.ijb_identification(np.stack([ptf[t] for t in pu]), ps[pfirst], np.stack([gtf[t] for t in gu]), gs[gfirst])
    assert res["1:N"] == pytest.approx(ref, abs=1e-12)
    # the alignment is right: the pixel model tells the synthetic identities apart
    assert res["tar@far=1e-1"] >= 0.9 and res["1:N"]["top1"] >= 0.9


@pytest.mark.slow
def test_test_modes_and_workers(folder):
    root, _ = folder
    base = ijb.evaluate_ijb(Pixels(), root, workers=2, progress=False)
    again = ijb.evaluate_ijb(Pixels(), root, workers=0, progress=False)
    np.testing.assert_array_equal(base["_scores"], again["_scores"])
    modes = {ijb.evaluate_ijb(Pixels(), root, workers=0, progress=False, flip=f, norm_score=n, detector_score=d)["mode"]
             for f, n, d in [("none", True, True), ("concat", False, False)]}  # fmt: skip
    assert modes == {"N1D1F0", "N0D0F1"}


def test_ijbb_names_and_galleries(tmp_path):
    root = tmp_path / "IJBB"
    S.make_ijb_folder(root, target="IJBB", subjects=4, templates_per_subject=2, seed=1, impostor_pairs=6)
    assert (root / "meta" / "ijbb_1N_gallery_S1.csv").is_file()
    res = ijb.evaluate_ijb(Pixels(), root, workers=0, progress=False)
    assert res["target"] == "IJBB" and set(res["1:N"]) == {"top1", "top5", "top10", "tpir@fpir=1e-2", "tpir@fpir=1e-1"}


def test_without_opencv_the_numbers_barely_move(folder, monkeypatch):
    pytest.importorskip("cv2")
    root, _ = folder
    with_cv2 = ijb.evaluate_ijb(Pixels(), root, workers=0, progress=False)
    monkeypatch.setattr(A, "have_cv2", lambda: False)  # Pillow decodes, numpy warps
    without = ijb.evaluate_ijb(Pixels(), root, workers=0, progress=False)
    assert without["warp"] == "numpy" and with_cv2["warp"] == "cv2"
    assert np.abs(with_cv2["_scores"] - without["_scores"]).max() < 1e-3


def test_embedding_cache_and_resume(folder, tmp_path):
    root, _ = folder
    meta = ijb.read_meta(root)
    calls = []

    class Counting(Pixels):
        def forward(self, x):
            calls.append(len(x))
            if len(calls) == 3 and crash:
                raise RuntimeError("killed")
            return super().forward(x)

    crash = True
    with pytest.raises(RuntimeError, match="killed"):
        ijb.embed_images(Counting(), meta, batch_size=8, progress=False, cache_dir=tmp_path, model_digest="m")
    partial = list(tmp_path.glob("*.partial.npy"))
    assert len(partial) == 1
    crash, calls[:] = False, []
    got = ijb.embed_images(Counting(), meta, batch_size=8, progress=False, cache_dir=tmp_path, model_digest="m")
    full = ijb.embed_images(Pixels(), meta, batch_size=8, progress=False)
    np.testing.assert_allclose(np.asarray(got), full, rtol=0, atol=1e-6)
    # the first run flushed no rows (it died within 30 s), so the second embedded all; now a third reads the cache
    calls[:] = []
    again = ijb.embed_images(Counting(), meta, batch_size=8, progress=False, cache_dir=tmp_path, model_digest="m")
    assert calls == [] and np.array_equal(np.asarray(again), np.asarray(got))
    assert not list(tmp_path.glob("*.partial.npy"))


def test_embedding_resumes_from_flushed_rows(folder, tmp_path):
    from mdkernels.eval import embcache

    produced = []

    def produce(start):
        produced.append(start)
        for r in range(start, 10, 2):
            if r == 6 and len(produced) == 1:
                raise RuntimeError("killed")
            yield np.full((2, 3), r, np.float32)

    with pytest.raises(RuntimeError):
        embcache.cached_rows(tmp_path, {"x": 1}, 10, produce, flush_every=0.0)
    out = embcache.cached_rows(tmp_path, {"x": 1}, 10, produce, flush_every=0.0)
    assert produced == [0, 6]  # resumed at the first row not flushed
    np.testing.assert_array_equal(np.asarray(out)[:, 0], np.repeat(np.arange(0, 10, 2), 2))


# --- the command and bad folders ------------------------------------------------------------------------------


def _insightface_model(path, seed=0):
    from insightface_nets import get_model, randomize

    m = randomize(get_model("mbf", 64), seed=seed)
    torch.save(m.state_dict(), path)
    return m


@pytest.mark.slow
def test_mdk_eval_ijb_json_and_plot(folder, tmp_path, capsys):
    from mdkernels.cli import main

    root, _ = folder
    _insightface_model(tmp_path / "model.pt")
    out = tmp_path / "r" / "ijbc.json"
    assert main(["eval", str(tmp_path / "model.pt"), str(root), "--network", "mbf", "--json", str(out),
                 "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    got = json.loads(out.read_text())
    assert got["target"] == "IJBC" and got["pairs"] > 0
    assert {f"tar@far=1e-{k}" for k in range(1, 7)} <= got.keys()
    assert set(got["1:N"]) == {"top1", "top5", "top10", "tpir@fpir=1e-2", "tpir@fpir=1e-1"}
    assert (tmp_path / "r" / "ijbc.png").stat().st_size > 1000
    assert json.loads(capsys.readouterr().out)["tar@far=1e-6"] == got["tar@far=1e-6"]


@pytest.mark.slow
def test_mdk_eval_ijb_on_the_exported_onnx(folder, tmp_path):
    pytest.importorskip("onnxruntime")
    from mdkernels.cli import main

    root, _ = folder
    _insightface_model(tmp_path / "model.pt", seed=1)
    assert main(["export", str(tmp_path / "model.pt"), str(tmp_path / "m.onnx"), "--network", "mbf"]) == 0
    for model, extra in ((tmp_path / "model.pt", ["--network", "mbf"]), (tmp_path / "m.onnx", [])):
        assert main(["eval", str(model), str(root), "--json", str(tmp_path / f"{model.suffix[1:]}.json"), "--no-plot",
                     "--workers", "0", "--no-progress", *extra]) == 0  # fmt: skip
    a, b = (json.loads((tmp_path / f"{s}.json").read_text()) for s in ("pt", "onnx"))
    for k in [k for k in a if k.startswith("tar@")]:
        assert a[k] == pytest.approx(b[k], abs=0.02), k  # onnxruntime against torch: float noise near ties only


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _edit_line(path, lineno, fn):
    lines = path.read_text().splitlines()
    lines[lineno - 1] = fn(lines[lineno - 1])
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_meta", "unknown_template", "unreadable_image", "landmarks_outside",
                                  "short_line", "names_differ", "missing_1n"])  # fmt: skip
def test_bad_folders_give_one_line_naming_file_and_line(folder, tmp_path, case, capsys):
    root, truth = folder
    meta = root / "meta"

    def edit(d):
        m = d / "meta"
        if case == "missing_meta":
            (m / "ijbc_template_pair_label.txt").unlink()
        elif case == "unknown_template":
            _edit_line(m / "ijbc_template_pair_label.txt", 3, lambda s: "999 " + s.split()[1] + " 1")
        elif case == "unreadable_image":
            (d / "loose_crop" / truth["names"][4]).write_bytes(b"not an image")
        elif case == "landmarks_outside":
            _edit_line(m / "ijbc_name_5pts_score.txt", 2, lambda s: " ".join([s.split()[0], "-40"] + s.split()[2:]))
        elif case == "short_line":
            _edit_line(m / "ijbc_face_tid_mid.txt", 5, lambda s: " ".join(s.split()[:2]))
        elif case == "names_differ":
            _edit_line(m / "ijbc_name_5pts_score.txt", 3, lambda s: " ".join(["other.jpg"] + s.split()[1:]))
        elif case == "missing_1n":
            (m / "ijbc_1N_probe_mixed.csv").unlink()

    bad = _broken_copy(root, tmp_path / "IJBC", edit)
    expect = {
        "missing_meta": "ijbc_template_pair_label.txt: missing",
        "unknown_template": "ijbc_template_pair_label.txt:3: template 999 has no image",
        "unreadable_image": f"ijbc_name_5pts_score.txt:5: cannot read image {bad / 'loose_crop' / truth['names'][4]}",
        "landmarks_outside": "ijbc_name_5pts_score.txt:2: landmarks [-40.0",
        "short_line": "ijbc_face_tid_mid.txt:5: expected 3 fields",
        "names_differ": "ijbc_name_5pts_score.txt:3: names image 'other.jpg'",
        "missing_1n": "missing ijbc_1N_probe_mixed.csv",
    }[case]
    _insightface_model(tmp_path / "model.pt")
    rc, err = _cli(["eval", str(tmp_path / "model.pt"), str(bad), "--network", "mbf", "--no-plot", "--workers", "1",
                    "--no-progress"], capsys)  # fmt: skip
    assert rc == 2 and len(err) == 1 and err[0].startswith("mdk eval: error:") and expect in err[0], err
    assert meta.is_dir()  # the good folder is untouched


def _cli(argv, capsys):
    """``mdk ARGV`` as the console script runs it (errors as one line); returns (exit code, stderr lines)."""
    from mdkernels.cli import run

    capsys.readouterr()
    rc = run(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


# --- identification -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def people(tmp_path_factory):
    from PIL import Image

    from mdkernels.data.datasets import identity_params, render

    base = tmp_path_factory.mktemp("people")
    rng = np.random.default_rng(7)
    ids = [identity_params(rng) for _ in range(6)]
    for k, p in enumerate(ids):
        for split, n in (("gallery", 1), ("probes", 3)):
            (base / split / f"id{k}").mkdir(parents=True)
            for j in range(n):
                Image.fromarray(render(p, 112, rng, variation=1.0)).save(base / split / f"id{k}" / f"{j}.png")
    (base / "distractors" / "a").mkdir(parents=True)
    for j in range(25):
        Image.fromarray(render(identity_params(rng), 112, rng)).save(base / "distractors" / "a" / f"{j}.png")
    return base


def _brute_curve(probe, plab, gallery, glab, dis, sizes, ranks=(1, 5)):
    out = []
    for n in sizes:
        cand = np.concatenate([gallery, dis[:n]]) if n else gallery
        cand = cand / np.linalg.norm(cand, axis=1, keepdims=True)
        labels = list(glab) + [None] * n
        row = {"distractors": n}
        for r in ranks:
            hits = 0
            for i in range(len(probe)):
                s = cand @ (probe[i] / np.linalg.norm(probe[i]))
                mate = max(s[j] for j in range(len(s)) if labels[j] == plab[i])
                hits += sum(1 for j in range(len(s)) if labels[j] != plab[i] and s[j] > mate) < r
            row[f"rank{r}"] = hits / len(probe)
        out.append(row)
    return out


def test_identification_curve_matches_brute_force():
    rng = np.random.default_rng(8)
    g, d = 12, 16
    gallery = rng.normal(size=(g, d)).astype(np.float32)
    glab = np.arange(g) % 10  # two identities with two gallery images
    who = rng.integers(0, g, 40)
    probe = (gallery[who] + rng.normal(0, 0.9, (40, d))).astype(np.float32)
    dis = rng.normal(size=(1234, d)).astype(np.float32) * rng.uniform(0.5, 3, (1234, 1)).astype(np.float32)
    res = I.identification_curve(probe, glab[who], gallery, glab, dis, block_rows=100)
    sizes = [0, 10, 100, 1000, 1234]
    assert [c["distractors"] for c in res["curve"]] == sizes
    ref = _brute_curve(probe, glab[who], gallery, glab, dis, sizes)
    for a, b in zip(res["curve"], ref, strict=True):
        assert a == pytest.approx(b, abs=1e-12)
    assert res["curve"][0]["rank1"] > res["curve"][-1]["rank1"]  # distractors make it harder: not a flat case
    with pytest.raises(ValueError, match="has no gallery image"):
        I.identification_curve(probe, glab[who] + 100, gallery, glab)


@pytest.mark.slow
def test_mdk_eval_identify_with_folder_and_npy_distractors(people, tmp_path):
    from mdkernels.cli import main
    from mdkernels.eval.verification import load_eval_model

    _insightface_model(tmp_path / "model.pt", seed=2)
    base = ["eval", str(tmp_path / "model.pt"), "--network", "mbf", "--identify", str(people / "probes"),
            "--gallery", str(people / "gallery"), "--workers", "0", "--no-progress",
            "--cache", str(tmp_path / "c")]  # fmt: skip
    assert main(base + ["--distractors", str(people / "distractors"), "--json", str(tmp_path / "a.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert [c["distractors"] for c in a["curve"]] == [0, 10, 25] and a["probes"] == 18 and a["gallery"] == 6
    assert (tmp_path / "a.png").is_file()
    cached = sorted(p.name for p in (tmp_path / "c").glob("*.npy"))
    assert len(cached) == 3  # probes, gallery, distractors
    # the same distractors as an .npy of embeddings: the same curve
    model, _ = load_eval_model(str(tmp_path / "model.pt"), "mbf")
    emb = I.embed_paths(model, I.image_list(people / "distractors"), progress=False)
    np.save(tmp_path / "d.npy", emb * 3.0)  # any norm
    assert main(base + ["--distractors", str(tmp_path / "d.npy"), "--json", str(tmp_path / "b.json")]) == 0
    b = json.loads((tmp_path / "b.json").read_text())
    for cb, ca in zip(b["curve"], a["curve"], strict=True):
        assert cb == pytest.approx(ca, abs=1e-12)


def test_identify_bad_input_is_one_line(people, tmp_path, capsys):
    _insightface_model(tmp_path / "model.pt")
    np.save(tmp_path / "bad.npy", np.zeros((4, 7), np.float32))
    cases = [
        (["--identify", str(people / "probes")], "needs both --identify PROBES and --gallery GALLERY"),
        (["--identify", str(people / "probes"), "--gallery", str(people / "probes"), "--distractors",
          str(tmp_path / "bad.npy")], "distractor embeddings are 7-d"),  # fmt: skip
        (["--identify", str(tmp_path / "nope"), "--gallery", str(people / "gallery")], "identity folder not found"),
    ]
    for extra, expect in cases:
        rc, err = _cli(["eval", str(tmp_path / "model.pt"), "--network", "mbf", "--no-progress", "--workers", "0",
                        *extra], capsys)  # fmt: skip
        assert rc == 2 and len(err) == 1 and expect in err[0], (extra, err)


def test_progress_lines_off_a_terminal():
    import io

    from mdkernels.progress import Progress

    buf = io.StringIO()
    with Progress(100, "embedding", "img", stream=buf, interval=1e9) as p:
        for _ in range(100):
            p.update(1)
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue() and len(lines) == 10 and lines[-1].startswith("embedding: 100/100 img (100%")
    assert math.isfinite(p.rate)


def test_identification_takes_the_same_default_workers_as_ijb(monkeypatch):
    """``--workers`` unset: identification, like IJB, decodes in ``default_workers()`` processes (CPUs - 1, at
    most 8), as the flag's help says."""
    from mdkernels.eval import identify, ijb

    seen = []

    class Stop(Exception):
        pass

    def embed_paths(model, paths, **kw):
        seen.append(kw["workers"])
        raise Stop

    monkeypatch.setattr(identify, "identity_folder", lambda folder: ([], []))
    monkeypatch.setattr(identify, "embed_paths", embed_paths)
    monkeypatch.setattr(ijb.os, "cpu_count", lambda: 5)
    for workers, want in ((None, 4), (0, 0), (2, 2)):
        with pytest.raises(Stop):
            identify.evaluate_identification(torch.nn.Identity(), "p", "g", workers=workers, device="cpu")
        assert seen.pop() == want
    monkeypatch.setattr(ijb.os, "cpu_count", lambda: 64)
    assert ijb.default_workers() == 8
