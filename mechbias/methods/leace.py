"""LEACE: least-squares concept erasure (Belrose et al., 2023), the linear baseline every method is compared with.

On the row context's selection split, the residual stream before one layer is read at the prediction
position (or averaged over positions) for every prompt, with the name's group as the concept. LEACE finds the
affine map ``x -> x - W+ P W (x - mean)`` (``W`` the whitening of the activations' covariance, ``P`` the
orthogonal projection onto the span of ``W`` times the cross-covariance with the concept) that makes the
concept's class means equal, so that no linear classifier can recover it, while moving the activations as
little as possible in the least-squares sense. The intervention applies that map at the chosen positions.

The fit is EleutherAI's ``concept-erasure`` package (the authors' implementation, with its defaults: a
shrinkage estimate of the covariance and the trace constraint); ``tests/test_leace.py`` checks it against a
closed-form LEACE written here from the paper's formula. Controls: an eraser fitted on the same activations
with the group labels shuffled (``shuffled_labels``), and random projections of the same rank through the
same mean (``random``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from concept_erasure import LeaceFitter
from jaxtyping import Float, Int
from torch import Tensor

from ..core.runner import capture
from ..core.sites import Site
from ..core.window import local_positions
from ..data.contexts import Context
from ..data.prompts import tokenize
from ..interventions.base import Intervention, NotFoldable, Overlap, check_positions, register_intervention
from .base import Method, MethodConfig, Selection, register_method

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge


@register_intervention
@dataclass
class ErasureIntervention(Intervention):
    """``x -> x - ((x - bias) @ proj_right.T) @ proj_left.T`` on the residual stream before ``layer`` at
    ``positions`` (``"all"``, ``"last"`` or indices); ``proj_left`` ``[d, k]``, ``proj_right`` ``[k, d]``."""

    layer: int
    proj_left: Tensor
    proj_right: Tensor
    bias: Tensor | None = None
    positions: Any = "all"
    label: str = ""
    kind: ClassVar[str] = "erasure"

    @property
    def n_components(self) -> int:
        return int(self.proj_left.shape[1])

    @property
    def site(self) -> Site:
        return Site(self.layer, "resid_pre", positions=self.positions)

    def validate(self, model: TransformerBridge) -> None:
        if not 0 <= self.layer < model.cfg.n_layers:
            raise ValueError(f"erasure layer {self.layer} is outside 0..{model.cfg.n_layers - 1}")
        d = model.cfg.d_model
        if self.proj_left.shape[0] != d or self.proj_right.shape[1] != d:
            raise ValueError(f"the eraser acts on {self.proj_left.shape[0]} dimensions, the residual stream has {d}")
        check_positions(self.positions, model)

    def overlap(self, other: Intervention) -> Overlap | None:
        """Subspace overlap: the mean squared cosine of the principal angles between the erased directions
        (1 for the same subspace, 0 for orthogonal ones; the squared cosine for rank 1)."""
        if not isinstance(other, ErasureIntervention):
            return None
        qa, _ = torch.linalg.qr(self.proj_left.double())
        qb, _ = torch.linalg.qr(other.proj_left.double())
        sv = torch.linalg.svdvals(qa.T @ qb)
        return Overlap("subspace_cos2", float((sv ** 2).mean()), same_layer=self.layer == other.layer)

    def apply_to(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The erased activations (any leading shape, last dimension ``d_model``)."""
        left, right = self.proj_left.to(x), self.proj_right.to(x)
        delta = x - self.bias.to(x) if self.bias is not None else x
        return x - (delta @ right.T) @ left.T

    def hooks(self, model: TransformerBridge):
        self.validate(model)

        def erase(x, hook):
            pos = local_positions(self.positions, x.shape[1])
            if isinstance(pos, list) and not pos:
                return None
            out = x.clone()
            out[:, pos] = self.apply_to(x[:, pos])
            return out

        return [(self.site, erase)]

    def fold(self, model: TransformerBridge, params: dict[str, Tensor]) -> None:
        raise NotFoldable(f"{self.describe()}: an affine map of the residual stream has no exact form as a change "
                          "of the weights (the normalisation that follows reads the stream itself)")

    def random_like(self, model: TransformerBridge, seed: int) -> ErasureIntervention:
        """A random orthogonal projection of the same rank, through the same mean."""
        g = torch.Generator().manual_seed(int(seed))
        q, _ = torch.linalg.qr(torch.randn(self.proj_left.shape[0], self.n_components, generator=g,
                                           dtype=torch.float64))
        q = q.to(self.proj_left.dtype)
        return ErasureIntervention(self.layer, q, q.T.contiguous(), self.bias, self.positions,
                                   label="random projection of the same rank")

    def describe(self) -> str:
        return (self.label or f"erase a rank-{self.n_components} concept subspace") + \
            f" (residual stream before layer {self.layer}, {self.positions} positions)"

    def to_dict(self) -> dict:
        return {"layer": self.layer, "positions": self.positions, "label": self.label,
                "has_bias": self.bias is not None}

    def tensors(self) -> dict[str, Tensor]:
        out = {"proj_left": self.proj_left.contiguous(), "proj_right": self.proj_right.contiguous()}
        if self.bias is not None:
            out["bias"] = self.bias.contiguous()
        return out

    @classmethod
    def from_dict(cls, d, tensors):
        return cls(int(d["layer"]), tensors["proj_left"], tensors["proj_right"],
                   tensors.get("bias") if d.get("has_bias", True) else None, d.get("positions", "all"),
                   d.get("label", ""))


