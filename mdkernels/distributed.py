"""Class centers sharded over ``torch.distributed`` (Partial FC style), exact.

Rank ``r`` holds rows ``[class_start, class_start + C_r)`` of the global ``(C, D)`` center matrix.
Each rank gathers the global batch (embeddings and labels), runs the fused kernel over its shard only,
and the per-row statistics are combined with all-reduces. The logsumexp uses MAX then SUM. The
target cosine comes from the owning rank (a SUM with zeros elsewhere). Every rank then holds the same
global-batch loss, and the gradients are the exact gradients of it:

* centers: each rank gets the gradient of its own rows;
* embeddings: the forward all-reduces each rank's share of the fused accumulator ``o_bar`` (the non-target
  part of ``dL/dn(x)`` per unit of upstream gradient, rescaled to the global logsumexp) together with the
  owning rank's ``n(w_y)``, in one collective of ``(B_global, 2D)``. The backward then needs no collective and
  no GEMM for the embeddings: every rank forms the whole gathered batch's gradient and keeps its rows.
  With DDP on the backbone, DDP then *averages* the backbone gradients over ranks, which
  divides the exact gradient of the global loss by the world size. ``embedding_grad_scale=world_size``
  undoes that, as insightface's Partial FC does, so that a DDP step equals a single-process step on the
  global batch.

``sample_rate < 1`` is Partial FC's negative-class sampling. Each rank keeps every positive class of
the global batch that it owns, plus uniformly sampled negatives up to ``ceil(sample_rate * C_r)``.
Labels are remapped, and it is reproducible with a ``generator``.

Any rank whose arguments are bad raises a ``ValueError``, and so does every other rank: before the heavy
collectives the ranks exchange an error flag and their batch size in one all-reduce of a few integers on the
host (a gloo group: no GPU work, no device sync; :func:`collective_check`). Label values are checked on the
device from the gathered batch, so every rank sees the same bad label: a later call raises on every rank, the
first call at which every rank's flag has landed (the ranks agree on it in the same host handshake: no rank waits
for its GPU). A step makes no host sync. A crashed rank
makes the others fail after the process group's timeout rather than hang.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from mdkernels import _validate as V
from mdkernels import backends
from mdkernels._collective import across_ranks as _across_ranks
from mdkernels._collective import collective_check, host_group  # noqa: F401 (part of this module's API)
from mdkernels._collective import world_of as _world
from mdkernels._math import compute_dtype, margin_rows
from mdkernels._plan import autocast_operands
from mdkernels.ops import margin_ce
from mdkernels.ops._common import center_update
from mdkernels.ops._common.env import ieee_fp32_matmul, no_autocast, operand_dtype
from mdkernels.ops._common.margin import NonTarget, distillation_margins, margin_target_and_slope
from mdkernels.ops.l2norm import l2_normalize, normalize_backward, row_rnorm


def shard_range(num_classes: int, rank: int, world: int, sizes: list[int] | None = None) -> tuple[int, int]:
    """``(class_start, num_local)`` of ``rank``: an even split (the first ``C % world`` ranks get one more)
    or explicit ``sizes`` per rank."""
    if sizes is not None:
        if len(sizes) != world or sum(sizes) != num_classes or min(sizes) < 0:
            raise ValueError(f"sizes {sizes} must give {world} non-negative shard sizes summing to {num_classes}")
        return sum(sizes[:rank]), sizes[rank]
    base, extra = divmod(num_classes, world)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


class _GatherRows(torch.autograd.Function):
    """All-gather of equal-sized row blocks. Backward: every rank holds the gradient of the whole gathered
    batch (the sharded op forms it from all-reduced statistics), so each keeps its own rows (scaled)."""

    @staticmethod
    def forward(ctx, x, group, scale):
        rank, world = _world(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.rank, ctx.rows, ctx.scale = rank, x.shape[0], scale
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        out = grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]
        return (out * ctx.scale if ctx.scale != 1.0 else out), None, None


def gather_rows(t: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``t`` (equal shapes), concatenated in rank order; no gradient."""
    _, world = _world(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


_gather_plain = gather_rows


class _ShardedMarginCE(torch.autograd.Function):
    """Per-row loss of the global batch against sharded centers (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, w, local_target, valid, m2, s, m1, m3, fallback, grad, tau, backend, group, rows_local,
                need_dx, op_dtype="", fused=None):  # fmt: skip
        ctx.fused = fused  # (the shard's parameter, the sampled rows or None): its fused center update, or None
        with no_autocast(x), ieee_fp32_matmul(x):  # the op's own precision: autocast's 16-bit operands, or fp32
            return _ShardedMarginCE._forward(ctx, x, w, local_target, valid, m2, s, m1, m3, fallback, grad, tau,
                                             backend, group, rows_local, need_dx, op_dtype)  # fmt: skip

    @staticmethod
    def _forward(ctx, x, w, local_target, valid, m2, s, m1, m3, fallback, grad, tau, backend, group, rows_local,
                 need_dx, op_dtype):  # fmt: skip
        cd = compute_dtype(x)
        rx, rw = row_rnorm(x, use_cuda=backend == "cuda"), row_rnorm(w, use_cuda=backend == "cuda")
        here = local_target >= 0
        safe = local_target.clamp_min(0)
        # target cosine from the owning rank (zeros elsewhere), summed over ranks
        if w.shape[0]:
            raw_t = (x.to(cd) * w[safe].to(cd)).sum(1) * rx * rw[safe]
            raw_t = torch.where(here, raw_t, torch.zeros_like(raw_t))
        else:
            raw_t = torch.zeros(x.shape[0], dtype=cd, device=x.device)
        dist.all_reduce(raw_t, group=group)
        cos_t = raw_t.clamp(-1.0, 1.0)
        z_t, _, _ = margin_target_and_slope(cos_t, m2.to(cd), s=s, m1=m1, m3=m3, fallback=fallback, grad=grad)
        # local non-target logsumexp (and accumulator), then the global ones: max, then sum
        if w.shape[0]:
            nt = NonTarget(tau)
            lse_local, o_local = margin_ce.BACKENDS[backend].forward(x, w, local_target, rx, rw, s, nt, need_dx,
                                                                     op_dtype=operand_dtype(op_dtype))  # fmt: skip
        else:
            lse_local = torch.full_like(cos_t, -math.inf)
            o_local = torch.zeros_like(x, dtype=cd) if need_dx else None
        m = lse_local.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        total = torch.exp(lse_local - m)
        dist.all_reduce(total, group=group)
        lse_nt = m + torch.log(total)
        lse = torch.where(valid, torch.logaddexp(lse_nt, z_t), lse_nt)
        loss_rows = torch.where(valid, lse - z_t, torch.zeros_like(lse))
        o_bar = w_y = x.new_empty(0, x.shape[1], dtype=cd)
        if need_dx:  # this rank's share of o_bar and its n(w_y), summed over ranks in one collective
            share = torch.exp(lse_local - lse).nan_to_num_(0.0)[:, None]
            w_y = w[safe].to(cd) * rw[safe, None] if w.shape[0] else torch.zeros_like(o_local)
            both = torch.cat([o_local * share, torch.where(here[:, None], w_y, torch.zeros_like(w_y))], 1)
            dist.all_reduce(both, group=group)
            o_bar, w_y = both.split(x.shape[1], dim=1)
        ctx.save_for_backward(x, w, local_target, valid, m2, lse, cos_t, raw_t, rx, rw, o_bar, w_y)
        ctx.args = (s, m1, m3, fallback, grad, tau, backend, op_dtype)
        ctx.group, ctx.rows_local = group, rows_local
        return loss_rows

    @staticmethod
    def backward(ctx, grad_rows):
        with no_autocast(grad_rows), ieee_fp32_matmul(ctx.saved_tensors[0]):
            return _ShardedMarginCE._backward(ctx, grad_rows)

    @staticmethod
    def _backward(ctx, grad_rows):
        x, w, local_target, valid, m2, lse, cos_t, raw_t, rx, rw, o_bar, w_y = ctx.saved_tensors
        s, m1, m3, fallback, grad, tau, backend, op_dtype = ctx.args
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.rows_local:  # reduction="none": each rank back-propagates only its own rows; share them
            grad_rows = grad_rows.contiguous().clone()
            dist.all_reduce(grad_rows, group=ctx.group)
        cd = rx.dtype
        gr = torch.where(valid, grad_rows.to(cd), torch.zeros_like(lse))
        z_t, slope, _ = margin_target_and_slope(cos_t, m2.to(cd), s=s, m1=m1, m3=m3, fallback=fallback, grad=grad)
        coef = margin_ce.target_coefficient(gr, z_t, lse, raw_t, slope)
        dx = dw = None
        if need_dx:  # the whole gathered batch's gradient, identical on every rank: no collective, no GEMM
            dx = normalize_backward(x, o_bar * gr[:, None] + coef[:, None] * w_y, use_cuda=backend == "cuda")
        step = None
        if need_dw and ctx.fused is not None:  # this rank's shard takes its update here (docs/center_update.md)
            param, index = ctx.fused
            step = center_update.claim(param if index is None else w, index=index, param=param)
        if need_dw:
            if w.shape[0]:  # the target term goes to the rows of this shard only (local_target >= 0)
                dw = margin_ce.BACKENDS[backend].center_grad(x, w, local_target, rx, rw, lse, gr, coef, raw_t, s,
                                                             NonTarget(tau), op_dtype=operand_dtype(op_dtype),
                                                             step=step)  # fmt: skip
            else:
                dw = torch.zeros_like(w) if step is None else None
            if step is not None and ctx.fused[1] is not None:  # the unsampled rows: torch.optim's zero-gradient step
                keep = torch.zeros(ctx.fused[0].shape[0], dtype=torch.bool, device=w.device)
                keep[ctx.fused[1]] = True
                step.apply_zero(keep)
        return dx, dw, *(None,) * 15


def sample_size(num_local: int, sample_rate: float, global_batch: int) -> int:
    """Classes kept on a rank with negative sampling: ``ceil(sample_rate * C_r)``, and never fewer than the
    global batch (the most positives a shard can have), so that every positive is kept without counting them
    (a count would be a host sync)."""
    return min(num_local, max(math.ceil(sample_rate * num_local), global_batch))


def _sample_classes(local: torch.Tensor, num_local: int, keep: int, generator):
    """Indices (sorted) of this rank's ``keep`` kept classes: every positive (``local >= 0``), then uniform
    random negatives; all on the device, no host sync."""
    positive = torch.zeros(num_local, dtype=torch.int32, device=local.device)
    positive.index_add_(0, local.clamp_min(0), (local >= 0).to(torch.int32))
    score = torch.rand(num_local, generator=generator, device=local.device)
    score = torch.where(positive > 0, torch.full_like(score, 2.0), score)  # positives always kept
    return torch.topk(score, keep).indices.sort().values


@_across_ranks
def sharded_margin_cross_entropy(
    embeddings: torch.Tensor,
    local_centers: torch.Tensor,
    labels: torch.Tensor,
    *,
    class_start: int,
    num_classes: int,
    group=None,
    sample_rate: float = 1.0,
    generator: torch.Generator | None = None,
    embedding_grad_scale: float = 1.0,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float | torch.Tensor = 0.5,
    m3: float = 0.0,
    fallback: bool = True,
    grad: str = "exact",
    interclass_filter: float | None = None,
    ignore_index: int = -1,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Margin cross-entropy of the global batch against centers sharded over ranks.

    embeddings: (B_local, D) this rank's batch (every rank the same B_local); labels: (B_local,) global
    class ids; local_centers: (C_r, D), rows ``[class_start, class_start + C_r)`` of the ``(num_classes,
    D)`` matrix. ``m2`` as a tensor is per row of this rank's batch. Returns the global-batch loss
    (identical on every rank). Other arguments as :func:`mdkernels.margin_cross_entropy`.
    """
    rank, world = _world(group)
    op_dtype = autocast_operands(embeddings)  # under torch.autocast: the single head's 16-bit operands, here too
    error = None
    try:
        V.check_margin_ce_args(embeddings, local_centers, labels, s=s, m1=m1, m2=m2, grad=grad, reduction=reduction,
                               centers_name="local_centers")  # fmt: skip
        if not 0 <= class_start <= num_classes - local_centers.shape[0]:
            raise ValueError(
                f"class_start={class_start} with {local_centers.shape[0]} local centers does not fit in "
                f"num_classes={num_classes}"
            )
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if generator is not None and generator.device != embeddings.device:
            raise ValueError(f"generator is on {generator.device} but the embeddings are on {embeddings.device}: "
                             "pass torch.Generator(device=embeddings.device) (no per-step host-to-device copy)")
        # the sharded path is always fused ('reference' means the unsharded oracle); 'cuda' with CPU tensors
        # is an error here, before any collective or launch
        fusing = local_centers.requires_grad and center_update.bound(local_centers)
        backend = backends.resolve("margin_ce", "torch" if backend == "reference" else backend, embeddings,
                                   autocast=bool(op_dtype), center_update=fusing)  # fmt: skip
    except (ValueError, TypeError, RuntimeError) as err:
        error = str(err)
    ready = collective_check(error, group, embeddings.shape[0] if isinstance(embeddings, torch.Tensor) else 0,
                             V.pending_ready_upto())  # fmt: skip
    # an earlier call's bad labels: every rank flagged the same ones (checked on the gathered batch), and raises
    # them at this same call, once every rank's flag has landed: no rank waits for its GPU
    V.raise_pending(upto=ready)
    m2_rows = margin_rows(m2, embeddings)
    x = _GatherRows.apply(embeddings, group, float(embedding_grad_scale))
    y = _gather_plain(labels.long(), group)
    m2_all = _gather_plain(m2_rows, group)
    valid = V.label_mask(y, num_classes, ignore_index)  # on the gathered batch: every rank flags the same rows
    num_local = local_centers.shape[0]
    in_shard = valid & (y >= class_start) & (y < class_start + num_local)
    local = torch.where(in_shard, y - class_start, torch.full_like(y, -1))
    w = local_centers
    if sample_rate < 1.0 and num_local:
        index = _sample_classes(local, num_local, sample_size(num_local, sample_rate, y.shape[0]), generator)
        remap = torch.full((num_local,), -1, dtype=torch.long, device=y.device)
        remap[index] = torch.arange(index.numel(), device=y.device)
        local = torch.where(in_shard, remap[local.clamp_min(0)], local)
        w = local_centers[index]
    tau = None if interclass_filter is None else float(interclass_filter)
    need_dx = torch.is_grad_enabled() and embeddings.requires_grad
    fused = None
    if torch.is_grad_enabled() and local_centers.requires_grad and center_update.bound(local_centers):
        fused = (local_centers, index if sample_rate < 1.0 and num_local else None)
    loss_rows = _ShardedMarginCE.apply(x, w, local, valid, m2_all, float(s), float(m1), float(m3), bool(fallback),
                                       grad, tau, backend, group, reduction == "none", need_dx, op_dtype,
                                       fused)  # fmt: skip
    if reduction == "none":
        return loss_rows[rank * embeddings.shape[0] : (rank + 1) * embeddings.shape[0]]
    total = loss_rows.sum()
    return total if reduction == "sum" else total / valid.sum().clamp_min(1).to(total.dtype)


@_across_ranks
def sharded_margin_distillation_loss(
    embeddings: torch.Tensor,
    local_teacher_centers: torch.Tensor,
    labels: torch.Tensor,
    *,
    class_start: int,
    num_classes: int,
    teacher_embeddings: torch.Tensor | None = None,
    teacher_cos: torch.Tensor | None = None,
    s: float = 64.0,
    m_min: float = 0.2,
    m_max: float = 0.5,
    dmax: str | float = "global",
    fallback: bool = False,
    group=None,
    **kwargs,
) -> torch.Tensor:
    """MarginDistillation with sharded, frozen teacher centers. ``cT_i`` comes from the rank owning
    ``y_i``; ``dmax="global"``/``"batch"`` is the max over the global batch (an all-reduce)."""
    if (teacher_embeddings is None) == (teacher_cos is None):
        raise ValueError("pass exactly one of teacher_embeddings (B, D) or teacher_cos (B,)")
    ignore_index = kwargs.get("ignore_index", -1)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)  # the head flags the others
    if teacher_cos is None:
        t_all = _gather_plain(teacher_embeddings.detach(), group)
        y_all = _gather_plain(labels.long(), group)
        here_all = (y_all != ignore_index) & (y_all >= class_start) & (y_all < class_start + len(local_teacher_centers))
        local = torch.where(here_all, y_all - class_start, torch.zeros_like(y_all))
        c = torch.zeros(y_all.shape[0], dtype=compute_dtype(embeddings), device=embeddings.device)
        if len(local_teacher_centers):
            w_y = local_teacher_centers.detach()[local]
            ct = (l2_normalize(t_all.to(c.dtype)) * l2_normalize(w_y.to(c.dtype))).sum(1)
            c = torch.where(here_all, ct.to(c.dtype), c)
        dist.all_reduce(c, group=group)
        rank, _ = _world(group)
        teacher_cos = c[rank * labels.shape[0] : (rank + 1) * labels.shape[0]]
    teacher_cos = teacher_cos.detach().to(compute_dtype(embeddings))
    if isinstance(dmax, str):  # the global max stays on the device: no host sync
        if dmax not in ("batch", "global"):
            raise ValueError(f"dmax must be 'batch', 'global' or a positive float, got {dmax!r}")
        dmax = torch.where(valid, teacher_cos, torch.full_like(teacher_cos, -math.inf)).max()
        dist.all_reduce(dmax, op=dist.ReduceOp.MAX, group=group)
    m = distillation_margins(teacher_cos, valid, m_min=m_min, m_max=m_max, dmax=dmax)
    return sharded_margin_cross_entropy(
        embeddings, local_teacher_centers.detach(), labels, class_start=class_start, num_classes=num_classes,
        group=group, s=s, m1=1.0, m2=m, m3=0.0, fallback=fallback, **kwargs,
    )  # fmt: skip


