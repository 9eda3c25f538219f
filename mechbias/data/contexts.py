"""Contexts, demographic axes and prompt sets, as data.

A **context** is a YAML file (built-ins live in ``mechbias/data/files/contexts/``):
a name, a description, at least two (built-ins: ten) templates with a
``{name}`` slot, a contrast pair of answers (``positive`` is the outcome
favourable to the named person), a numeric question for the generation metric,
and demographic-prediction prompts for IG². Users add their own by passing a
path to :func:`load_context` (or dropping a file into a folder passed as
``MECHBIAS_CONTEXTS``).

An **axis** (race, gender) splits a shared list of first names into group A and
group B. Every name has a race and a gender, so each axis is balanced on the
other attribute.

**Splits** are deterministic: within every race x gender cell, names are
ordered by a hash of (seed, name) and the first half is the *selection* set
(used to find components or train), the rest *held out* (used to evaluate).
Templates are split the same way per context.
"""

from __future__ import annotations

import hashlib
import os
import string
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import torch
import yaml
from torch import Tensor

from ..core.models import DATA_FILES
from .texts import check_not_reporting

DATA = DATA_FILES
SLOTS = {"name", "pronoun", "Pronoun", "possessive", "object"}


class ContextError(ValueError):
    """A context or axis file is malformed; the message names the file and field."""


class AlignmentError(ValueError):
    """Prompts that must align token by token (patching) do not."""


# ----------------------------------------------------------------------------
# people and axes
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Person:
    name: str
    race: str
    gender: str

    def get(self, attribute: str) -> str:
        return getattr(self, attribute)


@dataclass(frozen=True)
class Axis:
    """A demographic contrast: group A vs group B of an attribute."""

    name: str
    attribute: str
    groups: tuple[str, str]
    words: dict[str, str]
    people: tuple[Person, ...]

    @property
    def other_attribute(self) -> str:
        return "gender" if self.attribute == "race" else "race"

    def group_index(self, person: Person) -> int:
        """0 for group A, 1 for group B; raises if the person is in neither."""
        g = person.get(self.attribute)
        if g not in self.groups:
            raise ValueError(f"{person.name} ({self.attribute}={g}) is in neither group of axis {self.name}")
        return self.groups.index(g)

    def members(self, group: int | str) -> list[Person]:
        g = self.groups[group] if isinstance(group, int) else group
        return [p for p in self.people if p.get(self.attribute) == g]

    def split_people(self, split: str = "selection", seed: int = 0) -> list[Person]:
        """Names of the ``selection``, ``heldout`` or ``all`` split (balanced per cell)."""
        check_not_reporting("names", split)
        if split == "all":
            return list(self.people)
        if split not in ("selection", "heldout"):
            raise ValueError(f"split must be 'selection', 'heldout' or 'all', not {split!r}")
        out = []
        cells: dict[tuple[str, str], list[Person]] = {}
        for p in self.people:
            cells.setdefault((p.race, p.gender), []).append(p)
        for key in sorted(cells):
            ordered = sorted(cells[key], key=lambda p: stable_hash(seed, p.name))
            half = (len(ordered) + 1) // 2
            out.extend(ordered[:half] if split == "selection" else ordered[half:])
        return sorted(out, key=lambda p: self.people.index(p))

    @property
    def word_a(self) -> str:
        return self.words[self.groups[0]]

    @property
    def word_b(self) -> str:
        return self.words[self.groups[1]]


