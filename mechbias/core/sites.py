"""Sites: where in a model an activation lives. The only place a hook name is spelled.

A :class:`Site` names one TransformerLens hook point and, optionally, a slice of
its activation: ``layer`` and ``point`` choose the hook, ``index`` the entries
on the axis after the position axis (neurons of ``post``, heads of ``z``/``q``/
``k``/``v``/``pattern``, dimensions of the residual stream) and ``positions``
the token positions (``"all"``, ``"last"`` or absolute indices).

Every module that installs a hook, reads a cache or patches an activation
builds its names here, so a family whose hook points differ is handled in one
place, and :func:`mechbias.core.hooks.hooked` checks each name against the model
before a forward pass runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: point -> hook name template (``{l}`` is the layer)
POINTS: dict[str, str] = {
    "embed": "hook_embed",
    "unembed_in": "unembed.hook_in",
    "unembed_out": "unembed.hook_out",
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post",
    "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "q": "blocks.{l}.attn.hook_q",
    "k": "blocks.{l}.attn.hook_k",
    "v": "blocks.{l}.attn.hook_v",
    "z": "blocks.{l}.attn.hook_z",
    "pattern": "blocks.{l}.attn.hook_pattern",
    "post": "blocks.{l}.mlp.hook_post",
    # inputs of the block's linear layers (what Wanda's ||X|| is computed from)
    "in:attn.q": "blocks.{l}.attn.q.hook_in",
    "in:attn.k": "blocks.{l}.attn.k.hook_in",
    "in:attn.v": "blocks.{l}.attn.v.hook_in",
    "in:attn.o": "blocks.{l}.attn.o.hook_in",
    "in:mlp.gate": "blocks.{l}.mlp.gate.hook_in",
    "in:mlp.in": "blocks.{l}.mlp.in.hook_in",
    "in:mlp.out": "blocks.{l}.mlp.out.hook_in",
}
GLOBAL_POINTS = frozenset({"embed", "unembed_in", "unembed_out"})
HEAD_POINTS = frozenset({"q", "k", "v", "z", "pattern"})
#: the bridge components whose input the ``in:`` points read, in a fixed order
LINEAR_COMPONENTS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.in", "mlp.out")

Point = Literal["embed", "unembed_in", "unembed_out", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "q", "k",
                "v", "z", "pattern", "post", "in:attn.q", "in:attn.k", "in:attn.v", "in:attn.o", "in:mlp.gate",
                "in:mlp.in", "in:mlp.out"]
Positions = Literal["all", "last"] | tuple[int, ...]


def hook_name(point: str, layer: int | None = None) -> str:
    """The TransformerLens hook name of ``point`` in ``layer``."""
    if point not in POINTS:
        raise ValueError(f"unknown site point {point!r}; known points: {sorted(POINTS)}")
    if point in GLOBAL_POINTS:
        if layer is not None:
            raise ValueError(f"point {point!r} is not per layer; pass layer=None")
        return POINTS[point]
    if layer is None or int(layer) < 0:
        raise ValueError(f"point {point!r} needs a layer >= 0, got {layer!r}")
    return POINTS[point].format(l=int(layer))


def normalize_positions(positions) -> Positions:
    """``None``/``"all"`` -> ``"all"``; ``"last"``; a sequence of ints -> a sorted tuple."""
    if positions is None:
        return "all"
    if isinstance(positions, str):
        if positions not in ("all", "last"):
            raise ValueError(f"positions must be 'all', 'last' or a list of indices, not {positions!r}")
        return positions  # type: ignore[return-value]
    return tuple(int(p) for p in positions)


@dataclass(frozen=True)
class Site:
    """One hook point, and optionally a slice of it (see the module docstring).

    Args:
        layer: the block index, or ``None`` for points outside the blocks (``embed``, ``unembed_in``).
        point: a key of :data:`POINTS` (``"post"``, ``"z"``, ``"resid_pre"``, ...).
        index: the slice of the last dimension(s) (a neuron, or a head).
        positions: ``"all"``, ``"last"`` or a list of absolute positions.
    """

    layer: int | None
    point: str
    index: tuple[int, ...] | None = None
    positions: Positions = "all"

    def __post_init__(self):
        hook_name(self.point, self.layer)  # validates point and layer
        if self.index is not None:
            object.__setattr__(self, "index", tuple(int(i) for i in self.index))
        object.__setattr__(self, "positions", normalize_positions(self.positions))

    @property
    def hook_name(self) -> str:
        return hook_name(self.point, self.layer)

    @property
    def is_head(self) -> bool:
        return self.point in HEAD_POINTS

    def with_positions(self, positions) -> Site:
        return Site(self.layer, self.point, self.index, positions)

    def __repr__(self) -> str:
        extra = "" if self.index is None else f", index={list(self.index)}"
        pos = "" if self.positions == "all" else f", positions={self.positions if isinstance(self.positions, str) else list(self.positions)}"
        return f"Site({self.hook_name}{extra}{pos})"


def layer_names(point: str, n_layers: int) -> list[str]:
    """Hook names of ``point`` in every layer."""
    return [hook_name(point, l) for l in range(n_layers)]
