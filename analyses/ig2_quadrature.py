"""How accurately each integration rule computes IG² on the real model, and what it costs.

IG² is an integral over α ∈ [0, 1]; the authors approximate it with a left Riemann sum of m = 20 points.
This script computes, for a seeded sample of the default study's IG² units (name pairs on the selection
templates of finance and commerce, gender axis), the attributions under each rule and compares them with a
converged reference (the midpoint rule with 120 points, checked against Gauss–Legendre with 32):

- ``attr_error``: ‖attr − ref‖ / ‖ref‖ over all neurons of a unit (median and worst over units);
- ``set_jaccard``: Jaccard between the neurons at ≥ 0.2 × the unit's largest attribution (BNS's per-prompt
  threshold, the set the selection starts from) under the rule and under the reference (worst over units);
- ``completeness``: median over layers and units of |Σ attr − (G(w̄) − G(0))| / |G(w̄) − G(0)|, the check
  every IG² run reports (needs no reference), and its value at layer 0;
- seconds per prompt, measured in this run (one process, 2 threads).

The rule the study adopts was fixed before this ran: the smallest Gauss–Legendre n in (4, 6, 8, 10, 12) whose
median attr_error and worst set_jaccard are both at least as good as the authors' left-20; if none, left-20.
Only selection templates and names are read. Output: analyses/results/ig2_quadrature.json.

    python analyses/ig2_quadrature.py [--units 3] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results" / "ig2_quadrature.json"
CANDIDATES = (4, 6, 8, 10, 12)


def _metrics(res, ref) -> dict[str, float]:
    a, r = res.attributions.double(), ref.attributions.double()
    err = ((a - r).flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1)).tolist()
    jac = []
    for k in range(len(a)):
        sa = set((a[k] >= 0.2 * a[k].max()).flatten().nonzero().flatten().tolist())
        sr = set((r[k] >= 0.2 * r[k].max()).flatten().nonzero().flatten().tolist())
        jac.append(len(sa & sr) / max(1, len(sa | sr)))
    comp = res.completeness_error()
    return {"attr_error_median": float(torch.tensor(err).median()), "attr_error_max": max(err),
            "set_jaccard_min": min(jac), "set_jaccard_median": float(torch.tensor(jac).median()),
            "completeness_median": float(comp.median()), "completeness_layer0": float(comp[0])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--units", type=int, default=3, help="units sampled per context")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    import mechbias as mb
    from mechbias.data.axes import load_axis
    from mechbias.eval.metrics import favoured_group
    from mechbias.methods.ig2.attribution import run_ig2
    from mechbias.methods.ig2.inputs import contrast_units

    torch.set_num_threads(2)
    model = mb.load_model(a.model)
    ax = load_axis("gender")
    units = []
    for ctx in ("finance", "commerce"):
        fav = favoured_group(model, mb.load_context(ctx), ax, seed=0)
        us = contrast_units(ctx, "gender", favoured=fav, templates="selection", names="selection",
                            pairs_per_template=3, seed=0)
        units += random.Random(0).sample(us, a.units)
    n_prompts = sum(len(u.texts) for u in units)

    def run(rule: str, steps: int):
        t0 = time.perf_counter()
        res = run_ig2(model, units, kind="prob", steps=steps, rule=rule)
        return res, (time.perf_counter() - t0) / n_prompts

    ref, ref_s = run("middle", 120)
    print("reference done", ref_s, flush=True)
    check, check_s = run("gauss", 32)
    rows = {"reference middle-120": {**_metrics(ref, ref), "seconds_per_prompt": ref_s},
            "check gauss-32": {**_metrics(check, ref), "seconds_per_prompt": check_s}}
    for rule, steps in [("left", 20)] + [("gauss", n) for n in CANDIDATES]:
        res, s = run(rule, steps)
        rows[f"{rule}-{steps}"] = {**_metrics(res, ref), "seconds_per_prompt": s}
        print(f"{rule}-{steps}", rows[f"{rule}-{steps}"], flush=True)
    paper = rows["left-20"]
    chosen = next((f"gauss-{n}" for n in CANDIDATES
                   if rows[f"gauss-{n}"]["attr_error_median"] <= paper["attr_error_median"]
                   and rows[f"gauss-{n}"]["set_jaccard_min"] >= paper["set_jaccard_min"]), "left-20")
    out = {"model": a.model, "units": len(units), "prompts": n_prompts, "kind": "prob",
           "rule_fixed_before_the_run": "smallest gauss n in (4, 6, 8, 10, 12) with median attr_error <= left-20's "
                                        "and worst set_jaccard >= left-20's, else left-20",
           "chosen": chosen, "rules": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(a.out)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
