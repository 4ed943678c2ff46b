"""insightface ``arcface_torch`` interop: its backbones' checkpoints, its Partial FC center shards, and
their re-split over another number of ranks.

A run directory of arcface_torch holds ``model.pt`` (rank 0's backbone state dict; ``backbone.pth`` in
released models) and, per rank, its slice of the class centers in one of three layouts:

* ``checkpoint_gpu_{rank}.pt``: ``{"state_dict_softmax_fc": {"weight": (num_local, D)}, "state_dict_backbone",
  "state_optimizer", "state_lr_scheduler", "epoch", "global_step"}`` (``save_all_states``, 2023-);
* ``softmax_fc_gpu_{rank}.pt``: ``{"weight": (num_local, D)}`` (2022);
* ``rank_{rank}_softmax_weight.pt``: the raw ``(num_local, D)`` tensor (2021).

Rank ``r`` of ``R`` owns the contiguous classes ``[class_start(r), class_start(r) + num_local(r))`` with
``num_local(r) = C//R + (r < C%R)`` and ``class_start(r) = (C//R) r + min(r, C%R)``, the split
:func:`mdkernels.distributed.shard_range` also uses. Every file loads with ``weights_only=True``; a
missing rank, shards that do not add up, or a shard of the wrong size is an error, never fresh centers.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from torch import nn

from mdkernels.distributed import shard_range
from mdkernels.models.backbones import INSIGHTFACE_NETWORKS, build_backbone
from mdkernels.models.checkpoint import save_checkpoint

# (file name pattern, era, how the shard sits in the loaded object)
SHARD_LAYOUTS = (
    ("checkpoint_gpu_{rank}.pt", "arcface_torch save_all_states (2023-)"),
    ("softmax_fc_gpu_{rank}.pt", "arcface_torch 2022"),
    ("rank_{rank}_softmax_weight.pt", "arcface_torch 2021"),
)
BACKBONE_FILES = ("model.pt", "backbone.pth", "checkpoint_gpu_0.pt")
MDK_SHARD = "centers_rank{rank}_of{world}.pt"  # mdk reshard --layout mdk
INPUT_SIZE = 112


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot be read as a torch file with weights_only=True "
                         f"({type(err).__name__}: {str(err)[:300]})") from err  # fmt: skip


def _shard_tensor(obj, path: Path, layout: str) -> torch.Tensor:
    if layout.startswith("checkpoint_gpu"):
        ok = isinstance(obj, dict) and isinstance(obj.get("state_dict_softmax_fc"), dict)
        t = obj["state_dict_softmax_fc"].get("weight") if ok else None
    elif layout.startswith("softmax_fc_gpu"):
        t = obj.get("weight") if isinstance(obj, dict) else None
    else:
        t = obj
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{path}: no (num_local, D) center tensor where the {layout} layout keeps it")
    return t


# ---- backbones ----------------------------------------------------------------------------------------
def backbone_state(path: str | Path) -> dict:
    """The backbone state dict in ``model.pt`` / ``backbone.pth`` (or a ``checkpoint_gpu_*.pt``'s
    ``state_dict_backbone``), without DDP's ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"insightface backbone not found: {path}")
    obj = _load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict_backbone"), dict):
        obj = obj["state_dict_backbone"]
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise ValueError(f"{path}: not a backbone state dict (expected a dict of tensors, as model.pt holds)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def embedding_size_of(state: dict, network: str) -> int:
    key = "features.layers.2.weight" if network.startswith("mbf") else "fc.weight"
    if key not in state:
        raise ValueError(f"the state dict has no {key!r}: it is not an insightface {network!r} backbone")
    return int(state[key].shape[0])


def load_backbone(path: str | Path, network: str) -> nn.Module:
    """An insightface backbone (``get_model`` name) from its checkpoint, loaded with ``strict=True``, in
    eval mode. The embedding size is read from the checkpoint."""
    if network not in INSIGHTFACE_NETWORKS:
        raise ValueError(f"network must be one of {INSIGHTFACE_NETWORKS} (insightface get_model names), "
                         f"got {network!r}")
    state = backbone_state(path)
    model = build_backbone(network, embedding_size=embedding_size_of(state, network), input_size=INPUT_SIZE)
    mine = model.state_dict()
    missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in mine.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]  # fmt: skip
    if missing or unexpected:
        raise ValueError(f"{path} is not an insightface {network!r} backbone: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, wrong shapes {shapes[:4]}; "
                         "pass the network it was trained as (--network / --teacher-network)")  # fmt: skip
    if shapes:
        raise ValueError(f"{path}: shapes differ from {network!r}: {shapes[:4]}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def find_backbone(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    for name in BACKBONE_FILES:
        if (run_dir / name).is_file():
            return run_dir / name
    raise FileNotFoundError(f"{run_dir}: no backbone file ({', '.join(BACKBONE_FILES)})")


# ---- centers --------------------------------------------------------------------------------------------
def shard_files(run_dir: str | Path) -> tuple[str, list[Path]]:
    """``(layout, [rank 0 file, rank 1 file, ...])`` of the first layout present in ``run_dir``; a gap in
    the ranks is an error naming the missing file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"insightface run directory not found: {run_dir}")
    for pattern, _ in SHARD_LAYOUTS:
        regex = re.compile("^" + re.escape(pattern).replace(r"\{rank\}", r"(\d+)") + "$")
        ranks = sorted(int(m.group(1)) for f in run_dir.iterdir() if (m := regex.match(f.name)))
        if ranks:
            missing = [pattern.format(rank=r) for r in range(max(ranks) + 1) if r not in ranks]
            if missing:
                raise FileNotFoundError(f"{run_dir}: missing {', '.join(missing)} (found ranks {ranks})")
            return pattern, [run_dir / pattern.format(rank=r) for r in ranks]
    names = ", ".join(p.format(rank="R") for p, _ in SHARD_LAYOUTS)
    raise FileNotFoundError(f"{run_dir}: no Partial FC center shards ({names})")


def check_split(sizes: list[int], num_classes: int | None, what: str) -> int:
    """C (the sum of ``sizes``, which must equal ``num_classes`` when given), after checking that every
    shard has insightface's ``num_local(r)`` rows."""
    total = sum(sizes)
    if num_classes is not None and total != num_classes:
        raise ValueError(f"{what}: the {len(sizes)} shards hold {total} classes, not num_classes={num_classes} "
                         "(a rank file from another run, or a missing last rank?)")  # fmt: skip
    for r, n in enumerate(sizes):
        expected = shard_range(total, r, len(sizes))[1]
        if n != expected:
            raise ValueError(f"{what}: rank {r} holds {n} classes, but insightface's split of C={total} over "
                             f"{len(sizes)} ranks gives it {expected} (C//R + (r < C%R))")  # fmt: skip
    return total


def load_centers(run_dir: str | Path, num_classes: int | None = None, embedding_size: int | None = None,
                 *, with_layout: bool = False):  # fmt: skip
    """The full ``(C, D)`` centers (fp32) of an arcface_torch run, reassembled from every rank's shard."""
    layout, files = shard_files(run_dir)
    shards = [_shard_tensor(_load(f), f, layout) for f in files]
    dims = {s.shape[1] for s in shards}
    if len(dims) != 1:
        raise ValueError(f"{run_dir}: the shards have different embedding sizes {sorted(dims)}")
    D = dims.pop()
    if embedding_size is not None and D != embedding_size:
        raise ValueError(f"{run_dir}: the centers are {D}-d but the backbone's embedding is {embedding_size}-d")
    check_split([s.shape[0] for s in shards], num_classes, str(run_dir))
    full = torch.cat([s.float() for s in shards])
    return (full, layout, len(files)) if with_layout else full


def load_full_centers(src: str | Path, num_classes: int | None = None) -> torch.Tensor:
    """Full ``(C, D)`` centers from an arcface_torch run directory, a folder of ``mdk reshard --layout mdk``
    shards, an mdk checkpoint (its head), or a file holding the tensor."""
    src = Path(src)
    if src.is_dir():
        if any(src.glob("centers_rank*_of*.pt")):
            return read_mdk_shards(src, num_classes)
        return load_centers(src, num_classes)
    obj = _load(src) if src.is_file() else None
    if obj is None:
        raise FileNotFoundError(f"centers not found: {src}")
    if isinstance(obj, dict) and isinstance(obj.get("head"), dict) and "head.weight" in obj["head"]:
        if int(obj["head"].get("subcenters", 1)) != 1:
            raise ValueError(f"{src}: a sub-center head ({obj['head']['subcenters']} rows per class) is not one "
                             "center per class")  # fmt: skip
        obj = obj["head"]["head.weight"]
    if not isinstance(obj, torch.Tensor) or obj.dim() != 2:
        raise ValueError(f"{src}: neither an mdk checkpoint nor a (C, D) tensor")
    if num_classes is not None and obj.shape[0] != num_classes:
        raise ValueError(f"{src}: {obj.shape[0]} centers, not num_classes={num_classes}")
    return obj.float()


# ---- re-splitting ---------------------------------------------------------------------------------------------
def write_mdk_shards(centers: torch.Tensor, out_dir: str | Path, world: int) -> list[Path]:
    """``centers_rank{r}_of{world}.pt`` per rank: ``{"weight", "class_start", "num_classes", "world_size",
    "rank"}``, for ``mdk train --sharded --init-centers DIR`` (each rank reads only its own file)."""
    out_dir = Path(out_dir)
    C = centers.shape[0]
    paths = []
    for r in range(world):
        start, n = shard_range(C, r, world)
        path = out_dir / MDK_SHARD.format(rank=r, world=world)
        save_checkpoint(path, {"weight": centers[start : start + n].clone(), "class_start": start, "num_classes": C,
                               "world_size": world, "rank": r})  # fmt: skip
        paths.append(path)
    return paths


def mdk_shard(src: str | Path, rank: int, world: int) -> dict:
    """Rank ``rank``'s file of an mdk shard folder written for ``world`` ranks (checked)."""
    path = Path(src) / MDK_SHARD.format(rank=rank, world=world)
    if not path.is_file():
        found = sorted(p.name for p in Path(src).glob("centers_rank*_of*.pt"))
        raise FileNotFoundError(f"{path} not found: the shards in {src} are {found[:4]}; write them for {world} "
                                f"ranks with mdk reshard --world {world}")  # fmt: skip
    obj = _load(path)
    start, n = shard_range(obj["num_classes"], rank, world)
    if obj["world_size"] != world or obj["class_start"] != start or obj["weight"].shape[0] != n:
        raise ValueError(f"{path}: written for another split (world {obj['world_size']}, start {obj['class_start']})")
    return obj


def read_mdk_shards(src: str | Path, num_classes: int | None = None) -> torch.Tensor:
    worlds = {int(m.group(1)) for p in Path(src).glob("centers_rank*_of*.pt") if (m := re.search(r"_of(\d+)", p.name))}
    if len(worlds) != 1:
        raise ValueError(f"{src}: shards for several world sizes {sorted(worlds)}; keep one set per folder")
    world = worlds.pop()
    parts = [mdk_shard(src, r, world) for r in range(world)]
    check_split([p["weight"].shape[0] for p in parts], num_classes or parts[0]["num_classes"], str(src))
    return torch.cat([p["weight"] for p in parts])


def write_insightface_shards(centers: torch.Tensor, out_dir: str | Path, world: int,
                             source: str | Path | None = None) -> list[Path]:  # fmt: skip
    """arcface_torch's own layout for ``world`` ranks: ``checkpoint_gpu_{r}.pt``. When ``source`` is a run
    with ``checkpoint_gpu`` files, their backbone, epoch, step and schedule are carried over and the
    optimizer state of the centers (momentum, Adam moments) is re-split with them, so arcface_torch can
    resume on the new world size; otherwise the files hold the centers only (``state_dict_softmax_fc``)."""
    out_dir = Path(out_dir)
    C, D = centers.shape
    extras, opt_parts = {}, None
    if source is not None:
        layout, files = shard_files(source)
        if layout.startswith("checkpoint_gpu"):
            ckpts = [_load(f) for f in files]
            extras = {k: v for k, v in ckpts[0].items() if k not in ("state_dict_softmax_fc", "state_optimizer")}
            opt_parts = _split_optimizer_states(ckpts, C, D)
    paths = []
    for r in range(world):
        start, n = shard_range(C, r, world)
        st = dict(extras, state_dict_softmax_fc={"weight": centers[start : start + n].clone()})
        if opt_parts is not None:
            st["state_optimizer"] = opt_parts(start, n)
        path = out_dir / SHARD_LAYOUTS[0][0].format(rank=r)
        save_checkpoint(path, st)
        paths.append(path)
    return paths


def _split_optimizer_states(ckpts: list[dict], C: int, D: int):
    """A function ``(start, n) -> optimizer state dict`` for a new shard: rank 0's state, with every
    per-center tensor (a state of the centers' parameter, ``(num_local, D)`` on each rank) re-split."""
    opts = [c.get("state_optimizer") for c in ckpts]
    if any(o is None for o in opts):
        return None
    sizes = [c["state_dict_softmax_fc"]["weight"].shape[0] for c in ckpts]
    full = {}
    for pid, st in opts[0]["state"].items():
        for name, t in st.items():
            if isinstance(t, torch.Tensor) and tuple(t.shape) == (sizes[0], D):
                full[(pid, name)] = torch.cat([o["state"][pid][name] for o in opts])

    def part(start: int, n: int) -> dict:
        state = {pid: dict(st) for pid, st in opts[0]["state"].items()}
        for (pid, name), t in full.items():
            state[pid][name] = t[start : start + n].clone()
        return {"state": state, "param_groups": opts[0]["param_groups"]}

    return part


# ---- an mdk teacher checkpoint from a run ---------------------------------------------------------------------
def fingerprint(run_dir: str | Path) -> str:
    """Names, sizes and mtimes of a run's backbone and shard files."""
    run_dir = Path(run_dir)
    files = sorted(f for f in run_dir.iterdir() if f.is_file() and f.suffix in (".pt", ".pth"))
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:16]
