"""GRADIEND training and feature evaluation."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
from scipy.stats import t as t_dist
from torch import Tensor

from ...core.results import Record, Result, make_meta
from ...data.axes import load_axis, stable_hash
from ...data.contexts import Context, load_context
from ...interventions.weights import WeightEdit
from ...viz.method_figures import plot_gradiend_feature, plot_gradiend_training
from ..base import MethodConfig
from .gradients import ParamSet, batch_gradient, param_set
from .model import ChunkedAdamW, GradiendModel
from .pool import NEUTRAL, GradientPool, Normalizer, gradient_pool
from .texts import feature_texts, neutral_feature_texts

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

_LOG = logging.getLogger(__name__)

# ----------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------

ParamChoice = Literal["down-late", "down", "mlp", "attn", "mlp+attn"]
PARAM_SETS: tuple[str, ...] = get_args(ParamChoice)


@dataclass
class GradiendConfig(MethodConfig):
    """Training settings of GRADIEND, and the edit grid chosen on the training context's selection split."""

    params: ParamChoice = field(default="down-late", metadata={
        "help": "trained parameters: down-late = down-projections of the last quarter of layers (default: "
                "CPU speed), down, mlp (all MLP matrices, the paper's closest), attn, mlp+attn"})
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "restrict to these layers (none: all, "
                                                                          "or the last quarter for down-late)"})
    steps: int = field(default=400, metadata={"help": "most optimizer steps (training stops earlier when the "
                                                      "validation criterion stops improving)"})
    batch_texts: int = field(default=32, metadata={"flag": "--batch", "help": "texts averaged per gradient "
                                                                            "(the paper: 32)"})
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate (in the normalised coordinates)"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "initialisation seeds (best kept)"})
    eval_every: int = field(default=10, metadata={"help": "steps between validation evaluations"})
    patience: int = field(default=5, metadata={"help": "evaluations without improvement before stopping"})
    normalize: bool = field(default=True, metadata={"help": "train in normalised coordinates (centred, per-matrix "
                                                            "scaled inputs and targets), folded back exactly"})
    max_pool_gib: float = field(default=12.0, metadata={"help": "memory limit of the per-name gradient pool"})
    h: tuple[float, ...] = field(default=(-1.0, 0.0, 1.0), metadata={"help": "feature values of the edit grid"})
    alpha: tuple[float, ...] = field(default=(-1.0, -0.3, -0.1, -0.03, 0.03, 0.1, 0.3, 1.0), metadata={
        "help": "learning rates of the edit grid (raw gradient units, as the paper)"})
    max_ppl_increase: float = field(default=0.05, metadata={"help": "largest relative perplexity increase of the "
                                                                    "chosen edit"})
    edit_names: int | None = field(default=None, metadata={"help": "names used to choose the edit (none: all "
                                                                   "selection names)"})
    edit_texts: int = field(default=6, metadata={"help": "neutral paragraphs used to choose the edit"})
    texts_per_name: int = field(default=5, metadata={
        "help": "templates each name's gradient (and edit-choice score) averages: the incomplete crossed design "
                "over the selection templates (5 of 15 keeps the cost of the 10-template contexts); 0: all"})
    neutral: float = field(default=0.5, metadata={
        "help": "neutral batches per group batch (prefixes of selection neutral paragraphs, target 0, validated "
                "with label 0); 0 = off (the paper's gender runs)"})
    shuffled_control: bool = field(default=True, metadata={
        "help": "also train a feature on shuffled group labels; its edit (same h, alpha) is a control"})
    seed: int = field(default=0, metadata={"help": "seed of the splits and batches"})

    def validate(self) -> None:
        if self.steps < 1 or self.batch_texts < 1 or not self.seeds or self.eval_every < 1 or self.patience < 1:
            raise ValueError("steps, batch_texts, eval_every and patience must be >= 1, and seeds non-empty")
        if not 0 <= self.neutral <= 4:
            raise ValueError(f"neutral must be between 0 (off) and 4 neutral batches per group batch, not {self.neutral}")
        if self.texts_per_name < 0:
            raise ValueError(f"texts_per_name must be >= 0, not {self.texts_per_name}")
        if not self.h or not self.alpha:
            raise ValueError("the edit grid needs at least one h and one alpha")


