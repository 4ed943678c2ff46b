"""Five-point face alignment to the 112 x 112 ArcFace template, as insightface's IJB evaluation does it.

insightface (``recognition/arcface_torch/eval_ijbc.py``) estimates a similarity transform from the five landmarks
to the template with scikit-image's ``SimilarityTransform.estimate`` (Umeyama's least squares, with scale) and warps
with ``cv2.warpAffine`` (bilinear, constant border 0) to 112 x 112. Here:

- :func:`estimate_similarity` is Umeyama's method written afresh. Like scikit-image it computes in the dtype of the
  landmarks it is given (insightface passes float32), so the transform is the one insightface gets.
- :func:`warp_affine` calls ``cv2.warpAffine`` when OpenCV is installed (``pip install "mdkernels[eval]"``): then
  the pixels are those insightface feeds its model, bit for bit. Without OpenCV it runs the same geometry and
  bilinear rule in numpy, in float32 as OpenCV 5 does; the deviation is named and measured in the README (a few
  pixel values in 10,000 differ by one grey level).
"""

from __future__ import annotations

import numpy as np

#: insightface's ArcFace template: five points (eyes, nose, mouth corners) in a 112 x 112 crop. The published
#: points are for a 96 x 112 crop; insightface shifts x by 8 for the square crop, as here.
ARCFACE_TEMPLATE = np.array(
    [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]],
    dtype=np.float32)  # fmt: skip
ARCFACE_TEMPLATE[:, 0] += np.float32(8.0)  # in float32, as insightface adds it
IMAGE_SIZE = 112


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """(5, 2) from five landmarks, or from 68 (eye centres, nose tip, mouth corners), as insightface reduces them."""
    lm = np.asarray(landmarks, dtype=np.float32)
    if lm.shape == (68, 2):
        return np.stack([(lm[36] + lm[39]) / 2, (lm[42] + lm[45]) / 2, lm[30], lm[48], lm[54]])
    if lm.shape != (5, 2):
        raise ValueError(f"landmarks must be (5, 2) or (68, 2), got {lm.shape}")
    return lm


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3 x 3 similarity (rotation, uniform scale, translation) taking ``src`` points to ``dst`` in least
    squares (Umeyama 1991, eqs. 38-43), in the points' own dtype; NaN when the points are degenerate."""
    src, dst = np.asarray(src), np.asarray(dst)
    n, dim = src.shape
    mu_src, mu_dst = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - mu_src, dst - mu_dst
    cov = b.T @ a / n
    signs = np.ones(dim, dtype=np.float64)
    if np.linalg.det(cov) < 0:
        signs[-1] = -1.0
    u, sv, vt = np.linalg.svd(cov)
    out = np.eye(dim + 1, dtype=np.float64)
    rank = int(np.count_nonzero(sv > sv.max() * max(cov.shape) * np.finfo(float).eps))
    if rank == 0:
        return out * np.nan
    if rank == dim - 1 and np.linalg.det(u) * np.linalg.det(vt) <= 0:
        flip = signs.copy()
        flip[-1] = -1.0
        out[:dim, :dim] = u @ np.diag(flip) @ vt
    elif rank == dim - 1:
        out[:dim, :dim] = u @ vt
    else:
        out[:dim, :dim] = u @ np.diag(signs) @ vt
    var = a.var(axis=0).sum()
    scale = (np.ones((), var.dtype) / var) * (sv @ signs)  # the reciprocal in the points' dtype, as skimage on numpy 2
    out[:dim, dim] = mu_dst - scale * (out[:dim, :dim] @ mu_src)
    out[:dim, :dim] *= scale
    return out


