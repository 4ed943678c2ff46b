"""The host-side agreements of the sharded calls (:mod:`mdkernels.distributed`): a gloo group for small exchanges
that touch no CUDA stream, the per-call check that makes every rank raise when one rank's arguments are bad, and
the wrapper that makes a deferred value check raise at the same call on every rank."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from mdkernels import _validate as V


def world_of(group) -> tuple[int, int]:
    """(rank, world size) in ``group``; a clear error when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("mdkernels.distributed needs torch.distributed initialised (init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


_HOST_GROUPS: dict = {}


def host_group(group=None):
    """A gloo group over the ranks of ``group``, for the small host-side exchanges: the group itself when it is
    gloo, else one created (collectively, on first use) and kept. Its collectives run on CPU tensors over TCP:
    they never touch a CUDA stream, so they are no device sync and survive CUDA-graph capture."""
    if dist.get_backend(group) == "gloo":
        return group
    key = id(group)
    if key not in _HOST_GROUPS:
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        _HOST_GROUPS[key] = dist.new_group(ranks=ranks, backend="gloo")
    return _HOST_GROUPS[key]


def collective_check(error: str | None, group=None, batch: int = 0, ready: int = 0) -> int:
    """Raise on every rank when any rank found a problem (instead of leaving the others in a collective), and
    when the ranks' local batch sizes differ. One all-reduce of ``world + 3`` integers on the host (gloo, see
    :func:`host_group`): no GPU work and no device sync, cheap enough to run on every call. ``ready``: this rank's
    :func:`mdkernels._validate.pending_ready_upto`; returns the smallest over the ranks, the deferred checks every
    rank has seen land (so that every rank raises a bad label at the same call, without waiting for the GPU)."""
    rank, world = world_of(group)
    notes = torch.zeros(world + 3, dtype=torch.int64)  # an error flag per rank, the largest and smallest batch
    notes[rank], notes[world], notes[world + 1], notes[world + 2] = int(error is not None), batch, -batch, -ready
    dist.all_reduce(notes, op=dist.ReduceOp.MAX, group=host_group(group))
    seen = notes.numpy().tolist()  # a CPU tensor, always: reading it waits for no GPU
    if error is not None:
        raise ValueError(f"rank {rank}: {error}")
    bad = [r for r in range(world) if seen[r]]
    if bad:
        raise ValueError(f"rank(s) {bad} rejected their arguments (see their errors); this rank {rank} stops too")
    if seen[world] != -seen[world + 1]:
        raise ValueError(f"every rank must pass the same local batch size; got sizes from {-seen[world + 1]} to "
                         f"{seen[world]} (this rank {rank}: {batch})")
    return -seen[world + 2]


def across_ranks(fn):
    """A sharded call: a deferred check raises an earlier call's bad values only at the point the ranks agreed on
    (:func:`collective_check`'s ``ready``), never where one rank got first
    (:func:`mdkernels._validate.across_ranks`)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with V.across_ranks():
            return fn(*args, **kwargs)

    return wrapped
