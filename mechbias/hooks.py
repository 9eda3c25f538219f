"""One hook mechanism and reusable interventions.

:func:`hooked` installs forward and backward hooks on named TransformerLens hook
points and always removes them, also when the block raises.

An :class:`Intervention` is a small value object describing a change to the
model — zero or scale MLP neurons, ablate attention heads (``hook_z`` output
ablation, or ``hook_q`` zeroing, which makes attention uniform as in the
Breaking Down Bias code), zero individual weights, or add a weight delta.
``intervention.apply(model)`` is a context manager; on exit the model is exactly
as before (weights are restored from saved copies, bit for bit).
Interventions save to a folder (``intervention.json`` plus ``tensors.safetensors``)
and load back with :func:`load_intervention`, so any method's output can be
re-applied later, by the CLI or by another tool.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import Tensor

from .runner import local_positions

HookList = Sequence[tuple[str, Callable]]


@contextlib.contextmanager
def hooked(model, fwd: HookList = (), bwd: HookList = ()) -> Iterator[Any]:
    """Install hooks for the duration of the block; they are removed in ``finally``."""
    with model.hooks(fwd_hooks=list(fwd), bwd_hooks=list(bwd)):
        yield model


def n_active_hooks(model) -> int:
    """Number of hook functions currently attached to the model's hook points."""
    total = 0
    for hp in set(model.hook_dict.values()):
        total += len(hp._forward_hooks) + len(hp._backward_hooks)
        total += len(getattr(hp, "_backward_pre_hooks", {}))
    return total


# ----------------------------------------------------------------------------
# component names
# ----------------------------------------------------------------------------