def fit_eraser(x: Float[Tensor, "n d"], z: Int[Tensor, " n"], **kwargs
               ) -> tuple[Float[Tensor, "d k"], Float[Tensor, "d k"], Float[Tensor, " d"] | None]:
    """``(proj_left, proj_right, bias)`` of the LEACE eraser of concept labels ``z`` (``[n]`` integers) from
    activations ``x`` (``[n, d]``), fitted in float64 by ``concept_erasure.LeaceFitter`` (``kwargs`` go to
    it: ``shrinkage``, ``constrain_cov_trace``, ``svd_tol``)."""
    x64 = x.double()
    onehot = torch.nn.functional.one_hot(z.long(), num_classes=int(z.max()) + 1).double()
    eraser = LeaceFitter.fit(x64, onehot, **kwargs).eraser
    keep = eraser.proj_left.abs().sum(0) > 0  # the package zeroes directions below its tolerance: drop them
    bias = eraser.bias.float() if eraser.bias is not None else None
    return eraser.proj_left[:, keep].float().contiguous(), eraser.proj_right[keep].float().contiguous(), bias


@dataclass
class LeaceConfig(MethodConfig):
    """LEACE settings (the ``mechbias erase`` flags)."""
    layer: int | None = field(default=None, metadata={"help": "residual stream before this layer (none: the middle "
                                                              "layer)"})
    position: Literal["last", "mean"] = field(default="last", metadata={
        "help": "where the activations are read for the fit: last (the prediction position) or mean (over "
                "positions)"})
    apply_positions: Literal["all", "last"] = field(default="all", metadata={"help": "where the eraser acts"})
    shrinkage: bool = field(default=True, metadata={
        "help": "shrinkage estimate of the covariance (the package's default; the prompts are fewer than the "
                "residual stream's dimensions)"})

    def validate(self) -> None:
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"layer must be >= 0, not {self.layer}")


@register_method
class Leace(Method):
    """LEACE concept erasure as a registered method: the baseline every method is compared with."""
    name = "erase"
    title = "LEACE concept erasure"
    summary = ("The least-squares concept eraser (LEACE) of the name's group, fitted on the residual stream of the "
               "context's selection split at one layer and applied there: the linear baseline.")
    Config = LeaceConfig
    config: LeaceConfig
    fast_study_steps = ("leace",)  # benchmarks/precision.py: 1.6x faster, subspace overlap 0.96

    def select(self, model: TransformerBridge, context: Context, axis: str) -> Selection:
        c = self.config
        layer = self.resolve_layer(model, c.layer, "erasure")
        ps = self.selection_prompts(context, axis)
        groups = torch.as_tensor(ps.groups)
        if not (groups == 0).any() or not (groups == 1).any():
            raise ValueError("LEACE needs prompts of both groups")
        hook = Site(layer, "resid_pre").hook_name
        x = capture(model, tokenize(model, ps.texts), [hook], position=c.position)[hook]
        left, right, bias = fit_eraser(x, groups, shrinkage=c.shrinkage)
        iv = ErasureIntervention(layer, left, right, bias, c.apply_positions,
                                 label=f"LEACE {context.name}/{axis} layer {layer}")
        perm = np.random.default_rng(self.seed).permutation(len(groups))
        sl, sr, sb = fit_eraser(x, groups[torch.as_tensor(perm)], shrinkage=c.shrinkage)
        shuffled = ErasureIntervention(layer, sl, sr, sb, c.apply_positions,
                                       label=f"LEACE fitted on shuffled labels, layer {layer}")
        erased = iv.apply_to(x)
        gap = float((x[groups == 0].mean(0) - x[groups == 1].mean(0)).norm())
        gap_after = float((erased[groups == 0].mean(0) - erased[groups == 1].mean(0)).norm())
        return Selection(context.name, axis, iv, {},
                         {"layer": layer, "rank": iv.n_components, "n_prompts": len(ps), "position": c.position,
                          "class_mean_distance": gap, "class_mean_distance_after": gap_after,
                          "mean_edit_norm": float((erased - x).norm(dim=-1).mean())},
                         {"shuffled_labels": [shuffled]})

    @classmethod
    def study_configs(cls, quick: bool = False, full: bool = True) -> Mapping[str, LeaceConfig]:
        return {"leace": LeaceConfig()}
