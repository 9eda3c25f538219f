"""Figures (matplotlib). Every function returns the figure; nothing is shown or saved here.

Each figure carries its units and the meaning of its sign in the labels, so a
reader can interpret it without the code.
"""

from __future__ import annotations

import textwrap

import numpy as np
import torch


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        try:
            import matplotlib.pyplot as plt  # noqa: F401
        except Exception:
            matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


AXIS_COLORS = {"race": "#1f77b4", "gender": "#d62728"}


def plot_bias(result, ax=None):
    """Forest plot: gap (group A - group B) with 95% CI per context, one marker colour per axis."""
    plt = _plt()
    rows = result.rows
    contexts = list(dict.fromkeys(r["context"] for r in rows))
    axes_names = list(dict.fromkeys(r["axis"] for r in rows))
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 0.75 + 0.62 * len(contexts) * max(1, len(axes_names)) / 1.4))
    else:
        fig = ax.figure
    offsets = np.linspace(-0.18, 0.18, len(axes_names)) if len(axes_names) > 1 else [0.0]
    for k, axis in enumerate(axes_names):
        for i, c in enumerate(contexts):
            match = [r for r in rows if r["context"] == c and r["axis"] == axis]
            if not match:
                continue
            r = match[0]
            y = i + offsets[k]
            color = AXIS_COLORS.get(axis, f"C{k}")
            ax.plot([r["ci_low"], r["ci_high"]], [y, y], color=color, lw=2)
            ax.plot(r["gap"], y, "o", color=color, mfc=color if r["significant"] else "white", ms=7,
                    label=f"{axis}: {r['group_a']} - {r['group_b']}" if i == 0 else None)
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


def plot_layer_histogram(counts, ax=None, title: str = ""):
    """Bar chart of selected neurons per layer."""
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 2.6))
    else:
        fig = ax.figure
    ax.bar(range(len(counts)), counts, color="#444")
    ax.set_xlabel("layer")
    ax.set_ylabel("selected neurons")
    ax.set_xlim(-0.6, len(counts) - 0.4)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_attribution(result, selection=None, title: str | None = None):
    """IG² layer x neuron heatmap of the mean attribution, with the per-layer histogram of selected neurons."""
    plt = _plt()
    agg = result.aggregate().numpy()
    fig, axes = plt.subplots(2, 1, figsize=(9, 6.2), gridspec_kw={"height_ratios": [3, 1.2]})
    lim = float(np.percentile(np.abs(agg), 99.9)) or 1e-12
    im = axes[0].imshow(agg, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    axes[0].set_ylabel("layer")
    axes[0].set_xlabel("MLP neuron (blocks.l.mlp.hook_post index)")
    cb = fig.colorbar(im, ax=axes[0], fraction=0.03, pad=0.01)
    cb.set_label("mean IG² (towards the biased association)", fontsize=8)
    if selection is not None and len(selection):
        ls, ns = zip(*selection.as_pairs())
        axes[0].scatter(ns, ls, s=18, facecolors="none", edgecolors="k", linewidths=0.8, label="selected")
        axes[0].legend(loc="upper right", fontsize=8)
        counts = selection.layer_histogram()
    else:
        counts = np.zeros(agg.shape[0], dtype=int)
    axes[0].set_title(title or f"IG² attributions ({len(result.units)} units; colour clipped at the 99.9th percentile)",
                      fontsize=10)
    plot_layer_histogram(counts, ax=axes[1], title="selected neurons per layer")
    fig.tight_layout()
    return fig


def plot_verification(result, ax=None):
    """Relative change of the attributed gap when suppressing / amplifying neuron sets."""
    plt = _plt()
    rows = result.rows
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.4))
    else:
        fig = ax.figure
    sets = list(dict.fromkeys(r["neurons"] for r in rows))
    ops = ["suppress", "amplify"]
    width = 0.8 / max(len(sets), 1)
    colors = {"IG2": "#d62728", "IG": "#ff7f0e"}
    for k, name in enumerate(sets):
        for j, op in enumerate(ops):
            match = [r for r in rows if r["neurons"] == name and r["operation"] == op]
            if not match:
                continue
            r = match[0]
            x = j + (k - (len(sets) - 1) / 2) * width
            ax.bar(x, 100 * r["relative_change"], width, color=colors.get(name, "#7f7f7f"),
                   label=name if j == 0 else None)
            ax.errorbar(x, 100 * r["relative_change"],
                        yerr=[[100 * (r["relative_change"] - r["ci_low"])], [100 * (r["ci_high"] - r["relative_change"])]],
                        color="k", capsize=3, lw=1)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(ops)))
    ax.set_xticklabels(["suppress (x0)", "amplify (x2)"])
    ax.set_ylabel("change of mean gap (%)")
    ax.set_title("Verification on held-out prompts (95% CI over units)", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot_overlap(df, title: str = "Overlap of selected neurons between contexts"):
    """Heatmap of Jaccard overlap; each cell shows the value, the shared count and the chance level."""
    plt = _plt()
    names = list(dict.fromkeys(df["a"]))
    n = len(names)
    mat = np.full((n, n), np.nan)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * n, 1.2 + 1.1 * n))
    for _, r in df.iterrows():
        i, j = names.index(r["a"]), names.index(r["b"])
        mat[i, j] = r["jaccard"]
    im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=max(0.05, np.nanmax(mat[~np.eye(n, dtype=bool)]) if n > 1 else 1))
    for _, r in df.iterrows():
        i, j = names.index(r["a"]), names.index(r["b"])
        if i == j:
            txt = f"n={r['n_a']}"
        else:
            txt = f"{r['jaccard']:.2f}\n{r['shared']} shared\nchance {r['chance']:.3f}"
        ax.text(j, i, txt, ha="center", va="center", fontsize=7, color="w" if mat[i, j] < 0.6 * np.nanmax(mat) else "k")
    ax.set_xticks(range(n))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_yticks(range(n))
    ax.set_yticklabels(names)
    fig.colorbar(im, ax=ax, fraction=0.04).set_label("Jaccard")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _runs(positions):
    runs, cur = [], []
    for p in sorted(positions):
        if cur and p != cur[-1] + 1:
            runs.append(cur)
            cur = []
        cur.append(p)
    if cur:
        runs.append(cur)
    return runs


