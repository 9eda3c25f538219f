"""The study's findings as the documentation states them: one table per question, from a finished study folder.

    python analyses/study_findings.py results/study_full [--figure figures/study_full/transfer_tests.png]
    python analyses/study_findings.py A --beside B --labels "model A" "model B" --table both.md   # side by side

Reads ``DIR/axis_choice.json``, ``DIR/steps/baseline`` and every method step's run (``load_run``: the
transfer matrix with its score grids) and writes ``DIR/findings.md`` (and the figure, if asked):

1. **Axis choice** (selection split only) and **baseline gaps** (held-out and selection prompts together,
   as the baseline step measures them) with Benjamini-Hochberg over the family of baseline tests.
2. **Per method, absolute effects with CIs**: mean gap removed on the diagonal (within context) and off it
   (cross context), each a contrast of the matrix's cells with a crossed bootstrap over names and
   templates (:meth:`TransferMatrix.contrast`); each control's within-context mean; the selection minus
   each control on the diagonal, with its CI (does the selection beat what it is matched to?); the
   perplexity change on the reporting texts.
3. **The transfer question**: within - cross with its CI, p, minimal detectable difference (power 0.8) and
   the Benjamini-Hochberg adjusted p over the family of methods' tests.

Nothing here chooses anything: it only reads and summarises what the study measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from mechbias.apps.study_report import summary_rows
from mechbias.apps.workflow import load_run
from mechbias.core.results import atomic_savefig, atomic_write_text, markdown_table
from mechbias.eval.stats import benjamini_hochberg
from mechbias.eval.transfer import TransferMatrix, transfer_estimate
from mechbias.viz.plotting import plot_methods_summary


def _ci(e: dict, key: str = "estimate", fmt: str = "{:+.3f}") -> str:
    return f"{fmt.format(e[key])} [{fmt.format(e['ci_low'])}, {fmt.format(e['ci_high'])}]"


def method_rows(tm: TransferMatrix) -> dict:
    # within columns: the diagonal cells of the columns that are also rows, and the other rows' cells of those
    # columns, weighted so that within - cross is the transfer test's column-wise statistic
    cols = tm.within_columns()
    diag = [(c, c) for c in cols]
    off = [(r, c) for c in cols for r in tm.rows if r != c]
    # the controls every diagonal cell has (the selection's unmatched units alone exist only on rows with some)
    controls = sorted({k for r, c in diag for k in tm.cell(r, c).controls
                       if all(k in tm.cell(q, q).controls for q, _ in diag)}, key=lambda k: (k != "random", k))

    def mean_of(which: str, cells: list) -> dict:
        return tm.contrast([(which, r, c, 1.0 / len(cells)) for r, c in cells]).as_dict()

    out: dict = {"method": tm.method, "rows": tm.rows, "cols": tm.cols,
                 "within": mean_of("after", diag), "cross": mean_of("after", off) if off else None,
                 "test": tm.transfer_test if "within_minus_cross" in (tm.transfer_test or {}) else tm.test_transfer(),
                 "controls": {}, "units": {i["context"]: i["n_components"] for i in tm.row_info}}
    ppl = [tm.cell(r, r).perplexity_change for r, _ in diag]
    out["ppl"] = float(np.mean(ppl)) if all(p is not None for p in ppl) else None
    for name in controls:
        which = f"control/{name}"
        beat = tm.contrast([("after", r, c, 1.0 / len(diag)) for r, c in diag]
                           + [(which, r, c, -1.0 / len(diag)) for r, c in diag]).as_dict()
        cppl = [tm.cell(r, r).controls[name].perplexity_change for r, _ in diag]
        out["controls"][name] = {"within": mean_of(which, diag), "selection_minus_control": beat,
                                 "with_draws": tm.test_against_control(name),
                                 "ppl": float(np.mean(cppl)) if all(p is not None for p in cppl) else None}
    return out


def baseline_table(study: Path) -> tuple[str, list[dict]]:
    rows = json.loads((study / "steps" / "baseline" / "summary.json").read_text())["rows"]
    adj = benjamini_hochberg([r["p_value"] for r in rows])
    for r, a in zip(rows, adj, strict=True):
        r["p_adjusted"] = a
    table = [{"context": r["context"], "axis": f"{r['axis']} ({r['group_a']} - {r['group_b']})",
              "gap [95% CI]": f"{r['gap']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]",
              "p": f"{r['p_value']:.3f}", "p (BH)": f"{r['p_adjusted']:.3f}",
              "detectable at 80% power": f"{r['min_detectable']:.3f}",
              "significant after BH": "yes" if r["p_adjusted"] < 0.05 else "no"} for r in rows]
    return markdown_table(table), rows


def findings(study: Path) -> tuple[str, list[dict]]:
    parts = ["# Study findings", "", f"From `{study}` (analyses/study_findings.py). Gap removed = -(after - "
             "before) x sign(gap before), log-odds: positive = the gap shrank. 95% CIs from one crossed "
             "bootstrap over names (shared by every context) and templates (per context).", ""]
    axis_path = study / "axis_choice.json"
    if axis_path.exists():
        ch = json.loads(axis_path.read_text())
        parts += ["## Axis (chosen on the selection split)", "",
                  f"Chosen: **{ch['axis']}** ({ch['rule']}).", "",
                  markdown_table([{"axis": c["axis"], "contexts with a significant selection-split gap":
                                   c["significant_contexts"], "mean |t|": f"{c['mean_abs_t']:.2f}"}
                                  for c in ch["candidates"]]), ""]
    bt, _ = baseline_table(study)
    parts += ["## Baseline gaps", "", bt, ""]
    methods = []
    for step in sorted((study / "steps").iterdir()):
        try:
            run = load_run(step)  # either layout: transfer/ (current) or transfer_result/ (the committed study)
        except FileNotFoundError:
            continue  # the baseline and summary steps
        methods.append({"step": step.name, **method_rows(run.transfer), "method": run.title or run.transfer.method})
    adj = benjamini_hochberg([m["test"]["p_value"] if m["test"].get("p_value") is not None else float("nan")
                              for m in methods])
    for m, a in zip(methods, adj, strict=True):
        m["test_p_adjusted"] = a
    # the gate: a method's transfer is read only where its within-context removal survives BH over the methods
    within_adj = benjamini_hochberg([m["test"].get("within_p_value", float("nan")) for m in methods])
    for m, a in zip(methods, within_adj, strict=True):
        m["within_p_adjusted"] = a
    effects, beats, tests = [], [], []
    for m in methods:
        effects.append({"method (step)": f"{m['method']} (`{m['step']}`)",
                        "within context [95% CI]": _ci(m["within"]),
                        "cross context [95% CI]": _ci(m["cross"]) if m["cross"] else "-",
                        "Δppl (reporting texts)": f"{m['ppl']:+.2f}" if m["ppl"] is not None else "-"})
        for k, v in m["controls"].items():
            b = v["selection_minus_control"]
            d = v["with_draws"]
            beats.append({"method": m["method"], "control": k, "control within": f"{v['within']['estimate']:+.3f}",
                          "selection - control, within [95% CI, prompts only]": _ci(b),
                          "[95% CI with the draws' variance]": (f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
                                                                if d.get("ci_low") is not None else "-"),
                          "draws": d.get("n_draws", "-"),
                          "rank p": f"{d['rank_p']:.2f}" if d.get("rank_p") is not None else "-",
                          "detectable": f"{b['min_detectable']:.3f}",
                          "control Δppl": f"{v['ppl']:+.2f}" if v["ppl"] is not None else "-"})
        t = m["test"]
        tests.append({"method": m["method"],
                      "within - cross [95% CI]": f"{transfer_estimate(t):+.3f} [{t['ci_low']:+.3f}, "
                                                 f"{t['ci_high']:+.3f}]" if t.get("ci_low") is not None else "-",
                      "p": f"{t['p_value']:.3f}" if t.get("p_value") is not None else "-",
                      "p (BH over methods)": f"{m['test_p_adjusted']:.3f}" if np.isfinite(m["test_p_adjusted"])
                      else "-",
                      "detectable at 80% power": f"{t['min_detectable']:.3f}" if t.get("min_detectable") else "-",
                      "units per row": ", ".join(f"{c} {n}" for c, n in m["units"].items()),
                      "within p (BH)": f"{m['within_p_adjusted']:.3f}" if np.isfinite(m["within_p_adjusted"]) else "-",
                      "TOST p": f"{t['tost']['p_value']:.3f}" if t.get("tost") else "-",
                      "reading": reading(m)})
    parts += ["## Absolute effects per method (mean over cells)", "", markdown_table(effects), "",
              "## Does the selection beat its controls? (diagonal cells)", "", markdown_table(beats), "",
              "## The transfer question: within-context minus cross-context removal", "", markdown_table(tests), ""]
    for step in sorted((study / "steps").iterdir()):
        lv = step / "levels" / "result.json"
        if lv.exists():
            rows = json.loads(lv.read_text()).get("tests", [])
            parts += [f"## Generalization levels, `{step.name}` (same prompts: each selection template, held-out "
                      "names; BH over the step's tests)", "",
                      markdown_table([{"context": r["context"], "comparison": r["comparison"],
                                       "estimate [95% CI]": _ci(r), "p (BH)": f"{r['p_adjusted']:.3f}",
                                       "detectable": f"{r['min_detectable']:.3f}", "templates": r["n_templates"]}
                                      for r in rows]), ""]
    work_path = study / "work.json"
    if work_path.exists():
        w = json.loads(work_path.read_text())
        parts += ["## Work", "", f"{w['jobs']} jobs; total work {w['total_work_seconds']:.0f} s, critical path "
                  f"{w['critical_path_seconds']:.0f} s; this run: {w['computed_now']} computed, {w['reused']} reused, "
                  f"{w['workers']} workers x {w['threads_per_job']} thread(s), wall {w['wall_seconds']:.0f} s.", "",
                  markdown_table([{"job kind": k, "jobs": v["jobs"], "seconds (sum)": f"{v['seconds']:.0f}",
                                   "seconds (longest)": f"{v['max']:.0f}"} for k, v in w["by_kind"].items()]), ""]
    return "\n".join(parts), methods


def reading(m: dict) -> str:
    """What a method's transfer test allows one to say, in the order the checks apply."""
    t = m["test"]
    empty = [c for c, n in m["units"].items() if n == 0]
    if empty:
        return f"selected no unit on {', '.join(empty)}: nothing to compare"
    if not np.isfinite(m["within_p_adjusted"]) or m["within_p_adjusted"] >= 0.05:
        return "no within-context effect after BH: no transfer question"
    margin = t["tost"]["margin"] if t.get("tost") else None
    if t.get("tost", {}).get("equivalent"):
        return f"transfers: equivalent within ±{margin:g}"
    if t.get("ci_low") is not None and (t["ci_low"] > 0 or t["ci_high"] < 0):
        return "context-specific: within - cross excludes 0"
    return f"cannot tell (detectable {t['min_detectable']:.3f})"


