"""The reference training loop: ``mdk train`` and ``mdk eval``.

One loop serves every method. It builds a backbone and the loss of ``--method``, then runs SGD with
warmup and polynomial decay (insightface's schedule). It logs CSV (and TensorBoard when installed),
evaluates on a verification ``.bin``, and writes atomic checkpoints (write, then rename). Checkpoints
hold the step, optimizer, scheduler, RNG and data position, so ``--resume`` continues exactly: the
sampler and the augmentation are seeded by (seed, epoch, index). Checkpoints load with
``weights_only=True``.

Distillation methods read a teacher checkpoint (``--teacher``). Teacher embeddings are computed once
per dataset and cached in a memmap next to the output, as the official MarginDistillation pipeline
precomputes them. The teacher centers are the teacher head's weight.

DDP: launch with ``torchrun --nproc_per_node=N -m mdkernels.cli train ...`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import mdkernels
from mdkernels.train import data as D
from mdkernels.train import evaluate as E
from mdkernels.train.models import build_backbone

METHODS = ("arcface", "cosface", "sphereface", "margindistill", "proxyless", "angular", "triplet", "hinton")
DISTILL = ("margindistill", "proxyless", "angular", "triplet", "hinton")


@dataclasses.dataclass
class TrainConfig:
    data: str = ""  # train.rec or an image-folder root
    val: str | None = None  # verification .bin
    out: str = "runs/mdk"
    method: str = "arcface"
    teacher: str | None = None  # teacher checkpoint for the distillation methods
    backbone: str = "mobilefacenet"
    width: float = 1.0
    embedding_size: int = 512
    input_size: int = 112
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    seed: int = 0
    workers: int = 2
    s: float = 64.0
    m: float | None = None  # margin of the method (default: 0.5 arcface/proxyless, 0.35 cosface, 1.35 sphereface)
    m_min: float = 0.2
    m_max: float = 0.5
    T: float = 4.0
    alpha: float = 0.95
    distill_weight: float = 1.0  # lambda of angular/triplet distillation added to ArcFace
    p: float = 2.0
    mining: str = "all"
    distance: str = "l2"
    backend: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    sharded: bool = False  # shard the head's centers over the DDP ranks (arcface/cosface/sphereface)
    save_every: int = 0  # steps between checkpoints (0: end of each epoch only)
    eval_every: int = 0  # epochs between evaluations (0: at the end only)
    max_steps: int = 0  # stop after this many steps (0: run every epoch)
    progress: bool = True
    tensorboard: bool = True

    def margin(self) -> float:
        if self.m is not None:
            return self.m
        return {"cosface": 0.35, "sphereface": 1.35}.get(self.method, 0.5)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temporary file in the same folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a loadable mdkernels checkpoint ({type(err).__name__}: {err})") from err


def backbone_from_checkpoint(ckpt: dict) -> nn.Module:
    cfg = ckpt["config"]
    model = build_backbone(cfg["backbone"], width=cfg["width"], embedding_size=cfg["embedding_size"],
                           input_size=cfg["input_size"])  # fmt: skip
    model.load_state_dict(ckpt["backbone"])
    return model


# ----------------------------------------------------------------------------------------------------
# losses per method
# ----------------------------------------------------------------------------------------------------
class MethodLoss(nn.Module):
    """``forward(emb, labels, index) -> loss``; owns the head and any adapter; reads cached teacher data."""

    def __init__(self, cfg: TrainConfig, num_classes: int, teacher: dict | None, group=None) -> None:
        super().__init__()
        self.cfg, self.method = cfg, cfg.method
        m, backend = cfg.margin(), cfg.backend
        margins = {"arcface": (1.0, m, 0.0), "cosface": (1.0, 0.0, m), "sphereface": (m, 0.0, 0.0)}
        if cfg.method in ("arcface", "cosface", "sphereface", "angular", "triplet"):
            m1, m2, m3 = margins.get(cfg.method, margins["arcface"])
            if cfg.sharded and dist.is_initialized():
                from mdkernels.distributed import ShardedMarginHead

                self.head = ShardedMarginHead(cfg.embedding_size, num_classes, cfg.s, m1, m2, m3, backend=backend)
            else:
                self.head = mdkernels.nn.CombinedMargin(cfg.embedding_size, num_classes, cfg.s, m1, m2, m3,
                                                        backend=backend)  # fmt: skip
        if cfg.method not in DISTILL:
            self.teacher_emb = None
        else:
            if teacher is None:
                raise ValueError(f"--method {cfg.method} needs --teacher <checkpoint>")
            centers = teacher["centers"]
            if centers.shape[0] != num_classes:
                raise ValueError(f"the teacher has {centers.shape[0]} classes but the data has {num_classes}")
            self.teacher_emb = teacher["embeddings"]  # (N, Dt) memmap on the CPU, read per batch
            t_dim = centers.shape[1]
            if cfg.method == "margindistill":
                self.loss = mdkernels.nn.MarginDistillation(centers, s=cfg.s, m_min=cfg.m_min, m_max=cfg.m_max,
                                                            backend=backend)  # fmt: skip
            elif cfg.method == "proxyless":
                self.loss = mdkernels.nn.ProxylessKD(centers, s=cfg.s, m=m, backend=backend,
                                                     projection=cfg.embedding_size != t_dim,
                                                     embedding_size=cfg.embedding_size)  # fmt: skip
            elif cfg.method == "hinton":
                self.loss = mdkernels.nn.MarginKD(centers, T=cfg.T, alpha=cfg.alpha, s=cfg.s, m2=m, backend=backend)
            else:
                self.adapter = nn.Linear(cfg.embedding_size, t_dim, bias=False) if cfg.embedding_size != t_dim else None
            if cfg.method in ("margindistill", "hinton") and cfg.embedding_size != t_dim:
                raise ValueError(f"--method {cfg.method} needs the student's embedding size ({cfg.embedding_size}) "
                                 f"to equal the teacher's ({t_dim})")  # fmt: skip

    def monitored(self, emb: torch.Tensor) -> torch.Tensor:
        """The embedding that is compared with :meth:`centers` (after ProxylessKD's projection)."""
        projection = getattr(getattr(self, "loss", None), "projection", None)
        return projection(emb.float()) if projection is not None else emb

    def centers(self) -> torch.Tensor:
        """The class centers used for monitoring accuracy."""
        if hasattr(self, "head"):
            return self.head.weight
        return self.loss.teacher_centers if hasattr(self.loss, "teacher_centers") else self.loss.centers

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        emb = emb.float()
        method, cfg = self.method, self.cfg
        t = None
        if self.teacher_emb is not None:
            idx = index.cpu().numpy()
            order = np.argsort(idx)
            rows = np.empty((len(idx), self.teacher_emb.shape[1]), dtype=np.float32)
            rows[order] = self.teacher_emb[idx[order]]  # read the memmap in file order
            t = torch.from_numpy(rows).to(emb.device)
        if method in ("arcface", "cosface", "sphereface"):
            return self.head(emb, labels)
        if method == "margindistill":
            return self.loss(emb, labels, teacher_embeddings=t)
        if method == "proxyless":
            return self.loss(emb, labels)
        if method == "hinton":
            return self.loss(emb, t, labels)
        student = self.adapter(emb) if self.adapter is not None else emb
        if method == "angular":
            extra = mdkernels.angular_distillation_loss(student, t, p=cfg.p, backend=cfg.backend)
        else:
            extra = mdkernels.triplet_distillation_loss(student, t, labels=labels, mining=cfg.mining,
                                                        distance=cfg.distance, backend=cfg.backend)  # fmt: skip
        return self.head(emb, labels) + cfg.distill_weight * extra


@torch.no_grad()
def batch_accuracy(emb: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor, chunk: int = 65536) -> float:
    """Top-1 identification against the centers, chunked over classes (no B x C tensor at once)."""
    x = torch.nn.functional.normalize(emb.float(), dim=1)
    best = torch.full((x.shape[0],), -2.0, device=x.device)
    arg = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for c0 in range(0, centers.shape[0], chunk):
        cos = x @ torch.nn.functional.normalize(centers[c0 : c0 + chunk].float(), dim=1).T
        v, i = cos.max(1)
        better = v > best
        best, arg = torch.where(better, v, best), torch.where(better, i + c0, arg)
    return (arg == labels).float().mean().item()


# ----------------------------------------------------------------------------------------------------
# teacher data (cached once per dataset)
# ----------------------------------------------------------------------------------------------------
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _data_fingerprint(data: str) -> str:
    """The data's resolved path with the size and mtime of its files (a .rec/.idx pair or a folder)."""
    path = Path(data).resolve()
    files = [path, path.with_suffix(".idx")] if path.suffix == ".rec" else sorted(path.rglob("*"))
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    return hashlib.sha256(repr((str(path), stats)).encode()).hexdigest()[:16]


@torch.no_grad()
def teacher_data(teacher_path: str, data: str, cache_dir: Path, device, batch_size: int = 256,
                 wait_seconds: float = 6 * 3600) -> dict:  # fmt: skip
    """Teacher centers ``(C, Dt)`` and embeddings ``(N, Dt)`` of every training image (no augmentation,
    decoded at the teacher's input size), cached as a memmap keyed by the teacher checkpoint and the data
    files. Rank 0 builds the cache; other ranks wait for the file (no collective: a long teacher pass must
    not hit a NCCL timeout). The embeddings stay on the CPU, read per batch."""
    ckpt = load_checkpoint(teacher_path)
    centers = ckpt["head"]["head.weight"].float()
    dataset = D.open_dataset(data, size=ckpt["config"]["input_size"], train=False)
    key = hashlib.sha256(f"{_file_digest(Path(teacher_path))}|{_data_fingerprint(data)}|{len(dataset)}"
                         .encode()).hexdigest()[:16]  # fmt: skip
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"teacher_{key}.npy"
    if dist.is_initialized() and dist.get_rank() != 0:
        deadline = time.time() + wait_seconds
        while not path.is_file():
            if time.time() > deadline:
                raise TimeoutError(f"rank {dist.get_rank()}: rank 0 did not write the teacher cache {path}")
            time.sleep(2)
    if path.is_file():
        emb = np.load(path, mmap_mode="r")
    else:
        model = backbone_from_checkpoint(ckpt).to(device).eval()
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        emb = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(dataset), centers.shape[1]))
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        for imgs, _, idx in loader:
            emb[idx.numpy()] = model(imgs.to(device)).float().cpu().numpy()
        emb.flush()
        del emb
        os.replace(tmp, path)
        emb = np.load(path, mmap_mode="r")
    return {"centers": centers, "embeddings": emb, "path": str(path)}