def canonical_layout(tokens: list[str], diff: list[int]) -> tuple[tuple[str, ...], list[int]]:
    """Slot labels and positions for one pair: each name span (differing tokens) collapses to one
    slot at its last token, labelled ``<name>``; other tokens keep their text."""
    in_run = {p for r in _runs(diff) for p in r}
    ends = {r[-1] for r in _runs(diff)}
    labels, pos = [], []
    for p, t in enumerate(tokens):
        if p in in_run and p not in ends:
            continue
        labels.append("<name>" if p in ends else t)
        pos.append(p)
    return tuple(labels), pos


def patching_matrix(result, template: int | None = None):
    """Mean effect over the pairs of one template, ``[layers, slots]``, with slot labels."""
    groups: dict[tuple, list[int]] = {}
    for i, info in enumerate(result.pairs):
        if template is not None and info["template"] != template:
            continue
        labels, _ = canonical_layout(info["tokens"], info["diff"])
        groups.setdefault((info["template"], labels), []).append(i)
    if not groups:
        raise ValueError(f"no pairs for template {template}")
    (tpl, labels), idx = max(groups.items(), key=lambda kv: len(kv[1]))
    eff = result.effect()
    mats = []
    for i in idx:
        _, pos = canonical_layout(result.pairs[i]["tokens"], result.pairs[i]["diff"])
        mats.append(eff[i][:, pos])
    return torch.stack(mats).mean(0).numpy(), list(labels), tpl, len(idx)


