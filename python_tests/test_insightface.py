"""insightface interop: backbones identical to arcface_torch's, its run directories (3 ranks, odd C, every
shard layout), re-splitting, its config files, its preprocessing, and ONNX export checked in onnxruntime.
Every file is made here, in insightface's formats."""

from __future__ import annotations

import io
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
from conftest import mdk_process
from insightface_nets import get_model, randomize

from mdkernels.data import datasets as D
from mdkernels.distributed import shard_range
from mdkernels.eval import verification as E
from mdkernels.interop import insightface as I
from mdkernels.interop.insightface_config import load_insightface_config, parse_config, to_train_config
from mdkernels.models.backbones import INSIGHTFACE_NETWORKS, build_backbone
from mdkernels.train import teacher
from mdkernels.train.config import TrainConfig

C, R, EMB = 23, 3, 16  # an odd class count over 3 ranks: shards of 8, 8, 7


# ---- backbones ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("net", INSIGHTFACE_NETWORKS)
def test_state_dict_keys_and_shapes_are_insightfaces(net):
    with torch.device("meta"):
        theirs, mine = get_model(net, 512).state_dict(), build_backbone(net, embedding_size=512).state_dict()
    assert list(mine) == list(theirs)  # same names in the same order
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("net,prefix", [("r18", "module."), ("mbf", ""), ("mbf_large", "module.")])
def test_insightface_checkpoint_loads_strict_and_embeds_the_same(tmp_path, net, prefix):
    theirs = randomize(get_model(net, EMB), seed=1)
    torch.save({prefix + k: v for k, v in theirs.state_dict().items()}, tmp_path / "model.pt")
    mine = I.load_backbone(tmp_path / "model.pt", net)
    assert not mine.training and mine.embedding_size == EMB
    x = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = mine(x), theirs(x)
    assert torch.isfinite(b).all() and b.abs().max() > 1e-3
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_wrong_network_is_named(tmp_path):
    torch.save(randomize(get_model("mbf", EMB)).state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="not an insightface 'r18' backbone"):
        I.load_backbone(tmp_path / "model.pt", "r18")
    with pytest.raises(ValueError, match="network must be one of"):
        I.load_backbone(tmp_path / "model.pt", "vit_t")


# ---- run directories -----------------------------------------------------------------------------------------
def _centers(c=C, d=EMB, seed=3):
    return torch.randn(c, d, generator=torch.Generator().manual_seed(seed))


def write_run(run, layout, centers=None, world=R, net="mbf", with_optimizer=False):
    """An arcface_torch run directory: model.pt plus one center shard per rank in ``layout``."""
    run.mkdir(parents=True, exist_ok=True)
    centers = _centers() if centers is None else centers
    torch.save(randomize(get_model(net, centers.shape[1]), seed=2).state_dict(), run / "model.pt")
    for r in range(world):
        start, n = shard_range(centers.shape[0], r, world)
        w = centers[start : start + n].clone()
        if layout == "checkpoint_gpu":
            st = {"epoch": 4, "global_step": 1234, "state_dict_backbone": {}, "state_lr_scheduler": {"last_epoch": 7},
                  "state_dict_softmax_fc": {"weight": w}}  # fmt: skip
            if with_optimizer:
                st["state_optimizer"] = {"state": {0: {"momentum_buffer": w * 0.1 + r}},
                                         "param_groups": [{"lr": 0.1, "params": [0]}]}  # fmt: skip
            torch.save(st, run / f"checkpoint_gpu_{r}.pt")
        elif layout == "softmax_fc_gpu":
            torch.save({"weight": w}, run / f"softmax_fc_gpu_{r}.pt")
        else:
            torch.save(w, run / f"rank_{r}_softmax_weight.pt")
    return centers


