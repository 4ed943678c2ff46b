"""Class centers that move by rules rather than by an optimizer: their seeded initialisation (the same rows
whatever the sharding) and AdaDistill's update toward the teacher (docs/math.md §8)."""

from __future__ import annotations

import torch

from mdkernels._math import compute_dtype
from mdkernels.ops.l2norm import row_rnorm

CENTER_BLOCK = 4096  # classes per seeded block of normal_rows


def normal_rows(start: int, count: int, dim: int, std: float = 0.01, seed: int | None = None) -> torch.Tensor:
    """Rows ``[start, start + count)`` of a ``N(0, std)`` center matrix whose every row depends only on the seed
    (``torch.initial_seed()`` by default) and its own index: drawn in blocks of ``CENTER_BLOCK`` classes, each from
    its own generator. A shard of it equals the same rows of the whole, so a run starts from the same centers
    whatever the number of ranks."""
    base = torch.initial_seed() if seed is None else seed
    out = torch.empty(count, dim)
    for b in range(start // CENTER_BLOCK, -(-(start + count) // CENTER_BLOCK)):
        g = torch.Generator().manual_seed((base * 1_000_003 + b) % (2**63))
        block = torch.normal(0.0, std, (CENTER_BLOCK, dim), generator=g)
        lo, hi = max(start, b * CENTER_BLOCK), min(start + count, (b + 1) * CENTER_BLOCK)
        out[lo - start : hi - start] = block[lo - b * CENTER_BLOCK : hi - b * CENTER_BLOCK]
    return out


ADADISTILL_ALPHA_MIN = 1e-6  # the official head's clamps of alpha and of the teacher-center cosine


@torch.no_grad()
def adadistill_update_(centers: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                       valid: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """AdaDistill's center update (docs/math.md §8), in place, with every row of the batch, no host sync: each
    valid row ``i`` (``targets[i]``: its row of ``centers``) moves its center toward the teacher,
    ``W <- alpha_i W + (1 - alpha_i) n(t_i)``, ``alpha_i`` from the centers as they were before the batch, and
    a class's rows compose in batch order (the reference's rule, :func:`mdkernels.reference.adadistill_update`).
    Returns ``alpha`` ``(B,)`` (0 on invalid rows).

    The composition is ``W_new = (prod_k a_k) W + sum_k (1 - a_k) (prod_{j>k} a_j) n(t_k)`` over the class's rows
    in order: the rows are sorted by class (stable), the products come from a cumulative sum of ``log a`` and
    the sums from a cumulative sum in fp64, both differences within each class's run. Every row of a class
    then writes the same new center (a scatter with duplicate indices writing identical values: deterministic,
    no atomics). O(B D), nothing of C x D."""
    B = targets.shape[0]
    cd = compute_dtype(student)
    alpha = torch.zeros(B, dtype=cd, device=student.device)
    if B == 0 or centers.shape[0] == 0:
        return alpha
    s = student.to(cd) * row_rnorm(student)[:, None]
    t = teacher.to(cd) * row_rnorm(teacher)[:, None]
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    w_y = centers[safe].to(cd)
    lam = ((w_y * row_rnorm(w_y)[:, None]) * t).sum(1).clamp(ADADISTILL_ALPHA_MIN, 1.0)
    a = ((s * t).sum(1).clamp(-1.0, 1.0) * lam).clamp(ADADISTILL_ALPHA_MIN, 1.0)
    alpha = torch.where(valid, a, torch.zeros_like(a))
    # rows sorted by class, invalid rows last (as class C); runs of one class are contiguous
    key = torch.where(valid, targets, torch.full_like(targets, centers.shape[0]))
    key, order = torch.sort(key, stable=True)
    start, end = torch.searchsorted(key, key, right=False), torch.searchsorted(key, key, right=True)
    ok = key < centers.shape[0]
    la = torch.where(ok, torch.log(a[order]).double(), torch.zeros(B, dtype=torch.float64, device=a.device))
    cla = torch.cat([la.new_zeros(1), torch.cumsum(la, 0)])  # exclusive prefix sums of log alpha
    run_total = cla[end] - cla[start]  # log of the product over the class's run
    after = cla[end] - cla[torch.arange(1, B + 1, device=a.device)]  # log of the product over the later rows
    pull = torch.where(ok, (1.0 - a[order].double()) * torch.exp(after), torch.zeros_like(after))
    v = torch.cat([t.new_zeros(1, t.shape[1]).double(), torch.cumsum(pull[:, None] * t[order].double(), 0)])
    new = torch.exp(run_total)[:, None] * centers[key.clamp(max=centers.shape[0] - 1)].double() + (v[end] - v[start])
    # rows of no class write the first row's class's value (or, without any valid row, center 0 unchanged)
    first = torch.where(ok[0], new[0], centers[0].double())
    index = torch.where(ok, key, torch.where(ok[0], key[0], torch.zeros_like(key[0])))
    new = torch.where(ok[:, None], new, first[None, :])
    centers.index_put_((index,), new.to(centers.dtype))
    return alpha
