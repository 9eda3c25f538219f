"""GRADIEND's training data as a pool of per-name gradients, and the coordinates it trains in.

The base model does not change while GRADIEND trains, so every gradient it will see is fixed: one
factual gradient and one target (factual - counterfactual) per name, averaged over that name's
templates, computed once. A training batch is the mean of several names' gradients of one group
(the paper's batch of 32 texts = about 6-7 names x 5 templates); a shuffled-label control is the same
pool with some names' labels swapped (factual <-> counterfactual: F' = F - T, T' = -T), so it needs no
second pass through the model.

:class:`Normalizer` is the change of coordinates that lets the optimiser move (issue: the raw
gradients have entries ~1e-3, the target's per-entry RMS ~5e-3, and AdamW moves each coordinate by
about ``lr`` per step, so the decoder never reached its target and the loss fell 2% in 30 steps):

* inputs are centred on the training mean and divided per parameter matrix by the RMS of the centred
  entries, then scaled to unit expected L2 norm (``/ sqrt(n)``): the encoder's dot product starts O(1/sqrt(n))
  and every matrix contributes in proportion to its size, not to its gradient scale;
* targets are divided per parameter matrix by their RMS and multiplied by ``target_scale`` (0.1), so a
  decoder entry reaches its target in ~``target_scale / lr`` AdamW steps.

Both maps are affine, so a model trained in these coordinates is folded back exactly into one that
reads raw gradients and writes raw gradient-space updates (:meth:`Normalizer.fold`): the edit
``theta + alpha * dec(h)`` is then the paper's formula in the paper's units.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ...data.axes import load_axis, stable_hash
from ...data.contexts import Context, load_context
from .gradients import ParamSet, batch_gradient, batch_gradient_pair, trim_memory
from .model import GradiendModel
from .texts import feature_texts, neutral_training_rows

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

_LOG = logging.getLogger(__name__)

TARGET_SCALE = 0.1
NEUTRAL = 2  # the group index of neutral rows


@dataclass
class Normalizer:
    """Affine coordinates of GRADIEND training: ``x = (g - mean) * a``, ``y = t * b``, with ``a`` and ``b``
    constant within each parameter matrix (``sizes``)."""

    mean: Tensor            # (n,) training mean of the raw inputs
    in_scale: Tensor        # (groups,) multiplier a of each matrix's inputs
    out_scale: Tensor       # (groups,) multiplier b of each matrix's targets
    sizes: list[int] = field(default_factory=list)

    @classmethod
    def fit(cls, inputs: Float[Tensor, "n params"], targets: Float[Tensor, "n params"], sizes: list[int],
            target_scale: float = TARGET_SCALE) -> Normalizer:
        """From training inputs and targets (rows: one gradient each)."""
        n = inputs.shape[1]
        mean = inputs.float().mean(0)
        a, b = [], []
        lo = 0
        for k in sizes:
            x = inputs[:, lo:lo + k].float() - mean[lo:lo + k]
            rms_in = float(x.pow(2).mean().sqrt())
            rms_out = float(targets[:, lo:lo + k].float().pow(2).mean().sqrt())
            a.append(1.0 / (rms_in * math.sqrt(n)) if rms_in > 0 else 0.0)
            b.append(target_scale / rms_out if rms_out > 0 else 0.0)
            lo += k
        return cls(mean, torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), list(sizes))

    def _per_entry(self, scales: Tensor) -> Tensor:
        return torch.repeat_interleave(scales.float(), torch.tensor(self.sizes))

    def inputs(self, g: Float[Tensor, " params"]) -> Float[Tensor, " params"]:
        """An input gradient, normalised as in training."""
        return (g.float() - self.mean) * self._per_entry(self.in_scale)

    def targets(self, t: Float[Tensor, " params"]) -> Float[Tensor, " params"]:
        """A target gradient, normalised as in training."""
        return t.float() * self._per_entry(self.out_scale)

    def fold(self, gm: GradiendModel) -> GradiendModel:
        """The same model in raw coordinates: ``encode_raw(g) = encode(inputs(g))`` and
        ``decode_raw(h) = decode(h) / b``."""
        a = self._per_entry(self.in_scale)
        inv_b = self._per_entry(torch.where(self.out_scale > 0, 1.0 / self.out_scale, torch.zeros_like(self.out_scale)))
        w_e = gm.w_e * a
        b_e = float(gm.b_e - torch.dot(w_e.double(), self.mean.double()))
        return GradiendModel.from_state({"w_e": w_e, "b_e": torch.tensor([b_e]), "w_d": gm.w_d * inv_b,
                                         "b_d": gm.b_d * inv_b})

    def summary(self, ps: ParamSet) -> list[dict]:
        return [{"param": nme, "input_rms": 1.0 / (float(a) * math.sqrt(self.mean.numel())) if a else 0.0,
                 "target_rms": TARGET_SCALE / float(b) if b else 0.0}
                for nme, a, b in zip(ps.names, self.in_scale, self.out_scale, strict=True)]


def validation_names(ax, seed: int) -> set[str]:
    """Half of the selection names of every race x gender cell (deterministic): GRADIEND's validation
    names (checkpoint and seed choice); the other half trains."""
    cells: dict[tuple[str, str], list] = {}
    for p in ax.split_people("selection", seed):
        cells.setdefault((p.race, p.gender), []).append(p)
    out = set()
    for key in sorted(cells):
        ordered = sorted(cells[key], key=lambda p: stable_hash(seed, f"gradiend-val:{p.name}"))
        out |= {p.name for p in ordered[: len(ordered) // 2]}
    return out


@dataclass
class GradientPool:
    """One factual gradient ``F[i]`` and target ``T[i]`` per name (the mean over its selection templates),
    and optionally neutral rows (group 2: the mean gradient of a few neutral prefixes' real next tokens,
    target 0)."""

    param_set: ParamSet
    names: list[str]
    groups: np.ndarray      # 0 = group A, 1 = group B, 2 = neutral text
    validation: np.ndarray  # bool: a validation name
    F: Tensor               # (names, n)
    T: Tensor               # (names, n)
    texts_per_name: int
    seconds: float = 0.0

    @property
    def nbytes(self) -> int:
        return self.F.numel() * self.F.element_size() + self.T.numel() * self.T.element_size()

    def subset(self, rows) -> GradientPool:
        idx = [int(i) for i in rows]
        return GradientPool(self.param_set, [self.names[i] for i in idx], self.groups[idx], self.validation[idx],
                            self.F[idx], self.T[idx], self.texts_per_name, self.seconds)

    def shuffled(self, seed: int) -> GradientPool:
        """Group labels drawn at random per name (half per group, within training and within validation);
        where a label changes, factual and counterfactual swap: F' = F - T, T' = -T. Exact: the same
        gradients the model would give for the swapped targets."""
        rng = np.random.default_rng(seed + 977)
        new = self.groups.copy()
        for part in (False, True):
            idx = np.where((self.validation == part) & (self.groups != NEUTRAL))[0]
            lab = np.array([0] * (len(idx) // 2) + [1] * (len(idx) - len(idx) // 2))
            new[idx] = rng.permutation(lab)
        flip = torch.from_numpy(new != self.groups)
        F, T = self.F.clone(), self.T.clone()
        F[flip] = (self.F[flip].float() - self.T[flip].float()).to(F.dtype)
        T[flip] = -self.T[flip]
        return GradientPool(self.param_set, self.names, new, self.validation, F, T, self.texts_per_name, self.seconds)


def pool_bytes(ps: ParamSet, n_names: int, dtype: torch.dtype) -> int:
    """Bytes the gradient pool of ``n_names`` names needs at ``dtype``."""
    return 2 * n_names * ps.numel * torch.empty(0, dtype=dtype).element_size()


def gradient_pool(model: TransformerBridge, context: Context | str, axis: str, ps: ParamSet, *, seed: int = 0,
                  max_gib: float = 12.0, max_tokens: int = 400, neutral: bool = False,
                  templates_per_name: int = 5) -> GradientPool:
    """Per-name gradients on the context's selection templates and names, and with ``neutral`` the neutral
    rows of the selection neutral paragraphs (half of the paragraphs validate); ``templates_per_name`` > 0: each
    name's gradient averages about that many selection templates (the incomplete crossed design). Stored in float32 when that
    fits in ``max_gib``, else bfloat16; refused (before any forward pass) when even bfloat16 does not fit."""
    import time

    ctx = load_context(context)
    ax = load_axis(axis)
    texts = feature_texts(model, ctx, ax.name, templates="selection", names="selection", seed=seed,
                          templates_per_name=templates_per_name)
    names = list(dict.fromkeys(t.name for t in texts))
    per = sum(t.name == names[0] for t in texts)
    neutral_rows = neutral_training_rows(model, per, split="selection") if neutral else []
    n_rows = len(names) + len(neutral_rows)
    budget = max_gib * 1024 ** 3
    dtype = torch.float32 if pool_bytes(ps, n_rows, torch.float32) <= budget else torch.bfloat16
    if pool_bytes(ps, n_rows, dtype) > budget:
        raise ValueError(f"the GRADIEND gradient pool needs {pool_bytes(ps, n_rows, dtype) / 1024 ** 3:.1f} GiB "
                         f"({n_rows} rows x 2 x {ps.numel:,} parameters in bfloat16), over max_pool_gib = "
                         f"{max_gib}; train fewer parameters (e.g. --params down-late) or raise the limit")
    val = validation_names(ax, seed)
    paragraphs = sorted({i for i, _ in neutral_rows})
    val_paragraphs = set(sorted(paragraphs, key=lambda i: stable_hash(seed, f"gradiend-neutral-val:{i}"))
                         [: len(paragraphs) // 2])
    if neutral and (len(val_paragraphs) < 2 or len(paragraphs) - len(val_paragraphs) < 1):
        raise ValueError(f"neutral training needs neutral rows from at least 3 selection paragraphs (2 validate); "
                         f"this model's tokenization gives rows from {len(paragraphs)}; use neutral = 0")
    t0 = time.time()
    F = torch.empty(n_rows, ps.numel, dtype=dtype)
    T = torch.zeros(n_rows, ps.numel, dtype=dtype)
    bf, bt = torch.empty(ps.numel), torch.empty(ps.numel)
    per_name = []
    for i, nm in enumerate(names):
        b = [t for t in texts if t.name == nm]
        batch_gradient_pair(model, ps, [t.text for t in b], [t.factual for t in b], [t.counterfactual for t in b],
                            out_f=bf, out_t=bt, max_tokens=max_tokens)
        F[i], T[i] = bf, bt
        per_name.append(len(b))
    for j, (_, b) in enumerate(neutral_rows):
        # factual = counterfactual: the target F - C is 0, so only the factual gradient is computed
        F[len(names) + j] = batch_gradient(model, ps, [t.text for t in b], [t.factual for t in b], out=bf,
                                           max_tokens=max_tokens)
    trim_memory()
    groups = np.array([next(t.group for t in texts if t.name == nm) for nm in names] + [NEUTRAL] * len(neutral_rows),
                      dtype=int)
    validation = np.array([nm in val for nm in names] + [i in val_paragraphs for i, _ in neutral_rows], dtype=bool)
    row_names = names + [f"neutral:{i}:{j}" for j, (i, _) in enumerate(neutral_rows)]
    _LOG.info(f"[gradiend] gradient pool: {len(names)} names x {per_name[0]} texts"
        + (f" + {len(neutral_rows)} neutral rows" if neutral_rows else "")
        + f", {ps.numel:,} parameters, {dtype}, {time.time() - t0:.0f} s")
    return GradientPool(ps, row_names, groups, validation, F, T, per_name[0], time.time() - t0)
