"""Masked LMs in the IG² and GRADIEND papers' own setting (issue 13, item 2): tiny random BERT and RoBERTa
(their real ``transformers`` classes), every readout at a ``[MASK]`` token, against plain Hugging Face
references that share nothing with mechbias' paths: the HF model's logits at the mask, the IG² loop over
layers and steps with torch hooks on the HF intermediate (GELU) module, plain autograd of the masked-LM
loss, and pseudo-log-likelihood by masking one token per forward. Then ``mechbias ig2`` end to end on a
saved tiny BERT folder."""

import json
import subprocess
import sys

import pytest
import torch

from mechbias.core.families import FAMILIES, family_hf_model, family_model
from mechbias.core.hooks import n_active_hooks
from mechbias.core.runner import readout_ids, sequence_nll
from mechbias.data.contexts import load_context
from mechbias.data.prompts import single_token, tokenize
from mechbias.eval.metrics import contrast_scores
from mechbias.methods.gradiend import batch_gradient, param_set
from mechbias.methods.ig2 import demographic_units, ig2_prompt, run_ig2
from mechbias.methods.ig2.attribution import integration_points
from mechbias.methods.pruning.scores import head_scores, neuron_scores

MASKED = [f for f, v in FAMILIES.items() if v.kind == "masked"]
INTERMEDIATE = "{arch}.encoder.layer.{l}.intermediate"  # its output is GELU(x W_in + b): the paper's neuron


@pytest.fixture(scope="module", params=MASKED)
def mlm(request):
    name = request.param
    model = family_model(name, seed=0)
    before = n_active_hooks(model)
    yield name, model, family_hf_model(name, seed=0)[0]
    assert n_active_hooks(model) == before
    assert all(p.grad is None for p in model.parameters())


def _plain_ids(tok, text: str) -> tuple[torch.Tensor, int]:
    """The HF tokenizer's ids of ``text`` followed by its mask token, and the mask's index."""
    ids = torch.tensor(tok(f"{text} {tok.mask_token}")["input_ids"])
    return ids, int((ids == tok.mask_token_id).nonzero()[0])


def test_readout_inserts_one_mask_before_the_closing_token(mlm):
    _, model, _ = mlm
    tok = model.tokenizer
    seq = tokenize(model, ["the bank approved the loan"])[0]
    ids, at = readout_ids(model, seq)
    assert ids.tolist() == [*seq[:-1].tolist(), tok.mask_token_id, tok.sep_token_id]
    assert at == len(seq) - 1
    own = tokenize(model, [f"the {tok.mask_token} approved the loan"])[0]
    assert readout_ids(model, own) == (own, 2)  # a prompt's own mask is read where it stands
    with pytest.raises(ValueError, match="at most one mask"):
        readout_ids(model, tokenize(model, [f"{tok.mask_token} {tok.mask_token}"])[0])


def test_bias_metric_reads_the_mask(mlm, support):
    name, model, hf = mlm
    ps = load_context("finance").prompts("race", templates=[0, 1], names="selection")
    mine = contrast_scores(model, ps)
    p, n = single_token(model, ps.positive), single_token(model, ps.negative)
    ref = []
    for t in ps.texts[:16]:
        ids, at = _plain_ids(model.tokenizer, t)
        with torch.no_grad():
            lg = hf(ids[None]).logits[0, at].double()
        ref.append(lg[p] - lg[n])
    ref_t = torch.stack(ref)
    assert float((mine[:16] - ref_t).abs().max()) < 1e-4
    assert float(ref_t.std()) > 1e-3
    support(name, "bias metric", "exact (at [MASK])")


