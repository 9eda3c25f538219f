"""The figures of single methods (IG², patching, GRADIEND). Every function returns the figure; nothing is
shown or saved here. The figures shared by every method (bias, transfer matrix, levels, ground truth,
study summary) are in :mod:`mechbias.viz.plotting`.
"""

from __future__ import annotations

import numpy as np
import torch

from .plotting import pyplot


def plot_layer_histogram(counts, ax=None, title: str = ""):
    """Bar chart of selected neurons per layer."""
    plt = pyplot()
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
    plt = pyplot()
    agg = result.aggregate().numpy()
    fig, axes = plt.subplots(2, 1, figsize=(9, 6.2), gridspec_kw={"height_ratios": [3, 1.2]})
    lim = float(np.percentile(np.abs(agg), 99.9)) or 1e-12
    im = axes[0].imshow(agg, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    axes[0].set_ylabel("layer")
    axes[0].set_xlabel("MLP neuron (blocks.l.mlp.hook_post index)")
    cb = fig.colorbar(im, ax=axes[0], fraction=0.03, pad=0.01)
    cb.set_label("mean IG² (towards the biased association)", fontsize=8)
    if selection is not None and len(selection):
        ls, ns = zip(*selection.as_pairs(), strict=True)
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
    """Change of the mean attributed gap (after - before) when suppressing / amplifying neuron sets, with
    the crossed (templates x names) 95% intervals; the gap before as a dashed line."""
    plt = pyplot()
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
            ax.bar(x, r["change"], width, color=colors.get(name, "#7f7f7f"), label=name if j == 0 else None)
            ax.errorbar(x, r["change"], yerr=[[r["change"] - r["ci_low"]], [r["ci_high"] - r["change"]]],
                        color="k", capsize=3, lw=1)
    if rows:
        ax.axhline(-rows[0]["gap_before"], color="k", ls="--", lw=0.8, label="- gap before (removes all)")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(ops)))
    ax.set_xticklabels(["suppress (x0)", "amplify (x2)"])
    kind = result.meta.get("kind", "")
    ax.set_ylabel(f"change of mean gap ({kind})" if kind else "change of mean gap")
    ax.set_title("Verification on held-out prompts (95% CI, templates x names)", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot_overlap(df, title: str = "Overlap of selected neurons between contexts"):
    """Heatmap of Jaccard overlap; each cell shows the value, the shared count and the chance level."""
    plt = pyplot()
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
        txt = f"n={r['n_a']}" if i == j else f"{r['jaccard']:.2f}\n{r['shared']} shared\nchance {r['chance']:.3f}"
        ax.text(j, i, txt, ha="center", va="center", fontsize=7, color="k" if im.norm(mat[i, j]) >= 0.6 else "w")  # dark text on the bright end of the scale
    ax.set_xticks(range(n))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_yticks(range(n))
    ax.set_yticklabels(names)
    fig.colorbar(im, ax=ax, fraction=0.04).set_label("Jaccard")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _runs(positions):
    runs: list[list[int]] = []
    cur: list[int] = []
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
    plt = pyplot()
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
    """A heat map of a layer x unit grid."""
    plt = pyplot()
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
    plt = pyplot()
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
    """A heat map of pairwise correlations between methods' unit rankings."""
    plt = pyplot()
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


def plot_gradiend_feature(res):
    """Histogram of GRADIEND encoder values for group A, group B and neutral texts (held out)."""
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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
