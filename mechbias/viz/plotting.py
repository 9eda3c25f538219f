"""Figures (matplotlib). Every function returns the figure; nothing is shown or saved here.

Each figure carries its units and the meaning of its sign in the labels, so a
reader can interpret it without the code.
"""

from __future__ import annotations

import textwrap

import numpy as np


def pyplot():
    """matplotlib's pyplot, imported on first use (so ``import mechbias`` stays light)."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        try:
            import matplotlib.pyplot as plt
        except Exception:
            matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


AXIS_COLORS = {"race": "#1f77b4", "gender": "#d62728"}


def plot_bias(result, ax=None):
    """Forest plot: gap (group A - group B) with 95% CI per context, one marker colour per axis (and one
    marker shape per name roster when the rows use several)."""
    plt = pyplot()
    rows = result.rows
    contexts = list(dict.fromkeys(r["context"] for r in rows))
    series = list(dict.fromkeys((r["axis"], r.get("roster", "")) for r in rows))
    several = len({ros for _, ros in series}) > 1
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 0.75 + 0.62 * len(contexts) * max(1, len(series)) / 1.4))
    else:
        fig = ax.figure
    offsets = np.linspace(-0.24, 0.24, len(series)) if len(series) > 1 else [0.0]
    rosters = list(dict.fromkeys(ros for _, ros in series))
    for k, (axis, roster) in enumerate(series):
        marker = "osD^v"[rosters.index(roster) % 5]
        for i, c in enumerate(contexts):
            match = [r for r in rows if r["context"] == c and r["axis"] == axis and r.get("roster", "") == roster]
            if not match:
                continue
            r = match[0]
            y = i + offsets[k]
            color = AXIS_COLORS.get(axis, f"C{k}")
            ax.plot([r["ci_low"], r["ci_high"]], [y, y], color=color, lw=2)
            label = f"{axis}: {r['group_a']} - {r['group_b']}"
            if several:
                label += f" ({roster}, {r['n_names_a'] + r['n_names_b']} names)"
            ax.plot(r["gap"], y, marker, color=color, mfc=color if r["significant"] else "white", ms=7,
                    label=label if i == 0 else None)
    ax.axvline(0, color="k", lw=0.8, ls="--")
    ax.set_yticks(range(len(contexts)))
    ax.set_yticklabels(contexts)
    ax.invert_yaxis()
    ax.set_xlabel("bias gap: mean log-odds(favourable answer), group A minus group B")
    ax.set_title("Baseline bias per context (95% CI over names and templates;\nfilled = CI excludes 0)",
                 fontsize=10)
    ax.legend(loc="best", fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_transfer(tm, title: str | None = None):
    """Transfer matrix: the change of the gap per cell with its 95% CI, each control beside it.

    Colour: the bias removed (``gap_removed``: positive = the gap moved toward 0), in log-odds units;
    text: the gap change (after - before) and its CI; * = the CI excludes 0 after Benjamini-Hochberg
    (p_adjusted < 0.05) over the matrix's cells. Row labels carry the capability cost."""
    plt = pyplot()
    panels = [("selected", None)] + [(f"control: {k}", k) for k in dict.fromkeys(k for c in tm.cells for k in c.controls)]
    nr, nc = len(tm.rows), len(tm.cols)
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 1.55 * nc * len(panels) + 1.0, 1.8 + 0.85 * nr),
                             squeeze=False)
    base = {b["context"]: b for b in tm.baseline}
    vmax = max([abs(b["gap"]) for b in tm.baseline] + [1e-3])
    im = None
    for ax, (name, ctl) in zip(axes[0], panels, strict=True):
        mat = np.full((nr, nc), np.nan)
        for i, r in enumerate(tm.rows):
            for j, c in enumerate(tm.cols):
                cell = tm.cell(r, c)
                e = cell.effect if ctl is None else cell.controls.get(ctl)
                if e is None:
                    continue
                mat[i, j] = e.gap_removed
                padj = e.p_adjusted if e.p_adjusted is not None else e.p_value
                star = "*" if padj is not None and padj < 0.05 else ""
                ax.text(j, i, f"{e.gap_change:+.3f}{star}\n[{e.ci_low:+.3f}, {e.ci_high:+.3f}]", ha="center",
                        va="center", fontsize=7, color="w" if abs(e.gap_removed) > 0.6 * vmax else "k")
        im = ax.imshow(np.clip(mat, -vmax, vmax), cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_xticks(range(nc))
        ax.set_xticklabels([f"{c}\ngap {base[c]['gap']:+.2f}{'' if base[c]['significant'] else ' (n.s.)'}"
                            if c in base else c for c in tm.cols], fontsize=8)
        ax.set_yticks(range(nr))
        key = "perplexity_change" if ctl is None else f"{ctl}_perplexity_change"
        labels = [f"{r}\n(Δppl {i[key]:+.2f})" if i.get(key) is not None else r for r, i in zip(tm.rows, tm.row_info, strict=True)]
        ax.set_yticklabels(labels if len(labels) == nr else tm.rows, fontsize=8)
        ax.set_xlabel("evaluated on (held-out names and templates)")
        ax.set_ylabel("selected on")
        ax.set_title(name, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes[0, -1], fraction=0.05).set_label("bias removed (log-odds; + = gap toward 0)",
                                                                  fontsize=8)
    t = tm.transfer_test or {}
    sub = ""
    est = t.get("within_minus_cross", t.get("diagonal_minus_offdiagonal"))
    if est is not None:
        sub = (f"\nwithin - cross context (within columns): {est:+.3f} [{t['ci_low']:+.3f}, "
               f"{t['ci_high']:+.3f}], detectable at 80% power: {t['min_detectable']:.3f}")
    fig.suptitle((title or f"{tm.method}: cross-context transfer ({tm.axis})") + "; cell: gap change [95% CI], "
                 "* = BH-adjusted p < 0.05" + sub, fontsize=9)
    fig.tight_layout()
    return fig


def plot_levels(levels, ax=None):
    """Mean bias removed (log-odds, + = gap toward 0) at L0 / L1 / L2 per context, on the same prompts."""
    plt = pyplot()
    import pandas as pd

    df = pd.DataFrame(levels.rows)
    ctxs = list(dict.fromkeys(df["context"]))
    order = ["L0", "L1", "L2"]
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.6))
    else:
        fig = ax.figure
    width = 0.8 / max(len(ctxs), 1)
    for k, c in enumerate(ctxs):
        sub = df[df["context"] == c]
        means = [sub[sub["level"] == lv]["gap_removed"].mean() for lv in order]
        rand = [sub[sub["level"] == lv]["random_gap_removed"].astype(float).mean() for lv in order]
        x = np.arange(len(order)) + (k - (len(ctxs) - 1) / 2) * width
        ax.bar(x, means, width, label=c, color=f"C{k}")
        ax.scatter(x, rand, marker="_", s=120, color="k", zorder=3, label="random control" if k == 0 else None)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(["L0: selected on\nthis template", "L1: selected on\nall its templates",
                        "L2: selected on\nanother context"])
    ax.set_ylabel("bias removed (log-odds)\nsame prompts: each template, held-out names")
    ax.set_title(f"{levels.unit} pruning: generalization levels ({levels.axis})", fontsize=10)
    ax.legend(fontsize=7, frameon=False, ncol=2)
    fig.tight_layout()
    return fig


