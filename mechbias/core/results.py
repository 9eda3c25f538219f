"""Result objects: typed, labelled, saved atomically.

Every analysis returns a dataclass deriving from :class:`Result`. Tensor fields
are written to ``tensors.safetensors``, everything else to ``result.json``
together with metadata (model, contexts, seed, config, package versions, git
commit). Each file is written to a temporary name and renamed, and
``result.json`` is written last, so a folder with a ``result.json`` is complete
(this is what resumable runs check).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import html
import json
import os
import random
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .families import is_masked_lm, model_class
from .fastpath import fast_path_report
from .models import model_label

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

# every Result subclass registers itself here when its module is imported; importing any
# part of mechbias imports the whole package (mechbias/__init__.py), so the registry is
# complete before Result.load runs
_RESULT_TYPES: dict[str, type[Result]] = {}


# ----------------------------------------------------------------------------
# seeds
# ----------------------------------------------------------------------------

def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch. Same seed, same result (on the same machine).

    Args:
        seed: the seed.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng(seed: int) -> np.random.Generator:
    """A NumPy generator for one purpose; never touches global state."""
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------

def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _jsonable(x: Any) -> Any:
    if hasattr(x, "as_dict") and not isinstance(x, type):
        return _jsonable(x.as_dict())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, float) and not np.isfinite(x):
        return None if np.isnan(x) else (1e308 if x > 0 else -1e308)
    if isinstance(x, Path):
        return str(x)
    return x


def atomic_write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as JSON through a temporary file and a rename, so a reader never sees half a file."""
    text = json.dumps(_jsonable(obj), indent=2, sort_keys=False)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text + "\n")

    return _atomic(Path(path), write)


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` through a temporary file and a rename."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    return _atomic(Path(path), write)


def atomic_save_tensors(tensors: dict[str, Tensor], path: str | Path) -> Path:
    """Save tensors as safetensors through a temporary file and a rename."""
    from safetensors.torch import save_file

    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return _atomic(Path(path), lambda tmp: save_file(clean, tmp))


def atomic_savefig(fig, path: str | Path, *, close: bool = True, **kw) -> Path:
    """Write a figure atomically; close it afterwards unless ``close=False`` (long runs draw many)."""
    path = Path(path)
    kw.setdefault("dpi", 150)
    kw.setdefault("bbox_inches", "tight")
    out = _atomic(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kw))
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return out


# ----------------------------------------------------------------------------
# metadata
# ----------------------------------------------------------------------------

def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def package_versions() -> dict[str, str]:
    """The versions of torch, transformers, transformer-lens and numpy (recorded in every result)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mechbias", "torch", "transformer-lens", "transformers", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def make_meta(model: TransformerBridge | None = None, **extra: Any) -> dict[str, Any]:
    """Standard metadata block for a result."""
    meta: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "git_commit": _git_commit(),
    }
    if model is not None:
        meta["model"] = model_label(model)
        meta["model_config"] = {
            k: getattr(model.cfg, k, None) for k in ("n_layers", "d_model", "n_heads", "d_mlp", "d_vocab")
        }
        meta["model_class"] = model_class(model)
        # which path the fast paths take on this model: fast, or exact after a failed self-check
        meta["fast_paths"] = fast_path_report(model)
        if is_masked_lm(model):
            meta["readout"] = "masked LM: predictions read at a [MASK] after the prompt; perplexity is pseudo-perplexity"
    meta.update(extra)
    return meta


class Record:
    """Base of the typed records that public functions return (a dataclass: fields by attribute, documented;
    :meth:`as_dict` for JSON). A record that is written into JSON and extended there (a transfer test, a
    metadata block) is a ``TypedDict`` instead, checked by mypy all the same."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


# ----------------------------------------------------------------------------
# base class
# ----------------------------------------------------------------------------

class Result:
    """Base for result dataclasses. Subclasses are ``@dataclass`` with a ``meta: dict`` field."""

    result_type: ClassVar[str] = "result"
    #: fields a subclass writes itself (next to result.json), not into result.json
    _not_saved: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _RESULT_TYPES[cls.result_type] = cls

    def save(self, path: str | Path) -> Path:
        """Write the result to folder ``path`` (tensors + JSON), atomically per file."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        plain: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if f.name in self._not_saved:
                continue
            if isinstance(v, Tensor):
                tensors[f.name] = v
            elif isinstance(v, dict) and v and all(isinstance(x, Tensor) for x in v.values()):
                # a dict of tensors: one entry per key, "field/key" in the tensor file
                tensors.update({f"{f.name}/{k}": x for k, x in v.items()})
                plain.setdefault("_tensor_dicts", []).append(f.name)
            else:
                plain[f.name] = v
        if tensors:
            atomic_save_tensors(tensors, path / "tensors.safetensors")
        atomic_write_json({"result_type": self.result_type, **plain}, path / "result.json")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Result:
        """Load a result saved with :meth:`save` (any subclass, chosen by ``result_type``)."""
        path = Path(path)
        meta_path = path / "result.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{path} holds no complete result (missing result.json)")
        d = json.loads(meta_path.read_text())
        rtype = d.get("result_type", cls.result_type)
        klass = _RESULT_TYPES.get(rtype)
        if klass is None or not dataclasses.is_dataclass(klass):
            raise ValueError(f"{path}: unknown result type {rtype!r}; known: {sorted(_RESULT_TYPES)}")
        if klass.load.__func__ is not Result.load.__func__:  # type: ignore[attr-defined]
            return klass.load(path)  # a subclass that adds to the generic format
        return klass._load_fields(path, d)

    @classmethod
    def _load_fields(cls, path: Path, d: dict | None = None) -> Result:
        """The generic part of :meth:`load`: result.json and tensors.safetensors into ``cls``."""
        path = Path(path)
        d = dict(d if d is not None else json.loads((path / "result.json").read_text()))
        d.pop("result_type", None)
        klass = cls
        dict_fields = d.pop("_tensor_dicts", [])
        if (path / "tensors.safetensors").exists():
            from safetensors.torch import load_file

            for k, v in load_file(str(path / "tensors.safetensors")).items():
                field_name, _, key = k.partition("/")
                if key and field_name in dict_fields:
                    d.setdefault(field_name, {})[key] = v
                else:
                    d[k] = v
        names = {f.name for f in dataclasses.fields(klass)}  # type: ignore[arg-type]
        obj = klass(**{k: v for k, v in d.items() if k in names})
        post = getattr(obj, "_after_load", None)
        if post:
            post()
        return obj

    def _repr_html_(self) -> str:
        """A rich table in Jupyter: the result's rows (its data frame), else its scalar fields."""
        try:
            df = self.to_dataframe()
            return f"<b>{type(self).__name__}</b>" + df.head(40).to_html(float_format=lambda v: f"{v:.4g}")
        except (NotImplementedError, TypeError, ValueError):
            scalars = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                       if isinstance(getattr(self, f.name), (int, float, str, bool))}
            rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in scalars.items())
            return f"<b>{type(self).__name__}</b><table>{rows}</table>"

    def to_dataframe(self):
        """One row per entry of ``self.rows`` for results that keep rows; others override this."""
        if not hasattr(self, "rows"):
            raise NotImplementedError(f"{type(self).__name__} has no tabular form")
        import pandas as pd

        return pd.DataFrame(self.rows)


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` holds a fully written result (used to resume long runs)."""
    return (Path(path) / "result.json").exists()


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = "{:.3f}") -> str:
    """A GitHub-flavoured Markdown table from a list of dicts (no extra dependency)."""
    if not rows:
        return ""
    cols = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return floatfmt.format(v)
        return str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------
# a method run's folder (written by ``apps.workflow.MethodRun``; read here by the lower layers' reports)
# ----------------------------------------------------------------------------

#: the files of one method run: ``summary.json`` (what ran and what it chose, no cells), ``transfer/`` (the
#: transfer matrix: each cell once), ``interventions/<context>/`` (each intervention once), ``selections/<context>/``
RUN_SUMMARY, RUN_TRANSFER, RUN_INTERVENTIONS, RUN_SELECTIONS = "summary.json", "transfer", "interventions", "selections"
#: where the layout before issue 37 kept the transfer matrix (still read)
RUN_TRANSFER_V1 = "transfer_result"


def run_summary_json(folder: str | Path) -> dict[str, Any]:
    """A method run folder's ``summary.json`` with its transfer matrix's ``cells`` (each with its controls),
    ``transfer_test``, ``rows`` (row overlaps) and ``transfer_config`` merged in from ``transfer/result.json``, without loading
    tensors. Reads the layout before issue 37 too (``transfer_result/``; a ``<method>.json`` summary).

    Raises:
        FileNotFoundError: the folder holds no method run.
    """
    folder = Path(folder)
    for sub in (RUN_TRANSFER, RUN_TRANSFER_V1):
        if (folder / sub / "result.json").exists():
            tm = json.loads((folder / sub / "result.json").read_text())
            break
    else:
        raise FileNotFoundError(f"{folder} holds no method run: no {RUN_TRANSFER}/result.json (the transfer "
                                f"matrix) beside {RUN_SUMMARY}")
    summary: dict[str, Any] = {}
    for p in [folder / RUN_SUMMARY, *sorted(folder.glob("*.json"))]:
        d = json.loads(p.read_text()) if p.exists() else None
        if isinstance(d, dict) and "method" in d and "selections" in d:
            summary = d
            break
    return {**{k: v for k, v in summary.items() if k != "transfer"}, "cells": tm.get("cells", []),
            "transfer_test": tm.get("transfer_test") or {}, "rows": tm.get("row_info", []),
            "transfer_config": tm.get("config", {})}
