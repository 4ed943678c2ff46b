"""The reference training loop: data formats, evaluation, end-to-end runs, exact resume, DDP, bad input."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mdkernels.cli import main as mdk
from mdkernels.data import datasets as D
from mdkernels.data import recordio
from mdkernels.eval import verification as E
from mdkernels.models.backbones import build_backbone
from mdkernels.train.trainer import TrainConfig, load_checkpoint, train

pytestmark = pytest.mark.slow  # training runs, kills and torchrun: not in the quick tier (docs/testing.md)

SMALL = dict(identities=12, per_identity=8, heldout_identities=10, pairs=40, size=32)


@pytest.fixture(scope="module")
def rec_data(tmp_path_factory):
    return D.generate_dataset(tmp_path_factory.mktemp("rec"), fmt="rec", seed=0, **SMALL)


def small_cfg(data: dict, out, **kw) -> TrainConfig:
    base = dict(data=data["train"], val=data["val"], out=str(out), backbone="mobilefacenet", width=0.25,
                embedding_size=64, input_size=32, epochs=1, batch_size=16, workers=0, s=32.0, progress=False,
                tensorboard=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})


# --- data formats ----------------------------------------------------------------------------------------
def test_recordio_round_trip(tmp_path):
    payloads = [os.urandom(n) for n in (0, 1, 5, 1000)]
    with recordio.RecordWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        w.write(0, recordio.pack((5.0, 9.0), b""))
        for k, p in enumerate(payloads, 1):
            w.write(k, recordio.pack(float(k * 3), p))
    r = recordio.RecordReader(tmp_path / "a.rec", tmp_path / "a.idx")
    assert recordio.unpack(r.read(0)) == ((5.0, 9.0), b"")
    for k, p in enumerate(payloads, 1):
        assert recordio.unpack(r.read(k)) == (float(k * 3), p)
    assert sorted(r.keys) == [0, 1, 2, 3, 4]


def test_generated_rec_and_folder_hold_the_same_identities(rec_data, tmp_path):
    folder = D.generate_dataset(tmp_path, fmt="folder", seed=0, **SMALL)
    a = D.open_dataset(rec_data["train"], size=32, train=False)
    b = D.open_dataset(folder["train"], size=32, train=False)
    assert len(a) == len(b) == 96 and a.num_classes == b.num_classes == 12
    assert a.labels == b.labels
    img, label, index = a[17]
    assert img.shape == (3, 32, 32) and -1 <= img.min() and img.max() <= 1 and index == 17
    assert torch.equal(img, b[17][0])  # same generator, same pixels, either format
    aug = D.open_dataset(rec_data["train"], size=32, train=True, seed=3)
    assert torch.equal(aug[5][0], aug[5][0])  # augmentation is a function of (seed, epoch, index)
    epoch0 = [aug[i][0] for i in range(10)]
    aug.set_epoch(1)
    assert any(not torch.equal(a, aug[i][0]) for i, a in enumerate(epoch0))  # a new epoch, new augmentation


def test_bad_data_files_give_clear_errors(rec_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.rec"):
        D.open_dataset(tmp_path / "missing.rec")
    rec = Path(rec_data["train"])
    shutil.copy(rec, tmp_path / "t.rec")
    with pytest.raises(FileNotFoundError, match="t.idx"):
        D.open_dataset(tmp_path / "t.rec")
    (tmp_path / "t.idx").write_text("0\t0\n1\t999999999\n")
    with pytest.raises(ValueError, match="outside"):
        D.open_dataset(tmp_path / "t.rec")
    raw = bytearray(rec.read_bytes())
    raw[0:4] = b"\0\0\0\0"
    (tmp_path / "c.rec").write_bytes(bytes(raw))
    shutil.copy(rec.with_suffix(".idx"), tmp_path / "c.idx")
    with pytest.raises(ValueError, match="bad magic"):
        D.open_dataset(tmp_path / "c.rec")
    root = tmp_path / "folders"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "0.png").write_bytes(D.encode_png(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(ValueError, match="identity folder .*b has no images"):
        D.ImageFolderDataset(root)
    (root / "b" / "0.png").write_bytes(b"not a png")
    (root / "b" / "1.png").write_bytes(D.encode_png(np.zeros((8, 8, 3), np.uint8)))
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = D.ImageFolderDataset(root)
    assert len(ds) == 2 and ds.skipped[0].endswith("0.png")


# --- evaluation ------------------------------------------------------------------------------------------
def test_kfold_accuracy_and_tar_on_constructed_pairs():
    n = 400  # 200 genuine at 0.9 except 10 at 0.1; 200 impostors at 0.2: any threshold in (0.2, 0.9] is best
    issame = np.arange(n) % 2 == 0
    scores = np.where(issame, 0.9, 0.2)
    scores[np.flatnonzero(issame)[:10]] = 0.1
    acc, std, ths = E.kfold_accuracy(scores, issame)
    assert acc == pytest.approx(1 - 10 / n) and all(0.2 < t <= 0.9 for t in ths)
    assert E.tar_at_far(scores, issame, 1e-3) == pytest.approx(190 / 200)
    perfect = np.where(issame, 0.7, 0.3)
    assert E.kfold_accuracy(perfect, issame)[0] == 1.0
    far, tar = E.roc(perfect, issame)
    assert far[0] == 0 and tar[-1] == 1 and np.all(np.diff(far) >= 0)


def test_kfold_picks_each_threshold_on_the_other_folds():
    """LFW's protocol: fold k's threshold is the best on the nine other folds, never on fold k itself. Each fold
    here is separable at its own threshold (0.5 + k/40), so a threshold chosen with the test fold in view would
    fit it perfectly; the protocol's cannot, and it must equal a brute-force best over the other folds."""
    rng = np.random.default_rng(0)
    n, folds = 400, 10
    issame = rng.random(n) < 0.5
    level = 0.5 + np.repeat(np.arange(folds), n // folds) / 40  # contiguous folds, as insightface's KFold
    scores = np.where(issame, level + rng.uniform(0.01, 0.3, n), level - rng.uniform(0.01, 0.3, n))
    acc, _, ths = E.kfold_accuracy(scores, issame, folds)
    for k, chunk in enumerate(np.array_split(np.arange(n), folds)):
        train = np.ones(n, dtype=bool)
        train[chunk] = False
        cand = np.unique(scores[train])
        best = cand[int(np.argmax([((scores[train] >= t) == issame[train]).mean() for t in cand]))]
        assert ths[k] == pytest.approx(best), k
    assert acc < 1.0  # the folds' own thresholds would have been perfect


def test_bin_loader_reads_sets_and_refuses_malicious_pickles(rec_data, tmp_path):
    images, issame = E.load_bin(rec_data["val"], 32)
    assert images.shape == (80, 3, 32, 32) and issame.shape == (40,) and issame.sum() == 20
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([Evil()], [True])))
    with pytest.raises(ValueError, match="refusing to load"):
        E.load_bin(tmp_path / "evil.bin")
    assert not marker.exists()
    (tmp_path / "trunc.bin").write_bytes(Path(rec_data["val"]).read_bytes()[:100])
    with pytest.raises(ValueError, match="trunc.bin"):
        E.load_bin(tmp_path / "trunc.bin")
    (tmp_path / "odd.bin").write_bytes(pickle.dumps(([b"x"], [True])))
    with pytest.raises(ValueError, match="need 2 per pair"):
        E.load_bin(tmp_path / "odd.bin")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        E.load_bin(tmp_path / "nope.bin")


