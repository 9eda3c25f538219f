"""The study's Markdown: each step's report text and the summary rows and figure numbers of the method steps
(:func:`summary_rows`, which ``analyses/study_findings.py`` also reads from a committed study folder)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..core.results import markdown_table, run_summary_json


def baseline_report(summary: dict, fig: Callable[[str], str]) -> str:
    """The baseline step's Markdown: every context and axis with its gap, CI, p, BH p and detectable gap."""
    r0 = summary["rows"][0]
    lines = [
        "Bias gap = mean over prompts of log P(favourable answer) - log P(unfavourable answer), group A minus group "
        "B (positive: group A is favoured). 95% CIs from a crossed bootstrap over names and templates. "
        f"{r0['n_templates']} templates x {r0['n_names_a'] + r0['n_names_b']} names per context. Detectable: the "
        "gap a test at 0.05 finds with power 0.8 (read it before the methods: a method cannot be shown to remove "
        "less than this); p (BH): Benjamini-Hochberg over the rows.", "",
        "| context | axis | gap | 95% CI | p | p (BH) | detectable | effect size (SD of name means) | significant |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        bh = f"{r['p_bh']:.3f}" if "p_bh" in r else "-"
        mde = f"{r['min_detectable']:.3f}" if "min_detectable" in r else "-"
        lines.append(f"| {r['context']} | {r['axis']} ({r['group_a']} - {r['group_b']}) | {r['gap']:+.3f} | "
                     f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {r['p_value']:.3f} | {bh} | {mde} | "
                     f"{r['effect_size']:+.2f} | {'yes' if r['significant'] else 'no'} |")
    lines += ["", f"![baseline bias]({fig('baseline_bias.png')})"]
    return "\n".join(lines)


def transfer_md(cells: list[dict], fig: Callable[[str], str], name: str) -> str:
    """A method step's transfer cells as a Markdown table, and its figure."""
    rows = [{"selected on": c["selected_on"], "evaluated on": c["evaluated_on"], "gap before": c["gap_before"],
             "gap change": c["gap_change"],
             "95% CI": f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]", "p (BH)": c.get("p_adjusted"),
             "random control": c.get("random_gap_change"), "reduction": c["reduction"],
             "Δppl": c.get("perplexity_change"), "components": c["n_components"]} for c in cells]
    return "\n".join([markdown_table(rows), "", f"![{name}]({fig(name)})"])


def summary_report(summary: dict, fig) -> str:
    """The summary step's Markdown: one row per method, and the methods figure."""
    return "\n".join(["Mean change of the gap (after - before, held-out names and templates) on the diagonal "
                      "(selected and evaluated on the same context) and off it (another context), with the random "
                      "control and the capability cost (mean perplexity change on the neutral text). Means of "
                      "absolute changes, not of ratios.", "",
                      markdown_table(summary["rows"]), "", f"![methods]({fig('methods_summary.png')})"])


def _with_ci(value, ci) -> str:
    if value is None or not ci or ci[0] is None:
        return "-"
    return f"{value:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def summary_rows(out: Path, steps: list, plot: list[dict] | None = None) -> list[dict]:
    """One row per finished method step: mean gap change on and off the diagonal, the gap removed within and
    across contexts with CIs, controls, capability. ``plot``, if given, receives the numbers the methods
    figure draws."""
    rows = []
    plot = plot if plot is not None else []
    for st in steps:
        try:
            s = run_summary_json(out / "steps" / st.name)
        except FileNotFoundError:
            continue  # not a method step, or not finished
        cells = s["cells"]
        if not cells:
            continue
        diag = [c for c in cells if c["selected_on"] == c["evaluated_on"]]
        off = [c for c in cells if c["selected_on"] != c["evaluated_on"]]

        def mean(xs, k):
            v = [x[k] for x in xs if x.get(k) is not None]
            return float(np.mean(v)) if v else float("nan")

        tt = s.get("transfer_test") or {}
        rows.append({"method": s.get("title", st.title), "diagonal": mean(diag, "gap_change"),
                     "off-diagonal": mean(off, "gap_change"), "random (diag)": mean(diag, "random_gap_change"),
                     "random (off)": mean(off, "random_gap_change"), "gap before (diag)": mean(diag, "gap_before"),
                     "Δppl": mean(cells, "perplexity_change"), "Δppl random": mean(cells, "random_perplexity_change"),
                     "diagonal cells with CI excluding 0":
                         f"{sum((c['ci_high'] < 0) or (c['ci_low'] > 0) for c in diag)}/{len(diag)}",
                     # what the figure draws: gap removed within and across contexts (the transfer test's
                     # column-wise means) with their 95% CIs, and the random control's removal
                     "removed within [95% CI]": _with_ci(tt.get("within_mean"), tt.get("within_ci")),
                     "removed cross [95% CI]": _with_ci(tt.get("cross_mean"), tt.get("cross_ci")),
                     "random removed (within / cross)": f"{mean(diag, 'random_gap_removed'):+.3f} / "
                                                        f"{mean(off, 'random_gap_removed'):+.3f}"})
        plot.append({"method": s.get("title", st.title), "within": tt.get("within_mean"),
                     "within_ci": tt.get("within_ci"), "cross": tt.get("cross_mean"), "cross_ci": tt.get("cross_ci"),
                     "random_within": mean(diag, "random_gap_removed"), "random_cross": mean(off, "random_gap_removed"),
                     "ppl": mean(cells, "perplexity_change"), "ppl_random": mean(cells, "random_perplexity_change")})
    return rows


def crossfit_md(cf: dict | None) -> list[str]:
    """The cross-fitted within - cross test of a step (``crossfit/`` holds every cell and fit), as report lines."""
    if not cf:
        return []
    t = cf["test"]
    if "within_minus_cross" not in t:
        return ["", f"**Cross-fitted** over {cf['splits']} split(s) x 2 folds: {t.get('note', '')}"]
    sd = t.get("between_split_sd")
    return ["", f"**Cross-fitted** over {cf['splits']} split(s) x 2 folds (selection and held-out halves swapped): "
                f"within - cross {t['within_minus_cross']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}], "
                f"p {t['p_value']:.3f}; SD between splits " + ("-" if sd is None else f"{sd:.3f}")
                + " (beside the interval, not in it). Every cell: `crossfit/result.json`."]

