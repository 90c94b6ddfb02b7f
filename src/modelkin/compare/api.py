"""The one way through a comparison: ``fingerprint(a, b)`` -> FingerprintReport, and ``compare(a, b)``:
fingerprints + behaviour -> verdict -> ComparisonReport (which the JSON, terminal and HTML views read).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from modelkin.backends import get_backend
from modelkin.checkpoint import TensorSource
from modelkin.compare.behaviour.metrics import compare_outputs
from modelkin.compare.behaviour.outputs import ModelOutputs, OutputCache, collect_outputs, model_identity
from modelkin.compare.behaviour.prompts import Prompt, PromptsArg, resolve_prompts
from modelkin.compare.behaviour.result import BehaviourResult
from modelkin.compare.fingerprints import method_module, resolve_methods
from modelkin.compare.fingerprints.background import METHODS as BACKGROUND_METHODS
from modelkin.compare.fingerprints.background import resolve as resolve_background
from modelkin.compare.fingerprints.result import FingerprintReport, MethodResult, NotApplicable
from modelkin.compare.fingerprints.weights import open_weights
from modelkin.compare.report.document import ComparisonReport
from modelkin.compare.report.terminal import progress
from modelkin.compare.settings import BehaviourSettings
from modelkin.compare.verdict import RULES, decide
from modelkin.errors import InputError, ModelkinError

__all__ = ["ComparisonReport", "FingerprintReport", "OutputCache", "compare", "fingerprint", "resolve_prompts"]

def fingerprint(a: str | Path | TensorSource, b: str | Path | TensorSource, methods: str | list[str] | None = None,
                device: Any = "auto", *, seed: int = 0, allow_fallback: bool | None = None,
                null_library: str | Path | None = None, options: Mapping[str, Mapping[str, Any]] | None = None,
                progress: Callable[[str], None] | None = None, background: Any = None) -> FingerprintReport:
    """Weight fingerprints of two checkpoints, each method with a score, a p-value and a call.

    Args:
        a, b: checkpoint paths (HF dir, .safetensors, .gguf, .bin, .onnx) or open TensorSources.
        methods: names or a comma-separated string out of std_curve, pcs, invariants, spectral,
            permtest, upcycle; None runs all. Methods that do not fit the pair are reported as skipped.
        device: "auto", "cpu", "cuda[:i]", "npu[:i]" or a Backend; tensors are computed there.
        seed: seeds every random null (surrogates, permutations), so reports are reproducible.
        null_library: std-curve library (file or directory of JSON) of unrelated models for a z-score.
        options: per-method keyword options, e.g. {"permtest": {"n_permutations": 499}}.
        progress: called with each method's name before it runs.
        background: directory of real unrelated models (``modelkin background add``) whose pair scores
            form the empirical null of std_curve and spectral; None: the shipped one; False: none.

    Returns:
        FingerprintReport: ``report.methods[name]`` (MethodResult), ``report.verdict``, ``to_json()``.

    Raises:
        InputError: unknown method names. CheckpointError: unreadable checkpoints. DeviceError: no device.

    Example:
        >>> report = fingerprint("base_model_dir", "suspect.gguf", methods="std_curve,permtest")
        >>> report["std_curve"].details["mean_r"], report["permtest"].p_value
    """
    names = resolve_methods(methods)
    backend = get_backend(device, allow_fallback=allow_fallback)
    options = {k: dict(v) for k, v in (options or {}).items()}
    if null_library is not None:
        options.setdefault("std_curve", {}).setdefault("null_library", null_library)
    bg = resolve_background(background)
    for name in (n for n in BACKGROUND_METHODS if bg is not None and n in names):
        options.setdefault(name, {}).setdefault("background", bg)
    results: dict[str, MethodResult] = {}
    with open_weights(a, backend.device) as wa, open_weights(b, backend.device) as wb:
        for name in names:
            if progress is not None:
                progress(name)
            module = method_module(name)
            start = time.perf_counter()
            try:
                result = module.run(wa, wb, seed=seed, **options.get(name, {}))
            except NotApplicable as why:
                result = MethodResult.skip(name, str(why), module.NULL)
            except torch.linalg.LinAlgError as err:  # an SVD or solve over NaN/Inf weights
                reason = f"not computable: {str(err).splitlines()[0]}"
                result = MethodResult.skip(name, reason, module.NULL)
            backend.synchronize()
            if result.skipped is not None:
                result.null_kind = module.NULL_KIND  # the modules set it on their results; skips get it here
            result.seconds = time.perf_counter() - start
            results[name] = result
        labels = (str(a if not isinstance(a, TensorSource) else a.path),
                  str(b if not isinstance(b, TensorSource) else b.path))
    return FingerprintReport(a=labels[0], b=labels[1], device=str(backend.device), seed=seed,
                             methods=results).finish()


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
                 tick: Callable[[str], None], background: Any = None) -> tuple[FingerprintReport | None, str | None]:
    try:
        report = fingerprint(a, b, methods=list(methods) if methods else None, device=device, seed=seed,
                             allow_fallback=allow_fallback, options=options, background=background,
                             progress=lambda name: tick(f"weight fingerprint: {name}"))
    except ModelkinError as err:
        return None, str(err)
    return report, None


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
    background: Any = None,
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
        background: as for ``fingerprint`` (None: the shipped background; False: none).

    Raises:
        InputError: bad prompts or settings, or a named same-tokenizer metric with differing vocabularies.
        ModelkinError: a model cannot be loaded or run.

    Example:
        >>> report = modelkin.compare("a.gguf", "b_dir", device="cpu")
        >>> report.verdict, report.behaviour["top1_agreement"]
    """
    settings = settings or BehaviourSettings()
    if not fingerprints and not behaviour:
        raise InputError("nothing to compare: both fingerprints and behaviour are off",
                         hint="enable at least one of them")
    chosen = resolve_prompts(prompts, settings.max_prompts) if behaviour else []
    timings: dict[str, float] = {}
    start = time.perf_counter()
    fp: FingerprintReport | None = None
    beh: BehaviourResult | None = None
    fp_error, out_a, out_b = None, None, None
    with progress(show_progress) as tick:
        if fingerprints:
            tick("weight fingerprints")
            t = time.perf_counter()
            fp, fp_error = _fingerprint(a, b, methods, device, allow_fallback, settings.seed,
                                        fingerprint_options, tick, background)
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
    try:
        return str(get_backend(device, allow_fallback=allow_fallback).device)
    except ModelkinError:
        return device
