"""The training configuration of ``mdk train``: one dataclass, a JSON file or flags fill it."""

from __future__ import annotations

import dataclasses

FAMILY = ("adaface", "curricularface", "magface", "elasticface", "subcenter")  # mdkernels.nn.margins heads
METHODS = ("arcface", "cosface", "sphereface", *FAMILY, "margindistill", "proxyless", "angular", "triplet", "hinton",
           "adadistill")  # fmt: skip
DISTILL = ("margindistill", "proxyless", "angular", "triplet", "hinton", "adadistill")
OPTIMIZERS = ("sgd", "adamw")
_DEFAULT_M = {"cosface": 0.35, "sphereface": 1.35, "adaface": 0.4}


@dataclasses.dataclass
class TrainConfig:
    data: str = ""  # train.rec or an image-folder root
    val: str | None = None  # verification .bin (several: comma-separated)
    num_classes: int = 0  # expected classes in the data (0: whatever it holds); a mismatch is an error
    num_images: int = 0  # expected images in the data (0: any)
    out: str = "runs/mdk"
    method: str = "arcface"
    teacher: str | None = None  # teacher: an mdk checkpoint, or an arcface_torch run directory (--teacher-network)
    teacher_network: str | None = None  # the teacher run's insightface network (r18 .. r200, mbf, mbf_large)
    init_centers: str | None = None  # start the head from these centers (run dir, mdk shards, checkpoint)
    backbone: str = "mobilefacenet"
    width: float = 1.0
    embedding_size: int = 512
    input_size: int = 112
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"  # "sgd" (momentum) or "adamw", as arcface_torch
    warmup_epochs: float = 0.0
    seed: int = 0
    workers: int = 2
    crop_pad: int = 2  # random-crop augmentation padding in pixels (0: flip only, as arcface_torch)
    s: float = 64.0
    # "m1,m2,m3": insightface's CombinedMarginLoss (arcface_torch's numerics: cos(theta + m2) with a
    # straight-through gradient and no fallback, or CosFace's m3), in place of --method's margin
    margin_list: str | None = None
    interclass_filter: float = 0.0  # arcface_torch's interclass_filtering_threshold (0: off)
    sample_rate: float = 1.0  # Partial FC negative-class sampling (--sharded under torchrun)
    m: float | None = None  # margin (default: 0.5; 0.35 cosface and elasticface cos, 1.35 sphereface, 0.4 adaface)
    m_min: float = 0.2
    m_max: float = 0.5
    T: float = 4.0
    alpha: float = 0.95
    distill_weight: float = 1.0  # lambda of angular/triplet distillation added to ArcFace
    p: float = 2.0
    mining: str = "all"
    distance: str = "l2"
    # the margin family (--method adaface|curricularface|magface|elasticface|subcenter); official defaults
    h: float = 0.333  # adaface: scale of the normalised feature norm
    t_alpha: float = 0.01  # adaface: EMA rate of the norm statistics
    margin_grad: str = "exact"  # adaface: "exact" or "straight_through" (CVLface)
    curricular_momentum: float = 0.01  # curricularface: EMA rate of t
    l_a: float = 10.0  # magface: norm range [l_a, u_a] and margin range [l_m, u_m]
    u_a: float = 110.0
    l_m: float = 0.45
    u_m: float = 0.8
    lambda_g: float = 35.0  # magface: weight of the norm regulariser
    easy_margin: bool = True  # magface
    elastic: str = "arc"  # elasticface: "arc" (ElasticArcFace) or "cos" (ElasticCosFace)
    elastic_std: float = 0.05  # elasticface: std of the per-row margins
    elastic_plus: bool = False  # elasticface: sort the margins against the target cosines (ElasticFace+)
    plus_order: str = "paper"  # elasticface+: "paper" or "official" (see the README)
    subcenters: int = 3  # subcenter: K sub-centers per class
    adadistill_margin: str = "arcface"  # adadistill: "arcface" (m 0.45) or "cosface" (m 0.35)
    backend: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    sharded: bool = False  # shard the head's centers over the DDP ranks (arcface/cosface/sphereface)
    fused_center_update: bool = True  # the centers' optimizer step inside their backward, wherever it is exact
    save_every: int = 0  # steps between checkpoints (0: end of each epoch only)
    eval_every: int = 0  # epochs between evaluations (0: at the end only)
    max_steps: int = 0  # stop after this many steps (0: run every epoch)
    progress: bool = True
    tensorboard: bool = True

    def margin_triple(self) -> tuple[float, float, float] | None:
        """``(m1, m2, m3)`` of ``margin_list``, or None."""
        if self.margin_list is None:
            return None
        try:
            m = tuple(float(v) for v in str(self.margin_list).strip("()[] ").split(","))
        except ValueError:
            m = ()
        if len(m) != 3:
            raise ValueError(f"--margin-list must be three numbers 'm1,m2,m3', got {self.margin_list!r}")
        return m

    def margin(self) -> float:
        if self.m is not None:
            return self.m
        if self.method == "elasticface" and self.elastic == "cos":
            return 0.35
        if self.method == "adadistill":
            return 0.45 if self.adadistill_margin == "arcface" else 0.35
        return _DEFAULT_M.get(self.method, 0.5)

    @classmethod
    def from_dict(cls, d: dict, source: str = "the config") -> TrainConfig:
        """A config from ``{field: value}`` (a JSON file's object, flags, a checkpoint's record). Unknown keys and
        values of the wrong type are a ValueError naming the key (an int is taken for a float field)."""
        if not isinstance(d, dict):
            raise ValueError(f"{source} must be a JSON object of {{field: value}}, got a {type(d).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"{source}: unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        values = {}
        for key, value in d.items():
            values[key] = _typed(key, value, known[key].type, source)
        cfg = cls(**values)
        cfg.check_ranges(source)
        return cfg

    def check_ranges(self, source: str = "the config") -> None:
        """The numbers that have a range, each a ValueError naming its key (flags: ``--key``)."""
        import math

        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                flag = "--" + key.replace("_", "-")
                raise ValueError(f"{source}: {key} ({flag}) must be {what}, got {getattr(self, key)!r}")

        for key in ("batch_size", "embedding_size", "input_size", "epochs"):
            need(getattr(self, key) >= 1, key, ">= 1")
        for key in ("workers", "num_classes", "num_images", "save_every", "eval_every", "max_steps", "crop_pad"):
            need(getattr(self, key) >= 0, key, ">= 0")
        for key in ("lr", "weight_decay", "warmup_epochs"):
            need(math.isfinite(getattr(self, key)) and getattr(self, key) >= 0, key, "a finite number >= 0")
        need(0 <= self.momentum < 1, "momentum", "in [0, 1)")
        need(math.isfinite(self.width) and self.width > 0, "width", "> 0")
        need(0 < self.sample_rate <= 1, "sample_rate", "in (0, 1]")


def _typed(key: str, value, annotation: str, source: str):
    """``value`` as field ``key`` of type ``annotation`` ("int", "float", "str", "bool", "X | None") takes it."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    if value is None and "None" in kinds:
        return None
    if "bool" in kinds and isinstance(value, bool):
        return value
    if "int" in kinds and isinstance(value, int) and not isinstance(value, bool):
        return value
    if "float" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if "str" in kinds and isinstance(value, str):
        return value
    want = " or ".join("null" if k == "None" else k for k in kinds)
    raise ValueError(f"{source}: {key} must be {want}, got {value!r}")


# ``mdk train --help``: each field's group and one line saying what it does, with its unit or choices.
GROUPS = ("data", "model", "loss", "the margin family", "distillation", "optimisation", "runtime")
HELP: dict[str, tuple[str, str]] = {
    "data": ("data", "training data: an insightface train.rec (beside train.idx) or an image folder root/<id>/<img>"),
    "val": ("data", "verification .bin set(s) evaluated during and after training, comma-separated"),
    "num_classes": ("data", "classes the data must hold (0: whatever it holds); a mismatch is an error"),
    "num_images": ("data", "images the data must hold (0: any); a mismatch is an error"),
    "out": ("runtime", "run folder: last.pt, log.csv, eval.csv, TensorBoard events"),
    "method": ("loss", "the loss: a margin (arcface, cosface, sphereface), a margin-family head, or a distillation "
                       "method (needs --teacher)"),
    "teacher": ("distillation", "teacher: an mdk checkpoint, or an arcface_torch run directory (with "
                                "--teacher-network)"),
    "teacher_network": ("distillation", "the insightface network of an arcface_torch --teacher run: r18 r34 r50 r100 "
                                        "r200 mbf mbf_large"),
    "init_centers": ("model", "start the head from these centers: an arcface_torch run dir, mdk shards, a checkpoint"),
    "backbone": ("model", "network: r18 r34 r50 r100 r200 mbf mbf_large (insightface's names), iresnet50, "
                          "mobilefacenet"),
    "width": ("model", "channel width multiplier of the backbone (1.0: insightface's)"),
    "embedding_size": ("model", "embedding dimension D"),
    "input_size": ("model", "square input size in pixels (112: insightface's)"),
    "epochs": ("optimisation", "passes over the training data"),
    "batch_size": ("optimisation", "images per step, per rank (as arcface_torch)"),
    "lr": ("optimisation", "peak learning rate (polynomial decay after the warm-up)"),
    "momentum": ("optimisation", "SGD momentum"),
    "weight_decay": ("optimisation", "weight decay"),
    "optimizer": ("optimisation", "sgd (with momentum) or adamw, as arcface_torch"),
    "warmup_epochs": ("optimisation", "linear warm-up length in epochs (fractions allowed)"),
    "seed": ("runtime", "seed of the initialisation, the augmentation and the data order"),
    "workers": ("runtime", "DataLoader worker processes"),
    "crop_pad": ("data", "random-crop padding in pixels (0: flip only, as arcface_torch)"),
    "s": ("loss", "logit scale s"),
    "margin_list": ("loss", "insightface's CombinedMarginLoss 'm1,m2,m3' with arcface_torch's numerics, in place "
                            "of --method's margin"),
    "interclass_filter": ("loss", "arcface_torch's interclass_filtering_threshold: non-target cosines above it are "
                                  "zeroed (0: off)"),
    "sample_rate": ("loss", "Partial FC negative-class sampling rate in (0, 1] (below 1: --sharded under torchrun)"),
    "m": ("loss", "margin (default: 0.5; cosface 0.35, sphereface 1.35, adaface 0.4, elasticface cos 0.35, "
                  "adadistill 0.45/0.35)"),
    "m_min": ("distillation", "margindistill/triplet: smallest per-row margin"),
    "m_max": ("distillation", "margindistill/triplet: largest per-row margin"),
    "T": ("distillation", "hinton: softmax temperature"),
    "alpha": ("distillation", "hinton: weight of the KL term in [0, 1]"),
    "distill_weight": ("distillation", "angular/triplet: weight of the distillation term added to ArcFace"),
    "p": ("distillation", "angular: exponent of (1 - cos)"),
    "mining": ("distillation", "triplet: all, hard or semihard"),
    "distance": ("distillation", "triplet: l2 (squared, on normalised embeddings) or angle"),
    "adadistill_margin": ("distillation", "adadistill: the student's margin head, arcface (m 0.45) or cosface "
                                          "(m 0.35)"),
    "h": ("the margin family", "adaface: scale of the normalised feature norm"),
    "t_alpha": ("the margin family", "adaface: EMA rate of the norm statistics"),
    "margin_grad": ("the margin family", "adaface: exact, or straight_through (no gradient through the margin)"),
    "curricular_momentum": ("the margin family", "curricularface: EMA rate of t"),
    "l_a": ("the margin family", "magface: lower end of the feature-norm range"),
    "u_a": ("the margin family", "magface: upper end of the feature-norm range"),
    "l_m": ("the margin family", "magface: margin at l_a"),
    "u_m": ("the margin family", "magface: margin at u_a"),
    "lambda_g": ("the margin family", "magface: weight of the norm regulariser"),
    "easy_margin": ("the margin family", "magface: keep the target cosine where it is <= 0"),
    "elastic": ("the margin family", "elasticface: arc (ElasticArcFace) or cos (ElasticCosFace)"),
    "elastic_std": ("the margin family", "elasticface: standard deviation of the per-row margins"),
    "elastic_plus": ("the margin family", "elasticface+: sort the margins against the target cosines"),
    "plus_order": ("the margin family", "elasticface+: paper or official (the official code's permutation)"),
    "subcenters": ("the margin family", "subcenter: K sub-centers per class"),
    "backend": ("runtime", "kernel backend: auto, triton, cuda, torch or reference"),
    "amp": ("runtime", "bf16 autocast on a GPU (ignored on the CPU)"),
    "sharded": ("runtime", "shard the head's centers over the torchrun ranks (arcface/cosface/sphereface, "
                           "margindistill, adadistill)"),
    "fused_center_update": ("runtime", "the head centers' SGD/AdamW step inside their backward (no C x D "
                                       "gradient), wherever it is exact: one process, or a sharded head"),
    "save_every": ("runtime", "steps between checkpoints (0: at the end of each epoch)"),
    "eval_every": ("runtime", "epochs between evaluations on --val (0: at the end only)"),
    "max_steps": ("runtime", "stop after this many steps (0: every epoch)"),
    "progress": ("runtime", "a progress bar on a terminal, a plain line every 30 s in a log"),
    "tensorboard": ("runtime", "TensorBoard events in --out (when tensorboard is installed)"),
}
