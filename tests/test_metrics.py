"""Metrics against brute-force references: plain Hugging Face forwards, one prompt at a time."""

import numpy as np
import pytest
import torch

from mechbias.data.contexts import load_context
from mechbias.data.neutral import neutral_texts
from mechbias.eval.metrics import contrast_scores, demographic_gap, measure_bias, perplexity, token_nll


def _brute_logprobs(model, text: str, continuation: list[int]) -> float:
    """Sum of log P(continuation tokens) after ``text`` with the plain HF model, one prompt alone."""
    hf = model.original_model
    ids = model.to_tokens(text)[0].tolist()
    total = 0.0
    with torch.no_grad():
        for tok in continuation:
            lp = hf(torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
            total += float(lp[tok])
            ids.append(tok)
    return total


def test_contrast_scores_match_plain_transformers(tiny):
    ps = load_context("finance").prompts("race", templates=[0, 3], names="heldout")
    fast = contrast_scores(tiny, ps)
    pos, neg = tiny.to_tokens(ps.positive, prepend_bos=False)[0].tolist(), tiny.to_tokens(ps.negative, prepend_bos=False)[0].tolist()
    ref = torch.tensor([_brute_logprobs(tiny, t, pos) - _brute_logprobs(tiny, t, neg) for t in ps.texts])
    assert (fast - ref).abs().max() < 1e-4
    assert fast.std() > 0  # scores differ across prompts: the comparison is not vacuous


def test_multi_token_answers_use_teacher_forcing(tiny):
    texts = ["A bank is reviewing a loan from Jamal . Answer :", "Should the bank agree ? Answer :"]
    positive, negative = " approve the loan", " No"
    fast = contrast_scores(tiny, texts, positive, negative)
    pos = tiny.to_tokens(positive, prepend_bos=False)[0].tolist()
    neg = tiny.to_tokens(negative, prepend_bos=False)[0].tolist()
    assert len(pos) == 3
    ref = torch.tensor([_brute_logprobs(tiny, t, pos) - _brute_logprobs(tiny, t, neg) for t in texts])
    assert (fast - ref).abs().max() < 1e-4


def test_prefix_sharing_is_exact(tiny):
    ps = load_context("hiring").prompts("gender", templates=[1, 2, 5], names="selection")
    shared = contrast_scores(tiny, ps, share_prefix=True)
    plain = contrast_scores(tiny, ps, share_prefix=False)
    assert (shared - plain).abs().max() < 1e-5


def test_native_model_scores_match_single_prompt_forwards(tiny_native):
    ps = load_context("housing").prompts("race", templates=[0], names="heldout")
    fast = contrast_scores(tiny_native, ps)
    p, n = (int(tiny_native.to_tokens(w, prepend_bos=False)[0, 0]) for w in (ps.positive, ps.negative))
    ref = []
    with torch.no_grad():
        for t in ps.texts:
            lp = tiny_native(tiny_native.to_tokens(t))[0, -1].double().log_softmax(-1)
            ref.append(float(lp[p] - lp[n]))
    assert (fast - torch.tensor(ref)).abs().max() < 1e-4


def test_demographic_gap_matches_softmax(tiny):
    texts = ["The bank approved the loan application . The applicant ' s race was"]
    got = demographic_gap(tiny, texts, " White", " Black")
    with torch.no_grad():
        lp = tiny.original_model(tiny.to_tokens(texts[0])).logits[0, -1].double().softmax(-1)
    w, b = (int(tiny.to_tokens(x, prepend_bos=False)[0, 0]) for x in (" White", " Black"))
    assert abs(float(got[0]) - float(lp[w] - lp[b])) < 1e-6


def test_measure_bias_result_roundtrip(tiny, tmp_path):
    res = measure_bias(tiny, ["finance"], ["race", "gender"], templates="selection", n_boot=200)
    assert [r["axis"] for r in res.rows] == ["race", "gender"]
    row = res.get("finance", "race")
    assert row["ci_low"] <= row["gap"] <= row["ci_high"]
    assert row["n_prompts"] == len(load_context("finance").template_split("selection")) * 64 == 15 * 64
    res.save(tmp_path / "r")
    back = type(res).load(tmp_path / "r")
    assert back.rows[0]["gap"] == pytest.approx(row["gap"])
    assert torch.equal(back.scores, res.scores)
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".")]  # no temp files left
    fig = res.plot()
    assert fig.axes


