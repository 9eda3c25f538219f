"""The README's roster tables: each real model's held-out gaps on the audit and the extended name roster.

    mechbias bias --model <model> --axis gender race gender@extended race@extended \\
        --templates heldout --names heldout --out analyses/results/<folder>
    python analyses/bias_rosters.py          # prints the Markdown tables from the committed bias.json files

Folders: ``bias_rosters`` (SmolLM2-135M-Instruct, the embedded default) and ``bias_rosters_gemma``
(Gemma 3 270M). Nothing here chooses anything; it formats what the command measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FOLDERS = {"SmolLM2-135M-Instruct": "bias_rosters", "Gemma 3 270M": "bias_rosters_gemma"}
CONTEXTS = ("finance", "commerce", "hiring", "housing")


def cell(r: dict) -> str:
    bold = "**" if r["p_bh"] < 0.05 else ""
    p = "< 0.001" if r["p_bh"] < 0.001 else f"{r['p_bh']:.3f}"
    return (f"{bold}{r['gap']:+.3f}{bold} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}], p<sub>BH</sub> {p}; "
            f"detectable {r['min_detectable']:.3f}")


def table(rows: list[dict]) -> str:
    def get(c, a, ros):
        return next(r for r in rows if r["context"] == c and r["axis"] == a and r["roster"] == ros)

    n = {ros: get("finance", "gender", ros) for ros in ("audit", "extended")}
    head = [f"| context | axis | audit roster ({n['audit']['n_prompts']} prompts) | "
            f"extended roster ({n['extended']['n_prompts']} prompts) |", "|---|---|---|---|"]
    body = [f"| {c} | {a} | {cell(get(c, a, 'audit'))} | {cell(get(c, a, 'extended'))} |"
            for c in CONTEXTS for a in ("gender", "race")]
    return "\n".join(head + body)


def main() -> int:
    for model, folder in FOLDERS.items():
        data = json.loads((RESULTS / folder / "bias.json").read_text())
        print(f"**{model}** (`analyses/results/{folder}/`, {data['meta']['model']}, "
              f"fast paths {data['meta']['fast_paths']}):\n")
        print(table(data["rows"]))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
