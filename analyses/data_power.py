"""The data-power tables of the findings page: detectable gaps by roster, design and context, on both real models.

Each folder under ``analyses/results/`` named below holds the ``bias.json`` of one ``mechbias bias`` run
(held-out templates and names, seed 0); this script only formats them (nothing here chooses anything):

    mechbias bias [--model gemma-3-270m] --contexts healthcare education \\
        --axis gender race gender@extended race@extended --templates heldout --names heldout \\
        --out analyses/results/bias_new_contexts[_gemma]
    mechbias bias [--model gemma-3-270m] --contexts finance commerce hiring housing \\
        --axis gender@extended race@extended --templates heldout --names heldout --blocks 2 \\
        --out analyses/results/bias_blocks_yes_no[_gemma]
    mechbias bias [--model gemma-3-270m] --contexts healthcare education \\
        --axis gender@extended race@extended --templates heldout --names heldout --blocks 6 \\
        --out analyses/results/bias_blocks_new[_gemma]
    mechbias bias [--model gemma-3-270m] --contexts finance commerce hiring housing \\
        --axis gender race gender@extended race@extended --templates heldout --names heldout \\
        --out analyses/results/bias_rosters[_gemma]
    # after the yes/no contexts grew to 30 templates (2026-12-06; the runs above used their 5 held-out of 10):
    mechbias bias [--model gemma-3-270m] --contexts finance commerce hiring housing \\
        --axis gender@extended race@extended --templates heldout --names heldout --blocks 6 \\
        --out analyses/results/bias_blocks_yes_no30[_gemma]
    python analyses/data_power.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"SmolLM2-135M-Instruct": "", "Gemma 3 270M": "_gemma"}
FULL = ("bias_rosters", "bias_new_contexts")
BLOCKS = ("bias_blocks_yes_no", "bias_blocks_new")
THIRTY = ("bias_blocks_yes_no30", "bias_blocks_new")  # every context with 30 templates (15 held out)
CONTEXTS = ("finance", "commerce", "hiring", "housing", "healthcare", "education")


def rows_of(folders: tuple[str, ...], suffix: str) -> list[dict]:
    out = []
    for f in folders:
        path = RESULTS / f"{f}{suffix}" / "bias.json"
        if path.is_file():
            data = json.loads(path.read_text())
            out += [dict(r, blocks=data["meta"].get("blocks", 1)) for r in data["rows"]]
    return out


def fmt(r: dict | None) -> str:
    if r is None:
        return "—"
    bold = "**" if r["p_bh"] < 0.05 else ""
    return (f"{bold}{r['gap']:+.3f}{bold} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]; detectable "
            f"{r['min_detectable']:.3f} ({r['n_prompts']})")


def table(suffix: str) -> str:
    full, blocks, thirty = rows_of(FULL, suffix), rows_of(BLOCKS, suffix), rows_of(THIRTY, suffix)

    def get(rows, c, a, roster):
        return next((r for r in rows if r["context"] == c and r["axis"] == a and r["roster"] == roster), None)

    lines = ["| context (format) | axis | audit roster, full grid | extended, full grid | extended, incomplete design "
             "| extended, incomplete design, 30 templates |", "|---|---|---|---|---|---|"]
    fmt_of = {"finance": "yes/no", "commerce": "yes/no", "hiring": "yes/no", "housing": "yes/no",
              "healthcare": "A/B choice", "education": "rating"}
    for c in CONTEXTS:
        for a in ("gender", "race"):
            inc, new = get(blocks, c, a, "extended"), get(thirty, c, a, "extended")
            lines.append(f"| {c} ({fmt_of[c]}) | {a} | {fmt(get(full, c, a, 'audit'))} | "
                         f"{fmt(get(full, c, a, 'extended'))} | {fmt(inc)}"
                         + (f", {inc['blocks']} blocks" if inc else "") + f" | {fmt(new)}"
                         + (f", {new['blocks']} blocks" if new else "") + " |")
    return "\n".join(lines)


def tables() -> str:
    """Both models' tables as Markdown (the documentation's findings page includes this text)."""
    parts = []
    for model, suffix in MODELS.items():
        parts.append(f"**{model}** (gap [95% CI]; detectable gap at 0.05, power 0.8 (prompts); bold: p<sub>BH</sub> "
                     "< 0.05 within its run):\n")
        parts.append(table(suffix) + "\n")
    return "\n".join(parts)


def main() -> int:
    print(tables())
    return 0


if __name__ == "__main__":
    sys.exit(main())
