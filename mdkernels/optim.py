"""The centers' optimizer step fused into their backward: :func:`fuse_center_update` (docs/center_update.md)."""

from __future__ import annotations

import torch
from torch import nn

from mdkernels.ops._common import center_update as CU


def _heads(module: nn.Module):
    """``(name, head, centers)`` of every mdkernels head in ``module`` whose centers are a parameter: the classes
    that name their centers (``centers_name``: the margin heads of :mod:`mdkernels.nn` and the sharded head)."""
    for name, m in module.named_modules():
        attr = getattr(type(m), "centers_name", None)
        w = getattr(m, attr, None) if attr else None
        if isinstance(w, nn.Parameter):
            yield name, m, w


class CenterUpdateHandle:
    """What :func:`fuse_center_update` returns. ``heads``: the names of the fused heads (``""``: the module itself).
    ``remove()`` restores the ordinary path: the next backward writes the centers' ``.grad`` and
    ``optimizer.step()`` updates them from the same state."""

    def __init__(self, optimizer, scaler, params: list, heads: list[str]) -> None:
        self.optimizer, self.scaler, self.heads = optimizer, scaler, heads
        self._params = params
        self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                       optimizer.register_step_post_hook(self._after_step)]  # fmt: skip
        self._unscale = self._update = None
        if scaler is not None:
            self._wrap_scaler(scaler)

    def _bindings(self):
        return [CU.BINDINGS[p] for p in self._params if p in CU.BINDINGS]

    def _before_step(self, optimizer, args, kwargs) -> None:
        for p in self._params:
            if p.grad is not None:
                raise RuntimeError(
                    "centers with a fused update got a .grad from elsewhere (another loss, or a hook): "
                    "optimizer.step() would update them a second time. Keep the centers in one head, or "
                    "handle.remove() the fusion"
                )

    def _after_step(self, optimizer, args, kwargs) -> None:
        for b in self._bindings():
            b.pending = False

    def _wrap_scaler(self, scaler) -> None:
        """The scaler learns of the non-finite center gradients the fused update found: ``unscale_`` adds them to
        its per-device flags (so ``scaler.step`` skips the other parameters' step and ``update`` lowers the scale);
        ``update`` also re-arms the fused update when the scaler skipped ``optimizer.step()``."""
        unscale, update = scaler.unscale_, scaler.update

        def unscale_(optimizer):
            unscale(optimizer)
            if optimizer is self.optimizer:
                flags = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
                for b in self._bindings():
                    for dev, f in b.found_inf.items():
                        mine = f.to(flags[dev].dtype) if dev in flags else f.clone()
                        flags[dev] = torch.maximum(flags[dev], mine) if dev in flags else mine
                        f.zero_()

        def update_(new_scale=None):
            update(new_scale)
            for b in self._bindings():
                b.pending = False

        scaler.unscale_, scaler.update = unscale_, update_
        self._unscale, self._update = unscale, update

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for p in self._params:
            CU.BINDINGS.pop(p, None)
        if self.scaler is not None and self._unscale is not None:
            del self.scaler.unscale_, self.scaler.update  # the instance attributes: the class's methods again
            self._unscale = self._update = None

    def __repr__(self) -> str:
        return f"CenterUpdateHandle(heads={self.heads}, optimizer={type(self.optimizer).__name__})"


def fusable(module: nn.Module, optimizer) -> bool:
    """Whether ``module`` holds a head whose trainable centers are in ``optimizer`` (what
    :func:`fuse_center_update` would fuse)."""
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return any(w.requires_grad and id(w) in in_opt for _, _, w in _heads(module))


def fuse_center_update(module: nn.Module, optimizer: torch.optim.Optimizer, *, scaler=None) -> CenterUpdateHandle:
    """From now on, every mdkernels head inside ``module`` whose trainable centers are in ``optimizer`` takes its
    centers' update inside its backward: each class tile's gradient is applied where it is computed, and no
    ``C x D`` gradient exists.

    ``optimizer``: the user's own ``torch.optim.SGD`` or ``torch.optim.AdamW`` (any momentum, dampening,
    nesterov, weight decay, maximize; betas, eps); its hyper-parameters are read from the centers' param group at
    each backward (LR schedulers work unchanged) and its state stays in ``optimizer.state[centers]`` under torch's
    keys (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``), so ``optimizer.state_dict()`` checkpoints it
    and either path resumes the other. ``optimizer.step()`` skips the centers: their ``.grad`` stays ``None``, so
    they cannot be clipped or inspected. ``scaler``: the ``torch.amp.GradScaler`` of the run, if any (the update
    unscales inside). Refused: other optimizers, ``amsgrad``, options it does not know, and a second backward
    before ``optimizer.step()`` (gradient accumulation). Returns a handle; ``handle.remove()`` undoes it."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module (the model or the head), got {type(module).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.SGD or torch.optim.AdamW, got {type(optimizer).__name__}")
    if scaler is not None and not hasattr(scaler, "_per_optimizer_states"):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params, names = [], []
    for name, _, w in _heads(module):
        if not (w.requires_grad and id(w) in in_opt) or any(w is q for q in params):
            continue
        why = CU.unsupported(optimizer, CU.group_of(optimizer, w))
        if why:
            raise ValueError(why)
        if w in CU.BINDINGS:
            raise ValueError(f"the centers of head {name or type(module).__name__!r} already have a fused update: "
                             "remove() that handle first")  # fmt: skip
        params.append(w)
        names.append(name)
    if not params:
        raise ValueError(
            "fuse_center_update found no mdkernels head in module whose trainable centers are in the optimizer "
            "(the margin heads of mdkernels.nn, PartialFCHead, ShardedMarginHead): pass the module holding the head "
            "and an optimizer over its weight"
        )
    for p in params:
        CU.BINDINGS[p] = CU.Binding(optimizer, scaler)
    return CenterUpdateHandle(optimizer, scaler, params, names)
