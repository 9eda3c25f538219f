"""Interventions: reversible, serialisable changes to a model, each owning its control.

An :class:`Intervention` is a small value object describing a change to the
model: zero or scale MLP neurons, ablate attention heads, zero individual
weights, add a weight delta, steer along a direction. ``intervention.apply(model)``
is a context manager; on exit the model is exactly as before (hooks removed,
weights restored from saved copies, bit for bit).

Every type also knows how to draw its own **random control**
(:meth:`Intervention.random_like`): an intervention of the same kind and size
with randomly chosen components, so evaluation code never has to ask what kind
of intervention it holds.

Types register with :func:`register_intervention`; interventions save to a
folder (``intervention.json`` plus ``tensors.safetensors``) and load back with
:func:`load_intervention`, so any method's output can be re-applied later, by the
CLI or by another tool.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.hooks import hooked
from ..core.models import model_label
from ..core.params import named_params
from ..core.results import Record, atomic_save_tensors, atomic_write_json
from ..core.resume import layer_of_name
from ..core.sites import Site
from .profile import MatchInfo

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

_REGISTRY: dict[str, type[Intervention]] = {}


def register_intervention(cls: type[Intervention]) -> type[Intervention]:
    """Class decorator: make an intervention type loadable by its ``kind``.

    Args:
        cls: an :class:`Intervention` subclass with a unique ``kind``.

    Returns:
        ``cls`` unchanged.
    """
    if not cls.kind or cls.kind == "intervention":
        raise ValueError(f"{cls.__name__} needs a class attribute 'kind'")
    if cls.kind in _REGISTRY and _REGISTRY[cls.kind] is not cls:
        raise ValueError(f"intervention kind {cls.kind!r} is registered twice "
                         f"({_REGISTRY[cls.kind].__name__} and {cls.__name__})")
    _REGISTRY[cls.kind] = cls
    return cls


def check_positions(positions: Any, model: TransformerBridge) -> None:
    """Raise ``ValueError`` unless ``positions`` is ``"all"``, ``"last"`` or a list of integer positions inside
    the model's context (-n_ctx..n_ctx-1). A position past every prompt would silently change nothing."""
    if isinstance(positions, str):
        if positions not in ("all", "last"):
            raise ValueError(f"positions must be 'all', 'last' or a list of integers, not {positions!r}")
        return
    try:
        items = list(positions)
    except TypeError:
        raise ValueError(f"positions must be 'all', 'last' or a list of integers, not {positions!r}") from None
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    for q in items:
        if isinstance(q, bool) or not isinstance(q, (int, np.integer)):
            raise ValueError(f"positions must be integers, not {q!r}")
        if n_ctx and not -n_ctx <= int(q) < n_ctx:
            raise ValueError(f"position {q} is outside this model's context (-{n_ctx}..{n_ctx - 1})")
    if not items:
        raise ValueError("positions is an empty list: the intervention would change nothing")


class ModelIdentity(TypedDict):
    """The model an intervention was made on (saved in its folder; :func:`check_model` compares it)."""

    label: str
    shape: dict[str, int]
    fingerprint: str


