"""Evaluate and ship a fix on the embedded model: report card, export, and lm-eval on both forms of the fix.

    python analyses/ship_a_fix.py --intervention DIR [--crows F] [--winobias-dir D] [--stereoset F] [--bbq F ...]
                                  [--out results/ship_a_fix]

1. ``mechbias card``: the benchmark files given (WinoBias: the type 1 and type 2 test files of ``D``, pooled),
   perplexity on the reporting neutral texts and the local lm-eval task ``mb_facts``, unmodified vs. under the
   intervention, paired CIs.
2. ``mechbias export``: the intervention folded into a transformers checkpoint (largest |logit difference|).
3. lm-eval's own command line on ``mb_facts``: the ``mechbias`` model type without and with the intervention, and
   lm-eval's ``hf`` model type on the exported checkpoint; the per-document log-likelihoods of the last two are
   compared.

Writes ``OUT/ship.json`` (the documentation's "Evaluate and ship a fix" numbers) and ``OUT/card/``.
Run from the repository root (the task file names its data relative to it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mechbias.apps.card import CardInputs, run_card
from mechbias.apps.export import export_model
from mechbias.core.models import load_model
from mechbias.core.results import atomic_write_json
from mechbias.interventions.base import load_intervention

TASKS = Path("analyses/lm_eval_tasks")


def pooled_winobias(folder: Path, tmp: Path) -> tuple[Path, Path]:
    out = []
    for kind in ("pro", "anti"):
        lines = []
        for t in (1, 2):
            lines += (folder / f"{kind}_stereotyped_type{t}.txt.test").read_text().splitlines()
        (tmp / f"{kind}.txt").write_text("\n".join(x for x in lines if x.strip()) + "\n")
        out.append(tmp / f"{kind}.txt")
    return out[0], out[1]


def lm_eval_samples(model: str, model_args: str, out: Path) -> list[dict]:
    exe = Path(sys.executable).parent / "mechbias-lm-eval"
    cmd = [str(exe), "run", "--model", model, *(["--model_args", model_args] if model_args else []), "--tasks",
           "mb_facts", "--include_path", str(TASKS), "--output_path", str(out), "--log_samples"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    f = sorted(out.rglob("samples_mb_facts*.jsonl"))[0]
    return sorted((json.loads(x) for x in f.read_text().splitlines()), key=lambda s: s["doc_id"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--intervention", type=Path, required=True)
    ap.add_argument("--crows", type=Path, default=None)
    ap.add_argument("--winobias-dir", type=Path, default=None)
    ap.add_argument("--stereoset", type=Path, default=None)
    ap.add_argument("--bbq", type=Path, nargs="+", default=None)
    ap.add_argument("--out", type=Path, default=Path("results/ship_a_fix"))
    ap.add_argument("--reuse", action="store_true", help="keep a finished OUT/card and OUT/model (resume)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    pro = anti = None
    if args.winobias_dir:
        pro, anti = pooled_winobias(args.winobias_dir, tmp)
    inputs = CardInputs(crows=args.crows, stereoset=args.stereoset, bbq=args.bbq or [], winobias_pro=pro,
                        winobias_anti=anti, tasks=["mb_facts"], include_path=TASKS)
    inputs.check()
    iv = load_intervention(args.intervention)
    iv.check_foldable()
    model = load_model()
    report: dict = {"intervention": iv.describe(), "seconds": {}}
    t = time.time()
    if args.reuse and (args.out / "card" / "card.json").exists():
        card = json.loads((args.out / "card" / "card.json").read_text())
    else:
        card = run_card(model, iv, inputs, args.out / "card", n_boot=2000, seed=0).as_dict()
        report["seconds"]["card"] = round(time.time() - t, 1)
    report["card"] = card["benchmarks"]
    t = time.time()
    if args.reuse and (args.out / "model" / "mechbias_export.json").exists():
        exp = json.loads((args.out / "model" / "mechbias_export.json").read_text())
    else:
        exp = export_model(model, iv, args.out / "model")
        report["seconds"]["export"] = round(time.time() - t, 1)
    report["export"] = {k: exp[k] for k in ("architecture", "dtype", "max_abs_logit_diff")}
    del model
    t = time.time()
    base = lm_eval_samples("mechbias", "", tmp / "base")
    hooked = lm_eval_samples("mechbias", f"intervention={args.intervention.resolve()}", tmp / "mechbias")
    plain = lm_eval_samples("hf", f"pretrained={(args.out / 'model').resolve()},dtype=float32", tmp / "hf")
    report["seconds"]["lm_eval_three_runs"] = round(time.time() - t, 1)
    diffs = [abs(float(a[0][0]) - float(b[0][0])) for x, y in zip(hooked, plain, strict=True) for a, b in zip(x["resps"], y["resps"], strict=True)]
    report["lm_eval"] = {"task": "mb_facts", "docs": len(hooked),
                         "acc_mechbias_unmodified": sum(s["acc"] for s in base) / len(base),
                         "acc_mechbias_intervention": sum(s["acc"] for s in hooked) / len(hooked),
                         "acc_hf_exported": sum(s["acc"] for s in plain) / len(plain),
                         "max_abs_loglik_diff": max(diffs), "same_choices": all(
                             x["acc"] == y["acc"] for x, y in zip(hooked, plain, strict=True))}
    atomic_write_json(report, args.out / "ship.json")
    print(json.dumps({k: v for k, v in report.items() if k != "card"}, indent=2))
    print((args.out / "card" / "card.md").read_text().split("\n## ")[0])


if __name__ == "__main__":
    main()
