"""Command-line flags generated from configuration dataclasses.

Every field of a config dataclass becomes one flag: ``--field-name`` (or
``metadata["flag"]``), typed from the annotation, with the dataclass default
and ``metadata["help"]`` / ``metadata["choices"]``. So a command shows exactly
the settings its config has, and its defaults cannot drift from the library's.
``Literal`` fields offer exactly their values; ``bool`` fields get ``--x/--no-x``; ``Optional`` fields accept
``none``;
``tuple`` fields take several values.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any

from ..core.choices import literal_choices


def _unwrap(tp) -> tuple[Any, bool, bool]:
    """(element type, optional?, sequence?) of an annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return (args[0] if args else str), optional, True
    return tp, optional, False


def _parser_of(tp, optional: bool):
    base = {int: int, float: float, str: str}.get(tp, str)

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}{' or none' if optional else ''}, "
                                             f"got {text!r}") from None

    parse.__name__ = base.__name__
    return parse


def flag_name(f: dataclasses.Field) -> str:
    """The command-line flag of a config field (its ``flag`` metadata, else ``--field-name``)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = (),
                         dest_prefix: str = "cfg", title: str | None = None) -> None:
    """Add one flag per field of dataclass ``cls`` (except ``skip``) to ``parser``."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title or f"{cls.__name__} settings")
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        tp, optional, seq = _unwrap(hints[f.name])
        choices = literal_choices(hints[f.name]) or f.metadata.get("choices")
        if typing.get_origin(tp) is typing.Literal:
            tp = type(typing.get_args(tp)[0])
        helptext = f.metadata.get("help", "")
        dest = f"{dest_prefix}__{f.name}"
        shown = "none" if default is None else (" ".join(map(str, default)) if seq else default)
        if tp is bool and not seq:
            group.add_argument(flag_name(f), dest=dest, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{helptext} (default: {shown})")
            continue
        kw: dict[str, Any] = {"dest": dest, "default": default, "type": _parser_of(tp, optional),
                              "help": f"{helptext} (default: {shown})", "metavar": f.name.upper()}
        if choices:
            kw["choices"] = list(choices)
            kw.pop("metavar")
        if seq:
            kw["nargs"] = "+"
        group.add_argument(flag_name(f), **kw)


def config_from_arguments(cls: type, args: argparse.Namespace, *, dest_prefix: str = "cfg", **fixed):
    """Build ``cls`` from the parsed flags (plus ``fixed`` values); the config validates itself."""
    values = {}
    for f in dataclasses.fields(cls):
        dest = f"{dest_prefix}__{f.name}"
        if f.name in fixed:
            values[f.name] = fixed[f.name]
        elif hasattr(args, dest):
            v = getattr(args, dest)
            if isinstance(v, list):
                v = tuple(v)
                if len(v) == 1 and v[0] is None:
                    v = None
            values[f.name] = v
    return cls(**values)
