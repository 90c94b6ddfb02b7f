"""One self-contained HTML page per comparison: inline CSS, base64 PNG plots, no scripts, no external assets."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from typing import Any

from modelkin.compare.behaviour.result import BehaviourResult
from modelkin.compare.fingerprints.empirical import MIN_N, null_label, rank_text
from modelkin.compare.report.plots import bpb_scatter_png, per_prompt_png, routing_png, std_curves_png, strip_png
from modelkin.compare.report.rows import behaviour_rows, fmt

VERDICT_COLOURS = {"related": "#b3261e", "unrelated": "#1e7d32", "inconclusive": "#8a6d00"}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;
color:#1b1b1b;padding:0 16px;line-height:1.4}
h1{font-size:1.45em;margin-bottom:4px}h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd}
.verdict{display:inline-block;color:#fff;padding:6px 14px;border-radius:6px;font-weight:700;font-size:1.2em;
letter-spacing:.03em}
table{border-collapse:collapse;margin:8px 0;font-size:.88em}th,td{border:1px solid #d5d5d5;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f2f4f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#666;font-size:.85em}img{max-width:100%;border:1px solid #eee;margin:6px 0}
pre{white-space:pre-wrap;margin:0;font-size:.92em}details summary{cursor:pointer}
.call-related{color:#b3261e;font-weight:600}.call-unrelated{color:#1e7d32;font-weight:600}
.call-inconclusive,.call-skipped{color:#8a6d00}.call-descriptive{color:#666}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any) -> str:
    return esc(fmt(value))


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return f'<p class="muted">({esc(alt)}: nothing to plot)</p>'
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(rows_cell for rows_cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(value: Any, num: bool = False) -> str:
    return f'<td class="num">{_num(value)}</td>' if num else f"<td>{esc(value)}</td>"


def _fingerprint_section(report: Any, labels: tuple[str, str]) -> str:
    fp = report.fingerprint
    if not fp:
        why = report.fingerprint_error or "not run"
        return f"<h2>Weight fingerprints</h2><p class='muted'>Not available: {esc(why)}</p>"
    holm = {e["method"]: e for e in report.evidence}
    rows = []
    for name, m in fp.methods.items():
        e = holm.get(name, {})
        rows.append([_td(name), _td(null_label(m)), _td(m.score, True), _td(m.p_value, True),
                     _td(e.get("p_holm"), True), _td(m.z, True), f'<td class="call-{esc(m.call)}">{esc(m.call)}</td>',
                     _td(rank_text(m)), f'<td class="muted">{esc(m.skipped or m.null)}</td>'])
    header = ["method", "null", "score", "p-value", "Holm p", "z", "call", "among real unrelated pairs",
              "null hypothesis / note"]
    table = _table(header, rows)
    std = fp.methods.get("std_curve")
    curves = std.details.get("curves") if std is not None else None
    png = std_curves_png(curves["a"]["curves"], curves["b"]["curves"], labels) if curves else None
    plot = _img(png, "std curves per projection")
    return (f"<h2>Weight fingerprints</h2>{table}{_background_section(fp)}"
            f"<h3>Per-layer std curves (HonestAGI)</h3>{plot}")


def _background_section(fp: Any) -> str:
    """Strip plots: each method's score among the background's unrelated pairs, with what the strata are."""
    placed = [(name, m.score, (m.details.get("background") or {}).get("strata") or {})
              for name, m in fp.methods.items() if m.skipped is None and m.details.get("background")]
    if not placed:
        return ""
    png = strip_png([(n, s, {k: v.get("scores", []) for k, v in strata.items()}) for n, s, strata in placed])
    bg = next(iter(fp.methods[n].details["background"] for n, _, _ in placed))
    note = (f"Background {esc(bg.get('background'))}: each dot is the score of a pair of real, independently "
            "trained models (strata: every pair inside one stratum of the background, and A and B each against "
            f"every background model that is neither of them). The null decides only with N ≥ {MIN_N} pairs in "
            "every stratum (p = (1+k)/(N+1), the largest stratum p); otherwise it is shown here and the method "
            "stays descriptive. A stratum only speaks for the models it holds: pairs of small models say little "
            "about how alike two large models from different organisations may be.")
    if bg.get("background") == "shipped":
        note += (" The shipped background holds SmolLM2-135M and Gemma-3-270M (cross-family) and 40 small "
                 "Llamas (4 layers, width 128, 150 training steps) trained from scratch with distinct seeds "
                 "(seed-only).")
    return (f"<h3>Where each score falls among real unrelated pairs</h3><p class='muted'>{note}</p>"
            f"{_img(png, 'strip plot of background pair scores')}")


def _behaviour_section(b: BehaviourResult | None, labels: tuple[str, str]) -> str:
    if not b:
        return "<h2>Behaviour</h2><p class='muted'>Behaviour was not compared.</p>"
    if b.same_tokenizer:
        note = ""
    elif b.token_vocabulary:
        tv = b.token_vocabulary
        note = (f"<p class='muted'>The vocabularies differ: token-level metrics are over the {tv['shared']} "
                f"byte-identical shared tokens (renormalised) at {tv['aligned_positions']} positions where both "
                "tokenisations end on the same byte.</p>")
    else:
        note = f"<p class='muted'>Token-level metrics skipped: {esc(b.tokenizer_note)}</p>"
    rows = [[_td(label), _td(value, True), f'<td class="muted">{esc(n)}</td>'] for label, value, n in behaviour_rows(b)]
    per = b.per_prompt or []
    figs = (_img(bpb_scatter_png(per, labels), "bits per byte per text")
            + _img(per_prompt_png(per), "per-prompt divergence and similarity")
            + _img(routing_png(b, labels), "router entropy per layer") if per else "")
    return (f"<h2>Behaviour ({b.n_prompts} prompts)</h2>{note}"
            f"{_table(['metric', 'value', 'note'], rows)}{figs}{_per_prompt_table(per)}")


def _per_prompt_table(rows: Sequence[Mapping[str, Any]]) -> str:
    out = []
    for r in rows:
        detail = (f"<details><summary>{esc(_short(r.get('prompt', ''), 70))}</summary>"
                  f"<b>prompt</b><pre>{esc(r.get('prompt'))}</pre>"
                  f"<b>A greedy</b><pre>{esc(r.get('greedy_a'))}</pre><b>B greedy</b><pre>{esc(r.get('greedy_b'))}</pre>"
                  "</details>")
        out.append([_td(r.get("id")), _td(r.get("category")), f"<td>{detail}</td>", _td(r.get("js"), True),
                    _td(r.get("top1_agreement"), True), _td(r.get("bpb_a"), True), _td(r.get("bpb_b"), True),
                    _td(r.get("greedy_text_similarity"), True)])
    header = ["id", "category", "prompt and greedy continuations", "JS", "top-1", "bpb A", "bpb B", "greedy sim."]
    return f"<h3>Per prompt</h3>{_table(header, out)}"


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def render_html(report: Any) -> str:
    """The whole page for a ComparisonReport (typed as Any: the report module imports this one to save it)."""
    models = report.models or {}
    labels = (models.get("a", {}).get("name") or "A", models.get("b", {}).get("name") or "B")
    verdict = report.verdict
    colour = VERDICT_COLOURS.get(verdict, "#555")
    reasons = "".join(f"<li>{esc(r)}</li>" for r in report.reasons)
    model_rows = [[_td(side.upper()), _td(m.get("name")), _td(m.get("path")), _td(m.get("model_type")),
                   _td(fmt(m.get("is_moe"))), _td(m.get("logits_size"), True)] for side, m in models.items()]
    rules = "".join(f"<li>{esc(r)}</li>" for r in report.rules)
    settings = esc(", ".join(f"{k}={v}" for k, v in (report.settings or {}).items()))
    timings = esc(", ".join(f"{k} {v:.1f}s" for k, v in (report.timings or {}).items()
                            if isinstance(v, (int, float))))
    title = f"modelkin compare: {labels[0]} vs {labels[1]}"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<link rel='icon' href='data:,'><title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class='muted'>device {esc(report.device)}, "
        f"dtype {esc(report.dtype)}</p>"
        f"<p>Verdict: <span class='verdict' style='background:{colour}'>{esc(verdict)}</span></p>"
        f"<ul>{reasons}</ul>"
        f"<h2>Models</h2>{_table(['', 'name', 'path', 'type', 'MoE', 'logits'], model_rows)}"
        f"{_fingerprint_section(report, labels)}{_behaviour_section(report.behaviour, labels)}"
        f"<h2>How the verdict is reached</h2><ol class='muted'>{rules}</ol>"
        f"<p class='muted'>Settings: {settings}<br>Timings: {timings}</p>"
        "</body></html>\n"
    )


def render_index(entries: Sequence[Mapping[str, Any]], title: str, intro: str = "", *,
                 counters: Mapping[str, Any] | None = None, failures: Mapping[str, str] | None = None) -> str:
    """An index page linking several reports: entries hold name, href, verdict and headline numbers;
    ``counters`` (compare_many's) show what each model cost, ``failures`` the pairs that could not run."""
    rows = []
    for e in entries:
        colour = VERDICT_COLOURS.get(e.get("verdict", ""), "#555")
        badge = f"<span class='verdict' style='background:{colour};font-size:.9em'>{esc(e.get('verdict'))}</span>"
        expected = e.get("expected")
        mark = "" if expected is None else f"{esc(expected)} {'✓' if e.get('right') else '✗ wrong'}"
        rows.append([f"<td><a href='{esc(e['href'])}'>{esc(e['name'])}</a></td>", f"<td>{badge}</td>",
                     f"<td>{mark}</td>",
                     *(_td(e.get(k), True) for k in ("js_divergence", "top1_agreement", "greedy_text_similarity",
                                                     "bpb_correlation", "mmd_p_value", "weights_significant",
                                                     "seconds")),
                     _td(e.get("about", e.get("note")))])
    header = ["comparison", "verdict", "expected", "JS (bits)", "top-1", "greedy sim.", "bpb r", "MMD p",
              "valid weight tests sig.", "s", "about"]
    intro_html = f"<p>{esc(intro)}</p>" if intro else ""
    failed = "".join(f"<li><b>{esc(n)}</b>: {esc(why)}</li>" for n, why in (failures or {}).items())
    failed_html = f"<h2>Not compared</h2><ul>{failed}</ul>" if failed else ""
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><h1>{esc(title)}</h1>{intro_html}"
            f"{_table(header, rows)}{failed_html}{_counters_table(counters)}</body></html>\n")


def _counters_table(counters: Mapping[str, Any] | None) -> str:
    if not counters or "suspect" not in counters:
        return ""
    models = [("suspect", counters["suspect"])] + list((counters.get("candidates") or {}).items())
    keys = ("loads", "checkpoint_opens", "tensors_read", "bytes_read", "outputs_computed", "outputs_reused")
    rows = [[_td(name), _td(c.get("path"))] + [_td(c.get(k), True) for k in keys] for name, c in models]
    header = ["model", "path", "loads", "checkpoint opens", "tensors read", "bytes read", "outputs computed",
              "outputs reused"]
    return ("<h2>What each model cost</h2><p class='muted'>loads: runs of the model for behaviour; tensors and "
            "bytes read: by the weight fingerprints; outputs reused: pairs served from the suspect's outputs "
            f"computed once.</p>{_table(header, rows)}")
