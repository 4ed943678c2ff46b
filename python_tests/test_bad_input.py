"""The bad-input matrix: every public function and module, the mdk commands and the file readers, fed
what a user gets wrong. Each row must raise a Python exception whose message names the argument (or
the file and offset), never crash, hang or return NaN silently, and never write over a user's file.
The README's "Bad input" section lists these rows."""

from __future__ import annotations

import os
import pickle
import re

import pytest
import torch
from conftest import mdk_process

import mdkernels
from mdkernels import nn as mnn
from mdkernels import reference as R
from mdkernels.data import datasets as D
from mdkernels.eval import verification as E
from mdkernels.models.backbones import build_backbone
from mdkernels.models.checkpoint import load_checkpoint
from mdkernels.train.config import TrainConfig

G = torch.Generator().manual_seed(0)
X, W = torch.randn(4, 8, generator=G), torch.randn(10, 8, generator=G)
Y = torch.tensor([0, 3, 9, 1])
T = torch.randn(4, 8, generator=G)
mce, mdl, pkd = mdkernels.margin_cross_entropy, mdkernels.margin_distillation_loss, mdkernels.proxyless_kd_loss
ang, tri, mkd = mdkernels.angular_distillation_loss, mdkernels.triplet_distillation_loss, mdkernels.margin_kd_loss
ada = mdkernels.adadistill_loss
nan_x = X.clone()
nan_x[1, 2] = float("nan")
inf_w = W.clone()
inf_w[3, 0] = float("inf")

