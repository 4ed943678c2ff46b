"""arcface_torch configuration files (``configs/<job>.py``) for ``mdk train --insightface-config``.

arcface_torch's ``get_config`` imports ``configs/base.py`` and then the job file, and lays the job's
keys over the base's. Here the files are parsed with :mod:`ast` and never executed or imported: a
file may hold only docstrings, ``from easydict import EasyDict as edict``, ``config = edict()`` and
assignments ``config.<key> = <value>``. A value is a literal (number, string, bool, None, tuple, list,
dict) or numeric arithmetic over literals and keys assigned before it (``config.num_epoch // 10``, as
the WebFace42M configs write). Anything else is an error naming the file and line.

``base.py`` is read from the job file's folder when it is there, else :data:`BASE_DEFAULTS` (the
values of arcface_torch's ``configs/base.py``) stand in. :func:`to_train_config` maps the keys onto
:class:`~mdkernels.train.config.TrainConfig` fields (:data:`MAPPED`) and returns the keys it ignores
(:data:`IGNORED`, and any key it does not know) so the CLI can print them.
"""

from __future__ import annotations

import ast
import operator
from pathlib import Path

from mdkernels.models.backbones import INSIGHTFACE_NETWORKS

# arcface_torch configs/base.py
BASE_DEFAULTS = {
    "margin_list": (1.0, 0.5, 0.0), "network": "r50", "resume": False, "save_all_states": False,
    "output": "ms1mv3_arcface_r50", "embedding_size": 512, "sample_rate": 1, "interclass_filtering_threshold": 0,
    "fp16": False, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
    "verbose": 2000, "frequent": 10, "dali": False, "gradient_acc": 1, "seed": 2048, "num_workers": 2,
    "wandb_key": "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX", "suffix_run_name": None, "using_wandb": False,
    "wandb_entity": "entity", "wandb_project": "project", "wandb_log_all": True, "save_artifacts": False,
    "wandb_resume": False,
}  # fmt: skip

# insightface key -> TrainConfig field (the conversions are in to_train_config)
MAPPED = {
    "margin_list": "margin_list (and method arcface/cosface)", "network": "backbone",
    "embedding_size": "embedding_size", "sample_rate": "sample_rate",
    "interclass_filtering_threshold": "interclass_filter", "optimizer": "optimizer", "lr": "lr",
    "weight_decay": "weight_decay", "momentum": "momentum", "batch_size": "batch_size (per rank)",
    "num_epoch": "epochs", "warmup_epoch": "warmup_epochs", "fp16": "amp", "seed": "seed",
    "num_workers": "workers", "output": "out", "rec": "data (<rec>/train.rec)",
    "val_targets": "val (<rec>/<name>.bin)", "num_classes": "num_classes (checked against the data)",
    "num_image": "num_images (checked against the data)", "gradient_acc": "must be 1",
}  # fmt: skip

# keys of arcface_torch that have no meaning for mdk train (why, for the README and the message)
IGNORED = {
    "resume": "mdk train --resume", "save_all_states": "mdk checkpoints always hold every state",
    "verbose": "mdk evaluates every --eval-every epochs", "frequent": "mdk logs every 10 steps",
    "dali": "mdk reads the .rec itself", "dali_aug": "mdk reads the .rec itself",
    "wandb_key": "no wandb", "suffix_run_name": "no wandb", "using_wandb": "no wandb", "wandb_entity": "no wandb",
    "wandb_project": "no wandb", "wandb_log_all": "no wandb", "save_artifacts": "no wandb",
    "wandb_resume": "no wandb",
}  # fmt: skip

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}  # fmt: skip


