"""A training step makes no host sync: every loss, head and the sharded head, forward and backward, on the
path a GPU runs (issue: nothing makes the host wait in a training step).

On a GPU, reading a tensor's value (``.item()``, ``bool()``, ``float()``, ``int()``, ``.tolist()``) or an op whose
output shape depends on values (``nonzero``, ``unique``, boolean indexing) waits for the GPU: a stall per step,
and an error under CUDA-graph capture. The Python of the launchers is the same on a CPU, so this file counts
those calls on CPU tensors with the interpreter (Triton) and the torch backend, with
``mdkernels._validate.DEFER_ON_CPU`` on: value checks take the GPU's deferred path. Two counters: the five
Python-level reads patched on ``torch.Tensor``, and a dispatch mode that sees every aten op that syncs
(``_local_scalar_dense`` under any read, ``nonzero``, ``unique``, ``masked_select``). Triplet mining keeps one
sync: the number of triplets sets the work (the ``gpu`` tests run the same steps under
``torch.cuda.set_sync_debug_mode("error")`` and in a CUDA graph).
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch
from conftest import TRITON_RUNS
from torch.utils._python_dispatch import TorchDispatchMode

import mdkernels
from mdkernels import _validate
from mdkernels import nn as mnn

_SYNCING = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "is_nonzero", "equal")
_READS = ("item", "__bool__", "__float__", "__int__", "tolist")
# host-made tensors (a host-to-device copy from pageable memory on a GPU), and waits for a stream or an event
_MADE = ("tensor", "as_tensor", "from_numpy")
_WAITS = ((torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"), (torch.cuda.Event, "wait"),
          (torch.cuda.Stream, "synchronize"), (torch.cuda.Stream, "wait_event"), (torch.cuda.Stream, "wait_stream"))
_PACKAGE = os.path.dirname(mdkernels.__file__)


def _from_a_step(depth: int = 2) -> bool:
    """The caller is mdkernels code of a training step (not a dataset's item, read in the loader's workers)."""
    frame = sys._getframe(depth)
    name = frame.f_code.co_filename
    return name.startswith(_PACKAGE) and "/data/" not in name and frame.f_code.co_name != "__getitem__"


class HostSyncs(TorchDispatchMode):
    """Counts the calls that would make a GPU step wait or copy from pageable host memory: Python reads of a
    tensor's value (and device-to-host copies), syncing aten ops, tensors made from host data inside mdkernels'
    step code, and waits for a CUDA stream or event."""

    def __init__(self, reads_from_step_only: bool = False):
        super().__init__()
        self.calls: list[str] = []
        self._saved = []
        self._reading = False
        # a whole training loop: host-side reads of the loader (its sampler's CPU tensors) are no GPU sync
        self._step_only = reads_from_step_only

    def _patch(self, owner, name, label, only_from_step=False):
        original = getattr(owner, name)
        self._saved.append((owner, name, original))

        def counted(*a, **k):
            if not only_from_step or _from_a_step():
                self.calls.append(label)
            self._reading = True  # the aten read under it is the same sync: count it once
            try:
                return original(*a, **k)
            finally:
                self._reading = False

        setattr(owner, name, counted)

    def __enter__(self):
        for name in _READS:
            self._patch(torch.Tensor, name, f"Tensor.{name}", only_from_step=self._step_only)
        self._patch(torch.Tensor, "cpu", "Tensor.cpu", only_from_step=True)  # a device-to-host copy in a step
        for name in _MADE:
            self._patch(torch, name, f"torch.{name}", only_from_step=True)
        for owner, name in _WAITS:
            self._patch(owner, name, f"{owner.__name__}.{name}")
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(word in func.__name__ for word in _SYNCING) and not self._reading and not self._step_only:
            self.calls.append(f"aten.{func.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def gpu_path(monkeypatch):
    monkeypatch.setattr(_validate, "DEFER_ON_CPU", True)
    _validate._PENDING.clear()
    yield
    _validate._PENDING.clear()


BACKENDS = ["torch"] + (["triton"] if TRITON_RUNS else [])
B, D, C = 37, 48, 203


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, requires_grad=True)
    w = torch.randn(C, D, generator=g, requires_grad=True)
    y = torch.randint(0, C, (B,), generator=g)
    y[3] = -1
    t = torch.randn(B, D, generator=g)
    return x, w, y, t


def _step(fn) -> list[str]:
    """The host syncs of one forward and backward of ``fn() -> loss``."""
    with HostSyncs() as counter:
        loss = fn()
        loss.backward()
    return counter.calls


def test_the_counter_sees_a_sync():
    """Positive control: without the deferred path, the label check reads the labels (a sync on a GPU)."""
    x, w, y, _ = _inputs()
    assert _step(lambda: mdkernels.margin_cross_entropy(x, w, y, backend="torch"))


def test_the_counter_sees_host_copies_and_waits():
    """Positive controls: a tensor made from host data by step code (a pageable host-to-device copy on a GPU), a
    ``.cpu()`` there, and a wait for a CUDA event, each counted."""
    step_file = os.path.join(os.path.dirname(mdkernels.__file__), "functional.py")
    with HostSyncs() as counter:
        exec(compile("import torch\ntorch.tensor([1.0]); torch.zeros(2).cpu()", step_file, "exec"))  # noqa: S102
        torch.tensor([2.0])  # from the test itself: not a step's
    assert counter.calls == ["torch.tensor", "Tensor.cpu"], counter.calls
    if torch.cuda.is_available():
        with HostSyncs() as counter:
            torch.cuda.synchronize()
        assert counter.calls == ["cuda.synchronize"] or counter.calls[0].endswith("synchronize")


LOSSES = {
    "arcface": lambda x, w, y, t, b: mdkernels.margin_cross_entropy(x, w, y, backend=b),
    "cosface+filter": lambda x, w, y, t, b: mdkernels.margin_cross_entropy(x, w, y, m2=0.0, m3=0.35,
                                                                          interclass_filter=0.3, backend=b),
    "per-row m2 with grad, m3": lambda x, w, y, t, b: mdkernels.margin_cross_entropy(
        x, w, y, m2=torch.linspace(0.2, 0.5, B, requires_grad=True), m3=torch.linspace(0, 0.1, B), backend=b),
    "adaface options": lambda x, w, y, t, b: mdkernels.margin_cross_entropy(x, w, y, fallback=False, theta_clip=1e-3,
                                                                           cos_clamp=1 - 1e-3, backend=b),
    "curricular": lambda x, w, y, t, b: mdkernels.margin_cross_entropy(x, w, y, curricular_t=torch.tensor(0.2),
                                                                      backend=b),
    "curricular float": lambda x, w, y, t, b: mdkernels.margin_cross_entropy(x, w, y, curricular_t=0.2, backend=b),
    "subcenters": lambda x, w, y, t, b: mdkernels.margin_cross_entropy(x, w[:201], y.clamp(max=66), subcenters=3,
                                                                      backend=b),
    "margin_distillation": lambda x, w, y, t, b: mdkernels.margin_distillation_loss(x, w, y, teacher_embeddings=t,
                                                                                   backend=b),
    "margin_distillation teacher_cos": lambda x, w, y, t, b: mdkernels.margin_distillation_loss(
        x, w, y, teacher_cos=torch.rand(B), backend=b),
    "proxyless_kd": lambda x, w, y, t, b: mdkernels.proxyless_kd_loss(x, w, y, backend=b),
    "margin_kd": lambda x, w, y, t, b: mdkernels.margin_kd_loss(x, t, w, y, backend=b),
    "angular": lambda x, w, y, t, b: mdkernels.angular_distillation_loss(x, t, backend=b),
    "angular feature maps": lambda x, w, y, t, b: mdkernels.angular_distillation_loss(
        x.reshape(B, 3, 4, 4), t.reshape(B, 3, 4, 4), per="position", backend=b),
    "triplet explicit": lambda x, w, y, t, b: mdkernels.triplet_distillation_loss(
        x, t, torch.tensor([[0, 1, 2], [4, 5, 6]]), backend=b),
}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_make_no_host_sync(gpu_path, backend, name):
    x, w, y, t = _inputs()
    assert _step(lambda: LOSSES[name](x, w, y, t, backend)) == []


HEADS = {
    "ArcFace": lambda: mnn.ArcFace(D, C),
    "CosFace": lambda: mnn.CosFace(D, C),
    "SphereFace": lambda: mnn.SphereFace(D, C),
    "ArcFaceLoss (D, C) layout": lambda: mnn.ArcFaceLoss(C, D),
    "PartialFCHead": lambda: mnn.PartialFCHead(D, C, interclass_filtering_threshold=0.2),
    "AdaFace": lambda: mnn.AdaFace(D, C),
    "CurricularFace": lambda: mnn.CurricularFace(D, C),
    "MagFace": lambda: mnn.MagFace(D, C),
    "ElasticArcFace plus": lambda: mnn.ElasticArcFace(D, C, plus=True, generator=torch.Generator().manual_seed(1)),
    "ElasticCosFace": lambda: mnn.ElasticCosFace(D, C),
    "SubCenterArcFace": lambda: mnn.SubCenterArcFace(D, C, K=3),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(HEADS))
def test_heads_train_without_host_sync(gpu_path, backend, name):
    head = HEADS[name]()
    head.backend = backend
    x, _, y, _ = _inputs()
    head.train()
    assert _step(lambda: head(x, y)) == []
    assert all(p.grad is not None for p in head.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_the_fused_center_update_makes_no_host_sync(gpu_path, backend, opt):
    """The centers' update inside the backward (mdkernels.fuse_center_update), after a first step that created the
    optimizer's state: AdamW's step count is known on the host without reading its tensor, the GradScaler's scale
    and flags stay on the device."""
    for name in ("ArcFace", "ArcFaceLoss (D, C) layout", "SubCenterArcFace"):
        head = HEADS[name]()
        head.backend = backend
        make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
                "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05)}[opt]  # fmt: skip
        o = make(head.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        h = mdkernels.fuse_center_update(head, o, scaler=scaler)
        x, _, y, _ = _inputs()
        scaler.scale(head(x, y)).backward()
        o.step()
        assert _step(lambda: scaler.scale(head(x, y))) == [], name  # noqa: B023 (called here, in the loop)
        assert all(p.grad is None for p in head.parameters())
        h.remove()


def test_distillation_modules_make_no_host_sync(gpu_path):
    x, w, y, t = _inputs()
    md = mnn.MarginDistillation(w.detach(), backend="torch")
    assert _step(lambda: md(x, y, teacher_embeddings=t)) == []
    kd = mnn.MarginKD(w.detach(), backend="torch")
    assert _step(lambda: kd(x, t, y)) == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mining", ["all", "hard", "semihard"])
def test_triplet_mining_keeps_one_sync(gpu_path, backend, mining):
    """The number of mined triplets (or the largest class, which sizes the Triton grid) is data: one read."""
    x, _, y, t = _inputs()
    calls = _step(lambda: mdkernels.triplet_distillation_loss(x, t, labels=y % 5, mining=mining, backend=backend))
    assert len(calls) == 1, calls


def test_bad_labels_are_an_error_at_the_next_call(gpu_path):
    """On the GPU's path a bad label never stalls the step it is in: its row counts as ignored, and the next
    call raises, naming the argument."""
    x, w, y, _ = _inputs()
    bad = y.clone()
    bad[0] = C + 7
    loss = mdkernels.margin_cross_entropy(x, w, bad, backend="torch")
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 203\) or equal ignore_index=-1 .*never stalls"):
        mdkernels.margin_cross_entropy(x, w, y, backend="torch")
    mdkernels.margin_cross_entropy(x, w, y, backend="torch")  # reported once: the next call runs
    loss = mdkernels.triplet_distillation_loss(x, x.detach(), torch.tensor([[0, 1, 40]]), backend="torch")
    assert torch.isfinite(loss)  # the bad index is clamped meanwhile: no kernel reads past the batch
    with pytest.raises(ValueError, match=r"triplets must index rows in \[0, 37\)"):
        mdkernels.triplet_distillation_loss(x, x.detach(), torch.tensor([[0, 1, 2]]), backend="torch")


def test_dmax_is_checked_on_the_device(gpu_path):
    x, w, y, _ = _inputs()
    far = -mdkernels.reference.normalize(w.detach())[y.clamp_min(0)]  # every teacher cosine is -1
    with pytest.raises(ValueError, match="MarginDistillation needs Dmax > 0"):  # at the margin CE's label check
        mdkernels.margin_distillation_loss(x, w, y, teacher_embeddings=far, backend="torch")


@contextlib.contextmanager
def _one_rank(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_sharded_head_makes_no_host_sync(gpu_path, tmp_path):
    """The sharded head: its rank handshake is a host-side (gloo) exchange, its label check on the device."""
    from mdkernels import distributed as mdist

    with _one_rank(tmp_path):
        head = mdist.ShardedMarginHead(D, C, sample_rate=0.5, backend="torch")
        x, w, y, t = _inputs()
        head(x, y).backward()  # the first call creates the host group
        assert _step(lambda: head(x, y)) == []
        md = lambda: mdist.sharded_margin_distillation_loss(x, w.detach(), y, class_start=0, num_classes=C,
                                                            teacher_embeddings=t, backend="torch")  # fmt: skip
        assert _step(md) == []


# ---- the deferred checks themselves: capture, streams, threads, the last step --------------------------------------
class _FakeEvent:
    """A CUDA event that fails the test if it is polled or waited on while ``capturing`` says a graph records."""

    capturing = False
    recorded_on: list = []

    def __init__(self):
        self.ready = False

    def record(self, stream=None):
        _FakeEvent.recorded_on.append(stream)

    def query(self):
        assert not _FakeEvent.capturing, "an event was polled during CUDA-graph capture (error 900 on a GPU)"
        return self.ready

    def synchronize(self):
        assert not _FakeEvent.capturing, "an event was waited on during CUDA-graph capture"
        self.ready = True


def test_no_event_is_touched_during_capture(gpu_path, monkeypatch):
    """After eager steps left flags pending, a step captured into a CUDA graph neither polls nor waits on their
    events (``mdkernels._validate.capturing``), and the next eager call raises the bad label."""
    events = [_FakeEvent(), _FakeEvent()]
    _validate._PENDING.extend([_validate._Pending(1, torch.tensor(False), events[0], "old ok"),
                               _validate._Pending(2, torch.tensor(True), events[1], "labels were bad")])  # fmt: skip
    monkeypatch.setattr(_validate, "capturing", lambda: _FakeEvent.capturing)
    _FakeEvent.capturing = True
    try:
        x, w, y, _ = _inputs()
        mdkernels.margin_cross_entropy(x, w, y, backend="torch").backward()  # a "captured" step: no event touched
        assert _validate.pending_ready_upto() == 0
    finally:
        _FakeEvent.capturing = False
    events[1].ready = events[0].ready = True
    with pytest.raises(ValueError, match="labels were bad"):
        mdkernels.margin_cross_entropy(x, w, y, backend="torch")


def test_the_flag_is_copied_on_the_stream_of_its_device(monkeypatch):
    """With tensors on cuda:1 while cuda:0 is current, the copy and its event go to cuda:1's current stream (the
    current device's stream would not order after the kernels that wrote the flag). Fakes stand in for CUDA."""
    streams = {}

    class FakeStream:
        def __init__(self, device):
            self.device = device

    def current_stream(device=None):
        return streams.setdefault(str(device), FakeStream(str(device)))

    class FakeFlag:
        is_cuda, device = True, torch.device("cuda", 1)

        def reshape(self, *shape):
            return self

    copied_on = []

    class PinnedBuffer:
        def copy_(self, src, non_blocking=False):
            copied_on.append((torch.cuda.current_stream_for_test, non_blocking))

        def is_pinned(self):
            return True

    @contextlib.contextmanager
    def stream_ctx(s):
        torch.cuda.current_stream_for_test = s
        yield

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "stream", stream_ctx)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream_for_test", None, raising=False)
    monkeypatch.setattr(_validate, "capturing", lambda: False)
    monkeypatch.setattr(_validate, "_FREE_FLAGS", [PinnedBuffer()])
    _FakeEvent.recorded_on = []
    _validate._PENDING.clear()
    try:
        _validate.value_check(FakeFlag(), "labels of cuda:1 were bad")
        assert copied_on == [(streams["cuda:1"], True)]  # the device's own stream, without blocking
        assert _FakeEvent.recorded_on == [streams["cuda:1"]]
        (pending,) = _validate._PENDING
        assert _validate.pending_ready_upto() == pending.seq - 1  # not landed yet: the ranks would not raise it
    finally:
        _validate._PENDING.clear()