LAYOUTS = ["checkpoint_gpu", "softmax_fc_gpu", "rank_softmax_weight"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_centers_reassemble_from_every_layout(tmp_path, layout):
    full = write_run(tmp_path / "run", layout)
    got, found, world = I.load_centers(tmp_path / "run", C, with_layout=True)
    pattern = {"checkpoint_gpu": "checkpoint_gpu_{rank}.pt", "softmax_fc_gpu": "softmax_fc_gpu_{rank}.pt",
               "rank_softmax_weight": "rank_{rank}_softmax_weight.pt"}[layout]  # fmt: skip
    assert torch.equal(got, full) and world == R and found == pattern


def test_split_is_insightfaces_formula():
    # num_local(r) = C//R + (r < C%R), class_start(r) = (C//R) r + min(r, C%R), by hand for C=23, R=3
    assert [shard_range(23, r, 3) for r in range(3)] == [(0, 8), (8, 8), (16, 7)]
    assert [shard_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 3), (6, 2), (8, 2)]


def test_run_errors_name_the_fault(tmp_path):
    write_run(tmp_path / "gap", "softmax_fc_gpu")
    (tmp_path / "gap" / "softmax_fc_gpu_1.pt").unlink()
    with pytest.raises(FileNotFoundError, match="missing softmax_fc_gpu_1.pt"):
        I.load_centers(tmp_path / "gap")
    write_run(tmp_path / "sum", "rank_softmax_weight")
    with pytest.raises(ValueError, match="hold 23 classes, not num_classes=24"):
        I.load_centers(tmp_path / "sum", 24)
    run = tmp_path / "size"
    write_run(run, "rank_softmax_weight")
    w = _centers()
    torch.save(w[:7], run / "rank_0_softmax_weight.pt")  # 7, 8, 8 instead of 8, 8, 7 (sum still 23)
    torch.save(w[7:15], run / "rank_1_softmax_weight.pt")
    torch.save(w[15:], run / "rank_2_softmax_weight.pt")
    with pytest.raises(ValueError, match="rank 0 holds 7 classes, but insightface's split of C=23 over 3 ranks gives "
                       "it 8"):  # fmt: skip
        I.load_centers(run)
    with pytest.raises(ValueError, match="the centers are 16-d but the backbone's embedding is 32-d"):
        I.load_centers(tmp_path / "sum", embedding_size=32)
    torch.save(randomize(get_model("mbf", 32)).state_dict(), tmp_path / "sum" / "model.pt")  # D 32 vs centers 16
    with pytest.raises(ValueError, match="16-d but the backbone's embedding is 32-d"):
        teacher.import_run(tmp_path / "sum", "mbf", tmp_path / "t.pt")
    with pytest.raises(FileNotFoundError, match="no Partial FC center shards"):
        I.load_centers(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "rank_0_softmax_weight.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot be read as a torch file"):
        I.load_centers(tmp_path / "bad")


def test_round_trip_is_bit_identical(tmp_path):
    full = write_run(tmp_path / "run", "checkpoint_gpu", with_optimizer=True)
    a = I.load_full_centers(tmp_path / "run")
    I.write_mdk_shards(a, tmp_path / "mdk4", 4)
    for r in range(4):  # each rank's file alone is its slice
        part = I.mdk_shard(tmp_path / "mdk4", r, 4)
        start, n = shard_range(C, r, 4)
        assert part["class_start"] == start and torch.equal(part["weight"], full[start : start + n])
    b = I.load_full_centers(tmp_path / "mdk4", C)
    assert torch.equal(b, full)
    I.write_insightface_shards(b, tmp_path / "if5", 5, source=tmp_path / "run")
    c, layout, world = I.load_centers(tmp_path / "if5", C, with_layout=True)
    assert torch.equal(c, full) and world == 5 and layout.startswith("checkpoint_gpu")
    new0 = torch.load(tmp_path / "if5" / "checkpoint_gpu_0.pt", weights_only=True)
    assert new0["global_step"] == 1234 and new0["state_lr_scheduler"] == {"last_epoch": 7}
    old_m = torch.cat([torch.load(tmp_path / "run" / f"checkpoint_gpu_{r}.pt", weights_only=True)["state_optimizer"]
                       ["state"][0]["momentum_buffer"] for r in range(R)])  # fmt: skip
    new_m = torch.cat([torch.load(tmp_path / "if5" / f"checkpoint_gpu_{r}.pt", weights_only=True)["state_optimizer"]
                       ["state"][0]["momentum_buffer"] for r in range(5)])  # fmt: skip
    assert torch.equal(new_m, old_m)  # the momentum of each center moved with it
    with pytest.raises(FileNotFoundError, match="write them for 3 ranks"):
        I.mdk_shard(tmp_path / "mdk4", 0, 3)


