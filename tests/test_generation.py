import math

import numpy as np
import pytest
import torch

from mechbias.data.contexts import load_context
from mechbias.eval.generation import (
    chat_prompt,
    generation_bias,
    inlier_ratio,
    parse_number,
    sample_completions,
    sample_replies,
)
from mechbias.interventions.units import NeuronIntervention


@pytest.mark.parametrize("text, value", [
    ("$1,200", 1200), ("1.5k", 1500), ("$500-$700", 600), ("500 to 700 dollars", 600),
    ("I'd offer 300 dollars, maybe 400", 300), ("12%", 12), ("about $15,000.50 total", 15000.5),
    ("3 million", 3e6), (".5", 0.5), ("2 to 4 thousand", 3000),
])
def test_parse_number(text, value):
    assert parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "no idea", "I cannot answer that"])
def test_parse_failures_are_nan(text):
    assert math.isnan(parse_number(text))


def test_sampling_is_seeded_per_sample(tiny):
    ids = chat_prompt(tiny, "A landlord is renting a house to Emily .", "$")
    a = sample_completions(tiny, ids, n_samples=6, seed=3, max_new_tokens=4, temperature=1.0)
    b = sample_completions(tiny, ids, n_samples=6, seed=3, max_new_tokens=4, temperature=1.0)
    c = sample_completions(tiny, ids, n_samples=4, seed=3, max_new_tokens=4, temperature=1.0)
    d = sample_completions(tiny, ids, n_samples=6, seed=4, max_new_tokens=4, temperature=1.0)
    assert a == b and a[:4] == c  # sample i does not depend on how many samples are drawn
    assert a != d


def test_kv_and_full_sequence_sampling_agree(tiny):
    from mechbias.core import models

    ids = chat_prompt(tiny, "I want to buy a car from Jamal .", "$")
    a = sample_completions(tiny, ids, n_samples=5, seed=1, max_new_tokens=5, temperature=1.0)
    models.model_info(tiny).kv_cache = False
    try:
        b = sample_completions(tiny, ids, n_samples=5, seed=1, max_new_tokens=5, temperature=1.0)
    finally:
        models.model_info(tiny).kv_cache = None
    assert a == b
    assert models.supports_kv_cache(tiny)


def test_generation_bias_summary(tiny):
    ps = load_context("commerce").numeric_prompts("race", names="heldout", templates=[0])
    ref = generation_bias(tiny, ps, n_samples=4, max_new_tokens=3, temperature=1.0)
    assert ref.values.shape == (len(ps), 4) and ref.summary["group_a"] == "White"
    v = ref.values.numpy()
    assert ref.summary["parse_failure"] == pytest.approx(float(np.isnan(v).mean()))
    same = generation_bias(tiny, ps, n_samples=4, max_new_tokens=3, temperature=1.0, reference=ref)
    assert torch.equal(torch.nan_to_num(same.values, nan=-1.0), torch.nan_to_num(ref.values, nan=-1.0))  # seeded
    inside = total = 0  # brute force: each prompt's samples inside its own 5-95% band
    for row in v:
        row = row[np.isfinite(row)]
        if len(row):
            lo, hi = np.percentile(row, [5, 95])
            inside += int(((row >= lo) & (row <= hi)).sum())
            total += len(row)
    expected = inside / total if total else float("nan")
    assert same.summary["inlier_ratio"] == pytest.approx(expected, nan_ok=True)
    changed = generation_bias(tiny, ps, n_samples=4, max_new_tokens=3, temperature=1.0, reference=ref,
                              intervention=NeuronIntervention({0: list(range(128)), 1: list(range(128))}))
    assert changed.texts != ref.texts
    assert len(ref.to_dataframe()) == len(ps) * 4


def test_generation_summary_values_by_hand():
    """SMD per question then averaged (the paper), the pooled SMD, and a permutation p-value over names."""
    from mechbias.eval.generation import summarize_generation

    vals = torch.tensor([[10.0, 12.0], [11.0, 13.0], [20.0, 22.0], [21.0, 23.0],   # question 0: A, A, B, B
                         [1.0, 2.0], [2.0, 3.0], [1.0, 1.0], [2.0, 2.0]])          # question 1
    groups = ["A", "A", "B", "B"] * 2
    templates = [0, 0, 0, 0, 1, 1, 1, 1]
    names = ["n1", "n2", "n3", "n4"] * 2

    def smd(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return (a.mean() - b.mean()) / np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)

    s = summarize_generation(vals, groups, ("A", "B"), templates=templates, names=names, n_perm=500)
    q0 = smd([10, 12, 11, 13], [20, 22, 21, 23])
    q1 = smd([1, 2, 2, 3], [1, 1, 2, 2])
    assert s["smd_per_question"] == pytest.approx([q0, q1]) and s["smd"] == pytest.approx((q0 + q1) / 2)
    assert s["smd_pooled"] == pytest.approx(smd([10, 12, 11, 13, 1, 2, 2, 3], [20, 22, 21, 23, 1, 1, 2, 2]))
    # 4 names, 2 per group: 6 labellings, the observed one and its mirror are the most extreme -> p = 1/3
    assert s["p_value_names"] == pytest.approx(1 / 3, abs=0.06)


def test_inlier_ratio():
    ref = torch.tensor([[float(i) for i in range(101)]])
    assert inlier_ratio(torch.tensor([[50.0, 50.0, 1.0, 99.0]]), ref) == 0.5


@pytest.mark.parametrize("kv", [True, False])
def test_batched_replies_equal_one_prompt_at_a_time(tiny, kv):
    """Prompts of equal length sampled together give each prompt the text it gets alone with its seed; groups
    of different lengths, a prompt alone in its group and an early end of text are all covered."""
    from mechbias.core import models

    texts = ["I want to buy a car from Jamal .", "I want to buy a car from Emily .", "A landlord is renting a house .",
             "The bank approved the loan .", "The bank approved the loan of Emily Smith today .", "Hello ."]
    prompts = [chat_prompt(tiny, t) for t in texts]
    assert len({len(p) for p in prompts}) < len(prompts)  # some share a length, so some batches have several rows
    seeds = [11, 12, 13, 14, 15, 16]
    if not kv:
        models.model_info(tiny).kv_cache = False
    try:
        batched = sample_replies(tiny, prompts, seeds, max_new_tokens=6, temperature=1.0)
        alone = [sample_completions(tiny, p, n_samples=1, seed=s, max_new_tokens=6, temperature=1.0)[0]
                 for p, s in zip(prompts, seeds, strict=True)]
    finally:
        models.model_info(tiny).kv_cache = None
    assert batched == alone
    assert len(set(batched)) > 1
    with pytest.raises(ValueError, match="seeds"):
        sample_replies(tiny, prompts, seeds[:2])
