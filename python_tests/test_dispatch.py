"""backend="auto" on a GPU: Triton, or the CUDA C++ kernels where the measured table says they are faster."""

from __future__ import annotations

import pytest
import torch

import mdkernels
from mdkernels import backends as dispatch
from mdkernels.dispatch_table import ROWS
from mdkernels.functional import resolve_backend
from mdkernels.ops import OPS

H100 = "NVIDIA H100 80GB HBM3"
TABLE = [
    dict(op="margin_ce", device=H100, dtype="bfloat16", B=128, C=10_000, D=512, ms_triton=1.0, ms_cuda=0.8),
    dict(op="margin_ce", device=H100, dtype="bfloat16", B=1024, C=360_232, D=512, ms_triton=20.0, ms_cuda=25.0),
    dict(op="margin_ce", device=H100, dtype="float32", B=1024, C=360_232, D=512, ms_triton=90.0, ms_cuda=60.0),
    dict(op="angular_distill", device=H100, dtype="bfloat16", B=1024, C=1, D=512, ms_triton=0.02, ms_cuda=0.01),
]


def test_nearest_measured_shape_decides():
    assert dispatch.choose("margin_ce", H100, torch.bfloat16, 256, 20_000, 512, TABLE) == "cuda"
    assert dispatch.choose("margin_ce", H100, torch.bfloat16, 1024, 2_000_000, 512, TABLE) == "triton"
    assert dispatch.choose("margin_ce", H100, torch.float32, 128, 10_000, 512, TABLE) == "cuda"  # its only row
    assert dispatch.choose("angular_distill", H100, torch.bfloat16, 64, 1, 256, TABLE) == "cuda"


def test_no_matching_row_means_no_choice():
    assert dispatch.choose("margin_ce", "NVIDIA H200", torch.bfloat16, 128, 10_000, 512, TABLE) is None
    assert dispatch.choose("margin_ce", H100, torch.float16, 128, 10_000, 512, TABLE) is None
    assert dispatch.choose("triplet_distill", H100, torch.bfloat16, 128, 10_000, 512, TABLE) is None


def test_cpu_tensors_never_consult_the_table():
    x = torch.randn(4, 8)
    assert resolve_backend("auto", x, "margin_ce", (4, 10, 8)) == "torch"
    assert dispatch.gpu_backend("margin_ce", x, 4, 10, 8) == "triton"  # not usable by the CUDA module


def _malformed(rows: list[dict]) -> list[str]:
    """Why each row of a dispatch table is unusable (an op without CUDA kernels, an unknown dtype, a size or a time
    that is not positive, a missing key)."""
    keys = {"op", "device", "dtype", "B", "C", "D", "ms_triton", "ms_cuda"}
    bad = []
    for row in rows:
        if set(row) != keys:
            bad.append(f"{row}: keys {sorted(set(row) ^ keys)}")
        elif row["op"] not in OPS or "cuda" not in OPS[row["op"]].backends:
            bad.append(f"{row}: op without CUDA kernels")
        elif row["dtype"] not in ("float32", "bfloat16", "float16"):
            bad.append(f"{row}: dtype")
        elif min(row["B"], row["C"], row["D"]) <= 0 or min(row["ms_triton"], row["ms_cuda"]) <= 0:
            bad.append(f"{row}: a size or time that is not positive")
    return bad


def test_the_shipped_table_is_well_formed():
    """The table mdkernels ships (empty until a GPU session measures it: then ``auto`` means Triton on CUDA), and
    the checker itself: this file's constructed table passes it, malformed rows do not."""
    assert isinstance(ROWS, list) and _malformed(ROWS) == []
    assert _malformed(TABLE) == []
    broken = [dict(TABLE[0], op="triplet_distill"), dict(TABLE[0], dtype="int8"), dict(TABLE[0], ms_cuda=0.0),
              {k: v for k, v in TABLE[0].items() if k != "D"}]  # fmt: skip
    assert len(_malformed(broken)) == len(broken)
    if not ROWS:  # then auto picks Triton on any GPU: nothing can send it to the CUDA kernels
        assert dispatch.choose("margin_ce", H100, torch.bfloat16, 128, 10_000, 512, ROWS) is None


@pytest.mark.gpu
@pytest.mark.needs_cuda  # the real GPU's name and the real module; the table's logic: the tests above
@pytest.mark.skipif(not mdkernels.info()["cuda_extension"], reason="CUDA module not built in this install")
def test_gpu_auto_follows_the_table():
    name = torch.cuda.get_device_name()
    rows = [r for r in ROWS if r["device"] == name and r["op"] == "margin_ce"]
    if not rows:
        pytest.skip(f"no measurements for {name} in mdkernels/dispatch_table.py (python -m bench.tune_dispatch)")
    for r in rows:
        x = torch.empty(r["B"], r["D"], device="cuda", dtype=getattr(torch, r["dtype"]))
        want = "cuda" if r["ms_cuda"] < r["ms_triton"] else "triton"
        assert resolve_backend("auto", x, "margin_ce", (r["B"], r["C"], r["D"])) == want


