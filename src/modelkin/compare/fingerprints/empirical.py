"""Empirical nulls from a background of real unrelated models: where a pair's score falls among the scores
of real unrelated pairs, p = (1+k)/(N+1) per stratum, the largest stratum p, and the margin rule.

Strata: for each background stratum S, every pair of two S models (all mutually unrelated; for
"seed-only" this is Zhu et al.'s null exactly); and "A,B vs background": A and B each against every
background model that is neither of them (identity by the method's own statistics, i.e. by content).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from modelkin.compare.fingerprints.result import MethodResult, NotApplicable
from modelkin.inspect.cache import cache_root
from modelkin.utils import atomic_write_text

SCORES_VERSION = 1  # bump when a method's score of two records changes
MIN_N = 99  # the smallest N with (1+0)/(N+1) <= 0.01: below it no stratum p can reach the 0.01 level
VERSUS = "A,B vs background"
NULL = ("H0: the pair is no more alike than real, independently trained models are: empirical null over the "
        "background's unrelated pairs, p = (1+k)/(N+1) per stratum (k = pairs scoring >= the observed "
        "score), the largest stratum p reported")
MARGIN_RULE = ("beyond every background pair with margin: in every stratum the score exceeds the largest "
               "unrelated-pair score by at least that stratum's own spread from its median to its maximum "
               "(score > max + (max - median)), with N >= 99 in every stratum")

Score = Callable[[Any, Any], float]


def _safe(score: Score, x: Any, y: Any) -> float | None:
    try:
        value = float(score(x, y))
    except (ValueError, ArithmeticError, NotApplicable, np.linalg.LinAlgError):
        return None
    return value if np.isfinite(value) else None


def _within(bg: Any, method: str, params: tuple[Any, ...], stats: Sequence[Any],
            score: Score) -> dict[tuple[int, int], float | None]:
    """Scores of every pair of usable background models, cached on the Background and on disk (they depend
    only on the background's files, the method and its params: computing the 780 seed-only pairs costs
    about a second per method, reading them back milliseconds)."""
    key = ("within", method, params, len(stats))
    if key not in bg.cache:
        file = _score_file(bg, method, params, len(stats))
        table = _read_scores(file, len(stats)) if file is not None else None
        if table is None:
            pairs = combinations(range(len(stats)), 2)
            table = {(i, j): _safe(score, stats[i], stats[j]) for i, j in pairs}
            if file is not None:
                _write_scores(file, table)
        bg.cache[key] = table
    return bg.cache[key]


def _score_file(bg: Any, method: str, params: tuple[Any, ...], n: int) -> Path | None:
    """Where the within-background scores live: $MODELKIN_CACHE_DIR/background (default ~/.cache/modelkin),
    named by a hash of the background's files (name, size, mtime), the method, its params and the count."""
    stamp = getattr(bg, "stamp", None)
    if not stamp:
        return None
    material = json.dumps({"v": SCORES_VERSION, "path": str(bg.path), "stamp": [list(s) for s in stamp],
                           "method": method, "params": repr(params), "n": n}, sort_keys=True)
    return cache_root() / "background" / f"{hashlib.sha256(material.encode()).hexdigest()[:32]}.json"


def _read_scores(file: Path, n: int) -> dict[tuple[int, int], float | None] | None:
    try:
        rows = json.loads(file.read_text(encoding="utf-8"))
        table = {(int(i), int(j)): (None if v is None else float(v)) for i, j, v in rows}
    except (OSError, ValueError, TypeError):
        return None
    return table if len(table) == n * (n - 1) // 2 else None


def _write_scores(file: Path, table: dict[tuple[int, int], float | None]) -> None:
    try:
        atomic_write_text(file, json.dumps([[i, j, v] for (i, j), v in table.items()]))
    except OSError:  # a read-only home: the scores are recomputed next time
        pass


def stratum_summary(observed: float, scores: Sequence[float]) -> dict[str, Any]:
    """n, k (scores >= observed), p = (1+k)/(n+1), max, median and the margin threshold of one stratum."""
    s = np.asarray(scores, dtype=np.float64)
    k = int(np.sum(s >= observed))
    top, mid = float(s.max()), float(np.median(s))
    return {"n": int(s.size), "k": k, "p_value": (1 + k) / (1 + s.size), "max": top, "median": mid,
            "threshold": top + (top - mid), "scores": [round(float(x), 6) for x in s]}


