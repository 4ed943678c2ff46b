"""The reference training loop: ``mdk train``.

One loop serves every method. It builds a backbone and the loss of ``--method``, then runs SGD with
warmup and polynomial decay (insightface's schedule). It logs CSV (and TensorBoard when installed),
evaluates on a verification ``.bin``, and writes atomic checkpoints (write, then rename). Checkpoints
hold the step, optimizer, scheduler, RNG and data position, so ``--resume`` continues exactly: the
sampler and the augmentation are seeded by (seed, epoch, index). Checkpoints load with
``weights_only=True``.

Distillation methods read a teacher checkpoint (``--teacher``). Teacher embeddings are computed once
per dataset and cached in a memmap in ``teacher_cache/`` beside the teacher checkpoint (keyed by the teacher
and the data's digests, so every student of that teacher on that data reuses it), as the official
MarginDistillation pipeline precomputes them. The teacher centers are the teacher head's weight.

DDP: launch with ``torchrun --nproc_per_node=N -m mdkernels.cli train ...`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import mdkernels
from mdkernels.data import datasets as D
from mdkernels.eval import verification as E
from mdkernels.models.backbones import build_backbone
from mdkernels.models.checkpoint import load_checkpoint, previous_path, save_checkpoint
from mdkernels.progress import Progress
from mdkernels.train.config import DISTILL, METHODS, OPTIMIZERS, TrainConfig
from mdkernels.train.methods import MethodLoss, WithTeacherRows, batch_accuracy, teacher_data


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
    {"out", "data", "val", "teacher", "teacher_network", "init_centers", "workers", "progress", "tensorboard",
     "save_every", "eval_every", "max_steps", "backend", "fused_center_update"}
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


def _resume_state(path: Path) -> dict:
    """The checkpoint to resume from; a corrupt one is refused, naming the intact previous checkpoint."""
    try:
        return load_checkpoint(path)
    except ValueError as err:
        prev = previous_path(path)
        hint = (f"; the previous checkpoint {prev} is intact: copy it over {path.name} to resume from it"
                if prev.is_file() else "")  # fmt: skip
        raise ValueError(f"--resume: {err}{hint}") from err


def train(cfg: TrainConfig, resume: bool = False, overrides=(), overwrite: bool = False) -> dict:
    """Train per ``cfg``; returns ``{"checkpoint", "metrics", "log"}``. ``resume`` continues from
    ``<out>/last.pt`` with the checkpoint's config; ``overrides`` names the settings given explicitly
    (the CLI's flags): paths, logging and max_steps may change on a resume, anything else must match. A
    fresh run into an ``out`` that holds a checkpoint is refused unless ``overwrite``."""
    if cfg.method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.method in DISTILL and not cfg.teacher and not resume:
        raise ValueError(f"--method {cfg.method} needs --teacher <checkpoint of a trained teacher>")
    rank, world, device = _dist_setup()
    out = Path(cfg.out)
    sharded = cfg.sharded and world > 1
    first = None  # rank 0's checkpoint, when read to learn whether the run was sharded
    if resume and world > 1 and not sharded and (out / "last.pt").is_file():
        # a resume takes the run's own settings: whether it was sharded decides which file is this rank's (rank 0's
        # last.pt says), whether or not --sharded is given again
        first = _resume_state(out / "last.pt")
        sharded = bool(first["config"].get("sharded", False))
    # sharded heads: every rank checkpoints its own shard (and optimizer state); rank 0's file is last.pt
    ckpt_path = out / ("last.pt" if rank == 0 or not sharded else f"last.rank{rank}.pt")
    state = None
    if resume:  # rank 0's file is read once
        state = first if first is not None and ckpt_path == out / "last.pt" else _resume_state(ckpt_path)
    if not resume and not overwrite and ckpt_path.is_file():
        raise ValueError(f"{ckpt_path} already holds a run: --resume continues it, --overwrite starts over (replacing "
                         "it), or pass a new --out")  # fmt: skip
    if state is not None:
        cfg = _resume_config(TrainConfig.from_dict(state["config"]), cfg, overrides)
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")
    if cfg.crop_pad < 0:
        raise ValueError(f"--crop-pad must be >= 0 pixels, got {cfg.crop_pad}")
    torch.manual_seed(cfg.seed)
    dataset = D.open_dataset(cfg.data, size=cfg.input_size, train=True, seed=cfg.seed, crop_pad=cfg.crop_pad)
    num_classes = dataset.num_classes
    if cfg.num_classes and cfg.num_classes != num_classes:
        raise ValueError(f"{cfg.data} holds {num_classes} classes, but num_classes is {cfg.num_classes}")
    if cfg.num_images and cfg.num_images != len(dataset):
        raise ValueError(f"{cfg.data} holds {len(dataset)} images, but num_images is {cfg.num_images}")
    teacher = None
    if cfg.method in DISTILL:
        teacher_path = _teacher_checkpoint(cfg, out, rank)
        # the cache sits beside the teacher checkpoint: one per (teacher, data), shared by every student run
        teacher = teacher_data(str(teacher_path), cfg.data, teacher_path.parent / "teacher_cache", device)
    if teacher is not None:
        teacher["centers"] = teacher["centers"].to(device)
        dataset = WithTeacherRows(dataset, teacher["path"])  # each batch brings its teacher rows
    # the model's initial weights from the seed alone: a teacher pass (or its cache) above must not move them
    torch.manual_seed(cfg.seed)
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
    if cfg.optimizer == "adamw":  # arcface_torch's AdamW: no momentum argument, its own betas
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sampler = D.ResumableSampler(len(dataset), cfg.seed, rank, world, cfg.batch_size)
    steps_per_epoch = sampler.batches_per_epoch()
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} x {world} rank(s) is larger than the dataset ({len(dataset)})")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, steps_per_epoch))
    # the centers' step inside their backward where it is exact: one process, or each rank's own shard (a replicated
    # head's gradient is averaged over the ranks after the backward, so its update cannot run inside it)
    fused = cfg.fused_center_update and (world == 1 or sharded) and mdkernels.optim.fusable(loss_fn, opt)
    if fused:
        mdkernels.fuse_center_update(loss_fn, opt)
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
    elif cfg.init_centers:
        _init_centers(loss_fn, cfg.init_centers, num_classes, cfg.embedding_size, sharded, rank, world)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    logger = _Logger(out, rank == 0, cfg.tensorboard, step if state is not None else None)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    val = _load_vals(cfg.val, cfg.input_size) if cfg.val else None
    use_amp = cfg.amp and device.type == "cuda"
    kill_at = int(os.environ.get("MDK_KILL_AT_STEP", "0"))  # tests: die hard right after this step's checkpoint
    kill_in_save = int(os.environ.get("MDK_KILL_IN_SAVE_AT_STEP", "0"))  # tests: die inside that checkpoint's write

    last_saved: list = [None]  # the (step, epoch, batch) last written: the same state is not written twice

    first_bad = torch.zeros((), dtype=torch.int64, device=device)  # the first step whose loss was not finite

    def stop_if_not_finite() -> None:
        """Raise when a step since the last look had a non-finite loss (one read of a device flag, on every rank;
        called at logging steps and before each checkpoint, never per step)."""
        flag = first_bad.clone()
        if world > 1:  # every rank stops together, naming the first bad step any rank saw
            flag = torch.where(flag.eq(0), torch.iinfo(torch.int64).max, flag)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            flag = torch.where(flag.eq(torch.iinfo(torch.int64).max), 0, flag)
        bad_step = int(flag)
        if bad_step:
            raise FloatingPointError(
                f"loss became non-finite at step {bad_step} (seen at step {step}); nothing after step "
                f"{bad_step - 1} was saved: the last checkpoint {ckpt_path} is kept as it was (lower --lr, check "
                "the data)"
            )

    def checkpoint() -> None:
        if last_saved[0] == (step, epoch, batch_in_epoch):
            return  # every rank returns alike: no collective is skipped on one rank only
        stop_if_not_finite()  # never a checkpoint of weights after a non-finite step
        last_saved[0] = (step, epoch, batch_in_epoch)
        centers = loss_fn.centers().detach()
        if sharded and hasattr(loss_fn, "head"):
            centers = loss_fn.head.full_weight()  # a collective: every rank enters it
        if rank != 0 and not sharded:
            return
        st = {"config": dataclasses.asdict(cfg), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
              "backbone": backbone.state_dict(), "loss": loss_fn.state_dict(), "optimizer": opt.state_dict(),
              "scheduler": sched.state_dict(), "rng_cpu": torch.get_rng_state(), "num_classes": num_classes,
              "head": {"head.weight": centers.float().cpu(), "subcenters": loss_fn.rows_per_class},
              "center_update": "fused" if fused else "optimizer.step"}  # fmt: skip
        if device.type == "cuda":
            st["rng_cuda"] = torch.cuda.get_rng_state()
        die = bool(kill_in_save and step == kill_in_save)
        save_checkpoint(ckpt_path, st, keep_previous=True, _die_before_rename=die)

    metrics: dict = {}
    bar = None
    if cfg.progress and rank == 0:  # a bar on a terminal, plain lines in a log
        bar = Progress(cfg.epochs * steps_per_epoch, cfg.method, "step", initial=step)
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
        for batch in loader:
            if cfg.max_steps and step >= cfg.max_steps:
                done = True
                break
            # pinned batches (the loader's pin_memory on a GPU), copied without blocking; the teacher rows, when
            # the method has them, come with the batch (WithTeacherRows): the step reads nothing back
            imgs, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            teacher_rows = batch[3].to(device, non_blocking=True) if len(batch) > 3 else None
            # the head inside autocast too: the fused ops then run 16-bit GEMM operands on the fp32 centers
            # (cast in registers, fp32 accumulation, fp32 gradients), as insightface's PartialFC_V2 under amp
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                emb = model(imgs)
                loss = loss_fn(emb, labels, teacher_rows)
            # a non-finite loss is noted on the device (the first such step), read at the next logging step or
            # checkpoint: no host sync per step; nothing after it is ever saved
            first_bad = torch.where(first_bad.eq(0) & ~torch.isfinite(loss.detach()), step + 1, first_bad)
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
            if step % 10 == 0 or batch_in_epoch == steps_per_epoch:
                stop_if_not_finite()  # every rank at the same steps: the flag's all-reduce is a collective
            if rank == 0 and (step % 10 == 0 or batch_in_epoch == steps_per_epoch):
                acc = (
                    batch_accuracy(loss_fn.monitored(emb.detach()), loss_fn.centers().detach(), labels,
                                   rows_per_class=loss_fn.rows_per_class)
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
    mdkernels.check_values()  # the last steps' deferred checks (a bad label on a GPU): reported, not lost
    if val is not None and rank == 0 and (not metrics or done):
        metrics = _eval(backbone, val, device)
    return {"checkpoint": str(ckpt_path), "metrics": metrics, "log": str(out / "log.csv"), "step": step,
            "backbone": backbone}  # fmt: skip


def _load_vals(val: str, size: int) -> dict:
    """``{name: (images, issame)}`` of each comma-separated verification ``.bin``."""
    paths = [Path(v.strip()) for v in str(val).split(",") if v.strip()]
    return {p.stem: E.load_bin(p, size) for p in paths}


def _eval(backbone, vals: dict, device) -> dict:
    """The metrics of one verification set, or ``<name>_<metric>`` of each of several."""
    out = {name: E.verify(backbone, images, issame, device=device) for name, (images, issame) in vals.items()}
    if len(out) == 1:
        return next(iter(out.values()))
    return {f"{name}_{k}": v for name, m in out.items() for k, v in m.items() if k != "roc"}


def _teacher_checkpoint(cfg: TrainConfig, out: Path, rank: int) -> Path:
    """The teacher's mdk checkpoint: ``--teacher`` itself, or, for an arcface_torch run directory, its
    import into ``<out>/teacher_import.pt`` (rank 0 writes it, kept while the run's files are unchanged)."""
    src = Path(cfg.teacher)
    if not src.is_dir():
        return src
    from mdkernels.interop import insightface
    from mdkernels.train import teacher

    if not cfg.teacher_network:
        raise ValueError(f"--teacher {src} is an arcface_torch run directory: name its network with "
                         f"--teacher-network (one of {insightface.INSIGHTFACE_NETWORKS})")  # fmt: skip
    path = out / "teacher_import.pt"
    if rank == 0:
        teacher.import_run_cached(src, cfg.teacher_network, path)
    if dist.is_initialized():
        dist.barrier()
    return path


def _init_centers(loss_fn, src: str, num_classes: int, dim: int, sharded: bool, rank: int, world: int) -> None:
    """Start the head from saved centers (``--init-centers``): an arcface_torch run directory, a folder of
    ``mdk reshard`` shards (each rank reads its own file when sharded), an mdk checkpoint or a tensor file."""
    from mdkernels.interop import insightface

    head = getattr(loss_fn, "head", None)
    if head is None or getattr(head, "K", 1) != 1:
        raise ValueError("--init-centers needs a head with one center per class (arcface/cosface/sphereface, the "
                         "margin family but sub-center, angular, triplet)")  # fmt: skip
    if sharded and Path(src).is_dir() and any(Path(src).glob("centers_rank*_of*.pt")):
        part = insightface.mdk_shard(src, rank, world)
        if part["num_classes"] != num_classes or part["weight"].shape[1] != dim:
            raise ValueError(f"{src}: shards of ({part['num_classes']}, {part['weight'].shape[1]}) centers, the run "
                             f"needs ({num_classes}, {dim})")  # fmt: skip
        with torch.no_grad():
            head.weight.copy_(part["weight"])
        return
    full = insightface.load_full_centers(src, num_classes)
    if full.shape[1] != dim:
        raise ValueError(f"{src}: {full.shape[1]}-d centers, but --embedding-size is {dim}")
    with torch.no_grad():
        if sharded:
            head.load_full_weight(full)
        else:
            head.weight.copy_(full)