def stable_hash(seed: int, key: str) -> str:
    """A deterministic ordering key for (seed, key): splits and pairings depend on nothing else."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


@lru_cache(maxsize=None)
def _names_file(path: str = str(DATA / "names.yaml")) -> dict:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ContextError(f"{p}: not valid YAML ({e})") from e
    for key in ("people", "pronouns", "axes"):
        if not isinstance(data, dict) or key not in data:
            raise ContextError(f"{p}: missing field '{key}'")
    return data


def people() -> tuple[Person, ...]:
    data = _names_file()
    out: list[Person] = []
    for race, by_gender in data["people"].items():
        for gender, names in by_gender.items():
            out.extend(Person(str(n), race, gender) for n in names)
    return tuple(out)


def pronouns(gender: str) -> dict[str, str]:
    return dict(_names_file()["pronouns"][gender])


def load_axis(name: str | Axis) -> Axis:
    """The built-in axis ``race`` or ``gender``."""
    if isinstance(name, Axis):
        return name
    axes = _names_file()["axes"]
    if name not in axes:
        raise ValueError(f"Unknown axis {name!r}; built-in axes: {sorted(axes)}")
    spec = axes[name]
    groups = tuple(spec["groups"])
    if len(groups) != 2:
        raise ContextError(f"names.yaml: axis '{name}' must have exactly two groups, has {len(groups)}")
    everyone = people()
    for g in groups:
        if not any(p.get(spec["attribute"]) == g for p in everyone):
            raise ContextError(f"names.yaml: axis '{name}' group '{g}' has no names")
    return Axis(name, spec["attribute"], groups, dict(spec["words"]), everyone)


def list_axes() -> list[str]:
    return sorted(_names_file()["axes"])


# ----------------------------------------------------------------------------
# contexts
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Context:
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

    # -- splits --
    def template_split(self, split: str = "selection", seed: int = 0) -> list[int]:
        """Template indices of the ``selection``, ``heldout`` or ``all`` split."""
        check_not_reporting("templates", split)
        idx = list(range(len(self.templates)))
        if split == "all":
            return idx
        if split not in ("selection", "heldout"):
            raise ValueError(f"split must be 'selection', 'heldout' or 'all', not {split!r}")
        ordered = sorted(idx, key=lambda i: stable_hash(seed, f"{self.name}:{i}"))
        half = (len(ordered) + 1) // 2
        return sorted(ordered[:half] if split == "selection" else ordered[half:])

    # -- prompts --
    def prompts(
        self,
        axis: str | Axis,
        *,
        templates: str | Sequence[int] = "all",
        names: str | Sequence[Person] = "all",
        seed: int = 0,
    ) -> "PromptSet":
        """The grid templates x names as a :class:`PromptSet` for one axis."""
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
        items = [
            Prompt(fill(self.templates[t], p), t, p, ax.group_index(p)) for t in t_idx for p in ppl
        ]
        return PromptSet(self.name, ax, self.positive, self.negative, items)

    def demographic_prompts(self, axis: str | Axis, polarity: str | None = None) -> list["DemographicPrompt"]:
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
                        templates: Sequence[int] | None = None, seed: int = 0) -> "PromptSet":
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
    text: str
    template: int
    outcome: str
    polarity: str


def fill(template: str, person: Person) -> str:
    """Fill ``{name}`` and pronoun slots for one person."""
    return template.format(name=person.name, **pronouns(person.gender))


def _slots(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


def _require(cond: bool, src: str, fld: str, msg: str) -> None:
    if not cond:
        raise ContextError(f"{src}: field '{fld}' {msg}")


def parse_context(data: dict, source: str = "<dict>") -> Context:
    """Validate a context dictionary (as read from YAML) and build a :class:`Context`."""
    _require(isinstance(data, dict) and bool(data), source, "(root)", "is empty: the file defines no context")
    for key in ("name", "templates", "answers"):
        _require(key in data, source, key, "is missing")
    name = data["name"]
    _require(isinstance(name, str) and name.strip() != "", source, "name", "must be a non-empty string")
    tpls = data["templates"]
    _require(isinstance(tpls, list) and len(tpls) >= 2 and all(isinstance(t, str) for t in tpls),
             source, "templates", "must be a list of at least 2 strings")
    for i, t in enumerate(tpls):
        slots = _slots(t)
        _require("name" in slots, source, f"templates[{i}]", "has no {name} slot")
        _require(slots <= SLOTS, source, f"templates[{i}]", f"uses unknown slots {sorted(slots - SLOTS)}")
    ans = data["answers"]
    _require(isinstance(ans, dict) and "positive" in ans and "negative" in ans, source, "answers",
             "must have 'positive' and 'negative'")
    _require(isinstance(ans["positive"], str) and isinstance(ans["negative"], str) and ans["positive"] != ans["negative"]
             and ans["positive"].strip() != "" and ans["negative"].strip() != "",
             source, "answers", "must be two different non-empty strings")
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
    )


def _context_dirs() -> list[Path]:
    dirs = [DATA / "contexts"]
    extra = os.environ.get("MECHBIAS_CONTEXTS")
    if extra:
        dirs.extend(Path(d) for d in extra.split(os.pathsep) if d)
    return dirs


def list_contexts() -> list[str]:
    """Names of the built-in contexts (and those in ``$MECHBIAS_CONTEXTS`` folders)."""
    names: list[str] = []
    for d in _context_dirs():
        if d.is_dir():
            names.extend(p.stem for p in sorted(d.glob("*.yaml")))
    return sorted(set(names))


BUILTIN_CONTEXTS = ("finance", "commerce", "hiring", "housing")


def load_context(name_or_path: str | Path | Context) -> Context:
    """Load a built-in context by name, or any context YAML file by path."""
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
            raise ValueError(f"Unknown context {str(name_or_path)!r}; available: {list_contexts()} "
                             "(or pass the path of a YAML file)")
    if not path.exists():
        raise FileNotFoundError(f"context file {path} does not exist")
    text = path.read_text()
    if not text.strip():
        raise ContextError(f"{path}: the file is empty")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ContextError(f"{path}: not valid YAML ({e})") from e
    return parse_context(data, str(path))


def load_contexts(names: Iterable[str | Context] | str | None = None) -> list[Context]:
    """Several contexts; ``None`` or ``"all"`` means the built-in ones."""
    if names is None or names == "all" or names == ["all"]:
        names = list(BUILTIN_CONTEXTS)
    if isinstance(names, str):
        names = [names]
    return [load_context(n) for n in names]


# ----------------------------------------------------------------------------
# prompt sets
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Prompt:
    text: str
    template: int
    person: Person
    group: int  # 0 = group A, 1 = group B of the axis


@dataclass
class PromptSet:
    """A grid of prompts (templates x names) for one context and axis."""

    context: str
    axis: Axis
    positive: str
    negative: str
    items: list[Prompt]
    answer_prefix: str = ""  # numeric prompts: text that starts the assistant's answer

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.items]

    @property
    def groups(self) -> Tensor:
        return torch.tensor([p.group for p in self.items])

    @property
    def template_ids(self) -> list[int]:
        return sorted({p.template for p in self.items})

    @property
    def names(self) -> list[str]:
        seen: dict[str, None] = {}
        for p in self.items:
            seen.setdefault(p.person.name, None)
        return list(seen)

    def by_template(self) -> list[list[int]]:
        """Indices of the prompts of each template (prefix-sharing groups)."""
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(self.items):
            groups.setdefault(p.template, []).append(i)
        return list(groups.values())

    def subset(self, keep: Iterable[int]) -> "PromptSet":
        return PromptSet(self.context, self.axis, self.positive, self.negative, [self.items[i] for i in keep],
                         self.answer_prefix)

    def grid(self, values: Tensor) -> tuple[Tensor, list[int], list[str], Tensor]:
        """Arrange per-prompt ``values`` as a matrix ``[templates, names]``.

        Returns the matrix, the template ids (rows), the names (columns) and
        the group of each column. Raises if the set is not a full grid.
        """
        t_ids, names = self.template_ids, self.names
        ti = {t: i for i, t in enumerate(t_ids)}
        ni = {n: i for i, n in enumerate(names)}
        mat = torch.full((len(t_ids), len(names)), float("nan"), dtype=torch.float64)
        col_group = torch.zeros(len(names), dtype=torch.long)
        for v, p in zip(values.tolist(), self.items):
            mat[ti[p.template], ni[p.person.name]] = v
            col_group[ni[p.person.name]] = p.group
        if torch.isnan(mat).any():
            raise ValueError("prompt set is not a full templates x names grid")
        return mat, t_ids, names, col_group


def tokenize(model, texts: Sequence[str]) -> list[Tensor]:
    """Token ids of each text, with the model's BOS prepended, as 1-D tensors."""
    return [model.to_tokens(t, prepend_bos=True)[0].cpu() for t in texts]