def test_cli_import_and_reshard(tmp_path):
    from mdkernels.cli import main

    full = write_run(tmp_path / "run", "softmax_fc_gpu")
    assert main(["import-insightface", str(tmp_path / "run"), "--network", "mbf", "--num-classes", str(C),
                 "--out", str(tmp_path / "teacher.pt")]) == 0  # fmt: skip
    ckpt = torch.load(tmp_path / "teacher.pt", weights_only=True)
    assert torch.equal(ckpt["head"]["head.weight"], full) and ckpt["config"]["backbone"] == "mbf"
    assert ckpt["source"]["world_size"] == R
    assert main(["reshard", str(tmp_path / "teacher.pt"), "--world", "2", "--out", str(tmp_path / "s2")]) == 0
    assert torch.equal(I.load_full_centers(tmp_path / "s2"), full)
    assert main(["reshard", str(tmp_path / "run"), "--world", "4", "--layout", "insightface",
                 "--out", str(tmp_path / "if4")]) == 0  # fmt: skip
    assert torch.equal(I.load_centers(tmp_path / "if4", C), full)


def _run_data(tmp_path, classes=C):
    return D.generate_dataset(tmp_path / "data", identities=classes, per_identity=2, heldout_identities=6, pairs=8,
                              size=112, fmt="rec", seed=0)  # fmt: skip


@pytest.mark.slow
def test_teacher_run_dir_and_init_centers_in_training(tmp_path):
    from mdkernels.train.trainer import train

    data = _run_data(tmp_path)
    full = write_run(tmp_path / "run", "checkpoint_gpu")
    base = dict(data=data["train"], backbone="mobilefacenet", width=0.25, embedding_size=EMB, input_size=32,
                epochs=1, batch_size=8, workers=0, progress=False, tensorboard=False, max_steps=1)  # fmt: skip
    res = train(TrainConfig(**base, out=str(tmp_path / "s"), method="margindistill", teacher=str(tmp_path / "run"),
                            teacher_network="mbf"))  # fmt: skip
    assert res["step"] == 1 and (tmp_path / "s" / "teacher_import.pt").is_file()
    stamp = (tmp_path / "s" / "teacher_import.pt").stat().st_mtime_ns
    with pytest.raises(ValueError, match="already holds a run"):  # a finished run is never silently replaced
        train(TrainConfig(**base, out=str(tmp_path / "s"), method="margindistill", teacher=str(tmp_path / "run"),
                          teacher_network="mbf"))  # fmt: skip
    train(TrainConfig(**base, out=str(tmp_path / "s"), method="margindistill", teacher=str(tmp_path / "run"),
                      teacher_network="mbf"), overwrite=True)  # fmt: skip
    assert (tmp_path / "s" / "teacher_import.pt").stat().st_mtime_ns == stamp  # reused, not re-imported
    ckpt = torch.load(res["checkpoint"], weights_only=True)
    assert torch.equal(ckpt["head"]["head.weight"], full)  # MarginDistillation's frozen centers: the teacher's
    with pytest.raises(ValueError, match="--teacher-network"):
        train(TrainConfig(**base, out=str(tmp_path / "x"), method="margindistill", teacher=str(tmp_path / "run")))
    # --init-centers: the head starts from the run's centers (lr 0: they stay exactly)
    res = train(TrainConfig(**base, out=str(tmp_path / "a"), method="arcface", init_centers=str(tmp_path / "run"),
                            lr=0.0, weight_decay=0.0))  # fmt: skip
    assert torch.equal(torch.load(res["checkpoint"], weights_only=True)["head"]["head.weight"], full)
    with pytest.raises(ValueError, match="hold 23 classes, not num_classes=24"):
        train(TrainConfig(**{**base, "data": _run_data(tmp_path / "d24", 24)["train"]}, out=str(tmp_path / "b"),
                          init_centers=str(tmp_path / "run")))  # fmt: skip
    with pytest.raises(ValueError, match="16-d centers, but --embedding-size is 8"):
        train(TrainConfig(**{**base, "embedding_size": 8}, out=str(tmp_path / "c"), init_centers=str(tmp_path / "run")))