# (id, call, exception type(s), message regex naming the argument)
FUNCTIONS = [
    ("mce/embeddings 1-D", lambda: mce(X[0], W, Y), ValueError, "embeddings"),
    ("mce/centers 3-D", lambda: mce(X, W[None], Y), ValueError, "centers"),
    ("mce/D mismatch", lambda: mce(X, W[:, :5], Y), ValueError, "D|dimension|columns"),
    ("mce/B mismatch", lambda: mce(X, W, Y[:3]), ValueError, "labels"),
    ("mce/int embeddings", lambda: mce(X.long(), W, Y), (ValueError, TypeError), "embeddings"),
    ("mce/dtype mismatch", lambda: mce(X, W.double(), Y), ValueError, "dtype"),
    ("mce/float labels", lambda: mce(X, W, Y.float()), (ValueError, TypeError), "labels"),
    ("mce/centers on another device", lambda: mce(X, W.to("meta"), Y), ValueError, "centers is on meta"),
    ("mce/labels on another device", lambda: mce(X, W, Y.to("meta")), ValueError, "labels is on meta"),
    ("ang/teacher on another device", lambda: ang(X, T.to("meta")), ValueError, "teacher is on meta"),
    ("mce/label >= C", lambda: mce(X, W, torch.tensor([0, 3, 10, 1])), ValueError, "label"),
    ("mce/label < -1", lambda: mce(X, W, torch.tensor([0, -2, 1, 1])), ValueError, "label"),
    ("mce/labels 2-D", lambda: mce(X, W, Y[:, None]), ValueError, "labels"),
    ("mce/s = 0", lambda: mce(X, W, Y, s=0.0), ValueError, r"^s \(the logit scale\) must be"),
    ("mce/s < 0", lambda: mce(X, W, Y, s=-1.0), ValueError, r"^s \(the logit scale\) must be"),
    ("mce/s = nan", lambda: mce(X, W, Y, s=float("nan")), ValueError, r"^s \(the logit scale\) .*got nan"),
    ("mce/m1 < 1", lambda: mce(X, W, Y, m1=0.5), ValueError, r"^m1 \(the multiplicative angular margin\)"),
    ("mce/m2 rows wrong length", lambda: mce(X, W, Y, m2=torch.zeros(3)), ValueError,
     r"^m2 as a tensor must have shape"),
    ("mce/bad reduction", lambda: mce(X, W, Y, reduction="avg"), ValueError, "reduction"),
    ("mce/bad grad", lambda: mce(X, W, Y, grad="approx"), ValueError, "grad"),
    ("mce/bad backend", lambda: mce(X, W, Y, backend="metal"), ValueError, "backend"),
    ("mce/subcenters 0", lambda: mce(X, W, Y, subcenters=0), ValueError, "subcenters"),
    ("mce/subcenters 17", lambda: mce(X, torch.randn(17 * 3, X.shape[1]), Y, subcenters=17), ValueError,
     r"subcenters must be an int in \[1, 16\]"),
    ("mce/subcenters not dividing", lambda: mce(X, W, Y, subcenters=3), ValueError, "subcenters"),
    ("mce/NaN embeddings", lambda: mce(nan_x, W, Y, check_finite=True), ValueError, "embeddings"),
    ("mce/Inf centers", lambda: mce(X, inf_w, Y, check_finite=True), ValueError, "centers"),
    ("mce/fallback and easy_margin", lambda: mce(X, W, Y, easy_margin=True), ValueError, "easy_margin"),
    # found by test_fuzz.py: the reference took this pair, which the fused op refuses
    ("reference/fallback and easy_margin", lambda: R.margin_cross_entropy(X, W, Y, easy_margin=True), ValueError,
     "easy_margin"),
    ("mdl/both teacher inputs", lambda: mdl(X, W, Y, teacher_embeddings=T, teacher_cos=Y.float()), ValueError,
     "exactly one"),
    ("mdl/teacher rows", lambda: mdl(X, W, Y, teacher_embeddings=T[:2]), ValueError, "teacher"),
    ("mdl/m_min > m_max", lambda: mdl(X, W, Y, teacher_embeddings=T, m_min=0.6, m_max=0.2), ValueError, "m_min|m_max"),
    ("mdl/dmax <= 0", lambda: mdl(X, W, Y, teacher_cos=-torch.ones(4)), ValueError, "Dmax|dmax"),
    ("mdl/bad dmax", lambda: mdl(X, W, Y, teacher_embeddings=T, dmax="max"), ValueError, "dmax"),
    ("pkd/D mismatch", lambda: pkd(X[:, :5], W, Y), ValueError, r"teacher.s embedding space: embeddings have D="),
    ("pkd/bad margin", lambda: pkd(X, W, Y, margin="adaface"), ValueError, "margin"),
    ("ang/shape mismatch", lambda: ang(X, T[:, :5]), ValueError, "shape"),
    ("ang/p < 1", lambda: ang(X, T, p=0.5), ValueError, r"^p must be >= 1"),
    ("ang/bad per", lambda: ang(X, T, per="pixel"), ValueError, "per"),
    ("ang/int", lambda: ang(X.long(), T.long()), (ValueError, TypeError), "floating|student"),
    ("tri/no labels or triplets", lambda: tri(X, T), ValueError, "labels|triplets"),
    ("tri/triplet out of range", lambda: tri(X, T, torch.tensor([[0, 1, 9]])), ValueError, "triplet"),
    ("tri/bad mining", lambda: tri(X, T, labels=Y, mining="easy"), ValueError, "mining"),
    ("tri/bad distance", lambda: tri(X, T, labels=Y, distance="cos"), ValueError, "distance"),
    ("mkd/T = 0", lambda: mkd(X, T, W, Y, T=0.0), ValueError, r"^T \(the temperature\)"),
    ("mkd/alpha > 1", lambda: mkd(X, T, W, Y, alpha=1.5), ValueError, "alpha"),
    ("mkd/teacher shape", lambda: mkd(X, T[:, :5], W, Y), ValueError, "teacher_embeddings"),
    ("ada/bad margin", lambda: ada(X, T, W.clone(), Y, margin="sphereface"), ValueError, "margin"),
    ("ada/teacher columns", lambda: ada(X, T[:, :5], W.clone(), Y), ValueError, "teacher_embeddings"),
    ("ada/teacher rows", lambda: ada(X, T[:3], W.clone(), Y), ValueError, "teacher_embeddings"),
    ("ada/centers D", lambda: ada(X, T, W[:, :5].clone(), Y), ValueError, "centers"),
    ("ada/centers need grad", lambda: ada(X, T, W.clone().requires_grad_(), Y), ValueError, "centers"),
    ("ada/label >= C", lambda: ada(X, T, W.clone(), torch.tensor([0, 1, 2, 10])), ValueError, "label"),
    ("ada/m > pi/2", lambda: ada(X, T, W.clone(), Y, m=2.0), ValueError, r"^m \(the margin\)"),
    ("ada/teacher on another device", lambda: ada(X, T.to("meta"), W.clone(), Y), ValueError, "teacher_embeddings"),
]  # fmt: skip

