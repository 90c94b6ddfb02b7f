"""Public entry points of modelkin.compare: ``fingerprint(a, b, …) -> FingerprintReport``."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from modelkin.checkpoint import TensorSource
from modelkin.compare.fingerprints import method_module, resolve_methods
from modelkin.compare.fingerprints.result import FingerprintReport, MethodResult, NotApplicable
from modelkin.compare.fingerprints.weights import open_weights


def fingerprint(a: str | Path | TensorSource, b: str | Path | TensorSource, methods: str | list[str] | None = None,
                device: Any = "auto", *, seed: int = 0, allow_fallback: bool | None = None,
                null_library: str | Path | None = None, options: Mapping[str, Mapping[str, Any]] | None = None,
                progress: Callable[[str], None] | None = None) -> FingerprintReport:
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

    Returns:
        FingerprintReport: ``report.methods[name]`` (MethodResult), ``report.verdict``, ``to_json()``.

    Raises:
        InputError: unknown method names. CheckpointError: unreadable checkpoints. DeviceError: no device.

    Example:
        >>> report = fingerprint("base_model_dir", "suspect.gguf", methods="std_curve,permtest")
        >>> report["std_curve"].details["mean_r"], report["permtest"].p_value
    """
    from modelkin.backends import get_backend

    names = resolve_methods(methods)
    backend = get_backend(device, allow_fallback=allow_fallback)
    options = {k: dict(v) for k, v in (options or {}).items()}
    if null_library is not None:
        options.setdefault("std_curve", {}).setdefault("null_library", null_library)
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
            result.seconds = time.perf_counter() - start
            results[name] = result
        labels = (str(a if not isinstance(a, TensorSource) else a.path),
                  str(b if not isinstance(b, TensorSource) else b.path))
    return FingerprintReport(a=labels[0], b=labels[1], device=str(backend.device), seed=seed,
                             methods=results).finish()


def compare(a: str | Path, b: str | Path, prompts: Any = None, device: str = "auto", **kwargs: Any):
    """Fingerprints and behaviour of two models with one verdict -> ComparisonReport.

    Thin entry point; arguments and behaviour are documented at ``modelkin.compare.pipeline.compare``.
    """
    from modelkin.compare.pipeline import compare as run_compare

    return run_compare(a, b, prompts, device, **kwargs)