def test_checks_from_threads_are_all_kept(gpu_path):
    """DataParallel runs replicas in threads: pending checks from many threads are all recorded and each bad one
    is raised once (the list is guarded by a lock). Which call raises it depends on the threads' timing (the first
    check after its flag landed, in whichever thread, or the final ``check_values``): the test counts every one."""
    import threading

    raised, lock = [], threading.Lock()

    def keep(call):
        try:
            call()
        except ValueError as e:
            with lock:
                raised.append(str(e))

    def worker(k):
        for i in range(50):
            keep(lambda i=i: _validate.value_check(torch.tensor(k == 3 and i == 49), f"bad from thread {k}"))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keep(mdkernels.check_values)
    assert len(raised) == 1 and raised[0].startswith("bad from thread 3"), raised
    assert _validate._PENDING == []


def test_the_last_steps_bad_values_are_reported(gpu_path):
    """A bad label in the last step still surfaces: ``mdkernels.check_values()`` raises it (the trainer calls it
    at the end), and a process that exits without calling it prints it on stderr."""
    x, w, y, _ = _inputs()
    bad = y.clone()
    bad[0] = C + 7
    mdkernels.margin_cross_entropy(x, w, bad, backend="torch")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 203\)"):
        mdkernels.check_values()
    import subprocess
    import tempfile

    code = ("import torch, mdkernels\nfrom mdkernels import _validate\n_validate.DEFER_ON_CPU = True\n"
            "x = torch.randn(4, 8); w = torch.randn(5, 8)\n"
            "mdkernels.margin_cross_entropy(x, w, torch.tensor([0, 1, 9, 2]), backend='torch')\n")  # fmt: skip
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir(),
                         timeout=300)  # fmt: skip
    assert res.returncode == 0 and "mdkernels: labels must be in [0, 5)" in res.stderr, res.stderr[-2000:]
