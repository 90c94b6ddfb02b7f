"""Load this rank's shard of a model: build on the meta device, split it (parallel_layers), then
read only this rank's part of every tensor from the checkpoint."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from modelkin.runtime.parallel import DistContext, Layout


def build_sharded(
    source: Any, layout: Layout, *, ctx: DistContext | None = None
) -> tuple[Any, nn.Module, dict]:
    """(architecture module, this rank's meta model, shard plan) for a TensorSource.

    Without ``ctx`` the model has no collectives: good for planning memory, not for running.
    """
    from modelkin.checkpoint.limits import check_config_sizes
    from modelkin.runtime.loader import build_model
    from modelkin.runtime.models import get_architecture
    from modelkin.runtime.parallel_layers import parallelize

    config = source.config()
    arch = get_architecture(config)
    infos = [source.info(name) for name in source]  # sizes bound the config before building
    check_config_sizes(
        config, num_tensors=len(infos), total_numel=sum(i.numel for i in infos), where=str(source.path)
    )
    model = build_model(arch, config, source_format=source.format, has_lm_head="lm_head.weight" in source)
    reduce_tp = ctx.reduce_tp() if ctx is not None else None
    reduce_world = ctx.reduce_world() if ctx is not None else None
    plan = parallelize(model, layout, reduce_tp=reduce_tp, reduce_world=reduce_world)
    return arch, model, plan


def load_shard(
    source: Any, ctx: DistContext, *, dtype: torch.dtype, progress: bool | None = None
) -> nn.Module:
    """This rank's module, its parameters read as slices of the checkpoint's tensors.

    Safetensors checkpoints are read slice by slice (each rank reads about 1/tp of attention and
    MLP, and only its experts); GGUF and .bin tensors are read whole and then cut (their bytes are
    counted whole in ``source.bytes_read``).
    """
    from modelkin.runtime.loader import lazy_state, load_weights
    from modelkin.runtime.parallel_layers import shard_state

    arch, model, plan = build_sharded(source, ctx.layout, ctx=ctx)
    state = shard_state(arch.remap_weights(lazy_state(source)), plan)
    show = progress if ctx.is_main else False
    load_weights(model, state, device=ctx.backend.device, dtype=dtype, where=str(source.path), progress=show)
    return model


def load_parallel(
    path: str | os.PathLike[str],
    ctx: DistContext,
    dtype: str | torch.dtype = "auto",
    *,
    progress: bool | None = None,
) -> Any:
    """``modelkin.load`` for one rank of a tensor/expert-parallel run (call it on every rank).

    Every rank returns a Model whose logits, generation and routing telemetry equal the
    single-process ones (within float rounding): outputs are replicated after each all-reduce.
    Call its methods on every rank with the same arguments; when sampling (temperature > 0), pass
    the same ``seed`` everywhere so that every rank draws the same tokens.

    Raises:
        CheckpointError, ConfigError, UnsupportedArchitectureError, DeviceError, InputError.
    """
    from modelkin.checkpoint import open_checkpoint
    from modelkin.runtime.api import Model
    from modelkin.tokenizer import load_tokenizer

    torch_dtype = ctx.backend.resolve_dtype(dtype)
    with open_checkpoint(path) as source:
        module = load_shard(source, ctx, dtype=torch_dtype, progress=progress)
        tokenizer = load_tokenizer(source, path)
        generation_config = source.config().get("_generation_config")
    return Model(
        module,
        tokenizer=tokenizer,
        backend=ctx.backend,
        dtype=torch_dtype,
        path=str(path),
        generation_config=generation_config,
    )