@dataclass
class GradiendResult(Result):
    """A trained GRADIEND feature in raw coordinates (it reads raw gradients and its decoder writes raw
    gradient-space updates), its training curves and feature evaluation."""

    context: str
    axis: str
    param_names: list[str]
    param_shapes: list[list[int]]
    w_e: Tensor
    b_e: Tensor
    w_d: Tensor
    b_d: Tensor
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    seeds: list = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)
    edit: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    result_type = "gradiend"

    @property
    def model(self) -> GradiendModel:
        return GradiendModel.from_state({"w_e": self.w_e, "b_e": self.b_e, "w_d": self.w_d, "b_d": self.b_d})

    @property
    def param_set(self) -> ParamSet:
        return ParamSet(list(self.param_names), [tuple(s) for s in self.param_shapes])

    def edit_for(self, h: float, alpha: float, label: str = "") -> WeightEdit:
        """The weight edit ``α · dec(h)`` as a :class:`WeightEdit`."""
        deltas = self.param_set.unflatten(self.model.decode(h))
        return WeightEdit({k: v.clone() for k, v in deltas.items()}, scale=alpha,
                          label=label or f"GRADIEND {self.context}/{self.axis} h={h:g} alpha={alpha:g}")

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.evaluation.get("values", []))

    def plot(self):
        return plot_gradiend_feature(self)

    def plot_training(self):
        return plot_gradiend_training(self)


def _mean_rows(X: Tensor, idx) -> Tensor:
    """Mean of rows ``idx``, accumulated in place (no copy of the selected rows)."""
    idx = [int(i) for i in np.asarray(idx).reshape(-1)]
    out = X[idx[0]].float().clone()
    for i in idx[1:]:
        out.add_(X[i])
    return out.div_(len(idx))


def _snapshot(gm: GradiendModel) -> dict:
    return {"w_e": gm.w_e.clone(), "b_e": torch.tensor([gm.b_e]), "w_d": gm.w_d.clone(), "b_d": gm.b_d.clone()}


