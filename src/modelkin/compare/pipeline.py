"""`compare(a, b)`: weight fingerprints and behaviour of two models, one verdict, one report."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from modelkin.compare.outputs import ModelOutputs, OutputCache, collect_outputs, model_identity
from modelkin.compare.prompts import Prompt, builtin_prompts, load_prompts, select_prompts
from modelkin.compare.report import ComparisonReport, progress
from modelkin.compare.settings import BehaviourSettings
from modelkin.errors import InputError, ModelkinError

PromptsArg = str | os.PathLike[str] | Sequence[str | Prompt] | None


def resolve_prompts(prompts: PromptsArg, limit: int | None) -> list[Prompt]:
    """The prompts to run: the built-in set (None), a JSONL file path, or a list of texts/Prompts."""
    if prompts is None:
        chosen = builtin_prompts()
    elif isinstance(prompts, (str, os.PathLike)):
        chosen = load_prompts(prompts)
    else:
        items = list(prompts)
        if not items:
            raise InputError("the prompt set is empty", hint="pass at least one prompt")
        chosen = []
        for i, p in enumerate(items):
            if isinstance(p, Prompt):
                chosen.append(p)
            elif isinstance(p, str) and p.strip():
                chosen.append(Prompt(id=f"p{i:02d}", category="user", prompt=p))
            else:
                raise InputError(f"prompt {i} is empty or not a string", hint="pass non-empty strings")
        ids = [p.id for p in chosen]
        if len(set(ids)) != len(ids):
            raise InputError("prompt ids repeat in the prompt list", hint="give every prompt a unique id")
    return select_prompts(chosen, limit)


def _name(path: str | os.PathLike[str]) -> str:
    p = Path(path)
    return p.name or str(p)


def _model_info(path: str | os.PathLike[str], outputs: ModelOutputs | None) -> dict[str, Any]:
    info: dict[str, Any] = {"name": _name(path), "path": str(path)}
    if outputs is not None:
        info.update(model_type=outputs.model_type, is_moe=outputs.is_moe, logits_size=outputs.logits_size,
                    timings=outputs.timings)
    return info


def _cached_outputs(path: Any, prompts: list[Prompt], settings: BehaviourSettings, *, seed: int,
                    device: str, dtype: str, allow_fallback: bool | None, cache: OutputCache | None,
                    tick: Callable[[str], None]) -> ModelOutputs:
    digest = hashlib.sha256("\x00".join(p.prompt for p in prompts).encode()).hexdigest()
    key = (model_identity(path), settings.collect_key(), digest, seed, device, dtype)
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        return hit
    out = collect_outputs(path, prompts, settings, device=device, dtype=dtype, allow_fallback=allow_fallback,
                          seed=seed, tick=lambda m: tick(f"{_name(path)}: {m}"))
    if cache is not None:
        cache.put(key, out)
    return out


def _fingerprint(a: Any, b: Any, methods: Sequence[str] | None, device: str, allow_fallback: bool | None,
                 seed: int, options: Mapping[str, Mapping[str, Any]] | None,
                 tick: Callable[[str], None]) -> tuple[dict | None, str | None]:
    try:
        from modelkin.compare.api import fingerprint
    except ImportError as err:
        return None, f"the fingerprint methods are not available in this build ({err})"
    try:
        report = fingerprint(a, b, methods=list(methods) if methods else None, device=device, seed=seed,
                             allow_fallback=allow_fallback, options=options,
                             progress=lambda name: tick(f"weight fingerprint: {name}"))
    except ModelkinError as err:
        return None, str(err)
    return report.to_json(), None


def compare(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    prompts: PromptsArg = None,
    device: str = "auto",
    *,
    dtype: str = "auto",
    methods: Sequence[str] | None = None,
    settings: BehaviourSettings | None = None,
    fingerprints: bool = True,
    fingerprint_options: Mapping[str, Mapping[str, Any]] | None = None,
    behaviour: bool = True,
    allow_fallback: bool | None = None,
    cache: OutputCache | None = None,
    show_progress: bool | None = None,
) -> ComparisonReport:
    """Compare two models' weights and behaviour on one device and return the report.

    The models are loaded one after the other (never both at once); each one's outputs on the prompts
    are kept compactly on the CPU, and ``cache`` lets repeated comparisons against the same model
    reuse them.

    Args:
        a, b: checkpoints ``modelkin.load`` understands (HF directory, .gguf, ...).
        prompts: None for the built-in set, a JSONL path, or a list of prompt strings / Prompts.
        device: "auto", "cpu", "cuda[:i]" or "npu[:i]"; used for fingerprints and behaviour.
        methods: fingerprint methods (None: the fingerprint command's default set).
        settings: behaviour budget and metrics (BehaviourSettings()).
        fingerprints / behaviour: run either half.
        fingerprint_options: per-method options for ``fingerprint`` (e.g. fewer permutations).

    Raises:
        InputError: bad prompts or settings, or a named same-tokenizer metric with differing vocabularies.
        ModelkinError: a model cannot be loaded or run.

    Example:
        >>> report = modelkin.compare("a.gguf", "b_dir", device="cpu")
        >>> report.verdict, report.behaviour["top1_agreement"]
    """
    from modelkin.compare.behaviour import compare_outputs
    from modelkin.compare.verdict import RULES, decide

    settings = settings or BehaviourSettings()
    if not fingerprints and not behaviour:
        raise InputError("nothing to compare: both fingerprints and behaviour are off",
                         hint="enable at least one of them")
    chosen = resolve_prompts(prompts, settings.max_prompts) if behaviour else []
    timings: dict[str, float] = {}
    start = time.perf_counter()
    fp, fp_error, beh, out_a, out_b = None, None, None, None, None
    with progress(show_progress) as tick:
        if fingerprints:
            tick("weight fingerprints")
            t = time.perf_counter()
            fp, fp_error = _fingerprint(a, b, methods, device, allow_fallback, settings.seed,
                                        fingerprint_options, tick)
            timings["fingerprint_s"] = time.perf_counter() - t
        else:
            fp_error = "not requested"
        if behaviour:
            t = time.perf_counter()
            common = {"device": device, "dtype": dtype, "allow_fallback": allow_fallback, "cache": cache,
                      "tick": tick}
            out_a = _cached_outputs(a, chosen, settings, seed=settings.seed, **common)
            out_b = _cached_outputs(b, chosen, settings, seed=settings.seed + 1, **common)
            tick("comparing outputs")
            beh = compare_outputs(out_a, out_b, chosen, settings)
            timings["behaviour_s"] = time.perf_counter() - t
    verdict = decide(fp, beh, fingerprint_error=fp_error if fingerprints else None)
    timings["total_s"] = time.perf_counter() - start
    return ComparisonReport(
        verdict=verdict.verdict, reasons=verdict.reasons, evidence=verdict.evidence, fingerprint=fp,
        fingerprint_error=fp_error, behaviour=beh, models={"a": _model_info(a, out_a), "b": _model_info(b, out_b)},
        device=_device_name(device, allow_fallback), dtype=dtype, settings=settings.to_json(), timings=timings,
        rules=list(RULES),
    )


def _device_name(device: str, allow_fallback: bool | None) -> str:
    from modelkin.backends import get_backend

    try:
        return str(get_backend(device, allow_fallback=allow_fallback).device)
    except ModelkinError:
        return device