def _word_ids(model, text: str) -> Tensor:
    """Token ids of ``text`` alone: no BOS, and none of the special tokens a masked LM's tokenizer adds
    around every text (``[CLS]``/``[SEP]``, ``<s>``/``</s>``)."""
    ids = model.to_tokens(text, prepend_bos=False)[0].cpu()
    if getattr(model.tokenizer, "mask_token_id", None) is not None:
        special = torch.tensor(sorted(set(model.tokenizer.all_special_ids)), dtype=ids.dtype)
        ids = ids[~torch.isin(ids, special)]
    return ids


def answer_tokens(model, answer: str) -> Tensor:
    """Token ids of an answer continuation (no BOS)."""
    if not answer:
        raise ValueError("empty answer string")
    ids = _word_ids(model, answer)
    if len(ids) == 0:
        raise ValueError(f"answer {answer!r} tokenizes to nothing")
    return ids


def single_token(model, word: str, what: str = "target word") -> int:
    """The id of ``word`` if it is exactly one token; a clear error otherwise."""
    ids = _word_ids(model, word)
    if len(ids) != 1:
        pieces = model.to_str_tokens(ids) if len(ids) else []
        raise ValueError(
            f"{what} {word!r} is not a single token for this model: it splits into {len(ids)} "
            f"tokens {pieces}. Use a word that is one token (mind the leading space)."
        )
    return int(ids[0])


