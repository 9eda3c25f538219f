"""The one hook mechanism.

:func:`hooked` installs forward and backward hooks on named hook points for the
duration of a ``with`` block and always removes them, also when the block
raises. Every name is checked against the model first: TransformerLens 4's
bridge skips unknown names without a word, so a misspelled or missing hook
would otherwise silently do nothing. :func:`run_with_cache` does the same check
for cached activations. Names may be strings or :class:`~mechbias.core.sites.Site`
objects.
"""

from __future__ import annotations

import contextlib
import difflib
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .sites import Site

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

HookTarget = str | Site
HookList = Sequence[tuple[HookTarget, Callable]]


class HookNameError(ValueError):
    """A hook name the model does not have; the message lists the closest existing ones."""


def _name(target: HookTarget) -> str:
    return target.hook_name if isinstance(target, Site) else str(target)


def closest_hook_names(model: TransformerBridge, name: str, n: int = 3) -> list[str]:
    """Up to ``n`` hook names of ``model`` closest to ``name`` (for error messages)."""
    return difflib.get_close_matches(name, list(model.hook_dict), n=n, cutoff=0.5)


# the bridge rebuilds hook_dict on every access (milliseconds on a 30-layer model, and hooks are installed
# several times per forward pass), so the names are kept per model and re-read once before a name is refused
_NAMES: weakref.WeakKeyDictionary[Any, frozenset[str]] = weakref.WeakKeyDictionary()


def _hook_names(model: TransformerBridge, refresh: bool = False) -> frozenset[str]:
    names = None if refresh else _NAMES.get(model)
    if names is None:
        names = frozenset(model.hook_dict)
        _NAMES[model] = names
    return names


def check_hook_names(model: TransformerBridge, names: Iterable[HookTarget]) -> list[str]:
    """The names as strings; raises :class:`HookNameError` for any the model lacks."""
    out = [_name(t) for t in names]
    have = _hook_names(model)
    if any(n not in have for n in out):
        have = _hook_names(model, refresh=True)
    for n in out:
        if n not in have:
            near = closest_hook_names(model, n)
            hint = f"; closest existing: {near}" if near else ""
            family = getattr(model.cfg, "architecture", None) or getattr(model.cfg, "model_name", "")
            raise HookNameError(f"the model ({family}) has no hook point {n!r}{hint}")
    return out


@contextlib.contextmanager
def hooked(model: TransformerBridge, fwd: HookList = (), bwd: HookList = ()) -> Iterator[Any]:
    """Install hooks for the duration of the block; they are removed in ``finally``.

    Args:
        model: the model.
        fwd: ``(hook name, function)`` pairs for the forward pass; an unknown hook name raises
            :class:`HookNameError` naming the closest ones.
        bwd: the same for the backward pass.

    Returns:
        A context manager that yields the model.
    """
    fwd_names = check_hook_names(model, [t for t, _ in fwd])
    bwd_names = check_hook_names(model, [t for t, _ in bwd])
    fwd_hooks = [(n, fn) for n, (_, fn) in zip(fwd_names, fwd, strict=True)]
    bwd_hooks = [(n, fn) for n, (_, fn) in zip(bwd_names, bwd, strict=True)]
    with model.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
        yield model


def run_with_cache(model: TransformerBridge, tokens, names: Sequence[HookTarget], **kw):
    """``model.run_with_cache`` restricted to ``names`` (checked first). Returns ``(logits, cache)``."""
    checked = check_hook_names(model, names)
    return model.run_with_cache(tokens, names_filter=checked, **kw)


def canonical_name(model: TransformerBridge, name: HookTarget) -> str:
    """The name a hook point reports for itself (aliases resolve to a canonical name)."""
    n = check_hook_names(model, [name])[0]
    hp = model.hook_dict[n]
    return hp.name or n


def n_active_hooks(model: TransformerBridge) -> int:
    """Number of hook functions currently attached to the model's hook points.

    Args:
        model: the model.

    Returns:
        The count (0 after every mechbias call returns).
    """
    total = 0
    for hp in set(model.hook_dict.values()):
        total += len(hp._forward_hooks) + len(hp._backward_hooks)
        total += len(getattr(hp, "_backward_pre_hooks", {}))
    return total
