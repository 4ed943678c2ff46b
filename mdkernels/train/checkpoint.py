"""Checkpoints of ``mdk train``: atomic writes, ``weights_only`` loads, and the backbone they hold."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from mdkernels.train.models import build_backbone


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temporary file in the same folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