def train_on_pool(pool: GradientPool, cfg: GradiendConfig, *, seed: int, progress: bool = True,
                  normalizer: Normalizer | None = None) -> tuple[GradiendModel, dict, list, list]:
    """Train one seed on the pool's training names; validate every ``eval_every`` steps on its validation
    names (batches of two names of one group). The checkpoint kept is the best by validation Pearson(h, group)
    (the paper's criterion), ties within 0.001 broken by the lower validation MSE; training stops after
    ``patience`` evaluations without improvement. Returns the model in the coordinates it was trained in."""
    n = pool.param_set.numel
    nz = normalizer
    prep_x = nz.inputs if nz is not None else (lambda g: g.float())
    prep_y = nz.targets if nz is not None else (lambda t: t.float())
    train = {g: np.where((pool.groups == g) & ~pool.validation)[0] for g in (0, 1, NEUTRAL)}
    short = [g for g in (0, 1) if len(train[g]) == 0 or ((pool.groups == g) & pool.validation).sum() < 2]
    if short:
        raise ValueError(f"GRADIEND needs training names and at least two validation names in each group; "
                         f"group(s) {short} have too few (names per group: {np.bincount(pool.groups, minlength=2)})")
    use_neutral = cfg.neutral > 0
    if use_neutral and (len(train[NEUTRAL]) == 0 or ((pool.groups == NEUTRAL) & pool.validation).sum() < 2):
        raise ValueError("neutral training needs neutral rows in the pool (gradient_pool(..., neutral=True)) for "
                         "training and at least two for validation")
    val_batches = []
    for g in (0, 1, NEUTRAL) if use_neutral else (0, 1):
        idx = np.where((pool.groups == g) & pool.validation)[0]
        val_batches += [(g, idx[k:k + 2]) for k in range(0, len(idx) - 1, 2)]
    vx = [prep_x(_mean_rows(pool.F, i)) for _, i in val_batches]
    vy = [prep_y(_mean_rows(pool.T, i)) for _, i in val_batches]
    labels = np.array([{0: 1.0, 1: -1.0, NEUTRAL: 0.0}[g] for g, _ in val_batches])
    per_batch = max(1, round(cfg.batch_texts / pool.texts_per_name))
    rng = np.random.default_rng(stable_int(cfg.seed, f"gradiend-batches:{seed}"))
    gm = GradiendModel(n, seed=seed)
    opt = ChunkedAdamW(gm, cfg.lr, cfg.weight_decay, moment_dtype=torch.float32 if n <= 30_000_000 else torch.bfloat16)
    schedule = batch_schedule(cfg.steps, cfg.neutral if use_neutral else 0.0)

    def validate():
        hs = np.array([gm.encode(x) for x in vx])
        mse = float(np.mean([float((gm.decode(h) - y).pow(2).mean()) for h, y in zip(hs, vy, strict=True)]))
        r = float(np.corrcoef(hs, labels)[0, 1]) if hs.std() > 0 else 0.0
        return r, mse, hs

    r0, mse0, _ = validate()
    curve = [{"seed": seed, "step": 0, "val_pearson": r0, "val_mse": mse0}]
    history: list = []
    best = (r0, mse0, 0, _snapshot(gm))
    since = 0
    for step in range(1, cfg.steps + 1):
        g = schedule[step - 1]
        pick = rng.choice(train[g], size=min(per_batch, len(train[g])), replace=False)
        loss = opt.step(prep_x(_mean_rows(pool.F, pick)), prep_y(_mean_rows(pool.T, pick)))
        history.append({"seed": seed, "step": step, "loss": loss})
        if step % cfg.eval_every and step != cfg.steps:
            continue
        r, mse, _hs = validate()
        curve.append({"seed": seed, "step": step, "val_pearson": r, "val_mse": mse})
        if progress:
            _LOG.debug(f"[gradiend] seed {seed} step {step}: loss {loss:.3e}, validation Pearson {r:+.3f}, MSE {mse:.3e}")
        better = abs(r) > abs(best[0]) + 1e-3 or (abs(r) >= abs(best[0]) - 1e-3 and mse < best[1] * (1 - 1e-3))
        if better:
            best, since = (r, mse, step, _snapshot(gm)), 0
        else:
            since += 1
            if since >= cfg.patience:
                break
    r, mse, step, state = best
    out = GradiendModel.from_state(state)
    return out, {"seed": seed, "val_pearson": r, "val_mse": mse, "best_step": step, "steps_run": history[-1]["step"],
                 "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"]}, history, curve


def batch_schedule(steps: int, neutral: float) -> list[int]:
    """The group of each step's batch: groups A and B alternate; with ``neutral`` > 0, neutral batches are
    interleaved at ``neutral`` per gender batch (0.5: every third batch), deterministically."""
    out, acc, g = [], 0.0, 0
    share = neutral / (1.0 + neutral)
    for _ in range(steps):
        acc += share
        if acc >= 1.0 - 1e-9:
            acc -= 1.0
            out.append(NEUTRAL)
        else:
            out.append(g)
            g = 1 - g
    return out


def stable_int(seed: int, key: str) -> int:
    """A 31-bit integer from a seed and a key, the same on every machine."""
    return int(stable_hash(seed, key)[:8], 16)


