"""The centers' optimizer step where their gradient is computed (docs/center_update.md).

:func:`mdkernels.fuse_center_update` binds a head's centers to the user's ``torch.optim.SGD`` or ``AdamW``
(:data:`BINDINGS`). The margin ops' backward then asks :func:`claim` for the centers it is about to differentiate:
with a binding, it computes their gradient one class tile (or chunk) at a time and hands each to
:meth:`Step.apply_rows`, which applies ``torch.optim``'s own update to those rows of the centers and of the
optimizer's state, in place. No ``C x D`` gradient exists; ``optimizer.step()`` skips the centers (``.grad`` stays
``None``); the state lives in ``optimizer.state[centers]`` under torch's keys.

The update is ``torch.optim``'s single-tensor one, operation for operation:

* SGD: ``g = ±dW (+ wd W)``; with momentum ``b = g`` on the first step, else ``b = mu b + (1 - dampening) g``;
  ``g = g + mu b`` (nesterov) or ``b``; ``W -= lr g``.
* AdamW: ``step += 1``; ``W *= 1 - lr wd``; ``m = lerp(m, g, 1 - beta1)``; ``v = beta2 v + (1 - beta2) g^2``;
  ``W -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)``.

The gradient is rounded to the centers' dtype first, as the unfused path stores it. With a ``GradScaler`` it is
unscaled here; a row whose unscaled gradient is not finite keeps its value and state, and the scaler is told
(its step for the other parameters is skipped and the scale lowered, as it would have been).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch


class _ByIdentity:
    """Parameter -> :class:`Binding`, by identity (tensors compare elementwise, so no dict of tensors), holding
    the parameter weakly."""

    def __init__(self) -> None:
        self._d: dict[int, tuple] = {}

    def __contains__(self, p) -> bool:
        e = self._d.get(id(p))
        return e is not None and e[0]() is p

    def __getitem__(self, p) -> Binding:
        if p not in self:
            raise KeyError("no fused center update is bound to this tensor")
        return self._d[id(p)][1]

    def __setitem__(self, p, b) -> None:
        self._d[id(p)] = (weakref.ref(p), b)

    def pop(self, p, default=None):
        return self._d.pop(id(p), (None, default))[1] if p in self else default


BINDINGS = _ByIdentity()  # Parameter -> Binding

# the keys torch's LR schedulers add to a param group (their own bookkeeping: they write "lr", "momentum" or "betas",
# which the update reads at each backward)
SCHEDULER_KEYS = {"initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum", "max_momentum", "swa_lr"}
SGD_KEYS = {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach", "differentiable",
            "fused", *SCHEDULER_KEYS}  # fmt: skip
ADAMW_KEYS = {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable", "differentiable",
              "fused", "decoupled_weight_decay", *SCHEDULER_KEYS}  # fmt: skip


@dataclass
class Binding:
    """One parameter's fused update: its optimizer and scaler, and whether a fused update waits for the step."""

    optimizer: torch.optim.Optimizer
    scaler: object | None = None
    pending: bool = False  # a backward applied the update; the next one before optimizer.step() is refused
    found_inf: dict = field(default_factory=dict)  # device -> fp32 flag, the scaler's view of this step
    step_seen: tuple = ()  # (AdamW's step tensor, its version, its value): its count known without reading it


def unsupported(optimizer, group: dict) -> str | None:
    """Why ``optimizer``'s ``group`` cannot be fused, or None."""
    kind = type(optimizer)
    if kind not in (torch.optim.SGD, torch.optim.AdamW):
        return (f"{kind.__name__} is not fused: the fused center update runs torch.optim.SGD and torch.optim.AdamW "
                "only (pass one of them, or leave the centers to optimizer.step())")  # fmt: skip
    known = SGD_KEYS if kind is torch.optim.SGD else ADAMW_KEYS
    extra = sorted(k for k in group if k not in known and k != "params")
    if extra:
        return f"the param group's option(s) {extra} are not known to the fused {kind.__name__} update"
    if group.get("amsgrad"):
        return "AdamW(amsgrad=True) is not fused (its max of the second moments is not implemented): pass amsgrad=False"
    if group.get("differentiable"):
        return "differentiable=True is not fused: the fused update runs under no_grad"
    for k in ("lr", "weight_decay", "momentum", "dampening", "eps"):
        if isinstance(group.get(k), torch.Tensor) and group[k].device.type != "cpu":
            return f"the param group's {k} is a device tensor: the fused update reads it on the host; pass a float"
    if isinstance(group.get("betas"), (tuple, list)) and any(isinstance(b, torch.Tensor) for b in group["betas"]):
        return "the param group's betas are tensors: pass floats"
    return None