def plot_curves(curves, title: str | None = None):
    """Pruning curves: the change of the gap (with its CI) and the perplexity change against the number pruned."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for k, c in enumerate(curves):
        ks = [r["n_components"] for r in c.rows]
        lab = f"{c.unit} ({c.context})"
        axes[0].plot(ks, [r["gap_change"] for r in c.rows], marker="o", color=f"C{k}", label=lab)
        axes[0].fill_between(ks, [r["ci_low"] for r in c.rows], [r["ci_high"] for r in c.rows], color=f"C{k}", alpha=0.15)
        axes[0].axhline(-c.rows[0]["gap_before"], color=f"C{k}", lw=0.6, ls=":")
        axes[1].plot(ks, [r["perplexity_change"] for r in c.rows], marker="o", color=f"C{k}", label=lab)
        if c.rows[0].get("random_gap_change") is not None:
            axes[0].plot(ks, [r["random_gap_change"] for r in c.rows], ls="--", color=f"C{k}", alpha=0.7)
            axes[1].plot(ks, [r["random_perplexity_change"] for r in c.rows], ls="--", color=f"C{k}", alpha=0.7)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    all_k = sorted({r["n_components"] for c in curves for r in c.rows})
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(all_k)  # label exactly the sizes that were measured
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("components pruned")
        ax.grid(alpha=0.3)
    axes[0].axhline(0, color="k", lw=0.8)
    axes[0].set_ylabel("gap change (held out, log-odds)\ndotted: the change that removes the gap")
    axes[1].set_ylabel("perplexity change (neutral text)")
    ppl = [r.get(k) for c in curves for r in c.rows for k in ("perplexity_change", "random_perplexity_change")]
    if min(v for v in ppl if v is not None) > 0:
        axes[1].set_yscale("log")
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle(title or "Pruning curves (dashed: random control of the same size)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_ground_truth(gt):
    """Left: precision@k of the planted units per method and context (95% CIs; chance as a black tick).
    Right: each method's transfer cells against the oracle's (gap removed, log-odds; filled = same context).
    A result without unit recovery (a run with ``--no-recovery``) or without transfer cells gets one panel."""
    plt = pyplot()
    import pandas as pd

    df = pd.DataFrame([r for r in gt.rows if "precision" in r])
    has_tr, has_rec = bool(gt.transfer), not df.empty
    if not (has_tr or has_rec):
        raise ValueError("the ground-truth result holds neither unit recovery nor transfer cells to plot")
    both = has_tr and has_rec
    fig, axes = plt.subplots(1, 2 if both else 1, figsize=(13 if both else 6.5, 4.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1.5, 1]} if both else None)
    if has_rec:
        _plot_unit_recovery(axes[0, 0], df)
    if has_tr:
        _plot_transfer_vs_oracle(axes[0, 1 if both else 0], pd.DataFrame(gt.transfer), gt.meta)
    fig.tight_layout()
    return fig


def _plot_unit_recovery(ax, df) -> None:
    """Precision@k of planted units per method and context, with chance marks."""
    if "units" not in df:
        df["units"] = "neurons"
    df["label"] = [f"{m} [{u}]" if u == "heads" else m for m, u in zip(df["method"], df["units"], strict=True)]
    labels = list(dict.fromkeys(df["label"]))
    ctxs = list(dict.fromkeys(df["context"]))
    width = 0.8 / max(len(ctxs), 1)
    chance_key = "chance_precision" if "chance_precision" in df else "random_precision"
    for k, c in enumerate(ctxs):
        sub = [df[(df["label"] == m) & (df["context"] == c)] for m in labels]
        x = np.arange(len(labels)) + (k - (len(ctxs) - 1) / 2) * width
        vals = np.array([float(s["precision"].iloc[0]) if len(s) else np.nan for s in sub])
        ax.bar(x, vals, width, label=c, color=f"C{k}")
        if "precision_ci" in df:
            ci = np.array([s["precision_ci"].iloc[0] if len(s) else [np.nan, np.nan] for s in sub], dtype=float)
            ax.errorbar(x, vals, yerr=[vals - ci[:, 0], ci[:, 1] - vals], fmt="none", color="k", lw=0.8)
        chance = [float(s[chance_key].iloc[0]) if len(s) else np.nan for s in sub]
        ax.scatter(x, chance, marker="_", s=120, color="k", zorder=3, label="chance" if k == 0 else None)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([textwrap.fill(m, 18) for m in labels], fontsize=7, rotation=0)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("precision@k of planted units")
    ax.set_title("Unit recovery (k = planted units of that type in the context)", fontsize=9)
    ax.legend(fontsize=7, frameon=False)


def _plot_transfer_vs_oracle(ax, tr, meta: dict) -> None:
    """Each method's transfer cells against the oracle's (filled: same context, hollow: other context)."""
    xk, yk = ("oracle_gap_removed", "gap_removed") if "oracle_gap_removed" in tr else ("oracle_reduction",
                                                                                      "reduction")
    stats = {m["method"]: m for m in meta.get("matrices", [])}
    for k, (name, sub) in enumerate(tr[tr["method"] != "oracle"].groupby("method", sort=False)):
        st = stats.get(name)
        lab = f"{name} (r {st['pearson']:+.2f}, MAE {st['mae']:.2f})" if st else name
        diag = sub["selected_on"] == sub["evaluated_on"]
        ax.scatter(sub[xk][diag], sub[yk][diag], color=f"C{k}", s=30, label=lab)
        ax.scatter(sub[xk][~diag], sub[yk][~diag], facecolors="none", edgecolors=f"C{k}", s=30)
    vals = tr[[xk, yk]].to_numpy(dtype=float)
    lim = [min(-0.1, float(np.nanmin(vals))) - 0.05, float(np.nanmax(vals)) + 0.1]
    ax.plot(lim, lim, color="k", lw=0.8, ls="--")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("oracle: gap removed by zeroing the row context's planted units")
    ax.set_ylabel("method: gap removed")
    ax.set_title("Transfer cells vs oracle (filled: same context, hollow: other context)", fontsize=9)
    ax.legend(fontsize=6.5, frameon=False, loc="upper left")


def plot_methods_summary(rows, axis: str = ""):
    """Methods side by side: the gap removed within and across contexts with 95% CIs (the random control's
    removal as markers), and the perplexity change. ``rows``: ``method``, ``within``, ``within_ci``, ``cross``,
    ``cross_ci``, ``random_within``, ``random_cross``, ``ppl``, ``ppl_random``."""
    plt = pyplot()
    names = [textwrap.fill(r["method"], 16) for r in rows]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.6), gridspec_kw={"width_ratios": [2.2, 1]})
    ax = axes[0]
    for dx, key, color, label in ((-0.2, "within", "#1f77b4", "same context (held out)"),
                                  (0.2, "cross", "#ff7f0e", "other contexts")):
        vals = [np.nan if r.get(key) is None else r[key] for r in rows]
        lo = [v - r[f"{key}_ci"][0] if r.get(f"{key}_ci") and r[f"{key}_ci"][0] is not None else 0.0
              for v, r in zip(vals, rows, strict=True)]
        hi = [r[f"{key}_ci"][1] - v if r.get(f"{key}_ci") and r[f"{key}_ci"][1] is not None else 0.0
              for v, r in zip(vals, rows, strict=True)]
        ax.bar(x + dx, vals, 0.4, color=color, label=label, yerr=[lo, hi], capsize=3,
               error_kw={"elinewidth": 1, "ecolor": "#333333"})
        ax.scatter(x + dx, [r.get(f"random_{key}") for r in rows], marker="_", s=300, color="k", zorder=3,
                   label="random control" if key == "within" else None)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=7.5)
    ax.set_ylabel("gap removed (log-odds), 95% CI\n(positive: the bias shrank)")
    ax.set_title(f"Bias removed by method ({axis})", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0) if len(rows) > 6 else None)
    ax = axes[1]
    ax.barh(x, [r["ppl"] for r in rows], color="#2ca02c", label="selected")
    ax.scatter([r["ppl_random"] for r in rows], x, marker="|", s=200, color="k", zorder=3, label="random control")
    ax.set_yticks(x)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xscale("symlog", linthresh=1.0)  # costs span 0.01 to 100
    ax.set_xlabel("perplexity change (neutral text; symlog)")
    ax.set_title("Capability cost", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.tight_layout()
    return fig


def plot_generation(self, ax=None):
    """Histogram of the parsed numeric answers per group."""
    plt = pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    else:
        fig = ax.figure
    groups = sorted({p["group"] for p in self.prompts})
    for g in groups:
        rows = [i for i, p in enumerate(self.prompts) if p["group"] == g]
        v = self.values[rows].flatten().numpy()
        v = v[np.isfinite(v)]
        if len(v):
            ax.hist(v, bins=30, alpha=0.5, label=f"{g} (n={len(v)})")
    ax.set_xlabel("parsed numeric answer")
    ax.set_ylabel("samples")
    ax.set_title(f"Generated answers, SMD = {self.summary.get('smd', float('nan')):.2f}", fontsize=10)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_crows(self):
    """CrowS-Pairs score overall and per bias type, with 95% CIs (50 = unbiased)."""
    plt = pyplot()
    types = list(self.by_type)
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.4 * (len(types) + 1)))
    ys = np.arange(len(types) + 1)
    vals = [self.score] + [self.by_type[t]["score"] for t in types]
    lo = [self.ci_low] + [self.by_type[t]["ci_low"] for t in types]
    hi = [self.ci_high] + [self.by_type[t]["ci_high"] for t in types]
    ax.errorbar(vals, ys, xerr=[np.array(vals) - lo, np.array(hi) - vals], fmt="o", color="k", capsize=3)
    ax.axvline(50, color="r", ls="--", lw=1)
    ax.set_yticks(ys)
    ax.set_yticklabels(["all", *types])
    ax.invert_yaxis()
    ax.set_xlabel("% pairs where the stereotypical sentence is more likely (50 = unbiased)")
    fig.tight_layout()
    return fig
