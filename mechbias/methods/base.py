"""The method interface and registry.

A method finds, on one context's selection split, an intervention that should
remove a bias. It is a class with

* ``name`` (the registry key and the CLI command), ``title`` and ``summary``;
* ``Config``: a dataclass of its settings, validated in ``__post_init__``; every
  field becomes a command-line flag (its ``metadata["help"]`` is the help text);
* ``select(model, context, axis) -> Selection``: the intervention plus whatever
  the method wants to keep (attributions, a trained feature, ...), using only
  the context's selection split;
* optionally ``analyze(...)`` (extra analyses after all contexts are selected,
  e.g. the IG² paper's verification) and ``report(...)`` (its Markdown for the
  study report), and ``study_configs(quick)`` (the variants the study runs).

Registering (``@register_method``) is all it takes to appear in the CLI, the
study and the transfer matrices. A method instance is also a transfer-engine
selector: calling it returns the intervention and keeps the selection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

from ..core.choices import check_choices
from ..core.precision import Precision, compute_precision
from ..core.results import atomic_write_json
from ..data.axes import load_axis
from ..data.contexts import Context, load_context
from ..data.leakage import selection_phase
from ..interventions.base import Intervention

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

_METHODS: dict[str, type[Method]] = {}


@dataclass
class MethodConfig:
    """Base of method configurations; subclasses add fields and override :meth:`validate`.

    Args:
        precision: compute precision of the selection: ``"exact"`` (float32) or ``"fast"`` (bfloat16
            autocast; choices only, every reported number is computed exact).
    """

    precision: Precision = field(default="exact", kw_only=True, metadata={
        "help": "compute precision of the selection: exact (float32) or fast (bfloat16 autocast; choices only, "
                "every reported number is computed exact)"})

    def __post_init__(self):
        check_choices(self)  # every Literal-typed option, from its annotation
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with a clear message for settings that cannot work (the choices of
        ``Literal``-typed options are checked before it, from their annotations)."""

    def to_dict(self) -> dict:
        return asdict(self)


class StudyExtras(TypedDict, total=False):
    """Per study variant (:meth:`Method.study_extras`): the step's title, keyword arguments for
    :meth:`Method.analyze`, transfer-config overrides, and how many of the study's contexts are rows."""

    title: str
    analyze: dict[str, Any]
    transfer: dict[str, Any]
    rows: int


@dataclass
class Selection:
    """What a method chose on one context: the intervention and the results behind it.

    Args:
        context: the context it was selected on.
        axis: the axis.
        intervention: the chosen intervention.
        artifacts: the method's intermediate results (attributions, sweeps, training curves).
        summary: a few numbers for tables.
        controls: the method's own controls (name -> draws), evaluated beside the generic ones.
    """

    context: str
    axis: str
    intervention: Intervention
    artifacts: dict[str, Any] = field(default_factory=dict)  # name -> Result
    summary: dict = field(default_factory=dict)
    controls: dict[str, list[Intervention]] = field(default_factory=dict)  # method-specific controls

    def save(self, path: str | Path, *, intervention: bool = True) -> Path:
        """Write the artifacts and ``selection.json`` under ``path`` and, with ``intervention``, the intervention
        under ``path/intervention`` (a method run keeps it in ``interventions/<context>`` instead)."""
        path = Path(path)
        if intervention:
            self.intervention.save(path / "intervention")
        for name, res in self.artifacts.items():
            res.save(path / name)
        atomic_write_json({"context": self.context, "axis": self.axis, "intervention": self.intervention.describe(),
                           "n_components": self.intervention.n_components, **self.summary},
                          path / "selection.json")
        return path


