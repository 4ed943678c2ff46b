"""Shared benchmark harness: each bench_<op>.py supplies inputs and providers; this times them, measures
peak memory and appends rows (with device, versions, commit, date) to bench/results/<device>.csv.

GPU timing: triton.testing.do_bench (median, p20, p80); peak memory: torch.cuda.max_memory_allocated
minus what the inputs hold. CPU timing: repeated wall-clock runs; peak memory: the rise of the
process's peak RSS over the inputs, measured in a fresh subprocess per provider.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# where rows go: bench/results/, or MDK_BENCH_RESULTS (bench/gpu_check.sh's dry run writes nothing into the repo)
RESULTS = Path(os.environ.get("MDK_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
COLUMNS = [
    "op",
    "variant",  # a case of the op: "frozen" centers, feature "maps", triplet mining "all"; "" otherwise
    "provider",
    "mode",
    "B",
    "D",
    "C",
    "dtype",
    "device",
    "ms_median",
    "ms_p20",
    "ms_p80",
    "peak_mem_bytes",
    "tflops",
    "torch",
    "triton",
    "commit",
    "date",
]


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model and cores; ``MDK_FAKE_DEVICE`` overrides both (bench/gpu_check.sh's
    dry run on a CPU writes its rows under a fake GPU name)."""
    if os.environ.get("MDK_FAKE_DEVICE"):
        return os.environ["MDK_FAKE_DEVICE"]
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()} cores"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def commit() -> str:
    """HEAD's short hash, with ``+dirty`` when the package's sources differ from it (results/ aside)."""
    try:
        root = Path(__file__).resolve().parents[1]
        run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=root,  # noqa: E731
                                        check=True).stdout.strip()  # fmt: skip
        head = run("rev-parse", "--short", "HEAD")
        dirty = run("status", "--porcelain", "--", "mdkernels", "csrc", "bench", ":(exclude)bench/results")
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return ""


def time_cpu(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> tuple[float, float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[-1]


def time_cpu_interleaved(fns: dict, reps: int = 5, warmup: int = 1) -> dict:
    """``time_cpu`` of several callables with their repetitions interleaved (a, b, c, a, b, c, ...), so
    that a slow spell of a shared machine hits every provider alike and their ratios hold within one run."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        ts.sort()
        q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [ts[0]] * 4
        out[name] = (statistics.median(ts), q[0], q[-1])
    return out


def time_gpu(fn: Callable[[], object]) -> tuple[float, float, float]:
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def peak_gpu(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(call: Callable[[], object], device: str, module: str, spec: dict, cpu_times: tuple | None = None,
            reps: int = 5) -> tuple[float, float, float, int]:
    """``(median, p20, p80, peak bytes)`` of one provider's call. On a GPU: :func:`time_gpu` and :func:`peak_gpu`.
    On the CPU: ``cpu_times`` (this call's entry of :func:`time_cpu_interleaved`) or else :func:`time_cpu`, and
    the peak RSS rise of the call in a child (:func:`peak_cpu_subprocess`, ``python -m bench.<module> --child
    <spec>``)."""
    if device == "cuda":
        return (*time_gpu(call), peak_gpu(call))
    return (*(cpu_times or time_cpu(call, reps=reps)), peak_cpu_subprocess(module, spec))


def maxrss_bytes() -> int:
    """Peak resident memory of this process since start, or since :func:`reset_peak_rss`."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (Linux: ``5 > /proc/self/clear_refs``); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def ran_as_child(argv, child: Callable[[dict], object]) -> bool:
    """The child side of :func:`peak_cpu_subprocess`: when this process was started as ``python -m bench.<module>
    --child <spec>`` (``argv`` None: the command line), run ``child(spec)`` and return True."""
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return True
    return False


def peak_cpu_subprocess(module: str, spec: dict) -> int:
    """Peak RSS rise of one fwd+bwd call, in a fresh interpreter (``python -m bench.<module> --child``)."""
    # glibc raises its mmap threshold after freeing a large block, keeping later large blocks in the heap,
    # where a second call reuses them unseen: a fixed threshold maps and unmaps every large tensor
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=Path(os.path.abspath(__file__)).parents[1],  # not resolved: bench/gpu_check.sh links bench/ into a
        # folder without the tree's mdkernels/, and the child must import the package the parent imported
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return int(out.stdout.strip().splitlines()[-1])


def append_rows(rows: list[dict], device: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{slug(device_name(device))}.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})
    return path


def append_record(record: dict, device: str, name: str) -> Path:
    """One JSON line with the device, versions, commit and date into ``bench/results/<device>_<name>.jsonl``: the
    figures that are no op's CSV row (an application's rate, an extrapolation)."""
    import json

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{slug(device_name(device))}_{name}.jsonl"
    full = {**{k: v for k, v in base_row("", device).items() if k not in ("op", "variant")}, **record}
    with path.open("a") as f:
        f.write(json.dumps(full, sort_keys=True) + "\n")
    return path


def base_row(op: str, device: str, variant: str = "") -> dict:
    """The fields every row shares; ``op`` is a name of the registry (:data:`mdkernels.ops.OPS`)."""
    return {
        "op": op,
        "variant": variant,
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": commit(),
        "date": _dt.date.today().isoformat(),
    }


def print_table(rows: list[dict]) -> None:
    cols = ["provider", "mode", "B", "D", "C", "dtype", "ms_median", "peak_mem_bytes"]
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        vals = [r[c] if not isinstance(r[c], float) else f"{r[c]:.2f}" for c in cols]
        vals[-1] = f"{r['peak_mem_bytes'] / 2**20:.1f} MiB" if r["peak_mem_bytes"] != "" else ""
        print(" | ".join(f"{v!s:>14}" for v in vals))
