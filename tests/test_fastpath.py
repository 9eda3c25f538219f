"""The fast paths that lean on library internals check themselves at run time (issue 30).

A fast path broken on purpose (the frozen prefix cache forgets its prefix, as it did silently under
transformers 5.25 with TransformerLens 4.3.0) must be caught on first use: a warning naming the library
versions, the exact path from then on (so the numbers equal plain forwards), and the path recorded in
the result's metadata. Strict mode turns the warning into an error."""

import warnings

import pytest
import torch

from mechbias.core import fastpath
from mechbias.core.fastpath import FastPathError, fast_path_report, fast_path_status, prefix_cache, use_kv_cache
from mechbias.core.results import make_meta
from mechbias.core.testing import tiny_model
from mechbias.data.contexts import load_context
from mechbias.eval.metrics import contrast_scores


def _plain_scores(model, ps) -> torch.Tensor:
    """One full forward per prompt, no cache, full unembedding: the reference."""
    pos = int(model.to_tokens(ps.positive, prepend_bos=False)[0, 0])
    neg = int(model.to_tokens(ps.negative, prepend_bos=False)[0, 0])
    out = []
    with torch.no_grad():
        for t in ps.texts:
            lp = model(model.to_tokens(t))[0, -1].double().log_softmax(-1)
            out.append(float(lp[pos] - lp[neg]))
    return torch.tensor(out)


@pytest.fixture
def broken_prefix(monkeypatch):
    """The frozen prefix layer drops its prefix: the suffix attends to itself alone (the 5.25 failure)."""

    def broken_class(base):
        class Forgetful(base):  # type: ignore[misc, valid-type]
            _mechbias_frozen = True

            def update(self, key_states, value_states, *args, **kwargs):
                return key_states, value_states

        return Forgetful

    monkeypatch.setattr(fastpath, "_frozen_layer_class", broken_class)
    monkeypatch.setattr(fastpath, "_FROZEN", {})


def test_the_installed_libraries_pass_the_self_check():
    """Under the installed transformers (5.25 included) the shared-prefix cache is filled and exact."""
    model = tiny_model(seed=3)
    st = fast_path_status(model)
    assert st.kv_cache["path"] == "fast", st
    assert st.unembed["path"] == "fast", st
    for name, check in st.kv_cache["checks"].items():
        assert check["max_abs_diff"] < 1e-5, (name, check)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    cache = prefix_cache(model, ids)
    assert all(layer.keys.shape[-2] == 6 for layer in cache.layers)


def test_a_broken_fast_path_is_caught_and_the_exact_path_runs(broken_prefix):
    model = tiny_model(seed=4)  # a fresh model: no verdict cached
    ps = load_context("finance").prompts("gender", templates=[0, 1], names="heldout")
    ref = _plain_scores(model, ps)
    # the broken path really is wrong: used unchecked it moves the scores far beyond the tolerance
    p = 4
    ids = model.to_tokens(ps.texts[0])
    with torch.no_grad():
        wrong = model(ids[:, p:], past_key_values=prefix_cache(model, ids[:, :p]))[0, -1]
        right = model(ids)[0, -1]
    assert float((wrong - right).abs().max()) > 1e-2

    with pytest.warns(RuntimeWarning, match=r"kv_cache.*transformers"):
        scores = contrast_scores(model, ps, share_prefix=True)
    assert (scores - ref).abs().max() < 1e-4
    assert not use_kv_cache(model)
    assert fast_path_report(model)["kv_cache"] == "exact"
    assert make_meta(model)["fast_paths"]["kv_cache"] == "exact"
    with warnings.catch_warnings():  # warned once per model, not on every call
        warnings.simplefilter("error")
        again = contrast_scores(model, ps, share_prefix=True)
    assert torch.equal(again, scores)


def test_strict_mode_turns_the_warning_into_an_error(broken_prefix, monkeypatch):
    monkeypatch.setenv("MECHBIAS_STRICT", "1")
    model = tiny_model(seed=5)
    ps = load_context("finance").prompts("gender", templates=[0], names="heldout")
    with pytest.raises(FastPathError, match="transformer-lens"):
        contrast_scores(model, ps, share_prefix=True)


def test_a_broken_partial_unembedding_falls_back_to_trimming_after_the_unembedding(monkeypatch):
    """If cutting positions before the unembedding disagrees with the full logits, the trim moves after it."""
    model = tiny_model(seed=6)
    real_hooked = fastpath.hooked

    def bad_hooked(m, hooks):  # the check's trim hook keeps the wrong positions
        hooks = [(n, (lambda x, hook: x[:, :2]) if n == "unembed.hook_in" else f) for n, f in hooks]
        return real_hooked(m, hooks)

    monkeypatch.setattr(fastpath, "hooked", bad_hooked)
    with pytest.warns(RuntimeWarning, match="unembed"):
        st = fast_path_status(model)
    monkeypatch.setattr(fastpath, "hooked", real_hooked)
    assert st.unembed["path"] == "exact"
    assert fastpath._trim_point(model) == "unembed.hook_out"
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad(), fastpath.last_position_unembed(model, 1):
        last = model(ids)
    assert last.shape[1] == 1
    with torch.no_grad():
        full = model(ids)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-6)


def test_doctor_reports_the_self_check(capsys, broken_prefix):
    from mechbias.apps.cli import main

    with pytest.warns(RuntimeWarning):
        assert main(["doctor", "--model", "tiny"]) == 1  # the broken fast path is reported, and the exit says so
    out = capsys.readouterr().out
    assert "fast path kv_cache: exact (SELF-CHECK FAILED" in out and "transformers" in out
    assert "fast path unembed: fast (self-check passed" in out


def test_doctor_passes_on_the_installed_libraries(capsys):
    from mechbias.apps.cli import main

    assert main(["doctor", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "fast path kv_cache: fast (self-check passed" in out and "torch " in out