MODULES = [
    ("ArcFace/num_classes 0", lambda: mnn.ArcFace(8, 0), ValueError, "num_classes"),
    ("ArcFace/embedding_size -1", lambda: mnn.ArcFace(-1, 10), ValueError, "embedding_size"),
    ("ArcFace/wrong D in forward", lambda: mnn.ArcFace(8, 10)(X[:, :5], Y), ValueError, "D|dimension|columns"),
    ("CosFace/label >= C", lambda: mnn.CosFace(8, 10)(X, torch.tensor([0, 1, 2, 10])), ValueError, "label"),
    ("PartialFCHead/margins", lambda: mnn.PartialFCHead(8, 10, m1=1.2, m2=0.1), ValueError, "CombinedMarginLoss"),
    ("PartialFCHead/sample_rate", lambda: mnn.PartialFCHead(8, 10, sample_rate=0.5), ValueError, "sample_rate"),
    ("AdaFace/h < 0", lambda: mnn.AdaFace(8, 10, h=-0.1), ValueError, r"^h must be in"),
    ("AdaFace/m > pi/2", lambda: mnn.AdaFace(8, 10, m=2.0), ValueError, r"^m must be in"),
    ("CurricularFace/momentum > 1", lambda: mnn.CurricularFace(8, 10, momentum=1.5), ValueError, "momentum"),
    ("MagFace/l_a >= u_a", lambda: mnn.MagFace(8, 10, l_a=120.0), ValueError, "l_a|u_a"),
    ("ElasticArcFace/std < 0", lambda: mnn.ElasticArcFace(8, 10, std=-0.1), ValueError, "std"),
    ("ElasticCosFace/plus_order", lambda: mnn.ElasticCosFace(8, 10, plus_order="random"), ValueError, "plus_order"),
    ("AdaDistill/margin", lambda: mnn.AdaDistill(8, 10, margin="cos"), ValueError, "margin"),
    ("AdaDistill/num_classes 0", lambda: mnn.AdaDistill(8, 0), ValueError, "num_classes"),
    ("AdaDistill/s <= 0", lambda: mnn.AdaDistill(8, 10, s=0.0), ValueError, r"^s \(the logit scale\)"),
    ("AdaDistill/teacher shape", lambda: mnn.AdaDistill(8, 10)(X, T[:, :5], Y), ValueError, "teacher_embeddings"),
    ("SubCenterArcFace/K 0", lambda: mnn.SubCenterArcFace(8, 10, K=0), ValueError, r"^K \(sub-centers per class\)"),
    ("SubCenterArcFace/K 17", lambda: mnn.SubCenterArcFace(8, 10, K=17), ValueError, r"must be an int in \[1, 16\]"),
    ("MarginDistillation/centers 1-D", lambda: mnn.MarginDistillation(W[0]), ValueError, "centers"),
    ("ProxylessKD/margin", lambda: mnn.ProxylessKD(W, margin="curricular"), ValueError, "margin"),
    ("MarginKD/T < 0", lambda: mnn.MarginKD(W, T=-1.0)(X, T, Y), ValueError, r"^T \(the temperature\)"),
    ("TripletDistillation/mining", lambda: mnn.TripletDistillation(mining="easy")(X, T, labels=Y), ValueError,
     "mining"),
]  # fmt: skip


