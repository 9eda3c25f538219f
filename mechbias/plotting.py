"""Figures (matplotlib). Every function returns the figure; nothing is shown or saved here.

Each figure carries its units and the meaning of its sign in the labels, so a
reader can interpret it without the code.
"""

from __future__ import annotations

import numpy as np


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
