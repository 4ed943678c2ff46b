"""What the fused ops allocate, seen from inside them: the memory contracts ("no ``B x C`` tensor", "no copy of the
centers", "no ``Q x G`` scores") are checked against every tensor an op's own implementation creates.

A ``torch.library`` custom op runs its implementation with the caller's dispatch modes switched off, so a mode
around the call sees the op's inputs and outputs, never what it allocates inside. So the ops report themselves:
each implementation runs inside :func:`inside`, which is a null context, except while a :func:`watch` is active;
then it re-enters a recording mode, and every tensor created by an aten op of the implementation (a new storage,
not a view or an in-place result) is recorded with its op and size. Kernels written outside torch (Triton's,
CUDA's, the C++ sweeps) allocate through torch in their launchers, so their buffers are recorded too.

    with probe.watch() as seen:
        loss = head(x, y); loss.backward()
    assert seen.largest() < B * C
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class Seen:
    """The tensors created while a watch was active: ``(aten op, numel, shape, dtype)`` each."""

    created: list[tuple[str, int, tuple[int, ...], torch.dtype]] = field(default_factory=list)

    def largest(self) -> int:
        return max((c[1] for c in self.created), default=0)

    def at_least(self, numel: int) -> list[tuple]:
        """The created tensors of ``numel`` elements or more."""
        return [c for c in self.created if c[1] >= numel]

    def holding(self, *dims: int) -> list[tuple]:
        """The created tensors with a dimension of each size in ``dims`` (each its own dimension, in any order):
        ``holding(C, D)`` finds a copy of the centers in any layout, ``holding(B, C)`` a logits matrix, and
        neither is fooled by a buffer that is merely large (split-C's ``(splits, B, D)`` partials)."""

        def has(shape):
            rest = list(shape)
            for d in dims:
                if d not in rest:
                    return False
                rest.remove(d)
            return True

        return [c for c in self.created if has(c[2])]

    def shaped(self, *shapes: tuple[int, ...]) -> list[tuple]:
        """The created tensors of exactly one of ``shapes`` (in any order of dimensions)."""
        want = {tuple(sorted(s)) for s in shapes}
        return [c for c in self.created if tuple(sorted(c[2])) in want]


class _Recorder(TorchDispatchMode):
    def __init__(self, seen: Seen) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # aten ops only (a custom op's implementation reports from inside it); set_ re-views a given storage
        if func.namespace == "aten" and func.overloadpacket is not torch.ops.aten.set_:
            before = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor) and t.device.type != "meta"}  # fmt: skip
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel():
                    if t.untyped_storage().data_ptr() not in before:
                        self.seen.created.append((str(func), t.numel(), tuple(t.shape), t.dtype))
        return out


_WATCHES: list[Seen] = []


@contextlib.contextmanager
def watch():
    """Record every tensor created in this block, inside the fused ops as well (see the module)."""
    seen = Seen()
    _WATCHES.append(seen)
    try:
        with _Recorder(seen):
            yield seen
    finally:
        _WATCHES.remove(seen)


def inside():
    """Entered by each fused op's implementation: records its allocations while a :func:`watch` is active."""
    return _Recorder(_WATCHES[-1]) if _WATCHES else contextlib.nullcontext()
