"""Same inputs, same bits: no result depends on a timing, the machine's load or the order shapes were first seen.

Three ways a timing could leak into a result, each tested: a choice made by measuring at run time (the CPU GEMM
of cosine top-k once was; the GPU autotuner still times, so its choice is recorded and reused), a busy machine
beside the call, and a clock that makes whatever was timed first (or last) look fastest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest
import torch
from conftest import FUSED_BACKENDS

import mdkernels
from mdkernels.ops._common import autotune, tiles


def _search_inputs(Q=53, D=64, G=5000, seed=0):
    g = torch.Generator().manual_seed(seed)
    gallery = torch.randn(G, D, generator=g)
    queries = torch.randn(Q, D, generator=g)
    return queries, gallery


def _margin_inputs(B=24, D=40, C=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    w = torch.randn(C, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    y[3] = -1  # ignored (insightface's ignore_index)
    return x, w, y


def _margin_step(backend):
    x, w, y = _margin_inputs()
    x.requires_grad_(True)
    w.requires_grad_(True)
    loss = mdkernels.margin_cross_entropy(x, w, y, s=64.0, m2=0.5, backend=backend)
    loss.backward()
    return [loss.detach(), x.grad, w.grad]


class _Busy:
    """Two threads of BLAS work beside the call under test (numpy releases the GIL): the machine is loaded."""

    def __enter__(self):
        self.stop = threading.Event()
        a = np.random.default_rng(0).standard_normal((384, 384), dtype=np.float32)

        def spin():
            while not self.stop.is_set():
                a @ a

        self.threads = [threading.Thread(target=spin, daemon=True) for _ in range(2)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def _same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    if len(a) != len(b):
        return False
    return all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_repeated_calls_under_load_give_identical_bits(backend, monkeypatch):
    monkeypatch.setattr(mdkernels.ops.cosine_topk.torch_backend, "CHUNK_ELEMENTS", 53 * 700)  # many chunks
    q, g = _search_inputs()
    quiet = list(mdkernels.cosine_topk(q, g, 17, backend=backend)) + _margin_step(backend)
    with _Busy():
        for _ in range(3):
            loaded = list(mdkernels.cosine_topk(q, g, 17, backend=backend)) + _margin_step(backend)
            assert _same_bits(quiet, loaded), f"{backend}: another result under load"


_CHILD = r"""
import itertools, sys, time
mode = sys.argv[1]
n = itertools.count(1)
# "late-slow": each reading's gap grows, so whatever is timed first looks fastest; "late-fast": the gaps shrink
clock = (lambda: float(next(n)) ** 2) if mode == "late-slow" else (lambda: 1e6 * float(next(n)) ** 0.5)
time.perf_counter = time.monotonic = time.time = clock
time.perf_counter_ns = time.monotonic_ns = time.time_ns = lambda: int(clock() * 1e9)
import numpy as np
_matmul = np.matmul
def matmul(a, b, out=None, **kw):  # numpy's BLAS, made to round visibly apart from torch's on every CPU
    r = _matmul(a, b, out=out, **kw)
    r[...] = np.nextafter(r, np.inf)
    return r
