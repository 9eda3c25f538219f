"""One evaluation: an intervention against its controls on one context's held-out prompts.

:class:`TransferConfig` says how (controls, bootstrap, capability texts); :class:`EvalSet` holds a
context's held-out prompts and their unmodified scores; :func:`evaluate` returns a typed :class:`Cell`
whose :class:`Effect` puts the absolute change of the gap first (``gap_change`` with its CI from the
crossed templates x names bootstrap), then the relative reduction where it is estimable, then the
perplexity change on the reporting half of the neutral texts. :mod:`mechbias.eval.transfer` builds
matrices of cells.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.answer_columns import check_read
from ..core.choices import check_choices
from ..core.fastpath import answer_unembed, use_resume
from ..core.hooks import hooked
from ..core.precision import compute_precision
from ..core.resume import ResumeCache
from ..core.runner import length_buckets, tokens_per_batch
from ..data.axes import load_axis
from ..data.contexts import Context, design_blocks
from ..data.prompts import PromptSet
from ..interventions.base import Intervention, maybe_apply, stackable_hooks
from .metrics import contrast_passes, contrast_scores, perplexity
from .stats import DEFAULT_BOOT, grid_gap, paired_reduction

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

# ----------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------

#: held-out templates each name meets in an evaluation set (:meth:`EvalSet.build`); 0 would cross them all
DEFAULT_TEMPLATES_PER_NAME = 5


@dataclass
class TransferConfig:
    """How a transfer matrix is evaluated (every field is a command-line flag of every method command)."""

    n_random: int = field(default=3, metadata={"flag": "--random", "help": "draws per control and cell (0: no controls)"})
    controls: tuple[Literal["random", "matched", "matched_cost"], ...] = field(default=("random", "matched"), metadata={
        "help": "controls: random (same count per layer/matrix), matched (same size: neuron magnitude, head "
                "output norm, weight score quantiles), matched_cost (neurons: same single-unit ablation cost)"})
    capability: bool = field(default=True, metadata={"help": "measure the perplexity change on neutral text"})
    neutral_max_texts: int | None = field(default=None, metadata={
        "flag": "--neutral-texts", "help": "reporting-half neutral paragraphs for the perplexity change (none: all 14)"})
    n_boot: int = field(default=DEFAULT_BOOT, metadata={"flag": "--boot", "help": "bootstrap replicates"})
    seed: int = field(default=0, metadata={"help": "seed for splits, bootstrap and sampling"})
    generation: int = field(default=0, metadata={"help": "also sample N numeric answers per prompt of each row "
                                                         "context (parse failures, inlier ratio); 0 = off"})
    generation_names: int = field(default=8, metadata={"help": "names (half per group) for the generation metric"})
    generation_tokens: int = field(default=8, metadata={"help": "tokens sampled per answer (generation metric)"})
    templates_per_name: int = field(default=DEFAULT_TEMPLATES_PER_NAME, metadata={
        "help": "held-out prompts of each column: each name meets about this many of the held-out templates (the "
                "incomplete crossed design, names dealt into held-out templates // N blocks; 5 of the 15 held-out "
                "templates keeps 160 prompts per cell on the audit names); 0: every template meets every name"})
    equivalence_margin: float = field(default=0.05, metadata={
        "flag": "--margin", "help": "equivalence margin in log-odds for within - cross context removal (TOST); "
                                    "fixed before the run and recorded with the result"})

    def __post_init__(self):
        if not self.equivalence_margin > 0:
            raise ValueError(f"equivalence_margin must be > 0, not {self.equivalence_margin}")
        check_choices(self)
        if self.n_random < 0:
            raise ValueError(f"n_random must be >= 0, not {self.n_random}")
        if self.templates_per_name < 0:
            raise ValueError(f"templates_per_name must be >= 0, not {self.templates_per_name}")
        if self.n_boot < 10:
            raise ValueError(f"n_boot must be >= 10, not {self.n_boot}")
        if self.neutral_max_texts is not None and self.neutral_max_texts < 1:
            raise ValueError(f"neutral_max_texts must be >= 1, not {self.neutral_max_texts}")
        if self.generation < 0 or self.generation_names < 2:
            raise ValueError("generation must be >= 0 and generation_names >= 2")


# ----------------------------------------------------------------------------
# evaluation sets and capability
# ----------------------------------------------------------------------------

@dataclass
class EvalSet:
    """The held-out prompts of one context, and its unmodified score grid.

    Scores are computed over whole sequences in length buckets (no shared prefix), so the score of an
    intervention that starts at block ``L`` can resume there from the unmodified residual stream
    (:class:`~mechbias.core.resume.ResumeCache`, kept on the instance and never saved) and equal the full
    forward's. ``resume=False`` in :meth:`scores` forces the full forward.

    Args:
        context: the context's name.
        prompts: the held-out :class:`~mechbias.PromptSet`.
        before: the unmodified scores as a names x templates grid.
        col_group: the group index of each grid column.
    """

    context: str
    prompts: PromptSet
    before: Tensor  # [templates, names]
    col_group: Tensor

    @classmethod
    def build(cls, model: TransformerBridge, ctx: Context, axis: str, *, templates="heldout", names="heldout", seed: int = 0,
              templates_per_name: int = DEFAULT_TEMPLATES_PER_NAME, progress: bool = False) -> EvalSet:
        """Score ``ctx``'s prompts (held-out templates and names by default) on the unmodified model.

        With more templates than ``templates_per_name`` the prompts follow the incomplete crossed design
        (:func:`design_blocks`): each name meets about that many templates, every template meets every race x
        gender cell in equal shares, and the grid's unmet cells are NaN."""
        people = load_axis(axis).split_people(names, seed) if isinstance(names, str) else list(names)
        blocks = design_blocks(ctx, templates, templates_per_name, seed, people)
        ps = ctx.prompts(axis, templates=templates, names=people, seed=seed, blocks=blocks)
        with compute_precision(model, "exact"):
            scores = contrast_scores(model, ps, share_prefix=False, progress=progress)
        mat, _, _, col_group = ps.grid(scores)
        return cls(ctx.name, ps, mat, col_group)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_resume"}

    def _passes(self, model: TransformerBridge) -> list:
        held = self.__dict__.get("_resume")
        if held is None or held[0] is not model:
            passes = contrast_passes(model, self.prompts.texts, self.prompts.positive, self.prompts.negative)
            max_tokens = tokens_per_batch(model)
            held = (model, [(ResumeCache(model, seqs, length_buckets([len(q) for q in seqs], max_tokens)), readout,
                             k, sign, cols) for seqs, readout, k, sign, cols in passes])
            self.__dict__["_resume"] = held
        return held[1]

    def resume_layer(self, model: TransformerBridge, intervention: Intervention | None) -> int:
        """The block the scores of ``intervention`` resume at (0: the full forward runs)."""
        if intervention is None or not use_resume(model):
            return 0
        return min(intervention.first_layer(model), int(model.cfg.n_layers) - 1)

    def scores(self, model: TransformerBridge, intervention: Intervention | None, *, resume: bool = True,
               answer_columns: bool = True) -> Float[Tensor, "templates names"]:
        """The score grid ``[templates, names]`` with ``intervention`` applied (always at exact precision).
        ``resume``: start at the intervention's first block (:mod:`mechbias.core.resume`); ``answer_columns``:
        unembed only the answer tokens' columns (:mod:`mechbias.core.answer_columns`). Both are exact and
        self-checked; ``False`` runs the full forward or the full unembedding."""
        with compute_precision(model, "exact"):
            return self._scores(model, intervention, resume, answer_columns)

    def _scores(self, model: TransformerBridge, intervention: Intervention | None, resume: bool,
                answer_columns: bool) -> Tensor:
        layer = self.resume_layer(model, intervention) if resume else 0
        if layer <= 0:
            scores = contrast_scores(model, self.prompts, intervention=intervention, share_prefix=False,
                                     answer_columns=answer_columns)
        else:
            out = []
            passes = self._passes(model)
            for cache, _, _, _, _ in passes:  # the unmodified residual stream, captured before the intervention applies
                cache.resid(layer)
            with maybe_apply(intervention, model):
                for cache, readout, k, sign, cols in passes:
                    cols = cols if answer_columns else None
                    out.append(sign * check_read(cache.map_last_logits(
                        readout, layer, n_last=k, unembed=lambda n, cols=cols: answer_unembed(model, n, cols)), cols))
            scores = (out[0] if len(out) == 1 else out[0] + out[1]).double()
        mat, _, _, _ = self.prompts.grid(scores)
        return mat

    def scores_many(self, model: TransformerBridge, interventions: Mapping[str, Intervention], *,
                    stack: bool = True) -> dict[str, Tensor]:
        """:meth:`scores` of several interventions (a selection and its control draws). Each block's unmodified
        residual stream is captured once. With ``stack``, the interventions that resume at the same block and
        act through forward hooks alone (:func:`~mechbias.interventions.base.stackable_hooks`) run **stacked**:
        copies of each batch go through one forward, each intervention's hooks acting on its own copy's rows
        (:meth:`~mechbias.core.resume.ResumeCache.stacked_last_logits`); the others run one after another."""
        # by first block, then by name: a stack's members and their order depend on the keys alone, so two
        # callers with the same interventions under the same keys get the same numbers to the last bit
        order = sorted(interventions, key=lambda k: (self.resume_layer(model, interventions[k]), k))
        out: dict[str, Tensor] = {}
        groups: dict[int, list[str]] = {}
        for k in order:
            layer = self.resume_layer(model, interventions[k])
            if stack and layer >= 1 and stackable_hooks(interventions[k], model) is not None:
                groups.setdefault(layer, []).append(k)
            else:
                out[k] = self.scores(model, interventions[k])
        for layer, keys in groups.items():
            if len(keys) == 1:
                out[keys[0]] = self.scores(model, interventions[keys[0]])
                continue
            with compute_precision(model, "exact"):
                grids = self._stacked_scores(model, [interventions[k] for k in keys], layer)
            out.update(zip(keys, grids, strict=True))
        return {k: out[k] for k in interventions}

    def _stacked_scores(self, model: TransformerBridge, ivs: list[Intervention], layer: int) -> list[Tensor]:
        """The score grids of ``ivs`` (all stackable, all resuming at ``layer``), stacked in each forward."""
        state: dict[str, Any] = {"slot": {}, "rows": 0}

        def sliced(k: int, fn: Callable) -> Callable:
            def hook(x: Tensor, hook: Any = None) -> Tensor:
                j = state["slot"].get(k)
                if j is None:
                    return x  # intervention k has no copy in this forward
                lo, hi = j * state["rows"], (j + 1) * state["rows"]
                part = x[lo:hi]
                new = fn(part, hook=hook)
                if new is None or new is part:
                    return x  # changed in place, in x's own rows
                y = x.clone()
                y[lo:hi] = new
                return y
            return hook

        @contextlib.contextmanager
        def chunk(copies: range, rows: int) -> Iterator[None]:
            state["slot"], state["rows"] = {c: j for j, c in enumerate(copies)}, rows
            try:
                yield
            finally:
                state["slot"] = {}

        hooks = [(site, sliced(k, fn)) for k, iv in enumerate(ivs) for site, fn in stackable_hooks(iv, model) or []]
        out = []
        passes = self._passes(model)
        with hooked(model, hooks):
            for cache, readout, n_last, sign, cols in passes:
                out.append(sign * check_read(cache.stacked_last_logits(
                    readout, layer, len(ivs), on_chunk=chunk, n_last=n_last,
                    unembed=lambda n, cols=cols: answer_unembed(model, n, cols), max_tokens=tokens_per_batch(model)),
                    cols))
        scores = (out[0] if len(out) == 1 else out[0] + out[1]).double()
        return [self.prompts.grid(scores[j])[0] for j in range(len(ivs))]