# ---- config files -----------------------------------------------------------------------------------------------
BASE_PY = '''from easydict import EasyDict as edict

# make training faster
config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.resume = False
config.save_all_states = False
config.output = "ms1mv3_arcface_r50"
config.embedding_size = 512
config.sample_rate = 1
config.interclass_filtering_threshold = 0
config.fp16 = False
config.batch_size = 128
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.verbose = 2000
config.frequent = 10
config.dali = False
config.gradient_acc = 1
config.seed = 2048
config.num_workers = 2
config.using_wandb = False
'''


def _job(rec_dir, **over):
    lines = ['"""a job."""', "from easydict import EasyDict as edict", "config = edict()",
             "config.margin_list = (1.0, 0.0, 0.4)", 'config.network = "mbf"', "config.output = None",
             f"config.embedding_size = {EMB}", "config.fp16 = True", 'config.optimizer = "adamw"',
             "config.lr = 0.001", "config.batch_size = 8", f'config.rec = "{rec_dir}"', f"config.num_classes = {C}",
             f"config.num_image = {2 * C}", "config.num_epoch = 20", "config.warmup_epoch = config.num_epoch // 10",
             "config.val_targets = ['val', 'agedb_30']", "config.dali_aug = False"]  # fmt: skip
    lines += [f"config.{k} = {v}" for k, v in over.items()]
    return "\n".join(lines) + "\n"


def test_config_file_maps_onto_train_config(tmp_path):
    data = _run_data(tmp_path)
    rec = os.path.dirname(data["train"])
    cfgdir = tmp_path / "configs"
    cfgdir.mkdir()
    (cfgdir / "base.py").write_text(BASE_PY)
    (cfgdir / "wf_mbf.py").write_text(_job(rec))
    merged = load_insightface_config(cfgdir / "wf_mbf.py")
    assert merged["momentum"] == 0.9 and merged["lr"] == 0.001 and merged["warmup_epoch"] == 2  # base, job, arithmetic
    assert merged["output"] == os.path.join("work_dirs", "wf_mbf")  # get_config's rule for output = None
    values, ignored, notes = to_train_config(merged)
    assert values["method"] == "cosface" and values["margin_list"] == "1.0,0.0,0.4"
    assert values["backbone"] == "mbf" and values["embedding_size"] == EMB and values["optimizer"] == "adamw"
    assert values["epochs"] == 20 and values["warmup_epochs"] == 2 and values["amp"] is True
    assert values["data"] == os.path.join(rec, "train.rec") and values["val"] == os.path.join(rec, "val.bin")
    assert values["crop_pad"] == 0 and values["input_size"] == 112 and values["seed"] == 2048
    assert {"verbose", "frequent", "dali", "dali_aug", "resume", "save_all_states", "using_wandb"} <= set(ignored)
    assert any("agedb_30" in n for n in notes)
    TrainConfig.from_dict(values)  # every mapped key is a TrainConfig field
    # without base.py beside it: the built-in defaults of arcface_torch's base.py
    (cfgdir / "base.py").unlink()
    assert load_insightface_config(cfgdir / "wf_mbf.py")["momentum"] == 0.9


@pytest.mark.parametrize("text,match", [
    ("import os\nconfig = edict()\n", "only `config = edict()`"),
    ("config = edict()\nconfig.lr = __import__('os').getcwd()\n", "only literals"),
    ("config = edict()\nconfig.lr = open('x').read()\n", "only literals"),
    ("config.lr = 0.1\n", "before `config = edict()`"),
    ("config = edict()\nconfig.a = config.b + 1\n", "used before it is assigned"),
    ("config = edict()\nconfig.a = 'x' * 3\n", "arithmetic on a non-number"),
    ("config = edict()\nconfig.a = 2 ** 1000\n", "exponent"),
    ("x = 1\n", "only `config = edict()`"),
    ("def f(:\n", "not a Python config file"),
])  # fmt: skip
def test_config_file_is_parsed_never_run(tmp_path, text, match):
    (tmp_path / "job.py").write_text(text)
    with pytest.raises(ValueError, match=re.escape(match)):
        parse_config(tmp_path / "job.py")