def plot_tests(methods: list[dict]):
    """Left: mean gap removed within and across contexts (95% CIs). Right: their difference, with the band the
    test cannot tell from 0 at 80% power."""
    fig, (ax0, ax) = plt.subplots(1, 2, figsize=(12, 0.55 * len(methods) + 1.6), sharey=True,
                                  gridspec_kw={"width_ratios": [1, 1]})
    y = np.arange(len(methods))[::-1]
    for yi, m in zip(y, methods, strict=True):
        for e, dy, face, lab in ((m["within"], 0.12, "C0", "within context"),
                                 (m["cross"], -0.12, "white", "cross context")):
            if e is None:
                continue
            ax0.errorbar(e["estimate"], yi + dy, xerr=[[e["estimate"] - e["ci_low"]], [e["ci_high"] - e["estimate"]]],
                         fmt="o", color="C0", mfc=face, capsize=2, label=lab if yi == y[0] else None)
        t = m["test"]
        if t.get("ci_low") is None:
            continue
        est, lo, hi, mdd = transfer_estimate(t), t["ci_low"], t["ci_high"], t["min_detectable"]
        sig = m["test_p_adjusted"] < 0.05
        ax.fill_betweenx([yi - 0.3, yi + 0.3], -mdd, mdd, color="0.9", lw=0)
        ax.errorbar(est, yi, xerr=[[est - lo], [hi - est]], fmt="o", color="C3" if sig else "C0", capsize=3)
    for a in (ax0, ax):
        a.axvline(0, color="k", lw=0.8)
    ax0.set_yticks(y)
    ax0.set_yticklabels([m["method"] for m in methods], fontsize=8)
    ax0.set_xlabel("gap removed (log-odds), mean over cells, 95% CI")
    ax0.set_title("Does the fix work?\n(filled: selected and evaluated on one context; hollow: another)", fontsize=9)
    ax0.legend(fontsize=7, frameon=False)
    ax.set_xlabel("within-context minus cross-context gap removed, 95% CI")
    ax.set_title("Does it transfer less than it works in context?\n(grey: below what the test detects at 80% "
                 "power; red: significant after BH)", fontsize=9)
    fig.tight_layout()
    return fig


