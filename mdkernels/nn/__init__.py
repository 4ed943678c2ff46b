"""Drop-in ``torch.nn`` modules of mdkernels."""

from mdkernels.nn.heads import (
    ArcFace,
    ArcFaceLoss,
    CombinedMargin,
    CosFace,
    CosFaceLoss,
    PartialFCHead,
    SphereFace,
)

__all__ = ["ArcFace", "ArcFaceLoss", "CombinedMargin", "CosFace", "CosFaceLoss", "PartialFCHead", "SphereFace"]
