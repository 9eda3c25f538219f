"""Demographic axes: people (first names with a race and a gender) and the two-group contrasts over them.

An **axis** (race, gender) splits a shared list of first names into group A and group B. Every name has a
race and a gender, so each axis is balanced on the other attribute.

A **roster** is one such list. ``audit`` (16 names per race x gender, the audit-study names of
``mechbias/data/files/names.yaml``) and ``extended`` (100 per cell, built by ``analyses/build_names.py``
from registry name data into ``names_extended.yaml``). An axis is named ``"gender"`` (the default roster)
or ``"gender@extended"`` (a roster named explicitly); the spec travels as a plain string through configs,
job stores and results.

**Name splits** are deterministic: within every race x gender cell, names are ordered by a hash of
(seed, name) and the first half is the *selection* set (used to find components or train), the rest
*held out* (used to evaluate).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from ..core.models import DATA_FILES
from .leakage import check_not_reporting, resolve_split, split_salt

DATA = DATA_FILES


class ContextError(ValueError):
    """A context or axis file is malformed; the message names the file and field."""


@dataclass(frozen=True)
class Person:
    """One name of a roster, with the attributes the axes contrast.

    Args:
        name: the first name as it appears in prompts.
        race: ``"White"`` or ``"Black"``.
        gender: ``"male"`` or ``"female"``.
    """
    name: str
    race: str
    gender: str

    def get(self, attribute: str) -> str:
        return getattr(self, attribute)


@dataclass(frozen=True)
class Axis:
    """A demographic contrast: group A vs group B of an attribute, over a roster of names.

    Args:
        name: ``"race"`` or ``"gender"``.
        attribute: the :class:`Person` attribute the groups differ in.
        groups: the labels of group A and group B (a positive gap favours A).
        words: demographic words per group for IG²-style prompts (e.g. ``{"male": " he"}``).
        people: the roster's people.
        roster: the roster's name (``"audit"``: 16 per race x gender cell; ``"extended"``: 100).
    """

    name: str
    attribute: str
    groups: tuple[str, str]
    words: dict[str, str]
    people: tuple[Person, ...]
    roster: str = "audit"

    @property
    def spec(self) -> str:
        """``"<axis>@<roster>"``: what :func:`load_axis` takes to rebuild this axis."""
        return f"{self.name}@{self.roster}"

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
        split, salt = resolve_split(split), split_salt()  # cross-fitting folds and repeated splits
        out = []
        cells: dict[tuple[str, str], list[Person]] = {}
        for p in self.people:
            cells.setdefault((p.race, p.gender), []).append(p)
        for key in sorted(cells):
            ordered = sorted(cells[key], key=lambda p: stable_hash(seed, p.name + salt))
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


@cache
def _names_file(path: str = str(DATA / "names.yaml"), required: tuple[str, ...] = ("people", "pronouns", "axes")
                ) -> dict:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ContextError(f"{p}: not valid YAML ({e})") from e
    for key in required:
        if not isinstance(data, dict) or key not in data:
            raise ContextError(f"{p}: missing field '{key}'")
    return data


ROSTER_FILES = {"audit": "names.yaml", "extended": "names_extended.yaml"}


def list_rosters() -> list[str]:
    """Names of the name rosters (``audit``, ``extended``)."""
    return sorted(ROSTER_FILES)


def default_roster() -> str:
    """The roster an axis without ``@roster`` uses (``default_roster`` in names.yaml)."""
    return str(_names_file().get("default_roster", "audit"))


def people(roster: str | None = None) -> tuple[Person, ...]:
    """Everyone on a roster (the default one if None)."""
    roster = roster or default_roster()
    if roster not in ROSTER_FILES:
        raise ValueError(f"Unknown roster {roster!r}; rosters: {list_rosters()}")
    data = _names_file(str(DATA / ROSTER_FILES[roster]), required=("people",))
    out: list[Person] = []
    for race, by_gender in data["people"].items():
        for gender, names in by_gender.items():
            out.extend(Person(str(n), race, gender) for n in names)
    return tuple(out)


def pronouns(gender: str) -> dict[str, str]:
    """The pronoun slots (``pronoun``, ``Pronoun``, ``possessive``, ``object``) for a gender."""
    return dict(_names_file()["pronouns"][gender])


def parse_axis(spec: str) -> tuple[str, str]:
    """``"gender@extended"`` -> ("gender", "extended"); ``"gender"`` -> ("gender", default roster)."""
    name, _, roster = str(spec).partition("@")
    return name, roster or default_roster()


def load_axis(name: str | Axis) -> Axis:
    """The built-in axis ``race`` or ``gender``, on the default roster or on ``"<axis>@<roster>"``.

    Args:
        name: ``"race"``, ``"gender"``, ``"gender@extended"`` (any roster of :func:`list_rosters`), or an
            :class:`Axis` (returned as is).

    Returns:
        The :class:`Axis`, with its people split into selection and held-out halves.

    Raises:
        ValueError: unknown axis or roster (the message lists the known ones).
    """
    if isinstance(name, Axis):
        return name
    axis, roster = parse_axis(name)
    return _load_axis(axis, roster)


@cache
def _load_axis(name: str, roster: str) -> Axis:
    axes = _names_file()["axes"]
    if name not in axes:
        raise ValueError(f"Unknown axis {name!r}; built-in axes: {sorted(axes)} (optionally '<axis>@<roster>', "
                         f"rosters: {list_rosters()})")
    spec = axes[name]
    groups = tuple(spec["groups"])
    if len(groups) != 2:
        raise ContextError(f"names.yaml: axis '{name}' must have exactly two groups, has {len(groups)}")
    everyone = people(roster)
    for g in groups:
        if not any(p.get(spec["attribute"]) == g for p in everyone):
            raise ContextError(f"{ROSTER_FILES[roster]}: axis '{name}' group '{g}' has no names")
    return Axis(name, spec["attribute"], groups, dict(spec["words"]), everyone, roster)


def list_axes() -> list[str]:
    """Names of the built-in axes."""
    return sorted(_names_file()["axes"])
