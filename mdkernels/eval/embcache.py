"""Embeddings cached on disk, written as they are computed and resumed after a crash.

A cache entry is ``<dir>/<key>.npy`` (float32, one row per image), where ``key`` hashes the model file's bytes,
the list of images (paths, sizes, modification times) and the preprocessing. While rows are being computed they
go into ``<key>.partial.npy`` (memory-mapped) with ``<key>.json`` saying how many rows are done; a run that is
killed resumes from there, and a finished entry is renamed into place, so a million distractors are embedded
once per model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

FORMAT = 1  # bump when the preprocessing changes what a cached row means


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mdkernels" / "embeddings"


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def listing_digest(paths: list[Path]) -> str:
    """A hash of the image list: each path, size and modification time (not the pixels: a million files)."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True).encode()).hexdigest()[:24]


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def cached_rows(cache_dir: str | Path | None, parts: dict, n: int,
                produce: Callable[[int], Iterator[np.ndarray]], flush_every: float = 30.0) -> np.ndarray:  # fmt: skip
    """The ``(n, D)`` float32 rows for ``parts``: read from the cache, or computed by ``produce(start)`` (which
    yields consecutive row blocks from row ``start``) and written as they come. ``cache_dir=None`` computes
    in memory only."""
    if cache_dir is None:
        blocks = list(produce(0))
        return np.concatenate(blocks).astype(np.float32, copy=False) if blocks else np.zeros((0, 0), np.float32)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = key_of(parts)
    final, partial, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.partial.npy", cache_dir / f"{key}.json"
    if final.is_file():
        arr = np.load(final, mmap_mode="r")
        if arr.shape[0] == n:
            return arr
        final.unlink()  # a stale or foreign file under this key: recompute
    done, arr = 0, None
    if partial.is_file() and meta.is_file():
        try:
            state = json.loads(meta.read_text())
            arr = np.load(partial, mmap_mode="r+")
            done = int(state["done"]) if state.get("key") == key and arr.shape[0] == n else 0
        except (ValueError, KeyError, OSError):
            arr, done = None, 0
        if done == 0:
            arr = None
    last = time.perf_counter()
    row = done
    for block in produce(done):
        block = np.asarray(block, dtype=np.float32)
        if arr is None:
            arr = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, block.shape[1]))
            _write_json(meta, {"key": key, "done": 0, "rows": n, "parts": parts})
        arr[row : row + len(block)] = block
        row += len(block)
        if time.perf_counter() - last > flush_every:
            arr.flush()
            _write_json(meta, {"key": key, "done": row, "rows": n, "parts": parts})
            last = time.perf_counter()
    if row != n:
        raise RuntimeError(f"embedding produced {row} of {n} rows")
    if arr is None:
        raise ValueError("nothing to embed (no images)")
    arr.flush()
    del arr
    os.replace(partial, final)
    meta.unlink(missing_ok=True)
    return np.load(final, mmap_mode="r")