def _plain_ig2(hf, arch: str, ids, at, d1, d2, steps):
    """The paper's IG² on the plain HF model: per layer, the intermediate activation at the mask replaced by
    α·w̄ (one forward and backward per step), gap P(d1) - P(d2) at the mask, left Riemann sum."""
    L = hf.config.num_hidden_layers
    alphas, weights = integration_points(steps, "left")
    with torch.no_grad():
        seen = {}
        handles = [hf.get_submodule(INTERMEDIATE.format(arch=arch, l=l)).register_forward_hook(
            lambda mod, args, out, l=l: seen.__setitem__(l, out[0, at].clone())) for l in range(L)]
        try:
            hf(ids[None])
        finally:
            for h in handles:
                h.remove()
    attr = torch.zeros(L, seen[0].shape[-1], dtype=torch.float64)
    for l in range(L):
        for a, c in zip(alphas.tolist(), weights.tolist(), strict=True):
            leaf = (a * seen[l]).requires_grad_(True)

            def put(mod, args, out, leaf=leaf):
                out = out.clone()
                out[0, at] = leaf
                return out

            h = hf.get_submodule(INTERMEDIATE.format(arch=arch, l=l)).register_forward_hook(put)
            try:
                p = hf(ids[None]).logits[0, at].softmax(-1)
            finally:
                h.remove()
            (g,) = torch.autograd.grad(p[d1] - p[d2], leaf)
            attr[l] += c * (seen[l] * g).double()
    return attr


def test_ig2_at_the_mask_equals_the_plain_hf_loop(mlm, support):
    name, model, hf = mlm
    text = "The bank approved the loan application . Was the applicant White or Black ? The applicant was"
    d1, d2 = single_token(model, " White"), single_token(model, " Black")
    ids, at = _plain_ids(model.tokenizer, text)
    ref = _plain_ig2(hf, name, ids, at, d1, d2, steps=5)
    fast = ig2_prompt(model, tokenize(model, [text])[0], d1, d2, kind="prob", steps=5)
    assert float((fast.attr - ref).abs().max() / ref.abs().max()) < 1e-4
    assert float(ref.abs().max()) > 0
    # completeness: per layer the attributions sum to G(w̄) - G(0), up to the Riemann error of 5 steps
    assert float((fast.attr.sum(1) - (fast.g1 - fast.g0)).abs().max()) < 0.5 * float(fast.attr.abs().sum(1).max())
    support(name, "IG²", "exact (at [MASK])")


def test_ig2_units_on_a_masked_lm_record_the_exact_path(mlm):
    _, model, _ = mlm
    units = demographic_units("finance", "gender", outcomes="selection")[:2]
    res = run_ig2(model, units, steps=3)
    assert res.config["path"] == "exact"
    ref = run_ig2(model, units, steps=3, method="reference")
    assert torch.allclose(res.attributions, ref.attributions, rtol=1e-4, atol=1e-9)


def test_gradiend_masked_gradient_equals_plain_autograd(mlm, support):
    name, model, hf = mlm
    ps = param_set(model, "mlp")
    texts = ["The bank approved the loan", "Afterwards , the applicant said that"]
    targets = [single_token(model, " ."), single_token(model, " he")]
    mine = batch_gradient(model, ps, texts, targets)
    params = dict(hf.named_parameters())
    loss = 0
    for t, y in zip(texts, targets, strict=True):
        ids, at = _plain_ids(model.tokenizer, t)
        lg = hf(ids[None]).logits[0, at]
        loss = loss + torch.nn.functional.cross_entropy(lg[None], torch.tensor([y])) / len(texts)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True), strict=True))
    ref = torch.cat([grads[n].reshape(-1) for n in ps.names])
    assert float((mine - ref).norm() / ref.norm()) < 1e-5
    support(name, "GRADIEND gradients", "exact (at [MASK])")


def test_pseudo_perplexity_masks_one_token_at_a_time(mlm):
    _, model, hf = mlm
    texts = ["the bank approved the loan .", "Was the applicant White or Black ?"]
    total, count = sequence_nll(model, tokenize(model, texts), max_tokens=16)  # several chunks per text
    want, n = 0.0, 0
    tok = model.tokenizer
    for t in texts:
        ids = torch.tensor(tok(t)["input_ids"])
        for i in range(1, len(ids) - 1):  # every token but [CLS] and [SEP]
            x = ids.clone()
            x[i] = tok.mask_token_id
            with torch.no_grad():
                want -= float(hf(x[None]).logits[0, i].double().log_softmax(-1)[ids[i]])
            n += 1
    assert count == n
    assert total == pytest.approx(want, rel=1e-5)