class Capability:
    """Perplexity on a fixed set of neutral texts; each intervention is measured once (memoised)."""

    def __init__(self, model: TransformerBridge, texts: Sequence[str]):
        if not texts:
            raise ValueError("capability needs at least one text")
        self.model, self.texts = model, list(texts)
        self.base = perplexity(model, self.texts)
        self._memo: dict[int, tuple[Intervention, float]] = {}

    def change(self, intervention: Intervention) -> float:
        hit = self._memo.get(id(intervention))
        if hit is None or hit[0] is not intervention:
            hit = (intervention, perplexity(self.model, self.texts, intervention=intervention) - self.base)
            self._memo[id(intervention)] = hit
        return hit[1]


# ----------------------------------------------------------------------------
# cells
# ----------------------------------------------------------------------------

@dataclass
class Effect:
    """The effect of one intervention (or of the mean over a control's draws) on one evaluation set.

    Absolute first: ``gap_change`` = gap after - gap before (log-odds units), its
    95% CI (``ci_low``, ``ci_high``: a t interval whose variance respects the
    templates x names design), ``p_value`` (and ``p_adjusted``, Benjamini-Hochberg
    over the matrix's cells) and ``min_detectable`` (the change detected with
    power 0.8). ``gap_removed`` = ``-sign(gap_before) * gap_change``: positive when
    the bias shrank, whatever its direction. ``reduction`` = 1 - after / before
    only when the gap before is clearly away from 0 (its CI excludes 0);
    otherwise None (not estimable).
    """

    gap_before: float
    gap_after: float
    gap_change: float
    ci_low: float
    ci_high: float
    p_value: float
    min_detectable: float
    gap_removed: float
    reduction: float | None
    reduction_ci_low: float | None
    reduction_ci_high: float | None
    gap_before_ci: list = field(default_factory=list)
    gap_after_ci: list = field(default_factory=list)
    p_adjusted: float | None = None
    perplexity_change: float | None = None
    n_draws: int = 1
    draws: list = field(default_factory=list)  # per-draw gap change (controls)
    draws_perplexity_change: list = field(default_factory=list)

    @property
    def estimable(self) -> bool:
        return self.reduction is not None


