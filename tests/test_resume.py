"""Resuming a forward at an intervention's first block (mechbias.core.resume): exact against the full forward
for every intervention kind, skipped only where it is safe, and refused (falling back loudly) when broken."""

import dataclasses

import pytest
import torch

from mechbias.core import fastpath, resume
from mechbias.core.params import named_params
from mechbias.core.testing import tiny_model
from mechbias.data.contexts import load_context
from mechbias.eval.cells import EvalSet
from mechbias.interventions.base import Compose, Identity
from mechbias.interventions.units import HeadIntervention, NeuronIntervention
from mechbias.interventions.weights import WeightEdit, WeightMask
from mechbias.methods.leace import ErasureIntervention
from mechbias.methods.steering import DirectionIntervention


@pytest.fixture(scope="module")
def deep():
    """A 6-layer random Llama: room for an early, a middle and a late first block."""
    return tiny_model(arch="llama", seed=3, n_layers=6, init_range=0.2)


@pytest.fixture(scope="module")
def evalset(deep):
    return EvalSet.build(deep, load_context("finance"), "gender", templates_per_name=0)  # the full grid


def _param(model, layer: int, part: str) -> str:
    return next(n for n in named_params(model) if f"layers.{layer}." in n and part in n)


def _interventions(model) -> dict:
    d = model.cfg.d_model
    g = torch.Generator().manual_seed(0)
    u = torch.randn(d, generator=g)
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g))
    up = _param(model, 4, "up_proj")
    w = named_params(model)[up]
    return {
        "neurons": (NeuronIntervention({3: [1, 5, 9], 5: [2]}), 3),
        "neurons_last": (NeuronIntervention({4: [0, 7]}, factor=3.0, positions="last"), 4),
        "heads_z": (HeadIntervention({2: [1], 4: [0, 3]}), 2),
        "heads_q": (HeadIntervention({5: [2]}, mode="q"), 5),
        "weight_mask": (WeightMask({up: torch.tensor([0, 17, 300])}), 4),
        "weight_edit": (WeightEdit({up: 0.5 * torch.randn(w.shape, generator=g)}), 4),
        "steer_add": (DirectionIntervention(3, u, mode="add", alpha=4.0), 3),
        "steer_ablate_last": (DirectionIntervention(5, u, mode="ablate", positions="last"), 5),
        "erasure": (ErasureIntervention(2, q, q.T.contiguous(), bias=torch.randn(d, generator=g)), 2),
        "compose": (Compose([NeuronIntervention({5: [4]}), HeadIntervention({3: [1]})]), 3),
    }


def test_resumed_scores_equal_full_forward_for_every_kind(deep, evalset):
    assert fastpath.fast_path_status(deep).resume["path"] == "fast"
    for name, (iv, first) in _interventions(deep).items():
        assert evalset.resume_layer(deep, iv) == first, name
        full = evalset.scores(deep, iv, resume=False)
        fast = evalset.scores(deep, iv)
        moved = float((full - evalset.before).abs().max())
        assert moved > 1e-3, f"{name}: the intervention must change the scores for the test to mean anything"
        assert float((fast - full).abs().max()) <= 1e-5 * (1 + float(full.abs().max())), name


def test_scores_many_equals_one_by_one(deep, evalset):
    ivs = {k: v for k, (v, _) in _interventions(deep).items()}
    many = evalset.scores_many(deep, ivs)
    assert list(many) == list(ivs)  # in the caller's order, whatever order they were computed in
    for k, iv in ivs.items():
        assert torch.allclose(many[k], evalset.scores(deep, iv, resume=False), atol=1e-5), k


def test_identity_resumes_after_the_last_block_and_changes_nothing(deep, evalset):
    assert evalset.resume_layer(deep, Identity()) == deep.cfg.n_layers - 1
    assert torch.equal(evalset.scores(deep, Identity()), evalset.before)


def test_first_layer_is_conservative():
    n = 6
    assert resume.layer_of_name("blocks.4.mlp.hook_post", n) == 4
    assert resume.layer_of_name("model.layers.12.mlp.down_proj.weight", 30) == 12
    assert resume.layer_of_name("transformer.h.3.attn.c_attn.weight", n) == 3
    assert resume.layer_of_name("unembed.hook_in", n) == n
    assert resume.layer_of_name("model.norm.weight", n) == n
    assert resume.layer_of_name("model.embed_tokens.weight", n) == 0  # may be tied to the unembedding
    assert resume.layer_of_name("hook_embed", n) == 0
    assert resume.layer_of_name("something.unknown", n) == 0


def test_an_intervention_with_its_own_apply_is_never_skipped(deep):
    @dataclasses.dataclass
    class Custom(NeuronIntervention):
        def apply(self, model):  # a type that changes the model some other way
            return super().apply(model)

    assert NeuronIntervention({5: [1]}).first_layer(deep) == 5
    assert Custom({5: [1]}).first_layer(deep) == 0


def test_the_residual_is_captured_without_the_intervention(deep, evalset):
    # a steering hook at block L's input must act once (at resume), not also during the capture
    iv = DirectionIntervention(4, torch.ones(deep.cfg.d_model), mode="add", alpha=2.0)
    fresh = EvalSet(evalset.context, evalset.prompts, evalset.before, evalset.col_group)
    assert torch.allclose(fresh.scores(deep, iv), fresh.scores(deep, iv, resume=False), atol=1e-5)