class Method:
    """Base class of the registered methods (see the module docstring).

    A method instance is a selector: ``method(model, context, axis)`` selects on the context's selection
    split and returns the intervention; ``method.selections`` keeps what it chose.

    Args:
        config: the method's ``Config`` (its CLI flags); ``None`` = the defaults.
        seed: seed of the splits and any sampling.

    Progress lines go to the logger ``mechbias.methods.<name>`` (``self.log``; see :mod:`mechbias.core.log`).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: whether the default (fast) study runs this method; ``--full`` and ``--methods`` run it regardless
    in_default_study: ClassVar[bool] = True
    #: study steps selected at ``"fast"`` by default (``--precision auto``; the others select ``"exact"``): only
    #: where ``benchmarks/precision.py`` measured the bfloat16 selection >= 1.5x faster than the float32 one
    #: with an overlap >= 0.8 (a rule on selection outputs only: no held-out number enters it)
    fast_study_steps: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: MethodConfig | None = None, *, seed: int = 0):
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(self.config).__name__}")
        self.seed = seed
        self.log = logging.getLogger(f"mechbias.methods.{self.name}").info  # progress lines (mechbias.core.log)
        self.selections: dict[str, Selection] = {}

    # -- the interface --
    def select(self, model: TransformerBridge, context: Context, axis: str) -> Selection:
        raise NotImplementedError

    def analyze(self, model: TransformerBridge, axis: str, out: Path, *, quick: bool = False, transfer=None,
                eval_sets: dict | None = None, n_boot: int = 1000, **extras) -> dict[str, Any]:
        """Extra analyses over the selections made so far; returns a JSON-able summary (may write figures
        under ``out / "figures"`` and list them in ``summary["figures"]``). ``transfer`` is the method's
        transfer matrix when one was computed; ``extras`` come from :meth:`study_extras`."""
        return {}

    def report(self, summary: dict, fig: Callable[[str], str]) -> str:
        """Markdown describing :meth:`analyze`'s summary in the study report."""
        return ""

    @classmethod
    def html(cls, step: Path, summary: dict) -> list[str]:
        """The method's own sections of the interactive study report for one finished step: HTML fragments built
        from the step's summary and the files this method wrote under ``step`` (rendering helpers are in
        :mod:`mechbias.viz.html`). The default adds none."""
        return []

    @classmethod
    def study_configs(cls, quick: bool = False, full: bool = True) -> Mapping[str, MethodConfig]:
        """The variants the study runs: step name -> config (``full=False``: the default study's variant,
        at settings that keep it within its time budget)."""
        return {cls.name: cls.Config()}

    @classmethod
    def study_extras(cls, step: str, quick: bool = False, full: bool = True) -> StudyExtras:
        """Per study variant: ``title``, keyword arguments for :meth:`analyze` and transfer-config overrides
        (``full=False``: the default study's, within its time budget)."""
        return {"title": cls.title, "analyze": {}, "transfer": {}}

    # -- the selector protocol of the transfer engine --
    def __call__(self, model: TransformerBridge, context: Context | str, axis: str) -> Intervention:
        ctx = load_context(context)
        precision = getattr(self.config, "precision", "exact")
        with selection_phase(f"{self.name}.select"), compute_precision(model, precision):
            sel = self.select(model, ctx, axis)
        sel.summary.setdefault("precision", precision)
        self.selections[ctx.name] = sel
        return sel.intervention

    def describe(self) -> str:
        return f"{self.title}: {self.summary}" if self.summary else self.title

    # -- helpers shared by methods that read one layer's residual stream on the selection split --
    @staticmethod
    def resolve_layer(model: TransformerBridge, layer: int | None, what: str) -> int:
        """``layer``, or the middle layer when None; ``ValueError`` naming ``what`` if it is past the model."""
        out = model.cfg.n_layers // 2 if layer is None else layer
        if out >= model.cfg.n_layers:
            raise ValueError(f"{what} layer {out} is outside 0..{model.cfg.n_layers - 1}")
        return out

    def selection_prompts(self, context: Context, axis: str):
        """The context's selection split (selection templates x selection names) for ``axis``."""
        return context.prompts(load_axis(axis), templates="selection", names="selection", seed=self.seed)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry (the CLI and the study read it).

    Args:
        cls: a :class:`Method` subclass with a unique ``name`` and a ``Config`` dataclass.

    Returns:
        ``cls`` unchanged.
    """
    if not cls.name or not cls.name.replace("_", "").isalnum():
        raise ValueError(f"{cls.__name__} needs a name of letters, digits and underscores")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls
    return cls


def registered_methods() -> dict[str, type[Method]]:
    """The registered methods, in registration order.

    Returns:
        A dict from method name to method class.
    """
    return dict(_METHODS)


def get_method(name: str) -> type[Method]:
    """The registered method class named ``name``.

    Args:
        name: a key of :func:`registered_methods` (``"ig2"``, ``"patching"``, ``"prune"``, ...).

    Returns:
        The method class; call it with its ``Config`` (or nothing, for the defaults) to get a selector.

    Raises:
        ValueError: no method of that name (the message lists the registered ones).
    """
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(_METHODS)}")
    return _METHODS[name]


def config_from_dict(cls: type[MethodConfig], d: dict[str, Any]) -> MethodConfig:
    """A config from a dict, refusing keys the config does not have (no silently ignored settings)."""
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no settings {unknown}; known: {sorted(known)}")
    return cls(**d)
