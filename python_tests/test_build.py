"""Packaging: info(), the CLI, the CUDA module when nvcc built it, and no stale module after OFF."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mdkernels
from mdkernels.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_info_keys_and_module_entry_point():
    info = mdkernels.info()
    for key in (
        "torch",
        "triton",
        "cuda_extension",
        "cuda_archs",
        "gpu",
        "triton_available",
        "triton_interpret",
        "cuda_kernels",
        "cuda_emulator",
    ):
        assert key in info
    out = subprocess.run([sys.executable, "-m", "mdkernels.info"], capture_output=True, text=True, check=True)
    assert '"cuda_extension"' in out.stdout


@pytest.mark.skipif(os.environ.get("MDK_EXPECT_CUDA_EXT") != "1", reason="set by CI, where nvcc builds csrc/")
def test_cuda_module_was_built():
    info = mdkernels.info()
    assert info["cuda_extension"], "nvcc is present but the CUDA module is missing from the install"
    from mdkernels._cuda_ext import arch_runs

    assert all(arch_runs(",".join(info["cuda_archs"]), c) for c in (80, 86, 89, 90, 100, 120)), info["cuda_archs"]
    assert "l2norm_forward" in info["cuda_kernels"]
    from mdkernels import _cuda

    assert _cuda.device_count() >= 0  # importable and callable without a GPU
    assert info["cuda_emulator"], "the CPU emulator of the CUDA kernels (test_cuda_emulated.py) was not built"
    from mdkernels import _cuda_emu

    assert _cuda_emu.kernels == _cuda.kernels and _cuda_emu.emulated and not _cuda.emulated


@pytest.mark.slow
def test_cli_info_and_demo(capsys, tmp_path):
    assert main(["info"]) == 0
    assert "torch" in capsys.readouterr().out
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    import json

    printed = capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())
    methods = {r["method"] for r in rows}
    assert methods == {"teacher", "arcface", "margindistill", "proxyless", "angular", "triplet", "hinton", "adadistill"}
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["tar@far=1e-3"] <= 1.0
    assert "margindistill" in printed and "TAR@FAR=1e-3" in printed
    assert (out / "roc.png").stat().st_size > 1000 and (out / "training_curves.png").stat().st_size > 1000


@pytest.mark.skipif(not (REPO / "setup.py").exists(), reason="needs the source tree")
def test_off_build_removes_stale_modules(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "CMakeLists.txt"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "mdkernels", src / "mdkernels", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    stale = src / "mdkernels" / "_cuda.cpython-stale.so"
    stale.write_bytes(b"stale")
    env = dict(os.environ, MDK_BUILD_CUDA="OFF", MDK_BUILD_CPU="OFF")  # nothing to build: pybind11 not needed
    res = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "MDK_BUILD_CUDA=OFF" in res.stdout and "MDK_BUILD_CPU=OFF" in res.stdout
    assert not stale.exists()
    bad = subprocess.run(
        [sys.executable, "setup.py", "build_ext"],
        cwd=src,
        capture_output=True,
        text=True,
        env=dict(os.environ, MDK_BUILD_CUDA="maybe"),
    )
    assert bad.returncode != 0 and "MDK_BUILD_CUDA must be AUTO, ON or OFF" in bad.stderr


@pytest.mark.skipif(not (REPO / "setup.py").exists(), reason="needs the source tree")
def test_nvcc_below_the_floor_is_refused_or_skipped(tmp_path):
    """nvcc 12.x is below the CUDA module's floor (only 13.0 compiled csrc/ in scripts/compat.py): ON fails
    naming the floor, AUTO builds without the CUDA module and says why."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "CMakeLists.txt"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "mdkernels", src / "mdkernels", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    fake = tmp_path / "cuda" / "bin" / "nvcc"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", MDK_BUILD_CPU="OFF")
    run = [sys.executable, "setup.py", "build_ext", "--inplace"]
    on = subprocess.run(run, cwd=src, env=dict(env, MDK_BUILD_CUDA="ON"), capture_output=True, text=True)
    assert on.returncode != 0 and "needs nvcc >= 13.0" in on.stderr and "CUDA 12.4" in on.stderr, on.stderr[-2000:]
    auto = subprocess.run(run, cwd=src, env=dict(env, MDK_BUILD_CUDA="AUTO"), capture_output=True, text=True)
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert "needs nvcc >= 13.0" in auto.stdout and "skipping the CUDA module" in auto.stdout
    assert not list((src / "mdkernels").glob("_cuda*.so"))


