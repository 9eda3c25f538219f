"""The report card's figure: the change each benchmark metric shows under the intervention, with its paired CI."""

from __future__ import annotations

import numpy as np


def plot_card(rows: list[dict], title: str = ""):
    """``rows``: headline metric rows (``label``, ``unit``, ``difference``, ``difference_ci``). Percent and
    percentage-point metrics share the left panel; perplexity has its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("difference") is not None]
    left = [r for r in rows if r["unit"] != "ppl"]
    right = [r for r in rows if r["unit"] == "ppl"]
    n = max(len(left), 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 1.2 + 0.38 * n), gridspec_kw={"width_ratios": [3, 1]})
    for ax, part, xlabel in ((axes[0], left, "intervention - unmodified (% or percentage points)"),
                             (axes[1], right, "change in perplexity")):
        ys = np.arange(len(part))
        if part:
            d = np.array([r["difference"] for r in part], dtype=float)
            lo = np.array([r["difference_ci"][0] for r in part], dtype=float)
            hi = np.array([r["difference_ci"][1] for r in part], dtype=float)
            colors = ["#b2182b" if (a > 0 or b < 0) else "#4d4d4d" for a, b in zip(lo, hi, strict=True)]
            for y, v, a, b, c in zip(ys, d, lo, hi, colors, strict=True):
                ax.errorbar(v, y, xerr=[[v - a], [b - v]], fmt="o", color=c, capsize=3)
            ax.set_yticks(ys)
            ax.set_yticklabels([r["label"] for r in part])
        else:
            ax.set_yticks([])
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="0.5")
        ax.axvline(0, color="0.6", lw=1, ls="--")
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
    fig.suptitle(title or "Report card: change under the intervention (95% paired CI; red: CI excludes 0)",
                 fontsize=10)
    fig.tight_layout()
    return fig
