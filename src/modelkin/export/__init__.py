"""ONNX export of any supported model and an onnxruntime engine with the torch Model's surface.

export_onnx(model, outdir, dtype="float32") -> OnnxManifest      (export/onnx.py)
load(outdir, device="auto") -> OrtModel: logits / generate / score (export/ort_engine.py)
"""

from __future__ import annotations

from typing import Any

__all__ = ["OnnxManifest", "OrtModel", "export_onnx", "load"]


def __getattr__(name: str) -> Any:
    # lazy: importing modelkin.export must not import torch.onnx or onnxruntime
    if name == "export_onnx":
        from modelkin.export.onnx import export_onnx

        return export_onnx
    if name == "OnnxManifest":
        from modelkin.export.manifest import OnnxManifest

        return OnnxManifest
    if name in ("load", "OrtModel"):
        from modelkin.export import ort_engine

        return getattr(ort_engine, name)
    raise AttributeError(f"module 'modelkin.export' has no attribute {name!r}")
