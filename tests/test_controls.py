"""Matched controls: the profile they match on equals brute-force measurements, and each draw matches what it
says it matches (size per layer, ablation cost, score quantiles), unlike a uniform draw."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from mechbias.core.params import linear_layers, named_params, w_out_row_norms
from mechbias.interventions.profile import unit_profile
from mechbias.interventions.units import HeadIntervention, NeuronIntervention
from mechbias.interventions.weights import WeightMask

TEXTS = ["The bank opened early today and the staff were ready for the morning .",
         "A short note about the weather , the river and the market ."]


@pytest.fixture(scope="module")
def profile(tiny):
    return unit_profile(tiny, TEXTS)


def test_profile_equals_brute_force(tiny, profile):
    L, H = tiny.cfg.n_layers, tiny.cfg.n_heads
    act = torch.zeros(L, tiny.cfg.d_mlp, dtype=torch.float64)
    heads = torch.zeros(L, H, dtype=torch.float64)
    sq = {}
    n = 0
    params = named_params(tiny)
    for t in TEXTS:  # one text at a time, from the plain cache
        ids = tiny.to_tokens(t)
        _, cache = tiny.run_with_cache(ids)
        n += ids.shape[1]
        for l in range(L):
            act[l] += cache[f"blocks.{l}.mlp.hook_post"][0].abs().sum(0).double()
            z = cache[f"blocks.{l}.attn.hook_z"][0]  # [pos, H, d_head]
            w_o = params[f"model.layers.{l}.self_attn.o_proj.weight"]  # [d_model, H * d_head]
            for h in range(H):
                out = z[:, h] @ w_o[:, h * tiny.cfg.d_head:(h + 1) * tiny.cfg.d_head].T
                heads[l, h] += out.norm(dim=-1).sum().double()
        for name, hook, _, _ in linear_layers(tiny):
            x = cache[hook][0].reshape(ids.shape[1], -1).double()
            sq[name] = sq.get(name, 0) + (x ** 2).sum(0)
    mag = act / n * torch.stack([w_out_row_norms(tiny, l).double() for l in range(L)])
    assert torch.allclose(profile.neuron_magnitude.double(), mag, rtol=1e-4, atol=1e-7)
    assert torch.allclose(profile.head_norm.double(), heads / n, rtol=1e-4, atol=1e-7)
    for name, v in sq.items():
        assert torch.allclose(profile.input_norms[name].double(), (v / n).sqrt(), rtol=1e-4, atol=1e-7)


def test_neuron_controls_match_magnitude_and_cost(tiny, profile):
    mag = profile.neuron_magnitude
    top = {l: [int(i) for i in mag[l].argsort(descending=True)[:4]] for l in range(tiny.cfg.n_layers)}
    iv = NeuronIntervention(top)  # the largest neurons of each layer: what a uniform draw cannot match
    ctl = iv.controls(tiny, 3, seed=0, profile=profile, kinds=("random", "matched", "matched_cost"))
    assert {"random", "matched", "matched_cost"} <= set(ctl) and len(ctl["matched"]) == 3
    logm = np.log(mag.double().numpy())

    def gap(draw):  # mean |log magnitude difference| to the selection, per layer
        return np.mean([abs(logm[l, sorted(draw.neurons[l])] - logm[l, sorted(top[l])]).mean()
                        for l in top])

    # matched within a caliper of 0.2 SD of the layer's log magnitudes (issue 33: the hub's "matched" pool once
    # ranged 12-198 around its 93); a unit with none inside the caliper is unmatched and kept as itself
    info = ctl["matched"][0].match_info
    unmatched = {tuple(u) for u in info["unmatched"]}
    sel_logs, ctl_logs = [], []
    for d in ctl["matched"]:
        assert {l: len(v) for l, v in d.neurons.items()} == {l: 4 for l in top}
        for l, idx in d.neurons.items():
            cal = 0.2 * logm[l].std()
            assert info["caliper_log"][str(l)] == pytest.approx(cal)
            kept = {i for (ll, i) in unmatched if ll == l}
            assert set(idx) & set(top[l]) == kept  # unmatched units are kept as themselves, nothing else selected
            for i in kept:  # and no unselected unit lies inside their caliper
                assert np.abs(np.delete(logm[l], top[l]) - logm[l, i]).min() > cal
            matched = [i for i in top[l] if i not in kept]
            for j in set(idx) - kept:  # each drawn unit lies inside the caliper of a matched selected unit
                assert min(abs(logm[l, j] - logm[l, i]) for i in matched) <= cal + 1e-12
            sel_logs += [logm[l, i] / logm[l].std() for i in matched]
            ctl_logs += [logm[l, j] / logm[l].std() for j in set(idx) - kept]
    smd = np.mean(sel_logs) - np.mean(ctl_logs)  # in SDs of each layer's log magnitudes
    assert info["balance_smd"] == pytest.approx(smd) and abs(smd) <= 0.2 + 1e-12
    assert info["n_matched_units"] == 4 * len(top) - len(unmatched)
    if unmatched:
        assert ctl["unmatched_only"][0].as_pairs() == sorted(unmatched)
    assert max(gap(d) for d in ctl["matched"]) < min(gap(d) for d in ctl["random"])
    _check_cost_match(tiny, profile, top, ctl["matched_cost"])


def _check_cost_match(model, profile, top, draws):
    """Brute force: each drawn neuron is one of the 8 unselected neurons closest in log magnitude to a selected
    neuron of its layer and lies within the caliper (0.2 SD of those candidates' costs) of its cost; a selected
    neuron with no candidate inside the caliper is unmatched and enters every draw as itself."""
    logm = np.log(profile.neuron_magnitude.double().numpy())
    pools = {(l, i): [int(x) for x in np.argsort(np.abs(logm[l] - logm[l, i]), kind="stable")
                      if int(x) not in top[l]][:8] for l in top for i in top[l]}
    cost = {(l, j): profile.neuron_cost(model, l, j) for (l, i), pool in pools.items() for j in [i, *pool]}
    cand = sorted({(l, j) for (l, _), pool in pools.items() for j in pool})
    cal = 0.2 * np.std([cost[c] for c in cand])
    unmatched = {(l, i) for (l, i), pool in pools.items() if min(abs(cost[(l, j)] - cost[(l, i)]) for j in pool) > cal}
    info = draws[0].match_info
    assert info["caliper_log"] == pytest.approx(cal)
    assert {tuple(u) for u in info["unmatched"]} == unmatched
    sel_z, ctl_z = [], []
    crowded = 0
    for d in draws:
        assert d.match_info is info and {l: len(v) for l, v in d.neurons.items()} == {l: len(top[l]) for l in top}
        for l, idx in d.neurons.items():
            kept = [i for i in top[l] if i in idx]
            assert {i for i in top[l] if (l, i) in unmatched} <= set(kept)  # unmatched neurons kept as themselves
            crowded += len(kept) - sum((l, i) in unmatched for i in top[l])
            matched, drawn = [i for i in top[l] if i not in kept], [j for j in idx if j not in top[l]]
            # a perfect matching of the matched neurons to the drawn ones exists along the allowed edges
            allowed = np.array([[j in pools[(l, i)] and abs(cost[(l, j)] - cost[(l, i)]) <= cal + 1e-12
                                 for j in drawn] for i in matched], dtype=bool).reshape(len(matched), len(drawn))
            rows, cols = linear_sum_assignment(~allowed)
            assert allowed[rows, cols].sum() == len(matched) == len(drawn)
            sel_z += [cost[(l, i)] for i in matched]
            ctl_z += [cost[(l, j)] for j in drawn]
    sd = np.std([cost[c] for c in cand])
    assert info["balance_smd"] == pytest.approx((np.mean(sel_z) - np.mean(ctl_z)) / sd)
    assert abs(info["balance_smd"]) <= 0.2 + 1e-12
    assert info["kept_for_want_of_a_free_match"] == crowded
    return unmatched


def test_cost_matched_control_keeps_a_planted_hub_as_itself(tiny):
    """A selected neuron whose ablation costs far more than any candidate (the embedded model's hub costs +5.24
    perplexity against its neighbours' -0.10 to +0.76) is unmatched and kept as itself in every draw, and
    listed; the other neurons are matched within the caliper, in several draws that differ."""
    prof = unit_profile(tiny, TEXTS)
    mag = prof.neuron_magnitude
    top = {l: [int(i) for i in mag[l].argsort(descending=True)[:3]] for l in range(tiny.cfg.n_layers)}
    hub = (1, top[1][0])
    prof.neuron_costs[hub] = prof.neuron_cost(tiny, *hub) + 1e3  # planted: the cache is what matching reads
    draws = NeuronIntervention(top).controls(tiny, 4, seed=0, profile=prof, kinds=("matched_cost",))["matched_cost"]
    unmatched = _check_cost_match(tiny, prof, top, draws)
    assert hub in unmatched and len(draws) == 4
    assert len({tuple(sorted(d.as_pairs())) for d in draws}) > 1  # the draws are random within the caliper


def test_neuron_cost_is_a_perplexity_change(tiny, profile):
    from mechbias.eval.metrics import perplexity

    got = profile.neuron_cost(tiny, 1, 7)
    base = perplexity(tiny, TEXTS)
    ref = perplexity(tiny, TEXTS, intervention=NeuronIntervention({1: [7]})) - base
    # a difference of two float32 perplexities of a random model (about the vocabulary's size): its rounding
    # scales with the perplexity, not with the difference
    assert got == pytest.approx(ref, rel=1e-5, abs=2e-6 * base)


def test_head_and_weight_controls_match_their_sizes(tiny, profile):
    import dataclasses

    from mechbias.interventions.profile import CALIPER_SD

    hn = profile.head_norm.clone()
    hn[1, 0] = hn.max() * 1000  # a hub head: nothing lies within the caliper of it
    prof = dataclasses.replace(profile, head_norm=hn)
    logs = np.log(hn.double().numpy())
    caliper = CALIPER_SD * logs.std()
    sel = [(0, int(hn[0].argmax())), (1, 0), (1, int(hn[1, 1:].argmin()) + 1)]
    iv = HeadIntervention({l: [h] for l, h in sel[:1]} | {1: [sel[1][1], sel[2][1]]}, mode="z")
    draws = iv.controls(tiny, 3, seed=1, profile=prof, kinds=("matched",))["matched"]
    info = draws[0].match_info
    assert info["unmatched"] == [[1, 0]] and abs(info["balance_smd"]) <= CALIPER_SD + 1e-12
    free = [(l, h) for l in range(hn.shape[0]) for h in range(hn.shape[1]) if (l, h) not in sel]
    for d in draws:
        got = set(d.as_pairs())
        assert (1, 0) in got and len(got) == 3  # the hub enters as itself; the others are replaced
        for l, h in [s for s in sel if s != (1, 0)]:
            inside = [u for u in free if abs(logs[u] - logs[l, h]) <= caliper]
            same = [u for u in inside if u[0] == l]
            pool = sorted(same or inside, key=lambda u: abs(logs[u] - logs[l, h]))
            assert got & set(pool[:3]), (l, h)  # among the closest within the caliper (own layer first)
        assert all(u in free or u == (1, 0) for u in got)
    name = "model.layers.1.mlp.down_proj.weight"
    w = named_params(tiny)[name].detach().abs()
    score = (w * profile.input_norms[name][None, :]).flatten()
    sel = score.argsort(descending=True)[:50]  # the 50 highest-scoring weights
    mask = WeightMask({name: sel})
    drawn = mask.controls(tiny, 1, seed=2, profile=profile, kinds=("random", "matched"))
    edges = np.quantile(score.numpy(), np.linspace(0, 1, 21)[1:-1])

    def bins(idx):
        return sorted(np.searchsorted(edges, score.numpy()[idx.numpy()]).tolist())

    assert bins(drawn["matched"][0].masks[name]) == bins(sel)
    assert bins(drawn["random"][0].masks[name]) != bins(sel)
    assert not set(drawn["matched"][0].masks[name].tolist()) & set(sel.tolist())