_FLAT_SKIP = ("n_draws", "draws", "draws_perplexity_change")


@dataclass
class Cell:
    """One transfer-matrix cell: the intervention selected on ``selected_on``, evaluated on ``evaluated_on``.

    Args:
        selected_on: the context the intervention was selected on.
        evaluated_on: the context whose held-out prompts were scored.
        level: ``"L1"`` on the diagonal (same context), ``"L2"`` off it.
        n_components: the intervention's size (neurons, heads, weights, directions).
        effect: the gap before and after, the change with its 95% CI and p, and the perplexity change.
        controls: control name -> its effect on the same prompts (mean over the draws).
    """

    selected_on: str
    evaluated_on: str
    level: str
    n_components: int
    effect: Effect
    controls: dict[str, Effect] = field(default_factory=dict)

    # the headline numbers as attributes
    def __getattr__(self, name):
        if name in ("effect", "controls"):
            raise AttributeError(name)
        eff = self.__dict__.get("effect")
        if eff is not None and (name in {f.name for f in fields(Effect)} or name == "estimable"):
            return getattr(eff, name)
        raise AttributeError(f"Cell has no attribute {name!r}")

    def as_dict(self) -> dict:
        """A flat dict: the effect's fields, ``random_*`` for the random control, and every control."""
        d = {"selected_on": self.selected_on, "evaluated_on": self.evaluated_on, "level": self.level,
             "n_components": self.n_components}
        d.update({k: v for k, v in asdict(self.effect).items() if k not in _FLAT_SKIP})
        rnd = self.controls.get("random")
        if rnd is not None:
            d.update(random_gap_change=rnd.gap_change, random_ci_low=rnd.ci_low, random_ci_high=rnd.ci_high,
                     random_gap_removed=rnd.gap_removed, random_reduction=rnd.reduction,
                     random_draws=rnd.draws, random_perplexity_change=rnd.perplexity_change)
        d["controls"] = {k: asdict(v) for k, v in self.controls.items()}
        return d

    # dict-style access, for scripts written against the earlier dict cells
    def __getitem__(self, key):
        return self.as_dict()[key]

    def get(self, key, default=None):
        return self.as_dict().get(key, default)

    @classmethod
    def from_dict(cls, d: dict) -> Cell:
        eff_keys = {f.name for f in fields(Effect)}
        effect = Effect(**{k: v for k, v in d.items() if k in eff_keys})
        controls = {k: Effect(**v) for k, v in (d.get("controls") or {}).items()}
        return cls(d["selected_on"], d["evaluated_on"], d.get("level", ""), d.get("n_components", 0), effect, controls)


