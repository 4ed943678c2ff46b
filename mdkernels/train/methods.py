"""The loss of each ``--method`` of ``mdk train``, the monitoring accuracy, and the cached teacher data."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import mdkernels
from mdkernels.data import datasets as D
from mdkernels.models.checkpoint import backbone_from_checkpoint, load_checkpoint
from mdkernels.nn.heads import insightface_margin_options
from mdkernels.train.config import DISTILL, FAMILY, TrainConfig

# the methods whose centers --sharded splits over the ranks (the others' would be silently replicated)
SHARDED = ("arcface", "cosface", "sphereface", "angular", "triplet", "margindistill", "adadistill")


def family_head(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The :mod:`mdkernels.nn.margins` head of ``--method`` (one of ``FAMILY``) with the config's options."""
    E, C, m, b = cfg.embedding_size, num_classes, cfg.margin(), cfg.backend
    if cfg.method == "adaface":
        return mdkernels.nn.AdaFace(E, C, m=m, h=cfg.h, s=cfg.s, t_alpha=cfg.t_alpha, grad=cfg.margin_grad, backend=b)
    if cfg.method == "curricularface":
        return mdkernels.nn.CurricularFace(E, C, m=m, s=cfg.s, momentum=cfg.curricular_momentum, backend=b)
    if cfg.method == "magface":
        return mdkernels.nn.MagFace(E, C, s=cfg.s, l_a=cfg.l_a, u_a=cfg.u_a, l_m=cfg.l_m, u_m=cfg.u_m,
                                    lambda_g=cfg.lambda_g, easy_margin=cfg.easy_margin, backend=b)  # fmt: skip
    if cfg.method == "elasticface":
        if cfg.elastic not in ("arc", "cos"):
            raise ValueError(f"--elastic must be 'arc' or 'cos', got {cfg.elastic!r}")
        cls = mdkernels.nn.ElasticArcFace if cfg.elastic == "arc" else mdkernels.nn.ElasticCosFace
        return cls(E, C, s=cfg.s, m=m, std=cfg.elastic_std, plus=cfg.elastic_plus, plus_order=cfg.plus_order,
                   backend=b)  # fmt: skip
    if cfg.method == "subcenter":
        return mdkernels.nn.SubCenterArcFace(E, C, K=cfg.subcenters, s=cfg.s, m=m, backend=b)
    raise ValueError(f"{cfg.method!r} is not one of the margin family {FAMILY}")