def test_pruning_neuron_scores_on_a_masked_lm_and_head_scores_refused(mlm, support):
    """Neuron activation scores do not read a prediction position (mean over all positions), so they apply;
    head scores read the attention of the prediction position and are refused with the class named."""
    name, model, hf = mlm
    ps = load_context("finance").prompts("race", templates=[0], names="selection")
    outs = [hf.get_submodule(f"{name}.encoder.layer.{l}.output.dense") for l in range(model.cfg.n_layers)]
    sums = [0, 0]
    count = [0, 0]
    for p in ps:
        seen = {}
        handles = [d.register_forward_pre_hook(lambda mod, args, l=l, seen=seen: seen.__setitem__(l, args[0].detach()))
                   for l, d in enumerate(outs)]
        try:
            with torch.no_grad():
                hf(tokenize(model, [p.text])[0][None])
        finally:
            for h in handles:
                h.remove()
        g = int(p.group)
        sums[g] = sums[g] + torch.stack([seen[l][0].double().abs().mean(0) * outs[l].weight.double().norm(dim=0)
                                         for l in range(len(outs))])
        count[g] += 1
    mine = neuron_scores(model, ps)
    for g in (0, 1):
        assert torch.allclose(mine[g].double(), sums[g] / count[g], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=f"{FAMILIES[name].model}.*masked LM"):
        head_scores(model, ps)
    support(name, "neuron scores", "exact")


def test_cli_ig2_runs_end_to_end_on_a_tiny_bert_folder(tmp_path):
    hf, tok = family_hf_model("bert", seed=0)
    folder = tmp_path / "tiny-bert"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mechbias.apps.cli", "ig2", "--model", str(folder), "--select-on", "finance",
           "--axis", "race", "--out", str(out), "--pairs", "3", "--steps", "3", "--random", "1",
           "--controls", "random", "--boot", "50", "--verify-random", "1", "--no-plain-ig", "--threads", "1",
           "--neutral-texts", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    transfer = json.loads((out / "transfer" / "result.json").read_text())
    assert transfer["meta"]["model_class"] == "BertForMaskedLM" and "pseudo" in transfer["meta"]["readout"]
    cell = transfer["cells"][0]
    assert cell["gap_before"] != 0 and cell["ci_low"] <= cell["gap_change"] <= cell["ci_high"]
    ig2 = json.loads((out / "summary.json").read_text())
    assert ig2["selections"]["finance"]["n_components"] > 0


def test_pseudo_perplexity_under_bns_at_the_prediction_position(mlm):
    """BNS at "the prediction position" on a masked LM acts at the token being predicted: each token masked in
    turn with the neurons zeroed there only, against the plain HF model with a hook that zeroes the same
    intermediate neurons at that one position; and all-position BNS equals zeroing them everywhere."""
    from mechbias.eval.metrics import token_nll
    from mechbias.interventions.units import NeuronIntervention

    name, model, hf = mlm
    texts = ["the bank approved the loan ."]
    neurons = {0: [1, 5, 9], 1: [7, 30]}
    tok = model.tokenizer
    ids = torch.tensor(tok(texts[0])["input_ids"])

    def plain(where):
        total = 0.0
        for i in range(1, len(ids) - 1):
            x = ids.clone()
            x[i] = tok.mask_token_id
            handles = []
            for l, idx in neurons.items():
                def zero(mod, args, out, idx=idx, i=i):
                    out = out.clone()
                    if where == "last":
                        out[0, i, idx] = 0.0
                    else:
                        out[0, :, idx] = 0.0
                    return out
                handles.append(hf.get_submodule(INTERMEDIATE.format(arch=name, l=l)).register_forward_hook(zero))
            try:
                with torch.no_grad():
                    total -= float(hf(x[None]).logits[0, i].double().log_softmax(-1)[ids[i]])
            finally:
                for h in handles:
                    h.remove()
        return total

    base, n = token_nll(model, texts)
    for where in ("last", "all"):
        got, count = token_nll(model, texts, intervention=NeuronIntervention(neurons, positions=where))
        assert count == n == len(ids) - 2
        assert got == pytest.approx(plain(where), rel=1e-5)
        assert abs(got - base) > 1e-4