@pytest.mark.parametrize("over,match", [
    ({"network": '"vit_t"'}, "has no mdk backbone"),
    ({"margin_list": "(1.0, 0.5, 0.2)"}, "handles"),
    ({"gradient_acc": 4}, "does not accumulate"),
    ({"optimizer": '"lamb"'}, "optimizer"),
    ({"rec": '"synthetic"'}, "speed test"),
])  # fmt: skip
def test_config_values_mdk_cannot_honour_are_errors(tmp_path, over, match):
    (tmp_path / "job.py").write_text(_job(tmp_path, **over))
    with pytest.raises(ValueError, match=match):
        to_train_config(load_insightface_config(tmp_path / "job.py"))


@pytest.mark.slow
def test_cli_insightface_config_with_overriding_flags(tmp_path, capsys):
    from mdkernels.cli import run

    data = _run_data(tmp_path)
    rec = os.path.dirname(data["train"])
    (tmp_path / "job.py").write_text(_job(rec, output=repr(str(tmp_path / "out"))))
    argv = ["train", "--insightface-config", str(tmp_path / "job.py"), "--lr", "0.05", "--max-steps", "2",
            "--workers", "0", "--no-progress", "--no-tensorboard"]  # fmt: skip
    assert run(argv) == 0
    err = capsys.readouterr().err
    assert "ignored insightface keys" in err and "dali_aug" in err and "agedb_30" in err
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["lr"] == 0.05 and saved["optimizer"] == "adamw" and saved["margin_list"] == "1.0,0.0,0.4"
    assert saved["backbone"] == "mbf" and saved["crop_pad"] == 0 and saved["num_classes"] == C
    assert saved["warmup_epochs"] == 2 and saved["epochs"] == 20 and saved["val"].endswith("val.bin")
    assert run(argv[:3] + ["--num-classes", "99", "--max-steps", "1", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("mdk train: error: ")
    assert "holds 23 classes, but num_classes is 99" in err.strip().splitlines()[-1]


def test_insightface_numerics_head_is_used_for_margin_list():
    from mdkernels.train.methods import MethodLoss

    cfg = TrainConfig(method="arcface", margin_list="1.0,0.5,0.0", interclass_filter=0.2, embedding_size=EMB)
    head = MethodLoss(cfg, C, None).head
    assert (head.grad, head.fallback, head.interclass_filter) == ("straight_through", False, 0.2)
    with pytest.raises(ValueError, match="needs --sharded"):
        MethodLoss(TrainConfig(method="arcface", sample_rate=0.3, embedding_size=EMB), C, None)


# ---- preprocessing -------------------------------------------------------------------------------------------
def test_preprocessing_is_insightfaces():
    from PIL import Image

    rgb = np.zeros((112, 112, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 128, 0  # R, G, B planes
    rgb[0, 0] = (10, 20, 30)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    x = D.decode_image(buf.getvalue())
    by_hand = torch.tensor([[255, 128, 0], [10, 20, 30]], dtype=torch.float32)
    by_hand = (by_hand / 255 - 0.5) / 0.5  # ToTensor then Normalize(0.5, 0.5), channels R, G, B
    assert x.shape == (3, 112, 112)
    torch.testing.assert_close(x[:, 1, 1], by_hand[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(x[:, 0, 0], by_hand[1], rtol=0, atol=1e-6)
    # arcface_torch's training augmentation is a horizontal flip only (crop_pad 0)
    img = torch.randn(3, 8, 8)
    outs = [D.augment(img, 0, 0, i, pad=0) for i in range(16)]
    assert all(torch.equal(o, img) or torch.equal(o, img.flip(-1)) for o in outs)
    assert any(torch.equal(o, img.flip(-1)) for o in outs) and any(torch.equal(o, img) for o in outs)


def test_bin_evaluation_sums_the_flipped_embedding():
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    imgs = torch.randn(6, 3, 4, 4)
    got = E.embed(lin, imgs, flip=True)
    with torch.no_grad():
        want = lin(imgs) + lin(imgs.flip(-1))
    torch.testing.assert_close(got, want / want.norm(dim=1, keepdim=True))


# ---- export -------------------------------------------------------------------------------------------------
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _check_against_torch(path, model, size):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), outs = sess.get_inputs(), sess.get_outputs()
    assert inp.name == "data" and len(outs) == 1 and inp.shape[1:] == [3, size, size]
    for n in (1, 7):
        x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            a = torch.nn.functional.normalize(model(x), dim=1)
        b = torch.nn.functional.normalize(torch.from_numpy(sess.run(None, {"data": x.numpy()})[0]), dim=1)
        assert b.shape == a.shape
        assert (a * b).sum(1).min() >= 0.99999 and (a - b).abs().max() <= 1e-4


def _insightface_checker(path):
    """insightface's ONNX model checks: one 4-D input, one output, float32 initializers."""
    m = onnx.load(str(path))
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    assert len(inputs) == 1 and len(inputs[0].type.tensor_type.shape.dim) == 4
    assert inputs[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis is symbolic
    assert len(m.graph.output) == 1
    assert all(i.data_type == onnx.TensorProto.FLOAT for i in m.graph.initializer if len(i.dims) > 1)


@pytest.mark.slow
def test_export_insightface_model_pt_and_eval_the_onnx(tmp_path):
    from mdkernels.cli import main
    from mdkernels.eval.verification import evaluate_checkpoint

    theirs = randomize(get_model("mbf", EMB), seed=4)
    torch.save(theirs.state_dict(), tmp_path / "model.pt")
    assert main(["export", str(tmp_path / "model.pt"), str(tmp_path / "mbf.onnx"), "--network", "mbf"]) == 0
    _insightface_checker(tmp_path / "mbf.onnx")
    _check_against_torch(tmp_path / "mbf.onnx", theirs, 112)  # against insightface's own network
    data = D.generate_dataset(tmp_path / "d", identities=2, per_identity=1, heldout_identities=8, pairs=20,
                              size=112, seed=1)  # fmt: skip
    a = evaluate_checkpoint(str(tmp_path / "mbf.onnx"), data["val"])
    b = evaluate_checkpoint(str(tmp_path / "model.pt"), data["val"], network="mbf")
    assert abs(a["accuracy"] - b["accuracy"]) < 1e-9 and abs(a["threshold"] - b["threshold"]) < 1e-4


@pytest.mark.slow
def test_export_mdk_checkpoint_and_nothing_partial(tmp_path):
    from mdkernels.interop.onnx import export_onnx
    from mdkernels.models.checkpoint import save_checkpoint

    model = build_backbone("mobilefacenet", width=0.25, embedding_size=EMB, input_size=32)
    randomize(model, seed=5, size=32)
    cfg = TrainConfig(backbone="mobilefacenet", width=0.25, embedding_size=EMB, input_size=32)
    save_checkpoint(tmp_path / "last.pt", {"config": cfg.__dict__, "backbone": model.state_dict()})
    res = mdk_process("export", str(tmp_path / "last.pt"), str(tmp_path / "s.onnx"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["max_abs_diff_normalised"] <= 1e-4
    _insightface_checker(tmp_path / "s.onnx")
    _check_against_torch(tmp_path / "s.onnx", model.eval(), 32)
    before = (tmp_path / "s.onnx").read_bytes()

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        export_onnx(Broken(), tmp_path / "s.onnx", input_size=32)
    assert (tmp_path / "s.onnx").read_bytes() == before  # the earlier export is intact
    assert not list(tmp_path.glob(".s.onnx.tmp*"))
    bad = mdk_process("export", str(tmp_path / "nope.pt"), str(tmp_path / "x.onnx"))
    assert bad.returncode == 2 and bad.stderr.strip() == f"mdk export: error: model not found: {tmp_path / 'nope.pt'}"


def test_bin_fixture_is_insightface_format(tmp_path):
    data = D.generate_dataset(tmp_path, identities=2, per_identity=1, heldout_identities=4, pairs=4, size=112)
    bins, issame = pickle.loads(open(data["val"], "rb").read())
    assert len(bins) == 8 and issame == [True, False, True, False] and bins[0][:8] == b"\x89PNG\r\n\x1a\n"
