"""Build a model on the meta device and fill it from a TensorSource, one tensor at a time."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from modelkin.checkpoint.lazy import LazyTensor, StateDict, narrowed
from modelkin.checkpoint.limits import check_config_sizes
from modelkin.errors import ConfigError

LARGE_CHECKPOINT_BYTES = 1 << 30  # show a progress bar above this (on a terminal)


def lazy_state(source: Any) -> StateDict:
    """Every tensor of a TensorSource as a LazyTensor under its canonical HF name."""
    state: StateDict = {}
    for name in source.keys():
        info = source.info(name)
        state[name] = LazyTensor(
            tuple(info.shape), _reader(source, name), (name,), int(info.nbytes), _slicer(source, name)
        )
    return state


def _reader(source: Any, name: str) -> Callable[[], torch.Tensor]:
    return lambda: source.get_tensor(name)


def _slicer(source: Any, name: str) -> Callable[[int, int, int], LazyTensor]:
    info = source.info(name)

    def slicer(dim: int, start: int, stop: int) -> LazyTensor:
        shape = narrowed(tuple(info.shape), dim, start, stop)
        nbytes = int(info.nbytes) * (stop - start) // max(info.shape[dim], 1)
        return LazyTensor(shape, lambda: source.get_slice(name, dim, start, stop), (name,), nbytes)

    return slicer


def check_state(model: nn.Module, state: StateDict, *, where: str) -> None:
    """Raise one sorted, readable ConfigError if ``state`` does not fit ``model``'s parameters.

    Raises:
        ConfigError: naming missing and unexpected tensors and every shape mismatch
            (expected from config.json, found in the checkpoint).
    """
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = [
        f"{name} expected shape {list(param.shape)} (config.json), found {list(state[name].shape)}"
        for name, param in sorted(expected.items())
        if name in state and tuple(param.shape) != tuple(state[name].shape)
    ]
    if missing:
        problems.append(f"missing tensors: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_some(unexpected)}")
    if problems:
        raise ConfigError(
            f"checkpoint {where} disagrees with its config: " + "; ".join(problems),
            hint="use the config.json that belongs to these weights",
        )


def _some(names: list[str], limit: int = 6) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_weights(
    model: nn.Module,
    state: StateDict,
    *,
    device: torch.device,
    dtype: torch.dtype,
    where: str,
    progress: bool | None = None,
) -> None:
    """Assign every parameter of a meta-device ``model`` from ``state``, cast on ``device``.

    Tied embeddings: when ``model.args.tie_word_embeddings``, a stored ``lm_head.weight`` is
    ignored and ``lm_head`` shares ``model.embed_tokens.weight`` after loading.
    """
    tied = model.args.tie_word_embeddings
    if tied:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    check_state(model, state, where=where)
    names = [name for name, _ in model.named_parameters()]
    for name in _progress(names, state, progress):
        tensor = state[name].load().to(device).to(dtype)
        module_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=False))
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():  # non-persistent buffers (rotary tables) keep their fp32 dtype
        for key, buf in module.named_buffers(recurse=False):
            module.register_buffer(key, buf.to(device), persistent=False)
    model.eval()


def _progress(names: list[str], state: StateDict, show: bool | None) -> Iterator[str]:
    total = sum(state[n].nbytes for n in names)
    if show is None:
        show = sys.stderr.isatty() and total >= LARGE_CHECKPOINT_BYTES
    if not show:
        yield from names
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn())
    with Progress(*columns, TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("loading weights", total=total)
        for name in names:
            yield name
            bar.advance(task, state[name].nbytes)


def build_model(arch: Any, config: dict[str, Any], *, source_format: str, has_lm_head: bool) -> nn.Module:
    """The architecture's Model built on the meta device (no memory, no random init).

    A GGUF without ``output.weight`` ties lm_head to the embeddings whatever the config says.
    """
    args = arch.ModelArgs.from_hf_config(config)
    if source_format == "gguf" and not has_lm_head and not args.tie_word_embeddings:
        args = dataclasses.replace(args, tie_word_embeddings=True)
    with torch.device("meta"):
        return arch.Model(args)


def load_model(
    source: Any, *, device: torch.device, dtype: torch.dtype, progress: bool | None = None
) -> nn.Module:
    """Build the model a TensorSource's config describes and fill it with the source's tensors.

    Raises:
        UnsupportedArchitectureError: the config names an architecture modelkin lacks.
        ConfigError: the config is incomplete or disagrees with the tensors.
    """
    from modelkin.runtime.models import get_architecture

    config = source.config()
    arch = get_architecture(config)
    infos = [source.info(name) for name in source.keys()]  # sizes bound the config before building
    check_config_sizes(
        config, num_tensors=len(infos), total_numel=sum(i.numel for i in infos), where=str(source.path)
    )
    model = build_model(arch, config, source_format=source.format, has_lm_head="lm_head.weight" in source)
    state = arch.remap_weights(lazy_state(source))
    load_weights(model, state, device=device, dtype=dtype, where=str(source.path), progress=progress)
    return model
