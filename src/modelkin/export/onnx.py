"""Export any supported checkpoint to ONNX: a prefill graph (model.onnx) and a decode graph
(decode.onnx) with explicit KV-cache tensors, sharing one external-data file, plus config,
tokenizer and manifest.json. Written into a temporary directory, renamed into place at the end.

The graph is traced once with the TorchScript exporter (dynamo=False): on this model family it is
several times faster than the torch.export-based exporter (whose symbolic-shape work grows with
depth) and needs no model changes beyond runtime/layers.py's traced attention path. MoE layers
trace through moe.py's gather dispatch (static shapes), so every router policy exports as it runs.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from modelkin.errors import InputError
from modelkin.export.graph import INPUT_NAMES, DecoderWithPast, past_names, present_names, sample_inputs
from modelkin.export.manifest import MANIFEST, OnnxManifest

DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 15, 20  # SDPA needs 14, CastLike (symbolics.py) 15; the exporter tops at 20
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export_dtype(name: str | torch.dtype) -> torch.dtype:
    """float32 / float16 / bfloat16 (and the aliases fp32, fp16, bf16, auto = float32).

    Raises:
        InputError: another dtype.
    """
    from modelkin.backends.cpu import CPUBackend

    dtype = CPUBackend().resolve_dtype(name)
    if dtype not in DTYPES.values():
        raise InputError(f"cannot export in {dtype}", hint="use --dtype float32, float16 or bfloat16")
    return dtype


def export_onnx(
    model: str | os.PathLike[str],
    outdir: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "float32",
    opset: int = DEFAULT_OPSET,
) -> OnnxManifest:
    """Export ``model`` (anything ``modelkin.load`` reads) to ``outdir``.

    Writes model.onnx (prefill: input_ids, attention_mask, position_ids), decode.onnx (the same
    plus past_key_values.N.key/value), model.onnx.data (weights, under their HF names),
    config.json, tokenizer files and manifest.json. Batch, sequence and past lengths are dynamic.

    Raises:
        InputError: bad dtype or opset, or ``outdir`` holds something other than an export.
        CheckpointError, ConfigError, UnsupportedArchitectureError: the checkpoint cannot be loaded.

    Example:
        >>> modelkin.export.export_onnx("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-onnx")
    """
    from modelkin.checkpoint import open_checkpoint
    from modelkin.export.assets import write_assets
    from modelkin.runtime.loader import load_model
    from modelkin.utils import atomic_path

    torch_dtype = export_dtype(dtype)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"opset {opset} is not supported", hint=f"use {MIN_OPSET}..{MAX_OPSET}")
    outdir = Path(outdir)
    _check_outdir(outdir)
    if torch_dtype == torch.bfloat16:
        warnings.warn(
            "bfloat16 graphs run on onnxruntime's CUDA provider, not its CPU provider (no bfloat16 "
            "kernels there); export float16 or float32 for CPU",
            stacklevel=2,
        )
    dtype_name = str(torch_dtype).removeprefix("torch.")
    with open_checkpoint(model) as source:
        lm = load_model(source, device=torch.device("cpu"), dtype=torch_dtype)
        with atomic_path(outdir) as tmp:
            tmp.mkdir(parents=True)
            tokenizer = write_assets(source, Path(model), tmp, args=lm.args, dtype=dtype_name)
            io, ir_version = _write_graphs(lm, tmp, opset=opset, dtype=torch_dtype)
            manifest = _manifest(
                lm,
                io=io,
                ir_version=ir_version,
                opset=opset,
                dtype=dtype_name,
                source_name=Path(model).name,
                tokenizer=tokenizer,
            )
            manifest.save(tmp)
    return manifest


def _check_outdir(outdir: Path) -> None:
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"{outdir} exists and is not a directory", hint="choose another OUTDIR")
    if outdir.is_dir() and any(outdir.iterdir()) and not (outdir / MANIFEST).is_file():
        raise InputError(
            f"{outdir} is not empty and holds no earlier export",
            hint="choose a new OUTDIR (an earlier export there would be replaced)",
        )


def _write_graphs(
    lm: torch.nn.Module, outdir: Path, *, opset: int, dtype: torch.dtype
) -> tuple[dict[str, Any], int]:
    """Trace, name, externalise and save both graphs; returns (their io tables, IR version)."""
    import onnx

    from modelkin.export import onnx_files

    args = lm.args
    work = outdir / ".trace"
    decode = trace(lm, work, opset=opset, dtype=dtype)
    onnx_files.canonical_names(decode, "lm.")
    decode.graph.name = "decode"
    onnx_files.externalize(decode, outdir / "model.onnx.data", base_dir=work)
    shutil.rmtree(work)
    prefill = onnx_files.derive_prefill(
        decode,
        past_inputs=past_names(args.num_hidden_layers),
        kv_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
    )
    for proto, name in ((prefill, "model.onnx"), (decode, "decode.onnx")):
        onnx.save(proto, str(outdir / name))
        onnx.checker.check_model(str(outdir / name))
    io = {"prefill": onnx_files.io_table(prefill), "decode": onnx_files.io_table(decode)}
    return io, int(decode.ir_version)


def trace(lm: torch.nn.Module, workdir: Path, *, opset: int, dtype: torch.dtype):
    """Trace ``lm`` behind explicit KV tensors into ``workdir/decode.onnx``; returns the proto
    (initialiser names still carry the wrapper's ``lm.`` prefix)."""
    import onnx

    from modelkin.export import symbolics

    num_layers = lm.args.num_hidden_layers
    dynamic = {name: {0: "batch", 1: "seq"} for name in ("input_ids", "position_ids", "logits")}
    dynamic["attention_mask"] = {0: "batch", 1: "total"}
    dynamic.update({name: {0: "batch", 2: "past"} for name in past_names(num_layers)})
    dynamic.update({name: {0: "batch", 2: "total"} for name in present_names(num_layers)})
    workdir.mkdir(parents=True)
    path = workdir / "decode.onnx"
    with warnings.catch_warnings(), torch.no_grad(), symbolics.translations(opset):
        # tracing notes (sizes read as constants, Python branches) and the exporter's deprecation
        # notice are about code paths this module chose on purpose
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            DecoderWithPast(lm).eval(),
            sample_inputs(lm, dtype=dtype),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[*INPUT_NAMES, *past_names(num_layers)],
            output_names=["logits", *present_names(num_layers)],
            dynamic_axes=dynamic,
            do_constant_folding=False,  # keep weights as stored ([out, in], HF names), not transposed
        )
    return onnx.load(str(path), load_external_data=False)


def _manifest(
    lm: torch.nn.Module,
    *,
    io: dict[str, Any],
    ir_version: int,
    opset: int,
    dtype: str,
    source_name: str,
    tokenizer: str | None,
) -> OnnxManifest:
    from modelkin import __version__

    args = lm.args
    return OnnxManifest(
        model_type=args.model_type,
        architecture=type(args).__module__.rpartition(".")[2],
        source=source_name,
        dtype=dtype,
        kv_dtype=dtype,
        logits_dtype="float32",
        opset=opset,
        ir_version=ir_version,
        exporter=f"torch.onnx (TorchScript) {torch.__version__}",
        num_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_kv_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        hidden_size=args.hidden_size,
        vocab_size=args.vocab_size,
        sliding_window=lm.sliding_window,
        tokenizer=tokenizer,
        io=io,
        modelkin_version=__version__,
    )