def _effect(es: EvalSet, after: Tensor, cfg: TransferConfig, ppl: float | None) -> Effect:
    red = paired_reduction(es.before, after, es.col_group, n_boot=cfg.n_boot, seed=cfg.seed)
    sign = float(np.sign(red.gap_before)) or 1.0
    est = red.estimable
    return Effect(red.gap_before, red.gap_after, red.gap_change, red.gap_change_ci[0], red.gap_change_ci[1],
                  red.gap_change_p, red.min_detectable, -sign * red.gap_change,
                  red.reduction if est else None, red.ci_low if est else None, red.ci_high if est else None,
                  list(red.gap_before_ci), list(red.gap_after_ci), None, ppl)


def evaluate(model: TransformerBridge, intervention: Intervention, eval_set: EvalSet,
             controls: Mapping[str, Sequence[Intervention]] | None = None,
             config: TransferConfig | None = None, *, capability: Capability | None = None,
             selected_on: str = "", keep: dict | None = None) -> Cell:
    """Measure ``intervention`` on ``eval_set``, and each group of ``controls`` (name -> draws) beside it.

    A control with several draws is evaluated on the mean score over its draws (each draw's gap change is
    kept).

    Args:
        model: the model.
        intervention: what to evaluate.
        eval_set: the baseline evaluation of one context (:class:`~mechbias.EvalSet`).
        controls: control name -> its draws (interventions of the same kind).
        config: a :class:`~mechbias.TransferConfig`; default settings if ``None``.
        capability: perplexity texts and their baseline; adds perplexity changes to the cell.
        selected_on: the context the intervention was selected on (recorded in the cell).
        keep: if given, receives the score grids (``"after"`` and ``"control/<name>"``) for statistics
            across cells.

    Returns:
        A :class:`~mechbias.Cell`: the gap before and after with CIs, each control's effect, and the
        perplexity change.
    """
    cfg = config or TransferConfig()
    es = eval_set
    ppl = capability.change(intervention) if capability is not None else None
    # every score grid through one call (the study's score job makes the same call with the same keys), so
    # the draws that can share forwards do
    todo: dict[str, Intervention] = {"after": intervention}
    for name, draws in (controls or {}).items():
        todo.update({f"{name}/{i}": d for i, d in enumerate(draws)})
    got = es.scores_many(model, todo)
    after = got["after"]
    grids: dict[str, list[Tensor]] = {}
    ppls: dict[str, list[float]] = {}
    for name, draws in (controls or {}).items():
        draws = list(draws)
        if not draws:
            continue
        grids[name] = [got[f"{name}/{i}"] for i in range(len(draws))]
        ppls[name] = [capability.change(d) for d in draws] if capability is not None else []
    return cell_from_grids(es, after, intervention.n_components, cfg, selected_on=selected_on, ppl=ppl,
                           control_grids=grids, control_ppl=ppls, keep=keep)