def neuron_hook(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_post"


def z_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def q_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_q"


def _as_layer_dict(items) -> dict[int, list[int]]:
    """Accept ``{layer: [idx...]}`` or ``[(layer, idx), ...]``; return a sorted dict."""
    out: dict[int, set[int]] = {}
    if isinstance(items, dict):
        pairs = [(int(l), int(i)) for l, idx in items.items() for i in idx]
    else:
        pairs = [(int(l), int(i)) for l, i in items]
    for l, i in pairs:
        out.setdefault(l, set()).add(i)
    return {l: sorted(v) for l, v in sorted(out.items())}


# ----------------------------------------------------------------------------
# interventions
# ----------------------------------------------------------------------------

_REGISTRY: dict[str, type["Intervention"]] = {}


class Intervention:
    """Base class: a reversible change to a model, serialisable to a folder."""

    kind: ClassVar[str] = "intervention"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _REGISTRY[cls.kind] = cls

    # -- behaviour --
    def hooks(self, model) -> list[tuple[str, Callable]]:
        """Forward hooks implementing the intervention (none for weight edits)."""
        return []

    @contextlib.contextmanager
    def apply(self, model) -> Iterator[Any]:
        """Context manager: the model carries the intervention inside the block."""
        with hooked(model, self.hooks(model)):
            yield model

    def validate(self, model) -> None:
        """Raise ``ValueError`` if the intervention does not fit the model."""

    @property
    def n_components(self) -> int:
        return 0

    def describe(self) -> str:
        return f"{self.kind} ({self.n_components} components)"

    # -- serialisation --
    def to_dict(self) -> dict:
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:
        return {}

    @classmethod
    def from_dict(cls, d: dict, tensors: dict[str, Tensor]) -> "Intervention":
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        from .results import atomic_write_json, atomic_save_tensors

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = self.tensors()
        if tensors:
            atomic_save_tensors(tensors, path / "tensors.safetensors")
        atomic_write_json({"kind": self.kind, **self.to_dict()}, path / "intervention.json")
        return path


def load_intervention(path: str | Path) -> Intervention:
    """Load an intervention saved with :meth:`Intervention.save`."""
    path = Path(path)
    meta = path / "intervention.json"
    if not meta.exists():
        raise FileNotFoundError(f"{path} holds no saved intervention (missing intervention.json)")
    d = json.loads(meta.read_text())
    kind = d.pop("kind", None)
    if kind not in _REGISTRY:
        raise ValueError(f"{meta}: unknown intervention kind {kind!r}; known: {sorted(_REGISTRY)}")
    tensors = {}
    if (path / "tensors.safetensors").exists():
        from safetensors.torch import load_file

        tensors = load_file(str(path / "tensors.safetensors"))
    return _REGISTRY[kind].from_dict(d, tensors)


@dataclass
class Identity(Intervention):
    """No change (the unmodified model)."""

    kind: ClassVar[str] = "identity"

    def to_dict(self) -> dict:
        return {}

    @classmethod
    def from_dict(cls, d, tensors):
        return cls()

    def describe(self) -> str:
        return "no intervention"


@dataclass
class NeuronIntervention(Intervention):
    """Zero or scale MLP neurons (``blocks.{l}.mlp.hook_post``).

    ``factor=0`` suppresses (BNS / neuron pruning), ``factor=2`` amplifies.
    ``positions`` is ``"all"``, ``"last"`` (the prediction position) or a list
    of absolute positions.
    """

    neurons: dict[int, list[int]]
    factor: float = 0.0
    positions: Any = "all"
    label: str = ""
    kind: ClassVar[str] = "neurons"

    def __post_init__(self):
        self.neurons = _as_layer_dict(self.neurons)

    @property
    def n_components(self) -> int:
        return sum(len(v) for v in self.neurons.values())

    def validate(self, model) -> None:
        for l, idx in self.neurons.items():
            if not 0 <= l < model.cfg.n_layers:
                raise ValueError(f"neuron layer {l} is outside 0..{model.cfg.n_layers - 1}")
            if idx and not (0 <= min(idx) and max(idx) < model.cfg.d_mlp):
                raise ValueError(f"neuron index out of range 0..{model.cfg.d_mlp - 1} in layer {l}")

    def hooks(self, model):
        self.validate(model)
        hooks = []
        for l, idx in self.neurons.items():
            index = torch.tensor(idx, dtype=torch.long)
            hooks.append((neuron_hook(l), _scale_hook(index, self.factor, self.positions, head_axis=False)))
        return hooks

    def describe(self) -> str:
        op = "zero" if self.factor == 0 else f"x{self.factor:g}"
        return f"{op} {self.n_components} MLP neurons at {self.positions} positions"

    def to_dict(self):
        return {"neurons": {str(k): v for k, v in self.neurons.items()}, "factor": self.factor,
                "positions": self.positions, "label": self.label}

    @classmethod
    def from_dict(cls, d, tensors):
        return cls(neurons={int(k): v for k, v in d["neurons"].items()}, factor=d.get("factor", 0.0),
                   positions=d.get("positions", "all"), label=d.get("label", ""))

    def as_pairs(self) -> list[tuple[int, int]]:
        return [(l, i) for l, idx in self.neurons.items() for i in idx]


@dataclass
class HeadIntervention(Intervention):
    """Ablate attention heads.

    ``mode="z"``: zero the head's output at ``hook_z`` (true output ablation).
    ``mode="q"``: zero its query at ``hook_q``; the attention logits become 0, so
    attention over the causal prefix is uniform and the head outputs the mean of
    its values (the Breaking Down Bias code's "head pruning").
    """

    heads: dict[int, list[int]]
    mode: str = "z"
    factor: float = 0.0
    positions: Any = "all"
    label: str = ""
    kind: ClassVar[str] = "heads"

    def __post_init__(self):
        self.heads = _as_layer_dict(self.heads)
        if self.mode not in ("z", "q"):
            raise ValueError(f"head ablation mode must be 'z' or 'q', not {self.mode!r}")

    @property
    def n_components(self) -> int:
        return sum(len(v) for v in self.heads.values())

    def validate(self, model) -> None:
        for l, idx in self.heads.items():
            if not 0 <= l < model.cfg.n_layers:
                raise ValueError(f"head layer {l} is outside 0..{model.cfg.n_layers - 1}")
            if idx and not (0 <= min(idx) and max(idx) < model.cfg.n_heads):
                raise ValueError(f"head index out of range 0..{model.cfg.n_heads - 1} in layer {l}")

    def hooks(self, model):
        self.validate(model)
        name = z_hook if self.mode == "z" else q_hook
        return [
            (name(l), _scale_hook(torch.tensor(idx, dtype=torch.long), self.factor, self.positions, head_axis=True))
            for l, idx in self.heads.items()
        ]

    def describe(self) -> str:
        what = "output (hook_z)" if self.mode == "z" else "query (hook_q, uniform attention)"
        return f"ablate {self.n_components} attention heads by zeroing their {what}"

    def to_dict(self):
        return {"heads": {str(k): v for k, v in self.heads.items()}, "mode": self.mode,
                "factor": self.factor, "positions": self.positions, "label": self.label}

    @classmethod
    def from_dict(cls, d, tensors):
        return cls(heads={int(k): v for k, v in d["heads"].items()}, mode=d.get("mode", "z"),
                   factor=d.get("factor", 0.0), positions=d.get("positions", "all"), label=d.get("label", ""))

    def as_pairs(self) -> list[tuple[int, int]]:
        return [(l, h) for l, idx in self.heads.items() for h in idx]


def _scale_hook(index: Tensor, factor: float, positions, head_axis: bool):
    """Hook multiplying ``act[:, pos, index]`` (``act[:, pos, head, :]`` for heads) by ``factor``."""

    def hook(act, hook):
        pos = local_positions(positions, act.shape[1])
        if isinstance(pos, list):
            if not pos:
                return None
            pos = torch.tensor(pos, dtype=torch.long, device=act.device)[:, None]
        idx = index.to(act.device)
        sel = (slice(None), pos, idx[None, :] if not isinstance(pos, slice) else idx)
        out = act.clone()
        out[sel] = act[sel] * factor if factor != 0 else 0.0
        return out

    return hook


# ----------------------------------------------------------------------------
# weight-level interventions
# ----------------------------------------------------------------------------

def _param(model, name: str) -> torch.nn.Parameter:
    from .models import named_params

    params = named_params(model)
    if name not in params:
        raise ValueError(f"model has no parameter named {name!r}")
    return params[name]


@contextlib.contextmanager
def _restoring(params: dict[str, torch.nn.Parameter]):
    """Save copies of parameters and restore them bit for bit on exit."""
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


@dataclass
class WeightMask(Intervention):
    """Zero individual weight entries (unstructured / Wanda pruning).

    ``masks`` maps a parameter name (see :func:`mechbias.models.named_params`)
    to a flat index tensor of entries to zero. Weights are restored exactly.
    """

    masks: dict[str, Tensor]
    label: str = ""
    kind: ClassVar[str] = "weight_mask"

    @property
    def n_components(self) -> int:
        return int(sum(m.numel() for m in self.masks.values()))

    @contextlib.contextmanager
    def apply(self, model):
        params = {n: _param(model, n) for n in self.masks}
        with _restoring(params), torch.no_grad():
            for n, p in params.items():
                p.view(-1)[self.masks[n].to(p.device).long()] = 0.0
            yield model

    def describe(self) -> str:
        return f"zero {self.n_components} weights in {len(self.masks)} matrices"

    def to_dict(self):
        return {"params": sorted(self.masks), "label": self.label}

    def tensors(self):
        return {n: m.long().contiguous() for n, m in self.masks.items()}

    @classmethod
    def from_dict(cls, d, tensors):
        return cls(masks={n: tensors[n] for n in d["params"]}, label=d.get("label", ""))


@dataclass
class WeightEdit(Intervention):
    """Add ``scale * delta`` to parameters (a GRADIEND edit); restored exactly."""

    deltas: dict[str, Tensor]
    scale: float = 1.0
    label: str = ""
    kind: ClassVar[str] = "weight_edit"

    @property
    def n_components(self) -> int:
        return int(sum(d.numel() for d in self.deltas.values()))

    @contextlib.contextmanager
    def apply(self, model):
        params = {n: _param(model, n) for n in self.deltas}
        for n, p in params.items():
            if p.shape != self.deltas[n].shape:
                raise ValueError(f"delta for {n} has shape {tuple(self.deltas[n].shape)}, parameter {tuple(p.shape)}")
        with _restoring(params), torch.no_grad():
            for n, p in params.items():
                p.add_(self.deltas[n].to(p.device, p.dtype), alpha=self.scale)
            yield model

    def commit(self, model) -> None:
        """Apply the edit permanently (the caller asked for a changed model)."""
        model.__dict__.pop("_mechbias_favoured", None)  # cached facts about the old weights
        with torch.no_grad():
            for n, d in self.deltas.items():
                _param(model, n).add_(d.to(_param(model, n).device), alpha=self.scale)

    def describe(self) -> str:
        norm = float(torch.sqrt(sum((d.float() ** 2).sum() for d in self.deltas.values()))) * abs(self.scale)
        return f"weight edit on {len(self.deltas)} matrices (norm {norm:.3g})"

    def to_dict(self):
        return {"params": sorted(self.deltas), "scale": self.scale, "label": self.label}

    def tensors(self):
        return {n: d.contiguous() for n, d in self.deltas.items()}

    @classmethod
    def from_dict(cls, d, tensors):
        return cls(deltas={n: tensors[n] for n in d["params"]}, scale=d.get("scale", 1.0), label=d.get("label", ""))


@dataclass
class Compose(Intervention):
    """Several interventions applied together."""

    parts: list[Intervention] = field(default_factory=list)
    kind: ClassVar[str] = "compose"

    @property
    def n_components(self) -> int:
        return sum(p.n_components for p in self.parts)

    @contextlib.contextmanager
    def apply(self, model):
        with contextlib.ExitStack() as stack:
            for p in self.parts:
                stack.enter_context(p.apply(model))
            yield model

    def describe(self) -> str:
        return " + ".join(p.describe() for p in self.parts) or "no intervention"

    def to_dict(self):
        return {"parts": [{"kind": p.kind, **p.to_dict()} for p in self.parts]}

    def tensors(self):
        out = {}
        for i, p in enumerate(self.parts):
            out.update({f"{i}/{k}": v for k, v in p.tensors().items()})
        return out

    @classmethod
    def from_dict(cls, d, tensors):
        parts = []
        for i, pd in enumerate(d["parts"]):
            pd = dict(pd)
            kind = pd.pop("kind")
            sub = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{i}/")}
            parts.append(_REGISTRY[kind].from_dict(pd, sub))
        return cls(parts=parts)


@contextlib.contextmanager
def maybe_apply(intervention: Intervention | None, model):
    """``intervention.apply(model)``, or nothing when ``intervention`` is None."""
    if intervention is None:
        yield model
    else:
        with intervention.apply(model):
            yield model