def test_readme_commands_are_what_ci_runs():
    """CI installs what the README installs, the same way, and runs the README's test command: a new user and CI
    get the versions pip resolves that day within pyproject.toml's ranges (CI pins nothing of its own)."""
    readme, ci = REPO / "README.md", REPO / ".ci" / "run"
    if not (readme.exists() and ci.exists()):
        pytest.skip("needs the source tree")
    text, script = readme.read_text(), ci.read_text()
    command = "TRITON_INTERPRET=1 pytest python_tests -q"
    assert command in text
    assert any(line.startswith(command) for line in script.splitlines())
    install = 'pip install torch==2.13.0 && pip install ".[test]"'
    assert install in text and any(line.strip() == install for line in script.splitlines())
    pins = [line for line in script.splitlines() if "pip install" in line and line.strip() != install
            and "--upgrade pip" not in line]  # fmt: skip
    assert not pins, f".ci/run installs something the README does not: {pins}"


def test_versions_below_the_floor_are_refused_at_import():
    from mdkernels import _floor

    with pytest.raises(ImportError, match=r"needs torch >= 2\.9 .* this is torch 2\.8\.0\+cu128"):
        _floor.check("2.8.0+cu128", "3.4.0")
    with pytest.raises(ImportError, match=r"needs Triton >= 3\.5 .* this is triton 3\.4\.0"):
        _floor.check("2.13.0+cpu", "3.4.0")
    _floor.check("2.9.1", "3.5.1")
    _floor.check("2.15.0", None)  # no Triton: the torch backend
    pyproject = (REPO / "pyproject.toml").read_text() if (REPO / "pyproject.toml").exists() else None
    if pyproject is not None:  # one floor, stated twice: the import check and the package metadata
        assert '"torch>=2.9"' in pyproject and '"triton>=3.5,<3.10"' in pyproject


@pytest.mark.skipif(os.environ.get("MDK_TEST_INSTALLED") != "1", reason="set by CI")
def test_tests_run_against_the_installed_package():
    assert "site-packages" in mdkernels.__file__, mdkernels.__file__


def test_child_processes_import_the_package_under_test():
    """A child ``python -m`` / ``python -c`` (torchrun workers, the CLI, bench scripts) imports the same
    mdkernels as the tests: the session runs outside the tree (conftest.py)."""
    res = subprocess.run([sys.executable, "-c", "import mdkernels; print(mdkernels.__file__)"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.stdout.strip() == mdkernels.__file__, res.stdout + res.stderr[-2000:]


@pytest.mark.slow
def test_demo_methods_adds_margin_family_students(capsys, tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--preset", "tiny", "--out", str(out), "--no-progress", "--methods", "adaface,subcenter"]
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    summary = [r["method"] for r in rows if r.get("summary")]
    assert summary == ["teacher", "arcface", "margindistill", "proxyless", "angular", "triplet", "hinton", "adadistill",
                       "adaface", "subcenter"]  # fmt: skip
    assert "adaface" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--methods takes margin-family methods"):
        main(["demo", "--preset", "tiny", "--out", str(out), "--methods", "hinton2"])


def test_the_licence_ships_with_the_package():
    """The declared licence (Apache-2.0) is in the repository's LICENSE and in the installed distribution's
    metadata, the file included (pip install . puts it in the wheel's dist-info)."""
    from importlib.metadata import distribution

    dist = distribution("mdkernels")
    assert dist.metadata.get("License-Expression") == "Apache-2.0", dict(dist.metadata)
    shipped = [f for f in (dist.files or []) if f.name == "LICENSE"]
    assert shipped, "LICENSE is not in the installed distribution"
    text = shipped[0].read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    if (REPO / "LICENSE").exists():
        assert (REPO / "LICENSE").read_text() == text
