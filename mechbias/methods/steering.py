"""Activation steering: a bias direction in the residual stream, removed or added.

On a context's selection split, the direction is the mean difference of the
residual stream (``blocks.{layer}.hook_resid_pre``) between prompts with group-A
and group-B names, read at the prediction position (``position="last"``) or
averaged over positions (``"mean"``). The intervention either **ablates** the
direction (``x - (x·u) u`` with ``u = d / ||d||``: the component along it is
removed) or **adds** ``alpha · d`` (negative ``alpha`` pushes toward group B), at
every position or at the prediction position only. Its random control is a
random direction of the same norm in the same layer.

This module is the whole method: the intervention type, its control, the
config, the selection and the registration. Nothing else in mechbias names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.results import run_summary_json
from ..core.runner import capture
from ..core.sites import Site
from ..core.window import local_positions
from ..data.contexts import Context
from ..data.prompts import tokenize
from ..interventions.base import Intervention, NotFoldable, Overlap, abs_cosine, check_positions, register_intervention
from ..viz.html import records_html
from .base import Method, MethodConfig, Selection, register_method

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

Mode = Literal["ablate", "add"]
MODES: tuple[str, ...] = get_args(Mode)


@register_intervention
@dataclass
class DirectionIntervention(Intervention):
    """Ablate (project out) or add a direction in the residual stream before ``layer``."""

    layer: int
    direction: Tensor  # [d_model]
    mode: str = "ablate"
    alpha: float = 1.0
    positions: Any = "all"
    label: str = ""
    kind: ClassVar[str] = "direction"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        self.direction = torch.as_tensor(self.direction).detach().float().flatten()
        if not torch.isfinite(self.direction).all() or float(self.direction.norm()) == 0.0:
            raise ValueError("the steering direction must be finite and non-zero")

    @property
    def n_components(self) -> int:
        return 1

    @property
    def site(self) -> Site:
        return Site(self.layer, "resid_pre", positions=self.positions)

    def validate(self, model: TransformerBridge) -> None:
        if not 0 <= self.layer < model.cfg.n_layers:
            raise ValueError(f"steering layer {self.layer} is outside 0..{model.cfg.n_layers - 1}")
        if self.direction.numel() != model.cfg.d_model:
            raise ValueError(f"the direction has {self.direction.numel()} entries, the residual stream "
                             f"{model.cfg.d_model}")
        check_positions(self.positions, model)

    def overlap(self, other: Intervention) -> Overlap | None:
        if not isinstance(other, DirectionIntervention):
            return None
        return abs_cosine(self.direction, other.direction, same_layer=self.layer == other.layer)

    def hooks(self, model: TransformerBridge):
        self.validate(model)
        d = self.direction
        u = d / d.norm()

        def steer(x, hook):
            pos = local_positions(self.positions, x.shape[1])
            if isinstance(pos, list) and not pos:
                return None
            out = x.clone()
            sel = out[:, pos]
            if self.mode == "ablate":
                uu = u.to(x.device, x.dtype)
                sel = sel - (sel @ uu)[..., None] * uu
            else:
                sel = sel + self.alpha * d.to(x.device, x.dtype)
            out[:, pos] = sel
            return out

        return [(self.site, steer)]

    def fold(self, model: TransformerBridge, params: dict[str, Tensor]) -> None:
        self.check_foldable()

    def check_foldable(self) -> None:
        why = ("projecting a direction out of the residual stream changes every later layer's input and the skip "
               "connection; no weight of the block expresses it" if self.mode == "ablate" else
               "adding a constant to the residual stream needs a bias on the preceding output, and this export "
               "does not write biases into a model")
        raise NotFoldable(f"{self.describe()}: {why}")

    def random_like(self, model: TransformerBridge, seed: int) -> DirectionIntervention:
        """A random direction with the same norm, in the same layer, with the same mode and positions."""
        g = torch.Generator().manual_seed(int(seed))
        r = torch.randn(self.direction.shape, generator=g)
        r = r * (self.direction.norm() / r.norm())
        return DirectionIntervention(self.layer, r, self.mode, self.alpha, self.positions, label="random direction")

    def describe(self) -> str:
        what = "ablate" if self.mode == "ablate" else f"add {self.alpha:g} x"
        return (f"{what} a direction (norm {float(self.direction.norm()):.3g}) in the residual stream before layer "
                f"{self.layer} at {self.positions} positions")

    def to_dict(self):
        return {"layer": self.layer, "mode": self.mode, "alpha": self.alpha, "positions": self.positions,
                "label": self.label}

    def tensors(self) -> dict[str, Tensor]:
        return {"direction": self.direction.contiguous()}

    @classmethod
    def from_dict(cls, d, tensors):
        return cls(d["layer"], tensors["direction"], d.get("mode", "ablate"), d.get("alpha", 1.0),
                   d.get("positions", "all"), d.get("label", ""))


@dataclass
class SteeringConfig(MethodConfig):
    """Activation steering settings (the ``mechbias steer`` flags)."""
    layer: int | None = field(default=None, metadata={"help": "residual stream before this layer (none: the middle "
                                                              "layer)"})
    position: Literal["last", "mean"] = field(default="last", metadata={
        "help": "where the group means are read: last (the prediction position) or mean (over positions)"})
    mode: Mode = field(default="ablate", metadata={"help": "ablate the direction, or add alpha times it"})
    alpha: float = field(default=-1.0, metadata={"help": "mode add: multiple of the direction added (negative: "
                                                         "toward group B)"})
    apply_positions: Literal["all", "last"] = field(default="all", metadata={"help": "where the intervention acts"})

    def validate(self) -> None:
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"layer must be >= 0, not {self.layer}")


def group_mean_difference(model: TransformerBridge, prompts, layer: int, position: str = "last"
                          ) -> Float[Tensor, " d_model"]:
    """Mean residual stream before ``layer`` of group-A prompts minus group-B prompts, ``[d_model]``."""
    name = Site(layer, "resid_pre").hook_name
    acts = capture(model, tokenize(model, prompts.texts), [name], position=position)[name].double()
    g = prompts.groups
    if not (g == 0).any() or not (g == 1).any():
        raise ValueError("steering needs prompts of both groups")
    return (acts[g == 0].mean(0) - acts[g == 1].mean(0)).float()


@register_method
class Steering(Method):
    """Activation steering as a registered method: ablate (or add along) the group-mean difference direction at one layer."""
    name = "steer"
    title = "Activation steering"
    summary = ("The mean difference of the residual stream between group-A and group-B prompts of the context's "
               "selection split, at one layer; ablated (projected out) or added.")
    Config = SteeringConfig
    config: SteeringConfig

    def select(self, model: TransformerBridge, context: Context, axis: str) -> Selection:
        c = self.config
        layer = self.resolve_layer(model, c.layer, "steering")
        ps = self.selection_prompts(context, axis)
        d = group_mean_difference(model, ps, layer, c.position)
        iv = DirectionIntervention(layer, d, c.mode, c.alpha, c.apply_positions,
                                   label=f"steering {context.name}/{axis} layer {layer}")
        return Selection(context.name, axis, iv, {}, {"layer": layer, "direction_norm": float(d.norm()),
                                                      "n_prompts": len(ps), "position": c.position})

    in_default_study = False  # not one of the four methods of the default study; --full runs it

    @classmethod
    def html(cls, step: Path, summary: dict) -> list[str]:
        """The steering directions: per row its layer, norm and prompt count, and how alike the rows' directions
        are (``|cosine|``, from the transfer matrix's overlap): alike directions transfer alike by construction."""
        sel = summary.get("selections", {})
        if not sel:
            return []
        rows = [{"selected on": ctx, "layer": s.get("layer"), "|direction|": s.get("direction_norm"),
                 "prompts": s.get("n_prompts"), "read at": s.get("position")} for ctx, s in sel.items()]
        overlap = run_summary_json(step)["transfer_test"].get("overlap", {})
        cos = [{"rows": pair.replace("|", " vs "), "|cosine|": v.get("value")} for pair, v in overlap.items()
               if isinstance(v, dict) and v.get("measure") == "abs_cosine"]
        return ["<h3>Steering directions</h3>" + records_html(rows)
                + (records_html(cos) if cos else "<p class='note'>One row: no pair of directions to compare.</p>")]

    @classmethod
    def study_configs(cls, quick: bool = False, full: bool = True) -> dict[str, SteeringConfig]:
        return {"steering": SteeringConfig()}
