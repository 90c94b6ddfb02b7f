"""ONNX translations the TorchScript exporter lacks for ops the runtime uses, registered only while
export traces (``translations(opset)``): ``aten::rms_norm`` (runtime/layers.py RMSNorm's fused
fp32 path) becomes x / sqrt(mean(x²) + eps) · weight."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def _rms_norm(g: Any, x: Any, normalized_shape: Any, weight: Any, eps: Any) -> Any:
    from torch.onnx import symbolic_helper

    # only the count of normalised dims matters (traced sizes arrive as a list of values)
    if symbolic_helper._is_packed_list(normalized_shape):
        num_dims = len(symbolic_helper._unpack_list(normalized_shape))
    else:
        num_dims = len(symbolic_helper._get_const(normalized_shape, "is", "normalized_shape"))
    axes = list(range(-num_dims, 0))
    if symbolic_helper._is_none(eps):
        eps_value = torch.finfo(torch.float32).eps
    else:
        eps_value = symbolic_helper._get_const(eps, "f", "eps")
    # Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul: the pattern onnxruntime fuses into one
    # SimplifiedLayerNormalization kernel
    two = g.op("CastLike", g.op("Constant", value_t=torch.tensor(2.0)), x)
    square = g.op("Pow", x, two)
    if g.opset >= 18:  # axes moved from an attribute to an input
        axes_t = g.op("Constant", value_t=torch.tensor(axes, dtype=torch.int64))
        mean = g.op("ReduceMean", square, axes_t, keepdims_i=1)
    else:
        mean = g.op("ReduceMean", square, axes_i=axes, keepdims_i=1)
    eps_t = g.op("CastLike", g.op("Constant", value_t=torch.tensor(eps_value)), x)
    out = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, eps_t)))
    return out if symbolic_helper._is_none(weight) else g.op("Mul", out, weight)


_TRANSLATIONS = {"aten::rms_norm": _rms_norm}


@contextlib.contextmanager
def translations(opset: int) -> Iterator[None]:
    """Register the translations for ``opset`` while the block runs, then remove them."""
    for name, fn in _TRANSLATIONS.items():
        torch.onnx.register_custom_op_symbolic(name, fn, opset)
    try:
        yield
    finally:
        for name in _TRANSLATIONS:
            torch.onnx.unregister_custom_op_symbolic(name, opset)