def plot_patching(result, template: int | None = None):
    """Heatmap of a patching result: layer x position (token labels) or layer x head."""
    plt = _plt()
    comp = result.component
    ctx = result.meta.get("context", "")
    if comp in ("resid_pre", "attn_out", "mlp_out"):
        mat, labels, tpl, n = patching_matrix(result, template)
        fig, ax = plt.subplots(figsize=(max(6, 0.42 * len(labels) + 2), 6.5))
        lim = float(np.abs(mat).max()) or 1e-9
        im = ax.imshow(mat, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([l.replace("Ġ", " ") for l in labels], rotation=70, fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title(f"{comp} patching ({result.direction}), {ctx} template {tpl}, mean of {n} pairs\n"
                     f"effect on logit(positive) - logit(negative); <name> = last token of the name", fontsize=9)
    else:
        m = result.mean_effect().numpy()
        if m.ndim == 3:  # heads by position: strongest position per head
            m = m[np.arange(m.shape[0])[:, None], np.abs(np.nan_to_num(m)).argmax(1), np.arange(m.shape[2])[None, :]]
        fig, ax = plt.subplots(figsize=(1.6 + 0.45 * m.shape[1], 6.5))
        lim = float(np.nanmax(np.abs(m))) or 1e-9
        im = ax.imshow(m, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_xlabel(result.axes[-1])
        ax.set_ylabel("layer")
        ax.set_xticks(range(m.shape[1]))
        ax.set_title(f"{comp} patching ({result.direction}), {ctx}, mean of {result.values.shape[0]} pairs\n"
                     "effect on logit(positive) - logit(negative)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02).set_label("mean effect (log-odds)", fontsize=8)
    fig.tight_layout()
    return fig


def plot_grid(mat, axes, title: str):
    plt = _plt()
    m = np.asarray(mat)
    if m.ndim == 3:
        m = np.nanmax(np.abs(m), axis=1)
    fig, ax = plt.subplots(figsize=(7, 5))
    lim = float(np.nanmax(np.abs(m))) or 1e-9
    im = ax.imshow(m, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_xlabel(axes[-1])
    ax.set_ylabel(axes[0])
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return fig


def plot_layer_profiles(profiles: dict, title: str, ylabel: str = "largest |mean effect| in layer (signed)"):
    """Layer profiles of several contexts side by side (one line per context)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for k, (name, prof) in enumerate(profiles.items()):
        ax.plot(range(len(prof)), prof, marker="o", ms=3, label=name, color=f"C{k}")
    ax.axhline(0, color="k", lw=0.7)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_correlation_matrix(df, title: str, value: str = "spearman"):
    plt = _plt()
    names = list(dict.fromkeys(df["a"]))
    n = len(names)
    mat = np.zeros((n, n))
    for _, r in df.iterrows():
        mat[names.index(r["a"]), names.index(r["b"])] = r[value]
    fig, ax = plt.subplots(figsize=(1.8 + 1.1 * n, 1.4 + 1.0 * n))
    im = ax.imshow(mat, cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(n))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_yticks(range(n))
    ax.set_yticklabels(names)
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_transfer(tm, title: str | None = None):
    """Transfer matrix: the change of the gap per cell with its 95% CI, each control beside it.

    Colour: the bias removed (``gap_removed``: positive = the gap moved toward 0), in log-odds units;
    text: the gap change (after - before) and its CI; * = the CI excludes 0 after Benjamini-Hochberg
    (p_adjusted < 0.05) over the matrix's cells. Row labels carry the capability cost."""
    plt = _plt()
    panels = [("selected", None)] + [(f"control: {k}", k) for k in (tm.cells[0].controls if tm.cells else {})]
    nr, nc = len(tm.rows), len(tm.cols)
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 1.55 * nc * len(panels) + 1.0, 1.8 + 0.85 * nr),
                             squeeze=False)
    base = {b["context"]: b for b in tm.baseline}
    vmax = max([abs(b["gap"]) for b in tm.baseline] + [1e-3])
    im = None
    for ax, (name, ctl) in zip(axes[0], panels):
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
        labels = [f"{r}\n(Δppl {i[key]:+.2f})" if i.get(key) is not None else r for r, i in zip(tm.rows, tm.row_info)]
        ax.set_yticklabels(labels if len(labels) == nr else tm.rows, fontsize=8)
        ax.set_xlabel("evaluated on (held-out names and templates)")
        ax.set_ylabel("selected on")
        ax.set_title(name, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes[0, -1], fraction=0.05).set_label("bias removed (log-odds; + = gap toward 0)",
                                                                  fontsize=8)
    t = tm.transfer_test or {}
    sub = ""
    if t.get("diagonal_minus_offdiagonal") is not None:
        sub = (f"\nwithin - cross context: {t['diagonal_minus_offdiagonal']:+.3f} [{t['ci_low']:+.3f}, "
               f"{t['ci_high']:+.3f}], detectable at 80% power: {t['min_detectable']:.3f}")
    fig.suptitle((title or f"{tm.method}: cross-context transfer ({tm.axis})") + "; cell: gap change [95% CI], "
                 "* = BH-adjusted p < 0.05" + sub, fontsize=9)
    fig.tight_layout()
    return fig


def plot_levels(levels, ax=None):
    """Mean bias removed (log-odds, + = gap toward 0) at L0 / L1 / L2 per context, on the same prompts."""
    plt = _plt()
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
    plt = _plt()
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


def plot_gradiend_feature(res):
    """Histogram of GRADIEND encoder values for group A, group B and neutral texts (held out)."""
    plt = _plt()
    ev = res.evaluation
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    if not ev:
        ax.text(0.5, 0.5, "feature not evaluated", ha="center")
        return fig
    groups = list(dict.fromkeys(v["group"] for v in ev["values"]))
    bins = np.linspace(-1, 1, 41)
    colors = {"neutral": "#7f7f7f"}
    for k, g in enumerate(groups):
        hs = [v["h"] for v in ev["values"] if v["group"] == g]
        st = ev["stats"][g]
        ax.hist(hs, bins=bins, alpha=0.6, color=colors.get(g, f"C{k}"),
                label=f"{g}: {st['mean']:+.2f} ± {st['sd']:.2f} (n={st['n']})")
    ax.axvline(0, color="k", lw=0.7)
    ax.set_xlabel("encoder value h (held-out names and templates; batches of texts)")
    ax.set_ylabel("batches")
    ax.set_title(f"GRADIEND feature, {res.context}/{res.axis}: AUC {ev.get('auc', float('nan')):.2f}, "
                 f"sign acc. {ev['sign_accuracy']:.2f}, "
                 f"Pearson {ev['pearson']:+.2f}", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot_gradiend_training(res):
    """GRADIEND learning curves per seed: training MSE per step, validation Pearson(h, group) and MSE per
    evaluation; the kept checkpoint of each seed marked."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    curve = res.meta.get("curve", [])
    chosen = res.meta.get("chosen_seed")
    for k, info in enumerate(res.seeds):
        s = info["seed"]
        lw = 1.8 if s == chosen else 0.9
        h = [x for x in res.history if x["seed"] == s]
        c = [x for x in curve if x["seed"] == s]
        axes[0].plot([x["step"] for x in h], [x["loss"] for x in h], color=f"C{k}", lw=lw, label=f"seed {s}")
        axes[1].plot([x["step"] for x in c], [abs(x["val_pearson"]) for x in c], "o-", ms=3, color=f"C{k}", lw=lw)
        axes[2].plot([x["step"] for x in c], [x["val_mse"] for x in c], "o-", ms=3, color=f"C{k}", lw=lw)
        for ax, key in ((axes[1], "val_pearson"), (axes[2], "val_mse")):
            v = abs(info[key]) if key == "val_pearson" else info[key]
            ax.scatter([info["best_step"]], [v], s=90, facecolors="none", edgecolors="k", zorder=5)
    axes[0].set_yscale("log")
    axes[0].set_title("training MSE (normalised coordinates)", fontsize=9)
    axes[1].set_title("validation |Pearson(h, group)|", fontsize=9)
    axes[1].set_ylim(0, 1.02)
    axes[2].set_yscale("log")
    axes[2].set_title("validation MSE", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8, frameon=False)
    fig.suptitle(f"GRADIEND training, {res.context}/{res.axis} (circle: kept checkpoint; thick: chosen seed)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_gradiend_grid(res):
    """The (h, alpha) grid of a GRADIEND edit: bias gap and perplexity, the chosen point circled."""
    plt = _plt()
    e = res.edit
    hs = sorted({p["h"] for p in e["grid"]})
    als = sorted({p["alpha"] for p in e["grid"]})
    gap = np.full((len(hs), len(als)), np.nan)
    ppl = np.full_like(gap, np.nan)
    for p in e["grid"]:
        gap[hs.index(p["h"]), als.index(p["alpha"])] = p["gap"]
        ppl[hs.index(p["h"]), als.index(p["alpha"])] = p["perplexity"] / e["perplexity_before"] - 1
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.9 + 0.45 * len(hs) + 1.2))
    lim = max(abs(np.nanmin(gap)), abs(np.nanmax(gap)), abs(e["gap_before"]))
    for ax, mat, title, cmap, kw in ((axes[0], gap, f"bias gap (before: {e['gap_before']:+.3f})", "RdBu_r",
                                      dict(vmin=-lim, vmax=lim)),
                                     (axes[1], 100 * ppl, "perplexity change (%)", "viridis",
                                      dict(vmin=0, vmax=max(1.0, min(100.0, float(np.nanmax(100 * ppl))))))):
        im = ax.imshow(mat, cmap=cmap, aspect="auto", **kw)
        ax.set_xticks(range(len(als)))
        ax.set_xticklabels([f"{a:g}" for a in als], rotation=60, fontsize=7)
        ax.set_yticks(range(len(hs)))
        ax.set_yticklabels([f"{h:g}" for h in hs], fontsize=7)
        ax.set_xlabel("alpha (learning rate of the edit)")
        ax.set_ylabel("h (feature value)")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
        if e.get("chosen"):
            c = e["chosen"]
            ax.scatter([als.index(c["alpha"])], [hs.index(c["h"])], s=160, facecolors="none", edgecolors="k", lw=2)
    fig.suptitle(f"GRADIEND edit grid, {res.context}/{res.axis} (circle: chosen, ppl rise <= "
                 f"{100 * e['max_ppl_increase']:.0f}%)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_ground_truth(gt):
    """Left: precision@k of the planted units per method and context (95% CIs; chance as a black tick).
    Right: each method's transfer cells against the oracle's (gap removed, log-odds; filled = same context)."""
    plt = _plt()
    import pandas as pd

    df = pd.DataFrame([r for r in gt.rows if "precision" in r])
    has_tr = bool(gt.transfer)
    fig, axes = plt.subplots(1, 2 if has_tr else 1, figsize=(13 if has_tr else 6.5, 4.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1.5, 1]} if has_tr else None)
    ax = axes[0, 0]
    if "units" not in df:
        df["units"] = "neurons"
    df["label"] = [f"{m} [{u}]" if u == "heads" else m for m, u in zip(df["method"], df["units"])]
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
    if has_tr:
        ax = axes[0, 1]
        tr = pd.DataFrame(gt.transfer)
        xk, yk = ("oracle_gap_removed", "gap_removed") if "oracle_gap_removed" in tr else ("oracle_reduction",
                                                                                          "reduction")
        stats = {m["method"]: m for m in gt.meta.get("matrices", [])}
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
    fig.tight_layout()
    return fig


def plot_methods_summary(rows, axis: str = ""):
    """Methods side by side: mean change of the gap on and off the diagonal (random control as markers) and Δppl."""
    import textwrap

    plt = _plt()
    short = {"IG² neuron attribution and Bias Neuron Suppression": "IG² + BNS",
             "Activation patching and attribution patching": "patching (top heads)"}
    names = [textwrap.fill(short.get(r["method"], r["method"]), 16) for r in rows]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.4), gridspec_kw={"width_ratios": [2.2, 1]})
    ax = axes[0]
    ax.bar(x - 0.2, [r["diagonal"] for r in rows], 0.4, label="same context (L1, held out)", color="#1f77b4")
    ax.bar(x + 0.2, [r["off-diagonal"] for r in rows], 0.4, label="other contexts (L2)", color="#ff7f0e")
    ax.scatter(x - 0.2, [r["random (diag)"] for r in rows], marker="_", s=300, color="k", zorder=3,
               label="random control")
    ax.scatter(x + 0.2, [r["random (off)"] for r in rows], marker="_", s=300, color="k", zorder=3)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=7.5)
    ax.set_ylabel("mean change of the gap\n(after - before; toward 0 = less bias)")
    ax.set_title(f"Bias reduction by method ({axis})", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax = axes[1]
    ax.barh(x, [r["Δppl"] for r in rows], color="#2ca02c", label="selected")
    ax.scatter([r["Δppl random"] for r in rows], x, marker="|", s=200, color="k", zorder=3, label="random control")
    ax.set_yticks(x)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xscale("symlog", linthresh=1.0)  # costs span 0.01 to 100
    ax.set_xlabel("perplexity change (neutral text; symlog)")
    ax.set_title("Capability cost", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot_generation(self, ax=None):
    """Histogram of the parsed numeric answers per group."""
    plt = _plt()
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
    plt = _plt()
    types = list(self.by_type)
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.4 * (len(types) + 1)))
    ys = np.arange(len(types) + 1)
    vals = [self.score] + [self.by_type[t]["score"] for t in types]
    lo = [self.ci_low] + [self.by_type[t]["ci_low"] for t in types]
    hi = [self.ci_high] + [self.by_type[t]["ci_high"] for t in types]
    ax.errorbar(vals, ys, xerr=[np.array(vals) - lo, np.array(hi) - vals], fmt="o", color="k", capsize=3)
    ax.axvline(50, color="r", ls="--", lw=1)
    ax.set_yticks(ys)
    ax.set_yticklabels(["all"] + types)
    ax.invert_yaxis()
    ax.set_xlabel("% pairs where the stereotypical sentence is more likely (50 = unbiased)")
    fig.tight_layout()
    return fig
