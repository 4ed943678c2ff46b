"""An arcface_torch run as an mdk teacher: its backbone and full centers written as the checkpoint that
``mdk train --teacher`` (and ``mdk import-insightface``) reads, cached while the run's files are unchanged."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mdkernels.interop.insightface import INPUT_SIZE, find_backbone, fingerprint, load_backbone, load_centers
from mdkernels.models.checkpoint import save_checkpoint
from mdkernels.train.config import TrainConfig


def import_run(run_dir: str | Path, network: str, out: str | Path, num_classes: int | None = None) -> dict:
    """Write an mdk teacher checkpoint (what ``mdk train --teacher`` reads) from an arcface_torch run: the
    backbone (strict load) and the full centers, checked against each other. Returns what was written:
    ``{"checkpoint", "classes", "embedding_size", **source}``."""
    backbone_path = find_backbone(run_dir)
    model = load_backbone(backbone_path, network)
    D = model.embedding_size
    centers, layout, world = load_centers(run_dir, num_classes, D, with_layout=True)
    cfg = TrainConfig(method="arcface", backbone=network, embedding_size=D, input_size=INPUT_SIZE)
    out = Path(out)
    source = {"insightface_run": str(Path(run_dir).resolve()), "backbone": backbone_path.name, "network": network,
              "shard_layout": layout, "world_size": world, "fingerprint": fingerprint(run_dir)}  # fmt: skip
    save_checkpoint(out, {"config": dataclasses.asdict(cfg), "backbone": model.state_dict(), "step": 0,
                          "num_classes": centers.shape[0], "head": {"head.weight": centers, "subcenters": 1},
                          "source": source})  # fmt: skip
    return {"checkpoint": str(out), "classes": int(centers.shape[0]), "embedding_size": D, **source}


def import_run_cached(run_dir: str | Path, network: str, out: str | Path) -> Path:
    """:func:`import_run` unless ``out`` already holds the import of the same, unchanged run files (checked
    with the small ``<out>.json`` written beside it, so the checkpoint is not read)."""
    out = Path(out)
    stamp = out.with_suffix(".json")
    key = {"insightface_run": str(Path(run_dir).resolve()), "network": network, "fingerprint": fingerprint(run_dir)}
    if out.is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == key:
                return out
        except ValueError:
            pass
    stamp.unlink(missing_ok=True)
    import_run(run_dir, network, out)
    stamp.write_text(json.dumps(key))
    return out