def _f(v) -> float:
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


def group_of(optimizer, p) -> dict:
    for g in optimizer.param_groups:
        if any(q is p for q in g["params"]):
            return g
    raise RuntimeError("the fused center update's optimizer no longer holds the centers (handle.remove() it first)")


def _as_view(state: torch.Tensor, param: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``state`` (shaped as ``param``) seen as ``w`` sees ``param`` (``w`` is ``param`` or ``param.t()``)."""
    return state if w.shape == param.shape and w.stride() == param.stride() else state.t()


def _param_of(w: torch.Tensor) -> torch.Tensor | None:
    """The bound parameter ``w`` is (or is the ``.t()`` view of), else None."""
    for cand in (w, getattr(w, "_base", None)):
        if cand is not None and cand in BINDINGS:
            if cand is w or (w.shape == cand.t().shape and w.stride() == cand.t().stride()
                             and w.data_ptr() == cand.data_ptr()):  # fmt: skip
                return cand
    return None


def bound(w: torch.Tensor) -> bool:
    """Whether ``w`` (a parameter, or its ``.t()`` view) has a fused update bound to it."""
    return isinstance(w, torch.Tensor) and _param_of(w) is not None


@dataclass
class Step:
    """One backward's update of the centers: the hyper-parameters of this backward and the state tensors, all in
    the layout of ``w`` (the tensor the op differentiates). ``index``: the parameter rows of ``w``'s rows when ``w``
    is a gather of them (negative-class sampling), else None (``w`` is the parameter or its view)."""

    w: torch.Tensor
    kind: str
    lr: float
    weight_decay: float
    maximize: bool
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    first: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    step_size: float | torch.Tensor = 0.0  # lr / (1 - beta1^step)
    bc2_sqrt: float | torch.Tensor = 1.0  # sqrt(1 - beta2^step)
    states: tuple = ()
    inv_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None
    index: torch.Tensor | None = None

    @property
    def host_scalars(self) -> bool:
        """Every per-step number a Python float (the kernels take them as arguments)."""
        return not isinstance(self.step_size, torch.Tensor)

    def apply_rows(self, r0: int, r1: int, g: torch.Tensor) -> None:
        """Apply the update to rows ``[r0, r1)`` of ``w`` whose gradient is ``g`` (any float dtype; a scratch the
        caller gives up: it may be overwritten)."""
        if self.index is None:
            self._update(self.w[r0:r1], [t[r0:r1] for t in self.states], g, None)
        else:
            idx = self.index[r0:r1]
            p, states = self.w[idx], [t[idx] for t in self.states]
            self._update(p, states, g, None)
            self.w.index_copy_(0, idx, p)
            for t, s in zip(self.states, states, strict=True):
                t.index_copy_(0, idx, s)

    def apply_zero(self, keep: torch.Tensor, chunk: int = 4096) -> None:
        """Apply the update with a zero gradient to the rows where ``keep`` is False (the unsampled classes of
        negative sampling: what ``torch.optim`` gives a row whose gradient is zero), in chunks of rows."""
        for r0 in range(0, self.w.shape[0], chunk):
            r1 = min(r0 + chunk, self.w.shape[0])
            self._update(self.w[r0:r1], [t[r0:r1] for t in self.states], None, ~keep[r0:r1])

    def _update(self, p, states, g, rows):
        """In place on ``p`` and ``states`` (views or gathered copies); ``g`` None: a zero gradient. ``rows``: a
        (n,) mask of the rows to change (None: all)."""
        if g is None:
            g = torch.zeros_like(p)
        else:
            g = g.to(p.dtype)  # the rounding the unfused path's stored gradient has
            if self.inv_scale is not None:
                g = g.mul_(self.inv_scale.to(g.dtype))
                ok = torch.isfinite(g).all(1)
                torch.maximum(self.found_inf, (~ok).any().to(self.found_inf.dtype), out=self.found_inf)
                rows = ok if rows is None else rows & ok
        if rows is not None:  # compute on copies; keep the rows outside the mask
            new_p, new_s = p.clone(), [s.clone() for s in states]
            self._math(new_p, new_s, g)
            m = rows[:, None]
            p.copy_(torch.where(m, new_p, p))
            for s, n in zip(states, new_s, strict=True):
                s.copy_(torch.where(m, n, s))
        else:
            self._math(p, states, g)

    def _math(self, p, states, g):
        """torch.optim's single-tensor step, operation for operation, in place on ``p`` and ``states``; ``g`` is
        this update's own scratch (its temporaries are written into it: the values are those of torch's
        out-of-place operations)."""
        if self.maximize:
            g.neg_()
        if self.kind == "sgd":
            if self.weight_decay != 0:
                g.add_(p, alpha=self.weight_decay)
            if self.momentum != 0:
                (buf,) = states
                if self.first:
                    buf.copy_(g)
                else:
                    buf.mul_(self.momentum).add_(g, alpha=1 - self.dampening)
                g = g.add_(buf, alpha=self.momentum) if self.nesterov else buf
            p.add_(g, alpha=-self.lr)
            return
        exp_avg, exp_avg_sq = states
        if self.weight_decay != 0:
            p.mul_(1 - self.lr * self.weight_decay)
        exp_avg.lerp_(g, 1 - self.beta1)
        exp_avg_sq.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        denom = torch.sqrt(exp_avg_sq, out=g)  # g is not needed any more
        if self.host_scalars:
            denom.div_(self.bc2_sqrt).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-self.step_size)
        else:  # capturable: the step count on the device
            denom.div_(self.bc2_sqrt * -self.step_size).add_(self.eps / -self.step_size)
            p.addcdiv_(exp_avg, denom)


def claim(w: torch.Tensor, index: torch.Tensor | None = None, param: torch.Tensor | None = None) -> Step | None:
    """This backward's :class:`Step` for the centers ``w`` (the parameter or its ``.t()`` view; or, with ``index``,
    ``param``'s rows ``index`` gathered), or None when no fused update is bound to them. Reads the hyper-parameters
    of the centers' param group now, creates the optimizer's state on its first use (torch's keys), counts AdamW's
    step, and refuses a second backward before ``optimizer.step()``."""
    p = param if param is not None else _param_of(w)
    if p is None or p not in BINDINGS:
        return None
    if torch.compiler.is_compiling():
        raise RuntimeError("the fused center update does not run under torch.compile: compile the backbone, or "
                           "handle.remove() the fusion for a compiled head")  # fmt: skip
    b = BINDINGS[p]
    if b.pending:
        raise RuntimeError(
            "a second backward through a head with a fused center update before optimizer.step(): the centers were "
            "already updated in the first one, so gradient accumulation (or a second loss on the same head) cannot be "
            "fused. Call optimizer.step() between backwards, or handle.remove() the fusion for this run"
        )
    opt = b.optimizer
    group = group_of(opt, p)
    why = unsupported(opt, group)
    if why:
        raise ValueError(why)
    state = opt.state[p]
    view = w if index is None else p
    lr, wd, maximize = _f(group["lr"]), _f(group["weight_decay"]), bool(group["maximize"])
    if isinstance(opt, torch.optim.SGD):
        mu = _f(group["momentum"])
        st = Step(view, "sgd", lr, wd, maximize, momentum=mu, dampening=_f(group["dampening"]),
                  nesterov=bool(group["nesterov"]))  # fmt: skip
        if mu != 0:
            buf = state.get("momentum_buffer")
            st.first = buf is None
            if buf is None:
                buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st.states = (_as_view(buf, p, view),)
    else:
        beta1, beta2 = (float(b_) for b_ in group["betas"])
        if "step" not in state:
            dev = p.device if group["capturable"] or group["fused"] else "cpu"
            dt = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.zeros((), dtype=dt, device=dev)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            b.step_seen = (state["step"], state["step"]._version, 0.0)
        step_t = state["step"]
        if step_t.device.type == "cpu":  # torch's own non-capturable count: a host tensor, read on the host
            seen = b.step_seen
            known = bool(seen) and seen[0] is step_t and seen[1] == step_t._version
            n = (seen[2] if known else float(step_t.item())) + 1  # read only after a load or an unfused step
        step_t += 1
        st = Step(view, "adamw", lr, wd, maximize, beta1=beta1, beta2=beta2, eps=_f(group["eps"]))
        if step_t.device.type == "cpu":
            b.step_seen = (step_t, step_t._version, n)
            st.step_size, st.bc2_sqrt = lr / (1 - beta1**n), math.sqrt(1 - beta2**n)
        else:
            st.step_size, st.bc2_sqrt = lr / (1 - beta1**step_t), (1 - beta2**step_t).sqrt()
        st.states = (_as_view(state["exp_avg"], p, view), _as_view(state["exp_avg_sq"], p, view))
    if b.scaler is not None and getattr(b.scaler, "is_enabled", lambda: True)():
        scale = b.scaler._scale  # set by the scaler's first scale(loss), before any backward
        if scale is None:
            raise RuntimeError("the GradScaler has no scale yet: scale the loss with scaler.scale(loss) first")
        st.inv_scale = scale.double().reciprocal().float()
        st.found_inf = b.found_inf.setdefault(p.device, torch.zeros((), dtype=torch.float32, device=p.device))
    st.index = index
    b.pending = True
    return st
