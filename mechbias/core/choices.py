"""String options as ``Literal`` types: one place states a setting's choices, and the checks read it.

A configuration dataclass annotates each string option with a ``Literal`` (``mode: Literal["ablate", "add"]``,
optionally ``| None``, or a tuple of them). :func:`check_choices` refuses a value outside it with the same
one-line message everywhere, and the command line (:mod:`mechbias.apps.configargs`) offers exactly those
choices, so no ``validate()`` repeats them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal


def literal_choices(annotation: Any) -> tuple | None:
    """The values of the ``Literal`` in ``annotation`` (inside ``| None`` or ``tuple[..., ...]``), else None."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType, tuple, list):
        for arg in typing.get_args(annotation):
            if arg is not type(None) and arg is not Ellipsis and (found := literal_choices(arg)) is not None:
                return found
    return None


def check_choices(obj: Any) -> None:
    """Raise ``ValueError`` if a field of dataclass ``obj`` holds a value outside its ``Literal`` choices (None
    passes where the annotation allows it; a tuple field checks each element)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        choices = literal_choices(hints.get(f.name))
        if choices is None:
            continue
        value = getattr(obj, f.name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        bad = [v for v in values if v is not None and v not in choices]
        if bad:
            shown = value if not isinstance(value, (tuple, list)) else bad
            raise ValueError(f"{f.name} must be one of {choices}, not {shown!r}")
