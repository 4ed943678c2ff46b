"""Argument checks shared by every backend.

Each check raises ``ValueError`` naming the argument, what it must be and what it was, so a user sees
the fix instead of a NaN or a CUDA illegal-memory-access much later. Shapes, dtypes, devices and options
are checked on the host from metadata. Checks of tensor values (label range, explicit triplets, Dmax) never
make a training step wait on the GPU: see :func:`value_check`.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import threading
import warnings
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_matrix(t: torch.Tensor, name: str, *, cols: int | None = None, rows: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns (the embedding size), got shape {tuple(t.shape)}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows (the batch size), got shape {tuple(t.shape)}")


def check_same(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}: move both to one device")
    if a.dtype != b.dtype:
        raise ValueError(
            f"{name_a} is {a.dtype} but {name_b} is {b.dtype}: cast one (e.g. {name_b}.to({name_a}.dtype))"
        )


def check_labels(labels: torch.Tensor, batch: int, device: torch.device, name: str = "labels") -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 class indices, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},) to match the embeddings, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be int64 (or int32) class indices, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the embeddings are on {device}")


def check_label_values(labels: torch.Tensor, num_classes: int, ignore_index: int, name: str = "labels") -> None:
    """Value check that waits for the values (the eager reference's; one device sync on a GPU): every label
    is in [0, num_classes) or equals ignore_index. The fused paths use :func:`label_mask` instead."""
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"{name} must be in [0, {num_classes}) or equal ignore_index={ignore_index}; found {first}")


# ---- value checks that never make the host wait -------------------------------------------------------------
# On the CPU a value is at hand: a bad one raises at once. On a GPU, reading it would stall every training step
# (and break CUDA-graph capture), so the fused ops never read it: the bad entries are made harmless on the device
# (a label out of range becomes an ignored row; the kernels never index with it), a one-element flag is copied
# to pinned host memory without waiting, and the next call of any fused op raises the ValueError once the copy
# has landed (a CUDA event says so, polled, never waited on). F.cross_entropy stops the process with a
# device-side assert instead; this keeps the CUDA context alive and names the argument. Inside CUDA-graph
# capture nothing is copied: there, bad values are only made harmless (validate labels before capturing).

DEFER_ON_CPU = False  # tests: CPU tensors take the GPU's deferred path, so a CPU test sees what a GPU step does


@dataclass
class _Pending:
    seq: int  # the order the checks were made in
    flag: torch.Tensor  # host memory (pinned on a GPU): nonzero when the step's values were bad
    event: object  # a CUDA event recorded on the flag's stream after the copy (None on the CPU: ready at once)
    message: str


_PENDING: list[_Pending] = []
_LOCK = threading.Lock()  # DataParallel runs replicas in threads: the list is shared
_SEQ = [0]
_FREE_FLAGS: list[torch.Tensor] = []  # pinned one-element buffers whose copies have landed, reused
_LOCAL = threading.local()  # .ranks: inside a sharded call, where only the ranks' agreed point may raise


@contextlib.contextmanager
def across_ranks():
    """Within this block (a sharded call) a check raises an earlier flag only through ``raise_pending(upto=...)``
    at the point every rank agreed on, never at a point one rank reached alone."""
    before = getattr(_LOCAL, "ranks", False)
    _LOCAL.ranks = True
    try:
        yield
    finally:
        _LOCAL.ranks = before


def _deferred(t: torch.Tensor) -> bool:
    return t.is_cuda or (DEFER_ON_CPU and t.device.type == "cpu")


def capturing() -> bool:
    """True while the current CUDA stream is captured into a graph: no event may be queried or waited on then."""
    return torch.cuda.is_available() and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _ready(p: _Pending) -> bool:
    return p.event is None or p.event.query()  # a poll, never a wait


def pending_ready_upto() -> int:
    """The largest sequence number up to which every pending check's flag has reached the host (polled, no wait);
    the sharded head exchanges it so that every rank raises at the same call."""
    if capturing():
        return 0
    with _LOCK:
        waiting = [p.seq for p in _PENDING if not _ready(p)]
        return (min(waiting) - 1) if waiting else _SEQ[0]


def raise_pending(upto: int | None = None, wait: bool = False) -> None:
    """Raise the ValueError of an earlier call's bad values whose flag has reached the host: never waiting, never
    during CUDA-graph capture (an event query is illegal there; the next eager call looks). ``upto``: only the
    checks up to that sequence number (all of them ready: see :func:`pending_ready_upto`). ``wait``: wait for
    every flag first (:func:`check_values`, once, at the end of a run; never per step)."""
    if capturing() or (upto is None and not wait and getattr(_LOCAL, "ranks", False)):
        return
    with _LOCK:
        done = []
        for p in list(_PENDING):
            if upto is not None and p.seq > upto:
                continue
            if wait and p.event is not None:
                p.event.synchronize()
            elif not _ready(p):
                continue  # the GPU has not got there yet: look again at the next call
            _PENDING.remove(p)
            done.append(p)
        bad = next((p for p in done if p.flag.numpy().any()), None)  # host memory: no device sync
        _FREE_FLAGS.extend(p.flag for p in done if p.flag.is_pinned())
        if bad is not None:
            _PENDING.clear()
    if bad is not None:
        raise ValueError(bad.message + " (a check on the device, reported at the first check after its flag "
                         "reached the host: it never stalls a step; the call it came from ran with the bad "
                         "rows ignored)")  # fmt: skip


def check_values() -> None:
    """Wait for every deferred value check of earlier calls (bad labels, triplet indices, Dmax on a GPU) and raise
    its ValueError now. The fused ops never wait for these flags in a step; call this at the end of a run (the
    trainer does), or in a test. At interpreter exit the flags still pending are reported on stderr."""
    raise_pending(wait=True)


def _report_at_exit() -> None:  # the last steps' bad values must not vanish with the process
    try:
        check_values()
    except ValueError as err:
        import sys

        print(f"mdkernels: {err}", file=sys.stderr)
    except Exception:  # noqa: BLE001 (the CUDA context may already be gone at exit: nothing to report then)
        pass


atexit.register(_report_at_exit)


def value_check(bad_any: torch.Tensor, message: str) -> None:
    """``bad_any``: a one-element bool tensor, True when the values were bad. CPU tensors: raise now. GPU
    tensors: flag it for :func:`raise_pending` (see above), never waiting: the flag is copied to pinned host
    memory on the stream of ``bad_any``'s device, and an event recorded there says when it has landed."""
    raise_pending()
    if not _deferred(bad_any):
        if bool(bad_any):
            raise ValueError(message)
        return
    if bad_any.is_cuda and capturing():
        return  # a graph replays without this Python: bad values stay harmless, unreported
    if bad_any.is_cuda:
        with _LOCK:
            flag = _FREE_FLAGS.pop() if _FREE_FLAGS else torch.empty((), dtype=torch.bool, pin_memory=True)
        stream = torch.cuda.current_stream(bad_any.device)
        with torch.cuda.stream(stream):
            flag.copy_(bad_any.reshape(()), non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    else:
        flag, event = bad_any.detach().reshape(()).clone(), None
    with _LOCK:
        _SEQ[0] += 1
        _PENDING.append(_Pending(_SEQ[0], flag, event, message))


def label_mask(labels: torch.Tensor, num_classes: int, ignore_index: int, name: str = "labels") -> torch.Tensor:
    """``(B,)`` bool: the rows whose label counts (in ``[0, num_classes)``, not ``ignore_index``). A label out of
    range and not ``ignore_index`` is an error (:func:`value_check`: at once on the CPU, at the next call on a
    GPU); meanwhile its row counts as ignored, so no kernel ever indexes with it."""
    valid = labels != ignore_index
    if not _deferred(labels):  # the values are at hand: name the first bad one
        raise_pending()
        check_label_values(labels, num_classes, ignore_index, name)
        return valid
    inside = (labels >= 0) & (labels < num_classes)
    if labels.numel():
        value_check((valid & ~inside).any(), f"{name} must be in [0, {num_classes}) or equal "
                                             f"ignore_index={ignore_index}")  # fmt: skip
    return valid & inside


def check_m1(m1: float) -> None:
    if not isinstance(m1, (int, float)) or not math.isfinite(float(m1)) or float(m1) < 1:
        raise ValueError(f"m1 (the multiplicative angular margin) must be a finite number >= 1, got {m1}")


def check_margin_range(m_min: float, m_max: float) -> None:
    """MarginDistillation's and triplet distillation's margin range."""
    for name, v in (("m_min", m_min), ("m_max", m_max)):
        if not math.isfinite(float(v)):
            raise ValueError(f"{name} must be finite, got {v}")
    if float(m_min) > float(m_max):
        raise ValueError(f"m_min ({m_min}) must not exceed m_max ({m_max})")


def check_scale(s: float) -> None:
    if not math.isfinite(float(s)) or float(s) <= 0:
        raise ValueError(f"s (the logit scale) must be a positive finite number, got {s}")


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def check_grad_mode(grad: str) -> None:
    if grad not in ("exact", "straight_through"):
        raise ValueError(f"grad must be 'exact' or 'straight_through', got {grad!r}")


def check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf; check the model output feeding it")


def check_margin_tensor(m2, batch: int, device: torch.device, name: str = "m2") -> None:
    if isinstance(m2, torch.Tensor):
        if m2.dim() != 1 or m2.shape[0] != batch:
            raise ValueError(
                f"{name} as a tensor must have shape ({batch},) (one margin per row), got {tuple(m2.shape)}"
            )
        if m2.device != device:
            raise ValueError(f"{name} is on {m2.device} but the embeddings are on {device}")
        if not m2.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating tensor, got {m2.dtype}")
    elif not math.isfinite(float(m2)):
        raise ValueError(f"{name} must be finite, got {m2}")


def check_margin_ce_args(
    embeddings: torch.Tensor,
    centers: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float,
    m2,
    grad: str,
    reduction: str,
    emb_name: str = "embeddings",
    centers_name: str = "centers",
    m1: float = 1.0,
) -> None:
    check_m1(m1)
    check_matrix(embeddings, emb_name)
    check_matrix(centers, centers_name, cols=embeddings.shape[1])
    check_same(embeddings, centers, emb_name, centers_name)
    check_labels(labels, embeddings.shape[0], embeddings.device)
    check_margin_tensor(m2, embeddings.shape[0], embeddings.device)
    check_scale(s)
    check_grad_mode(grad)
    check_reduction(reduction)


MARGIN_FAMILIES = ("arcface", "cosface", "sphereface")


def margin_triple(margin: str, m: float) -> tuple[float, float, float]:
    """(m1, m2, m3) of a named margin family with margin size ``m``."""
    if margin == "arcface":
        return 1.0, m, 0.0
    if margin == "cosface":
        return 1.0, 0.0, m
    if margin == "sphereface":
        return m, 0.0, 0.0
    raise ValueError(f"margin must be one of {MARGIN_FAMILIES}, got {margin!r}")


def check_proxyless_dims(embeddings: torch.Tensor, teacher_centers: torch.Tensor) -> None:
    if embeddings.dim() == 2 and teacher_centers.dim() == 2 and embeddings.shape[1] != teacher_centers.shape[1]:
        raise ValueError(
            f"ProxylessKD trains the student in the teacher's embedding space: embeddings have D="
            f"{embeddings.shape[1]} but teacher_centers have D={teacher_centers.shape[1]}; make the student's "
            "embedding size equal, or use mdkernels.nn.ProxylessKD(..., projection=True)"
        )


def check_triplets(triplets: torch.Tensor, batch: int, deferred: bool = False) -> None:
    """Shape and dtype, then the index range: waiting for the values (the reference), or ``deferred`` through
    :func:`value_check` (the fused path, which clamps the indices meanwhile)."""
    if triplets.dim() != 2 or triplets.shape[1] != 3:
        raise ValueError(
            f"triplets must have shape (N, 3) of (anchor, positive, negative), got {tuple(triplets.shape)}"
        )
    if triplets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"triplets must be int64 indices, got {triplets.dtype}")
    if deferred:
        if triplets.numel():
            value_check(((triplets < 0) | (triplets >= batch)).any(), f"triplets must index rows in [0, {batch})")
        return
    if triplets.numel() and (int(triplets.min()) < 0 or int(triplets.max()) >= batch):
        raise ValueError(
            f"triplets must index rows in [0, {batch}), got values in [{int(triplets.min())}, {int(triplets.max())}]"
        )


def check_subcenters(subcenters, centers: torch.Tensor, name: str = "centers") -> None:
    """K sub-centers per class: an int in [1, 16] that divides the centers' rows (layout ``c*K + k``). 16 is the
    kernels' limit (each compiles once per next_pow2(K), and the compile check covers up to 16); Sub-center ArcFace
    uses K = 3 (the reference functions take any K)."""
    if isinstance(subcenters, bool) or not isinstance(subcenters, int) or not 1 <= subcenters <= 16:
        raise ValueError(f"subcenters must be an int in [1, 16] (K sub-centers per class), got {subcenters!r}")
    if centers.shape[0] % subcenters:
        raise ValueError(
            f"subcenters={subcenters} must divide the rows of {name} ({centers.shape[0]}): the layout is (C*K, D), "
            "row c*K + k for sub-center k of class c"
        )


def check_margin_options(*, m3, fallback: bool, easy_margin: bool, theta_clip, cos_clamp, curricular_t,
                         batch: int, device: torch.device) -> None:  # fmt: skip
    """The options of the modern margin family (docs/math.md §7)."""
    check_margin_tensor(m3, batch, device, name="m3")
    if isinstance(m3, torch.Tensor) and m3.requires_grad:
        raise ValueError("m3 carries no gradient: pass m3.detach() (only a tensor m2 may require grad)")
    if fallback and easy_margin:
        raise ValueError("fallback and easy_margin are alternatives for theta + m2 > pi: pass one of them")
    if theta_clip is not None and not 0 < float(theta_clip) < math.pi / 2:
        raise ValueError(f"theta_clip must be in (0, pi/2) radians (AdaFace uses 1e-3), got {theta_clip}")
    if not 0 < float(cos_clamp) <= 1:
        raise ValueError(f"cos_clamp must be in (0, 1] (AdaFace uses 1 - 1e-3), got {cos_clamp}")
    if curricular_t is not None:
        if isinstance(curricular_t, torch.Tensor):  # a buffer: no host sync to look at its value
            if curricular_t.numel() != 1 or not curricular_t.dtype.is_floating_point:
                raise ValueError(f"curricular_t must be a float or a 0-d float tensor, got {curricular_t!r}")
            if curricular_t.device != device:
                raise ValueError(f"curricular_t is on {curricular_t.device} but the embeddings are on {device}")
        elif not math.isfinite(float(curricular_t)):
            raise ValueError(f"curricular_t must be finite, got {curricular_t}")


def check_centers_not_empty(centers: torch.Tensor) -> None:
    if centers.shape[0] == 0:
        raise ValueError("centers must have at least one row (class)")


def check_kd_options(*, m2, T: float, alpha: float) -> None:
    """Hinton KD on margin logits: a float m2, a positive temperature, a weight in [0, 1]."""
    if isinstance(m2, torch.Tensor):
        raise ValueError("m2 must be a float for margin_kd_loss")
    if not T > 0:
        raise ValueError(f"T (the temperature) must be > 0, got {T}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def warn_if_non_monotone(m1: float, m2: float, fallback: bool) -> None:
    """Warn when the target logit can increase with the angle (margin past pi and no fallback).

    Only for scalar margins; per-row margins (MarginDistillation) document their own behaviour.
    """
    if not (fallback and m1 == 1.0) and (m1 > 1.0 or m2 > 0.0):
        warnings.warn(
            f"margin (m1={m1}, m2={m2:g}) without the monotonic fallback: the target logit is not monotone "
            "in the angle for theta > (pi - m2)/m1; pass fallback=True (m1 == 1 only) to avoid it",
            stacklevel=4,  # the user's call: warn <- plan <- the public function <- the caller
        )
