"""GRADIEND training and feature evaluation."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...core.results import Result, make_meta
from ...data.contexts import Context, load_axis, load_context, stable_hash
from ...interventions.weights import WeightEdit
from ...viz.plotting import plot_gradiend_feature
from ..base import MethodConfig
from .gradients import ParamSet, batch_gradient, batch_gradient_pair, param_set, trim_memory
from .model import GradiendModel, _AdamW
from .texts import FeatureText, feature_texts, neutral_feature_texts

# ----------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------

PARAM_SETS = ("mlp", "down", "attn", "mlp+attn")


@dataclass
class GradiendConfig(MethodConfig):
    """Training settings of GRADIEND, and the edit grid chosen on the training context's selection split."""

    params: str = field(default="mlp", metadata={"help": "trained parameters", "choices": PARAM_SETS})
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "restrict to these layers (none: all)"})
    steps: int = field(default=60, metadata={"help": "optimizer steps (each: one factual and one counterfactual "
                                                     "batch gradient)"})
    batch_texts: int = field(default=16, metadata={"flag": "--batch", "help": "texts averaged per gradient "
                                                                            "(the paper: 32)"})
    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "initialisation seeds (best kept)"})
    val_batches: int = field(default=8, metadata={"help": "validation batches (held-out names) for seed selection"})
    h: tuple[float, ...] = field(default=(-1.0, 0.0, 1.0), metadata={"help": "feature values of the edit grid"})
    alpha: tuple[float, ...] = field(default=(-10.0, -1.0, -0.1, 0.1, 1.0, 10.0), metadata={
        "help": "learning rates of the edit grid"})
    max_ppl_increase: float = field(default=0.05, metadata={"help": "largest relative perplexity increase of the "
                                                                    "chosen edit"})
    edit_names: int | None = field(default=None, metadata={"help": "names used to choose the edit (none: all "
                                                                   "selection names)"})
    edit_texts: int = field(default=6, metadata={"help": "neutral paragraphs used to choose the edit"})
    shuffled_control: bool = field(default=True, metadata={
        "help": "also train a feature on shuffled group labels; its edit (same h, alpha) is a control"})
    seed: int = field(default=0, metadata={"help": "seed of the splits and batches"})

    def validate(self) -> None:
        if self.params not in PARAM_SETS:
            raise ValueError(f"params must be one of {PARAM_SETS}, not {self.params!r}")
        if self.steps < 1 or self.batch_texts < 1 or self.val_batches < 2 or not self.seeds:
            raise ValueError("steps and batch_texts must be >= 1, val_batches >= 2, and seeds non-empty")
        if not self.h or not self.alpha:
            raise ValueError("the edit grid needs at least one h and one alpha")


@dataclass
class GradiendResult(Result):
    """A trained GRADIEND feature: the encoder/decoder, its training log and feature evaluation."""

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