def train_gradiend(model: TransformerBridge, context: Context | str, axis: str, cfg: GradiendConfig | None = None, *,
                   progress: bool = True, shuffle_labels: bool = False,
                   pool: GradientPool | None = None) -> GradiendResult:
    """Train GRADIEND on a context's selection split; choose the checkpoint and the seed on its validation
    names (half of the selection names). Held-out names and templates are left for :func:`evaluate_feature`.

    ``pool`` reuses per-name gradients already computed (e.g. for the shuffled-label control)."""
    cfg = cfg or GradiendConfig()
    cfg.validate()
    ctx = load_context(context)
    ax = load_axis(axis)
    ps = param_set(model, cfg.params, cfg.layers)
    t0 = time.time()
    if pool is None:
        pool = gradient_pool(model, ctx, ax.name, ps, seed=cfg.seed, max_gib=cfg.max_pool_gib,
                             neutral=cfg.neutral > 0, templates_per_name=cfg.texts_per_name)
    elif pool.param_set.names != ps.names:
        raise ValueError("the gradient pool was computed for other parameters")
    if cfg.neutral == 0 and (pool.groups == NEUTRAL).any():
        pool = pool.subset(np.where(pool.groups != NEUTRAL)[0])
    if shuffle_labels:
        pool = pool.shuffled(cfg.seed)
    train_rows = np.where(~pool.validation)[0]
    nz = Normalizer.fit(pool.F[train_rows], pool.T[train_rows], [math.prod(s) for s in ps.shapes]) \
        if cfg.normalize else None
    train_pool, train_nz = pool, nz
    if nz is not None and pool.nbytes <= 4 * 1024 ** 3:
        # small enough to hold a normalised copy: each step is then a mean of rows, nothing more
        X = torch.stack([nz.inputs(r) for r in pool.F])
        Y = torch.stack([nz.targets(r) for r in pool.T])
        train_pool, train_nz = dataclasses.replace(pool, F=X, T=Y), None
    best: tuple | None = None
    seeds_info: list = []
    history: list = []
    curve: list = []
    for seed in cfg.seeds:
        t1 = time.time()
        gm, info, hist, cur = train_on_pool(train_pool, cfg, seed=seed, progress=progress,
                                            normalizer=train_nz)
        info["seconds"] = round(time.time() - t1, 1)
        seeds_info.append(info)
        history += hist
        curve += cur
        _LOG.info(f"[gradiend] seed {seed}: validation Pearson {info['val_pearson']:+.3f} at step {info['best_step']} "
            f"(loss {info['loss_first']:.3e} -> {info['loss_last']:.3e}, {info['seconds']:.0f} s)")
        key = (round(abs(info["val_pearson"]), 3), -info["val_mse"])
        if best is None or key > best[0]:
            best = (key, gm, info)
    if best is None:
        raise ValueError("GRADIEND: no training seed (cfg.seeds is empty)")
    _, gm, info = best
    del train_pool
    if nz is not None:
        gm = nz.fold(gm)
    if info["val_pearson"] < 0:
        gm.flip()
    meta = make_meta(model, context=ctx.name, axis=ax.name, chosen_seed=info["seed"], group_a=ax.groups[0],
                     shuffled_labels=shuffle_labels, pool_seconds=round(pool.seconds, 1),
                     pool_gib=round(pool.nbytes / 1024 ** 3, 3), pool_dtype=str(pool.F.dtype),
                     train_seconds=round(time.time() - t0, 1), texts_per_name=pool.texts_per_name,
                     names_train=int((~pool.validation & (pool.groups != NEUTRAL)).sum()),
                     names_validation=int((pool.validation & (pool.groups != NEUTRAL)).sum()),
                     neutral_rows_train=int((~pool.validation & (pool.groups == NEUTRAL)).sum()),
                     neutral_rows_validation=int((pool.validation & (pool.groups == NEUTRAL)).sum()),
                     normalizer=nz.summary(ps) if nz is not None else None)
    return GradiendResult(ctx.name, ax.name, ps.names, [list(s) for s in ps.shapes], gm.w_e, torch.tensor([gm.b_e]),
                          gm.w_d, gm.b_d, asdict(cfg), history, seeds_info, meta={**meta, "curve": curve})


# ----------------------------------------------------------------------------
# evaluation of the feature
# ----------------------------------------------------------------------------

