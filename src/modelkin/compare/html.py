"""One self-contained HTML page per comparison: inline CSS, base64 PNG plots, no scripts, no external assets."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from modelkin.compare import plots

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
.call-inconclusive,.call-skipped{color:#8a6d00}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers for tables: None -> '–', small p-values in scientific notation."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value != 0 and abs(value) < 10 ** -(digits - 1):
            return f"{value:.2e}"
        return f"{value:.{digits}g}"
    return esc(value)


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
    return f'<td class="num">{fmt(value)}</td>' if num else f"<td>{esc(value)}</td>"


def _fingerprint_section(report: Mapping[str, Any], labels: tuple[str, str]) -> str:
    fp = report.get("fingerprint")
    if not fp:
        why = report.get("fingerprint_error") or "not run"
        return f"<h2>Weight fingerprints</h2><p class='muted'>Not available: {esc(why)}</p>"
    holm = {e["method"]: e for e in report.get("evidence", [])}
    rows = []
    for name, m in (fp.get("methods") or {}).items():
        call = m.get("call", "")
        e = holm.get(name, {})
        rows.append([_td(name), _td(m.get("score"), True), _td(m.get("p_value"), True), _td(e.get("p_holm"), True),
                     _td(m.get("z"), True), f'<td class="call-{esc(call)}">{esc(call)}</td>',
                     f'<td class="muted">{esc(m.get("skipped") or m.get("null", ""))}</td>'])
    table = _table(["method", "score", "p-value", "Holm p", "z", "call", "null hypothesis / note"], rows)
    curves = ((fp.get("methods") or {}).get("std_curve") or {}).get("curves")
    plot = _img(plots.std_curves_png(curves, labels) if curves else None, "std curves per projection")
    return f"<h2>Weight fingerprints</h2>{table}<h3>Per-layer std curves (HonestAGI)</h3>{plot}"


BEHAVIOUR_ROWS = (
    ("js_divergence", "next-token JS divergence, mean over positions (bits)"),
    ("js_divergence_max", "next-token JS divergence, max (bits)"),
    ("kl_ab", "KL(A‖B), mean (bits)"),
    ("kl_ba", "KL(B‖A), mean (bits)"),
    ("top1_agreement", "top-1 agreement"),
    ("topk_overlap", "top-k overlap"),
    ("greedy_token_agreement", "greedy continuations: token agreement"),
    ("greedy_exact_match", "greedy continuations: identical text (fraction of prompts)"),
    ("greedy_text_similarity", "greedy continuations: character similarity"),
    ("bpb_a", "bits per byte, A (mean)"),
    ("bpb_b", "bits per byte, B (mean)"),
    ("bpb_correlation", "bits-per-byte Pearson r across texts"),
    ("bpb_p_value", "  permutation p-value (one-sided)"),
    ("bpb_spearman", "bits-per-byte Spearman ρ across texts"),
    ("bpb_spearman_p_value", "  permutation p-value (one-sided)"),
)


def behaviour_rows(b: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    """(label, value, note) rows shared by the HTML table and the terminal summary."""
    skipped = b.get("skipped") or {}
    rows = []
    for key, label in BEHAVIOUR_ROWS:
        note = ""
        if b.get(key) is None:
            group = "logits" if key in ("js_divergence", "js_divergence_max", "kl_ab", "kl_ba", "top1_agreement",
                                        "topk_overlap") else key.split("_")[0]
            note = skipped.get(group) or skipped.get("greedy_tokens" if group == "greedy" else key) or ""
        if key == "topk_overlap":
            label = f"top-{b.get('top_k', 'k')} overlap"
        rows.append((label, b.get(key), note))
    mmd = b.get("mmd")
    if mmd:
        rows.append((f"MMD² ({mmd['kernel']}, {mmd['n_prompts']}×{mmd['n_samples']} samples)", mmd["statistic"], ""))
        rows.append(("  permutation p-value (H0: same distribution)", mmd["p_value"], ""))
    else:
        rows.append(("two-sample MMD test", None, skipped.get("mmd", "")))
    routing = b.get("routing")
    if routing:
        rows.append(("routing: expert-load JS, mean over layers (bits)", routing.get("load_js_mean"), ""))
        rows.append(("routing: entropy-profile correlation", routing.get("entropy_correlation"), ""))
    else:
        rows.append(("MoE routing similarity", None, skipped.get("routing", "")))
    return rows


def _behaviour_section(b: Mapping[str, Any] | None, labels: tuple[str, str]) -> str:
    if not b:
        return "<h2>Behaviour</h2><p class='muted'>Behaviour was not compared.</p>"
    note = "" if b.get("same_tokenizer") else f"<p class='muted'>Token-level metrics skipped: {esc(b.get('tokenizer_note'))}</p>"
    rows = [[_td(label), _td(value, True), f'<td class="muted">{esc(n)}</td>'] for label, value, n in behaviour_rows(b)]
    per = b.get("per_prompt") or []
    figs = (_img(plots.bpb_scatter_png(per, labels), "bits per byte per text")
            + _img(plots.per_prompt_png(per), "per-prompt divergence and similarity")
            + _img(plots.routing_png(b, labels), "router entropy per layer") if per else "")
    return (f"<h2>Behaviour ({b.get('n_prompts')} prompts)</h2>{note}"
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


def render_html(report: Mapping[str, Any]) -> str:
    """The whole page for a comparison report's JSON dict."""
    models = report.get("models") or {}
    labels = (models.get("a", {}).get("name") or "A", models.get("b", {}).get("name") or "B")
    verdict = report.get("verdict", "inconclusive")
    colour = VERDICT_COLOURS.get(verdict, "#555")
    reasons = "".join(f"<li>{esc(r)}</li>" for r in report.get("reasons", []))
    model_rows = [[_td(side.upper()), _td(m.get("name")), _td(m.get("path")), _td(m.get("model_type")),
                   _td(fmt(m.get("is_moe"))), _td(m.get("logits_size"), True)] for side, m in models.items()]
    rules = "".join(f"<li>{esc(r)}</li>" for r in report.get("rules", []))
    settings = esc(", ".join(f"{k}={v}" for k, v in (report.get("settings") or {}).items()))
    timings = esc(", ".join(f"{k} {v:.1f}s" for k, v in (report.get("timings") or {}).items()
                            if isinstance(v, (int, float))))
    title = f"modelkin compare: {labels[0]} vs {labels[1]}"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<link rel='icon' href='data:,'><title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class='muted'>device {esc(report.get('device'))}, "
        f"dtype {esc(report.get('dtype'))}</p>"
        f"<p>Verdict: <span class='verdict' style='background:{colour}'>{esc(verdict)}</span></p>"
        f"<ul>{reasons}</ul>"
        f"<h2>Models</h2>{_table(['', 'name', 'path', 'type', 'MoE', 'logits'], model_rows)}"
        f"{_fingerprint_section(report, labels)}{_behaviour_section(report.get('behaviour'), labels)}"
        f"<h2>How the verdict is reached</h2><ol class='muted'>{rules}</ol>"
        f"<p class='muted'>Settings: {settings}<br>Timings: {timings}</p>"
        "</body></html>\n"
    )


def render_index(entries: Sequence[Mapping[str, Any]], title: str, intro: str = "") -> str:
    """An index page linking several reports: entries hold name, href, verdict and headline numbers."""
    rows = []
    for e in entries:
        colour = VERDICT_COLOURS.get(e.get("verdict", ""), "#555")
        badge = f"<span class='verdict' style='background:{colour};font-size:.9em'>{esc(e.get('verdict'))}</span>"
        rows.append([f"<td><a href='{esc(e['href'])}'>{esc(e['name'])}</a></td>", f"<td>{badge}</td>",
                     *(_td(e.get(k), True) for k in ("js_divergence", "top1_agreement", "greedy_text_similarity",
                                                     "bpb_correlation", "mmd_p_value", "weights_significant")),
                     _td(e.get("note"))])
    header = ["comparison", "verdict", "JS (bits)", "top-1", "greedy sim.", "bpb r", "MMD p", "weight methods sig.",
              "about"]
    intro_html = f"<p>{esc(intro)}</p>" if intro else ""
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><h1>{esc(title)}</h1>{intro_html}"
            f"{_table(header, rows)}</body></html>\n")
