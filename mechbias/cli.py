"""The ``mechbias`` command line. Each subcommand mirrors a library function,
takes ``--model`` and ``--out DIR``, and writes a JSON summary plus figures to DIR."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _common(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--model", default=None,
                   help="model name: default the embedded SmolLM2-135M-Instruct; 'planted' for the "
                        "planted-bias variant; or a Hugging Face id / local folder")
    p.add_argument("--out", required=out_required, type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed for splits, bootstrap and sampling")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--intervention", type=Path, default=None,
                   help="folder of a saved intervention to apply (e.g. DIR/intervention from `prune`)")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap replicates for confidence intervals")


def _setup(args):
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from .models import load_model

    t = time.time()
    model = load_model(args.model)
    print(f"[mechbias] loaded {args.model or 'the embedded SmolLM2-135M-Instruct'} in {time.time() - t:.1f} s",
          file=sys.stderr)
    intervention = None
    if getattr(args, "intervention", None):
        from .hooks import load_intervention

        intervention = load_intervention(args.intervention)
        print(f"[mechbias] applying {intervention.describe()}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    return model, intervention


def cmd_bias(args) -> int:
    from .metrics import measure_bias
    from .results import atomic_savefig, atomic_write_json

    model, intervention = _setup(args)
    res = measure_bias(model, args.contexts, args.axis, templates=args.templates, names=args.names,
                       intervention=intervention, n_boot=args.boot, seed=args.seed, progress=True)
    res.save(args.out / "result")
    keep = ("context", "axis", "group_a", "group_b", "gap", "ci_low", "ci_high", "p_value", "effect_size",
            "significant", "n_prompts", "n_templates", "n_names_a", "n_names_b")
    atomic_write_json({"rows": [{k: r[k] for k in keep} for r in res.rows], "meta": res.meta},
                      args.out / "bias.json")
    atomic_savefig(res.plot(), args.out / "figures" / "baseline_bias.png")
    _print_table(res.to_dataframe()[["context", "axis", "gap", "ci_low", "ci_high", "p_value", "significant"]])
    print(f"[mechbias] wrote {args.out / 'bias.json'}", file=sys.stderr)
    return 0


def _print_table(df) -> None:
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(df.to_string(index=False))


def cmd_study(args) -> int:
    from .study import run_study

    return run_study(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechbias", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bias", help="baseline bias per context and axis, with CIs")
    _common(p)
    p.add_argument("--contexts", nargs="+", default=["all"], help="context names or YAML paths ('all' = built-ins)")
    p.add_argument("--axis", nargs="+", default=["race", "gender"], help="demographic axes")
    p.add_argument("--templates", default="all", choices=["all", "selection", "heldout"])
    p.add_argument("--names", default="all", choices=["all", "selection", "heldout"])
    p.set_defaults(func=cmd_bias)

    p = sub.add_parser("study", help="the full study: every method across contexts, a report and figures")
    _common(p)
    p.add_argument("--contexts", nargs="+", default=["all"])
    p.add_argument("--figures", type=Path, default=None, help="also copy the figures into this folder")
    p.add_argument("--quick", action="store_true", help="a small configuration (for tests and smoke runs)")
    p.add_argument("--fresh", action="store_true", help="ignore finished steps in --out and recompute")
    p.set_defaults(func=cmd_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        from .contexts import ContextError
        from .models import ModelLoadError

        if isinstance(err, (ContextError, ModelLoadError, FileNotFoundError)) or type(err) is ValueError:
            print(f"mechbias: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
