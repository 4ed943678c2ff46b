"""The CUDA backend's shared device math (csrc/margin_math.h), compiled for the host and run on the CPU:
hand-derived checks in C++, then the C++ margin function against mdkernels.ops._common.margin on a grid."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mdkernels.ops._common.margin import margin_target_and_slope

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "csrc" / "tests" / "test_margin_math.cpp"
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    if not SRC.exists():
        pytest.skip("needs the source tree (csrc/)")
    if CXX is None:
        pytest.skip("no C++ compiler on this machine")
    out = tmp_path_factory.mktemp("csrc") / "test_margin_math"
    subprocess.run([CXX, "-std=c++17", "-O2", "-I", str(REPO / "csrc"), str(SRC), "-o", str(out)], check=True)
    return out


def test_hand_derived_checks_in_cpp(binary):
    res = subprocess.run([str(binary)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
    assert res.stdout.strip().endswith("0 failed") and "FAIL" not in res.stdout


def test_cpp_margin_equals_the_python_contract(binary):
    lines = subprocess.run([str(binary), "dump"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) == 5 * 11 * 4
    for line in lines:
        c, m1, m2, m3, fb, st, z, slope = line.split()
        c, m1, m2, m3, z, slope = map(float, (c, m1, m2, m3, z, slope))
        zp, sp, _ = margin_target_and_slope(
            torch.tensor([c], dtype=torch.float64),
            torch.tensor([m2], dtype=torch.float64),
            s=64.0,
            m1=m1,
            m3=m3,
            fallback=fb == "1",
            grad="straight_through" if st == "1" else "exact",
        )
        assert zp.item() == pytest.approx(z, rel=1e-12, abs=1e-12), line
        assert sp.item() == pytest.approx(slope, rel=1e-9, abs=1e-9), line