def test_tune_dispatch_turns_a_benchmark_csv_into_the_table(tmp_path, monkeypatch):
    """bench/tune_dispatch.py: latest pair per shape, both backends required, other GPUs' rows kept."""
    import csv
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    if not (repo / "bench" / "tune_dispatch.py").exists():
        pytest.skip("needs the source tree (bench/)")
    monkeypatch.syspath_prepend(str(repo))
    from bench import harness, tune_dispatch

    path = tmp_path / "gpu.csv"
    rows = [
        ("margin_ce", "", "mdk_triton", "fwd+bwd", 1024, 512, 85742, "bfloat16", 5.0),
        ("margin_ce", "", "mdk_cuda", "fwd+bwd", 1024, 512, 85742, "bfloat16", 6.0),
        ("margin_ce", "", "mdk_cuda", "fwd+bwd", 1024, 512, 85742, "bfloat16", 4.0),  # a later run: wins
        ("margin_ce", "", "mdk_triton", "fwd", 1024, 512, 85742, "bfloat16", 1.0),  # not fwd+bwd
        ("margin_ce", "", "mdk_triton", "fwd+bwd", 128, 512, 10000, "bfloat16", 1.0),  # no cuda pair
        ("margin_ce", "frozen", "mdk_cuda", "fwd+bwd", 1024, 512, 85742, "bfloat16", 1.0),  # not a variant of the table
        ("angular_distill", "maps", "mdk_triton", "fwd+bwd", 64, 50176, 0, "float32", 0.3),
        ("angular_distill", "maps", "mdk_cuda", "fwd+bwd", 64, 50176, 0, "float32", float("nan")),  # failed run
    ]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=harness.COLUMNS)
        w.writeheader()
        for op, variant, prov, mode, B, D, C, dt, ms in rows:
            w.writerow(dict(op=op, variant=variant, provider=prov, mode=mode, B=B, D=D, C=C, dtype=dt, device=H100,
                            ms_median=ms))  # fmt: skip
    out = tmp_path / "table.py"
    other = dict(
        op="angular_distill", device="NVIDIA H200", dtype="float32", B=64, C=1, D=50176, ms_triton=1.0, ms_cuda=2.0
    )
    tune_dispatch.write_table([other], out)
    tune_dispatch.main(["--csv", str(path), "--out", str(out)])
    table: dict = {}
    exec(out.read_text(), table)
    assert table["ROWS"] == [
        other,
        dict(op="margin_ce", device=H100, dtype="bfloat16", B=1024, C=85742, D=512, ms_triton=5.0, ms_cuda=4.0),
    ]
    assert dispatch.choose("margin_ce", H100, torch.bfloat16, 1024, 100_000, 512, table["ROWS"]) == "cuda"


def test_auto_never_picks_the_cuda_kernels_for_a_d_by_c_layout(monkeypatch):
    """The CUDA C++ kernels load W row by row; a pytorch-metric-learning ``(D, C)`` parameter's ``(C, D)`` view has
    stride C along D, so their loads would not coalesce: ``auto`` keeps Triton for it even where the table says
    CUDA was faster (an explicit ``backend="cuda"`` still runs it, correctly). The plan tells the rule."""
    from types import SimpleNamespace

    import mdkernels.dispatch_table as table
    from mdkernels import _plan

    t = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.bfloat16)
    monkeypatch.setattr(table, "ROWS", [dict(TABLE[0])])
    monkeypatch.setattr(dispatch, "_device_name", lambda index: H100)
    row = TABLE[0]
    assert dispatch._measured_winner("margin_ce", t, row["B"], row["C"], row["D"], []) == "cuda"
    assert dispatch._measured_winner("margin_ce", t, row["B"], row["C"], row["D"], ["strided_centers"]) == "triton"
    seen = {}
    monkeypatch.setattr(_plan.backends, "resolve", lambda *a, **k: seen.update(k) or "torch")
    W = torch.randn(8, 50)  # (D, C): the drop-in's parameter
    mdkernels.margin_cross_entropy(torch.randn(4, 8), W.t(), torch.tensor([0, 1, 2, 3]))
    assert seen["strided_centers"] is True
    mdkernels.margin_cross_entropy(torch.randn(4, 8), W.t().contiguous(), torch.tensor([0, 1, 2, 3]))
    assert seen["strided_centers"] is False