@pytest.mark.parametrize("case,call,exc,match", FUNCTIONS + MODULES, ids=[r[0] for r in FUNCTIONS + MODULES])
def test_bad_argument_raises_naming_it(case, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_each_message_pattern_names_one_argument():
    """A pattern as short as one letter ("s") matched every other row's message too, so it named nothing: each
    pattern is at least three characters and matches at most a quarter of the other rows' messages."""
    messages = {}
    for case, call, _, _ in FUNCTIONS + MODULES:
        try:
            call()
        except Exception as err:  # noqa: BLE001 (each row's own exception is checked above)
            messages[case] = str(err)
    for case, _, _, match in FUNCTIONS + MODULES:
        others = [c for c, m in messages.items() if c != case and re.search(match, m)]
        assert len(match) >= 3 and len(others) <= len(messages) // 4, f"{case}: {match!r} also matches {others[:6]}"


# ---- files: readers, truncated and corrupt ------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    data = D.generate_dataset(root / "ok", identities=3, per_identity=2, heldout_identities=4, pairs=4, size=16)
    return root, data


def _truncated(src, dst, keep):
    b = open(src, "rb").read()
    open(dst, "wb").write(b[: int(len(b) * keep)] if keep < 1 else b)
    return dst


def _reader(rec, idx=None):
    return D.RecordDataset(rec, idx)


def _crafted_bin(path):
    marker = path.parent / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path.write_bytes(pickle.dumps(([Evil()], []), protocol=4))
    return path


def _rec_bad_magic(root, data):
    b = bytearray(open(data["train"], "rb").read())
    b[0:4] = b"\x00\x00\x00\x00"
    (root / "m.rec").write_bytes(bytes(b))
    (root / "m.idx").write_bytes(open(data["train"].replace(".rec", ".idx"), "rb").read())
    return root / "m.rec"


def _idx_garbage(root, data):
    (root / "g.rec").write_bytes(open(data["train"], "rb").read())
    (root / "g.idx").write_text("0\tnot-a-number\n")
    return root / "g.rec"


def _idx_past_end(root, data):
    (root / "p.rec").write_bytes(open(data["train"], "rb").read()[:100])
    (root / "p.idx").write_bytes(open(data["train"].replace(".rec", ".idx"), "rb").read())
    return root / "p.rec"


FILE_CASES = [
    ("rec/missing", lambda r, d: _reader(r / "none.rec"), FileNotFoundError, "none"),
    ("rec/bad magic", lambda r, d: _reader(_rec_bad_magic(r, d))[0], ValueError, r"m\.rec.*(offset|magic)"),
    ("rec/garbage idx", lambda r, d: _reader(_idx_garbage(r, d)), ValueError, r"g\.idx"),
    ("rec/truncated (idx points past the end)", lambda r, d: [_reader(_idx_past_end(r, d))[i] for i in range(6)],
     ValueError, r"offset \d+ is outside .*p\.rec"),
    ("bin/truncated", lambda r, d: E.load_bin(_truncated(d["val"], r / "t.bin", 0.5)), ValueError, r"t\.bin"),
    ("bin/crafted pickle", lambda r, d: E.load_bin(_crafted_bin(r / "evil.bin")), ValueError, r"evil\.bin.*refusing"),
    ("bin/not a pair", lambda r, d: E.load_bin(_pickled(r / "n.bin", [1, 2, 3])), ValueError, r"n\.bin"),
    ("checkpoint/truncated", lambda r, d: load_checkpoint(_saved_then_cut(r / "c.pt")), ValueError, r"c\.pt"),
    ("checkpoint/missing", lambda r, d: load_checkpoint(r / "none.pt"), FileNotFoundError, r"none\.pt"),
    ("config/unknown key", lambda r, d: TrainConfig.from_dict({"lr": 0.1, "learning_rate": 0.1}), ValueError,
     "learning_rate"),
]  # fmt: skip


def _pickled(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


def _saved_then_cut(path):
    torch.save({"config": {}, "backbone": {"w": torch.randn(100, 100)}}, path)
    return _truncated(path, path, 0.5)


@pytest.mark.parametrize("case,call,exc,match", FILE_CASES, ids=[r[0] for r in FILE_CASES])
def test_bad_file_raises_naming_it(files, case, call, exc, match):
    root, data = files
    with pytest.raises(exc, match=match):
        call(root, data)
    assert not (root / "pwned").exists()  # the crafted pickle ran nothing


# ---- the mdk commands: one line, no traceback, nothing of the user's replaced ---------------------------------------
CLI_CASES = [
    ("train/no data", ["train", "--out", "{root}/o"], "--data"),
    ("train/missing data", ["train", "--data", "{root}/none.rec", "--out", "{root}/o"], "none"),
    ("train/unknown config key", ["train", "--config", "{root}/bad.json", "--data", "{rec}"], "learning_rate"),
    ("train/bad optimizer", ["train", "--data", "{rec}", "--optimizer", "lamb", "--out", "{root}/o"], "--optimizer"),
    ("train/bad margin list", ["train", "--data", "{rec}", "--margin-list", "1,2", "--out", "{root}/o"],
     "--margin-list"),
    ("train/distill without teacher", ["train", "--data", "{rec}", "--method", "margindistill"], "--teacher"),
    ("eval/crafted .bin", ["eval", "{root}/model.pt", "{root}/evil.bin"], "refusing|model"),
    ("eval/missing model", ["eval", "{root}/none.pt", "{val}"], "none.pt"),
    ("export/not .onnx", ["export", "{root}/last.pt", "{root}/x.txt"], ".onnx"),
    ("export/corrupt checkpoint", ["export", "{root}/corrupt.pt", "{root}/x.onnx"], "corrupt.pt"),
    ("import-insightface/no run", ["import-insightface", "{root}/norun", "--network", "r50", "--out", "{root}/t.pt"],
     "norun"),
    ("reshard/bad world", ["reshard", "{root}/last.pt", "--world", "0", "--out", "{root}/s"], "--world"),
    ("reshard/missing source", ["reshard", "{root}/nothing", "--world", "2", "--out", "{root}/s"], "nothing"),
    # malformed config files: each names the file and what is wrong, never a TypeError's traceback
    ("train/config is a list", ["train", "--config", "{root}/list.json", "--data", "{rec}"],
     "list.json .*JSON object"),
    ("train/config not JSON", ["train", "--config", "{root}/notjson.json", "--data", "{rec}"],
     "notjson.json is not valid JSON"),
    ("train/config wrong type", ["train", "--config", "{root}/type.json", "--data", "{rec}"],
     "lr must be float, got 'fast'"),
    ("train/config null int", ["train", "--config", "{root}/null.json", "--data", "{rec}"],
     "epochs must be int, got None"),
    ("train/config bool for float", ["train", "--config", "{root}/bool.json", "--data", "{rec}"], "s must be float"),
    ("train/config missing", ["train", "--config", "{root}/nope.json", "--data", "{rec}"], "nope.json"),
    # arguments out of range, from flags or a file
    ("train/batch size 0", ["train", "--data", "{rec}", "--batch-size", "0", "--out", "{root}/o"], "--batch-size"),
    ("train/lr nan", ["train", "--data", "{rec}", "--lr", "nan", "--out", "{root}/o"], r"--lr\) must be a finite"),
    ("train/momentum 1", ["train", "--config", "{root}/momentum.json", "--data", "{rec}"], "--momentum"),
    ("train/sample rate 0", ["train", "--data", "{rec}", "--sample-rate", "0", "--out", "{root}/o"], "--sample-rate"),
    # data that is not what it claims
    ("train/garbage rec", ["train", "--data", "{root}/garbage.rec", "--out", "{root}/o"], "garbage.idx"),
    ("train/empty folder", ["train", "--data", "{root}/empty", "--out", "{root}/o"], "empty has no identity"),
    ("eval/garbage .bin", ["eval", "{root}/last.pt", "{root}/garbage.bin"], "garbage.bin"),
    ("eval/missing target", ["eval", "{root}/last.pt", "{root}/none.bin"], "none.bin"),
]  # fmt: skip


@pytest.fixture(scope="module")
def cli_files(files):
    root, data = files
    (root / "bad.json").write_text('{"learning_rate": 0.1}')
    for name, text in (("list", "[1, 2]"), ("notjson", "{oops"), ("type", '{"lr": "fast"}'),
                       ("null", '{"epochs": null}'), ("bool", '{"s": true}'), ("momentum", '{"momentum": 1.0}')):
        (root / f"{name}.json").write_text(text)
    (root / "garbage.rec").write_bytes(bytes(range(256)) * 8)
    (root / "garbage.idx").write_bytes(bytes(range(128, 256)))
    (root / "garbage.bin").write_bytes(bytes(range(256)))
    (root / "empty").mkdir(exist_ok=True)
    _crafted_bin(root / "evil.bin")
    (root / "corrupt.pt").write_bytes(b"\x80\x02garbage")
    model = build_backbone("mobilefacenet", width=0.25, embedding_size=8, input_size=16)
    cfg = TrainConfig(backbone="mobilefacenet", width=0.25, embedding_size=8, input_size=16)
    torch.save({"config": cfg.__dict__, "backbone": model.state_dict(), "head": {"head.weight": torch.randn(3, 8)}},
               root / "last.pt")  # fmt: skip
    return root, data


@pytest.mark.parametrize("case,args,match", CLI_CASES, ids=[r[0] for r in CLI_CASES])
def test_cli_bad_input_is_one_line(cli_files, capsys, case, args, match):
    """In-process through the console script's entry point (``mdk`` = ``mdkernels.cli:run``); the first
    case also runs as a real process."""
    from mdkernels.cli import run

    root, data = cli_files
    fill = {"root": str(root), "rec": data["train"], "val": data["val"]}
    before = {p: p.read_bytes() for p in root.iterdir() if p.is_file()}
    argv = [a.format(**fill) for a in args]
    if case == CLI_CASES[0][0]:
        res = mdk_process(*argv)
        code, err = res.returncode, res.stderr
    else:
        try:
            code = run(argv)
        except SystemExit as exit_:  # argparse's own usage errors
            code = exit_.code
        err = capsys.readouterr().err
    assert code not in (0, None)
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("mdk train: ignored")]
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert re.search(match, lines[0]), lines[0]
    after = {p: p.read_bytes() for p in root.iterdir() if p.is_file()}
    assert all(after.get(p) == b for p, b in before.items()), "a user's file was changed"
    assert not (root / "pwned").exists()