def test_a_broken_skip_is_caught_and_the_full_forward_runs(monkeypatch, evalset):
    model = tiny_model(arch="llama", seed=3, n_layers=6, init_range=0.2)  # a fresh model: no cached verdict
    real_skip = resume.skip_blocks

    def skip_too_many(m, layer):  # skips block `layer` itself as well: wrong, and must be noticed
        return real_skip(m, layer + 1)

    monkeypatch.setattr(resume, "skip_blocks", skip_too_many)
    iv = NeuronIntervention({4: [0, 3]})
    es = EvalSet(evalset.context, evalset.prompts, evalset.before, evalset.col_group)
    with pytest.warns(RuntimeWarning, match="resume"):
        assert fastpath.fast_path_status(model).resume["path"] == "exact"
    assert es.resume_layer(model, iv) == 0
    assert fastpath.fast_path_report(model)["resume"] == "exact"
    ids = torch.tensor([[1, 5, 7, 9]])  # the broken skip does change the result: the check is not vacuous
    broken = resume.resumed_logits(model, resume.capture_resid(model, ids, 4), 4)
    with torch.no_grad():
        exact = model(ids)
    assert float((broken - exact).abs().max()) > 1e-3
    fastpath.forget(model)
    fastpath.set_strict(True)
    try:
        with pytest.raises(fastpath.FastPathError):
            fastpath.fast_path_status(model)
    finally:
        fastpath.set_strict(None)
        fastpath.forget(model)


def test_evalset_pickles_without_its_resume_cache(deep, evalset):
    import pickle

    evalset.scores(deep, NeuronIntervention({5: [1]}))
    assert "_resume" in evalset.__dict__
    back = pickle.loads(pickle.dumps(evalset))
    assert "_resume" not in back.__dict__ and torch.equal(back.before, evalset.before)


def test_resumed_perplexity_equals_the_padded_full_forward(deep):
    from mechbias.core.runner import sequence_nll
    from mechbias.data.neutral import neutral_texts
    from mechbias.data.prompts import tokenize
    from mechbias.eval.metrics import token_nll

    texts = neutral_texts(4, split="reporting")
    seqs = tokenize(deep, texts)
    base_nll, base_n = token_nll(deep, texts)
    ref, ref_n = sequence_nll(deep, seqs)
    assert base_n == ref_n and base_nll == pytest.approx(ref, rel=1e-6)
    for name, (iv, _first) in _interventions(deep).items():
        if str(iv.positions) != "all":
            continue
        with iv.apply(deep):
            want, _ = sequence_nll(deep, seqs)
        got, n = token_nll(deep, texts, intervention=iv)
        assert n == base_n and abs(want - base_nll) > 1e-5 * base_nll, name  # moves 10x the tolerance below
        assert got == pytest.approx(want, rel=1e-6), name
    assert token_nll(deep, texts, intervention=Identity()) == (base_nll, base_n)  # exactly: the same buckets


def test_stacked_draws_equal_separate_forwards_and_share_them(deep, evalset, monkeypatch):
    """Draw stacking (issue 32, 2b): interventions that resume at one block and act through hooks alone share
    each forward, every intervention on its own copy of the batch. Each grid equals its own forward's (and the
    full forward's) to float rounding; a token budget that holds only some copies splits them into chunks;
    weight changes and custom ``apply`` run on their own."""
    from mechbias.core.runner import batch_tokens
    from mechbias.interventions.base import stackable_hooks

    up = _param(deep, 3, "up_proj")
    draws = {f"random/{i}": NeuronIntervention.random_like(NeuronIntervention({3: [1, 5, 9]}), deep, i)
             for i in range(5)}
    ivs = {"after": NeuronIntervention({3: [1, 5, 9], 4: [2]}), **draws,
           "heads": HeadIntervention({3: [0, 2]}), "steer": DirectionIntervention(3, torch.ones(deep.cfg.d_model)),
           "both": Compose([NeuronIntervention({3: [4]}), HeadIntervention({5: [1]})]),
           "mask": WeightMask({up: torch.tensor([0, 17, 300])})}
    assert stackable_hooks(ivs["mask"], deep) is None and stackable_hooks(ivs["both"], deep) is not None
    assert stackable_hooks(Compose([ivs["after"], ivs["mask"]]), deep) is None
    assert {evalset.resume_layer(deep, v) for v in ivs.values()} == {3}
    calls = {"n": 0}
    real = resume.resumed_logits

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(resume, "resumed_logits", counting)
    one_by_one = {k: evalset.scores(deep, v) for k, v in ivs.items()}
    separate = calls["n"]
    cache = evalset._passes(deep)[0][0]
    largest = max(len(b) * len(cache.seqs[b[0]]) for b in cache.buckets)
    per_iv = separate // len(ivs)  # forwards of one intervention: one per length bucket and readout pass
    for budget in (10**6, 2 * largest):  # all nine stackable copies per forward; two in the largest bucket's
        calls["n"] = 0
        with batch_tokens(budget):
            many = evalset.scores_many(deep, ivs)
        assert list(many) == list(ivs)
        for k in ivs:
            moved = float((one_by_one[k] - evalset.before).abs().max())
            assert moved > 1e-3, k  # each intervention changes the scores
            assert float((many[k] - one_by_one[k]).abs().max()) <= 1e-5 * (1 + moved), (k, budget)
        if budget == 10**6:  # the weight mask on its own, the nine others in one forward per bucket
            assert calls["n"] == 2 * per_iv, (calls["n"], per_iv)
        else:  # chunks of the stack, still fewer forwards than one per intervention
            assert 2 * per_iv < calls["n"] < separate, (calls["n"], per_iv)
    assert torch.allclose(many["after"], evalset.scores(deep, ivs["after"], resume=False), atol=1e-5)