# --- training --------------------------------------------------------------------------------------------
def test_end_to_end_teacher_student_and_eval(rec_data, tmp_path, capsys):
    teacher = train(small_cfg(rec_data, tmp_path / "t", epochs=2))
    assert Path(teacher["checkpoint"]).is_file() and 0 <= teacher["metrics"]["accuracy"] <= 1
    log = (tmp_path / "t" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,epoch,loss,train_acc,lr,images_per_s")
    for method in ("margindistill", "proxyless", "angular", "triplet", "hinton"):
        res = train(small_cfg(rec_data, tmp_path / method, method=method, teacher=teacher["checkpoint"]))
        assert np.isfinite(res["metrics"]["accuracy"]), method
    assert len(list((tmp_path / "t" / "teacher_cache").glob("teacher_*.npy"))) == 1  # computed once, shared
    assert mdk(["eval", teacher["checkpoint"], rec_data["val"]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 <= out["accuracy"] <= 1.0 and "tar@far=1e-3" in out
    folder = D.generate_dataset(tmp_path / "f", fmt="folder", seed=1, **SMALL)
    assert mdk(["eval", teacher["checkpoint"], folder["train"], "--max-pairs", "60"]) == 0
    ckpt = load_checkpoint(teacher["checkpoint"])  # weights_only=True
    assert ckpt["config"]["method"] == "arcface" and ckpt["head"]["head.weight"].shape == (12, 64)
    with pytest.raises(ValueError, match="needs --teacher"):
        train(small_cfg(rec_data, tmp_path / "x", method="hinton"))


def _cli_train(args, env=None):
    cmd = [sys.executable, "-m", "mdkernels.cli", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def test_resume_after_a_kill_matches_an_uninterrupted_run(rec_data, tmp_path):
    args = ["--data", rec_data["train"], "--backbone", "mobilefacenet", "--width", "0.25", "--embedding-size", "64",
            "--input-size", "32", "--epochs", "2", "--batch-size", "16", "--workers", "1", "--s", "32",
            "--no-progress", "--no-tensorboard", "--save-every", "4"]  # fmt: skip
    full = _cli_train([*args, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _cli_train([*args, "--out", str(tmp_path / "cut")], env={"MDK_KILL_AT_STEP": "8"})
    assert killed.returncode == 137  # died hard, mid-epoch 2 (6 steps per epoch)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 8
    resumed = _cli_train(["--out", str(tmp_path / "cut"), "--resume", "--workers", "0", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    assert a["step"] == b["step"] == 12
    for k, v in a["backbone"].items():
        assert torch.equal(v, b["backbone"][k]), k
    assert torch.equal(a["head"]["head.weight"], b["head"]["head.weight"])


def test_fused_center_update_trains_and_resumes_exactly_both_ways(rec_data, tmp_path):
    """`mdk train` fuses the centers' step by default (one process, SGD); the torch backend's fused update is
    torch.optim's operations on the same chunks of the same gradient, so a fused run equals an unfused one bit for
    bit, and a run killed on one path resumes on the other to the same bits."""
    args = ["--data", rec_data["train"], "--backbone", "mobilefacenet", "--width", "0.25", "--embedding-size", "64",
            "--input-size", "32", "--epochs", "2", "--batch-size", "16", "--workers", "0", "--s", "32",
            "--momentum", "0.9", "--no-progress", "--no-tensorboard", "--save-every", "4"]  # fmt: skip
    runs = {}
    for name, extra in (("fused", []), ("plain", ["--no-fused-center-update"])):
        r = _cli_train([*args, *extra, "--out", str(tmp_path / name)])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = load_checkpoint(tmp_path / name / "last.pt")
    a, b = runs["fused"], runs["plain"]
    assert (a["center_update"], b["center_update"]) == ("fused", "optimizer.step")
    assert torch.equal(a["head"]["head.weight"], b["head"]["head.weight"])
    assert all(torch.equal(v, b["backbone"][k]) for k, v in a["backbone"].items())
    state = a["optimizer"]["state"]
    assert any("momentum_buffer" in s for s in state.values())  # the centers' buffer is in the fused checkpoint
    for first, then in (([], ["--no-fused-center-update"]), (["--no-fused-center-update"], ["--fused-center-update"])):
        out = tmp_path / f"cut{len(first)}"
        killed = _cli_train([*args, *first, "--out", str(out)], env={"MDK_KILL_AT_STEP": "8"})
        assert killed.returncode == 137
        resumed = _cli_train(["--out", str(out), "--resume", "--no-progress", *then])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        c = load_checkpoint(out / "last.pt")
        assert c["center_update"] == ("fused" if then == ["--fused-center-update"] else "optimizer.step")
        assert c["step"] == a["step"] == 12
        assert torch.equal(c["head"]["head.weight"], a["head"]["head.weight"]), (first, then)
        assert all(torch.equal(v, a["backbone"][k]) for k, v in c["backbone"].items())


def _limited_file_size(limit):
    """preexec_fn: a child whose files cannot grow past ``limit`` bytes (a full disk, as write() sees it)."""
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_checkpoint_faults_lose_nothing(rec_data, tmp_path):
    """A kill inside a checkpoint write, a full disk during one and a corrupt last.pt: the run stops (with
    one line where it can print), and every checkpoint the user had stays loadable."""
    out = tmp_path / "run"
    args = ["--data", rec_data["train"], "--backbone", "mobilefacenet", "--width", "0.25", "--embedding-size", "64",
            "--input-size", "32", "--epochs", "2", "--batch-size", "16", "--workers", "0", "--s", "32",
            "--no-progress", "--no-tensorboard", "--save-every", "2", "--out", str(out)]  # fmt: skip
    first = _cli_train([*args, "--max-steps", "4"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert load_checkpoint(out / "last.pt")["step"] == 4 and load_checkpoint(out / "last.prev.pt")["step"] == 2
    saved = (out / "last.pt").read_bytes()
    # killed inside the checkpoint write (the data on disk, not yet renamed): step 6 never replaces step 4
    resume = ["--out", str(out), "--resume", "--no-progress"]
    killed = _cli_train([*resume, "--max-steps", "8"], env={"MDK_KILL_IN_SAVE_AT_STEP": "6"})
    assert killed.returncode == 137 and (out / "last.pt").read_bytes() == saved
    assert list(out.glob(".last.pt.tmp*"))  # the half-done write, never renamed
    cmd = [sys.executable, "-m", "mdkernels.cli", "train", "--out", str(out), "--resume", "--max-steps", "8",
           "--no-progress"]  # fmt: skip
    full = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          preexec_fn=_limited_file_size(len(saved) // 2))  # fmt: skip
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert "could not write the checkpoint" in full.stderr and "File too large" in full.stderr
    assert (out / "last.pt").read_bytes() == saved  # untouched
    assert len(list(out.glob(".last.pt*tmp*"))) == 1  # its own partial write removed; the killed one's stays
    (out / "last.pt").write_bytes(saved[: len(saved) // 3])  # a corrupt last.pt
    corrupt = _cli_train(["--out", str(out), "--resume", "--no-progress"])
    assert corrupt.returncode == 2 and "Traceback" not in corrupt.stderr
    line = corrupt.stderr.strip().splitlines()[-1]
    assert "last.pt" in line and "last.prev.pt is intact" in line
    assert load_checkpoint(out / "last.prev.pt")["step"] == 2  # the previous checkpoint is still usable
    shutil.copyfile(out / "last.prev.pt", out / "last.pt")
    again = _cli_train([*resume, "--max-steps", "6"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert load_checkpoint(out / "last.pt")["step"] == 6
    assert not list(out.glob(".last.pt*tmp*"))  # a successful write removes the killed run's temporary


@pytest.mark.parametrize("sharded", [False, True])
def test_ddp_with_two_gloo_processes(rec_data, tmp_path, sharded):
    out = tmp_path / "ddp"
    init = []
    if sharded:  # the head starts from mdk reshard's files, each rank reading its own (lr 0: they stay)
        from mdkernels.interop.insightface import write_mdk_shards

        centers = torch.randn(12, 64, generator=torch.Generator().manual_seed(5))
        write_mdk_shards(centers, tmp_path / "shards", 2)
        init = ["--sharded", "--init-centers", str(tmp_path / "shards"), "--lr", "0", "--weight-decay", "0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mdkernels.cli",
           "train", "--data", rec_data["train"], "--out", str(out), "--backbone", "mobilefacenet", "--width", "0.25",
           "--embedding-size", "64", "--input-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0",
           "--no-progress", "--no-tensorboard", *init]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 6  # 96 images / (2 ranks x 8)
    assert ckpt["head"]["head.weight"].shape == (12, 64)  # the full matrix, gathered from the shards
    assert (out / "last.rank1.pt").is_file() == sharded
    if sharded:
        assert torch.equal(ckpt["head"]["head.weight"], centers)


def test_sharded_fused_center_update_resumes_exactly_both_ways(rec_data, tmp_path):
    """`mdk train --sharded` under torchrun fuses each rank's shard update by default: the same bits as
    --no-fused-center-update, and a run stopped on the fused path resumes unfused to the same bits."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mdkernels.cli",
            "train", "--data", rec_data["train"], "--backbone", "mobilefacenet", "--width", "0.25", "--embedding-size",
            "64", "--input-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress",
            "--no-tensorboard", "--sharded", "--momentum", "0.9"]  # fmt: skip

    def run(*args):
        res = subprocess.run([*base, *args], capture_output=True, text=True, timeout=600, env=env)
        assert res.returncode == 0, res.stderr[-4000:]

    run("--out", str(tmp_path / "fused"))
    run("--out", str(tmp_path / "plain"), "--no-fused-center-update")
    run("--out", str(tmp_path / "cut"), "--max-steps", "3")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "mdkernels.cli", "train", "--out", str(tmp_path / "cut"), "--resume", "--max-steps", "0",
                          "--no-fused-center-update", "--no-progress"], capture_output=True, text=True, timeout=600,
                         env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    ckpts = {name: load_checkpoint(tmp_path / name / "last.pt") for name in ("fused", "plain", "cut")}
    assert ckpts["fused"]["center_update"] == "fused" and ckpts["plain"]["center_update"] == "optimizer.step"
    assert ckpts["cut"]["center_update"] == "optimizer.step"
    for name in ("plain", "cut"):
        assert ckpts[name]["step"] == ckpts["fused"]["step"] == 6
        assert torch.equal(ckpts[name]["head"]["head.weight"], ckpts["fused"]["head"]["head.weight"]), name
        for key, value in ckpts["fused"]["backbone"].items():
            assert torch.equal(value, ckpts[name]["backbone"][key]), (name, key)


# --- regressions from review ---------------------------------------------------------------------------
def test_recordio_splits_payloads_holding_the_magic_word_as_dmlc_does(tmp_path):
    magic = recordio._MAGIC_BYTES
    payloads = [magic + b"abcd" + magic, b"xy" + magic + b"zzzz" + magic + b"!", b"1234" + magic]
    with recordio.RecordWriter(tmp_path / "m.rec", tmp_path / "m.idx") as w:
        for k, p in enumerate(payloads):
            w.write(k, p)
    raw = (tmp_path / "m.rec").read_bytes()
    assert raw.count(magic) > len(payloads)  # parts were written, flagged as continuations
    r = recordio.RecordReader(tmp_path / "m.rec", tmp_path / "m.idx")
    assert [r.read(k) for k in range(3)] == payloads


def test_tied_scores_give_no_optimistic_tar():
    issame = np.arange(600) % 2 == 0
    assert E.tar_at_far(np.zeros(600), issame, 1e-3) == 0.0  # a constant model accepts all or nothing
    far, tar = E.roc(np.zeros(600), issame)
    assert far.tolist() == [0.0, 1.0] and tar.tolist() == [0.0, 1.0]


def test_bin_loader_refuses_non_data_opcodes(tmp_path):
    (tmp_path / "ext.bin").write_bytes(b"\x80\x02\x82\x01.")  # EXT1: the copyreg extension registry
    with pytest.raises(ValueError, match="refusing to load a pickle using EXT1"):
        E.load_bin(tmp_path / "ext.bin")
    (tmp_path / "build.bin").write_bytes(b"\x80\x02]q\x00]q\x01b.")  # BUILD on a list, with a list as state
    with pytest.raises(ValueError, match="BUILD"):
        E.load_bin(tmp_path / "build.bin")


@pytest.mark.parametrize("method", ["arcface", "margindistill"])
def test_a_training_step_makes_no_host_sync_outside_logging(rec_data, tmp_path, monkeypatch, method):
    """The loop on the GPU's path (value checks deferred): host syncs, host-made tensors and waits happen only at
    the logging steps (every 10th and an epoch's last), at checkpoints and at the end, never in the other steps
    (the teacher rows come with the batch: no read of the batch's indices)."""
    from test_sync_free import HostSyncs

    from mdkernels import _validate
    from mdkernels.train import trainer

    teacher = None
    if method == "margindistill":
        teacher = train(small_cfg(rec_data, tmp_path / "t", max_steps=2))["checkpoint"]
    monkeypatch.setattr(_validate, "DEFER_ON_CPU", True)
    real, steps = trainer.MethodLoss.forward, {"n": 0}
    by_step: dict[int, list[str]] = {}
    with HostSyncs(reads_from_step_only=True) as counter:
        seen = 0

        def tag():  # the calls since the last forward belong to that step (its backward, update, logging)
            nonlocal seen
            for call in counter.calls[seen:]:
                by_step.setdefault(steps["n"], []).append(call)
            seen = len(counter.calls)

        def counted(self, *a, **k):
            tag()
            steps["n"] += 1
            return real(self, *a, **k)

        monkeypatch.setattr(trainer.MethodLoss, "forward", counted)
        res = train(small_cfg(rec_data, tmp_path / method, max_steps=14, epochs=4, method=method, teacher=teacher,
                              eval_every=0))  # fmt: skip
        tag()
    per_epoch = len(rec_data["labels"]) // 16 if "labels" in rec_data else 6  # steps of an epoch at batch 16
    loud = {s for s in range(1, 15) if s % 10 == 0 or s % per_epoch == 0} | {14}  # logging, checkpoints, the end
    noisy = {s: calls for s, calls in by_step.items() if s and s not in loud and calls}  # 0: the setup, no step
    assert res["step"] == 14 and not noisy, noisy
    assert any(by_step.get(s) for s in loud), "the counter saw not even the logging steps' reads"
    _validate._PENDING.clear()


def test_non_finite_loss_keeps_the_last_good_checkpoint(rec_data, tmp_path, monkeypatch):
    from mdkernels.train import trainer

    real, calls = trainer.MethodLoss.forward, {"n": 0}

    def poisoned(self, emb, labels, teacher_rows=None):
        calls["n"] += 1
        loss = real(self, emb, labels, teacher_rows)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer.MethodLoss, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite at step 3 .*nothing after step 2 was saved"):
        train(small_cfg(rec_data, tmp_path / "nan", save_every=2))
    ckpt = load_checkpoint(tmp_path / "nan" / "last.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["backbone"].values() if v.is_floating_point())


def test_trainer_edge_cases(rec_data, tmp_path):
    teacher = train(small_cfg(rec_data, tmp_path / "t", val=None))
    # ProxylessKD with a student of another width: the projection is used for monitoring too
    train(small_cfg(rec_data, tmp_path / "p", method="proxyless", teacher=teacher["checkpoint"], embedding_size=32,
                    val=None))  # fmt: skip
    # another data set of the same shape must not reuse the teacher cache
    other = D.generate_dataset(tmp_path / "other", fmt="rec", seed=5, **SMALL)
    train(small_cfg(other, tmp_path / "p2", method="angular", teacher=teacher["checkpoint"], val=None))
    assert len(list((tmp_path / "t" / "teacher_cache").glob("teacher_*.npy"))) == 2
    # resuming with max_steps already reached trains nothing more
    train(small_cfg(rec_data, tmp_path / "m", max_steps=3, val=None))
    again = train(small_cfg(rec_data, tmp_path / "m", max_steps=3, val=None), resume=True)
    assert again["step"] == 3 and load_checkpoint(tmp_path / "m" / "last.pt")["step"] == 3
    # a resume refuses explicit settings that would change the run, and takes those that may change
    changed = small_cfg(rec_data, tmp_path / "m", max_steps=3, val=None, lr=0.5, s=16.0)
    with pytest.raises(ValueError, match=r"--lr 0.5 \(saved 0.1\), --s 16.0 \(saved 32.0\)\. Drop them"):
        train(changed, resume=True, overrides={"lr", "s", "max_steps"})
    moved = train(small_cfg(rec_data, tmp_path / "m", max_steps=3, val=None, save_every=7, lr=0.5), resume=True,
                  overrides={"save_every", "max_steps"})  # fmt: skip
    assert moved["step"] == 3 and load_checkpoint(tmp_path / "m" / "last.pt")["config"]["lr"] == 0.1
    # evaluations go to eval.csv; log.csv keeps one header
    train(small_cfg(rec_data, tmp_path / "e", epochs=2, eval_every=1))
    import csv

    with open(tmp_path / "e" / "log.csv") as f:
        assert all(None not in row and row["loss"] for row in csv.DictReader(f))
    with open(tmp_path / "e" / "eval.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]


def test_cli_margin_aliases_for_torchrun(rec_data, tmp_path):
    from mdkernels.cli import build_parser

    args = build_parser().parse_args(["train", "--data", "x", "--scale", "30", "--margin", "0.4"])
    assert args.s == 30.0 and args.m == 0.4


def test_record_labels_are_read_from_headers_only(rec_data):
    ds = D.open_dataset(rec_data["train"], size=32)
    full = [int(recordio.unpack(ds.reader.read(k))[0]) for k in ds.keys]
    assert ds.labels == full == [ds.reader.read_label(k) for k in ds.keys]
    assert recordio.unpack(ds.reader.read(0))[0] == ds.reader.read_label(0)


FAMILY_FLAGS = {
    "adaface": ["--h", "0.5", "--t-alpha", "0.1", "--margin-grad", "straight_through"],
    "curricularface": ["--curricular-momentum", "0.1"],
    "magface": ["--l-a", "1", "--u-a", "50", "--lambda-g", "20", "--no-easy-margin"],
    "elasticface": ["--elastic", "cos", "--elastic-std", "0.02", "--elastic-plus", "--plus-order", "official"],
    "subcenter": ["--subcenters", "2"],
}


@pytest.mark.parametrize("method", list(FAMILY_FLAGS))
def test_margin_family_methods_train_from_the_cli(rec_data, tmp_path, capsys, method):
    out = tmp_path / method
    common = ["--data", rec_data["train"], "--out", str(out), "--backbone", "mobilefacenet", "--width", "0.25",
              "--embedding-size", "64", "--input-size", "32", "--batch-size", "16", "--workers", "0",
              "--scale", "32", "--no-progress", "--no-tensorboard", "--max-steps", "3"]  # fmt: skip
    assert mdk(["train", *common, "--method", method, *FAMILY_FLAGS[method]]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["step"])
    ckpt = load_checkpoint(out / "last.pt")
    cfg = ckpt["config"]
    head = {k[len("head."):]: v for k, v in ckpt["loss"].items() if k.startswith("head.")}
    if method == "adaface":
        assert cfg["h"] == 0.5 and cfg["t_alpha"] == 0.1 and cfg["margin_grad"] == "straight_through"
        assert float(head["batch_mean"]) != 20.0 and float(head["batch_std"]) != 100.0  # the EMA ran
    if method == "curricularface":
        assert float(head["t"]) != 0.0
    if method == "magface":
        assert cfg["u_a"] == 50.0 and cfg["easy_margin"] is False
    if method == "elasticface":
        assert cfg["elastic"] == "cos" and cfg["plus_order"] == "official"
    if method == "subcenter":
        assert head["weight"].shape == (24, 64) and ckpt["head"]["subcenters"] == 2
        # distilling from a sub-center teacher: each class's dominant sub-center, found in the teacher pass
        from mdkernels.train.methods import teacher_data

        t = teacher_data(str(out / "last.pt"), rec_data["train"], tmp_path / "cache", torch.device("cpu"))
        rows = head["weight"].view(12, 2, 64)
        assert t["centers"].shape == (12, 64)
        assert all(any(torch.equal(t["centers"][c], rows[c, k]) for k in range(2)) for c in range(12))
        res = train(small_cfg(rec_data, tmp_path / "student", method="margindistill", teacher=str(out / "last.pt"),
                              max_steps=2, val=None))  # fmt: skip
        assert res["step"] == 2


def test_margin_family_bad_flags_are_errors(rec_data, tmp_path):
    with pytest.raises(ValueError, match="--elastic must be"):
        train(small_cfg(rec_data, tmp_path / "e", method="elasticface", elastic="sphere", max_steps=1))
    with pytest.raises(ValueError, match="h must be in"):
        train(small_cfg(rec_data, tmp_path / "a", method="adaface", h=-1.0, max_steps=1))
    from mdkernels.train.config import FAMILY

    for method in FAMILY:  # docs/which-loss.md: the margin family is not sharded yet, and says so
        with pytest.raises(ValueError, match=f"--sharded covers .* not --method {method}"):
            train(small_cfg(rec_data, tmp_path / method, method=method, sharded=True, max_steps=1))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_equal_one_node_bit_for_bit(rec_data, tmp_path):
    """A sharded MarginDistillation student trained by two torchrun launches (--nnodes 2, one process each, on
    loopback) ends with the very weights of one launch of two processes: the ranks, the shards and the
    sharded loss (its host handshake, its device-side checks, no host sync) do not depend on how the processes
    were started."""
    teacher = train(small_cfg(rec_data, tmp_path / "t", val=None, max_steps=2))["checkpoint"]
    train_args = ["-m", "mdkernels.cli", "train", "--data", rec_data["train"], "--method", "margindistill", "--teacher",
                  teacher, "--sharded", "--backbone", "mobilefacenet", "--width", "0.25", "--embedding-size", "64",
                  "--input-size", "32", "--epochs", "1", "--batch-size", "8", "--max-steps", "3", "--workers", "0",
                  "--no-progress", "--no-tensorboard", "--seed", "3"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run"]
    one = subprocess.run([*run, "--standalone", "--nproc_per_node=2", *train_args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert one.returncode == 0, one.stderr[-4000:]
    port = _free_port()
    nodes = [subprocess.Popen([*run, "--nnodes=2", f"--node_rank={r}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                               f"--master_port={port}", *train_args, "--out", str(tmp_path / "two")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(2)]  # fmt: skip
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-4000:]
    a, b = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    assert a["step"] == b["step"] == 3
    for part in ("backbone", "loss"):
        assert a[part].keys() == b[part].keys()
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"
    assert torch.equal(a["head"]["head.weight"], b["head"]["head.weight"])


def test_adadistill_trains_alone_and_sharded(rec_data, tmp_path):
    """--method adadistill: the student's centers move toward the cached teacher embeddings (they are a buffer,
    saved with the run); with --sharded under torchrun every rank's shard comes from the global batch, and the
    gathered centers equal one process's run."""
    teacher = train(small_cfg(rec_data, tmp_path / "t", val=None, max_steps=2))["checkpoint"]
    one = train(small_cfg(rec_data, tmp_path / "one", method="adadistill", teacher=teacher, val=None, max_steps=3,
                          batch_size=16))  # fmt: skip
    ckpt = load_checkpoint(one["checkpoint"])
    assert ckpt["head"]["head.weight"].shape == (12, 64) and "head.weight" in ckpt["loss"]
    assert ckpt["head"]["head.weight"].std() > 0.011  # moved from N(0, 0.01) toward unit-norm teacher rows
    with pytest.raises(ValueError, match="--sharded covers .* not --method hinton"):
        train(small_cfg(rec_data, tmp_path / "h", method="hinton", teacher=teacher, sharded=True, max_steps=1))
    args = ["-m", "mdkernels.cli", "train", "--data", rec_data["train"], "--method", "adadistill", "--teacher", teacher,
            "--backbone", "mobilefacenet", "--width", "0.25", "--embedding-size", "64", "--input-size", "32",
            "--epochs", "1", "--batch-size", "8", "--max-steps", "2", "--workers", "0", "--no-progress",
            "--no-tensorboard", "--scale", "32"]  # fmt: skip
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, extra in (("replicated", []), ("sharded", ["--sharded"])):
        res = subprocess.run([*run, *args, *extra, "--out", str(tmp_path / name)], capture_output=True, text=True,
                             timeout=600, env=env)  # fmt: skip
        assert res.returncode == 0, res.stderr[-4000:]
    a, b = (load_checkpoint(tmp_path / n / "last.pt") for n in ("replicated", "sharded"))
    assert (tmp_path / "sharded" / "last.rank1.pt").is_file()
    torch.testing.assert_close(a["head"]["head.weight"], b["head"]["head.weight"], rtol=1e-5, atol=1e-6)
    # The backbones' updates agree (not the weights to a fixed tolerance: two SGD steps of a tiny net whose BN sees
    # 8 rows amplify the summation order of the sharded loss's all-reduce differently on every CPU). The bound: an
    # Intel Xeon measured 1.5e-3 of the update (under 1e-3 before the fused ops' dots became element-wise sums,
    # another order); a wrong shard or scale moves it far more (test_distributed checks those exactly)
    torch.manual_seed(0)
    init = build_backbone("mobilefacenet", width=0.25, embedding_size=64, input_size=32).state_dict()
    assert a["backbone"].keys() == b["backbone"].keys() == init.keys()
    moved = {k: (a["backbone"][k].double() - v.double(), b["backbone"][k].double() - v.double())
             for k, v in init.items() if v.is_floating_point() and "running_" not in k}  # the learned tensors
    total = sum(float(da.norm() ** 2) for da, _ in moved.values()) ** 0.5
    apart = sum(float((da - db).norm() ** 2) for da, db in moved.values()) ** 0.5
    assert total > 1e-3 and apart <= 5e-3 * total, (apart, total)
    for key, (da, db) in moved.items():
        assert float((da - db).norm()) <= 1e-2 * float(da.norm()) + 1e-4 * total, key


def test_progress_in_a_log_is_plain_lines(rec_data, tmp_path, capsys):
    """Off a terminal (a log file, a pipe, CI) progress is plain lines with the bar's figures: no \\r frames."""
    train(small_cfg(rec_data, tmp_path / "p", val=None, progress=True))  # one epoch: the last line has the loss
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("arcface: ")]
    assert lines and re.match(r"arcface: \d+/\d+ step \(\d+%, [\d.]+ step/s, loss [\d.]+, acc [\d.]+", lines[-1]), err
