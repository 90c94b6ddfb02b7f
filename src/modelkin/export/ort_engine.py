"""The onnxruntime engine: an exported directory run through the torch engine's own generate,
score and logits code (runtime/api.py Model, runtime/generate.py loop, runtime/sampling.py).

``OrtDecoder`` gives the exported decode graph the forward signature of a runtime Model, so the
shared loop drives it unchanged: the loop's KVCache keeps positions and the padding mask, the
graph's present tensors feed the next step's past directly (no copy back and forth).
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelkin.errors import CheckpointError, DeviceError, InputError
from modelkin.export.graph import INPUT_NAMES, past_names, present_names
from modelkin.export.manifest import OnnxManifest
from modelkin.export.providers import CPU, resolve_providers
from modelkin.runtime.api import Model
from modelkin.runtime.kv_cache import KVCache, positions_from_mask

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _numpy_dtype(name: str) -> Any:
    if name == "bfloat16":  # numpy has none; onnxruntime reads ml_dtypes' (a dependency of onnx)
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _to_numpy(tensor: torch.Tensor, dtype: Any) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.uint16).numpy().view(dtype)
    return np.ascontiguousarray(tensor.numpy())


class _EmptyWeight(nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)


class _Placement(nn.Module):
    """Where the shared loop puts ids and the KV cache: it reads ``model.embed_tokens.weight``'s
    dtype and device, so this holds an empty tensor of the graph's KV dtype on the CPU, where
    onnxruntime returns its outputs."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = _EmptyWeight(dtype)


