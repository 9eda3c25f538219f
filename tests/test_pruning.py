"""Pruning: set-difference logic, true Wanda inputs, exact restoration, and selected vs random on a planted model."""

import pytest
import torch

from mechbias.core.params import linear_layers, named_params
from mechbias.data.contexts import load_context
from mechbias.data.prompts import tokenize
from mechbias.eval.transfer import transfer_matrix
from mechbias.methods.pruning import (
    PruneConfig,
    Pruning,
    candidates,
    generalization_levels,
    head_scores,
    input_norms,
    name_positions,
    neuron_scores,
    pruning_curve,
    set_difference,
)
from mechbias.methods.pruning.ranking import greedy_select


def test_set_difference_logic():
    a = torch.tensor([9.0, 8.0, 7.0, 1.0, 0.0])
    b = torch.tensor([9.0, 0.0, 0.0, 8.0, 7.0])
    # top 60% of a = {0, 1, 2}; top 40% of b = {0, 3}
    assert set_difference(a, b, 0.6, 0.4).nonzero().flatten().tolist() == [1, 2]
    assert set_difference(a, b, 0.6, 0.0).sum() == 3
    assert set_difference(a, b, 0.0, 0.5).sum() == 0
    with pytest.raises(ValueError):
        set_difference(a, b[:3], 0.5, 0.5)


