"""Contexts, as data.

A **context** is a YAML file (built-ins live in ``mechbias/data/files/contexts/``):
a name, a description, at least two (built-ins: thirty) templates with a
``{name}`` slot, a contrast pair of answers (``positive`` is the outcome
favourable to the named person), a numeric question for the generation metric,
and demographic-prediction prompts for IG². Users add their own by passing a
path to :func:`load_context` (or dropping a file into a folder passed as
``MECHBIAS_CONTEXTS``).

**Template splits** are deterministic, per context: templates are ordered by a hash of
(seed, context, template) and split into a *selection* and a *held-out* half, like the names of an
axis (:mod:`mechbias.data.axes`). A context may declare ``split_blocks`` (sizes of consecutive blocks of
templates): each block is halved on its own, so templates added later never move an earlier one across. Prompt sets are in :mod:`mechbias.data.prompts`, aligned pairs for
patching in :mod:`mechbias.data.pairs`.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .axes import DATA, Axis, ContextError, Person, list_axes, load_axis, pronouns, stable_hash
from .leakage import check_not_reporting, resolve_split, split_salt
from .prompts import Prompt, PromptSet

SLOTS = {"name", "pronoun", "Pronoun", "possessive", "object"}
#: answer formats a context may declare (``format:``): yes/no, a two-option choice, a rating scale
FORMATS = ("yes_no", "choice", "rating", "unspecified")



@dataclass(frozen=True)
class Context:
    """A context as data: templates with a ``{name}`` slot and a contrast pair of answers.

    Args:
        name: a plain file name (it names output folders).
        description: one sentence on what the context asks.
        axes: the axes it is crossed with (``"race"``, ``"gender"``).
        positive: the answer favourable to the named person (e.g. ``" Yes"``).
        negative: the unfavourable answer.
        templates: the prompts, each with a ``{name}`` slot (and optionally pronoun slots).
        numeric_templates: questions with a numeric answer, for the generation metric.
        numeric_unit: the unit of the numeric answer (``"$"``, ``"%"``).
        numeric_prefix: text the numeric answer is read after.
        outcomes: polarity -> outcome words, for IG²'s demographic prompts.
        demographic_templates: axis -> templates with an ``{outcome}`` slot (IG²).
        source: where the context came from (a path for user files).
        format: the answer format, one of :data:`FORMATS` (``yes_no``, ``choice``, ``rating``).
        split_blocks: sizes of consecutive blocks of templates, each split in half on its own (empty: one
            block). Templates added to a context go into a new block, so no earlier template changes split.
    """
    name: str
    description: str
    axes: tuple[str, ...]
    positive: str
    negative: str
    templates: tuple[str, ...]
    numeric_templates: tuple[str, ...] = ()
    numeric_unit: str = ""
    numeric_prefix: str = ""
    outcomes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    demographic_templates: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""
    format: str = "unspecified"
    split_blocks: tuple[int, ...] = ()

    # -- splits --
    def template_split(self, split: str = "selection", seed: int = 0) -> list[int]:
        """Template indices of the ``selection``, ``heldout`` or ``all`` split."""
        check_not_reporting("templates", split)
        idx = list(range(len(self.templates)))
        if split == "all":
            return idx
        if split not in ("selection", "heldout"):
            raise ValueError(f"split must be 'selection', 'heldout' or 'all', not {split!r}")
        split, salt = resolve_split(split), split_salt()  # cross-fitting folds and repeated splits
        out: list[int] = []
        start = 0
        for size in self.split_blocks or (len(idx),):  # each block ranked by the hash and halved on its own
            ordered = sorted(idx[start:start + size], key=lambda i: stable_hash(seed, f"{self.name}:{i}{salt}"))
            half = (len(ordered) + 1) // 2
            out += ordered[:half] if split == "selection" else ordered[half:]
            start += size
        return sorted(out)

    # -- prompts --
    def prompts(
        self,
        axis: str | Axis,
        *,
        templates: str | Sequence[int] = "all",
        names: str | Sequence[Person] = "all",
        seed: int = 0,
        blocks: int = 1,
    ) -> PromptSet:
        """The grid templates x names as a :class:`PromptSet` for one axis.

        ``blocks > 1`` gives the **incomplete crossed design**: within each race x gender cell the names are
        ordered by a hash of ``(seed, name)`` and dealt into ``blocks`` blocks in turn, and the j-th template
        (in index order) meets only block ``j mod blocks``. Every template then meets every cell in equal
        shares (template effects cancel in a group gap), every name meets about ``templates / blocks``
        templates, and the prompt count is ``templates x names / blocks``."""
        ax = load_axis(axis)
        if ax.name not in self.axes:
            raise ValueError(f"context {self.name!r} is not crossed with axis {ax.name!r} (axes: {self.axes})")
        t_idx = self.template_split(templates, seed) if isinstance(templates, str) else list(templates)
        ppl = ax.split_people(names, seed) if isinstance(names, str) else list(names)
        if not t_idx or not ppl:
            raise ValueError(f"empty prompt grid for context {self.name!r}: {len(t_idx)} templates, {len(ppl)} names")
        for t in t_idx:
            if not 0 <= t < len(self.templates):
                raise ValueError(f"template index {t} out of range for context {self.name!r}")
        if not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"blocks must be a positive integer, not {blocks!r}")
        if blocks > len(t_idx):
            raise ValueError(f"{blocks} blocks need at least as many templates; the split has {len(t_idx)}")
        block = name_blocks(ppl, blocks, seed)
        items = [
            Prompt(fill(self.templates[t], p), t, p, ax.group_index(p))
            for j, t in enumerate(t_idx) for p in ppl if block[p.name] == j % blocks
        ]
        return PromptSet(self.name, ax, self.positive, self.negative, items, blocks=blocks)

    def demographic_prompts(self, axis: str | Axis, polarity: str | None = None) -> list[DemographicPrompt]:
        """IG²-style prompts: each template filled with each outcome word.

        The ``bag`` of a prompt is its outcome word (every template filled with
        one word), as the IG² paper's bag is one adjective in all templates.
        """
        ax = load_axis(axis)
        if ax.name not in self.demographic_templates:
            raise ValueError(f"context {self.name!r} has no demographic prompts for axis {ax.name!r}")
        out = []
        for pol, words in sorted(self.outcomes.items()):
            if polarity is not None and pol != polarity:
                continue
            for w in words:
                for t, tpl in enumerate(self.demographic_templates[ax.name]):
                    out.append(DemographicPrompt(tpl.replace("{outcome}", w), t, w, pol))
        return out

    def numeric_prompts(self, axis: str | Axis, *, names: str | Sequence[Person] = "all",
                        templates: Sequence[int] | None = None, seed: int = 0) -> PromptSet:
        """Numeric questions (generation metric) for the names of an axis."""
        if not self.numeric_templates:
            raise ValueError(f"context {self.name!r} has no numeric templates")
        ax = load_axis(axis)
        ppl = ax.split_people(names, seed) if isinstance(names, str) else list(names)
        t_idx = list(range(len(self.numeric_templates))) if templates is None else list(templates)
        items = [Prompt(fill(self.numeric_templates[t], p), t, p, ax.group_index(p)) for t in t_idx for p in ppl]
        return PromptSet(self.name, ax, "", "", items, answer_prefix=self.numeric_prefix)


@dataclass(frozen=True)
class DemographicPrompt:
    """An IG²-style prompt: a demographic template filled with one outcome word."""
    text: str
    template: int
    outcome: str
    polarity: str


def design_blocks(ctx: Context, templates: str | Sequence[int] = "heldout", templates_per_name: int = 5,
                  seed: int = 0, people: Sequence[Person] | None = None) -> int:
    """Blocks of the incomplete crossed design that let each name meet about ``templates_per_name`` of the
    templates (1, the full grid, when there are no more templates than that or ``templates_per_name`` is 0),
    and, with ``people``, no more blocks than the smallest race x gender cell has names (every block then
    holds a name of every cell).

    Args:
        ctx: the context.
        templates: its split (``"heldout"``) or template indices.
        templates_per_name: templates each name should meet; 0 for every template.
        seed: the split's seed.
        people: the names the prompts will use (none: no cap).

    Returns:
        The number of blocks for :meth:`Context.prompts`.
    """
    n = len(ctx.template_split(templates, seed) if isinstance(templates, str) else list(templates))
    blocks = max(1, n // templates_per_name) if templates_per_name > 0 else 1
    if people:
        cells: dict[tuple[str, str], int] = {}
        for p in people:
            cells[(p.race, p.gender)] = cells.get((p.race, p.gender), 0) + 1
        blocks = max(1, min(blocks, *cells.values()))
    return blocks


def name_blocks(people: Sequence[Person], blocks: int, seed: int = 0) -> dict[str, int]:
    """The block of each name in the incomplete crossed design: dealt in turn within each race x gender cell,
    in the order of a hash of ``(seed, name)``."""
    out: dict[str, int] = {}
    cells: dict[tuple[str, str], list[Person]] = {}
    for p in people:
        cells.setdefault((p.race, p.gender), []).append(p)
    for key in sorted(cells):
        for k, p in enumerate(sorted(cells[key], key=lambda q: stable_hash(seed, f"block:{q.name}"))):
            out[p.name] = k % blocks
    return out


def fill(template: str, person: Person) -> str:
    """Fill ``{name}`` and pronoun slots for one person."""
    return template.format(name=person.name, **pronouns(person.gender))


def _slots(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


def _require(cond: bool, src: str, fld: str, msg: str) -> None:
    if not cond:
        raise ContextError(f"{src}: field '{fld}' {msg}")


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: the largest context file accepted (the built-in ones are about 3 kB)
MAX_CONTEXT_BYTES = 1_000_000


def parse_context(data: dict, source: str = "<dict>") -> Context:
    """Validate a context dictionary (as read from YAML) and build a :class:`Context`."""
    _require(isinstance(data, dict) and bool(data), source, "(root)", "is empty: the file defines no context")
    for key in ("name", "templates", "answers"):
        _require(key in data, source, key, "is missing")
    name = data["name"]
    _require(isinstance(name, str) and name.strip() != "", source, "name", "must be a non-empty string")
    # a context's name becomes a folder name in every output: letters, digits, '_', '-' and '.', no path
    _require(bool(_SAFE_NAME.fullmatch(name.strip())) and len(name.strip()) <= 64, source, "name",
             f"must be 1-64 letters, digits, '_', '-' or '.' starting with a letter or digit, not {name!r}")
    tpls = data["templates"]
    _require(isinstance(tpls, list) and len(tpls) >= 2 and all(isinstance(t, str) for t in tpls),
             source, "templates", "must be a list of at least 2 strings")
    _require(len(tpls) <= 10_000, source, "templates", f"holds {len(tpls)} templates; at most 10000")
    for i, t in enumerate(tpls):
        _require(len(t) <= 2000, source, f"templates[{i}]", "is longer than 2000 characters")
        _require(all(not spec and conv is None for _, f, spec, conv in string.Formatter().parse(t) if f is not None),
                 source, f"templates[{i}]", "may not use format specs or conversions (write {name}, not {name:>9})")
        slots = _slots(t)
        _require("name" in slots, source, f"templates[{i}]", "has no {name} slot")
        _require(slots <= SLOTS, source, f"templates[{i}]", f"uses unknown slots {sorted(slots - SLOTS)}")
    ans = data["answers"]
    _require(isinstance(ans, dict) and "positive" in ans and "negative" in ans, source, "answers",
             "must have 'positive' and 'negative'")
    _require(isinstance(ans["positive"], str) and isinstance(ans["negative"], str) and ans["positive"] != ans["negative"]
             and ans["positive"].strip() != "" and ans["negative"].strip() != "",
             source, "answers", "must be two different non-empty strings")
    fmt = data.get("format", "unspecified")
    _require(fmt in FORMATS, source, "format", f"must be one of {list(FORMATS)}, not {fmt!r}")
    blocks = data.get("split_blocks", [])
    _require(isinstance(blocks, list) and all(isinstance(b, int) and not isinstance(b, bool) and b >= 2
                                              for b in blocks) and (not blocks or sum(blocks) == len(tpls)),
             source, "split_blocks", f"must be a list of block sizes >= 2 that add up to the {len(tpls)} templates")
    axes = data.get("axes", ["race", "gender"])
    _require(isinstance(axes, list) and bool(axes), source, "axes", "must be a non-empty list")
    known = list_axes()
    for a in axes:
        _require(a in known, source, "axes", f"names unknown axis {a!r} (known: {known})")
    numeric = data.get("numeric") or {}
    ntpls = numeric.get("templates", []) if isinstance(numeric, dict) else []
    _require(isinstance(ntpls, list) and all(isinstance(t, str) and "name" in _slots(t) for t in ntpls),
             source, "numeric.templates", "must be a list of strings with a {name} slot")
    demo = data.get("demographic") or {}
    _require(isinstance(demo, dict), source, "demographic", "must be a mapping")
    for fld in ("outcomes", "templates"):
        sub = demo.get(fld) or {}
        _require(isinstance(sub, dict), source, f"demographic.{fld}", "must be a mapping")
        for k, v in sub.items():  # a bare string would be split into letters
            _require(isinstance(v, list) and all(isinstance(x, str) for x in v), source, f"demographic.{fld}.{k}",
                     f"must be a list of strings, not {type(v).__name__} (write [{v!r}] for one)")
    outcomes = {k: tuple(v) for k, v in (demo.get("outcomes") or {}).items()}
    dtpls = {k: tuple(v) for k, v in (demo.get("templates") or {}).items()}
    for ax, ts in dtpls.items():
        _require(ax in known, source, f"demographic.templates.{ax}", "is not a known axis")
        for i, t in enumerate(ts):
            _require(isinstance(t, str) and "{outcome}" in t, source, f"demographic.templates.{ax}[{i}]",
                     "must be a string with an {outcome} slot")
    if dtpls:
        _require(bool(outcomes) and all(len(v) > 0 for v in outcomes.values()), source,
                 "demographic.outcomes", "must list outcome words when demographic templates are given")
    return Context(
        name=name.strip(),
        description=str(data.get("description", "")).strip(),
        axes=tuple(axes),
        positive=ans["positive"],
        negative=ans["negative"],
        templates=tuple(tpls),
        numeric_templates=tuple(ntpls),
        numeric_unit=str(numeric.get("unit", "")) if isinstance(numeric, dict) else "",
        numeric_prefix=str(numeric.get("answer_prefix", "")) if isinstance(numeric, dict) else "",
        outcomes=outcomes,
        demographic_templates=dtpls,
        source=source,
        format=fmt,
        split_blocks=tuple(blocks),
    )


def _context_dirs() -> list[Path]:
    dirs = [DATA / "contexts"]
    extra = os.environ.get("MECHBIAS_CONTEXTS")
    if extra:
        dirs.extend(Path(d) for d in extra.split(os.pathsep) if d)
    return dirs


def list_contexts() -> list[str]:
    """Names of the built-in contexts (and those in ``$MECHBIAS_CONTEXTS`` folders).

    Returns:
        The names, sorted.
    """
    names: list[str] = []
    for d in _context_dirs():
        if d.is_dir():
            names.extend(p.stem for p in sorted(d.glob("*.yaml")))
    return sorted(set(names))


#: the built-in contexts ("all"): four yes/no decisions, a two-option choice and a word rating
BUILTIN_CONTEXTS = ("finance", "commerce", "hiring", "housing", "healthcare", "education")
#: the four yes/no contexts: the planted models (v2, v3) and the analyses made before the other two existed use these
YES_NO_CONTEXTS = ("finance", "commerce", "hiring", "housing")
#: contexts read from a user's file in this process, by name: methods look contexts up by name
_USER_FILES: dict[str, Path] = {}


def load_context(name_or_path: str | Path | Context) -> Context:
    """Load a built-in context by name, or any context YAML file by path.

    Args:
        name_or_path: a built-in name (see :func:`list_contexts`), a path to a YAML file, or a
            :class:`Context` (returned as is).

    Returns:
        The validated :class:`Context`.

    Raises:
        ValueError: unknown name (the message lists the built-ins).
        ContextError: a file that is not a valid context (the message names the field).
    """
    if isinstance(name_or_path, Context):
        return name_or_path
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        path = p
    else:
        path = None
        for d in _context_dirs():
            if (d / f"{name_or_path}.yaml").exists():
                path = d / f"{name_or_path}.yaml"
                break
        if path is None:
            path = _USER_FILES.get(str(name_or_path))
        if path is None:
            raise ValueError(f"Unknown context {str(name_or_path)!r}; available: {list_contexts()} "
                             "(or pass the path of a YAML file)")
    assert path is not None
    if not path.exists():
        raise FileNotFoundError(f"context file {path} does not exist")
    if not path.is_file():
        raise ContextError(f"{path}: is a folder, not a context YAML file")
    if path.stat().st_size > MAX_CONTEXT_BYTES:
        raise ContextError(f"{path}: {path.stat().st_size} bytes; a context file may hold at most "
                           f"{MAX_CONTEXT_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ContextError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    if not text.strip():
        raise ContextError(f"{path}: the file is empty")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ContextError(f"{path}: not valid YAML ({e})") from e
    ctx = parse_context(data, str(path))
    if not any(path.resolve().parent == d.resolve() for d in _context_dirs() if d.is_dir()):
        _USER_FILES[ctx.name] = path.resolve()  # later look-ups by name in this process find the file
    return ctx


def load_contexts(names: Iterable[str | Context] | str | None = None) -> list[Context]:
    """Several contexts; ``None`` or ``"all"`` means the built-in ones.

    Args:
        names: names, paths or :class:`Context` objects; ``None`` or ``"all"`` for every built-in.

    Returns:
        The contexts, in the order given.
    """
    if names is None or names == "all" or names == ["all"]:
        names = list(BUILTIN_CONTEXTS)
    if isinstance(names, str):
        names = [names]
    return [load_context(n) for n in names]