def _value(node: ast.AST, known: dict, where: str):
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (bool, int, float, str))):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_value(e, known, where) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict) and all(k is not None for k in node.keys):
        return {_value(k, known, where): _value(v, known, where) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _number(_value(node.operand, known, where), where)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _number(_value(node.left, known, where), where), _number(_value(node.right, known, where), where)
        if isinstance(node.op, ast.Pow) and abs(b) > 64:
            raise ValueError(f"{where}: exponent {b} too large")
        try:
            return _BINOPS[type(node.op)](a, b)
        except ZeroDivisionError as err:
            raise ValueError(f"{where}: division by zero") from err
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "config":
        if node.attr not in known:
            raise ValueError(f"{where}: config.{node.attr} is used before it is assigned")
        return known[node.attr]
    raise ValueError(f"{where}: only literals and numeric arithmetic over them are read, not "
                     f"{ast.unparse(node)[:60]!r} (the file is parsed, never run)")  # fmt: skip


def _number(v, where: str):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: arithmetic on a non-number {v!r}")
    return v


def _is_edict_import(node: ast.AST) -> bool:
    return isinstance(node, ast.ImportFrom) and node.module == "easydict" and all(
        a.name == "EasyDict" for a in node.names
    )


def parse_config(path: str | Path, start: dict | None = None) -> dict:
    """The ``config.<key>`` values of one arcface_torch config file, laid over ``start``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"insightface config not found: {path}")
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (SyntaxError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a Python config file ({err})") from err
    values, started = dict(start or {}), False
    for node in tree.body:
        where = f"{path}:{node.lineno}"
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring
        if _is_edict_import(node):
            continue
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id == "config":
                call = node.value
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in
                        ("edict", "EasyDict") and not call.args and not call.keywords):  # fmt: skip
                    raise ValueError(f"{where}: expected `config = edict()`")
                started = True
                continue
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "config":
                if not started:
                    raise ValueError(f"{where}: config.{target.attr} before `config = edict()`")
                values[target.attr] = _value(node.value, values, where)
                continue
        raise ValueError(f"{where}: only `config = edict()` and `config.<key> = <literal>` are read, not "
                         f"{ast.unparse(node).splitlines()[0][:60]!r} (the file is parsed, never run)")  # fmt: skip
    if not started:
        raise ValueError(f"{path}: no `config = edict()`: not an arcface_torch config file")
    return values


def load_insightface_config(path: str | Path) -> dict:
    """Base values (``base.py`` beside the job file, else :data:`BASE_DEFAULTS`) with the job's over them,
    and ``output`` set as ``get_config`` does (``work_dirs/<job>`` when None)."""
    path = Path(path)
    base_file = path.parent / "base.py"
    if base_file.is_file() and base_file.resolve() != path.resolve():
        base = parse_config(base_file)
    else:
        base = dict(BASE_DEFAULTS)
    cfg = parse_config(path, base)
    if cfg.get("output") is None:
        cfg["output"] = str(Path("work_dirs") / path.stem)
    return cfg


def to_train_config(icfg: dict) -> tuple[dict, dict, list[str]]:
    """``(TrainConfig values, {ignored key: why}, notes)`` of a merged arcface_torch config."""
    out: dict = {"input_size": 112, "width": 1.0, "crop_pad": 0}  # arcface_torch: 112x112, flip only
    ignored: dict = {}
    notes: list[str] = []
    for key in icfg:
        if key in IGNORED:
            ignored[key] = IGNORED[key]
        elif key not in MAPPED:
            ignored[key] = "not an mdk setting"
    if "margin_list" in icfg:
        m = icfg["margin_list"]
        if not (isinstance(m, (tuple, list)) and len(m) == 3 and all(isinstance(v, (int, float)) for v in m)):
            raise ValueError(f"margin_list must be three numbers (m1, m2, m3), got {m!r}")
        m1, m2, m3 = (float(v) for v in m)
        if m1 == 1.0 and m3 == 0.0:
            out["method"] = "arcface"
        elif m1 == 1.0 and m2 == 0.0 and m3 > 0:
            out["method"] = "cosface"
        else:
            raise ValueError(f"margin_list {tuple(m)}: arcface_torch's CombinedMarginLoss handles (1, m2, 0) and "
                             "(1, 0, m3) only")  # fmt: skip
        out["margin_list"] = f"{m1},{m2},{m3}"
    if "network" in icfg:
        net = icfg["network"]
        if net not in INSIGHTFACE_NETWORKS:
            raise ValueError(f"network {net!r} has no mdk backbone; mdk builds {', '.join(INSIGHTFACE_NETWORKS)}")
        out["backbone"] = net
    plain = {"embedding_size": ("embedding_size", int), "sample_rate": ("sample_rate", float),
             "interclass_filtering_threshold": ("interclass_filter", float), "optimizer": ("optimizer", str),
             "lr": ("lr", float), "weight_decay": ("weight_decay", float), "momentum": ("momentum", float),
             "batch_size": ("batch_size", int), "num_epoch": ("epochs", int), "warmup_epoch": ("warmup_epochs", float),
             "fp16": ("amp", bool), "seed": ("seed", int), "num_workers": ("workers", int), "output": ("out", str),
             "num_classes": ("num_classes", int), "num_image": ("num_images", int)}  # fmt: skip
    for key, (field, conv) in plain.items():
        if key in icfg and icfg[key] is not None:
            try:
                out[field] = conv(icfg[key])
            except (TypeError, ValueError) as err:
                raise ValueError(f"config.{key} = {icfg[key]!r} is not a {conv.__name__}") from err
    if str(out.get("optimizer", "sgd")).lower() not in ("sgd", "adamw"):
        raise ValueError(f"optimizer {icfg['optimizer']!r}: arcface_torch and mdk know 'sgd' and 'adamw'")
    if int(icfg.get("gradient_acc", 1) or 1) != 1:
        raise ValueError(f"gradient_acc = {icfg['gradient_acc']}: mdk train does not accumulate gradients; use "
                         "--batch-size (per rank) x ranks for the total batch and gradient_acc = 1")  # fmt: skip
    rec = icfg.get("rec")
    if rec is not None:
        if rec == "synthetic":
            raise ValueError("rec = 'synthetic' is arcface_torch's speed test; mdk train needs a .rec folder")
        rec_dir = Path(rec)
        out["data"] = str(rec_dir / "train.rec")
        targets = icfg.get("val_targets") or []
        found = [t for t in targets if (rec_dir / f"{t}.bin").is_file()]
        missing = [t for t in targets if t not in found]
        if missing:
            notes.append(f"val_targets not in {rec_dir}: {', '.join(missing)} (skipped, as arcface_torch skips them)")
        if found:
            out["val"] = ",".join(str(rec_dir / f"{t}.bin") for t in found)
    return out, ignored, notes