# ----------------------------------------------------------------------------
# aligned pairs (symmetric token replacement) for patching
# ----------------------------------------------------------------------------

@dataclass
class PromptPairs:
    """Clean/corrupted prompt pairs that differ only in the demographic slot.

    ``clean`` holds group-A prompts, ``corrupt`` the same templates with a
    group-B name of the same token length (and the same other attribute, so
    pronouns match). ``clean_tokens``/``corrupt_tokens``: ``[n_pairs, seq]``
    within each length bucket; use :meth:`buckets` to iterate.
    """

    context: str
    axis: Axis
    positive: str
    negative: str
    clean: list[Prompt]
    corrupt: list[Prompt]
    clean_tokens: list[Tensor]
    corrupt_tokens: list[Tensor]

    def __len__(self) -> int:
        return len(self.clean)

    def swapped(self) -> "PromptPairs":
        """The same pairs with clean and corrupted exchanged (group B as clean)."""
        return PromptPairs(self.context, self.axis, self.positive, self.negative, self.corrupt, self.clean,
                           self.corrupt_tokens, self.clean_tokens)

    def diff_positions(self, i: int) -> list[int]:
        return (self.clean_tokens[i] != self.corrupt_tokens[i]).nonzero().flatten().tolist()


def make_pairs(model, context: Context | str, axis: str | Axis, *, templates: str | Sequence[int] = "all",
               names: str = "all", seed: int = 0, max_pairs: int | None = None) -> PromptPairs:
    """Pair group-A and group-B prompts of equal token length, template by template.

    A pair shares the template and the name's other attribute (a race pair has
    two names of one gender, so pronouns stay the same) and the two prompts
    tokenize to the same length. Raises :class:`AlignmentError` when no pair
    can be formed.
    """
    ctx = load_context(context)
    ax = load_axis(axis)
    t_idx = ctx.template_split(templates, seed) if isinstance(templates, str) else list(templates)
    ppl = ax.split_people(names, seed)
    a_people = [p for p in ppl if ax.group_index(p) == 0]
    b_people = [p for p in ppl if ax.group_index(p) == 1]
    clean, corrupt, ct, rt = [], [], [], []
    for t in t_idx:
        tpl = ctx.templates[t]
        toks_a = {p: model.to_tokens(fill(tpl, p), prepend_bos=True)[0].cpu() for p in a_people}
        toks_b = {p: model.to_tokens(fill(tpl, p), prepend_bos=True)[0].cpu() for p in b_people}
        used: set[Person] = set()
        for pa in sorted(a_people, key=lambda p: stable_hash(seed, f"pair:{t}:{p.name}")):
            for pb in sorted(b_people, key=lambda p: stable_hash(seed, f"pair:{t}:{p.name}")):
                if pb in used or pb.get(ax.other_attribute) != pa.get(ax.other_attribute):
                    continue
                if len(toks_a[pa]) != len(toks_b[pb]):
                    continue
                used.add(pb)
                clean.append(Prompt(fill(tpl, pa), t, pa, 0))
                corrupt.append(Prompt(fill(tpl, pb), t, pb, 1))
                ct.append(toks_a[pa])
                rt.append(toks_b[pb])
                break
    if not clean:
        raise AlignmentError(
            f"no equal-token-length name pairs for context {ctx.name!r}, axis {ax.name!r}: patching needs "
            "clean and corrupted prompts that tokenize to the same length"
        )
    if max_pairs is not None and len(clean) > max_pairs:
        keep = sorted(range(len(clean)), key=lambda i: stable_hash(seed, f"keep:{clean[i].text}"))[:max_pairs]
        keep.sort()
        clean, corrupt = [clean[i] for i in keep], [corrupt[i] for i in keep]
        ct, rt = [ct[i] for i in keep], [rt[i] for i in keep]
    return PromptPairs(ctx.name, ax, ctx.positive, ctx.negative, clean, corrupt, ct, rt)
