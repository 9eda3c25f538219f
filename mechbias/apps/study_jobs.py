"""The study's work as content-addressed jobs (see :mod:`mechbias.apps.jobs`).

Job kinds (each a function of the model, its JSON parameters and the parts of
the jobs it reads):

=============  =====================================================  ==========================
kind           computes                                               shared by
=============  =====================================================  ==========================
axis_choice    the axis, chosen on the selection split                the study
baseline       gaps per context and axis (all prompts), its figure    the study
evalset        a context's held-out prompts and unmodified scores     every method
perplexity     perplexity of the reporting neutral texts (the base)   every method
perplexities   perplexity under one row's intervention and draws      --
profile        unit sizes and ablation costs (matched controls)       every method
select         one method's selection on one context                  --
controls       the control draws of a selection                       --
scores         the score grids of one row's intervention and its      --
               control draws on one context
generation     the generation metric of a selection                   --
analyze        a method's own analyses over its selections            --
=============  =====================================================  ==========================

A method step is a planner: selections (and the shared jobs) -> controls ->
scores, perplexities and generation -> the transfer matrix, assembled in the
driver by :func:`mechbias.eval.transfer.cell_from_grids` (the same statistics
as :func:`~mechbias.eval.transfer.transfer_matrix`) -> the method's analyses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from ..core.results import atomic_savefig, make_meta
from ..data.contexts import load_context
from ..data.leakage import selection_phase, split_fold
from ..data.neutral import neutral_texts
from ..eval.cells import DEFAULT_TEMPLATES_PER_NAME, EvalSet, TransferConfig, cell_from_grids
from ..eval.crossfit import crossfit_from_fits
from ..eval.generation import generation_cost
from ..eval.metrics import measure_bias, perplexity
from ..eval.records import RowInfo
from ..eval.rows import baseline_rows, make_row_info
from ..eval.transfer import TransferMatrix, finish_matrix
from ..interventions.base import Intervention
from ..interventions.profile import unit_profile
from ..methods.base import Method, MethodConfig, Selection, get_method
from .jobs import Job, Planner, Results, WorkerContext, job_kind

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

# ----------------------------------------------------------------------------
# job kinds
# ----------------------------------------------------------------------------

@job_kind("axis_choice", version=2)
def _axis_choice(ctx: WorkerContext, p: dict, d: dict) -> dict:
    return {"value": choose_axis(ctx.model, p["contexts"], p["axes"], seed=p["seed"], n_boot=p["n_boot"])}


#: the baseline scores every template and name; each name meets 10 of the 30 templates (640 prompts per context
#: and axis, as many as the full grid of 10 templates did)
BASELINE_TEMPLATES_PER_NAME = 10


@job_kind("baseline", version=2)
def _baseline(ctx: WorkerContext, p: dict, d: dict) -> dict:
    res = measure_bias(ctx.model, list(p["contexts"]), list(p["axes"]), n_boot=p["n_boot"], seed=p["seed"],
                       templates_per_name=BASELINE_TEMPLATES_PER_NAME)
    res.save(ctx.folder / "result")
    (ctx.folder / "figures").mkdir()
    atomic_savefig(res.plot(), ctx.folder / "figures" / "baseline_bias.png", dpi=110, bbox_inches="tight")
    return {"value": res.rows}


def _fold(p: dict):
    """The split and fold a job of a cross-fit runs in (absent: the fixed split, fold 0, whose jobs' keys stay
    those of the study's own)."""
    return split_fold(p.get("fold", 0), p.get("split", 0))


@job_kind("evalset", version=3)
def _evalset(ctx: WorkerContext, p: dict, d: dict) -> dict:
    with _fold(p):
        return {"value": EvalSet.build(ctx.model, load_context(p["context"]), p["axis"], seed=p["seed"],
                                       templates_per_name=p["templates_per_name"])}


@job_kind("perplexity", version=2)
def _perplexity(ctx: WorkerContext, p: dict, d: dict) -> dict:
    texts = neutral_texts(p["max_texts"], split="reporting")
    return {"value": float(perplexity(ctx.model, texts, intervention=d.get("iv")))}


@job_kind("perplexities")
def _perplexities(ctx: WorkerContext, p: dict, d: dict) -> dict:
    """Perplexity under one row's intervention and each of its control draws (parts ``after``, ``random/0``,
    ...), those starting at the same block one after another so they share its kept residual stream."""
    texts = neutral_texts(p["max_texts"], split="reporting")
    ivs = {k[len("iv/"):]: v for k, v in d.items() if k.startswith("iv/")}
    order = sorted(ivs, key=lambda k: ivs[k].first_layer(ctx.model))
    return {k: float(perplexity(ctx.model, texts, intervention=ivs[k])) for k in order}


@job_kind("profile")
def _profile(ctx: WorkerContext, p: dict, d: dict) -> dict:
    return {"value": unit_profile(ctx.model)}


@job_kind("select")
def _select(ctx: WorkerContext, p: dict, d: dict) -> dict:
    method = get_method(p["method"])(d["config"], seed=p["seed"])
    with _fold(p):
        iv = method(ctx.model, p["context"], p["axis"])
    sel = method.selections[load_context(p["context"]).name]
    return {"selection": sel, "intervention": iv, "own_controls": dict(sel.controls)}


@job_kind("controls")
def _controls(ctx: WorkerContext, p: dict, d: dict) -> dict:
    iv = d["iv"]
    controls = iv.controls(ctx.model, p["n_random"], p["seed"], profile=d.get("profile"), kinds=tuple(p["kinds"]))
    if p["n_random"] > 0:
        controls.update(d["own"] or {})
    parts: dict[str, Any] = {"names": {k: len(v) for k, v in controls.items() if len(v)}}
    for k, draws in controls.items():
        for i, draw in enumerate(draws):
            parts[f"{k}/{i}"] = draw
    return parts


@job_kind("scores", version=3)  # 3: draws stacked in shared forwards
def _scores(ctx: WorkerContext, p: dict, d: dict) -> dict:
    """The score grids of one row's intervention and all its control draws on one evaluation set (parts
    ``after``, ``random/0``, ...): one job, so the draws share the unmodified residual stream they resume from."""
    ivs = {k[len("iv/"):]: v for k, v in d.items() if k.startswith("iv/")}
    return d["evalset"].scores_many(ctx.model, ivs)


@job_kind("generation")
def _generation(ctx: WorkerContext, p: dict, d: dict) -> dict:
    return {"value": generation_cost(ctx.model, load_context(p["context"]), p["axis"], d["iv"],
                                     n_samples=p["n_samples"], n_names=p["n_names"],
                                     max_new_tokens=p["max_new_tokens"], seed=p["seed"])}


@job_kind("analyze")
def _analyze(ctx: WorkerContext, p: dict, d: dict) -> dict:
    method = get_method(p["method"])(d["config"], seed=p["seed"])
    # keyed by the contexts' names, as the selections and the transfer matrix are (rows may be file paths)
    method.selections = {load_context(r).name: d[f"selection/{r}"] for r in p["rows"]}
    eval_sets = {load_context(c).name: d[f"evalset/{c}"] for c in p["cols"]}
    analysis = method.analyze(ctx.model, p["axis"], ctx.folder, quick=p["quick"], transfer=d["transfer"],
                              eval_sets=eval_sets, n_boot=p["n_boot"], **d["analyze_kw"])
    return {"value": analysis}


class AxisCandidate(TypedDict):
    """One axis's selection-split evidence in :func:`choose_axis`."""

    axis: str
    significant_contexts: int
    mean_abs_t: float
    gaps: dict[str, list[float]]  # per context: gap, CI low, CI high


class AxisChoice(TypedDict):
    """The axis the study runs on (``axis_choice.json``), chosen on the selection split alone."""

    axis: str
    rule: str
    candidates: list[AxisCandidate]


def choose_axis(model: TransformerBridge, contexts, axes, *, seed: int = 0, n_boot: int = 1000) -> AxisChoice:
    """The axis with the most contexts whose gap on the **selection** split (selection templates x selection
    names) has a 95% CI excluding 0; ties broken by the larger mean |gap / se|. No held-out prompt is read."""
    rows: list[AxisCandidate] = []
    with selection_phase("axis choice"):
        for a in axes:
            res = measure_bias(model, list(contexts), a, templates="selection", names="selection", n_boot=n_boot,
                               seed=seed, templates_per_name=DEFAULT_TEMPLATES_PER_NAME)
            sig = sum(1 for r in res.rows if r["ci_low"] > 0 or r["ci_high"] < 0)
            t = float(np.mean([abs(r["gap"]) / max((r["ci_high"] - r["ci_low"]) / 3.92, 1e-12) for r in res.rows]))
            rows.append({"axis": a, "significant_contexts": sig, "mean_abs_t": t,
                         "gaps": {r["context"]: [r["gap"], r["ci_low"], r["ci_high"]] for r in res.rows}})
    best = max(rows, key=lambda r: (r["significant_contexts"], r["mean_abs_t"]))
    return {"axis": best["axis"], "rule": "most contexts with a significant selection-split gap, then mean |t|",
            "candidates": rows}


# ----------------------------------------------------------------------------
# planners
# ----------------------------------------------------------------------------

class Shared:
    """The jobs every method step reads (one per study, so they are computed once)."""

    def __init__(self, salt: str, contexts: list[str], axis: str, seed: int,
                 templates_per_name: int = DEFAULT_TEMPLATES_PER_NAME):
        self.salt, self.axis, self.seed = salt, axis, seed
        self.templates_per_name = templates_per_name
        self.evalsets = {c: Job("evalset", {"context": c, "axis": axis, "seed": seed,
                                            "templates_per_name": templates_per_name}, salt=salt,
                                label=f"evalset {c}") for c in contexts}
        self._ppl: dict[Any, Job] = {}
        self._folds: dict[tuple[str, int, int], Job] = {}
        self.profile = Job("profile", {}, salt=salt, label="profile")

    def evalset(self, context: str, split: int = 0, fold: int = 0) -> Job:
        """A context's evaluation set in one split and fold of a cross-fit (the fixed split's fold 0 is the
        study's own)."""
        if (split, fold) == (0, 0):
            return self.evalsets[context]
        key = (context, split, fold)
        if key not in self._folds:
            self._folds[key] = Job("evalset", {"context": context, "axis": self.axis, "seed": self.seed,
                                               "templates_per_name": self.templates_per_name, "split": split,
                                               "fold": fold}, salt=self.salt,
                                   label=f"evalset {context} (split {split}, fold {fold})")
        return self._folds[key]

    def perplexity(self, max_texts: int | None, iv: tuple[Job, str] | None = None, label: str = "") -> Job:
        key = (max_texts, iv[0].key if iv else None, iv[1] if iv else None)
        if key not in self._ppl:
            self._ppl[key] = Job("perplexity", {"max_texts": max_texts}, deps={"iv": iv} if iv else {},
                                 salt=self.salt, label=label or "perplexity base")
        return self._ppl[key]


def axis_planner(salt: str, contexts: list[str], axes: list[str], seed: int, n_boot: int) -> Planner:
    """Plan the axis choice on the selection split (one job)."""
    job = Job("axis_choice", {"contexts": contexts, "axes": axes, "seed": seed, "n_boot": n_boot}, salt=salt,
              label="axis choice")
    res = yield [job]
    return res(job)


def baseline_planner(salt: str, contexts: list[str], axes: list[str], seed: int, n_boot: int) -> Planner:
    """Plan the baseline bias of every context and axis (one job)."""
    job = Job("baseline", {"contexts": contexts, "axes": axes, "seed": seed, "n_boot": n_boot}, salt=salt,
              label="baseline")
    res = yield [job]
    return {"rows": res(job), "files": res.files(job), "figures": ["baseline_bias.png"]}


def method_planner(shared: Shared, step: str, cls: type[Method], config: MethodConfig, tcfg: TransferConfig,
                   rows: list[str], cols: list[str], *, quick: bool, analyze_kw: dict, model_meta: dict,
                   crossfit_splits: int = 0) -> Planner:
    """One method step: select on each row, draw controls, score every intervention on every column, assemble
    the transfer matrix, run the method's analyses. Returns what :func:`write_method_step` writes."""
    salt, axis, seed = shared.salt, shared.axis, shared.seed
    if tcfg.templates_per_name != shared.templates_per_name:
        raise ValueError(f"the step's templates_per_name ({tcfg.templates_per_name}) differs from the shared "
                         f"evaluation sets' ({shared.templates_per_name})")
    cfg_d = config.to_dict()
    sel = {r: Job("select", {"method": cls.name, "config": cfg_d, "context": r, "axis": axis, "seed": seed},
                  inputs={"config": config}, salt=salt, label=f"{step}: select on {r}") for r in rows}
    needs_profile = tcfg.n_random > 0 and any(k != "random" for k in tcfg.controls)
    base = shared.perplexity(tcfg.neutral_max_texts) if tcfg.capability else None
    first = [*sel.values(), *(shared.evalsets[c] for c in cols), *([base] if base else []),
             *([shared.profile] if needs_profile else [])]
    res: Results = yield first

    ctl = {r: Job("controls", {"n_random": tcfg.n_random, "seed": seed, "kinds": list(tcfg.controls)},
                  deps={"iv": (sel[r], "intervention"), "own": (sel[r], "own_controls"),
                        **({"profile": (shared.profile, "value")} if needs_profile else {})},
                  salt=salt, label=f"{step}: controls of {r}") for r in rows}
    res = yield list(ctl.values())

    draws = {r: res(ctl[r], "names") for r in rows}
    ivs: dict[str, dict[str, tuple[Job, str]]] = {}  # row -> which -> (job, part)
    for r in rows:
        ivs[r] = {"after": (sel[r], "intervention")}
        for name, n in draws[r].items():
            for i in range(n):
                ivs[r][f"{name}/{i}"] = (ctl[r], f"{name}/{i}")
    score = {(r, c): Job("scores", {"which": sorted(ivs[r])},
                         deps={**{f"iv/{which}": src for which, src in ivs[r].items()},
                               "evalset": (shared.evalsets[c], "value")},
                         salt=salt, label=f"{step}: {r} on {c} ({len(ivs[r])} interventions)")
             for r in rows for c in cols}
    ppl = ({r: Job("perplexities", {"max_texts": tcfg.neutral_max_texts, "which": sorted(ivs[r])},
                   deps={f"iv/{which}": src for which, src in ivs[r].items()}, salt=salt,
                   label=f"{step}: perplexity of {r} ({len(ivs[r])} interventions)")
            for r in rows} if tcfg.capability else {})
    gen = ({r: Job("generation", {"context": r, "axis": axis, "n_samples": tcfg.generation,
                                  "n_names": tcfg.generation_names, "max_new_tokens": tcfg.generation_tokens,
                                  "seed": seed}, deps={"iv": (sel[r], "intervention")}, salt=salt,
                   label=f"{step}: generation of {r}") for r in rows} if tcfg.generation else {})
    res = yield [*score.values(), *ppl.values(), *gen.values()]

    # the transfer matrix, from the grids (the same statistics as transfer_matrix)
    # rows and columns are context references (a name, or a user file's path); results use the contexts' names
    nm = {x: load_context(x).name for x in {*rows, *cols}}
    base_ppl = res(base) if base else None
    ivs_r = {r: res(sel[r], "intervention") for r in rows}
    pcs = {r: ({name: [res(ppl[r], f"{name}/{i}") - base_ppl for i in range(n)] for name, n in draws[r].items()}
               if base else None) for r in rows}
    after_ppls = {r: res(ppl[r], "after") - base_ppl if base else None for r in rows}

    def row_info_of(r: str) -> RowInfo:
        controls = {name: [res(ctl[r], f"{name}/{i}") for i in range(n)] for name, n in draws[r].items()}
        return make_row_info(nm[r], ivs_r[r], controls, base_ppl, after_ppls[r], pcs[r],
                             res(gen[r]) if gen else None)

    def cell_kw_of(r: str, c: str) -> dict:
        cg = {name: [res(score[(r, c)], f"{name}/{i}") for i in range(n)] for name, n in draws[r].items()}
        return {"ppl": after_ppls[r], "control_grids": cg, "control_ppl": pcs[r]}

    meta = {**model_meta, "method": cls.title, "axis": axis, "contexts": [nm[r] for r in rows],
            "precision": {"selection": config.precision, "evaluation": "exact"}}
    tm = assemble_matrix(cls.title, axis, rows, cols, nm, {nm[c]: res(shared.evalsets[c]) for c in cols}, ivs_r,
                         lambda r, c: res(score[(r, c)], "after"), tcfg, meta, row_info_of, cell_kw_of)

    cf = (yield from crossfit_planner(shared, step, cls, config, tcfg, rows, cols, crossfit_splits, model_meta)) \
        if crossfit_splits else None

    n_boot = min(tcfg.n_boot, 1000)
    an = Job("analyze", {"method": cls.name, "config": cfg_d, "seed": seed, "axis": axis, "rows": rows, "cols": cols,
                         "quick": quick, "n_boot": n_boot, "analyze_kw": _jsonable_kw(analyze_kw),
                         "transfer": sorted(j.key for j in [*score.values(), *ppl.values(), *gen.values()])},
             deps={**{f"selection/{r}": (sel[r], "selection") for r in rows},
                   **{f"evalset/{c}": (shared.evalsets[c], "value") for c in cols}},
             inputs={"config": config, "transfer": tm, "analyze_kw": dict(analyze_kw)}, salt=salt,
             label=f"{step}: analyses")
    res = yield [an]
    selections: dict[str, Selection] = {nm[r]: res(sel[r], "selection") for r in rows}
    all_jobs = [*first, *ctl.values(), *score.values(), *ppl.values(), *gen.values(), an]
    return {"transfer": tm, "selections": selections, "analysis": res(an), "files": res.files(an),
            "jobs": all_jobs, "crossfit": cf}


def crossfit_planner(shared: Shared, step: str, cls: type[Method], config: MethodConfig, tcfg: TransferConfig,
                     rows: list[str], cols: list[str], splits: int, model_meta: dict) -> Planner:
    """The step's transfer matrix cross-fitted (:func:`mechbias.eval.crossfit.crossfit_from_fits`): per split and
    fold a selection on that fold's selection half and the cells on its held-out half. The fits carry no
    controls and no capability texts (their cells' bias removed and intervals do not depend on them); the
    fixed split's fold 0 reuses the study's own selections and evaluation sets. Returns the :class:`CrossFit`."""
    salt, axis, seed = shared.salt, shared.axis, shared.seed
    cfg_d = config.to_dict()
    fits = [(s, f) for s in range(splits) for f in (0, 1)]

    def fold_params(s: int, f: int) -> dict:
        return {} if (s, f) == (0, 0) else {"split": s, "fold": f}

    sel = {(s, f, r): Job("select", {"method": cls.name, "config": cfg_d, "context": r, "axis": axis, "seed": seed,
                                     **fold_params(s, f)}, inputs={"config": config}, salt=salt,
                          label=f"{step}: select on {r}" + (f" (split {s}, fold {f})" if (s, f) != (0, 0) else ""))
           for s, f in fits for r in rows}
    ev = {(s, f, c): shared.evalset(c, s, f) for s, f in fits for c in cols}
    # the fixed split's fold 0 was computed by the step's first stage: yielding it again would make it its own
    # successor in the run's graph (a planner's stages are its jobs' dependencies)
    res: Results = yield [j for (s, f, _), j in [*sel.items(), *ev.items()] if (s, f) != (0, 0)]
    score = {(s, f, r, c): Job("scores", {"which": ["after"]},
                               deps={"iv/after": (sel[(s, f, r)], "intervention"),
                                     "evalset": (ev[(s, f, c)], "value")},
                               salt=salt, label=f"{step}: cross-fit split {s} fold {f}: {r} on {c}")
             for s, f in fits for r in rows for c in cols}
    res = yield list(score.values())
    cf_cfg = dataclasses.replace(tcfg, n_random=0, controls=(), capability=False, generation=0)
    nm = {x: load_context(x).name for x in {*rows, *cols}}
    matrices = []
    for s, f in fits:
        ivs_r = {r: res(sel[(s, f, r)], "intervention") for r in rows}

        def after(r: str, c: str, s: int = s, f: int = f) -> Any:
            return res(score[(s, f, r, c)], "after")

        def row_info_of(r: str, ivs_r: dict = ivs_r) -> RowInfo:  # no controls, perplexity or generation
            return make_row_info(nm[r], ivs_r[r], {}, None, None, None, None)

        meta = {**model_meta, "method": cls.title, "axis": axis, "split": s, "fold": f}
        matrices.append((s, f, assemble_matrix(cls.title, axis, rows, cols, nm,
                                               {nm[c]: res(ev[(s, f, c)]) for c in cols}, ivs_r, after, cf_cfg,
                                               meta, row_info_of, lambda r, c: {})))
    return crossfit_from_fits(matrices, [nm[r] for r in rows], [nm[c] for c in cols], splits, cls.title, axis,
                              dict(model_meta))


def assemble_matrix(title: str, axis: str, rows: list[str], cols: list[str], nm: dict[str, str],
                    eval_sets: dict[str, EvalSet], ivs: dict[str, Intervention],
                    after: Callable[[str, str], Any], tcfg: TransferConfig, meta: dict,
                    row_info_of: Callable[[str], RowInfo], cell_kw_of: Callable[[str, str], dict]) -> TransferMatrix:
    """A transfer matrix from finished score grids (the statistics of :func:`~mechbias.eval.transfer.transfer_matrix`):
    one cell per row and column from ``after(r, c)`` (the grid of row r's intervention on column c) and
    ``cell_kw_of(r, c)`` (controls and perplexity, where the caller has them), one row record per row.
    ``rows``/``cols`` are context references and ``nm`` their names (results use the names)."""
    cells, row_info, grids = [], [], {}
    for r in rows:
        row_info.append(row_info_of(r))
        for c in cols:
            kept: dict = {}
            cells.append(cell_from_grids(eval_sets[nm[c]], after(r, c), ivs[r].n_components, tcfg,
                                         selected_on=nm[r], keep=kept, **cell_kw_of(r, c)))
            grids.update({f"{k}/{nm[r]}/{nm[c]}": v for k, v in kept.items()})
    names_r, names_c = [nm[r] for r in rows], [nm[c] for c in cols]
    return finish_matrix(title, axis, names_r, names_c, eval_sets, cells, row_info,
                         baseline_rows(eval_sets, names_c, tcfg), tcfg, meta, grids, {nm[r]: ivs[r] for r in rows})


def _jsonable_kw(kw: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}


def model_meta(model: TransformerBridge) -> dict[str, Any]:
    """Result metadata without the creation time (a study's results do not depend on when they ran)."""
    meta = make_meta(model)
    meta.pop("created", None)
    return meta