def sharded_proxyless_kd_loss(embeddings, local_teacher_centers, labels, *, class_start, num_classes,
                              margin="arcface", s=64.0, m=0.5, group=None, **kwargs):  # fmt: skip
    """ProxylessKD with sharded, frozen teacher centers."""
    V.check_proxyless_dims(embeddings, local_teacher_centers)
    m1, m2, m3 = V.margin_triple(margin, m)
    return sharded_margin_cross_entropy(
        embeddings, local_teacher_centers.detach(), labels, class_start=class_start, num_classes=num_classes,
        group=group, s=s, m1=m1, m2=m2, m3=m3, **kwargs,
    )  # fmt: skip


class _ShardedCenters:
    """The full ``(C, D)`` matrix to and from this rank's rows (checkpoints move between world sizes)."""

    @torch.no_grad()
    def load_full_weight(self, full: torch.Tensor) -> None:
        if full.shape != (self.num_classes, self.embedding_size):
            raise ValueError(
                f"full weight must be ({self.num_classes}, {self.embedding_size}), got {tuple(full.shape)}"
            )
        self.weight.copy_(full[self.class_start : self.class_start + self.num_local])

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The full ``(C, D)`` matrix on every rank (shards padded to the largest, gathered, trimmed)."""
        biggest = max(self.sizes)
        padded = self.weight.new_zeros(biggest, self.embedding_size)
        padded[: self.num_local] = self.weight
        parts = gather_rows(padded, self.group).split(biggest)
        return torch.cat([p[:n] for p, n in zip(parts, self.sizes, strict=True)])

    def _shard(self, embedding_size: int, num_classes: int, sizes, group) -> torch.Generator:
        rank, world = _world(group)
        self.group, self.num_classes, self.embedding_size = group, num_classes, embedding_size
        self.class_start, self.num_local = shard_range(num_classes, rank, world, sizes)
        self.sizes = [shard_range(num_classes, r, world, sizes)[1] for r in range(world)]
        # a generator per rank: shards seeded alike would start with identical centers
        return torch.Generator().manual_seed(torch.initial_seed() + 1_000_003 * (rank + 1))


class ShardedMarginHead(_ShardedCenters, nn.Module):
    """A margin-softmax head whose ``(C, D)`` centers are split over the ranks of ``group``.

    ``weight`` holds this rank's rows ``[class_start, class_start + num_local)`` (even split, or
    ``sizes``). ``load_full_weight(W)`` takes a full ``(C, D)`` matrix (e.g. from an unsharded
    :class:`mdkernels.nn.ArcFace` checkpoint) and ``full_weight()`` gathers it back on every rank, so
    checkpoints move between world sizes.
    """

    centers_name = "weight"  # this rank's shard (mdkernels.fuse_center_update finds heads by it)


    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m1: float = 1.0, m2: float = 0.5,
                 m3: float = 0.0, *, sizes: list[int] | None = None, group=None, sample_rate: float = 1.0,
                 embedding_grad_scale: float | None = None, **margin_kwargs) -> None:  # fmt: skip
        super().__init__()
        g = self._shard(embedding_size, num_classes, sizes, group)
        self.s, self.m1, self.m2, self.m3, self.sample_rate = s, m1, m2, m3, sample_rate
        self.embedding_grad_scale = float(_world(group)[1] if embedding_grad_scale is None else embedding_grad_scale)
        self.margin_kwargs = margin_kwargs
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_local, embedding_size), generator=g))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, generator=None) -> torch.Tensor:
        return sharded_margin_cross_entropy(
            embeddings, self.weight, labels, class_start=self.class_start, num_classes=self.num_classes,
            group=self.group, sample_rate=self.sample_rate, generator=generator,
            embedding_grad_scale=self.embedding_grad_scale, s=self.s, m1=self.m1, m2=self.m2, m3=self.m3,
            **self.margin_kwargs,
        )  # fmt: skip


class ShardedAdaDistill(_ShardedCenters, nn.Module):
    """AdaDistill (:class:`mdkernels.nn.AdaDistill`) with its ``(C, D)`` centers split over the ranks of ``group``.

    ``weight`` (a buffer) holds this rank's rows ``[class_start, class_start + num_local)``. Every rank gathers
    the global batch (student and teacher rows, labels) and applies the updates that fall in its shard, in
    global batch order, so the shards together equal the unsharded centers after the same batches; the loss
    is :func:`sharded_margin_cross_entropy` on the updated, frozen shards (the global batch's loss on every rank).
    ``load_full_weight`` / ``full_weight`` move the centers between world sizes."""

    def __init__(self, embedding_size: int, num_classes: int, margin: str = "arcface", s: float = 64.0,
                 m: float | None = None, *, sizes: list[int] | None = None, group=None, update: bool = True,
                 embedding_grad_scale: float | None = None, ignore_index: int = -1,
                 backend: str = "auto") -> None:  # fmt: skip
        super().__init__()
        from mdkernels.functional import adadistill_options
        from mdkernels.ops._common.centers import normal_rows

        self.options = adadistill_options(margin, m)
        self._shard(embedding_size, num_classes, sizes, group)
        self.margin, self.s, self.update = margin, float(s), update
        self.ignore_index, self.backend = ignore_index, backend
        self.embedding_grad_scale = float(_world(group)[1] if embedding_grad_scale is None else embedding_grad_scale)
        # the unsharded module's rows: the same start whatever the number of ranks
        self.register_buffer("weight", normal_rows(self.class_start, self.num_local, embedding_size))
        self.last_alpha: torch.Tensor | None = None

    def forward(self, student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:  # fmt: skip
        from mdkernels.ops._common.centers import adadistill_update_
        from mdkernels.ops._common.env import no_autocast

        w = self.weight
        x = student_embeddings.to(w.dtype) if student_embeddings.dtype != w.dtype else student_embeddings
        if self.update:
            V.check_matrix(teacher_embeddings, "teacher_embeddings", rows=x.shape[0], cols=x.shape[1])
            s_all, t_all = gather_rows(x.detach(), self.group), gather_rows(teacher_embeddings.detach().to(w.dtype),
                                                                             self.group)  # fmt: skip
            y = gather_rows(labels.long(), self.group)
            here = ((y != self.ignore_index) & (y >= self.class_start) & (y < self.class_start + self.num_local)
                    & (y < self.num_classes))  # fmt: skip
            with no_autocast(w):
                alpha = adadistill_update_(w, s_all, t_all, y - self.class_start, here)
            rank, _ = _world(self.group)
            self.last_alpha = alpha[rank * x.shape[0] : (rank + 1) * x.shape[0]]  # 0 where another shard owns y
        opts = dict(self.options)
        if self.margin == "arcface":
            opts["m2"] = margin_rows(opts["m2"], x)
        return sharded_margin_cross_entropy(x, w.detach(), labels, class_start=self.class_start,
                                            num_classes=self.num_classes, group=self.group,
                                            embedding_grad_scale=self.embedding_grad_scale, s=self.s,
                                            ignore_index=self.ignore_index, backend=self.backend, **opts)  # fmt: skip


class ShardedMarginDistillation(_ShardedCenters, nn.Module):
    """MarginDistillation (:class:`mdkernels.nn.MarginDistillation`) with the teacher's frozen centers split
    over the ranks of ``group``: ``weight`` (a buffer) holds this rank's rows of ``teacher_centers``;
    ``forward(embeddings, labels, teacher_embeddings=None, teacher_cos=None)`` is
    :func:`sharded_margin_distillation_loss` (Dmax over the global batch)."""

    def __init__(self, teacher_centers: torch.Tensor, s: float = 64.0, m_min: float = 0.2, m_max: float = 0.5,
                 *, sizes: list[int] | None = None, group=None, embedding_grad_scale: float | None = None,
                 backend: str = "auto") -> None:  # fmt: skip
        super().__init__()
        if not isinstance(teacher_centers, torch.Tensor) or teacher_centers.dim() != 2:
            raise ValueError("teacher_centers must be a (C, D) tensor (the teacher head's weight)")
        self._shard(teacher_centers.shape[1], teacher_centers.shape[0], sizes, group)
        local = teacher_centers.detach()[self.class_start : self.class_start + self.num_local].clone()
        self.register_buffer("weight", local)
        self.s, self.m_min, self.m_max, self.backend = float(s), m_min, m_max, backend
        self.embedding_grad_scale = float(_world(group)[1] if embedding_grad_scale is None else embedding_grad_scale)

    def forward(self, embeddings, labels, teacher_embeddings=None, teacher_cos=None):
        w = self.weight
        return sharded_margin_distillation_loss(
            embeddings.to(w.dtype), w, labels, class_start=self.class_start, num_classes=self.num_classes,
            teacher_embeddings=None if teacher_embeddings is None else teacher_embeddings.to(w.dtype),
            teacher_cos=teacher_cos, s=self.s, m_min=self.m_min, m_max=self.m_max, group=self.group,
            embedding_grad_scale=self.embedding_grad_scale, backend=self.backend,
        )  # fmt: skip
