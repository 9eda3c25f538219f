"""Unembedding only the answer tokens' columns (mechbias.core.answer_columns, issue 32 2(c)): equal to the full
unembedding for every intervention kind, on the plain, resumed and stacked paths; a readout that reads another
column raises; the unembedding is restored; and a broken version is caught by the self-check."""

import contextlib

import pytest
import torch

from mechbias.core import answer_columns, fastpath
from mechbias.core.params import named_params
from mechbias.core.runner import map_last_logits
from mechbias.core.testing import tiny_model
from mechbias.data.contexts import load_context
from mechbias.data.prompts import tokenize
from mechbias.eval.cells import EvalSet
from mechbias.eval.metrics import contrast_scores
from mechbias.interventions.base import Compose
from mechbias.interventions.units import HeadIntervention, NeuronIntervention
from mechbias.interventions.weights import WeightMask
from mechbias.methods.steering import DirectionIntervention


@pytest.fixture(scope="module")
def deep():
    return tiny_model(arch="llama", seed=5, n_layers=6, init_range=0.2)


@pytest.fixture(scope="module")
def evalset(deep):
    return EvalSet.build(deep, load_context("finance"), "gender", templates_per_name=0)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= 1e-5 * (1 + float(b.abs().max()))


def _interventions(model) -> dict:
    g = torch.Generator().manual_seed(0)
    up = next(n for n in named_params(model) if "layers.4." in n and "up_proj" in n)
    return {
        "neurons": NeuronIntervention({3: [1, 5, 9], 5: [2]}),
        "heads": HeadIntervention({2: [1], 4: [0, 3]}),
        "weights": WeightMask({up: torch.tensor([0, 17, 300])}),
        "direction": DirectionIntervention(5, torch.randn(model.cfg.d_model, generator=g), mode="add", alpha=4.0),
        "compose": Compose([NeuronIntervention({5: [4]}), HeadIntervention({3: [1]})]),
    }


def test_the_plain_forward_equals_the_full_unembedding_and_takes_the_path(deep):
    assert fastpath.fast_path_status(deep).answer_columns["path"] == "fast"
    ps = load_context("finance").prompts("gender", templates=[0, 1, 2], names="selection")
    before = answer_columns.calls()
    cut = contrast_scores(deep, ps)
    assert answer_columns.calls() > before
    full = contrast_scores(deep, ps, answer_columns=False)
    assert float(full.std()) > 0.05
    assert _close(cut, full)


def test_resumed_scores_equal_the_full_unembedding_for_every_kind(deep, evalset):
    for name, iv in _interventions(deep).items():
        assert evalset.resume_layer(deep, iv) >= 1, name
        full = evalset.scores(deep, iv, answer_columns=False)
        before = answer_columns.calls()
        cut = evalset.scores(deep, iv)
        assert answer_columns.calls() > before, name
        assert float((full - evalset.before).abs().max()) > 1e-3, f"{name} must move the scores"
        assert _close(cut, full), name
        # and both equal the full forward with the full unembedding
        assert _close(cut, evalset.scores(deep, iv, resume=False, answer_columns=False)), name


def test_stacked_draws_equal_separate_full_unembeddings(deep, evalset):
    iv = NeuronIntervention({4: [0, 7, 11]})
    draws = {f"random/{k}": iv.random_like(deep, 17 * (k + 1)) for k in range(4)}
    before = answer_columns.calls()
    many = evalset.scores_many(deep, draws)
    assert answer_columns.calls() > before
    for k, d in draws.items():
        assert _close(many[k], evalset.scores(deep, d, resume=False, answer_columns=False)), k


def test_a_readout_that_reads_another_column_raises(deep):
    seqs = tokenize(deep, ["The bank approved the loan .", "The bank denied the loan ."])
    with pytest.raises(RuntimeError, match="read another column"):
        map_last_logits(deep, seqs, lambda lg: lg[:, -1].logsumexp(-1), columns=(3, 4))
    ok = map_last_logits(deep, seqs, lambda lg: lg[:, -1, 3] - lg[:, -1, 4], columns=(3, 4))
    ref = map_last_logits(deep, seqs, lambda lg: lg[:, -1, 3] - lg[:, -1, 4])
    assert _close(ok, ref)


def test_the_unembedding_is_restored_after_an_error(deep):
    ids = tokenize(deep, ["The bank approved the loan ."])[0][None]
    with torch.no_grad():
        ref = deep(ids)
    inner = deep.unembed.original_component
    with pytest.raises(ValueError, match="boom"), answer_columns.columns_only(deep, [1, 2]):
        with torch.no_grad():
            inside = deep(ids)
        assert torch.isnan(inside[..., 3:]).all() and not torch.isnan(inside[..., 1:3]).any()
        raise ValueError("boom")
    assert "forward" not in inner.__dict__
    with torch.no_grad():
        assert torch.equal(deep(ids), ref)


def test_bad_columns_are_refused(deep):
    with pytest.raises(ValueError, match="columns must lie"), answer_columns.columns_only(deep, [deep.cfg.d_vocab]):
        pass
    with pytest.raises(ValueError, match="at least one column"), answer_columns.columns_only(deep, []):
        pass


def test_a_broken_version_is_caught_and_the_full_unembedding_runs(monkeypatch):
    model = tiny_model(arch="llama", seed=6, n_layers=3)
    real = answer_columns.columns_only

    @contextlib.contextmanager
    def swapped(m, columns):  # computes the columns in reverse order: each answer gets the other's logit
        with real(m, list(columns)):
            inner = m.unembed.original_component
            good = inner.forward
            cols = sorted({int(c) for c in columns})

            def forward(x, *a, **k):
                out = good(x, *a, **k)
                out[..., cols] = out[..., cols[::-1]].clone()
                return out

            inner.forward = forward
            yield

    monkeypatch.setattr(answer_columns, "columns_only", swapped)
    monkeypatch.setattr(fastpath, "columns_only", swapped)
    fastpath.forget(model)
    with pytest.warns(RuntimeWarning, match="answer_columns"):
        st = fastpath.fast_path_status(model)
    assert st.answer_columns["path"] == "exact" and st.answer_columns["ok"] is False
    ps = load_context("finance").prompts("gender", templates=[0, 1], names="selection")
    before = answer_columns.calls()
    got = contrast_scores(model, ps)
    assert answer_columns.calls() == before  # the cut unembedding never ran
    monkeypatch.undo()
    fastpath.forget(model)
    assert torch.equal(got, contrast_scores(model, ps, answer_columns=False))