@pytest.mark.parametrize("shape", [(7,), (40, 33), (576, 150)])
def test_top_fraction_equals_topk(shape):
    """The partition-based top-k mask equals ``topk``'s on distinct values for every k tried; with ties at the
    cut it keeps exactly k, the lowest indices first; non-finite values go through ``topk``."""
    from mechbias.methods.pruning.scores import top_fraction

    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g)
    n = x.numel()
    for k in sorted({0, 1, 2, n // 7, n // 3, round(0.4 * n), n - 1, n}):
        ref = torch.zeros(n, dtype=torch.bool)
        if k:
            ref[x.flatten().topk(k).indices] = True
        assert torch.equal(top_fraction(x, k), ref.view(shape)), k
    tied = torch.tensor([5.0, 3.0, 3.0, 3.0, 1.0, 3.0])
    assert top_fraction(tied, 3).tolist() == [True, True, True, False, False, False]
    assert top_fraction(torch.tensor([1.0, float("nan"), 0.5]), 1).tolist() == [False, True, False]
    half = x.bfloat16().flatten()  # a bfloat16 model's scores (numpy has no bfloat16): exactly k, none kept below one left
    got = top_fraction(half, n // 3)
    assert int(got.sum()) == n // 3 and bool(half[got].min() >= half[~got].max())


def test_wanda_norms_use_each_layers_true_inputs(tiny):
    ps = load_context("finance").prompts("race", templates=[0, 1], names="selection")
    norms = input_norms(tiny, ps)  # [group A, group B]
    # brute force for group A: run each prompt, collect the input of each linear from its hook
    xs = {}
    for p in ps:
        if p.group != 0:
            continue
        _, cache = tiny.run_with_cache(p.text)
        for name, hook, _, _ in linear_layers(tiny):
            x = cache[hook][0].reshape(cache[hook].shape[1], -1).double()
            xs.setdefault(name, []).append(x)
    for name, chunks in xs.items():
        ref = torch.cat(chunks).pow(2).mean(0).sqrt().float()
        assert torch.allclose(norms[0][name], ref, rtol=1e-4), name
    # layer 1's inputs differ from layer 0's (the released code measured every layer on layer-0 inputs)
    n0 = norms[0]["model.layers.0.mlp.down_proj.weight"]
    n1 = norms[0]["model.layers.1.mlp.down_proj.weight"]
    assert not torch.allclose(n0, n1)


def test_weight_pruning_restores_weights_exactly(tiny):
    cfg = PruneConfig(unit="weight", k=500, common=None)
    iv = candidates(tiny, load_context("finance"), "race", cfg).intervention(cfg.k, cfg)
    assert iv.n_components == 500
    before = {n: p.detach().clone() for n, p in named_params(tiny).items()}
    with iv.apply(tiny):
        changed = sum(int((p != before[n]).sum()) for n, p in named_params(tiny).items())
        assert 0 < changed <= 500
    assert all(torch.equal(p, before[n]) for n, p in named_params(tiny).items())


def test_scores_and_name_positions(tiny):
    ctx = load_context("hiring")
    ps = ctx.prompts("gender", templates=[0, 2], names="heldout")
    s = neuron_scores(tiny, ps)
    assert s.shape == (2, tiny.cfg.n_layers, tiny.cfg.d_mlp) and (s >= 0).all()
    h = head_scores(tiny, ps)
    assert h.shape == (2, tiny.cfg.n_layers, tiny.cfg.n_heads) and ((h >= 0) & (h <= 2.0 + 1e-6)).all()
    p = next(p for p in ps if p.person.name == "D'Andre") if any(p.person.name == "D'Andre" for p in ps) else ps.items[0]
    pos = name_positions(tiny, p, ctx.templates[p.template])
    toks = tiny.to_str_tokens(p.text)
    assert "".join(toks[i] for i in pos).replace(" ", "") == p.person.name * ctx.templates[p.template].count("{name}")


def test_head_selection_and_random_control(tiny):
    cfg = PruneConfig(unit="head", k=3, common=None, head_mode="z")
    iv = Pruning(cfg)(tiny, load_context("finance"), "race")
    assert iv.n_components == 3 and iv.mode == "z"
    rnd = iv.random_like(tiny, seed=1)
    assert sorted(len(v) for v in rnd.heads.values()) == sorted(len(v) for v in iv.heads.values())


def test_selected_pruning_beats_random_on_a_planted_model(planted_tiny):
    model, cfg = planted_tiny
    truth = set(cfg.shared) | set(cfg.only["finance"])
    pc = PruneConfig(unit="neuron", k=6, score="signed_attribution", select="difference")
    cand = candidates(model, load_context("finance"), "race", pc)
    assert len(set(cand.items[:6]) & truth) >= 3
    tm = transfer_matrix(model, Pruning(pc), ["finance", "hiring"], "race", n_random=3, n_boot=300)
    for c in tm.cells:
        assert c["reduction_ci_low"] > 0.3, c  # the planted gap is largely removed everywhere (shared neurons)
        assert abs(c["random_reduction"]) < 0.15, c
    assert tm.matrix().shape == (2, 2) and tm.plot().axes


def test_levels_and_curves(planted_tiny):
    model, _cfg = planted_tiny
    pc = PruneConfig(unit="neuron", k=6, score="signed_attribution", select="difference")
    lv = generalization_levels(model, ["finance", "commerce"], "race", pc, n_random=1, max_l0_templates=2, n_boot=200)
    # every level is evaluated on the same prompts: each L0 template with held-out names
    assert {(r["context"], r["level"]) for r in lv.rows} == {(c, lvl) for c in ("finance", "commerce")
                                                             for lvl in ("L0", "L1", "L2")}
    by = {(r["context"], r["level"], r["template"]): r for r in lv.rows}
    for (c, _lvl, t), r in by.items():
        assert r["gap_before"] == by[(c, "L0", t)]["gap_before"]  # same prompts, same baseline
    assert {t["comparison"] for t in lv.tests} == {"L0 - L1 (bias removed)", "L0 - L2 (bias removed)",
                                                   "L1 - L2 (bias removed)"}
    for t in lv.tests:
        assert t["ci_low"] <= t["estimate"] <= t["ci_high"] and t["min_detectable"] > 0 and "p_adjusted" in t
    curve = pruning_curve(model, "finance", "race", pc, [1, 3, 6], n_boot=200)
    removed = [r["gap_removed"] for r in curve.rows]
    assert removed[-1] > removed[0] + 0.3  # more planted neurons pruned, more of the planted gap removed
    assert lv.plot().axes and curve.plot().axes


def test_set_difference_union_and_common_voting_on_hand_made_scores(tiny, monkeypatch):
    """target="both" prunes Top_p(A) minus Top_q(B) together with Top_p(B) minus Top_q(A), ranked by |S_A - S_B|;
    with common=1.0 a unit must be chosen in every selection template. Scores are given by hand."""
    from mechbias.methods.pruning import ranking as sel_mod
    from mechbias.methods.pruning.scores import GroupStats

    ctx = load_context("finance")
    t_sel = ctx.template_split("selection")
    d = 10
    # per template: group A and group B scores of 10 "neurons" in one layer
    a = {t: torch.zeros(1, d, dtype=torch.float64) for t in t_sel}
    b = {t: torch.zeros(1, d, dtype=torch.float64) for t in t_sel}
    for t in t_sel:
        # distinct values (no ties for top-k): neurons 0, 1 score high for A, 2 and 9 for B
        a[t][0] = torch.tensor([9, 8, .11, .12, .13, .14, .15, .16, .17, .18], dtype=torch.float64)
        b[t][0] = torch.tensor([.1, .2, 9, .3, .4, .5, .6, .7, .8, 5], dtype=torch.float64)
    a[t_sel[0]][0, 1] = 0.105  # neuron 1 is A-specific in every template but the first
    stats = GroupStats()
    for t in t_sel:
        stats.add((t, 0), a[t], 1.0)
        stats.add((t, 1), b[t], 1.0)
    monkeypatch.setattr(sel_mod, "neuron_stats", lambda model, ps, method="activation": stats)
    monkeypatch.setattr(sel_mod, "_target_index", lambda *args: 0)

    both = candidates(tiny, ctx, "race", PruneConfig(unit="neuron", k=None, p=0.2, q=0.2, common=None))
    pooled_a = sum(a.values())[0] / len(t_sel)
    pooled_b = sum(b.values())[0] / len(t_sel)
    top_a = set(pooled_a.topk(2).indices.tolist())
    top_b = set(pooled_b.topk(2).indices.tolist())
    expected = (top_a - top_b) | (top_b - top_a)
    assert {i for _, i in both.items} == expected
    diffs = [abs(float(pooled_a[i] - pooled_b[i])) for _, i in both.items]
    assert diffs == sorted(diffs, reverse=True)

    voted = candidates(tiny, ctx, "race", PruneConfig(unit="neuron", k=None, p=0.2, q=0.2, common=1.0))
    per_template = []
    for t in t_sel:  # brute force: the two-sided set difference in each template, then the intersection
        ta, tb = set(a[t][0].topk(2).indices.tolist()), set(b[t][0].topk(2).indices.tolist())
        per_template.append((ta - tb) | (tb - ta))
    assert {i for _, i in voted.items} == set.intersection(*per_template)
    assert 1 in expected and 1 not in set.intersection(*per_template)  # the vote removed a pooled candidate
    one_sided = candidates(tiny, ctx, "race", PruneConfig(unit="neuron", k=None, p=0.2, q=0.2, common=None,
                                                        target="White"))
    assert {i for _, i in one_sided.items} == top_a - top_b


def test_greedy_selection_rescores_after_each_pruned_unit():
    """Hand-made scores where pruning (0, 0) silences (0, 1): greedy re-scoring takes (1, 0) second, while a
    one-shot ranking of the same first scores would take (0, 1)."""
    base = torch.tensor([[5.0, 4.0], [3.0, 1.0]])

    def score(chosen):
        s = base.clone()
        if (0, 0) in chosen:
            s[0, 1] = 0.0
        if (1, 0) in chosen:
            s[1, 1] = 9.0  # pruning (1, 0) hands its role to (1, 1)
        return s

    chosen, got = greedy_select(score, 3)
    assert chosen == [(0, 0), (1, 0), (1, 1)] and got == [5.0, 3.0, 9.0]
    assert greedy_select(score, 10)[0] == [(0, 0), (1, 0), (1, 1), (0, 1)]  # stops when every unit is chosen
    with pytest.raises(ValueError, match="greedy"):
        PruneConfig(unit="head", k=None).validate()
    with pytest.raises(ValueError, match="greedy"):
        PruneConfig(unit="neuron", select="greedy").validate()


def test_greedy_head_selection_on_a_model_matches_plain_query_zeroing(tiny):
    """The first greedy head is the one-shot top head; the second is the top head of scores computed with the
    first head's query zeroed by a plain hook (the paper's pruning: uniform attention)."""
    from mechbias.core.hooks import hooked
    from mechbias.core.sites import hook_name

    ctx = load_context("finance")
    cfg = PruneConfig(unit="head", k=2, common=None, head_mode="q")
    assert cfg.select == "greedy" and cfg.name_attention == "mean"
    cand = candidates(tiny, ctx, "race", cfg, templates=[0])
    ps = ctx.prompts("race", templates=[0], names="selection", seed=0)
    first = head_scores(tiny, ps)
    flat = int((first[0] + first[1]).flatten().argmax())
    h0 = (flat // tiny.cfg.n_heads, flat % tiny.cfg.n_heads)
    assert cand.items[0] == h0

    def zero_q(q, hook):
        q = q.clone()
        q[:, :, h0[1]] = 0.0
        return q

    with hooked(tiny, [(hook_name("q", h0[0]), zero_q)]):
        second = head_scores(tiny, ps)
    tot = (second[0] + second[1]).clone()
    tot[h0] = -float("inf")
    flat = int(tot.flatten().argmax())
    assert cand.items[1] == (flat // tiny.cfg.n_heads, flat % tiny.cfg.n_heads)
    assert cand.priority[1] == pytest.approx(float(tot.flatten()[flat]), rel=1e-5)


def test_wanda_chat_calibration_runs_on_the_chat_turn_and_a_sampled_reply(tiny):
    """``calibration="chat"`` (the paper's code): each prompt as a user turn in the chat template plus a
    sampled reply. The norms equal a brute force over those sequences from the hooks of a plain run; the
    sequences start with the template's rendering of the prompt and go on past it (the reply)."""
    from mechbias.eval.generation import chat_prompt
    from mechbias.methods.pruning.scores import calibration_mode, calibration_seqs

    ps = load_context("finance").prompts("race", templates=[0], names="selection")
    assert calibration_mode(tiny, "auto") == "prompt"  # the word tokenizer has no chat template
    with pytest.raises(ValueError, match="chat template"):
        input_norms(tiny, ps, calibration="chat")
    tok = tiny.tokenizer
    tok.chat_template = "{% for m in messages %}user : {{ m['content'] }} .{% endfor %} assistant :"
    try:
        assert calibration_mode(tiny, "auto") == "chat"
        seqs = calibration_seqs(tiny, ps, response_tokens=4, seed=0)
        norms = input_norms(tiny, ps, calibration="chat", response_tokens=4)
        for p, s in zip(ps, seqs, strict=True):
            head = chat_prompt(tiny, p.text)
            assert torch.equal(s[: len(head)], head) and len(head) < len(s) <= len(head) + 4
            assert tok.decode(head).endswith(". assistant :") and len(head) > len(tokenize(tiny, [p.text])[0])
        xs: dict[str, list] = {}
        for p, s in zip(ps, seqs, strict=True):
            if p.group != 0:
                continue
            _, cache = tiny.run_with_cache(s[None])
            for name, hook, _, _ in linear_layers(tiny):
                xs.setdefault(name, []).append(cache[hook][0].reshape(len(s), -1).double())
        for name, chunks in xs.items():
            assert torch.allclose(norms[0][name], torch.cat(chunks).pow(2).mean(0).sqrt().float(), rtol=1e-4)
        prompt_only = input_norms(tiny, ps, calibration="prompt")
        assert not torch.allclose(prompt_only[0][name], norms[0][name])
    finally:
        tok.chat_template = None