np.matmul = matmul
import torch, mdkernels
import mdkernels.ops.cosine_topk.torch_backend as tb
tb.CHUNK_ELEMENTS = 53 * 700
g = torch.Generator().manual_seed(0)
gallery, queries = torch.randn(5000, 64, generator=g), torch.randn(53, 64, generator=g)
v, i = mdkernels.cosine_topk(queries, gallery, 17, backend="torch")
sys.stdout.write(v.numpy().tobytes().hex() + " " + i.numpy().tobytes().hex())
"""


@pytest.mark.slow
def test_no_result_depends_on_what_a_clock_says():
    """The same search in two fresh processes whose clocks favour the first-timed and the last-timed of any
    choice: a choice made by timing (cosine top-k's CPU GEMM once was) flips between them. numpy's BLAS, the
    other GEMM on this path, is nudged by an ulp in the children, since on some CPUs it rounds as torch's does
    and the flip would not show."""
    env = {k: v for k, v in os.environ.items() if k != "MDK_CPU_GEMM"}
    outs = []
    for mode in ("late-slow", "late-fast"):
        run = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, timeout=300,
                             cwd=tempfile.gettempdir(), env=env)  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        outs.append(run.stdout)
    assert outs[0] == outs[1]


def test_the_cpu_gemm_is_a_fixed_choice(monkeypatch):
    tb = mdkernels.ops.cosine_topk.torch_backend
    monkeypatch.delenv("MDK_CPU_GEMM", raising=False)
    assert tb.cpu_gemm() is tb.GEMMS["torch"]
    monkeypatch.setenv("MDK_CPU_GEMM", "numpy")
    assert tb.cpu_gemm() is tb.GEMMS["numpy"]
    monkeypatch.setenv("MDK_CPU_GEMM", "mkl")
    with pytest.raises(ValueError, match="MDK_CPU_GEMM must be one of"):
        tb.cpu_gemm()


def test_numpy_gemm_differs_only_by_rounding(monkeypatch):
    """``MDK_CPU_GEMM=numpy`` (opt-in) rounds each D-term dot in another order. Both sums of unit-norm products
    are within D*u of the exact one (u = 2^-24; the gallery's norm is divided out after the GEMM, which adds one
    more rounding of each), so the two cosines differ by at most 2(D + 2)u; the indices only where the cosines
    at rank k and k+1 are that close."""
    monkeypatch.setattr(mdkernels.ops.cosine_topk.torch_backend, "CHUNK_ELEMENTS", 53 * 700)
    q, g = _search_inputs()
    D, k = q.shape[1], 17
    monkeypatch.setenv("MDK_CPU_GEMM", "torch")
    v_t, i_t = mdkernels.cosine_topk(q, g, k, backend="torch")
    monkeypatch.setenv("MDK_CPU_GEMM", "numpy")
    v_n, i_n = mdkernels.cosine_topk(q, g, k, backend="torch")
    bound = 2 * (D + 2) * 2.0**-24
    assert (v_t - v_n).abs().max().item() <= bound
    exact = (torch.nn.functional.normalize(q.double(), dim=1) @ torch.nn.functional.normalize(g.double(), dim=1).T)
    top = exact.topk(k + 1, dim=1).values
    clear = (top[:, :-1] - top[:, 1:]).min(dim=1).values > 2 * bound  # rows with no near-tie among the k + 1
    assert clear.sum() > q.shape[0] // 2
    assert torch.equal(i_t[clear], i_n[clear])


def test_the_autotuner_records_its_choice_and_reuses_it(tmp_path, monkeypatch):
    """``MDK_AUTOTUNE=1`` times once per key and machine; later calls, in this process or any later one, read the
    recorded tile and never time again, so a run's bits do not depend on a timing taken during it."""
    path = tmp_path / "tiles.json"
    monkeypatch.setenv("MDK_AUTOTUNE_FILE", str(path))
    monkeypatch.setattr(autotune, "_TUNED", {})
    cands = [{"BLOCK_B": 16}, {"BLOCK_B": 32}, {"BLOCK_B": 64}]
    calls = []

    def timer(times):
        def time_one(cfg):
            calls.append(cfg["BLOCK_B"])
            if cfg["BLOCK_B"] == 64:
                raise RuntimeError("out of shared memory")  # skipped, as a candidate that does not fit
            return times[cfg["BLOCK_B"]]

        return time_one

    key = autotune.tune_key("forward", torch.bfloat16, 1024, 85742, 512, "NVIDIA H100 80GB HBM3", {"arch": 90})
    assert "NVIDIA H100" in key and "triton" in key and "C=85742" in key
    first = autotune.recorded_or_timed(key, lambda: cands, timer({16: 2.0, 32: 1.0}), cands[0])
    assert first == {"BLOCK_B": 32} and calls == [16, 32, 64]
    assert json.loads(path.read_text()) == {key: {"BLOCK_B": 32}}
    # a new process (the memo emptied) whose timings would now favour another tile: the record wins, no timing
    monkeypatch.setattr(autotune, "_TUNED", {})
    calls.clear()
    again = autotune.recorded_or_timed(key, lambda: cands, timer({16: 0.5, 32: 1.0}), cands[0])
    assert again == {"BLOCK_B": 32} and calls == []
    # another key is timed and added beside the first
    other = key.replace("B=1024", "B=512")
    autotune.recorded_or_timed(other, lambda: cands, timer({16: 0.5, 32: 1.0}), cands[0])
    assert json.loads(path.read_text()) == {key: {"BLOCK_B": 32}, other: {"BLOCK_B": 16}}
    path.write_text("{not json")
    monkeypatch.setattr(autotune, "_TUNED", {})
    with pytest.raises(ValueError, match="MDK_AUTOTUNE_FILE"):
        autotune.recorded_or_timed(key, lambda: cands, timer({16: 0.5, 32: 1.0}), cands[0])


def test_without_autotune_the_tile_is_a_rule(monkeypatch):
    """Off a GPU, or without ``MDK_AUTOTUNE=1``, :func:`autotune.autotuned` returns :func:`tiles.tile_config`'s tile
    and never calls the launch it was given."""
    monkeypatch.setenv("MDK_AUTOTUNE", "1")
    x = torch.zeros(8, 64)

    def launch(cfg):
        raise AssertionError("timed off a GPU")

    assert autotune.autotuned("forward", x, 8, 100, 64, launch) == tiles.tile_config("forward", x.dtype, 8, 64,
                                                                                  arch=None)  # fmt: skip


def _backends_here() -> list[tuple[str, str]]:
    """(backend, how it runs here): torch, Triton (GPU or interpreter), CUDA C++ (GPU or the emulator)."""
    from mdkernels import _cuda_ext

    out = [(b, "") for b in FUSED_BACKENDS]
    if torch.cuda.is_available() and _cuda_ext.usable():
        out.append(("cuda", ""))
    elif _cuda_ext.emu is not None:
        out.append(("cuda", "emulated"))
    return out


@pytest.mark.parametrize("backend,how", _backends_here(), ids=lambda v: v or "native")
def test_every_loss_gives_identical_bits_twice_in_deterministic_mode(backend, how):
    """Every public loss (each case of the selfcheck), each backend that runs here: with
    ``torch.use_deterministic_algorithms(True)`` nothing raises (no op lacks a deterministic version), and two
    calls give the same loss and gradients, bit for bit."""
    import contextlib

    from mdkernels import _cuda_ext
    from mdkernels.ops import OPS
    from mdkernels.tools import selfcheck

    dev = "cuda" if torch.cuda.is_available() and backend != "torch" else "cpu"
    x, w, y, t = selfcheck._inputs(19, 40, 70, torch.float32, dev)
    w3 = w.repeat_interleave(3, 0) + 0.1
    ran = 0
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for name, (fast, _ref, op, grad_of) in selfcheck._cases(backend).items():
            lacks = backend == "cuda" and ("subcenters" in name or "curricular" in name)
            if backend not in OPS[op].backends or lacks:
                continue
            centers = w3 if "subcenters" in name else w
            runs = []
            for _ in range(2):
                leaves = [v.detach().clone().requires_grad_(i in grad_of) for i, v in enumerate((x, centers))]
                with _cuda_ext.emulated() if how == "emulated" else contextlib.nullcontext():
                    loss = fast(leaves[0], leaves[1], y, t)
                    grads = torch.autograd.grad(loss, [leaves[i] for i in grad_of])
                runs.append([loss.detach(), *grads])
            assert _same_bits(*runs), f"{backend} {name}: two calls differ"
            ran += 1
    finally:
        torch.use_deterministic_algorithms(before)
    assert ran >= (6 if backend == "cuda" else 9)
