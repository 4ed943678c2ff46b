"""Drop-in ``torch.nn`` modules of mdkernels."""

from mdkernels.nn.distill import (
    AdaDistill,
    AngularDistillation,
    MarginDistillation,
    MarginKD,
    ProxylessKD,
    TripletDistillation,
)
from mdkernels.nn.heads import (
    ArcFace,
    ArcFaceLoss,
    CombinedMargin,
    CosFace,
    CosFaceLoss,
    PartialFCHead,
    SphereFace,
)
from mdkernels.nn.margins import AdaFace, CurricularFace, ElasticArcFace, ElasticCosFace, MagFace, SubCenterArcFace

__all__ = [
    "AdaDistill",
    "AngularDistillation",
    "MarginDistillation",
    "MarginKD",
    "ProxylessKD",
    "TripletDistillation",
    "ArcFace",
    "ArcFaceLoss",
    "CombinedMargin",
    "CosFace",
    "CosFaceLoss",
    "PartialFCHead",
    "SphereFace",
    "AdaFace",
    "CurricularFace",
    "ElasticArcFace",
    "ElasticCosFace",
    "MagFace",
    "SubCenterArcFace",
]
