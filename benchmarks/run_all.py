"""Run every benchmark and print each method's ratio against its peer, then the study's step times.

    python benchmarks/run_all.py [--quick]

--quick runs the plain-loop IG² reference on 3 layers only (its time is
extrapolated) instead of all 30.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def run(script: str, *args: str) -> None:
    print(f"\n=== {script} {' '.join(args)}".rstrip(), flush=True)
    out = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True)
    lines = [l for l in out.stdout.splitlines() if l.strip()]
    print("\n".join(lines) if lines else f"(no output; stderr: {out.stderr.strip().splitlines()[-1:]})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    run("bench_ig2.py", *(["--reference-layers", "3"] if args.quick else []))
    run("bench_patching.py")
    run("bench_pruning.py")
    run("bench_wanda.py", *(["--prompts", "16", "--no-selection"] if args.quick else []))
    run("bench_gradiend.py")
    run("bench_study_workers.py")
    for folder in (Path("results/study"), Path("results/study_run1")):
        steps = folder / "steps"
        if steps.is_dir():
            print(f"\n=== study step times ({folder})")
            for d in sorted(steps.iterdir()):
                f = d / "summary.json"
                if f.exists():
                    print(f"{d.name:<22}{json.loads(f.read_text()).get('seconds', float('nan')):>8.1f} s")
            break


if __name__ == "__main__":
    main()