def have_cv2() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def _invert_affine(m: np.ndarray) -> np.ndarray:
    """The destination-to-source map of a 2 x 3 affine, as OpenCV inverts it (in float64)."""
    m = np.asarray(m, dtype=np.float64)
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    inv_det = 1.0 / det if det != 0 else 0.0
    a00, a11 = m[1, 1] * inv_det, m[0, 0] * inv_det
    a01, a10 = -m[0, 1] * inv_det, -m[1, 0] * inv_det
    return np.array([[a00, a01, -a00 * m[0, 2] - a01 * m[1, 2]], [a10, a11, -a10 * m[0, 2] - a11 * m[1, 2]]])


def _fma32(a, b, c):
    """float32 a*b+c with one rounding (the product of two float32 values is exact in float64)."""
    return (a.astype(np.float64) * b + c).astype(np.float32)


def warp_affine_numpy(img: np.ndarray, matrix: np.ndarray, size: int | tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """``cv2.warpAffine(img, matrix, (width, height), borderValue=0)`` for uint8 images in numpy (``size``: an
    int for a square, or ``(width, height)``): each output pixel maps back through the inverted affine (float32,
    fused multiply-adds), bilinear between the four neighbours (one outside the image counts as 0), rounded half to
    even."""
    out_w, out_h = (size, size) if isinstance(size, int) else size
    h, w = img.shape[:2]
    inv = _invert_affine(matrix).astype(np.float32)
    xs = np.arange(out_w, dtype=np.float32)[None, :].repeat(out_h, 0)
    ys = np.arange(out_h, dtype=np.float32)[:, None]
    sx = _fma32(xs, inv[0, 0], _fma32(ys, inv[0, 1], inv[0, 2]))
    sy = _fma32(xs, inv[1, 0], _fma32(ys, inv[1, 1], inv[1, 2]))
    x0, y0 = np.floor(sx), np.floor(sy)
    ax, ay = (sx - x0)[..., None], (sy - y0)[..., None]
    xi, yi = x0.astype(np.int64), y0.astype(np.int64)
    src = img.reshape(h, w, -1).astype(np.float32)

    def pixel(dx, dy):
        xx, yy = xi + dx, yi + dy
        inside = ((xx >= 0) & (xx < w) & (yy >= 0) & (yy < h))[..., None]
        return np.where(inside, src[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], np.float32(0))

    p00, p01, p10, p11 = pixel(0, 0), pixel(1, 0), pixel(0, 1), pixel(1, 1)
    top = _fma32(ax, p01 - p00, p00)
    bottom = _fma32(ax, p11 - p10, p10)
    out = np.clip(np.rint(_fma32(ay, bottom - top, top)), 0, 255).astype(np.uint8)
    return out.reshape((out_h, out_w) + img.shape[2:])


def warp_affine(img: np.ndarray, matrix: np.ndarray, size: int = IMAGE_SIZE, backend: str = "auto") -> np.ndarray:
    """Warp a uint8 image with a 2 x 3 affine into ``size x size``: ``cv2.warpAffine`` (``backend="cv2"``, the
    default where OpenCV is installed) or :func:`warp_affine_numpy` (``"numpy"``)."""
    if backend not in ("auto", "cv2", "numpy"):
        raise ValueError(f"warp backend must be 'auto', 'cv2' or 'numpy', got {backend!r}")
    if backend == "cv2" or (backend == "auto" and have_cv2()):
        import cv2

        return cv2.warpAffine(img, np.asarray(matrix, dtype=np.float64), (size, size), borderValue=0.0)
    return warp_affine_numpy(img, matrix, size)


def align_face(img: np.ndarray, landmarks: np.ndarray, size: int = IMAGE_SIZE, backend: str = "auto") -> np.ndarray:
    """The ``size x size`` aligned crop of a uint8 ``(H, W, 3)`` image given its five (or 68) landmarks."""
    template = ARCFACE_TEMPLATE if size == IMAGE_SIZE else ARCFACE_TEMPLATE * np.float32(size / IMAGE_SIZE)
    tform = estimate_similarity(five_points(landmarks), template)
    if not np.isfinite(tform).all():
        raise ValueError("the landmarks are degenerate (all points coincide): no similarity transform")
    return warp_affine(img, tform[:2], size, backend)