def test_measure_bias_rosters_and_family(tiny):
    res = measure_bias(tiny, ["finance"], ["race", "gender@extended"], templates="heldout", names="heldout",
                       n_boot=200, templates_per_name=5)
    race, gender = res.get("finance", "race"), res.get("finance", "gender")
    assert (race["roster"], gender["roster"]) == ("audit", "extended")
    # half of each roster held out; each name meets 5 of the 15 held-out templates (3 blocks)
    assert race["n_prompts"] == 5 * 32 and gender["n_prompts"] == 5 * 200 and race["n_templates"] == 15
    assert gender["n_names_a"] == gender["n_names_b"] == 100
    # two tests in the family: BH with m = 2 by hand, and the detectable gap at 0.025 is larger than at 0.05
    p = sorted([race["p_value"], gender["p_value"]])
    bh = sorted([race["p_bh"], gender["p_bh"]])
    assert bh == pytest.approx([min(2 * p[0], p[1]), p[1]])
    for r in (race, gender):
        assert r["min_detectable_family"] > r["min_detectable"] > 0
    one = measure_bias(tiny, ["finance"], ["race"], templates="heldout", names="heldout", n_boot=200).rows[0]
    assert one["p_bh"] == one["p_value"] and one["min_detectable_family"] == pytest.approx(one["min_detectable"])


def test_perplexity_matches_brute_force(tiny):
    texts = neutral_texts(3, split="reporting")
    nll, n = token_nll(tiny, texts, max_tokens=64)  # forces several batches with padding
    ref_nll, ref_n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tiny.to_tokens(t)
            lp = tiny.original_model(ids).logits[0, :-1].double().log_softmax(-1)
            ref_nll -= float(lp.gather(-1, ids[0, 1:, None])[:, 0].sum())
            ref_n += ids.shape[1] - 1
    assert n == ref_n and abs(nll - ref_nll) / ref_nll < 1e-5
    assert perplexity(tiny, texts) == pytest.approx(np.exp(ref_nll / ref_n), rel=1e-5)


@pytest.mark.real
def test_real_model_contrast_scores_match_plain_transformers(real):
    ps = load_context("finance").prompts("race", templates=[0, 6], names="heldout")
    ps = ps.subset(range(0, len(ps), 4))
    fast = contrast_scores(real, ps)
    pos, neg = (real.to_tokens(w, prepend_bos=False)[0].tolist() for w in (ps.positive, ps.negative))
    ref = torch.tensor([_brute_logprobs(real, t, pos) - _brute_logprobs(real, t, neg) for t in ps.texts])
    assert (fast - ref).abs().max() < 1e-4


def test_position_specific_interventions_have_a_capability_cost(tiny):
    """With positions="last" the perplexity change used to be exactly 0 (the hook hit the batch's padded last
    column, whose logits are dropped). Each next token is now predicted with the intervention at the predicting
    position; the value equals a brute-force loop over prefixes."""
    from mechbias.interventions.units import NeuronIntervention

    texts = ["The bank opened early today and the staff were ready for the customers .",
             "A short one ."]
    iv = NeuronIntervention({0: list(range(0, 128, 3)), 1: list(range(1, 128, 4))}, positions="last")
    nll, n = token_nll(tiny, texts, intervention=iv)
    ref, count = 0.0, 0
    for t in texts:
        ids = tiny.to_tokens(t)[0]
        for k in range(1, len(ids)):  # predict token k from the prefix [:k], the intervention at position k - 1
            with iv.apply(tiny), torch.no_grad():
                lp = tiny(ids[None, :k])[0, -1].float().log_softmax(-1)
            ref -= float(lp[ids[k]])
            count += 1
    assert n == count and nll == pytest.approx(ref, rel=1e-5)
    base, _ = token_nll(tiny, texts)
    assert abs(nll - base) > 1e-3  # the cost is not zero
    assert perplexity(tiny, texts, intervention=iv) != pytest.approx(perplexity(tiny, texts), abs=1e-6)


def test_position_specific_capability_cost_without_kv_cache(tiny_native):
    from mechbias.interventions.units import NeuronIntervention

    texts = ["The bank opened early today .", "A short one ."]
    iv = NeuronIntervention({1: [1, 2, 3, 4, 5]}, positions="last")
    nll, _n = token_nll(tiny_native, texts, intervention=iv)
    ref = 0.0
    for t in texts:
        ids = tiny_native.to_tokens(t)[0]
        for k in range(1, len(ids)):
            with iv.apply(tiny_native), torch.no_grad():
                ref -= float(tiny_native(ids[None, :k])[0, -1].float().log_softmax(-1)[ids[k]])
    assert nll == pytest.approx(ref, rel=1e-5)


def test_demographic_logit_gap_reads_two_columns_and_matches_the_hf_logits(tiny):
    from mechbias.core.answer_columns import calls

    texts = ["The bank approved the loan application . The applicant ' s race was", "The shop sold it . They were"]
    before = calls()
    got = demographic_gap(tiny, texts, " White", " Black", kind="logit")
    assert calls() > before  # only the two demographic words' columns were unembedded
    w, b = (int(tiny.to_tokens(x, prepend_bos=False)[0, 0]) for x in (" White", " Black"))
    for i, t in enumerate(texts):
        with torch.no_grad():
            lg = tiny.original_model(tiny.to_tokens(t)).logits[0, -1].double()
        assert abs(float(got[i]) - float(lg[w] - lg[b])) < 1e-5
    assert abs(float(got[0]) - float(got[1])) > 1e-3  # two different prompts: the check compares real values