def summarise(observed: float, strata: dict[str, Sequence[float]], *, name: str = "",
              excluded: Sequence[str] = ()) -> dict[str, Any]:
    """The empirical null of one score over named strata of unrelated-pair scores (empty strata dropped)."""
    per = {k: stratum_summary(observed, v) for k, v in strata.items() if len(v)}
    if not per:
        return {"background": name, "strata": {}, "n": 0, "p_value": None, "empirical": False,
                "beyond_margin": False, "rank": "no background pair", "excluded": list(excluded)}
    worst = max(per, key=lambda k: per[k]["p_value"])
    empirical = all(v["n"] >= MIN_N for v in per.values())
    threshold = max(v["threshold"] for v in per.values())
    rank = "; ".join(f"above {v['n'] - v['k']} of {v['n']} {k} pairs" for k, v in per.items())
    return {"background": name, "strata": per, "n": sum(v["n"] for v in per.values()),
            "p_value": per[worst]["p_value"], "stratum_of_p": worst, "empirical": empirical,
            "threshold": threshold, "beyond_margin": bool(empirical and observed > threshold), "rank": rank,
            "min_n": MIN_N, "margin_rule": MARGIN_RULE, "excluded": list(excluded)}


def place(method: str, observed: float, stats_a: Any, stats_b: Any, bg: Any, *, score: Score,
          same: Callable[[Any, Any], bool], params: tuple[Any, ...] = ()) -> dict[str, Any]:
    """Where ``observed`` (the score of A vs B) falls among the background's unrelated pairs.

    Args:
        bg: a fingerprints.background.Background (records with ``stats(method)`` and ``stratum``).
        score: the method's score of two models' statistics (higher = more alike).
        same: whether two models' statistics are identical (a background model that is A or B is left out).
        params: the method options the score depends on (they key the cache of background-pair scores).
    """
    usable = [r for r in bg.records if r.stats(method) is not None]
    stats = [r.stats(method) for r in usable]
    keep = [i for i, s in enumerate(stats) if not (same(stats_a, s) or same(stats_b, s))]
    excluded = [usable[i].label for i in range(len(usable)) if i not in keep]
    within = _within(bg, method, params, stats, score)
    strata: dict[str, list[float]] = {}
    for stratum in sorted({usable[i].stratum for i in keep}):
        members = [i for i in keep if usable[i].stratum == stratum]
        values = [within[pair] for pair in combinations(members, 2)]
        strata[stratum] = [v for v in values if v is not None]
    versus = [_safe(score, own, stats[i]) for i in keep for own in (stats_a, stats_b)]
    strata[VERSUS] = [v for v in versus if v is not None]
    return summarise(observed, strata, name=bg.name, excluded=excluded)


def apply(result: MethodResult, placed: dict[str, Any]) -> MethodResult:
    """Attach the placement to a result; with N >= MIN_N in every stratum the empirical p becomes its p."""
    result.details["background"] = placed
    if placed.get("empirical"):
        result.details["own_null"] = {"null_kind": result.null_kind, "p_value": result.p_value, "z": result.z,
                                      "null": result.null}
        result.null_kind, result.p_value, result.z = "empirical", placed["p_value"], None
        result.null = NULL
    return result.decide()


def null_label(result: MethodResult) -> str:
    """'exact', 'empirical N=…' or 'descriptive' for tables."""
    if result.null_kind == "empirical":
        bg = result.details.get("background") or {}
        return f"empirical N={bg.get('n', '?')}"
    return result.null_kind


def rank_text(result: MethodResult) -> str:
    """Where the score falls among background pairs, e.g. 'above 20 of 20 seed-only pairs', or ''."""
    bg = result.details.get("background")
    if not bg or result.skipped:
        return ""
    text = bg.get("rank", "")
    if bg.get("beyond_margin"):
        text += " (beyond every pair with margin)"
    elif bg.get("p_value") is not None and not bg.get("empirical"):
        text += f" (background p={bg['p_value']:.3g}; N < {MIN_N} in a stratum: descriptive)"
    return text
