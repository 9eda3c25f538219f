"""Interventions on weights: masks (unstructured pruning) and additive edits. Restored bit for bit."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..core.params import named_params
from ..core.resume import layer_of_name
from .base import Intervention, Overlap, abs_cosine, jaccard, param, register_intervention, restoring
from .profile import UnitProfile

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge


@register_intervention
@dataclass
class WeightMask(Intervention):
    """Zero individual weight entries (unstructured / Wanda pruning). Weights are restored exactly.

    Args:
        masks: a parameter name (see :func:`mechbias.core.params.named_params`) -> a flat index tensor of
            entries to zero.
        label: a name for tables and figures.
    """

    masks: dict[str, Tensor]
    label: str = ""
    kind: ClassVar[str] = "weight_mask"

    @property
    def n_components(self) -> int:
        return int(sum(m.numel() for m in self.masks.values()))

    def validate(self, model: TransformerBridge) -> None:
        """Every index must address an entry of its parameter: no negative index (it would count from the end)
        and none past the last entry."""
        for n, idx in self.masks.items():
            size = param(model, n).numel()
            idx = idx.long()
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
                raise ValueError(f"weight mask of {n}: indices must lie in 0..{size - 1}, found "
                                 f"{int(idx.min())}..{int(idx.max())}")

    def overlap(self, other: Intervention) -> Overlap | None:
        if not isinstance(other, WeightMask):
            return None
        return jaccard({(n, int(i)) for n, idx in self.masks.items() for i in idx.tolist()},
                       {(n, int(i)) for n, idx in other.masks.items() for i in idx.tolist()})

    @contextlib.contextmanager
    def apply(self, model: TransformerBridge):
        self.validate(model)
        params = {n: param(model, n) for n in self.masks}
        with restoring(params), torch.no_grad():
            for n, p in params.items():
                p.view(-1)[self.masks[n].to(p.device).long()] = 0.0
            yield model

    def first_layer(self, model: TransformerBridge) -> int:
        """The earliest block holding a changed parameter (0 for an embedding, which may be tied)."""
        return min((layer_of_name(n, int(model.cfg.n_layers)) for n in self.masks), default=int(model.cfg.n_layers))

    def fold(self, model: TransformerBridge, params: dict[str, Tensor]) -> None:
        self.validate(model)
        for n, idx in self.masks.items():
            if n not in params:
                raise ValueError(f"model has no parameter named {n!r}")
            params[n].view(-1)[idx.to(params[n].device).long()] = 0.0

    def random_like(self, model: TransformerBridge, seed: int) -> WeightMask:
        """The same number of entries in each matrix, drawn uniformly."""
        rng = np.random.default_rng(seed)
        params = named_params(model)
        masks = {n: torch.from_numpy(rng.choice(params[n].numel(), size=len(idx), replace=False)).long()
                 for n, idx in self.masks.items()}
        return WeightMask(masks, label="random weights")

    def controls(self, model: TransformerBridge, n: int, seed: int, *, profile: UnitProfile | None = None,
                 kinds: tuple[str, ...] = ("random",)) -> dict[str, list[Intervention]]:
        """``random`` (uniform per matrix) and ``matched`` (per matrix, the same number of unselected entries
        in each of 20 quantile bins of the Wanda score ``|W_ij| ||X_j||``, ``||X||`` from the selection neutral texts)."""
        out = super().controls(model, n, seed, profile=profile, kinds=kinds)
        if profile is None or "matched" not in kinds or n <= 0:
            return out
        params = named_params(model)
        draws: list[Intervention] = []
        for k in range(n):
            rng = np.random.default_rng(seed + 211 * (k + 1))
            masks = {}
            for name, idx in self.masks.items():
                w = params[name].detach().abs().float().cpu()
                norms = profile.input_norms.get(name)
                if norms is None:
                    raise ValueError(f"the profile has no input norms for {name}")
                score = (w * (norms[None, :] if w.shape[1] == len(norms) else norms[:, None])).flatten().numpy()
                edges = np.quantile(score, np.linspace(0, 1, 21)[1:-1])
                bins = np.searchsorted(edges, score)
                sel = np.zeros(len(score), dtype=bool)
                sel[idx.long().numpy()] = True
                picked = []
                for b, count in zip(*np.unique(bins[sel], return_counts=True), strict=True):
                    pool = np.flatnonzero((bins == b) & ~sel)
                    picked.append(rng.choice(pool, size=min(int(count), len(pool)), replace=False))
                masks[name] = torch.from_numpy(np.sort(np.concatenate(picked))).long()
            draws.append(WeightMask(masks, label="weights matched on Wanda score quantiles"))
        out["matched"] = draws
        return out

    def describe(self) -> str:
        return f"zero {self.n_components} weights in {len(self.masks)} matrices"

    def to_dict(self):
        return {"params": sorted(self.masks), "label": self.label}

    def tensors(self) -> dict[str, Tensor]:
        return {n: m.long().contiguous() for n, m in self.masks.items()}

    @classmethod
    def from_dict(cls, d, tensors):
        return cls(masks={n: tensors[n] for n in d["params"]}, label=d.get("label", ""))


@register_intervention
@dataclass
class WeightEdit(Intervention):
    """Add ``scale * delta`` to parameters (a GRADIEND edit); restored exactly.

    Args:
        deltas: parameter name -> the tensor added.
        scale: the edit's multiplier.
        label: a name for tables and figures.
    """

    deltas: dict[str, Tensor]
    scale: float = 1.0
    label: str = ""
    kind: ClassVar[str] = "weight_edit"

    def overlap(self, other: Intervention) -> Overlap | None:
        if not isinstance(other, WeightEdit) or sorted(self.deltas) != sorted(other.deltas):
            return None
        a = torch.cat([self.scale * self.deltas[n].flatten() for n in sorted(self.deltas)])
        b = torch.cat([other.scale * other.deltas[n].flatten() for n in sorted(other.deltas)])
        return abs_cosine(a, b)

    @property
    def n_components(self) -> int:
        return int(sum(d.numel() for d in self.deltas.values()))

    @contextlib.contextmanager
    def apply(self, model: TransformerBridge):
        params = {n: param(model, n) for n in self.deltas}
        for n, p in params.items():
            if p.shape != self.deltas[n].shape:
                raise ValueError(f"delta for {n} has shape {tuple(self.deltas[n].shape)}, parameter {tuple(p.shape)}")
        with restoring(params), torch.no_grad():
            for n, p in params.items():
                p.add_(self.deltas[n].to(p.device, p.dtype), alpha=self.scale)
            yield model

    def first_layer(self, model: TransformerBridge) -> int:
        """The earliest block holding an edited parameter (0 for an embedding, which may be tied)."""
        return min((layer_of_name(n, int(model.cfg.n_layers)) for n in self.deltas), default=int(model.cfg.n_layers))

    def fold(self, model: TransformerBridge, params: dict[str, Tensor]) -> None:
        for n, d in self.deltas.items():
            if n not in params:
                raise ValueError(f"model has no parameter named {n!r}")
            if params[n].shape != d.shape:
                raise ValueError(f"delta for {n} has shape {tuple(d.shape)}, parameter {tuple(params[n].shape)}")
            params[n].add_(d.to(params[n].device, params[n].dtype), alpha=self.scale)

    def random_like(self, model: TransformerBridge, seed: int) -> WeightEdit:
        """A random direction with the same norm in each matrix."""
        g = torch.Generator().manual_seed(int(seed))
        deltas = {}
        for n, d in self.deltas.items():
            r = torch.randn(d.shape, generator=g, dtype=torch.float32)
            deltas[n] = (r * (d.float().norm() / r.norm().clamp_min(1e-12))).to(d.dtype)
        return WeightEdit(deltas, self.scale, label="random direction, same norm")

    def commit(self, model: TransformerBridge) -> None:
        """Apply the edit permanently (the caller asked for a changed model)."""
        with torch.no_grad():
            for n, d in self.deltas.items():
                p = param(model, n)
                p.add_(d.to(p.device), alpha=self.scale)

    def describe(self) -> str:
        norm = float(sum(float((d.float() ** 2).sum()) for d in self.deltas.values())) ** 0.5 * abs(self.scale)
        return f"weight edit on {len(self.deltas)} matrices (norm {norm:.3g})"

    def to_dict(self):
        return {"params": sorted(self.deltas), "scale": self.scale, "label": self.label}

    def tensors(self) -> dict[str, Tensor]:
        return {n: d.contiguous() for n, d in self.deltas.items()}

    @classmethod
    def from_dict(cls, d, tensors):
        return cls(deltas={n: tensors[n] for n in d["params"]}, scale=d.get("scale", 1.0), label=d.get("label", ""))
