"""The one way through a comparison: ``fingerprint(a, b)`` -> FingerprintReport, and ``compare(a, b)``:
fingerprints + behaviour -> verdict -> ComparisonReport (which the JSON, terminal and HTML views read).
"""

from __future__ import annotations

import dataclasses
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
from modelkin.compare.fingerprints.weights import ModelWeights, open_weights
from modelkin.compare.report.document import ComparisonReport
from modelkin.compare.report.terminal import progress
from modelkin.compare.settings import BehaviourSettings
from modelkin.compare.verdict import RULES, decide
from modelkin.errors import InputError, ModelkinError
from modelkin.utils import trim_heap

__all__ = ["ComparisonReport", "FingerprintReport", "OutputCache", "compare", "fingerprint", "resolve_prompts"]


def fingerprint(a: str | Path | TensorSource | ModelWeights, b: str | Path | TensorSource | ModelWeights,
                methods: str | list[str] | None = None, device: Any = "auto", *, seed: int = 0,
                allow_fallback: bool | None = None, null_library: str | Path | None = None,
                options: Mapping[str, Mapping[str, Any]] | None = None,
                progress: Callable[[str], None] | None = None, background: Any = None,
                on_result: Callable[[MethodResult], None] | None = None) -> FingerprintReport:
    """Weight fingerprints of two checkpoints, each method with a score, a p-value and a call.

    Each tensor is read once for all methods (a per-model memo, see ModelWeights). Pass an open
    ModelWeights for a model compared several times to read it once in all (its memo is kept; it must
    sit on the backend's device). ``report.io`` and each result's ``details["io"]`` give the counters
    (ModelWeights.stats: bytes and tensors read, memo hits) in all and per method.

    Args:
        a, b: checkpoint paths (HF dir, .safetensors, .gguf, .bin, .onnx), open TensorSources, or open
            ModelWeights (``modelkin.compare.fingerprints.weights.open_weights``).
        methods: names or a comma-separated string out of std_curve, pcs, invariants, spectral,
            permtest, upcycle; None runs all. Methods that do not fit the pair are reported as skipped.
        device: "auto", "cpu", "cuda[:i]", "npu[:i]" or a Backend; tensors are computed there.
        seed: seeds every random null (surrogates, permutations), so reports are reproducible.
        null_library: std-curve library (file or directory of JSON) of unrelated models for a z-score.
        options: per-method keyword options, e.g. {"permtest": {"n_permutations": 499}}.
        progress: called with each method's name before it runs.
        background: directory of real unrelated models (``modelkin background add``) whose pair scores
            form the empirical null of std_curve and spectral; None: the shipped one; False: none.
        on_result: called with each MethodResult when its method has finished.

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
        start_io = {"a": wa.stats, "b": wb.stats}
        for name in names:
            if progress is not None:
                progress(name)
            module = method_module(name)
            before = (wa.stats, wb.stats)
            start = time.perf_counter()
            try:
                result = module.run(wa, wb, seed=seed, **options.get(name, {}))
            except NotApplicable as why:
                result = MethodResult.skip(name, str(why), module.NULL)
            except torch.linalg.LinAlgError as err:  # an SVD or solve over NaN/Inf weights
                reason = f"not computable: {str(err).splitlines()[0]}"
                result = MethodResult.skip(name, reason, module.NULL)
            backend.synchronize()
            trim_heap()  # the method's temporaries are freed: give their pages back
            if result.skipped is not None:
                result.null_kind = module.NULL_KIND  # the modules set it on their results; skips get it here
            result.seconds = time.perf_counter() - start
            result.details["io"] = {"a": _delta(wa.stats, before[0]), "b": _delta(wb.stats, before[1])}
            results[name] = result
            if on_result is not None:
                on_result(result)
        io = {"a": _delta(wa.stats, start_io["a"]), "b": _delta(wb.stats, start_io["b"])}
        labels = (_label(a), _label(b))
    return FingerprintReport(a=labels[0], b=labels[1], device=str(backend.device), seed=seed,
                             methods=results, io=io).finish()


_COUNTERS = ("tensors_read", "rows_read", "bytes_read", "memo_hits", "memo_misses", "memo_evictions")


def _delta(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """Counters accrued since ``before`` (memo_bytes and memo_budget as they are now)."""
    out = {k: now[k] - before[k] for k in _COUNTERS}
    out.update({k: now[k] for k in ("memo_bytes", "memo_budget", "memo_mapped_bytes", "memo_mapped_budget")})
    return out


def _label(model: Any) -> str:
    if isinstance(model, ModelWeights):
        return str(model.source.path)
    return str(model.path if isinstance(model, TensorSource) else model)


def _name(path: str | os.PathLike[str]) -> str:
    p = Path(path)
    return p.name or str(p)


def _model_info(path: str | os.PathLike[str], outputs: ModelOutputs | None) -> dict[str, Any]:
    info: dict[str, Any] = {"name": _name(path), "path": str(path)}
    if outputs is not None:
        info.update(model_type=outputs.model_type, is_moe=outputs.is_moe, logits_size=outputs.logits_size,
                    timings=outputs.timings, sample_dtype=outputs.sample_dtype)
    return info


def _cached_outputs(path: Any, prompts: list[Prompt], settings: BehaviourSettings, *, seed: int,
                    device: str, dtype: str, allow_fallback: bool | None, cache: OutputCache | None,
                    tick: Callable[[str], None]) -> tuple[ModelOutputs, bool]:
    """The model's outputs and whether they were computed here (False: served from ``cache``)."""
    digest = hashlib.sha256("\x00".join(p.prompt for p in prompts).encode()).hexdigest()
    key = (model_identity(path), settings.collect_key(), digest, seed, device, dtype)
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        return hit, False
    out = collect_outputs(path, prompts, settings, device=device, dtype=dtype, allow_fallback=allow_fallback,
                          seed=seed, tick=lambda m: tick(f"{_name(path)}: {m}"))
    trim_heap()  # the model is gone (collect_outputs collected its cycles)
    if cache is not None:
        cache.put(key, out)
    return out, True


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
    _check_halves(fingerprints, behaviour)
    chosen = resolve_prompts(prompts, settings.max_prompts) if behaviour else []
    run = PairRun(chosen=chosen, settings=settings, device=device, dtype=dtype, methods=methods,
                   fingerprints=fingerprints, fingerprint_options=fingerprint_options, behaviour=behaviour,
                   allow_fallback=allow_fallback, cache=cache, background=background)
    with progress(show_progress) as tick:
        return run.pair(a, b, tick=tick)