class OrtDecoder(nn.Module):
    """The decode graph (past length 0 for prefill) as ``forward(input_ids_BL, *, positions_BL,
    mask_BLS, cache, last_only) -> logits``, the runtime Model's signature.

    Attributes: ``args`` (ModelArgs from config.json), ``sliding_window``, ``session``.
    """

    def __init__(self, session: Any, manifest: OnnxManifest, args: Any):
        super().__init__()
        self.session = session
        self.args = args
        self.sliding_window = manifest.sliding_window
        self.kv_dtype = _TORCH_DTYPES[manifest.kv_dtype]
        self.model = _Placement(self.kv_dtype)
        self._np_kv = _numpy_dtype(manifest.kv_dtype)
        self._kv_shape = (manifest.num_kv_heads, manifest.head_dim)
        self._past = past_names(manifest.num_layers)
        self._outputs = ["logits", *present_names(manifest.num_layers)]
        self._presents: weakref.WeakKeyDictionary[KVCache, tuple[int, list[np.ndarray]]] = (
            weakref.WeakKeyDictionary()
        )

    def run(
        self,
        input_ids_BL: torch.Tensor,
        attention_mask_BS: torch.Tensor,
        positions_BL: torch.Tensor,
        past: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call: (logits [B, L, V] float32, presents key/value per layer, interleaved)."""
        batch = input_ids_BL.shape[0]
        if past is None:
            empty = np.zeros((batch, self._kv_shape[0], 0, self._kv_shape[1]), dtype=self._np_kv)
            past = [empty] * len(self._past)
        feeds = dict(zip(INPUT_NAMES, (input_ids_BL, attention_mask_BS, positions_BL)))
        feeds = {k: np.ascontiguousarray(v.cpu().long().numpy()) for k, v in feeds.items()}
        feeds.update(zip(self._past, past))
        logits, *present = self.session.run(self._outputs, feeds)
        return logits, present

    def forward(
        self,
        input_ids_BL: torch.Tensor,
        *,
        positions_BL: torch.Tensor,
        mask_BLS: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Run L new tokens against ``cache`` (the loop's KVCache, already reserved for them)."""
        if cache is None:
            raise TypeError("OrtDecoder runs with a KVCache; OrtModel.logits covers the cache-free call")
        start, num_new = cache.length, input_ids_BL.shape[1]
        logits, present = self.run(
            input_ids_BL, cache.valid_BS[:, : start + num_new], positions_BL, self._past_of(cache, start)
        )
        for i in range(self.args.num_hidden_layers):
            k, v = present[2 * i], present[2 * i + 1]
            cache.update(i, _to_torch(k[:, :, start:]), _to_torch(v[:, :, start:]))
        cache.advance(num_new)
        self._presents[cache] = (start + num_new, present)
        out = _to_torch(logits)
        return out[:, -1:] if last_only else out

    def _past_of(self, cache: KVCache, length: int) -> list[np.ndarray] | None:
        if length == 0:
            return None
        kept = self._presents.get(cache)
        if kept is not None and kept[0] == length:
            return kept[1]
        return [  # a cache filled elsewhere: copy its slots out
            _to_numpy(t[:, :, :length], self._np_kv) for pair in zip(cache.keys, cache.values) for t in pair
        ]


class OrtModel(Model):
    """An exported model on onnxruntime with the torch Model's surface: ``logits``, ``generate``,
    ``generate_batch``, ``stream``, ``score``, ``encode_prompt``, ``tokenizer``, ``config``.

    ``backend`` is the ProviderChoice (``device`` is a string such as "cpu" or "cuda:0").
    Extra attributes: ``manifest`` (OnnxManifest), ``providers`` (the session's providers).
    """

    def __init__(self, decoder: OrtDecoder, *, manifest: OnnxManifest, **kwargs: Any):
        super().__init__(decoder, **kwargs)
        self.manifest = manifest
        self.providers: list[str] = list(decoder.session.get_providers())

    def __repr__(self) -> str:
        return f"<modelkin.OrtModel {self.config.model_type} {self.path} on {self.providers[0]} {self.dtype}>"

    def logits(self, input_ids: torch.Tensor | Any) -> torch.Tensor:
        """Float32 logits [B, T, V] (CPU) for every position; ragged lists are right-padded."""
        ids_BT, mask_BT = self._batch(input_ids)
        logits, _ = self.module.run(ids_BT, mask_BT, positions_from_mask(mask_BT))
        return _to_torch(logits).float()


def load(
    path: str | os.PathLike[str],
    device: str | Any = "auto",
    dtype: str | torch.dtype = "auto",
    allow_fallback: bool | None = None,
    *,
    threads: int | None = None,
) -> OrtModel:
    """Load a directory written by ``modelkin export-onnx`` (or its model.onnx) into onnxruntime.

    Args:
        path: the export directory, or a graph file inside it.
        device: "auto", "cpu", "cuda[:i]", "npu[:i]" (CANN) or a Backend; picks the provider.
        dtype: "auto", or the dtype the model was exported in (graphs have a fixed dtype).
        allow_fallback: run on the CPU provider, with a warning, if the wanted one is missing.
        threads: intra-op threads (default: torch.get_num_threads(), as the torch engine uses).

    Raises:
        CheckpointError: not an export, or a graph onnxruntime cannot load.
        DeviceError: the provider is missing (names the package), or bfloat16 on the CPU provider.
        InputError: a dtype other than the exported one.
    """
    from modelkin.checkpoint.hf_config import load_hf_config
    from modelkin.export.assets import load_export_tokenizer
    from modelkin.runtime.models import get_architecture

    outdir = Path(path)
    outdir = outdir.parent if outdir.is_file() else outdir
    manifest = OnnxManifest.load(outdir)
    _check_dtype(dtype, manifest, outdir)
    choice = resolve_providers(device, allow_fallback=allow_fallback)
    if manifest.dtype == "bfloat16" and choice.providers[0] == CPU:
        raise DeviceError(
            f"{outdir} holds bfloat16 graphs, which onnxruntime's CPUExecutionProvider cannot run "
            "(it has no bfloat16 kernels)",
            hint="run them with --device cuda (onnxruntime-gpu), or re-export with --dtype float16 or float32",
        )
    config = load_hf_config(outdir)
    args = get_architecture(config).ModelArgs.from_hf_config(config)
    session = _session(outdir / manifest.decode, choice.providers, choice.options, threads)
    return OrtModel(
        OrtDecoder(session, manifest, args),
        manifest=manifest,
        tokenizer=load_export_tokenizer(outdir, config),
        backend=choice,
        dtype=_TORCH_DTYPES[manifest.dtype],
        path=str(outdir),
        generation_config=config.get("_generation_config"),
    )


def _check_dtype(dtype: str | torch.dtype, manifest: OnnxManifest, outdir: Path) -> None:
    if isinstance(dtype, str) and dtype.lower() == "auto":
        return
    from modelkin.export.onnx import export_dtype

    if export_dtype(dtype) != _TORCH_DTYPES[manifest.dtype]:
        raise InputError(
            f"{outdir} was exported in {manifest.dtype}; its graphs cannot run in {dtype}",
            hint=f"use --dtype auto, or re-export with `modelkin export-onnx MODEL OUTDIR --dtype {dtype}`",
        )


def _session(graph: Path, providers: list[str], options: list[dict], threads: int | None) -> Any:
    import onnxruntime

    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.log_severity_level = 3  # errors only: the CPU EP's "some nodes on CPU" notices are noise
    try:
        return onnxruntime.InferenceSession(
            str(graph), sess_options=so, providers=providers, provider_options=options
        )
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        raise CheckpointError(
            f"onnxruntime cannot load {graph} ({type(err).__name__}: {str(err).splitlines()[0]})",
            hint="re-export the model with `modelkin export-onnx`",
        ) from None