def _validation_names(ax, seed: int) -> set[str]:
    """Half of the selection names of every race x gender cell (deterministic)."""
    cells: dict[tuple[str, str], list] = {}
    for p in ax.split_people("selection", seed):
        cells.setdefault((p.race, p.gender), []).append(p)
    out = set()
    for key in sorted(cells):
        ordered = sorted(cells[key], key=lambda p: stable_hash(seed, f"gradiend-val:{p.name}"))
        out |= {p.name for p in ordered[: len(ordered) // 2]}
    return out


def shuffle_group_labels(texts: list[FeatureText], seed: int) -> list[FeatureText]:
    """The same texts with each name's group label drawn at random (half per group); where a label changes,
    factual and counterfactual targets swap. A feature trained on these is a control: it has seen the same
    texts and the same amount of training, but no relation between names and groups."""
    names = sorted({t.name for t in texts})
    rng = np.random.default_rng(seed + 977)
    new = {n: int(g) for n, g in zip(names, rng.permutation([0] * (len(names) // 2) + [1] * (len(names) - len(names) // 2)))}
    out = []
    for t in texts:
        g = new[t.name]
        f, c = (t.factual, t.counterfactual) if g == t.group else (t.counterfactual, t.factual)
        out.append(FeatureText(t.text, g, f, c, t.template, t.name))
    return out


def train_gradiend(model, context: Context | str, axis: str = "gender", cfg: GradiendConfig | None = None, *,
                   progress: bool = True, log=print, shuffle_labels: bool = False) -> GradiendResult:
    """Train GRADIEND on a context's selection split; pick the best seed on a validation part of it.

    The selection names are split in two by a hash (per race x gender cell): the
    training half and the validation half, which chooses the seed. Held-out names
    and templates are left for :func:`evaluate_feature`."""
    cfg = cfg or GradiendConfig()
    ctx = load_context(context)
    ax = load_axis(axis)
    ps = param_set(model, cfg.params, cfg.layers)
    texts = feature_texts(model, ctx, ax.name, templates="selection", names="selection", seed=cfg.seed)
    if shuffle_labels:
        texts = shuffle_group_labels(texts, cfg.seed)
    val_names = _validation_names(ax, cfg.seed)
    train = [t for t in texts if t.name not in val_names]
    val = [t for t in texts if t.name in val_names]
    by_group = {g: [t for t in train if t.group == g] for g in (0, 1)}
    rng = np.random.default_rng(cfg.seed)

    def batch(pool):
        idx = rng.choice(len(pool), size=min(cfg.batch_texts, len(pool)), replace=False)
        return [pool[i] for i in idx]

    # a fixed validation set of class batches, kept on disk in float16 (one gradient in memory at a time)
    val_by = {g: [t for t in val if t.group == g] for g in (0, 1)}
    val_dir = tempfile.TemporaryDirectory(prefix="mechbias-gradiend-")
    buf = torch.empty(ps.numel, dtype=torch.float32)
    buf2 = torch.empty(ps.numel, dtype=torch.float32)
    val_labels = []
    for k in range(cfg.val_batches):
        g = k % 2
        b = [val_by[g][i] for i in rng.choice(len(val_by[g]), size=min(cfg.batch_texts, len(val_by[g])), replace=False)]
        torch.save(batch_gradient(model, ps, [t.text for t in b], [t.factual for t in b], out=buf).half(),
                   Path(val_dir.name) / f"{k}.pt")
        # (half of the buffer's size on disk; read back one at a time)
        val_labels.append(g)

    trim_memory()

    def val_encodings(gm):
        return np.array([gm.encode(torch.load(Path(val_dir.name) / f"{k}.pt")) for k in range(len(val_labels))])

    best, seeds_info, history = None, [], []
    for seed in cfg.seeds:
        t0 = time.time()
        gm = GradiendModel(ps.numel, seed=seed)
        opt = _AdamW(gm, cfg.lr, cfg.weight_decay)
        for step in range(cfg.steps):
            g = step % 2
            b = batch(by_group[g])
            gf, target = batch_gradient_pair(model, ps, [t.text for t in b], [t.factual for t in b],
                                             [t.counterfactual for t in b], out_f=buf, out_t=buf2)
            trim_memory()
            loss = opt.step(gf, target)
            history.append({"seed": seed, "step": step, "loss": loss})
            if progress and (step % 10 == 0 or step == cfg.steps - 1):
                log(f"[gradiend] seed {seed} step {step}: mse {loss:.3e}")
        del opt  # free the optimizer state before anything else is allocated
        trim_memory()
        hs = val_encodings(gm)
        labels = np.array([1.0 if g == 0 else -1.0 for g in val_labels])
        corr = float(np.corrcoef(hs, labels)[0, 1]) if np.std(hs) > 0 else 0.0
        seeds_info.append({"seed": seed, "val_pearson": corr, "seconds": round(time.time() - t0, 1)})
        log(f"[gradiend] seed {seed}: validation Pearson(h, group A) = {corr:+.3f} ({time.time() - t0:.0f} s)")
        if best is None or abs(corr) > abs(best[1]):
            best = (gm, corr, seed)
    val_dir.cleanup()
    del buf, buf2
    gm, corr, seed = best
    if corr < 0:
        gm.flip()
    res = GradiendResult(ctx.name, ax.name, ps.names, [list(s) for s in ps.shapes], gm.w_e, torch.tensor([gm.b_e]),
                         gm.w_d, gm.b_d, asdict(cfg), history, seeds_info,
                         meta=make_meta(model, context=ctx.name, axis=ax.name, chosen_seed=seed,
                                        group_a=ax.groups[0]))
    return res


# ----------------------------------------------------------------------------
# evaluation of the feature
# ----------------------------------------------------------------------------

def evaluate_feature(model, res: GradiendResult, *, batch_texts: int = 8, n_batches: int = 6,
                     n_neutral: int = 6, seed: int = 1, split_seed: int = 0) -> dict:
    """Encoder values on held-out names and templates (group A, group B) and neutral texts."""
    ps = res.param_set
    gm = res.model
    texts = feature_texts(model, res.context, res.axis, templates="heldout", names="heldout", seed=split_seed)
    rng = np.random.default_rng(seed)
    values = []
    for g in (0, 1):
        pool = [t for t in texts if t.group == g]
        for _ in range(n_batches):
            b = [pool[i] for i in rng.choice(len(pool), size=min(batch_texts, len(pool)), replace=False)]
            h = gm.encode(batch_gradient(model, ps, [t.text for t in b], [t.factual for t in b]))
            values.append({"group": load_axis(res.axis).groups[g], "label": 1 if g == 0 else -1, "h": h})
    neutral = neutral_feature_texts(model, n=n_neutral * batch_texts)
    for k in range(n_neutral):
        b = neutral[k * batch_texts:(k + 1) * batch_texts]
        if not b:
            break
        h = gm.encode(batch_gradient(model, ps, [t.text for t in b], [t.factual for t in b]))
        values.append({"group": "neutral", "label": 0, "h": h})
    stats = {}
    for name in dict.fromkeys(v["group"] for v in values):
        hs = np.array([v["h"] for v in values if v["group"] == name])
        stats[name] = {"mean": float(hs.mean()), "sd": float(hs.std(ddof=1)) if len(hs) > 1 else 0.0, "n": len(hs)}
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
    out = {"values": values, "stats": stats, "sign_accuracy": acc, "pearson": pear, "auc": auc,
           "separates": bool(auc > 0.5 and pear > 0)}
    res.evaluation = out
    return out