# ----------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------
def _dist_setup() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _schedule(cfg: TrainConfig, steps_per_epoch: int):
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, 1 - (step - warm) / max(1, total - warm)) ** 2  # insightface's PolyScheduler

    return factor


class _Logger:
    """CSV rows with a fixed header per file (``log.csv`` for training, ``eval.csv`` for evaluations).

    A fresh run starts the files anew; a resumed run drops the rows logged after its checkpoint."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_step: int | None) -> None:
        self.enabled, self.writer, self.out = enabled, None, out
        if enabled:
            for name in ("log.csv", "eval.csv"):
                f = out / name
                if f.exists() and resume_step is None:
                    f.unlink()
                elif f.exists():
                    with open(f) as fh:
                        rows = list(csv.DictReader(fh))
                    keep = [r for r in rows if int(r["step"]) <= resume_step]
                    with open(f, "w", newline="") as fh:
                        if keep:
                            w = csv.DictWriter(fh, fieldnames=list(keep[0]))
                            w.writeheader()
                            w.writerows(keep)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.writer = None

    def log(self, row: dict, name: str = "log.csv") -> None:
        if not self.enabled:
            return
        path = self.out / name
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, row["step"])


# Settings a resume may change: where files are, how the run is shown and saved, and when it stops.
# Anything else would make the resumed run differ from the one the checkpoint belongs to.
RESUME_OVERRIDABLE = frozenset(
    {"out", "data", "val", "teacher", "workers", "progress", "tensorboard", "save_every", "eval_every", "max_steps",
     "backend"}
)  # fmt: skip


def _resume_config(saved: TrainConfig, cfg: TrainConfig, overrides) -> TrainConfig:
    """The checkpoint's config, with max_steps/progress/workers from ``cfg`` and the explicitly given
    ``overrides`` that a resume may change. Other explicit settings that differ are an error, not
    silently dropped."""
    conflicts = [
        f.name
        for f in dataclasses.fields(TrainConfig)  # in the config's order, whatever the order of overrides
        if f.name in overrides and f.name not in RESUME_OVERRIDABLE and getattr(cfg, f.name) != getattr(saved, f.name)
    ]
    if conflicts:
        shown = ", ".join(
            f"--{f.replace('_', '-')} {getattr(cfg, f)!r} (saved {getattr(saved, f)!r})" for f in conflicts
        )
        raise ValueError(
            f"--resume continues the saved run exactly, but these settings differ from its checkpoint: {shown}. "
            "Drop them to resume, or train into a new --out to change them"
        )
    keep = {"max_steps", "progress", "workers"} | (set(overrides) & RESUME_OVERRIDABLE)
    return dataclasses.replace(saved, **{f: getattr(cfg, f) for f in keep})


def train(cfg: TrainConfig, resume: bool = False, overrides=()) -> dict:
    """Train per ``cfg``; returns ``{"checkpoint", "metrics", "log"}``. ``resume`` continues from
    ``<out>/last.pt`` with the checkpoint's config; ``overrides`` names the settings given explicitly
    (the CLI's flags): paths, logging and max_steps may change on a resume, anything else must match."""
    if cfg.method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.method in DISTILL and not cfg.teacher and not resume:
        raise ValueError(f"--method {cfg.method} needs --teacher <checkpoint of a trained teacher>")
    rank, world, device = _dist_setup()
    out = Path(cfg.out)
    sharded = cfg.sharded and world > 1
    # sharded heads: every rank checkpoints its own shard (and optimizer state); rank 0's file is last.pt
    ckpt_path = out / ("last.pt" if rank == 0 or not sharded else f"last.rank{rank}.pt")
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        cfg = _resume_config(TrainConfig.from_dict(state["config"]), cfg, overrides)
    torch.manual_seed(cfg.seed)
    dataset = D.open_dataset(cfg.data, size=cfg.input_size, train=True, seed=cfg.seed)
    num_classes = dataset.num_classes
    # the cache sits beside the teacher checkpoint: one per (teacher, data), shared by every student run
    teacher = (
        teacher_data(cfg.teacher, cfg.data, Path(cfg.teacher).parent / "teacher_cache", device)
        if cfg.method in DISTILL
        else None
    )
    if teacher is not None:
        teacher["centers"] = teacher["centers"].to(device)
    backbone = build_backbone(cfg.backbone, width=cfg.width, embedding_size=cfg.embedding_size,
                              input_size=cfg.input_size).to(device)  # fmt: skip
    loss_fn = MethodLoss(cfg, num_classes, teacher).to(device)
    model = backbone
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            backbone, device_ids=[device.index] if device.type == "cuda" else None
        )
    params = [p for p in [*backbone.parameters(), *loss_fn.parameters()] if p.requires_grad]
    shard_param = loss_fn.head.weight if sharded and hasattr(loss_fn, "head") else None
    replicated = [p for p in loss_fn.parameters() if p.requires_grad and p is not shard_param]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sampler = D.ResumableSampler(len(dataset), cfg.seed, rank, world, cfg.batch_size)
    steps_per_epoch = sampler.batches_per_epoch()
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} x {world} rank(s) is larger than the dataset ({len(dataset)})")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, steps_per_epoch))
    step, epoch, batch_in_epoch = 0, 0, 0
    if state is not None:
        backbone.load_state_dict(state["backbone"])
        loss_fn.load_state_dict(state["loss"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    logger = _Logger(out, rank == 0, cfg.tensorboard, step if state is not None else None)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    val = E.load_bin(cfg.val, cfg.input_size) if cfg.val else None
    use_amp = cfg.amp and device.type == "cuda"
    kill_at = int(os.environ.get("MDK_KILL_AT_STEP", "0"))  # tests: die hard right after this step's checkpoint

    def checkpoint() -> None:
        centers = loss_fn.centers().detach()
        if sharded and hasattr(loss_fn, "head"):
            centers = loss_fn.head.full_weight()  # a collective: every rank enters it
        if rank != 0 and not sharded:
            return
        st = {"config": dataclasses.asdict(cfg), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
              "backbone": backbone.state_dict(), "loss": loss_fn.state_dict(), "optimizer": opt.state_dict(),
              "scheduler": sched.state_dict(), "rng_cpu": torch.get_rng_state(), "num_classes": num_classes,
              "head": {"head.weight": centers.float().cpu()}}  # fmt: skip
        if device.type == "cuda":
            st["rng_cuda"] = torch.cuda.get_rng_state()
        save_checkpoint(ckpt_path, st)

    metrics: dict = {}
    bar = None
    if cfg.progress and rank == 0:
        try:
            from tqdm import tqdm

            bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=step, desc=cfg.method, dynamic_ncols=True)
        except ImportError:
            bar = None
    done = False
    while epoch < cfg.epochs and not done:
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, batch_in_epoch)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.workers,
            drop_last=True,
            persistent_workers=False,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed * 1009 + epoch),  # not the global RNG: exact resume
        )
        t0, seen = time.perf_counter(), 0
        for imgs, labels, index in loader:
            if cfg.max_steps and step >= cfg.max_steps:
                done = True
                break
            imgs, labels, index = imgs.to(device), labels.to(device), index.to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                emb = model(imgs)
            loss = loss_fn(emb, labels, index)
            bad = torch.tensor(0.0 if torch.isfinite(loss.detach()) else 1.0, device=device)
            if world > 1:
                dist.all_reduce(bad)  # every rank stops together
            if bad.item():
                raise FloatingPointError(
                    f"loss became non-finite at step {step + 1} (value {loss.item()} on rank {rank}); weights left "
                    f"unchanged and the last checkpoint {ckpt_path} kept as it was (lower --lr, check the data)"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # loss parameters are replicated, not in DDP: average them (a sharded head is exact)
                for p_ in replicated:
                    if p_.grad is not None:
                        dist.all_reduce(p_.grad)
                        p_.grad /= world
            opt.step()
            sched.step()
            step += 1
            batch_in_epoch += 1
            seen += imgs.shape[0] * world
            if rank == 0 and (step % 10 == 0 or batch_in_epoch == steps_per_epoch):
                acc = (
                    batch_accuracy(loss_fn.monitored(emb.detach()), loss_fn.centers().detach(), labels)
                    if not sharded
                    else float("nan")
                )
                ips = seen / (time.perf_counter() - t0)
                logger.log({"step": step, "epoch": epoch, "loss": round(loss.item(), 5), "train_acc": round(acc, 4),
                            "lr": sched.get_last_lr()[0], "images_per_s": round(ips, 1)})  # fmt: skip
                if bar is not None:
                    bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}", ips=f"{ips:.0f}")
            if bar is not None:
                bar.update(1)
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint()
                if kill_at and step == kill_at:
                    os._exit(137)
            if cfg.max_steps and step >= cfg.max_steps:
                done = True
                break
        if not done:
            epoch, batch_in_epoch = epoch + 1, 0
            if val is not None and cfg.eval_every and epoch % cfg.eval_every == 0 and rank == 0:
                metrics = _eval(backbone, val, device)
                logger.log(
                    {"step": step, "epoch": epoch, **{k: v for k, v in metrics.items() if k != "roc"}}, "eval.csv"
                )
        checkpoint()
    if bar is not None:
        bar.close()
    if val is not None and rank == 0 and (not metrics or done):
        metrics = _eval(backbone, val, device)
    return {"checkpoint": str(ckpt_path), "metrics": metrics, "log": str(out / "log.csv"), "step": step,
            "backbone": backbone}  # fmt: skip


def _eval(backbone, val, device) -> dict:
    images, issame = val
    return E.verify(backbone, images, issame, device=device)


def evaluate_checkpoint(checkpoint: str, target: str, *, flip: bool = True, max_pairs: int = 3000) -> dict:
    """``mdk eval``: a checkpoint on a verification ``.bin`` or on pairs drawn from an image folder."""
    ckpt = load_checkpoint(checkpoint)
    model = backbone_from_checkpoint(ckpt)
    size = ckpt["config"]["input_size"]
    if str(target).endswith(".bin"):
        images, issame = E.load_bin(target, size)
        return E.verify(model, images, issame, flip=flip)
    ds = D.ImageFolderDataset(target, size=size, train=False)
    pairs, issame = E.folder_pairs(ds.labels, max_pairs)
    needed = sorted(set(pairs.flatten().tolist()))
    pos = {k: i for i, k in enumerate(needed)}
    imgs = torch.stack([ds[k][0] for k in needed])
    order = torch.tensor([pos[k] for k in pairs.flatten().tolist()])
    return E.verify(model, imgs[order], issame, flip=flip)
