"""The op registry: every op of mdkernels by its one name, and where each piece of it lives.

An op's name is used everywhere: the package ``mdkernels/ops/<name>/`` (when it has kernels of its
own), the tests ``python_tests/test_<name>.py``, the benchmark key ``<name>`` (CSV rows and the dispatch
table) and the ``mdkernels::<name>_*`` custom ops. ``python_tests/test_layout.py`` walks this table and
checks each piece exists. Nothing here imports an op: the table is plain data, read by
:mod:`mdkernels.backends` and :mod:`mdkernels.tools.gpu_compile`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Op:
    """One op. ``functions``: its public functions in :mod:`mdkernels.functional`. ``package``: the module
    holding its kernels and custom ops, or None when it is built on another op (``built_on``), whose
    kernels it runs. ``backends``: the fused backends with kernels for it ("reference" and "auto" exist for
    every loss). ``csrc``: its CUDA C++ sources. ``custom_ops``: its ``mdkernels::`` op names."""

    functions: tuple[str, ...]
    package: str | None
    backends: tuple[str, ...]
    csrc: tuple[str, ...] = ()
    custom_ops: tuple[str, ...] = ()
    built_on: str | None = None
    lacks: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (backend, options its kernels do not have)

    def lacking(self, backend: str) -> tuple[str, ...]:
        """The options ``backend``'s kernels do not have for this op (asking for one is an error)."""
        return dict(self.lacks).get(backend, ())


_MARGIN_CE_BACKENDS = ("triton", "cuda", "torch")
# the CUDA C++ kernels have neither the sub-center max nor CurricularFace's modulation, nor a mixed-precision
# (autocast: fp32 inputs, 16-bit operands) instantiation, nor the fused center update (mdkernels.fuse_center_update):
# Triton (and torch) have all four
_MARGIN_CE_LACKS = (("cuda", ("subcenters", "curricular_t", "autocast", "center_update")),)

OPS: dict[str, Op] = {
    "l2norm": Op(
        functions=("l2_normalize",),
        package="mdkernels.ops.l2norm",
        backends=("cuda", "torch"),
        csrc=("csrc/l2norm.cu",),
        custom_ops=("l2_normalize", "l2_normalize_backward"),
    ),
    "margin_ce": Op(
        functions=("margin_cross_entropy",),
        package="mdkernels.ops.margin_ce",
        backends=_MARGIN_CE_BACKENDS,
        csrc=("csrc/margin_ce.cu", "csrc/margin_target.cu"),
        custom_ops=("margin_ce_forward", "margin_ce_backward"),
        lacks=_MARGIN_CE_LACKS,
    ),
    "margin_distillation": Op(
        functions=("margin_distillation_loss",), package=None, backends=_MARGIN_CE_BACKENDS, built_on="margin_ce",
        lacks=_MARGIN_CE_LACKS,
    ),
    "proxyless_kd": Op(
        functions=("proxyless_kd_loss",), package=None, backends=_MARGIN_CE_BACKENDS, built_on="margin_ce",
        lacks=_MARGIN_CE_LACKS,
    ),
    "adadistill": Op(
        functions=("adadistill_loss",), package=None, backends=_MARGIN_CE_BACKENDS, built_on="margin_ce",
        lacks=_MARGIN_CE_LACKS,
    ),
    "margin_kd": Op(
        functions=("margin_kd_loss",),
        package="mdkernels.ops.margin_kd",
        backends=("triton", "torch"),
        custom_ops=("margin_kd_forward", "margin_kd_backward"),
    ),
    "angular_distill": Op(
        functions=("angular_distillation_loss",),
        package="mdkernels.ops.angular_distill",
        backends=("triton", "cuda", "torch"),
        csrc=("csrc/angular_distill.cu",),
        custom_ops=("angular_distill_forward", "angular_distill_backward"),
    ),
    "cosine_topk": Op(
        functions=("cosine_topk_search",),
        package="mdkernels.ops.cosine_topk",
        backends=("triton", "torch"),
        custom_ops=("cosine_topk",),
        lacks=(("triton", ("large_k",)),),  # k above 256: the torch backend
    ),
    "triplet_distill": Op(
        functions=("triplet_distillation_loss",), package="mdkernels.ops.triplet_distill", backends=("triton", "torch")
    ),
}


def kernel_op(name: str) -> str:
    """The op whose kernels (and measured dispatch rows) serve ``name``."""
    return OPS[name].built_on or name
