"""``mdk export``: a backbone to ONNX for deployment, and ONNX models back into ``mdk eval``.

The exported graph is what insightface ships and its ``onnx_helper`` checks: one input ``"data"`` of
shape ``(N, 3, 112, 112)`` with a dynamic batch axis, float32, RGB in ``[-1, 1]`` (``(x/255 - 0.5)/0.5``);
one output, the unnormalised embedding ``(N, D)``; float32 initializers. The backbone comes from an mdk
checkpoint or straight from an insightface ``model.pt``/``backbone.pth`` (with ``network``). The file is
written to a temporary name and renamed, so a failed export never replaces an earlier one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "data", "embedding"


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise RuntimeError(f"{module} is not installed: pip install 'mdkernels[export]'") from err


def backbone_for_export(src: str | Path, network: str | None = None) -> tuple[nn.Module, int]:
    """``(backbone in eval mode, input size)`` from an mdk checkpoint, an insightface backbone file
    (``network`` names it) or an arcface_torch run directory."""
    from mdkernels.interop import insightface
    from mdkernels.models.checkpoint import backbone_from_checkpoint, load_checkpoint

    src = Path(src)
    if src.is_dir():
        src = insightface.find_backbone(src)
    if not src.is_file():
        raise FileNotFoundError(f"model not found: {src}")
    if network is not None:
        return insightface.load_backbone(src, network), insightface.INPUT_SIZE
    ckpt = load_checkpoint(src)
    if not (isinstance(ckpt, dict) and "config" in ckpt and "backbone" in ckpt):
        raise ValueError(f"{src} is not an mdk checkpoint; for an insightface model.pt/backbone.pth pass --network "
                         f"(one of {insightface.INSIGHTFACE_NETWORKS})")  # fmt: skip
    return backbone_from_checkpoint(ckpt).eval(), int(ckpt["config"]["input_size"])


def export_onnx(model: nn.Module, out: str | Path, input_size: int = 112, opset: int = OPSET) -> Path:
    """Write ``model`` (eval mode, fp32, CPU) as ONNX with a dynamic batch axis; returns the path."""
    _need("onnx")
    out = Path(out)
    if out.suffix != ".onnx":
        raise ValueError(f"the export path must end in .onnx, got {out}")
    model = model.float().cpu().eval()
    dummy = torch.randn(2, 3, input_size, input_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    kw = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})  # fmt: skip
    try:
        with torch.no_grad():
            try:  # the TorchScript-based exporter: fast, no onnxscript needed
                torch.onnx.export(model, (dummy,), str(tmp), dynamo=False, **kw)
            except (TypeError, AttributeError, NotImplementedError, ImportError):  # no such exporter: dynamo
                torch.onnx.export(model, (dummy,), str(tmp), dynamo=True, external_data=False,
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                                  **{k: v for k, v in kw.items() if k != "dynamic_axes"})  # fmt: skip
        problems = check_onnx(tmp)
        if problems:
            raise RuntimeError(f"the exported model fails insightface's checks: {'; '.join(problems)}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def check_onnx(path: str | Path) -> list[str]:
    """What insightface's ONNX checker would reject: not exactly one 4-D input ``(N, 3, S, S)``, not
    exactly one output, a non-float32 initializer; [] when the model passes (and ``onnx.checker`` too)."""
    onnx = _need("onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    graph = model.graph
    init_names = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    problems = []
    if len(inputs) != 1:
        problems.append(f"{len(inputs)} inputs (need 1)")
    else:
        dims = inputs[0].type.tensor_type.shape.dim
        if len(dims) != 4:
            problems.append(f"the input is {len(dims)}-D (need N x 3 x H x W)")
        elif dims[1].dim_value != 3:
            problems.append(f"the input has {dims[1].dim_value} channels (need 3)")
        if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            problems.append("the input is not float32")
    if len(graph.output) != 1:
        problems.append(f"{len(graph.output)} outputs (need 1)")
    bad = [i.name for i in graph.initializer if i.data_type != onnx.TensorProto.FLOAT and i.dims and len(i.dims) > 1]
    if bad:
        problems.append(f"non-float32 weight initializers {bad[:3]}")
    return problems


class OnnxBackbone(nn.Module):
    """An exported model run with onnxruntime behind the backbone interface (``(B, 3, S, S) -> (B, D)``),
    so ``mdk eval`` scores the very file that is deployed."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        ort = _need("onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:
            raise ValueError(f"{path}: onnxruntime cannot load it ({type(err).__name__}: {str(err)[:200]})") from err
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ValueError(f"{path}: expected one (N, 3, S, S) input, got {[i.shape for i in inputs]}")
        self.input_name = inputs[0].name
        size = inputs[0].shape[2]
        self.input_size = int(size) if isinstance(size, int) else 112

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])
