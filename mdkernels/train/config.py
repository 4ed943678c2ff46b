"""The training configuration of ``mdk train``: one dataclass, a JSON file or flags fill it."""

from __future__ import annotations

import dataclasses

METHODS = ("arcface", "cosface", "sphereface", "margindistill", "proxyless", "angular", "triplet", "hinton")
DISTILL = ("margindistill", "proxyless", "angular", "triplet", "hinton")


@dataclasses.dataclass
class TrainConfig:
    data: str = ""  # train.rec or an image-folder root
    val: str | None = None  # verification .bin
    out: str = "runs/mdk"
    method: str = "arcface"
    teacher: str | None = None  # teacher checkpoint for the distillation methods
    backbone: str = "mobilefacenet"
    width: float = 1.0
    embedding_size: int = 512
    input_size: int = 112
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    seed: int = 0
    workers: int = 2
    s: float = 64.0
    m: float | None = None  # margin of the method (default: 0.5 arcface/proxyless, 0.35 cosface, 1.35 sphereface)
    m_min: float = 0.2
    m_max: float = 0.5
    T: float = 4.0
    alpha: float = 0.95
    distill_weight: float = 1.0  # lambda of angular/triplet distillation added to ArcFace
    p: float = 2.0
    mining: str = "all"
    distance: str = "l2"
    backend: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    sharded: bool = False  # shard the head's centers over the DDP ranks (arcface/cosface/sphereface)
    save_every: int = 0  # steps between checkpoints (0: end of each epoch only)
    eval_every: int = 0  # epochs between evaluations (0: at the end only)
    max_steps: int = 0  # stop after this many steps (0: run every epoch)
    progress: bool = True
    tensorboard: bool = True

    def margin(self) -> float:
        if self.m is not None:
            return self.m
        return {"cosface": 0.35, "sphereface": 1.35}.get(self.method, 0.5)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
