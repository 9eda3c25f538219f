"""How much exact work the resumed scoring saved in a study: each score and perplexity job's measured
matrix-product FLOPs against what the full forward would have done (the interventions it scored times the
full-forward FLOPs of its evaluation set, or of the base perplexity).

    python analyses/engine_savings.py STUDY/jobs --out analyses/results/study_default/engine_savings.json

Reads only the job records (``job.json``: kind, label, parameters, measured seconds and FLOPs); prints a table
per method and kind, and writes the per-job rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jobs", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rec = {kind: [json.loads(p.read_text()) for p in sorted((args.jobs / kind).glob("*/job.json"))]
           for kind in ("evalset", "perplexity", "scores", "perplexities")}
    full = {m["label"].split(" ", 1)[1]: m["flops"] for m in rec["evalset"]}  # context -> full-forward FLOPs
    base_ppl = rec["perplexity"][0]["flops"]
    rows = []
    for kind in ("scores", "perplexities"):
        for m in rec[kind]:
            n = len(m["macs"]) if "macs" in m else len(m["parts"])
            col = m["label"].split(" on ")[-1].split(" (")[0] if kind == "scores" else None
            would = n * (full[col] if kind == "scores" else base_ppl)
            rows.append({"kind": kind, "label": m["label"], "interventions": n, "seconds": m["seconds"],
                         "tflop": m["flops"] / 1e12, "tflop_full_forward": would / 1e12})
    by: dict = {}
    for r in rows:
        key = (r["label"].split(":")[0], r["kind"])
        agg = by.setdefault(key, {"tflop": 0.0, "full": 0.0, "seconds": 0.0})
        agg["tflop"] += r["tflop"]
        agg["full"] += r["tflop_full_forward"]
        agg["seconds"] += r["seconds"]
    print("| method | job kind | TFLOP done | TFLOP of the full forward | saved |")
    print("|---|---|---|---|---|")
    for (method, kind), a in sorted(by.items()):
        print(f"| {method} | {kind} | {a['tflop']:.1f} | {a['full']:.1f} | {a['full'] / a['tflop']:.2f}x |")
    for kind in ("scores", "perplexities"):
        done = sum(r["tflop"] for r in rows if r["kind"] == kind)
        would = sum(r["tflop_full_forward"] for r in rows if r["kind"] == kind)
        print(f"| all | {kind} | {done:.1f} | {would:.1f} | {would / done:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