class MethodLoss(nn.Module):
    """``forward(emb, labels, index) -> loss``; owns the head and any adapter; reads cached teacher data."""

    def __init__(self, cfg: TrainConfig, num_classes: int, teacher: dict | None, group=None) -> None:
        super().__init__()
        self.cfg, self.method = cfg, cfg.method
        m, backend = cfg.margin(), cfg.backend
        margins = {"arcface": (1.0, m, 0.0), "cosface": (1.0, 0.0, m), "sphereface": (m, 0.0, 0.0)}
        if cfg.method in ("arcface", "cosface", "sphereface", "angular", "triplet"):
            m1, m2, m3 = cfg.margin_triple() or margins.get(cfg.method, margins["arcface"])
            opts = {"backend": backend}
            if cfg.margin_list is not None:  # arcface_torch's CombinedMarginLoss numerics
                opts.update(insightface_margin_options(m1, m2, m3, cfg.interclass_filter))
            elif cfg.interclass_filter > 0:
                opts["interclass_filter"] = cfg.interclass_filter
            sharded = cfg.sharded and dist.is_initialized()
            if not 0 < cfg.sample_rate <= 1:
                raise ValueError(f"--sample-rate must be in (0, 1], got {cfg.sample_rate}")
            if cfg.sample_rate < 1 and not sharded:
                raise ValueError(f"--sample-rate {cfg.sample_rate} (Partial FC negative sampling) needs --sharded "
                                 "under torchrun; pass --sample-rate 1 on one process")  # fmt: skip
            if sharded:
                from mdkernels.distributed import ShardedMarginHead

                self.head = ShardedMarginHead(cfg.embedding_size, num_classes, cfg.s, m1, m2, m3,
                                              sample_rate=cfg.sample_rate, **opts)  # fmt: skip
            else:
                self.head = mdkernels.nn.CombinedMargin(cfg.embedding_size, num_classes, cfg.s, m1, m2, m3, **opts)
        elif cfg.margin_list is not None or cfg.interclass_filter > 0 or cfg.sample_rate != 1:
            raise ValueError(f"--margin-list, --interclass-filter and --sample-rate belong to arcface/cosface/"
                             f"sphereface (and the angular/triplet heads), not --method {cfg.method}")  # fmt: skip
        elif cfg.method in FAMILY:
            if cfg.sharded:
                raise ValueError(f"--sharded covers {', '.join(SHARDED)}, not --method {cfg.method}")
            self.head = family_head(cfg, num_classes)
        if cfg.sharded and cfg.method not in SHARDED:
            raise ValueError(f"--sharded covers {', '.join(SHARDED)}, not --method {cfg.method}")
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
            if cfg.method == "margindistill" and cfg.sharded and dist.is_initialized():
                from mdkernels.distributed import ShardedMarginDistillation  # the teacher's centers, sharded

                self.head = ShardedMarginDistillation(centers, s=cfg.s, m_min=cfg.m_min, m_max=cfg.m_max,
                                                      backend=backend)  # fmt: skip
            elif cfg.method == "margindistill":
                self.loss = mdkernels.nn.MarginDistillation(centers, s=cfg.s, m_min=cfg.m_min, m_max=cfg.m_max,
                                                            backend=backend)  # fmt: skip
            elif cfg.method == "proxyless":
                self.loss = mdkernels.nn.ProxylessKD(centers, s=cfg.s, m=m, backend=backend,
                                                     projection=cfg.embedding_size != t_dim,
                                                     embedding_size=cfg.embedding_size)  # fmt: skip
            elif cfg.method == "hinton":
                self.loss = mdkernels.nn.MarginKD(centers, T=cfg.T, alpha=cfg.alpha, s=cfg.s, m2=m, backend=backend)
            elif cfg.method == "adadistill":  # its own centers, moved toward the teacher's embeddings
                if cfg.sharded and dist.is_initialized():
                    from mdkernels.distributed import ShardedAdaDistill

                    self.head = ShardedAdaDistill(cfg.embedding_size, num_classes, cfg.adadistill_margin, cfg.s, m,
                                                  backend=backend)  # fmt: skip
                else:
                    self.head = mdkernels.nn.AdaDistill(cfg.embedding_size, num_classes, cfg.adadistill_margin, cfg.s,
                                                        m, backend=backend)  # fmt: skip
            else:
                self.adapter = nn.Linear(cfg.embedding_size, t_dim, bias=False) if cfg.embedding_size != t_dim else None
            if cfg.method in ("margindistill", "hinton", "adadistill") and cfg.embedding_size != t_dim:
                raise ValueError(f"--method {cfg.method} needs the student's embedding size ({cfg.embedding_size}) "
                                 f"to equal the teacher's ({t_dim})")  # fmt: skip

    def monitored(self, emb: torch.Tensor) -> torch.Tensor:
        """The embedding that is compared with :meth:`centers` (after ProxylessKD's projection)."""
        projection = getattr(getattr(self, "loss", None), "projection", None)
        return projection(emb.float()) if projection is not None else emb

    @property
    def rows_per_class(self) -> int:
        """Rows of :meth:`centers` per class: K for a sub-center head (row ``c*K + k``), else 1."""
        return getattr(getattr(self, "head", None), "K", 1)

    def centers(self) -> torch.Tensor:
        """The class centers used for monitoring accuracy (``(C K, D)`` for a sub-center head)."""
        if hasattr(self, "head"):
            return self.head.weight
        return self.loss.teacher_centers if hasattr(self.loss, "teacher_centers") else self.loss.centers

    def forward(self, emb: torch.Tensor, labels: torch.Tensor,
                teacher_rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The loss of a batch. ``teacher_rows``: the batch's cached teacher embeddings ``(B, Dt)``, already on
        the device (the trainer's loader reads them with the images: :class:`WithTeacherRows`)."""
        emb = emb.float()
        method, cfg = self.method, self.cfg
        t = None
        if self.teacher_emb is not None:
            if teacher_rows is None:
                raise ValueError(f"--method {method} needs the batch's teacher embeddings (WithTeacherRows)")
            t = teacher_rows.to(device=emb.device, dtype=torch.float32)
        if method in ("arcface", "cosface", "sphereface", *FAMILY):
            return self.head(emb, labels)
        if method == "margindistill":
            return (self.head if hasattr(self, "head") else self.loss)(emb, labels, teacher_embeddings=t)
        if method == "proxyless":
            return self.loss(emb, labels)
        if method == "hinton":
            return self.loss(emb, t, labels)
        if method == "adadistill":
            return self.head(emb, t, labels)
        student = self.adapter(emb) if self.adapter is not None else emb
        if method == "angular":
            extra = mdkernels.angular_distillation_loss(student, t, p=cfg.p, backend=cfg.backend)
        else:
            extra = mdkernels.triplet_distillation_loss(student, t, labels=labels, mining=cfg.mining,
                                                        distance=cfg.distance, backend=cfg.backend)  # fmt: skip
        return self.head(emb, labels) + cfg.distill_weight * extra


class WithTeacherRows(torch.utils.data.Dataset):
    """The training set, each item with its cached teacher embedding: ``(image, label, index, teacher row)``. The
    row is read from the cache's memmap in the DataLoader's workers (the file opened once per process, never
    pickled), so it is pinned with the batch and reaches the GPU in a non-blocking copy: no host read of the
    batch's indices on the training step's path."""

    def __init__(self, dataset, path: str) -> None:
        self.dataset, self.path, self._emb = dataset, str(path), None

    def __getattr__(self, name):  # set_epoch, labels, num_classes ... of the wrapped dataset
        if name in ("dataset", "path", "_emb"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        img, label, index = self.dataset[i]
        if self._emb is None:
            self._emb = np.load(self.path, mmap_mode="r")
        return img, label, index, torch.from_numpy(np.array(self._emb[index], dtype=np.float32))

    def __getstate__(self):
        return {"dataset": self.dataset, "path": self.path, "_emb": None}

    def __setstate__(self, state):
        self.__dict__.update(state)


@torch.no_grad()
def batch_accuracy(emb: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor, chunk: int = 65536,
                   rows_per_class: int = 1) -> float:  # fmt: skip
    """Top-1 identification against the centers, chunked over classes (no B x C tensor at once); with
    ``rows_per_class`` K, row ``c*K + k`` is a sub-center of class ``c``."""
    x = torch.nn.functional.normalize(emb.float(), dim=1)
    best = torch.full((x.shape[0],), -2.0, device=x.device)
    arg = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for c0 in range(0, centers.shape[0], chunk):
        cos = x @ torch.nn.functional.normalize(centers[c0 : c0 + chunk].float(), dim=1).T
        v, i = cos.max(1)
        better = v > best
        best, arg = torch.where(better, v, best), torch.where(better, i + c0, arg)
    return (arg // rows_per_class == labels).float().mean().item()


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
    K = int(ckpt["head"].get("subcenters", 1))
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
    dominant_path = path.with_name(path.stem + "_dominant.npy")
    if path.is_file():
        emb = np.load(path, mmap_mode="r")
    else:
        model = backbone_from_checkpoint(ckpt).to(device).eval()
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        emb = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(dataset), centers.shape[1]))
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        votes = torch.zeros(centers.shape[0] // K, K, dtype=torch.long)
        subs = torch.nn.functional.normalize(centers, dim=1).view(-1, K, centers.shape[1])
        for imgs, labels, idx in loader:
            e = model(imgs.to(device)).float().cpu()
            emb[idx.numpy()] = e.numpy()
            if K > 1:  # each image votes for the nearest sub-center of its class
                near = torch.einsum("bkd,bd->bk", subs[labels], e).argmax(1)
                votes.index_put_((labels, near), torch.ones_like(near), accumulate=True)
        emb.flush()
        del emb
        if K > 1:
            np.save(dominant_path, votes.argmax(1).numpy())
        os.replace(tmp, path)
        emb = np.load(path, mmap_mode="r")
    if K > 1:  # Sub-center ArcFace's dominant sub-center: the one most of the class's images are nearest to
        dominant = torch.from_numpy(np.load(dominant_path))
        centers = centers.view(-1, K, centers.shape[1])[torch.arange(dominant.numel()), dominant]
    return {"centers": centers, "embeddings": emb, "path": str(path)}
