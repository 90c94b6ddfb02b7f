"""Build a model on the meta device and fill it from a TensorSource, one tensor at a time."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from modelkin.checkpoint.limits import check_config_sizes
from modelkin.errors import ConfigError

LARGE_CHECKPOINT_BYTES = 1 << 30  # show a progress bar above this (on a terminal)


@dataclasses.dataclass(frozen=True, slots=True)
class LazyTensor:
    """A tensor not read yet: its shape, how to read it, and the checkpoint names it comes from."""

    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    sources: tuple[str, ...]
    nbytes: int = 0
    # (dim, start, stop) -> a LazyTensor that reads only that slice; None: read whole, then narrow
    slicer: Callable[[int, int, int], LazyTensor] | None = None

    def narrow(self, dim: int, start: int, stop: int) -> LazyTensor:
        """Elements ``start:stop`` along ``dim`` (tensor-/expert-parallel shards), still unread.

        Reads only the slice where the source can (safetensors, and stacks/cats of such tensors);
        otherwise the whole tensor is read and then narrowed.
        """
        dim %= len(self.shape)
        if start == 0 and stop == self.shape[dim]:
            return self
        if self.slicer is not None:
            return self.slicer(dim, start, stop)
        shape = _narrowed(self.shape, dim, start, stop)

        def load() -> torch.Tensor:  # clone: a view would keep the whole tensor alive in the parameter
            return self.load().narrow(dim, start, stop - start).clone()

        return LazyTensor(shape, load, self.sources, self.nbytes)


StateDict = dict[str, LazyTensor]


def _narrowed(shape: tuple[int, ...], dim: int, start: int, stop: int) -> tuple[int, ...]:
    return (*shape[:dim], stop - start, *shape[dim + 1 :])


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
        shape = _narrowed(tuple(info.shape), dim, start, stop)
        nbytes = int(info.nbytes) * (stop - start) // max(info.shape[dim], 1)
        return LazyTensor(shape, lambda: source.get_slice(name, dim, start, stop), (name,), nbytes)

    return slicer


def stack(parts: list[LazyTensor], dim: int = 0) -> LazyTensor:
    """One LazyTensor stacking ``parts`` along ``dim`` (for MoE expert weights), read when loaded.

    Narrowing it along ``dim`` keeps only the parts in range (expert parallelism reads only its
    experts); along another dimension it narrows every part.
    """
    shape = list(parts[0].shape)
    shape.insert(dim, len(parts))

    def slicer(d: int, start: int, stop: int) -> LazyTensor:
        if d == dim:
            return stack(parts[start:stop], dim)
        return stack([p.narrow(d if d < dim else d - 1, start, stop) for p in parts], dim)

    return LazyTensor(
        tuple(shape),
        lambda: torch.stack([p.load() for p in parts], dim=dim),
        tuple(s for p in parts for s in p.sources),
        sum(p.nbytes for p in parts),
        slicer,
    )


def cat(parts: list[LazyTensor], dim: int = 0) -> LazyTensor:
    """One LazyTensor concatenating ``parts`` along ``dim`` (e.g. an expert's gate and up rows).

    Narrowing it along ``dim`` reads only the parts (and rows of parts) in range.
    """
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)

    def slicer(d: int, start: int, stop: int) -> LazyTensor:
        if d != dim:
            return cat([p.narrow(d, start, stop) for p in parts], dim)
        picked, offset = [], 0
        for p in parts:
            size = p.shape[dim]
            lo, hi = max(start - offset, 0), min(stop - offset, size)
            if lo < hi:
                picked.append(p.narrow(dim, lo, hi))
            offset += size
        return picked[0] if len(picked) == 1 else cat(picked, dim)

    return LazyTensor(
        tuple(shape),
        lambda: torch.cat([p.load() for p in parts], dim=dim),
        tuple(s for p in parts for s in p.sources),
        sum(p.nbytes for p in parts),
        slicer,
    )


def drop_rotary_buffers(state: StateDict) -> StateDict:
    """Remove stored ``rotary_emb.inv_freq`` buffers: the model recomputes them from the config."""
    return {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}


def check_qk_norms(state: StateDict, family: str) -> None:
    """Raise a one-line ConfigError when a layer has q_proj but no q_norm/k_norm weight."""
    for name in state:
        if name.endswith("self_attn.q_proj.weight"):
            for norm in ("q_norm", "k_norm"):
                needed = name.replace("q_proj.weight", f"{norm}.weight")
                if needed not in state:
                    raise ConfigError(f"{family} checkpoint lacks the per-head {norm} tensor {needed}",
                                      hint=f"{family} needs self_attn.q_norm and k_norm in every layer")


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