@dataclass
class FeatureEvaluation(Record):
    """The encoder's values on held-out names and templates (:func:`evaluate_feature`).

    Args:
        values: per held-out name (and neutral batch), its group, label (+1 group A, -1 group B, 0 neutral)
            and encoder value ``h``.
        stats: per group, the mean, SD, count and 95% t interval of ``h``.
        sign_accuracy: the share of names whose ``h`` has their label's sign.
        pearson: the correlation of ``h`` with the labels (names only).
        auc: how often a group-A name encodes above a group-B name (ties half).
        separates: ``auc > 0.5`` and ``pearson > 0``.
    """

    values: list[dict[str, Any]]
    stats: dict[str, dict[str, float]]
    sign_accuracy: float
    pearson: float
    auc: float
    separates: bool


def evaluate_feature(model: TransformerBridge, res: GradiendResult, *, n_names: int | None = None, n_neutral: int = 8,
                     neutral_batch: int | None = None, split_seed: int = 0, seed: int = 1,
                     templates_per_name: int | None = None) -> FeatureEvaluation:
    """Encoder values on held-out names and templates: one value per held-out name (the mean gradient over
    its held-out templates, the unit GRADIEND trained on; ``templates_per_name``, default the training's, of
    them in the incomplete crossed design), and neutral batches (prefixes of the reporting neutral texts with
    their real next token, no names) of the same size."""
    ps = res.param_set
    gm = res.model
    ax = load_axis(res.axis)
    tpn = int(res.config.get("texts_per_name", 0)) if templates_per_name is None else templates_per_name
    texts = feature_texts(model, res.context, res.axis, templates="heldout", names="heldout", seed=split_seed,
                          templates_per_name=tpn)
    names = list(dict.fromkeys(t.name for t in texts))
    if n_names is not None:
        rng = np.random.default_rng(seed)
        by = {g: [nm for nm in names if next(t.group for t in texts if t.name == nm) == g] for g in (0, 1)}
        names = [nm for g in (0, 1) for nm in sorted(rng.choice(by[g], size=min(n_names // 2, len(by[g])),
                                                                replace=False))]
    values = []
    per = 1
    for nm in names:
        b = [t for t in texts if t.name == nm]
        per = len(b)
        h = gm.encode(batch_gradient(model, ps, [t.text for t in b], [t.factual for t in b]))
        values.append({"group": ax.groups[b[0].group], "label": 1 if b[0].group == 0 else -1, "h": h, "name": nm})
    k = neutral_batch or per
    neutral = neutral_feature_texts(model, n=n_neutral * k)
    for j in range(n_neutral):
        b = neutral[j * k:(j + 1) * k]
        if not b:
            break
        h = gm.encode(batch_gradient(model, ps, [t.text for t in b], [t.factual for t in b]))
        values.append({"group": "neutral", "label": 0, "h": h})
    stats: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(str(v["group"]) for v in values):
        hs = np.array([v["h"] for v in values if v["group"] == name])
        sd = float(hs.std(ddof=1)) if len(hs) > 1 else 0.0
        half = float(t_dist.ppf(0.975, len(hs) - 1)) * sd / np.sqrt(len(hs)) if len(hs) > 1 else float("nan")
        stats[name] = {"mean": float(hs.mean()), "sd": sd, "n": len(hs), "ci_low": float(hs.mean()) - half,
                       "ci_high": float(hs.mean()) + half}
    lab = np.array([v["label"] for v in values if v["label"] != 0])
    hv = np.array([v["h"] for v in values if v["label"] != 0])
    acc = float((np.sign(hv) == lab).mean())
    pear = float(np.corrcoef(hv, lab)[0, 1]) if hv.std() > 0 else 0.0
    # threshold-free: how often a group-A batch encodes above a group-B batch (ties count half).
    # Sign accuracy also needs the encoder's offset to sit between the groups, which a short
    # training run often does not reach (both groups saturate on one side of tanh).
    ha, hb = hv[lab == 1], hv[lab == -1]
    diff = ha[:, None] - hb[None, :]
    auc = float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / max(diff.size, 1))
    out = FeatureEvaluation(values, stats, acc, pear, auc, bool(auc > 0.5 and pear > 0))
    res.evaluation = out.as_dict()  # saved with the result
    return out


