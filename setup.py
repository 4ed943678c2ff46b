"""Build mdkernels: Python + Triton, plus optional C++ modules built by CMake.

Environment flags (read at build time, printed so a build log says what happened):

    MDK_BUILD_CUDA   AUTO (default): build the CUDA module (csrc/*.cu) when a working nvcc >= 13.0 exists,
                     skip it cleanly otherwise
                     ON: fail loudly when the CUDA module cannot be built
                     OFF: no CUDA module; any stale one is removed from the build tree
    MDK_BUILD_CPU    AUTO (default): build mdkernels._cpu (csrc/cpu/, the CPU path's chunk epilogues) with
                     the host compiler; a failed build falls back to pure torch with a warning
                     ON: fail loudly when it cannot be built; OFF: pure torch on the CPU
    MDK_CUDA_ARCHS   CMake CUDA architectures, default "80-real;90-real;90-virtual": sm_80 cubins (also run on
                     sm_86/sm_89), sm_90 cubins, and compute_90 PTX for Blackwell and later
    MAX_JOBS         parallel compile jobs; default derived from cores and free memory
    MDK_BUILD_EMULATOR_ASAN  1: also build mdkernels._cuda_emu_asan, the CPU emulator of the CUDA kernels
                     under AddressSanitizer (CI sets it; python_tests/test_cuda_emulated.py uses it)
    CUDA_HOME        where to look for nvcc when it is not on PATH

The CUDA module has no torch headers (raw device pointers + stream through pybind11), so it
compiles wherever nvcc is, with or without a GPU, and never needs torch at build time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _log(msg: str) -> None:
    print(f"[mdkernels setup] {msg}", flush=True)


def _find_nvcc() -> str | None:
    candidates = [shutil.which("nvcc")]
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(os.path.join(os.environ[env], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for cand in candidates:
        if not cand or not os.path.isfile(cand):
            continue
        try:
            subprocess.run([cand, "--version"], check=True, capture_output=True, timeout=60)
            return cand
        except (OSError, subprocess.SubprocessError):
            continue
    return None


NVCC_FLOOR = (13, 0)  # the CUDA C++ module: the nvcc that compiled it in scripts/compat.py (12.x: untested)


def _nvcc_version(nvcc: str) -> tuple[int, int] | None:
    """``(major, minor)`` from ``nvcc --version`` ("... release 13.0, V13.0.88"), None when unreadable."""
    import re

    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def _max_jobs() -> int:
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    cores = os.cpu_count() or 1
    try:  # nvcc takes ~2 GB per job at worst; do not let a small machine swap
        avail_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        by_mem = max(1, int(avail_gb // 2))
    except (ValueError, OSError, AttributeError):
        by_mem = cores
    return max(1, min(cores, by_mem))


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _mode(name: str) -> str:
    mode = os.environ.get(name, "AUTO").strip().upper()
    if mode not in ("AUTO", "ON", "OFF"):
        raise SystemExit(f"{name} must be AUTO, ON or OFF, got {mode!r}")
    return mode


class CMakeBuild(build_ext):
    def run(self) -> None:
        mode, cpu_mode = _mode("MDK_BUILD_CUDA"), _mode("MDK_BUILD_CPU")
        for ext in self.extensions:
            self._remove_stale(ext)
        nvcc = None
        if mode == "OFF":
            _log("MDK_BUILD_CUDA=OFF: no CUDA module")
        else:
            nvcc = _find_nvcc()
            if nvcc is None and mode == "ON":
                raise SystemExit("MDK_BUILD_CUDA=ON but no working nvcc was found (set CUDA_HOME or PATH)")
            if nvcc is None:
                _log("no working nvcc found: skipping the CUDA module (MDK_BUILD_CUDA=AUTO)")
            version = _nvcc_version(nvcc) if nvcc is not None else None
            if version is not None and version < NVCC_FLOOR:
                floor = ".".join(map(str, NVCC_FLOOR))
                why = (f"{nvcc} is CUDA {version[0]}.{version[1]}; the CUDA module needs nvcc >= {floor} (the version "
                       "tested; the Triton and torch backends do not need nvcc)")  # fmt: skip
                if mode == "ON":
                    raise SystemExit(f"MDK_BUILD_CUDA=ON: {why}")
                _log(f"{why}: skipping the CUDA module (MDK_BUILD_CUDA=AUTO)")
                nvcc = None
        with_cpu = cpu_mode != "OFF"
        if cpu_mode == "OFF":
            _log("MDK_BUILD_CPU=OFF: the CPU path runs pure torch")
        if nvcc is None and not with_cpu:
            return
        for ext in self.extensions:
            try:
                self._build_cmake(ext, nvcc, with_cpu)
            except (subprocess.CalledProcessError, OSError, ImportError) as err:  # ImportError: no pybind11
                if mode == "ON" and nvcc is not None:
                    raise SystemExit(f"MDK_BUILD_CUDA=ON and the CUDA module failed to build: {err}") from err
                if cpu_mode == "ON":
                    raise SystemExit(f"MDK_BUILD_CPU=ON and the CPU module failed to build: {err}") from err
                # AUTO: a broken toolchain must not break a pure-Python install, but it must be visible.
                _log(f"WARNING: the C++ modules failed to build ({err}); installing without them")
                self._remove_stale(ext)

    def _remove_stale(self, ext: Extension) -> None:
        """Drop compiled modules left by an earlier build, in build/ and (for --inplace) in the tree."""
        out = Path(self.get_ext_fullpath(ext.name))
        for folder in {out.parent, ROOT / "mdkernels"}:
            for stale in [*folder.glob("_cuda*.so"), *folder.glob("_cpu*.so")]:
                _log(f"removing stale {stale}")
                stale.unlink()

    def _build_cmake(self, ext: Extension, nvcc: str | None, with_cpu: bool) -> None:
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("MDK_CUDA_ARCHS", "80-real;90-real;90-virtual")
        jobs = _max_jobs()
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        what = [f"CUDA module with {nvcc}, archs={archs}"] if nvcc else []
        what += ["CPU module (host compiler)"] if with_cpu else []
        _log(f"building {' and '.join(what)}, MAX_JOBS={jobs}")
        ninja = shutil.which("ninja")
        try:  # the ninja package of the (isolated) build environment, when PATH does not have one
            import ninja as ninja_pkg

            ninja = os.path.join(ninja_pkg.BIN_DIR, "ninja")
        except ImportError:
            pass
        if ninja is None:
            raise OSError("ninja not found (pip install ninja)")
        # --fresh: a CMakeCache from an earlier (isolated) build may point at tools that are gone
        cfg = [
            "cmake",
            "--fresh",
            str(ROOT),
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DMDK_WITH_CUDA={'ON' if nvcc else 'OFF'}",
            f"-DMDK_WITH_CPU={'ON' if with_cpu else 'OFF'}",
            *([f"-DCMAKE_CUDA_COMPILER={nvcc}"] if nvcc else []),
            f"-DMDK_CUDA_ARCHS={archs}",
            f"-DMDK_OUTPUT_DIR={out.parent}",
            f"-DMDK_OUTPUT_NAME={out.name}",
            f"-DMDK_EMU_SUFFIX={out.name[len('_cuda') :]}",
            f"-DMDK_MODULE_SUFFIX={out.name[len('_cuda') :]}",
            f"-DMDK_EMULATOR_ASAN={'ON' if os.environ.get('MDK_BUILD_EMULATOR_ASAN') == '1' else 'OFF'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        subprocess.run(cfg, cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", str(jobs)], cwd=build_temp, check=True)
        if nvcc and not out.exists():
            raise OSError(f"CMake finished but {out} was not produced")


setup(ext_modules=[CMakeExtension("mdkernels._cuda")], cmdclass={"build_ext": CMakeBuild})
