"""Training data: generated identities, image folders, insightface RecordIO, augmentation.

The generator draws each identity as a parametric face-like pattern: face oval, skin and hair tones,
eyes, brows, nose and mouth geometry, and an identity texture. It renders samples under pose-like
affine warps, lighting changes and noise. It writes an image-folder tree or a RecordIO pair, plus a
verification ``.bin`` of pairs from held-out identities, so the loaders are exercised on real files.

Augmentation is random flip + random crop (pad 2, crop back). Its randomness is drawn from
``(seed, epoch, index)`` alone, so a sample looks the same whatever the worker count, and a resumed
run sees exactly the images an uninterrupted run would have seen.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mdkernels.data import recordio

IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ----------------------------------------------------------------------------------------------------
# generated identities
# ----------------------------------------------------------------------------------------------------
def identity_params(rng: np.random.Generator) -> dict:
    return {
        "skin": rng.uniform(0.35, 0.95, 3), "hair": rng.uniform(0.0, 0.6, 3), "bg": rng.uniform(0.0, 1.0, 3),
        "face_w": rng.uniform(0.55, 0.75), "face_h": rng.uniform(0.7, 0.9), "hair_line": rng.uniform(-0.75, -0.35),
        "eye_x": rng.uniform(0.22, 0.38), "eye_y": rng.uniform(-0.25, -0.05), "eye_r": rng.uniform(0.06, 0.12),
        "eye_c": rng.uniform(0.0, 0.5, 3), "brow": rng.uniform(-0.25, 0.25), "nose": rng.uniform(0.1, 0.35),
        "mouth_y": rng.uniform(0.35, 0.55), "mouth_w": rng.uniform(0.15, 0.35), "mouth_c": rng.uniform(-0.15, 0.15),
        "tex_f": rng.uniform(2.0, 7.0, (3, 2)), "tex_p": rng.uniform(0, 2 * np.pi, 3), "tex_a": rng.uniform(0.03, 0.1),
    }  # fmt: skip


def render(p: dict, size: int, rng: np.random.Generator, variation: float = 1.0) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 sample of identity ``p`` under a random pose, lighting and noise."""
    v = variation
    ang = rng.normal(0, 0.12 * v)
    scale = 1 + rng.normal(0, 0.06 * v)
    tx, ty = rng.normal(0, 0.05 * v, 2)
    lin = np.linspace(-1, 1, size)
    X, Y = np.meshgrid(lin, lin)
    c, s = np.cos(ang), np.sin(ang)  # inverse warp: sample the identity at rotated/scaled coordinates
    x = (c * (X - tx) + s * (Y - ty)) / scale
    y = (-s * (X - tx) + c * (Y - ty)) / scale
    img = np.broadcast_to(p["bg"], (size, size, 3)).copy()
    face = (x / p["face_w"]) ** 2 + (y / p["face_h"]) ** 2 <= 1
    tex = p["tex_a"] * sum(np.sin(p["tex_f"][k, 0] * x + p["tex_f"][k, 1] * y + p["tex_p"][k]) for k in range(3))
    img[face] = np.clip(p["skin"] + tex[face, None], 0, 1)
    img[face & (y < p["hair_line"])] = p["hair"]
    for side in (-1, 1):
        eye = (x - side * p["eye_x"]) ** 2 + (y - p["eye_y"]) ** 2 <= p["eye_r"] ** 2
        img[eye] = p["eye_c"]
        brow_y = p["eye_y"] - 2 * p["eye_r"] + side * p["brow"] * (x - side * p["eye_x"])
        brow = (np.abs(x - side * p["eye_x"]) < 1.6 * p["eye_r"]) & (np.abs(y - brow_y) < 0.035)
        img[brow] = p["hair"]
    nose = (np.abs(x) < 0.04) & (y > p["eye_y"]) & (y < p["eye_y"] + p["nose"])
    img[nose] = p["skin"] * 0.7
    mouth_curve = p["mouth_y"] + p["mouth_c"] * (1 - (x / max(p["mouth_w"], 1e-3)) ** 2)
    mouth = (np.abs(x) < p["mouth_w"]) & (np.abs(y - mouth_curve) < 0.04)
    img[mouth] = (0.6, 0.15, 0.2)
    gain = 1 + rng.normal(0, 0.15 * v)  # lighting: brightness, contrast and a directional gradient
    grad = rng.normal(0, 0.15 * v, 2)
    img = img * gain * (1 + grad[0] * X[..., None] + grad[1] * Y[..., None]) + rng.normal(0, 0.03 * v)
    img = img + rng.normal(0, 0.04 * v, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def encode_png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def generate_dataset(
    out: str | Path,
    *,
    identities: int = 200,
    per_identity: int = 20,
    heldout_identities: int = 60,
    pairs: int = 600,
    size: int = 32,
    fmt: str = "rec",
    seed: int = 0,
) -> dict:
    """Writes the training set (``fmt="rec"``: ``train.rec``/``train.idx``; ``"folder"``: ``train/<id>/k.png``)
    and ``val.bin`` (``pairs`` verification pairs of held-out identities, half of them matching).
    Returns the paths and counts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_ids = [identity_params(rng) for _ in range(identities)]
    held = [identity_params(rng) for _ in range(heldout_identities)]
    if fmt == "rec":
        n = identities * per_identity
        with recordio.RecordWriter(out / "train.rec", out / "train.idx") as w:
            w.write(0, recordio.pack((n + 1, n + 1 + identities), b""))
            for k, p in enumerate(train_ids):
                for j in range(per_identity):
                    w.write(1 + k * per_identity + j, recordio.pack(float(k), encode_png(render(p, size, rng))))
            for k in range(identities):
                start = 1 + k * per_identity
                w.write(n + 1 + k, recordio.pack((start, start + per_identity), b""))
        train = out / "train.rec"
    elif fmt == "folder":
        for k, p in enumerate(train_ids):
            d = out / "train" / f"{k:05d}"
            d.mkdir(parents=True, exist_ok=True)
            for j in range(per_identity):
                (d / f"{j:03d}.png").write_bytes(encode_png(render(p, size, rng)))
        train = out / "train"
    else:
        raise ValueError(f"fmt must be 'rec' or 'folder', got {fmt!r}")
    bins, issame = [], []
    for i in range(pairs):
        a = int(rng.integers(len(held)))
        same = i % 2 == 0
        b = a if same else int((a + rng.integers(1, len(held))) % len(held))
        bins += [encode_png(render(held[a], size, rng)), encode_png(render(held[b], size, rng))]
        issame.append(same)
    with open(out / "val.bin", "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)
    return {"train": str(train), "val": str(out / "val.bin"), "num_classes": identities,
            "images": identities * per_identity, "pairs": pairs, "size": size}  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# decoding and augmentation
# ----------------------------------------------------------------------------------------------------
def decode_image(data: bytes, size: int | None = None, source: str = "") -> torch.Tensor:
    """Encoded image -> float tensor (3, H, W) in [-1, 1] (insightface's normalisation)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot decode image {source}: {err}") from err
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return arr.div_(127.5).sub_(1.0)


def augment(img: torch.Tensor, seed: int, epoch: int, index: int, pad: int = 2) -> torch.Tensor:
    """Random horizontal flip and random crop (zero pad ``pad``, crop back), drawn from (seed, epoch, index)."""
    g = np.random.default_rng([seed, epoch, index])
    if g.random() < 0.5:
        img = img.flip(-1)
    if pad:
        h, w = img.shape[-2:]
        dy, dx = g.integers(0, 2 * pad + 1, 2)
        img = torch.nn.functional.pad(img, (pad, pad, pad, pad))[..., dy : dy + h, dx : dx + w]
    return img


class FaceDataset(Dataset):
    """Base: items are ``(image (3, S, S), label, index)``; ``set_epoch`` changes the augmentation."""

    crop_pad = 2  # random-crop padding of the training augmentation (0: flip only, as arcface_torch)

    def __init__(self, size: int | None, train: bool, seed: int) -> None:
        self.size, self.train, self.seed, self.epoch = size, train, seed, 0
        self.labels: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1 if self.labels else 0

    def _bytes(self, index: int) -> tuple[bytes, str]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        data, source = self._bytes(index)
        img = decode_image(data, self.size, source)
        if self.train:
            img = augment(img, self.seed, self.epoch, index, pad=self.crop_pad)
        return img, self.labels[index], index


class ImageFolderDataset(FaceDataset):
    """``root/<identity>/<image>``: one folder per identity, labels in sorted folder order.

    An empty identity folder raises; unreadable images are skipped with one warning and counted in
    ``skipped`` (``verify=True`` decodes every file once at start).
    """

    def __init__(self, root: str | Path, size: int | None = None, train: bool = True, seed: int = 0,
                 verify: bool = True) -> None:  # fmt: skip
        super().__init__(size, train, seed)
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        folders = sorted(d for d in root.iterdir() if d.is_dir())
        if not folders:
            raise ValueError(f"{root} has no identity folders (expected root/<identity>/<image>)")
        self.paths: list[Path] = []
        self.skipped: list[str] = []
        for label, d in enumerate(folders):
            files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMG_EXT)
            if not files:
                raise ValueError(f"identity folder {d} has no images ({', '.join(IMG_EXT)})")
            for f in files:
                if verify and not _readable(f):
                    self.skipped.append(str(f))
                    continue
                self.paths.append(f)
                self.labels.append(label)
        if self.skipped:
            warnings.warn(f"skipped {len(self.skipped)} unreadable image(s) under {root}, e.g. {self.skipped[0]}",
                          stacklevel=2)  # fmt: skip

    def _bytes(self, index):
        return self.paths[index].read_bytes(), str(self.paths[index])


def _readable(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False


class RecordDataset(FaceDataset):
    """insightface ``train.rec`` + ``train.idx`` (the ``.idx`` beside the ``.rec`` by default)."""

    def __init__(self, rec: str | Path, idx: str | Path | None = None, size: int | None = None, train: bool = True,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__(size, train, seed)
        rec = Path(rec)
        self.reader = recordio.RecordReader(rec, idx if idx is not None else rec.with_suffix(".idx"))
        header = self.reader.read_label(0) if 0 in self.reader.offsets else 0.0
        if isinstance(header, tuple):  # insightface header: images are keys 1 .. first_identity_record - 1
            self.keys = list(range(1, int(header[0])))
        else:
            self.keys = sorted(self.reader.keys)
        for k in self.keys:  # headers only: MS1M's 5.8M images are not read at start-up
            label = self.reader.read_label(k)
            self.labels.append(int(label[0] if isinstance(label, tuple) else label))
        if not self.keys:
            raise ValueError(f"{rec} holds no image records")

    def _bytes(self, index):
        _, payload = recordio.unpack(self.reader.read(self.keys[index]))
        return payload, f"{self.reader.rec_path}#{self.keys[index]}"


def open_dataset(path: str | Path, crop_pad: int = 2, **kw) -> FaceDataset:
    """A ``.rec`` file or an image-folder root; ``crop_pad`` as :attr:`FaceDataset.crop_pad`."""
    path = Path(path)
    ds = RecordDataset(path, **kw) if path.suffix == ".rec" else ImageFolderDataset(path, **kw)
    ds.crop_pad = int(crop_pad)
    return ds


class ResumableSampler(torch.utils.data.Sampler):
    """A seeded shuffle per epoch (the same on every rank), split over ranks, able to start mid-epoch."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, batch_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world, self.batch = n, seed, rank, world, batch_size
        self.epoch, self.skip_batches = 0, 0
        per_rank = n // world
        self.per_rank = per_rank - per_rank % batch_size  # whole batches only, equal on every rank

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def batches_per_epoch(self) -> int:
        return self.per_rank // self.batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)[: self.per_rank * self.world]
        mine = order[self.rank :: self.world]
        return iter(mine[self.skip_batches * self.batch :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.skip_batches * self.batch
