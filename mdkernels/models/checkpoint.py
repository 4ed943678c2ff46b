"""Checkpoints of ``mdk train``: atomic writes, ``weights_only`` loads, and the backbone they hold."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from mdkernels.models.backbones import build_backbone


def previous_path(path: Path) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint it replaced (``last.pt`` -> ``last.prev.pt``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: Path, state: dict, *, keep_previous: bool = False, _die_before_rename: bool = False) -> None:
    """Atomic: write a temporary file in the same folder, fsync, then rename over the target. A failed
    write (a full disk, say) removes the temporary file and leaves the target as it was.
    ``keep_previous`` first hard-links (or copies) the old target to :func:`previous_path`, so a checkpoint
    found corrupt later still has an intact predecessor."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if _die_before_rename:  # tests: a kill between the write and the rename
            os._exit(137)
        if keep_previous and path.is_file():
            prev, prev_tmp = previous_path(path), path.with_name(f".{path.name}.prev.tmp{os.getpid()}")
            prev_tmp.unlink(missing_ok=True)
            try:
                os.link(path, prev_tmp)
            except OSError:  # no hard links here: a copy
                shutil.copyfile(path, prev_tmp)
            os.replace(prev_tmp, prev)
        os.replace(tmp, path)
        for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, f"could not write the checkpoint {path} ({err.strerror or err}); the previous "
                      f"file there, if any, is unchanged") from err  # fmt: skip
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a loadable mdkernels checkpoint ({type(err).__name__}: {err})") from err


def backbone_from_checkpoint(ckpt: dict) -> nn.Module:
    cfg = ckpt["config"]
    model = build_backbone(cfg["backbone"], width=cfg["width"], embedding_size=cfg["embedding_size"],
                           input_size=cfg["input_size"])  # fmt: skip
    model.load_state_dict(ckpt["backbone"])
    return model
