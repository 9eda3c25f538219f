"""Self-contained HTML: the study's interactive report and rich tables for Jupyter.

Everything is inline (CSS, a few lines of JavaScript for the hover box, SVG
charts): the page opens from disk with no network. Every coloured cell, bar and
point carries a ``data-tip`` with its numbers; hovering shows them.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from jaxtyping import Float

from ..core.results import RUN_TRANSFER, RUN_TRANSFER_V1, run_summary_json

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;
color:#222;line-height:1.4}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}h3{font-size:15px}
table.mb{border-collapse:collapse;margin:8px 0;font-size:13px}
table.mb td,table.mb th{border:1px solid #ccc;padding:4px 8px;text-align:center}
table.mb th{background:#f4f4f4}
td.cell{min-width:120px;cursor:default}
.note{color:#555;font-size:13px}
#tip{position:fixed;pointer-events:none;background:#fff;border:1px solid #888;border-radius:4px;padding:6px 8px;
font-size:12px;white-space:pre;box-shadow:0 2px 6px rgba(0,0,0,.2);display:none;z-index:10;max-width:520px}
svg text{font-size:10px;font-family:inherit}
"""

JS = """
(function(){var tip=document.getElementById('tip');
document.addEventListener('mouseover',function(e){var t=e.target.closest('[data-tip]');
 if(!t){tip.style.display='none';return;} tip.textContent=t.getAttribute('data-tip'); tip.style.display='block';});
document.addEventListener('mousemove',function(e){tip.style.left=(e.clientX+14)+'px';tip.style.top=(e.clientY+14)+'px';});
})();
"""


def esc(x) -> str:
    """HTML-escape a value's string form."""
    return html.escape(str(x), quote=True)


