"""The tile a launch runs with: :func:`tiles.tile_config`'s, or with ``MDK_AUTOTUNE=1`` on a GPU the fastest of
:func:`candidate_configs`, timed once per (kernel, dtype, shape, GPU, Triton), recorded in a file and reused from then
on, in every later run (:func:`autotuned`): a choice by timing only where asked for, and never a different one for
the same record.
"""

from __future__ import annotations

import json
import os

import torch

from mdkernels.ops._common.env import HAS_TRITON, capability, gpu_tiles
from mdkernels.ops._common.tiles import arch_class, tile_config

if HAS_TRITON:
    import triton


def candidate_configs(kernel: str, dtype: torch.dtype, B: int, D: int, **options) -> list[dict]:
    """The default tile first, then the variants ``MDK_AUTOTUNE=1`` times on a GPU: the other arch class's
    tile (on Hopper: the mma.sync tiles, which keep more of D resident: fewer GEMM units, older MMA), and
    halved or doubled row and class tiles."""
    base = tile_config(kernel, dtype, B, D, **options)
    out = [base]
    other = dict(options, arch=80 if arch_class(options.get("arch")) == "hopper" else 90)
    if gpu_tiles() and tile_config(kernel, dtype, B, D, **other) not in out:
        out.append(tile_config(kernel, dtype, B, D, **other))
    for bb, bc, warps in ((base["BLOCK_B"] * 2, base["BLOCK_C"], 8), (base["BLOCK_B"], base["BLOCK_C"] * 2, 8),
                          (base["BLOCK_B"], base["BLOCK_C"], 4), (base["BLOCK_B"] // 2 or 16, base["BLOCK_C"], 4)):  # fmt: skip
        cand = dict(base, BLOCK_B=max(16, bb), BLOCK_C=max(min(16, base["BLOCK_C"]), bc), num_warps=warps)
        if cand not in out:
            out.append(cand)
    return out


_TUNED: dict[str, dict] = {}


def autotune_file() -> str:
    """Where ``MDK_AUTOTUNE=1`` records its choices: ``MDK_AUTOTUNE_FILE``, else
    ``~/.cache/mdkernels/autotune.json``."""
    return os.environ.get("MDK_AUTOTUNE_FILE") or os.path.join(os.path.expanduser("~"), ".cache", "mdkernels",
                                                                "autotune.json")  # fmt: skip


def _read_records(path: str) -> dict:
    try:
        with open(path) as f:
            records = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"MDK_AUTOTUNE_FILE {path!r} is not a readable JSON file of recorded tiles ({e}); "
                         "delete it to time again, or point MDK_AUTOTUNE_FILE elsewhere") from e  # fmt: skip
    return records if isinstance(records, dict) else {}


def recorded_or_timed(key: str, candidates, time_one, default: dict) -> dict:
    """The tile recorded for ``key`` in :func:`autotune_file`; else each of ``candidates()`` timed by
    ``time_one(cfg)`` (a candidate that raises is skipped), the fastest recorded there and returned. A timing
    is taken once per key and machine: every later call and run reuses the recorded tile, so the results are
    reproducible given that file (a tile changes the summation order, so another tile gives other bits)."""
    if key in _TUNED:
        return _TUNED[key]
    path = autotune_file()
    records = _read_records(path)
    if key not in records:
        timed = []
        for cfg in candidates():
            try:
                timed.append((time_one(cfg), cfg))
            except Exception:  # a candidate that does not fit this GPU (shared memory, registers) is skipped
                continue
        records = _read_records(path)  # another process may have recorded meanwhile: keep its entries
        records.setdefault(key, min(timed, key=lambda t: t[0])[1] if timed else default)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
    _TUNED[key] = dict(records[key])
    return _TUNED[key]


def tune_key(kernel: str, dtype: torch.dtype, B: int, C: int, D: int, device_name: str, options: dict) -> str:
    """The record's key: the kernel, shape, dtype, options, the GPU's name and the Triton version."""
    opts = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    version = triton.__version__ if HAS_TRITON else "none"
    return f"{kernel} {str(dtype).removeprefix('torch.')} B={B} C={C} D={D} {opts} | {device_name} | triton {version}"


def autotuned(kernel: str, x: torch.Tensor, B: int, C: int, D: int, launch, **options) -> dict:
    """The config ``launch(cfg)`` runs with: :func:`tile_config`; or with ``MDK_AUTOTUNE=1`` on a GPU the tile
    recorded for this (kernel, dtype, B, C, D, GPU, Triton) in :func:`autotune_file`, timed over
    :func:`candidate_configs` the first time only (:func:`recorded_or_timed`). ``options``: ``subcenters``,
    ``op_dtype`` (:func:`tile_config`); the arch is ``x``'s GPU's."""
    options = dict(options, arch=capability(x.device))
    default = tile_config(kernel, x.dtype, B, D, **options)
    if not (x.is_cuda and os.environ.get("MDK_AUTOTUNE") == "1"):
        return default
    import triton.testing

    key = tune_key(kernel, x.dtype, B, C, D, torch.cuda.get_device_name(x.device), options)
    return recorded_or_timed(key, lambda: candidate_configs(kernel, x.dtype, B, D, **options),
                             lambda cfg: triton.testing.do_bench(lambda: launch(cfg)), default)  # fmt: skip