@dataclass
class Overlap(Record):
    """How much two rows' interventions are the same change (:meth:`Intervention.overlap`).

    Args:
        measure: ``"jaccard"`` (units), ``"abs_cosine"`` (directions, edits) or ``"subspace_cos2"`` (erasures).
        value: the measure, 1 for the same change.
        shared: units in both (Jaccard only).
        sizes: the two sets' sizes (Jaccard only).
        same_layer: whether both act at one layer (directions and erasures).
    """

    measure: str
    value: float
    shared: int | None = None
    sizes: list[int] | None = None
    same_layer: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def model_identity(model: TransformerBridge) -> ModelIdentity:
    """What an intervention folder records about the model it was made on: label, shape and a fingerprint of a
    sample of its weights (the first 4096 values of the first, middle and last parameters)."""
    cfg = model.cfg
    shape = {k: int(getattr(cfg, k)) for k in ("n_layers", "d_model", "n_heads", "d_mlp", "d_vocab")
             if getattr(cfg, k, None) is not None}
    params = list(model.named_parameters())
    h = hashlib.sha256()
    for name, t in [params[0], params[len(params) // 2], params[-1]] if params else []:
        v = t.detach().reshape(-1)[:4096].float().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(v.numpy().tobytes())
    return {"label": model_label(model), "shape": shape, "fingerprint": h.hexdigest()[:16]}


def check_model(intervention: Intervention, model: TransformerBridge, *, force: bool = False) -> None:
    """Refuse (``ValueError``) an intervention made on another model: a different shape always, a different
    weight fingerprint unless ``force``. Folders saved without a model record pass (older mechbias)."""
    origin = getattr(intervention, "origin", None)
    if not origin:
        return
    here = model_identity(model)
    if origin.get("shape") and origin["shape"] != here["shape"]:
        raise ValueError(f"this intervention was made on {origin.get('label')} with shape {origin['shape']}; the "
                         f"model loaded here ({here['label']}) has shape {here['shape']}")
    if not force and origin.get("fingerprint") not in (None, here["fingerprint"]):
        raise ValueError(f"this intervention was made on {origin.get('label')} (weights {origin['fingerprint']}), "
                         f"not on the model loaded here ({here['label']}, weights {here['fingerprint']}); pass "
                         "--allow-other-model to apply it anyway")


def jaccard(a: set, b: set) -> Overlap:
    """The Jaccard overlap ``|a & b| / |a | b|`` of two unit sets (1.0 for two empty sets)."""
    union = a | b
    return Overlap("jaccard", float(len(a & b) / len(union)) if union else 1.0, shared=len(a & b),
                   sizes=[len(a), len(b)])


def abs_cosine(a: Float[Tensor, ...], b: Float[Tensor, ...], *, same_layer: bool | None = None) -> Overlap:
    """``|cos(a, b)|`` of two flattened tensors (NaN if one is 0)."""
    a, b = a.double().flatten(), b.double().flatten()
    den = float(a.norm() * b.norm())
    return Overlap("abs_cosine", float(abs(a @ b) / den) if den > 0 else float("nan"), same_layer=same_layer)


def intervention_types() -> dict[str, type[Intervention]]:
    """The registered intervention types, by ``kind``."""
    return dict(_REGISTRY)


class NotFoldable(ValueError):
    """An intervention that no change of the weights reproduces exactly (it is refused, never approximated)."""


class Intervention:
    """Base class: a reversible change to a model, serialisable to a folder."""

    kind: ClassVar[str] = "intervention"
    #: the model it was made on (:func:`model_identity`), recorded in ``intervention.json`` when known; set on
    #: an instance (not a dataclass field, so it never enters equality or the subclasses' constructors)
    origin: dict | None = None
    #: for a matched control draw: the caliper, the achieved balance and the unmatched units (set on instances)
    match_info: MatchInfo | None = None

    # -- behaviour --
    def hooks(self, model: TransformerBridge) -> list[tuple[Any, Callable]]:
        """Forward hooks implementing the intervention (none for weight edits)."""
        return []

    @contextlib.contextmanager
    def apply(self, model: TransformerBridge) -> Iterator[Any]:
        """Context manager: the model carries the intervention inside the block."""
        with hooked(model, self.hooks(model)):
            yield model

    def validate(self, model: TransformerBridge) -> None:
        """Raise ``ValueError`` if the intervention does not fit the model."""

    def random_like(self, model: TransformerBridge, seed: int) -> Intervention:
        """A random control: the same kind and size, components drawn at random (seeded)."""
        raise NotImplementedError(f"{type(self).__name__} defines no random control")

    def controls(self, model: TransformerBridge, n: int, seed: int, *, profile=None,
                 kinds: tuple[str, ...] = ("random",)) -> dict[str, list[Intervention]]:
        """The controls this intervention compares against: ``kind -> draws``.

        ``random``: ``n`` draws of :meth:`random_like`. Types that can match their
        components on size (``matched``) or cost (``matched_cost``) override this;
        ``profile`` (a :class:`~mechbias.interventions.profile.UnitProfile`) holds
        what they match on. Kinds a type cannot draw are left out."""
        out: dict[str, list[Intervention]] = {}
        if "random" in kinds and n > 0:
            out["random"] = [self.random_like(model, seed + 101 * (k + 1)) for k in range(n)]
        return out

    def check_foldable(self) -> None:
        """Raise :class:`NotFoldable` if no model could take this intervention as a weight change (checked before a
        model is loaded; :meth:`fold` may still refuse a particular model family)."""
        if type(self).fold is Intervention.fold:
            raise NotFoldable(f"{self.describe()}: a {type(self).__name__} has no exact form as a weight change")

    def fold(self, model: TransformerBridge, params: dict[str, Tensor]) -> None:
        """Write the intervention into ``params`` (clean parameter names -> detached copies of the model's
        weights), so that the model with these weights and no hooks computes what the hooked model computes.

        Raises :class:`NotFoldable`, leaving ``params`` as they were, where no weight change does that exactly
        (an intervention at some positions only, a change of the residual stream with no bias to hold it).
        """
        raise NotFoldable(f"{self.describe()}: a {type(self).__name__} has no exact form as a weight change")

    @property
    def positions(self) -> Any:
        """Where in the sequence the intervention acts: ``"all"`` unless a subclass says otherwise."""
        return "all"

    def first_layer(self, model: TransformerBridge) -> int:
        """The earliest block whose computation the intervention can change: blocks before it compute what the
        unmodified model computes, so a forward may resume there (:mod:`mechbias.core.resume`).

        From the hook names of :meth:`hooks`; ``model.cfg.n_layers`` for a hook after the last block (the
        unembedding), 0 for an embedding hook and for a type that overrides :meth:`apply` without overriding
        this (unknown: nothing is skipped)."""
        if type(self).apply is not Intervention.apply:
            return 0
        n = int(model.cfg.n_layers)
        names = [h.hook_name if isinstance(h, Site) else h for h, _ in self.hooks(model)]
        return min((layer_of_name(x, n) if isinstance(x, str) else 0 for x in names), default=n)

    def overlap(self, other: Intervention) -> Overlap | None:
        """How much this intervention and ``other`` (another row's selection) are the same change
        (Jaccard of units, absolute cosine of directions and edits), or None where the
        two are not comparable. Identical interventions give within = cross by construction, so transfer
        results are read beside this."""
        return None

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
    def from_dict(cls, d: dict, tensors: dict[str, Tensor]) -> Intervention:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = self.tensors()
        if tensors:
            atomic_save_tensors(tensors, path / "tensors.safetensors")
        record = {"kind": self.kind, **self.to_dict()}
        if self.origin:
            record["model"] = self.origin
        atomic_write_json(record, path / "intervention.json")
        return path


def intervention_from_dict(d: dict, tensors: dict[str, Tensor]) -> Intervention:
    """Rebuild an intervention from its saved dict and tensors."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in _REGISTRY:
        raise ValueError(f"unknown intervention kind {kind!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[kind].from_dict(d, tensors)


def load_intervention(path: str | Path) -> Intervention:
    """Load an intervention saved with :meth:`Intervention.save`.

    Args:
        path: the folder written by ``save``.

    Returns:
        The intervention, of the registered type its files name.

    Raises:
        FileNotFoundError: the folder holds no saved intervention.
        ValueError: it holds one of an unknown kind.
    """
    path = Path(path)
    meta = path / "intervention.json"
    if not meta.is_file():
        runs = [d / "interventions" for d in (path, path.parent) if (d / "interventions").is_dir()]
        hint = (f"; a method run keeps its interventions in {runs[0]}/<context> (one of: "
                f"{', '.join(sorted(q.name for q in runs[0].iterdir()))})") if runs else ""
        raise FileNotFoundError(f"{path} holds no saved intervention (missing intervention.json){hint}")
    try:
        d = json.loads(meta.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta}: not valid JSON ({err}); the folder is damaged, save the intervention again") \
            from None
    if not isinstance(d, dict):
        raise ValueError(f"{meta}: expected a JSON object, found {type(d).__name__}")
    origin = d.pop("model", None)
    tensors = {}
    if (path / "tensors.safetensors").exists():
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path / "tensors.safetensors"))
        except Exception as err:
            raise ValueError(f"{path / 'tensors.safetensors'}: cannot be read ({err}); the folder is damaged") \
                from None
    try:
        iv = intervention_from_dict(d, tensors)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        what = f"missing {err}" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"{meta}: not a valid {d.get('kind', 'intervention')} ({what})") from None
    if origin:
        iv.origin = origin
    return iv


def stackable_hooks(intervention: Intervention, model: TransformerBridge) -> list[tuple[Any, Callable]] | None:
    """The forward hooks that are the whole of ``intervention`` (it changes no weight and has no ``apply`` of its
    own; a composition whose parts all are), or None. Such interventions can share one forward, each acting on
    its own rows of the batch (:meth:`~mechbias.eval.cells.EvalSet.scores_many`)."""
    if isinstance(intervention, Compose):
        parts = [stackable_hooks(p, model) for p in intervention.parts]
        return None if any(h is None for h in parts) else [h for hs in parts for h in hs or []]
    if type(intervention).apply is not Intervention.apply:
        return None
    return list(intervention.hooks(model))


@contextlib.contextmanager
def maybe_apply(intervention: Intervention | None, model: TransformerBridge):
    """``intervention.apply(model)``, or nothing when ``intervention`` is None."""
    if intervention is None:
        yield model
    else:
        with intervention.apply(model):
            yield model


def as_layer_dict(items) -> dict[int, list[int]]:
    """Accept ``{layer: [idx...]}`` or ``[(layer, idx), ...]``; return a sorted dict."""
    out: dict[int, set[int]] = {}
    if isinstance(items, dict):
        pairs = [(int(l), int(i)) for l, idx in items.items() for i in idx]
    else:
        pairs = [(int(l), int(i)) for l, i in items]
    for l, i in pairs:
        out.setdefault(l, set()).add(i)
    return {l: sorted(v) for l, v in sorted(out.items())}


def param(model: TransformerBridge, name: str) -> torch.nn.Parameter:
    """The parameter ``name`` of ``model`` (a :func:`~mechbias.core.params.named_params` name)."""
    params = named_params(model)
    if name not in params:
        raise ValueError(f"model has no parameter named {name!r}")
    return params[name]


@contextlib.contextmanager
def restoring(params: dict[str, torch.nn.Parameter]):
    """Save copies of parameters and restore them bit for bit on exit."""
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


@register_intervention
@dataclass
class Identity(Intervention):
    """No change (the unmodified model)."""

    kind: ClassVar[str] = "identity"

    def to_dict(self) -> dict:
        return {}

    @classmethod
    def from_dict(cls, d, tensors):
        return cls()

    def fold(self, model: TransformerBridge, params: dict[str, Tensor]) -> None:
        pass

    def random_like(self, model: TransformerBridge, seed: int) -> Identity:
        return Identity()

    def describe(self) -> str:
        return "no intervention"


@register_intervention
@dataclass
class Compose(Intervention):
    """Several interventions applied together (in order; removed in reverse order).

    Args:
        parts: the interventions.
    """

    parts: list[Intervention] = field(default_factory=list)
    kind: ClassVar[str] = "compose"

    @property
    def n_components(self) -> int:
        return sum(p.n_components for p in self.parts)

    @property
    def positions(self) -> Any:
        pos = {str(p.positions) for p in self.parts}
        return self.parts[0].positions if len(pos) == 1 and self.parts else "all"

    @contextlib.contextmanager
    def apply(self, model: TransformerBridge):
        with contextlib.ExitStack() as stack:
            for p in self.parts:
                stack.enter_context(p.apply(model))
            yield model

    def first_layer(self, model: TransformerBridge) -> int:
        return min((p.first_layer(model) for p in self.parts), default=int(model.cfg.n_layers))

    def fold(self, model: TransformerBridge, params: dict[str, Tensor]) -> None:
        """Each part in turn (all parts are checked before any is written)."""
        self.check_foldable()
        trial = {n: t.clone() for n, t in params.items()}
        for p in self.parts:
            p.fold(model, trial)
        params.update(trial)

    def check_foldable(self) -> None:
        for p in self.parts:
            p.check_foldable()

    def random_like(self, model: TransformerBridge, seed: int) -> Compose:
        return Compose([p.random_like(model, seed + 7919 * i) for i, p in enumerate(self.parts)])

    def controls(self, model: TransformerBridge, n: int, seed: int, *, profile=None,
                 kinds: tuple[str, ...] = ("random",)) -> dict[str, list[Intervention]]:
        """Each kind that every part can draw, composed part by part."""
        per_part = [p.controls(model, n, seed + 7919 * i, profile=profile, kinds=kinds) for i, p in enumerate(self.parts)]
        common = [k for k in kinds if per_part and all(k in c for c in per_part)]
        return {k: [Compose([c[k][d] for c in per_part]) for d in range(min(len(c[k]) for c in per_part))]
                for k in common}

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
            sub = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{i}/")}
            parts.append(intervention_from_dict(pd, sub))
        return cls(parts=parts)
