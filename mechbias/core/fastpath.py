"""The fast paths that lean on library internals, and their run-time self-check.

Two fast paths make mechbias' forwards cheap, and both rely on details of
TransformerLens and transformers that a new release can change without an error:

* **KV caches** (the frozen shared prefix of :func:`prefix_cache`, the sliced
  cache of :func:`slice_cache`, and the growing cache of generation). They need
  the bridge's attention to read and fill the Hugging Face cache it is given.
  transformers 5.25 renamed the keyword that carries the cache
  (``past_key_values`` -> ``cache``) and TransformerLens 4.3.0's attention
  bridge reads only the old names, so the cache silently stayed empty and every
  shared-prefix number was wrong. :func:`_install_cache_kwarg_shim` fixes that;
  see ``docs/upstream/transformerlens_cache_kwarg.md`` for the upstream report.
* **Partial unembedding** (:func:`last_position_unembed`,
  :func:`position_unembed`): the residual stream is cut to the positions a
  metric reads before the unembedding runs.
* **Resuming at a layer** (:mod:`mechbias.core.resume`): blocks before an
  intervention's first layer are skipped and the kept residual stream enters
  there. It turns TransformerLens' wrapped layers into identities for the call.
* **Prefix attention** (:mod:`mechbias.core.prefix_attention`): new tokens
  attend over a frozen batch-1 prefix without a copy of it per row and per
  head (IG²'s scaled rows, one token each). It reimplements the bridge's
  attention for that case and reads its attributes.
* **Answer columns** (:mod:`mechbias.core.answer_columns`): the unembedding
  computes only the vocabulary columns a metric reads (:func:`answer_unembed`).

The first time a model uses a fast path in a process, :func:`fast_path_status`
compares it with the exact path (full sequences, full unembedding) on a small
batch. On disagreement beyond a stated tolerance it warns once, naming the
package versions, and the exact path is used for that model from then on.
``MECHBIAS_STRICT=1`` (or :func:`set_strict`) turns the warning into a
:class:`FastPathError`. Every result's metadata records which path ran
(:func:`fast_path_report`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from .answer_columns import check_columns, columns_only
from .families import is_masked_lm
from .hooks import hooked
from .models import supports_kv_cache
from .pathcheck import PathCheck, compare, tolerance
from .prefix_attention import calls as prefix_attention_calls
from .prefix_attention import prefix_attention
from .resume import resumable, resume_check
from .sites import hook_name
from .window import forward_window

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

_STATUS: weakref.WeakKeyDictionary[Any, FastPathStatus] = weakref.WeakKeyDictionary()
_STRICT: list[bool | None] = [None]
_SHIM: dict[str, bool] = {}
#: the fast paths the self-check covers
FAST_PATHS = ("unembed", "kv_cache", "resume", "prefix_attention", "answer_columns")


class FastPathError(RuntimeError):
    """A fast path disagreed with the exact path and strict mode is on."""


def set_strict(strict: bool | None) -> None:
    """Make a failed self-check raise (``True``), warn (``False``), or follow ``MECHBIAS_STRICT`` (``None``)."""
    _STRICT[0] = strict


def strict() -> bool:
    """Whether a failed fast-path self-check raises instead of warning (``MECHBIAS_STRICT=1``)."""
    if _STRICT[0] is not None:
        return bool(_STRICT[0])
    return os.environ.get("MECHBIAS_STRICT", "").strip().lower() in ("1", "true", "yes", "on")


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose internals the fast paths use."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "transformer-lens"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# ----------------------------------------------------------------------------
# the one use of a library internal for KV caches: the cache keyword
# ----------------------------------------------------------------------------

def _install_cache_kwarg_shim() -> bool:
    """Let TransformerLens' attention bridge see a KV cache passed under transformers' new keyword.

    transformers 5.25 calls attention modules with ``cache=...`` (its models' forward also renames
    ``past_key_values`` to ``cache``); TransformerLens 4.3.0's ``AttentionBridge._update_kv_cache``
    reads only ``past_key_values`` and ``layer_past``. The wrapper hands ``cache`` over under the old
    name when neither old name is given, and changes nothing otherwise, so it is a no-op under
    transformers <= 5.24 and under a TransformerLens that reads ``cache`` itself. Checked on
    transformer-lens 4.3.0 with transformers 5.23.0, 5.24.0 and 5.25.0. Remove it when TransformerLens
    handles the keyword. Installed once per process; returns whether it is in place."""
    if "installed" in _SHIM:
        return _SHIM["installed"]
    try:
        from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    except ImportError:  # a TransformerLens without the bridge layout: the self-check decides
        _SHIM["installed"] = False
        return False
    original = AttentionBridge._update_kv_cache
    if not getattr(original, "_mechbias_shim", False):

        def _update_kv_cache(self, k, v, **kwargs):
            if kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None \
                    and hasattr(kwargs.get("cache"), "update"):
                kwargs["past_key_values"] = kwargs["cache"]
            return original(self, k, v, **kwargs)

        _update_kv_cache._mechbias_shim = True  # type: ignore[attr-defined]
        AttentionBridge._update_kv_cache = _update_kv_cache  # type: ignore[method-assign]
    # TransformerLens passes the cache as past_key_values, which transformers >= 5.25 renames with a
    # FutureWarning on every call; a user cannot act on it, so only that message is silenced
    warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
    _SHIM["installed"] = True
    return True


# ----------------------------------------------------------------------------
# frozen prefix caches (cache-layer internals isolated here)
# ----------------------------------------------------------------------------

def _frozen_layer_class(base: type) -> type:
    class FrozenPrefixLayer(base):  # type: ignore[misc, valid-type]
        """A cache layer holding a batch-1 prefix; ``update`` broadcasts it and stores nothing."""

        _mechbias_frozen = True

        def update(self, key_states, value_states, *args, **kwargs):
            b = key_states.shape[0]
            keys = torch.cat([self.keys.expand(b, -1, -1, -1), key_states], dim=-2)
            values = torch.cat([self.values.expand(b, -1, -1, -1), value_states], dim=-2)
            return keys, values

    return FrozenPrefixLayer


_FROZEN: dict[type, type] = {}


def _check_filled(cache, n: int) -> None:
    """Raise unless every layer of ``cache`` holds keys and values for ``n`` positions."""
    layers = getattr(cache, "layers", None)
    if not layers:
        raise FastPathError("the model returned no KV cache layers")
    for i, layer in enumerate(layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None or keys.shape[-2] < n or values.shape[-2] < n:
            got = None if keys is None else tuple(keys.shape)
            raise FastPathError(f"KV cache layer {i} was not filled (keys {got}, expected {n} positions): the "
                                f"bridge's attention did not write the cache ({_versions_text()})")


def freeze_cache(cache):
    """Make every layer of a Hugging Face KV cache frozen (in place): it broadcasts its batch-1
    keys and values to any batch and stores nothing new. Returns the cache.

    Uses cache-layer internals (``layers``, ``keys``, ``values``, the layer's class), checked on
    transformers 5.23.0-5.25.0; the self-check (:func:`fast_path_status`) guards every use."""
    for layer in cache.layers:
        window = getattr(layer, "sliding_window", None)
        if window is not None and layer.keys is not None and layer.keys.shape[-2] >= window - 1:
            raise ValueError(f"a shared prefix of {layer.keys.shape[-2]} tokens reaches this model's sliding "
                             f"attention window ({window}); the frozen-prefix fast path would drop keys")
        cls = type(layer)
        base = cls.__mro__[1] if getattr(cls, "_mechbias_frozen", False) else cls
        if base not in _FROZEN:
            _FROZEN[base] = _frozen_layer_class(base)
        layer.__class__ = _FROZEN[base]
    return cache


def slice_cache(cache, s: int):
    """A frozen copy of a KV cache holding its first ``s`` positions (the original is untouched)."""
    _check_filled(cache, s)
    new = copy.copy(cache)
    new.layers = []
    for layer in cache.layers:
        lay = copy.copy(layer)
        lay.keys = layer.keys[..., :s, :]
        lay.values = layer.values[..., :s, :]
        if hasattr(lay, "cumulative_length"):  # sliding-window layers (Mistral, Gemma 2) count their own length
            lay.cumulative_length = s
        new.layers.append(lay)
    return freeze_cache(new)


def prefix_cache(model: TransformerBridge, prefix: Int[Tensor, "1 p"]):
    """Run ``prefix`` (batch 1) and return a frozen KV cache usable by any batch size.

    Hooks active in the caller's context fire during this prefix pass, inside a
    forward window covering positions ``0..p`` (the caller sets ``total``). Raises
    :class:`FastPathError` if the model left the cache empty.
    """
    _install_cache_kwarg_shim()
    with torch.no_grad(), last_position_unembed(model, 1):
        _, cache = model(prefix, return_type="logits_and_cache", use_cache=True)
    _check_filled(cache, prefix.shape[-1])
    return freeze_cache(cache)


# ----------------------------------------------------------------------------
# partial unembedding
# ----------------------------------------------------------------------------

def _trim_point(model: TransformerBridge) -> str:
    """Where position trimming happens: before the unembedding (fast) or after it (exact fallback)."""
    st = _STATUS.get(model)
    if st is not None and st.unembed.get("path") == "exact":
        return hook_name("unembed_out")
    return hook_name("unembed_in")


@contextlib.contextmanager
def position_unembed(model: TransformerBridge, position: int):
    """Unembed only ``position`` (an index of the current forward call); the logits are ``[batch, 1, vocab]``."""

    def keep(x, hook):
        return x[:, position : position + 1]

    with hooked(model, [(_trim_point(model), keep)]):
        yield


@contextlib.contextmanager
def last_position_unembed(model: TransformerBridge, n_last: int):
    """Unembed only the last ``n_last`` positions (the rest of the logits are never used)."""

    def keep_last(x, hook):
        return x[:, -n_last:]

    with hooked(model, [(_trim_point(model), keep_last)]):
        yield


@contextlib.contextmanager
def answer_unembed(model: TransformerBridge, n_last: int, columns: Sequence[int] | None):
    """:func:`last_position_unembed`, and with ``columns`` (the vocabulary ids a readout reads) only those
    columns are computed where the self-check passed (the others are NaN; see
    :mod:`mechbias.core.answer_columns`). ``columns=None`` unembeds every column."""
    cut = columns is not None and use_answer_columns(model)  # the self-check runs before any hook is in place
    with contextlib.ExitStack() as stack:
        stack.enter_context(last_position_unembed(model, n_last))
        if cut:
            assert columns is not None
            stack.enter_context(columns_only(model, columns))
        yield


# ----------------------------------------------------------------------------
# the self-check
# ----------------------------------------------------------------------------

def _versions_text() -> str:
    return ", ".join(f"{k} {v}" for k, v in library_versions().items())


def _probe_ids(model: TransformerBridge) -> Tensor:
    """Three 9-token rows sharing their first 5 tokens (a BOS, when the tokenizer has one, then fixed ids)."""
    vocab = int(model.cfg.d_vocab)
    g = torch.Generator().manual_seed(0)
    body = torch.randint(0, vocab, (3, 8), generator=g)
    body[1:, :4] = body[0, :4]
    tok = getattr(model, "tokenizer", None)
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    first = torch.full((3, 1), int(bos) if bos is not None and bos < vocab else 0)
    return torch.cat([first, body], dim=1).to(model.cfg.device)


@dataclass
class FastPathStatus:
    """:func:`fast_path_status`: each fast path's check (:data:`FAST_PATHS`) and the library versions it ran
    under."""

    versions: dict[str, str]
    unembed: PathCheck
    kv_cache: PathCheck
    resume: PathCheck
    prefix_attention: PathCheck
    answer_columns: PathCheck

    def checks(self) -> dict[str, PathCheck]:
        """Each fast path's check, by name."""
        return {k: getattr(self, k) for k in FAST_PATHS}


def _kv_checks(model: TransformerBridge, ids: Tensor, exact: Tensor) -> dict[str, PathCheck]:
    """Frozen prefix, sliced cache and growing cache, each against the full-sequence logits."""
    p, total = 5, ids.shape[1]
    tol = tolerance(model, exact)
    out = {}
    try:
        with forward_window(0, total):
            cache = prefix_cache(model, ids[:1, :p])
        with forward_window(p, total):
            fast: Any = model(ids[:, p:], past_key_values=cache)[:, -1]
    except Exception as e:
        fast = e
    out["frozen_prefix"] = compare("frozen_prefix", fast, exact[:, -1], tol)
    try:
        with forward_window(0, total):
            _, full_cache = model(ids[:1], return_type="logits_and_cache", use_cache=True)
        with forward_window(p, total):
            fast = model(ids[:, p:], past_key_values=slice_cache(full_cache, p))[:, -1]
    except Exception as e:
        fast = e
    out["sliced_cache"] = compare("sliced_cache", fast, exact[:, -1], tol)
    try:
        with forward_window(0, total):
            _, grow = model(ids[:, :p], return_type="logits_and_cache", use_cache=True)
        _check_filled(grow, p)
        with forward_window(p, total):
            fast = model(ids[:, p : p + 1], past_key_values=grow, return_type="logits_and_cache")[0][:, -1]
    except Exception as e:
        fast = e
    out["growing_cache"] = compare("growing_cache", fast, exact[:, p], tol)
    return out


def _run_checks(model: TransformerBridge) -> FastPathStatus:
    kv: PathCheck
    ids = _probe_ids(model)
    total = ids.shape[1]
    with torch.no_grad():
        with forward_window(0, total):
            exact = model(ids)
        tol = tolerance(model, exact)
        try:
            with hooked(model, [(hook_name("unembed_in"), lambda x, hook: x[:, -2:])]), forward_window(0, total):
                fast: Any = model(ids)
        except Exception as e:
            fast = e
        unembed = compare("unembed", fast, exact[:, -2:], tol)
        if is_masked_lm(model) or not supports_kv_cache(model):
            kv = {"path": "exact", "ok": True, "reason": "the model has no usable KV cache"}
        else:
            shim = _install_cache_kwarg_shim()
            parts = _kv_checks(model, ids, exact)
            ok = all(v["ok"] for v in parts.values())
            kv = {"path": "fast" if ok else "exact", "ok": ok, "shim": shim, "checks": parts}
        resume = resume_check(model, ids, tol)
        prefix = _prefix_attention_check(model, ids, exact, tol, kv)
        vocab = int(model.cfg.d_vocab)

        def plain() -> Tensor:
            with forward_window(0, total):
                return model(ids)

        columns = check_columns(model, plain, exact, (0, vocab // 2, vocab - 1), tol)
    return FastPathStatus(library_versions(), unembed, kv, resume, prefix, columns)  # type: ignore[arg-type]


def _prefix_attention_check(model: TransformerBridge, ids: Tensor, exact: Tensor, tol: float, kv: PathCheck) -> PathCheck:
    """Three rows of one new token, then of four, over a frozen 5-token prefix, through :func:`prefix_attention`,
    against the full-sequence logits at those positions; the path must have been taken in every layer."""
    if kv["path"] != "fast":
        return {"path": "exact", "ok": True, "reason": "the KV-cache fast path is off on this model"}
    p, total = 5, ids.shape[1]
    out: PathCheck = {}
    for n in (1, total - p):
        try:
            with forward_window(0, p + n):
                cache = prefix_cache(model, ids[:1, :p])
            before = prefix_attention_calls()
            with prefix_attention(), forward_window(p, p + n):
                fast: Any = model(ids[:, p : p + n], past_key_values=cache)
            if prefix_attention_calls() - before != model.cfg.n_layers:
                return {"path": "exact", "ok": True, "reason": "an attention layer of this model does not take the "
                                                              "prefix path"}
        except Exception as e:
            fast = e
        out = compare("prefix_attention", fast, exact[:, p : p + n], tol)
        if not out["ok"]:
            break
    return out


def fast_path_status(model: TransformerBridge) -> FastPathStatus:
    """The self-check's verdict for ``model`` (run on first call, then cached): for ``"unembed"`` and
    ``"kv_cache"``, which path runs (``"fast"`` or ``"exact"``), whether the fast path agreed with the exact
    one, the largest difference seen and the tolerance (likewise ``"resume"``); plus the library versions.

    On a disagreement: a warning naming the versions (once per model), or :class:`FastPathError` in
    strict mode. The check runs with the caller's hooks active and forward windows set as the fast paths
    set them, so a correct position-aware intervention gives equal results on both paths."""
    st = _STATUS.get(model)
    if st is not None:
        return st
    st = _run_checks(model)
    _STATUS[model] = st
    failed = [k for k, c in st.checks().items() if not c["ok"]]
    if failed:
        msg = (f"mechbias: the fast path(s) {', '.join(failed)} disagree with the exact path on this model "
               f"({_failure_text(st, failed)}; {_versions_text()}); using the exact path from now on. Results "
               f"stay correct but are slower. Please report this with the versions above.")
        if strict():
            raise FastPathError(msg + " (strict mode: MECHBIAS_STRICT)")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return st


def _failure_text(st: FastPathStatus, failed: list[str]) -> str:
    bits = []
    for k in failed:
        entry = st.checks()[k]
        for name, c in ({k: entry} | entry.get("checks", {})).items():
            if c.get("ok") is False and ("max_abs_diff" in c or "error" in c):
                bits.append(f"{name}: " + (c["error"] if "error" in c else
                                          f"max |diff| {c['max_abs_diff']:.3g} > {c['tolerance']:.3g}"))
    return "; ".join(bits)


def use_resume(model: TransformerBridge) -> bool:
    """Whether forwards may resume at a layer on ``model`` (it can, and the self-check passed)."""
    if not resumable(model):
        return False
    return fast_path_status(model).resume["path"] == "fast"


def use_prefix_attention(model: TransformerBridge) -> bool:
    """Whether IG²'s scaled rows may attend over a frozen prefix through :func:`prefix_attention` on ``model``
    (the KV-cache path is on and this path passed its self-check)."""
    return use_kv_cache(model) and fast_path_status(model).prefix_attention["path"] == "fast"


def use_answer_columns(model: TransformerBridge) -> bool:
    """Whether the unembedding may compute only the columns a readout reads on ``model`` (self-checked)."""
    return fast_path_status(model).answer_columns["path"] == "fast"


def use_kv_cache(model: TransformerBridge) -> bool:
    """Whether the KV-cache fast paths may run on ``model``: it has a cache and passed the self-check."""
    if is_masked_lm(model) or not supports_kv_cache(model):
        return False
    return fast_path_status(model).kv_cache["path"] == "fast"


def fast_path_report(model: TransformerBridge) -> dict[str, str]:
    """Which path each fast path takes on ``model`` (``{"unembed": "fast", "kv_cache": "exact"}``), for a result's
    metadata. Runs the self-check if it has not run yet, so the record does not depend on what ran before in
    the process; the check's differences (which vary with thread counts) stay in :func:`fast_path_status`."""
    try:
        st = fast_path_status(model)
    except FastPathError:
        raise
    except Exception as e:
        return {"unchecked": f"{type(e).__name__}: {e}"}
    return {k: c["path"] for k, c in st.checks().items()}


def forget(model: TransformerBridge) -> None:
    """Drop the self-check verdict for ``model`` (the next fast-path use checks again)."""
    _STATUS.pop(model, None)
