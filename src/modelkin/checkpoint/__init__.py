"""Lazy, format-neutral checkpoint reading: safetensors, GGUF, PyTorch state dicts and ONNX.

Every format yields canonical HF tensor names through one TensorSource surface.
"""

from __future__ import annotations

from modelkin.checkpoint.detect import open_checkpoint
from modelkin.checkpoint.hf_config import load_hf_config
from modelkin.checkpoint.source import TensorInfo, TensorSource

__all__ = ["TensorInfo", "TensorSource", "load_hf_config", "open_checkpoint"]