def fmt(v, digits: int = 3, signed: bool = True) -> str:
    """A number for a table cell (``digits`` decimals, signed by default; a dash for None or NaN)."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    return str(v)


def _ci(a, b, digits: int = 3) -> str:
    return f"[{fmt(a, digits)}, {fmt(b, digits)}]" if a is not None and b is not None else ""


def diverging(v: float, vmax: float) -> str:
    """White at 0, red for positive (bias removed), blue for negative; saturated at ``vmax``."""
    if v is None or not np.isfinite(v) or vmax <= 0:
        return "#eeeeee"
    t = max(-1.0, min(1.0, v / vmax))
    if t >= 0:
        r, g, b = 255, int(255 - 150 * t), int(255 - 150 * t)
    else:
        r, g, b = int(255 + 150 * t), int(255 + 150 * t), 255
    return f"rgb({r},{g},{b})"


def cell_tip(c: dict) -> str:
    """The hover text of one transfer cell: effect, CI, test, capability cost, and every control."""
    lines = [f"selected on {c.get('selected_on')}  ->  evaluated on {c.get('evaluated_on')}",
             f"gap before   {fmt(c.get('gap_before'))} {_ci(*(c.get('gap_before_ci') or (None, None)))}",
             f"gap change   {fmt(c.get('gap_change'))} {_ci(c.get('ci_low'), c.get('ci_high'))}",
             f"bias removed {fmt(c.get('gap_removed'))}   p {fmt(c.get('p_value'), signed=False)}   "
             f"p (BH) {fmt(c.get('p_adjusted'), signed=False)}   MDD {fmt(c.get('min_detectable'), signed=False)}",
             "reduction    " + (f"{fmt(c.get('reduction'))} {_ci(c.get('reduction_ci_low'), c.get('reduction_ci_high'))}"
                                if c.get("reduction") is not None else "not estimable (baseline CI includes 0)"),
             f"perplexity change {fmt(c.get('perplexity_change'))}   components {c.get('n_components')}"]
    for name, ctl in (c.get("controls") or {}).items():
        if isinstance(ctl, dict):
            lines.append(f"control {name}: gap change {fmt(ctl.get('gap_change'))} "
                         f"{_ci(ctl.get('ci_low'), ctl.get('ci_high'))}, perplexity change "
                         f"{fmt(ctl.get('perplexity_change'))}")
    return "\n".join(lines)


def matrix_html(cells: Sequence[dict], *, value: str = "gap_removed", title: str = "") -> str:
    """A transfer matrix (rows: selected on, columns: evaluated on) coloured by ``value``, with hover details.

    Full colour is the largest |gap before| among the cells: a cell is as red as the share of a baseline gap
    it removes, so a tiny effect stays pale whatever the other cells do."""
    rows = list(dict.fromkeys(c["selected_on"] for c in cells))
    cols = list(dict.fromkeys(c["evaluated_on"] for c in cells))
    by = {(c["selected_on"], c["evaluated_on"]): c for c in cells}
    gaps = [abs(c["gap_before"]) for c in cells if isinstance(c.get("gap_before"), (int, float))
            and np.isfinite(c["gap_before"])]
    vmax = max(gaps) if gaps else 1.0
    out = [f"<table class='mb' data-matrix='{esc(title)}'><tr><th>selected on \\ evaluated on</th>"
           + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"]
    for r in rows:
        out.append(f"<tr><th>{esc(r)}</th>")
        for col in cols:
            c = by.get((r, col))
            if c is None:
                out.append("<td>-</td>")
                continue
            star = "*" if (c.get("p_adjusted") is not None and c["p_adjusted"] < 0.05) else ""
            out.append(f"<td class='cell' style='background:{diverging(c.get(value) or 0.0, vmax)}' "
                       f"data-tip='{esc(cell_tip(c))}'>{fmt(c.get(value))}{star}<br><span class='note'>"
                       f"{_ci(c.get('ci_low'), c.get('ci_high'))}</span></td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def matrix_groups(cells: Sequence[dict]) -> list[tuple[str, list[dict]]]:
    """One matrix when each (selected on, evaluated on) pair occurs once (L1 on the diagonal, L2 off it);
    one per level when a pair occurs at several levels."""
    pairs = [(c["selected_on"], c["evaluated_on"]) for c in cells]
    levels = list(dict.fromkeys(c.get("level", "") for c in cells))
    if len(set(pairs)) == len(pairs):
        return [("Transfer matrix (diagonal: within context; off it: across contexts)", list(cells))]
    return [(f"Transfer matrix {lv}", [c for c in cells if c.get("level", "") == lv]) for lv in levels]


def svg_bars(values: Sequence[float], labels: Sequence[str], tips: Sequence[str], *, width: int = 900,
             height: int = 160, ylabel: str = "") -> str:
    """A horizontal bar chart as inline SVG, with a tooltip per bar."""
    n = max(len(values), 1)
    vmax = max([abs(v) for v in values] + [1e-12])
    bw = (width - 50) / n
    parts = [f"<svg width='{width}' height='{height + 30}' role='img'>"]
    for i, (v, lab, tip) in enumerate(zip(values, labels, tips, strict=True)):
        h = (height - 10) * abs(v) / vmax
        x = 45 + i * bw
        parts.append(f"<rect x='{x:.1f}' y='{height - h:.1f}' width='{max(bw - 1, 1):.1f}' height='{h:.1f}' "
                     f"fill='#4477aa' data-tip='{esc(tip)}'/>")
        if n <= 40 or i % max(1, n // 20) == 0:
            parts.append(f"<text x='{x + bw / 2:.1f}' y='{height + 12}' text-anchor='middle'>{esc(lab)}</text>")
    parts.append(f"<text x='0' y='12'>{esc(ylabel)}</text></svg>")
    return "".join(parts)


def svg_heatmap(mat: Float[np.ndarray, "rows cols"], row_label: str, col_label: str, tip_of, *, cell: int = 14
                ) -> str:
    """A heatmap of ``mat`` [rows, cols] (diverging colours around 0), each cell with ``tip_of(i, j)``."""
    nr, nc = mat.shape
    vmax = float(np.nanmax(np.abs(mat))) if mat.size else 1.0
    w, h = 40 + nc * cell, 20 + nr * cell
    parts = [f"<svg width='{w + 10}' height='{h + 20}' role='img'><text x='40' y='12'>{esc(col_label)} -&gt;</text>"]
    for i in range(nr):
        if i % 5 == 0:
            parts.append(f"<text x='2' y='{20 + i * cell + cell - 3}'>{i}</text>")
        for j in range(nc):
            parts.append(f"<rect x='{40 + j * cell}' y='{20 + i * cell}' width='{cell - 1}' height='{cell - 1}' "
                         f"fill='{diverging(float(mat[i, j]), vmax)}' data-tip='{esc(tip_of(i, j))}'/>")
    parts.append(f"<text x='2' y='{h + 14}'>rows: {esc(row_label)}</text></svg>")
    return "".join(parts)


def svg_curve(xs: Sequence[float], ys: Sequence[float], tips: Sequence[str], *, width: int = 420, height: int = 200,
              xlabel: str = "", ylabel: str = "") -> str:
    """A line chart as inline SVG, with a tooltip per point."""
    if not xs:
        return ""
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min([*list(ys), 0.0]), max([*list(ys), 0.0])
    y1 = y1 if y1 > y0 else y0 + 1

    def px(x):
        return 40 + (width - 60) * (x - x0) / (x1 - x0)

    def py(y):
        return 10 + (height - 40) * (1 - (y - y0) / (y1 - y0))

    pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys, strict=True))
    parts = [f"<svg width='{width}' height='{height}' role='img'>",
             f"<line x1='40' x2='{width - 20}' y1='{py(0):.1f}' y2='{py(0):.1f}' stroke='#aaa' stroke-dasharray='3'/>",
             f"<polyline points='{pts}' fill='none' stroke='#4477aa' stroke-width='2'/>"]
    for x, y, t in zip(xs, ys, tips, strict=True):
        parts.append(f"<circle cx='{px(x):.1f}' cy='{py(y):.1f}' r='5' fill='#4477aa' data-tip='{esc(t)}'/>"
                     f"<text x='{px(x):.1f}' y='{height - 14}' text-anchor='middle'>{x:g}</text>")
    parts.append(f"<text x='{width / 2:.0f}' y='{height - 2}' text-anchor='middle'>{esc(xlabel)}</text>"
                 f"<text x='0' y='10'>{esc(ylabel)}</text></svg>")
    return "".join(parts)


def page(title: str, body: Sequence[str]) -> str:
    """A self-contained HTML page (inline style and script, no network)."""
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>" + esc(title) + "</title><style>"
            + CSS + "</style></head><body><div id='tip'></div><h1>" + esc(title) + "</h1>" + "".join(body)
            + "<script>" + JS + "</script></body></html>")


def records_html(rows: Sequence[dict], columns: Sequence[str] | None = None, max_rows: int = 40) -> str:
    """A plain table of dict rows (numbers to 3 decimals), for Jupyter and the report."""
    rows = list(rows)
    if not rows:
        return "<p class='note'>(no rows)</p>"
    cols = list(columns or [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))])
    out = ["<table class='mb'><tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"]
    for r in rows[:max_rows]:
        out.append("<tr>" + "".join(
            f"<td>{esc(fmt(r.get(c), signed=not (c.startswith('p') or 'detectable' in c)) if isinstance(r.get(c), float) else r.get(c, ''))}</td>"
            for c in cols) + "</tr>")
    if len(rows) > max_rows:
        out.append(f"<tr><td colspan='{len(cols)}' class='note'>... {len(rows) - max_rows} more rows</td></tr>")
    return "".join(out) + "</table>"


def load_tensor(folder: Path, key: str) -> Float[np.ndarray, ...] | None:
    """Tensor ``key`` of a saved result folder (``tensors.safetensors``) as float64 numpy, or None if absent."""
    f = folder / "tensors.safetensors"
    if not f.exists():
        return None
    from safetensors.torch import load_file

    t = load_file(str(f))
    return t[key].double().numpy() if key in t else None


#: a method's own HTML sections for one finished step: (step folder, step summary) -> HTML fragments
Sections = Callable[[Path, dict], list[str]]


def study_html(out: str | Path, sections: Sections | None = None) -> str:
    """The interactive report of a finished study folder (``OUT/steps/*/summary.json``).

    Args:
        out: the study folder.
        sections: a method's own sections for a step (the study passes each registered method's
            :meth:`~mechbias.methods.base.Method.html`); viz only renders them.

    Returns:
        The self-contained HTML page.
    """
    out = Path(out)
    steps = sorted(p.parent for p in (out / "steps").glob("*/summary.json"))
    index = out / "steps" / "index.json"
    if index.exists():  # the steps of the latest run (older studies wrote no index: every step is shown)
        current = set(json.loads(index.read_text()).get("steps", []))
        steps = [s for s in steps if s.name in current]
    if not steps:
        raise FileNotFoundError(f"{out} holds no finished study steps (no steps/*/summary.json)")
    cfg = json.loads((out / "study_config.json").read_text()) if (out / "study_config.json").exists() else {}
    body = [f"<p class='note'>Study folder <code>{esc(out)}</code>. Hover a cell, bar or point for its numbers. "
            "Transfer cells show the bias removed (gap change toward 0) on held-out prompts with its 95% CI; "
            "* marks cells whose Benjamini–Hochberg adjusted p &lt; 0.05. Red: bias removed, blue: bias added; full "
            "colour = the largest baseline gap of the matrix removed.</p>"]
    if cfg:
        body.append("<p class='note'>" + esc(", ".join(f"{k}={v}" for k, v in cfg.items()
                                                        if not isinstance(v, (dict, list)))) + "</p>")
    for step in steps:
        s = json.loads((step / "summary.json").read_text())
        if step.name == "baseline":
            body.append("<h2>Baseline bias</h2>" + records_html(
                s.get("rows", []), ["context", "axis", "group_a", "group_b", "gap", "ci_low", "ci_high", "p_value",
                                    "min_detectable", "significant"]))
            continue
        if not any((step / sub / "result.json").exists() for sub in (RUN_TRANSFER, RUN_TRANSFER_V1)):
            continue
        s = run_summary_json(step)  # the cells, each with every control, from the step's transfer matrix
        body.append(f"<h2>{esc(s.get('title', step.name))}</h2><p class='note'>{esc(s.get('description', ''))}</p>")
        body += [f"<h3>{esc(name)}</h3>" + matrix_html(group, title=f"{step.name} {name}")
                 for name, group in matrix_groups(s["cells"])]
        tt: dict = s["transfer_test"]
        est = tt.get("within_minus_cross", tt.get("diagonal_minus_offdiagonal"))
        if est is not None:
            body.append(f"<p>Within minus cross-context bias removed (within columns): {fmt(est)} "
                        f"{_ci(tt.get('ci_low'), tt.get('ci_high'))}, p {fmt(tt.get('p_value'), signed=False)}, "
                        f"minimal detectable difference {fmt(tt.get('min_detectable'), signed=False)}.</p>")
        if sections is not None:
            body += sections(step, s)
    return page("mechbias study report", body)