def _check_halves(fingerprints: bool, behaviour: bool) -> None:
    if not fingerprints and not behaviour:
        raise InputError("nothing to compare: both fingerprints and behaviour are off",
                         hint="enable at least one of them")


@dataclasses.dataclass(kw_only=True)
class PairRun:
    """One comparison's settings; ``pair`` compares two models (compare() and compare_many() use it)."""

    chosen: list[Prompt]
    settings: BehaviourSettings
    device: str
    dtype: str
    methods: Sequence[str] | None
    fingerprints: bool
    fingerprint_options: Mapping[str, Mapping[str, Any]] | None
    behaviour: bool
    allow_fallback: bool | None
    cache: OutputCache | None
    background: Any = None

    def outputs(self, path: Any, *, side: str, tick: Callable[[str], None]) -> tuple[ModelOutputs, bool]:
        seed = self.settings.seed + (0 if side == "a" else 1)
        return _cached_outputs(path, self.chosen, self.settings, seed=seed, device=self.device, dtype=self.dtype,
                               allow_fallback=self.allow_fallback, cache=self.cache, tick=tick)

    def fingerprint(self, a: Any, b: Any, *, tick: Callable[[str], None]
                    ) -> tuple[FingerprintReport | None, str | None, float]:
        """(report or None, error or None, seconds) of the weight fingerprints of ``a`` and ``b``."""
        tick("weight fingerprints")
        t = time.perf_counter()
        fp, fp_error = _fingerprint(a, b, self.methods, self.device, self.allow_fallback, self.settings.seed,
                                    self.fingerprint_options, tick, self.background)
        trim_heap()  # the fingerprint memos are gone (freed by reference count: no cycles)
        return fp, fp_error, time.perf_counter() - t

    def pair(self, a: Any, b: Any, *, tick: Callable[[str], None], out_a: ModelOutputs | None = None,
             fingerprinted: tuple[Any, str | None, float] | None = None,
             on_outputs: Callable[[str, bool], None] | None = None) -> ComparisonReport:
        """Compare ``a`` with ``b``; ``out_a`` and ``fingerprinted`` (a ``fingerprint`` result) replace
        computing them again; ``on_outputs(side, computed)`` hears whether each side's outputs were
        computed or served from the cache."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        fp: FingerprintReport | None = None
        beh: BehaviourResult | None = None
        fp_error, out_b = None, None
        if self.fingerprints:
            fp, fp_error, timings["fingerprint_s"] = fingerprinted or self.fingerprint(a, b, tick=tick)
        else:
            fp_error = "not requested"
        if self.behaviour:
            t = time.perf_counter()
            if out_a is None:
                out_a, computed = self.outputs(a, side="a", tick=tick)
                if on_outputs is not None:
                    on_outputs("a", computed)
            out_b, computed = self.outputs(b, side="b", tick=tick)
            if on_outputs is not None:
                on_outputs("b", computed)
            tick("comparing outputs")
            beh = compare_outputs(out_a, out_b, self.chosen, self.settings)
            timings["behaviour_s"] = time.perf_counter() - t
        verdict = decide(fp, beh, fingerprint_error=fp_error if self.fingerprints else None)
        timings["total_s"] = time.perf_counter() - start + (fingerprinted[2] if fingerprinted else 0.0)
        return ComparisonReport(
            verdict=verdict.verdict, reasons=verdict.reasons, evidence=verdict.evidence, fingerprint=fp,
            fingerprint_error=fp_error, behaviour=beh,
            models={"a": _model_info(a, out_a), "b": _model_info(b, out_b)},
            device=_device_name(self.device, self.allow_fallback), dtype=self.dtype,
            settings=self.settings.to_json(), timings=timings, rules=list(RULES),
        )


def _device_name(device: str, allow_fallback: bool | None) -> str:
    try:
        return str(get_backend(device, allow_fallback=allow_fallback).device)
    except ModelkinError:
        return device
