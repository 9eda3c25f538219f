"""The same study on 1 and on 2 workers, each from an empty job store, in one run.

    python benchmarks/bench_study_workers.py [--model NAME] [--full-size] [--threads-peer] [--methods M ...]

Prints the wall time of each run, the ratio, the study's total work and critical path (from the job
store), and the wall time predicted on N workers, max(critical path, total work / N). By default the
study is the quick configuration on the embedded model (finance vs. commerce, the four methods);
``--full-size`` runs the default study's settings instead (about an hour here). ``--threads-peer`` adds a
third run: one in-process worker with as many torch threads as cores (the best one process can do).
Both worker runs use one torch thread per job, so their results are bit-identical (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mechbias.apps.study import StudyConfig, run_study
from mechbias.core.models import load_model


def one(model, spec, workers: int, threads: int, out: Path, quick: bool, methods) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cfg = StudyConfig(quick=quick, workers=workers, threads=threads, axis="gender", methods=methods)
    t = time.time()
    rc = run_study(model, cfg, out, model_spec=spec, progress=False).exit_code
    wall = time.time() - t
    work = json.loads((out / "work.json").read_text())
    return {"rc": rc, "wall": wall, **work}


def results(out: Path) -> dict:
    return {str(p.relative_to(out)): json.loads(p.read_text()).get("transfer")
            for p in sorted((out / "steps").glob("*/summary.json"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="")
    ap.add_argument("--full-size", action="store_true")
    ap.add_argument("--threads-peer", action="store_true")
    ap.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all four)")
    args = ap.parse_args()
    model = load_model(args.model)
    spec = {"name": args.model}
    root = Path(tempfile.mkdtemp(prefix="bench-study-"))
    quick = not args.full_size
    runs = {}
    runs["1 worker x 1 thread"] = one(model, spec, 1, 1, root / "w1", quick, args.methods)
    runs["2 workers x 1 thread"] = one(model, spec, 2, 1, root / "w2", quick, args.methods)
    if args.threads_peer:
        runs[f"1 worker x {os.cpu_count()} threads"] = one(model, spec, 1, os.cpu_count() or 1, root / "t", quick, args.methods)
    same = results(root / "w1") == results(root / "w2")
    print(f"study: {'quick' if quick else 'default'} configuration, methods {args.methods or 'all'}, model {args.model or 'embedded'}, "
          f"{os.cpu_count()} cores; results of 1 and 2 workers identical: {same}")
    for name, r in runs.items():
        print(f"{name:<24} wall {r['wall']:7.1f} s  (rc {r['rc']}, {r['computed_now']} jobs)")
    w1, w2 = runs["1 worker x 1 thread"], runs["2 workers x 1 thread"]
    print(f"speed-up with 2 workers: {w1['wall'] / w2['wall']:.2f}x (goal >= 1.7x)")
    if args.threads_peer:
        peer = runs[f"1 worker x {os.cpu_count()} threads"]
        print(f"2 workers vs one process using every core: {peer['wall'] / w2['wall']:.2f}x")
    total, cp = w1["total_work_seconds"], w1["critical_path_seconds"]
    print(f"total work {total:.0f} s, critical path {cp:.0f} s (1-worker run's job times)")
    for n in (1, 2, 4, 8, 16):
        print(f"  predicted on {n:>2} workers: {max(cp, total / n):7.0f} s")
    print("per job kind (1 worker): " + ", ".join(f"{k} {v['jobs']} jobs {v['seconds']:.0f} s"
                                                  for k, v in w1["by_kind"].items()))
    shutil.rmtree(root)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
