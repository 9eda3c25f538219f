"""Attention over a frozen prefix without per-row copies (mechbias.core.prefix_attention) equals the bridge's
own attention and the full-sequence forward, in values and in gradients; it is really taken, hooks fire on
it, it steps aside for hooks it cannot serve, and a broken version is caught by the self-check."""

import warnings

import pytest
import torch

from mechbias.core import fastpath
from mechbias.core import prefix_attention as pa
from mechbias.core.fastpath import fast_path_status, prefix_cache, use_prefix_attention
from mechbias.core.testing import tiny_model
from mechbias.core.window import forward_window
from mechbias.methods.ig2 import ig2_prompt

IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [1, 5, 6, 7, 8, 12, 13, 14], [1, 5, 6, 7, 8, 15, 9, 16]])


def _run(model, ids, p, *, on: bool, hooks=()):
    from mechbias.core.hooks import hooked

    with forward_window(0, ids.shape[1]):
        cache = prefix_cache(model, ids[:1, :p])
    with torch.no_grad(), hooked(model, list(hooks)), pa.prefix_attention(on), forward_window(p, ids.shape[1]):
        return model(ids[:, p:], past_key_values=cache)


@pytest.mark.parametrize("n_new", [1, 3])
@pytest.mark.parametrize("shape", [dict(n_heads=4, n_kv_heads=2), dict(n_heads=4, n_kv_heads=4),
                                   dict(n_heads=6, n_kv_heads=1, d_model=96)])
def test_equals_the_bridge_and_the_full_forward(n_new, shape):
    model = tiny_model(seed=11, n_layers=3, **shape)
    p = 5
    ids = IDS[:, : p + n_new]
    with torch.no_grad():
        full = model(ids)[:, p:]
    before = pa.calls()
    fast = _run(model, ids, p, on=True)
    assert pa.calls() - before == model.cfg.n_layers  # every layer took the path: not a no-op
    slow = _run(model, ids, p, on=False)
    assert pa.calls() - before == model.cfg.n_layers  # and off means off
    assert float(full.abs().max()) > 0.1
    assert float((fast - full).abs().max()) < 1e-5
    assert float((fast - slow).abs().max()) < 1e-5


def test_gradients_equal_the_bridge_path():
    """The gradient of a logit difference with respect to a leaf injected after the prefix (IG²'s use)."""
    from mechbias.core.hooks import hooked

    model = tiny_model(seed=12, n_layers=3)
    p = 6
    ids = IDS[:, : p + 1]
    grads = []
    for on in (True, False):
        with forward_window(0, p + 1):
            cache = prefix_cache(model, ids[:1, :p])
        leaf = torch.zeros(3, 1, model.cfg.d_model, requires_grad=True)
        hook = ("blocks.1.hook_resid_pre", lambda x, hook, leaf=leaf: x + leaf)
        with hooked(model, [hook]), pa.prefix_attention(on), forward_window(p, p + 1):
            out = model(ids[:, p:], past_key_values=cache)[:, -1]
        (out[:, 3] - out[:, 7]).sum().backward()
        grads.append(leaf.grad.clone())
    assert float(grads[1].abs().max()) > 1e-3
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_hooks_fire_on_the_path_and_it_steps_aside_for_the_pattern():
    model = tiny_model(seed=13, n_layers=2)
    p, ids = 5, IDS[:, :6]
    seen = []
    bump = [("blocks.0.attn.hook_z", lambda z, hook: z * 1.5), ("blocks.1.attn.hook_rot_q", lambda q, hook: seen.append(1) or q)]
    before = pa.calls()
    fast = _run(model, ids, p, on=True, hooks=bump)
    assert pa.calls() - before == 2 and seen  # the path ran and the hooks on it fired
    slow = _run(model, ids, p, on=False, hooks=bump)
    plain = _run(model, ids, p, on=False)
    assert float((slow - plain).abs().max()) > 1e-3  # the hook changes the result
    assert float((fast - slow).abs().max()) < 1e-5
    pattern = [("blocks.1.attn.hook_pattern", lambda w, hook: w)]
    before = pa.calls()
    _run(model, ids, p, on=True, hooks=pattern)
    assert pa.calls() - before == 1  # layer 1 needs the full pattern: the bridge's forward ran there


def test_ig2_takes_the_path_and_equals_the_plain_loop():
    model = tiny_model(seed=14, n_layers=3)
    assert use_prefix_attention(model)
    toks = IDS[0]
    before = pa.calls()
    fast = ig2_prompt(model, toks, 3, 7)
    assert pa.calls() > before
    ref = ig2_prompt(model, toks, 3, 7, method="reference")
    assert float((fast.attr - ref.attr).abs().max() / ref.attr.abs().max()) < 1e-5


def test_a_broken_prefix_path_is_caught_and_ig2_stays_exact(monkeypatch):
    real = pa._forward

    def forgetful(self, hidden, layer, kwargs):  # attends to nothing of the prefix's values
        layer = type("L", (), {"keys": layer.keys, "values": torch.zeros_like(layer.values)})()
        return real(self, hidden, layer, kwargs)

    monkeypatch.setattr(pa, "_forward", forgetful)
    model = tiny_model(seed=15, n_layers=2)
    with pytest.warns(RuntimeWarning, match="prefix_attention"):
        st = fast_path_status(model)
    assert st.prefix_attention["path"] == "exact" and not st.prefix_attention["ok"]
    assert st.kv_cache["path"] == "fast"
    assert not use_prefix_attention(model)
    before = pa.calls()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # warned once, at the check, not again
        fast = ig2_prompt(model, IDS[1], 3, 7)
    assert pa.calls() == before
    ref = ig2_prompt(model, IDS[1], 3, 7, method="reference")
    assert float((fast.attr - ref.attr).abs().max() / ref.attr.abs().max()) < 1e-5
    assert fastpath.fast_path_report(model)["prefix_attention"] == "exact"