def cell_from_grids(es: EvalSet, after: Float[Tensor, "templates names"], n_components: int, config: TransferConfig, *, selected_on: str = "",
                    ppl: float | None = None, control_grids: Mapping[str, Sequence[Tensor]] | None = None,
                    control_ppl: Mapping[str, Sequence[float]] | None = None, keep: dict | None = None) -> Cell:
    """The statistics of one cell from its score grids (what :func:`evaluate` measures; the study's jobs
    compute the grids on workers and call this in the driver). A control with several draws is evaluated
    on the mean score over its draws; each draw's gap change is kept."""
    cfg = config
    cell = Cell(selected_on, es.context, "L1" if selected_on == es.context else "L2", n_components,
                _effect(es, after, cfg, ppl))
    if keep is not None:
        keep["after"] = after
    for name, scores in (control_grids or {}).items():
        scores = list(scores)
        if not scores:
            continue
        pc = list((control_ppl or {}).get(name, []))
        mean = torch.stack(scores).mean(0)
        eff = _effect(es, mean, cfg, float(np.mean(pc)) if pc else None)
        eff.n_draws = len(scores)
        g = np.asarray(es.col_group)
        eff.draws = [grid_gap(x.numpy(), g) - eff.gap_before for x in scores]
        eff.draws_perplexity_change = [float(x) for x in pc]
        cell.controls[name] = eff
        if keep is not None:
            keep[f"control/{name}"] = mean
    return cell


def random_controls(intervention: Intervention, model: TransformerBridge, n: int, seed: int) -> dict[str, list[Intervention]]:
    """``n`` draws of the intervention's own random control."""
    return {"random": [intervention.random_like(model, seed + 101 * (k + 1)) for k in range(n)]} if n else {}
