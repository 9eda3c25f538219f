"""The LEACE numbers of the documentation, recomputed from the committed run (analyses/results/leace_smollm2_gender).

The run (7.4 min on 2 CPU threads, embedded SmolLM2-135M-Instruct, fp32):

    mechbias erase --select-on finance commerce --evaluate-on all --axis gender \\
        --out analyses/results/leace_smollm2_gender_run   # then copy transfer.json and erase.json here

This script reads only the committed ``transfer.json`` and ``erase.json`` and prints: each row's
within-context removal with its CI and perplexity change, every control's, the column-wise transfer test with
its TOST and detectable difference, and the cross / within ratio.

    python analyses/leace_comparison.py [FOLDER]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "results" / "leace_smollm2_gender"


def summarise(folder: Path) -> str:
    t = json.loads((folder / "transfer.json").read_text())
    sel = json.loads((folder / "erase.json").read_text())["selections"]
    ppl = {r["context"]: r for r in t["rows"]}
    assert all(c["gap_before"] < 0 for c in t["cells"]), "the table below reads + as removed: every gap is < 0"
    lines = ["| selected on | gap change in its own context [95% CI] | Δ perplexity | random projection | "
             "shuffled-label eraser |", "|---|---|---|---|---|"]
    for c in t["cells"]:
        if c["selected_on"] != c["evaluated_on"]:
            continue
        r, rnd, shf = c["selected_on"], c["controls"]["random"], c["controls"]["shuffled_labels"]
        lines.append(f"| {r} (layer {sel[r]['layer']}, rank {sel[r]['rank']}) | {c['gap_change']:+.3f} "
                     f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | {ppl[r]['perplexity_change']:+.1f} | "
                     f"{rnd['gap_change']:+.3f} [{rnd['ci_low']:+.3f}, {rnd['ci_high']:+.3f}], Δppl "
                     f"{ppl[r]['random_perplexity_change']:+.1f} | {shf['gap_change']:+.3f} "
                     f"[{shf['ci_low']:+.3f}, {shf['ci_high']:+.3f}], Δppl "
                     f"{ppl[r]['shuffled_labels_perplexity_change']:+.0f} |")
    tt = t["transfer_test"]
    tost, ratio = tt["tost"], tt["ratio"]
    lines += ["", f"within {tt['within_mean']:+.3f}, cross {tt['cross_mean']:+.3f}; within - cross (within columns "
                  f"{', '.join(tt['columns'])}): {tt['within_minus_cross']:+.3f} [{tt['ci_low']:+.3f}, "
                  f"{tt['ci_high']:+.3f}], p {tt['p_value']:.2f}, detectable >= {tt['min_detectable']:.3f}; "
                  f"TOST at +-{tost['margin']}: 90% CI [{tost['ci_low_90']:+.3f}, {tost['ci_high_90']:+.3f}], "
                  f"p {tost['p_value']:.3f}, {'equivalent' if tost['equivalent'] else 'not shown equivalent'}",
              f"cross / within {ratio['ratio']:.2f} [{ratio['ci_low']:.2f}, {ratio['ci_high']:.2f}] (Fieller; the "
              f"within-context removal {ratio['within']:+.3f} [{ratio['within_ci'][0]:+.3f}, "
              f"{ratio['within_ci'][1]:+.3f}] excludes 0)"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarise(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE))