def summary_figure(study: Path, methods: list[dict]):
    """The study's methods summary figure, redrawn from ``study/steps/*/summary.json``; the within- and
    cross-context CIs come from this script's contrasts (``methods``) where a summary predates them."""
    names = json.loads((study / "steps" / "index.json").read_text())["steps"]
    steps = [SimpleNamespace(name=n, title=n) for n in names if n not in ("baseline", "summary")]
    numbers: list[dict] = []
    summary_rows(study, steps, numbers)  # type: ignore[arg-type]
    by_title = {m["method"]: m for m in methods}
    for row in numbers:
        m = by_title.get(row["method"])
        for key in ("within", "cross"):
            if m and not row.get(f"{key}_ci"):
                row[f"{key}_ci"] = [m[key]["ci_low"], m[key]["ci_high"]]
    axis = json.loads((study / "axis_choice.json").read_text())["axis"]
    return plot_methods_summary(numbers, axis)


def side_by_side(studies: dict[str, list[dict]]) -> str:
    """One row per method and model: the same columns for every model, and whether the readings agree."""
    rows = []
    titles = list(dict.fromkeys(m["method"] for ms in studies.values() for m in ms))
    agree = []
    for title in titles:
        readings = []
        for label, ms in studies.items():
            m = next((x for x in ms if x["method"] == title), None)
            if m is None:
                rows.append({"method": title, "model": label, "reading": "not run"})
                continue
            t = m["test"]
            readings.append(reading(m))
            rows.append({"method": title, "model": label,
                         "units per row": ", ".join(f"{c} {n}" for c, n in m["units"].items()),
                         "within [95% CI]": _ci(m["within"]), "cross [95% CI]": _ci(m["cross"]) if m["cross"] else "-",
                         "within - cross [95% CI]": (f"{transfer_estimate(t):+.3f} [{t['ci_low']:+.3f}, "
                                                     f"{t['ci_high']:+.3f}]") if t.get("ci_low") is not None else "-",
                         "detectable": f"{t['min_detectable']:.3f}" if t.get("min_detectable") else "-",
                         "within p (BH)": f"{m['within_p_adjusted']:.3f}",
                         "TOST p": f"{t['tost']['p_value']:.3f}" if t.get("tost") else "-",
                         "Δppl": f"{m['ppl']:+.2f}" if m["ppl"] is not None else "-", "reading": reading(m)})
        agree.append(f"{title}: {'the same reading' if len(set(readings)) == 1 and len(readings) == len(studies) else 'different readings'}")
    return markdown_table(rows) + "\n\n" + "; ".join(agree) + ".\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--beside", type=Path, nargs="*", default=[],
                    help="other finished studies (e.g. the same study on another model): with --labels and --table, "
                         "one table with every study's methods side by side")
    ap.add_argument("--labels", nargs="*", default=[], help="a label per study, the first study's first")
    ap.add_argument("--table", type=Path, default=None, help="where the side-by-side table goes (Markdown)")
    ap.add_argument("--figure", type=Path, default=None)
    ap.add_argument("--summary-figure", type=Path, default=None,
                    help="also redraw the study's methods summary (gap removed within and across contexts with 95%% "
                         "CIs, perplexity change) from the committed step summaries")
    args = ap.parse_args()
    if not (args.study / "steps" / "baseline" / "summary.json").exists():
        raise SystemExit(f"{args.study} is not a finished study folder (no steps/baseline/summary.json)")
    text, methods = findings(args.study)
    atomic_write_text(text, args.study / "findings.md")
    atomic_write_text(json.dumps(methods, indent=1, default=float), args.study / "findings.json")
    if args.figure:
        atomic_savefig(plot_tests(methods), args.figure)
    if args.summary_figure:
        atomic_savefig(summary_figure(args.study, methods), args.summary_figure)
    print(text)
    if args.beside:
        if len(args.labels) != 1 + len(args.beside) or args.table is None:
            raise SystemExit("--beside needs one --labels entry per study (the first study's first) and --table")
        studies = {args.labels[0]: methods}
        for label, other in zip(args.labels[1:], args.beside, strict=True):
            studies[label] = findings(other)[1]
        atomic_write_text(side_by_side(studies), args.table)


if __name__ == "__main__":
    main()
