"""bfloat16 runs (issue 13, item 4) on CPU: every method on a model held in bfloat16 against the same model in
float32, with the tolerances stated here and in the documentation (docs/models.md). Scores and attributions accumulate in float32 or
float64 whatever the model's dtype, so the differences measured are bfloat16's rounding of the forward pass
(8 significant bits), not of the sums."""

import pytest
import torch

from mechbias.core.families import family_model
from mechbias.data.contexts import load_context
from mechbias.data.pairs import make_pairs
from mechbias.data.prompts import single_token, tokenize
from mechbias.eval.metrics import contrast_scores
from mechbias.methods.gradiend import batch_gradient, param_set
from mechbias.methods.ig2 import ig2_prompt
from mechbias.methods.patching import patch_sweep
from mechbias.methods.pruning.scores import head_scores, input_norms, neuron_scores

FAMILIES = ["llama", "gpt2"]
TEXT = "The bank approved the loan application . Was the applicant White or Black ? The applicant was"


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    """The same random weights in float32 and in bfloat16."""
    f32 = family_model(request.param, seed=0)
    b16 = family_model(request.param, seed=0, dtype=torch.bfloat16)
    assert next(b16.original_model.parameters()).dtype == torch.bfloat16
    return f32, b16


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_bias_metric_in_bfloat16(pair):
    f32, b16 = pair
    ps = load_context("finance").prompts("race", templates=[0, 1], names="selection")
    a, b = contrast_scores(b16, ps), contrast_scores(f32, ps)
    assert a.dtype == torch.float64 and float(b.std()) > 0
    assert float((a - b).abs().max()) < 0.05 * float(b.abs().max()) + 0.02
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.98


def test_ig2_in_bfloat16(pair):
    f32, b16 = pair
    toks = tokenize(f32, [TEXT])[0]
    d1, d2 = single_token(f32, " White"), single_token(f32, " Black")
    a = ig2_prompt(b16, toks, d1, d2, kind="logit", steps=8)
    b = ig2_prompt(f32, toks, d1, d2, kind="logit", steps=8)
    assert a.attr.dtype == torch.float64
    assert _rel(a.attr, b.attr) < 0.05
    # the fast path in bfloat16 agrees with the plain loop in bfloat16 as closely as float32 paths agree
    ref = ig2_prompt(b16, toks, d1, d2, kind="logit", steps=8, method="reference")
    assert _rel(a.attr, ref.attr) < 0.05


def test_patching_and_scores_in_bfloat16(pair):
    f32, b16 = pair
    pairs = make_pairs(f32, "finance", "race", templates=[0], max_pairs=3)
    for comp in ("resid_pre", "heads", "mlp_out"):
        a, b = patch_sweep(b16, pairs, comp).mean_effect(), patch_sweep(f32, pairs, comp).mean_effect()
        # an effect is a difference of logit differences, each rounded to bfloat16 (8 significant bits, a
        # step of 0.008 at a logit of 2): the floor is absolute, about 0.007 on these models (measured)
        assert float((a.double() - b.double()).abs().max()) < 0.012, comp
    ps = load_context("finance").prompts("race", templates=[0], names="selection")
    assert _rel(neuron_scores(b16, ps), neuron_scores(f32, ps)) < 0.02
    assert _rel(head_scores(b16, ps), head_scores(f32, ps)) < 0.02
    na, nb = input_norms(b16, ps), input_norms(f32, ps)
    assert max(_rel(na[0][k], nb[0][k]) for k in nb[0]) < 0.02


def test_gradiend_gradients_in_bfloat16_accumulate_in_float32(pair):
    f32, b16 = pair
    texts = ["The bank approved the loan", "Afterwards , the applicant said that"] * 3
    targets = [single_token(f32, " ."), single_token(f32, " he")] * 3
    a = batch_gradient(b16, param_set(b16, "mlp"), texts, targets, max_tokens=16)  # one text per micro-batch
    b = batch_gradient(f32, param_set(f32, "mlp"), texts, targets)
    assert a.dtype == torch.float32
    assert _rel(a, b) < 0.05
    assert all(p.grad is None for p in b16.parameters())



def test_tokens_per_batch_follows_free_memory_on_cuda_and_overrides(tiny, monkeypatch):
    """Tokens per forward: what fits in half the free CUDA memory (bfloat16 fits more than float32, more free
    memory fits more), the fixed CPU default, a ``batch_tokens`` override and an explicit value, in that
    order of precedence; results do not depend on the batch size."""
    from types import SimpleNamespace

    from mechbias.core import runner
    from mechbias.core.runner import DEFAULT_TOKENS_PER_BATCH, batch_tokens, map_last_logits, tokens_per_batch

    cfg = SimpleNamespace(d_model=576, d_mlp=1536, d_vocab=49152)
    per_token_f32 = (4 * 576 + 2 * 1536) * 4 + 8 * 49152  # bytes, by hand: 414,720
    assert runner.tokens_for_memory(2 * 414_720 * 1000, cfg, 4) == 1000 == 2 * 414_720 * 1000 // 2 // per_token_f32
    assert runner.tokens_for_memory(8e9, cfg, 2) > runner.tokens_for_memory(8e9, cfg, 4)
    assert runner.tokens_for_memory(1e3, cfg, 4) == 256 and runner.tokens_for_memory(1e15, cfg, 4) == 2**20

    assert tokens_per_batch(tiny) == DEFAULT_TOKENS_PER_BATCH  # a CPU model
    with batch_tokens(64):
        assert tokens_per_batch(tiny) == 64 and tokens_per_batch(tiny, 8) == 8
    fake = SimpleNamespace(cfg=SimpleNamespace(device="cuda:0", dtype=torch.bfloat16, d_model=576, d_mlp=1536,
                                               d_vocab=49152))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 2**30, 80 * 2**30))
    assert tokens_per_batch(fake) == runner.tokens_for_memory(40 * 2**30, fake.cfg, 2) > DEFAULT_TOKENS_PER_BATCH
    with batch_tokens(100):
        assert tokens_per_batch(fake) == 100
    with pytest.raises(ValueError), batch_tokens(0):
        pass

    seqs = tokenize(tiny, load_context("finance").prompts("race", templates=[0, 1], names="selection").texts)
    whole = map_last_logits(tiny, seqs, lambda lg: lg[:, -1, :5])
    with batch_tokens(20):  # one or two prompts per forward
        small = map_last_logits(tiny, seqs, lambda lg: lg[:, -1, :5])
    assert torch.allclose(whole, small, atol=1e-5)
