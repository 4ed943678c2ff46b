"""Every mdkernels loss in plain eager PyTorch: the oracle for tests and the baseline for benchmarks.

Readable first, fast never: these functions materialise the full ``B x C`` cosine matrix (and ``B^3``
triplet tensors) on purpose. :mod:`.core` holds docs/math.md §1-6 (the margin CE and the distillation
losses), :mod:`.family` section 7 (AdaFace, CurricularFace, MagFace, ElasticFace, sub-center ArcFace),
:mod:`.adadistill` AdaDistill, :mod:`.search` the exact cosine top-k; each transcribes its official code's
behaviour. The oracle imports nothing of the fused paths.
"""

from mdkernels.reference.adadistill import *  # noqa: F403
from mdkernels.reference.adadistill import __all__ as _adadistill
from mdkernels.reference.core import *  # noqa: F403
from mdkernels.reference.core import __all__ as _core
from mdkernels.reference.family import *  # noqa: F403
from mdkernels.reference.family import __all__ as _family
from mdkernels.reference.search import *  # noqa: F403
from mdkernels.reference.search import __all__ as _search

__all__ = [*_core, *_family, *_adadistill, *_search]
