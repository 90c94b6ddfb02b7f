"""One rank's model: built on the meta device and split for its place in the layout (`build`), then
filled with only its part of every checkpoint tensor (`read_weights`). One process is the 1 × 1 layout."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from modelkin.runtime.parallel.layers import ShardFn, parallelize, shard_state
from modelkin.runtime.parallel.layout import Layout


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    """This rank's module on the meta device and how to cut its weights from the checkpoint.

    Attributes:
        arch: the architecture module (ModelArgs, Model, remap_weights).
        module: the model, on the meta device, already split for `layout`.
        cuts: parameter name -> the function cutting this rank's part of the full checkpoint
            tensor (absent names are read whole; empty for one process).
        layout: where this rank sits.
    """

    arch: Any
    module: nn.Module
    cuts: dict[str, ShardFn]
    layout: Layout


def build(source: Any, layout: Layout | None = None, *, ctx: Any = None) -> Shard:
    """This rank's model for an open TensorSource, built on the meta device (no tensor data read).

    ``ctx`` (a DistContext, or anything with ``layout``, ``reduce_tp()`` and ``reduce_world()``)
    gives the split blocks their collectives; without it the model is good for planning memory,
    not for running on more than one rank. ``layout`` defaults to ``ctx.layout``, else one process.

    Raises:
        UnsupportedArchitectureError, ConfigError: the config names an unknown architecture, is
            incomplete, or does not fit the layout.
    """
    from modelkin.checkpoint.limits import check_config_sizes
    from modelkin.runtime.loader import build_model
    from modelkin.runtime.models import get_architecture

    layout = layout or (ctx.layout if ctx is not None else Layout())
    config = source.config()
    arch = get_architecture(config)
    infos = [source.info(name) for name in source]  # sizes bound the config before building
    check_config_sizes(
        config, num_tensors=len(infos), total_numel=sum(i.numel for i in infos), where=str(source.path)
    )
    model = build_model(arch, config, source_format=source.format, has_lm_head="lm_head.weight" in source)
    reduce_tp = ctx.reduce_tp() if ctx is not None else None
    reduce_world = ctx.reduce_world() if ctx is not None else None
    cuts = parallelize(model, layout, reduce_tp=reduce_tp, reduce_world=reduce_world)
    return Shard(arch, model, cuts, layout)


def read_weights(
    source: Any, shard: Shard, *, device: torch.device, dtype: torch.dtype, progress: bool | None = None
) -> nn.Module:
    """Fill ``shard.module`` with its part of the checkpoint's tensors on ``device``; returns it.

    Safetensors checkpoints are read slice by slice (each rank reads about 1/tp of attention and
    MLP, and only its experts); GGUF and .bin tensors are read whole and then cut (their bytes are
    counted whole in ``source.bytes_read``).
    """
    from modelkin.runtime.loader import lazy_state, load_weights

    state = shard_state(shard.arch.remap_weights(lazy_state(source)), shard.cuts)
    where = str(source.path)
    load_weights(shard.module, state, device=device, dtype=dtype, where=where, progress=progress)
    return shard.module
