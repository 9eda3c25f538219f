"""Every method on the real models: each registered method's study variants, in their quick configuration, selected
on finance and evaluated on finance's held-out prompts (gender axis, one draw of each control, fp32), one
subprocess per variant with a time limit. Writes ``analyses/results/real_support/<model>.json`` and the table the
models page includes (``real_support.md``); a variant that raises or runs out of time is recorded as such.

    python analyses/real_support.py --model gemma-3-270m     # and --model smollm2-135m-instruct
    python analyses/real_support.py --table                  # only rewrite the table from the committed files

Nothing here chooses anything: the quick configurations are the tests' (``Method.study_configs(quick=True)``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "analyses" / "results" / "real_support"
MODELS = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct", "gemma-3-270m": "Gemma 3 270M"}


def variants() -> list[tuple[str, str]]:
    """(method, study variant) for every registered method."""
    import mechbias as mb

    return [(name, step) for name, cls in mb.registered_methods().items() for step in cls.study_configs(True, True)]


def run_one(model_name: str, method: str, step: str) -> dict:
    """Select ``step`` (quick config) on finance and evaluate it there; the cell and how long it took."""
    import mechbias as mb

    t0 = time.time()
    model = mb.load_model(model_name)
    cls = mb.get_method(method)
    config = cls.study_configs(True, True)[step]
    tm = mb.transfer_matrix(model, cls(config), ["finance"], "gender", n_random=1, n_boot=500, capability=True)
    cell = tm.cell("finance", "finance")
    return {"status": "ok", "seconds": round(time.time() - t0, 1), "n_components": cell.n_components,
            "gap_before": cell.gap_before, "gap_change": cell.gap_change, "ci": [cell.ci_low, cell.ci_high],
            "perplexity_change": cell.perplexity_change,
            "controls": {k: e.gap_change for k, e in cell.controls.items()},
            "precision": tm.meta.get("precision")}


def run_model(model_name: str, timeout: int) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{model_name}.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    for method, step in variants():
        if done.get(step, {}).get("status") == "ok":
            continue  # resumable: a finished variant is kept
        t0 = time.time()
        try:
            res = subprocess.run([sys.executable, __file__, "--one", model_name, method, step], capture_output=True,
                                 text=True, timeout=timeout)
            last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
            rec = json.loads(last) if res.returncode == 0 and last.startswith("{") else {
                "status": "error", "seconds": round(time.time() - t0, 1),
                "error": (res.stderr.strip().splitlines() or ["(no message)"])[-1][:300]}
        except subprocess.TimeoutExpired:
            rec = {"status": f"not finished in {timeout} s", "seconds": timeout}
        done[step] = {"method": method, **rec}
        print(f"{model_name} {step}: {done[step]['status']} ({done[step]['seconds']} s)", flush=True)
        path.write_text(json.dumps(done, indent=1))
    return done


def table() -> str:
    rows = ["| method (study variant) | " + " | ".join(MODELS.values()) + " |", "|---" * (len(MODELS) + 1) + "|"]
    data = {m: json.loads((OUT / f"{m}.json").read_text()) if (OUT / f"{m}.json").exists() else {} for m in MODELS}
    for method, step in variants():
        cells = []
        for m in MODELS:
            r = data[m].get(step)
            if r is None:
                cells.append("not run by this script")
            elif r["status"] != "ok":
                cells.append(f"{r['status']}" + (f": {r['error']}" if r.get("error") else ""))
            else:
                cells.append(f"runs ({r['seconds']:.0f} s): {r['n_components']} units, gap change "
                             f"{r['gap_change']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]")
        rows.append(f"| {method} ({step}) | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=list(MODELS))
    p.add_argument("--timeout", type=int, default=900, help="seconds per variant")
    p.add_argument("--one", nargs=3, metavar=("MODEL", "METHOD", "STEP"), help=argparse.SUPPRESS)
    p.add_argument("--table", action="store_true", help="only rewrite the table")
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_one(*a.one)))
        return
    if a.model:
        run_model(a.model, a.timeout)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "real_support.md").write_text(table())


if __name__ == "__main__":
    main()
