"""Every method on every model family (issue 13): small random models with each family's real architecture
class, each method's result against a plain reference that does not use mechbias' fast paths (the Hugging
Face model itself, TransformerLens' patching helpers, plain autograd, the plain IG² loop, a plain weight
edit). Masked LMs read every prediction at a [MASK] (tests/test_masked.py); the methods that need a causal
model (patching, AtP, head scores) refuse them with an error naming the model class.

Each test records its outcome with the ``support`` fixture (family x method: which path ran); with
``MECHBIAS_SUPPORT_OUT`` set, the session writes it there as JSON when it ends, and
``analyses/support_matrix.py`` renders the models page's
table from it."""

import pytest
import torch
from transformer_lens import patching as tlp

from mechbias.core.answer_columns import calls as answer_calls
from mechbias.core.families import FAMILIES, family_hf_model, family_model, family_of, is_masked_lm
from mechbias.core.fastpath import fast_path_status
from mechbias.core.hooks import n_active_hooks
from mechbias.core.models import supports_kv_cache
from mechbias.core.params import block_component, linear_layers, named_params
from mechbias.core.sites import LINEAR_COMPONENTS, Site
from mechbias.data.contexts import load_context
from mechbias.data.pairs import make_pairs
from mechbias.data.prompts import tokenize
from mechbias.eval.metrics import contrast_scores
from mechbias.interventions.base import maybe_apply
from mechbias.interventions.units import HeadIntervention, NeuronIntervention
from mechbias.methods.gradiend import batch_gradient, param_set
from mechbias.methods.ig2 import ig2_prompt
from mechbias.methods.patching import attribution_patch, patch_sweep, run_variants
from mechbias.methods.pruning.scores import head_scores, input_norms, name_positions, neuron_scores

CAUSAL = [f for f, v in FAMILIES.items() if v.kind == "causal"]
MASKED = [f for f, v in FAMILIES.items() if v.kind == "masked"]

# the Hugging Face module that takes an MLP's hidden neurons (for the plain weight-edit reference)
DOWN = {"gpt2": "transformer.h.{l}.mlp.c_proj", "gpt_neox": "gpt_neox.layers.{l}.mlp.dense_4h_to_h",
        "bert": "bert.encoder.layer.{l}.output.dense", "roberta": "roberta.encoder.layer.{l}.output.dense"}
DOWN_DEFAULT = "model.layers.{l}.mlp.down_proj"
# Phi-3 fuses gate and up projections into one matrix (gate first, as its forward's chunk(2) reads it)
FUSED = {"phi3": {"gate": ("gate_up_proj.weight", 0), "in": ("gate_up_proj.weight", 1)}}
TEXT = "The bank approved the loan application . Was the applicant White or Black ? The applicant was"



@pytest.fixture(scope="module", params=list(FAMILIES))
def any_model(request):
    return request.param, family_model(request.param, seed=0)


@pytest.fixture
def anyfam(any_model):
    """Any family's model (masked LMs included); after the test, no hook of ours is left on it (the BERT
    adapter keeps 4 hooks of its own from boot)."""
    before = n_active_hooks(any_model[1])
    yield any_model
    assert n_active_hooks(any_model[1]) == before


@pytest.fixture(scope="module", params=CAUSAL)
def causal_model(request):
    return request.param, family_model(request.param, seed=0)


@pytest.fixture
def fam(causal_model):
    """A causal family model; after the test, no hook is left on it and no parameter holds a gradient."""
    yield causal_model
    model = causal_model[1]
    assert n_active_hooks(model) == 0
    assert all(p.grad is None for p in model.parameters())


def _plain(name):
    """An independent plain Hugging Face model with the same weights (no bridge, no hooks)."""
    return family_hf_model(name, seed=0)[0]




def _hf_last_logits(hf, model, text: str) -> torch.Tensor:
    ids = tokenize(model, [text])[0][None]
    with torch.no_grad():
        return hf(ids).logits[0, -1].double()


def test_family_builds_with_its_real_class_and_matches_hf(anyfam):
    name, model = anyfam
    assert family_of(model) is FAMILIES[name]
    assert type(model.original_model).__name__ == FAMILIES[name].model
    ids = tokenize(model, [TEXT])[0][None]
    with torch.no_grad():
        assert torch.allclose(model(ids), _plain(name)(ids).logits, atol=1e-5)
    assert is_masked_lm(model) == (FAMILIES[name].kind == "masked")


def test_bias_metric_equals_the_hf_forward(fam, support):
    name, model = fam
    ps = load_context("finance").prompts("race", templates=[0, 1], names="selection")
    mine = contrast_scores(model, ps)
    p, n = (model.to_single_token(w) for w in (ps.positive, ps.negative))
    hf = _plain(name)
    ref = torch.stack([(lambda lg: lg[p] - lg[n])(_hf_last_logits(hf, model, t)) for t in ps.texts[:24]])
    assert float((mine[:24] - ref).abs().max()) < 1e-4
    assert float(ref.std()) > 0
    # the score reads two answer columns, and only those were unembedded on every causal family
    assert fast_path_status(model).answer_columns["path"] == "fast", fast_path_status(model).answer_columns
    before = answer_calls()
    contrast_scores(model, ps)
    assert answer_calls() > before
    support(name, "bias metric", "fast (shared KV prefix)" if supports_kv_cache(model) else "exact (full sequences)")


def test_ig2_fast_path_equals_the_plain_loop(fam, support):
    name, model = fam
    toks = model.to_tokens(TEXT)[0]
    d1, d2 = model.to_single_token(" White"), model.to_single_token(" Black")
    ref = ig2_prompt(model, toks, d1, d2, kind="logit", steps=8, method="reference")
    fast = ig2_prompt(model, toks, d1, d2, kind="logit", steps=8, method="fast")
    assert float((fast.attr - ref.attr).abs().max() / ref.attr.abs().max()) < 1e-5
    assert fast.g1 == pytest.approx(ref.g1, rel=1e-4, abs=1e-5)
    support(name, "IG²", "fast (shared KV prefix)" if supports_kv_cache(model) else "fast (full sequences)")


@pytest.mark.parametrize("component", ["resid_pre", "mlp_out", "attn_out", "heads"])
def test_patching_sweeps_equal_transformer_lens_helpers(fam, component, support):
    name, model = fam
    helper = {"resid_pre": tlp.get_act_patch_resid_pre, "mlp_out": tlp.get_act_patch_mlp_out,
              "attn_out": tlp.get_act_patch_attn_out, "heads": tlp.get_act_patch_attn_head_out_all_pos}[component]
    pairs = make_pairs(model, "finance", "race", templates=[0], max_pairs=3)
    L = len(pairs.clean_tokens[0])
    keep = [i for i in range(len(pairs)) if len(pairs.clean_tokens[i]) == L]
    clean = torch.stack([pairs.clean_tokens[i] for i in keep])
    corr = torch.stack([pairs.corrupt_tokens[i] for i in keep])
    y, n = model.to_single_token(pairs.positive), model.to_single_token(pairs.negative)
    _, cache = model.run_with_cache(clean)
    ref = helper(model, corr, cache, lambda lg: (lg[:, -1, y] - lg[:, -1, n]).mean()).double()
    sub = type(pairs)(pairs.context, pairs.axis, pairs.positive, pairs.negative, [pairs.clean[i] for i in keep],
                      [pairs.corrupt[i] for i in keep], [pairs.clean_tokens[i] for i in keep],
                      [pairs.corrupt_tokens[i] for i in keep])
    mine = torch.nanmean(patch_sweep(model, sub, component, direction="denoise").values, 0)
    assert mine.shape == ref.shape
    assert float((mine - ref).abs().max()) < 1e-4
    assert float(ref.std()) > 0
    support(name, f"patching {component}", "fast (KV cache)" if supports_kv_cache(model) else "exact")


def test_neuron_ablation_equals_a_plain_weight_edit(anyfam, support):
    name, model = anyfam
    neurons = {0: [3, 17, 40], 1: [5, 99]}
    hf = _plain(name)
    for l, idx in neurons.items():
        mod = hf.get_submodule(DOWN.get(name, DOWN_DEFAULT).format(l=l))
        with torch.no_grad():
            if type(mod).__name__ == "Conv1D":  # weight [d_mlp, d_model]
                mod.weight[idx, :] = 0
            else:                               # nn.Linear weight [d_model, d_mlp]
                mod.weight[:, idx] = 0
    ids = tokenize(model, [TEXT])[0][None]
    with torch.no_grad():
        ref = hf(ids).logits
        with maybe_apply(NeuronIntervention(neurons, factor=0.0), model):
            mine = model(ids)
        base = model(ids)
    assert float((mine - ref).abs().max()) < 1e-4
    assert float((base - ref).abs().max()) > 1e-3  # the ablation changes the output ...
    assert torch.allclose(base, _plain(name)(ids).logits, atol=1e-5)  # ... and is removed after
    support(name, "neuron ablation", "hook")


def test_gradiend_gradient_equals_plain_autograd(fam, support):
    name, model = fam
    ps = param_set(model, "mlp")
    texts = ["The bank approved the loan", "Afterwards , the applicant said that"]
    targets = [model.to_single_token(" ."), model.to_single_token(" he")]
    mine = batch_gradient(model, ps, texts, targets)
    hf = _plain(name)
    params = dict(hf.named_parameters())
    loss = 0
    for t, y in zip(texts, targets, strict=True):
        lg = hf(tokenize(model, [t])[0][None]).logits[0, -1]
        loss = loss + torch.nn.functional.cross_entropy(lg[None], torch.tensor([y])) / len(texts)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True), strict=True))
    parts = []
    for n in ps.names:  # the bridge splits fused matrices; take the part from the fused HF gradient
        if n in grads:
            parts.append(grads[n])
            continue
        fused, k = FUSED[name][n.rsplit(".", 2)[-2]]
        g = grads[n.rsplit(".", 2)[0] + "." + fused]
        parts.append(g.chunk(2, dim=0)[k])
    ref = torch.cat([g.reshape(-1) for g in parts])
    assert float((mine - ref).norm() / ref.norm()) < 1e-5
    assert all(p.grad is None for p in model.parameters())
    support(name, "GRADIEND gradients", "exact")


@pytest.mark.parametrize("name", MASKED)
def test_masked_lms_are_refused_by_position_bound_methods(name, support):
    """Patching and AtP swap a name's tokens and read the last position; head scores read the attention of the
    last position: none of them has a masked-LM form yet, and each says so instead of answering."""
    model = family_model(name, seed=0)
    cls = FAMILIES[name].model
    ps = load_context("finance").prompts("race", templates=[0], names="selection")
    toks = model.to_tokens(TEXT)[0]
    calls = {
        "patching": lambda: run_variants(model, toks, toks, [(Site(0, "resid_pre", positions=(1,)),)],
                                         lambda lg: lg[:, 5]),
        "AtP": lambda: attribution_patch(model, make_pairs(model, "finance", "race", templates=[0], max_pairs=2)),
        "head scores": lambda: head_scores(model, ps),
    }
    for what, call in calls.items():
        with pytest.raises(ValueError, match=f"{cls}.*masked LM"):
            call()
        for m in ([f"patching {c}" for c in ("resid_pre", "mlp_out", "attn_out", "heads")] if what == "patching"
                  else [what]):
            support(name, m, "not applicable (masked LM)")


# the Hugging Face module that takes the attention heads' concatenated outputs
ATTN_OUT = {"gpt2": "transformer.h.{l}.attn.c_proj", "gpt_neox": "gpt_neox.layers.{l}.attention.dense",
            "bert": "bert.encoder.layer.{l}.attention.output.dense",
            "roberta": "roberta.encoder.layer.{l}.attention.output.dense"}
ATTN_OUT_DEFAULT = "model.layers.{l}.self_attn.o_proj"


def test_head_ablation_equals_a_plain_weight_edit(anyfam, support):
    name, model = anyfam
    heads = {0: [1], 1: [0, 3]}
    dh = model.cfg.d_head
    hf = _plain(name)
    for l, hs in heads.items():
        mod = hf.get_submodule(ATTN_OUT.get(name, ATTN_OUT_DEFAULT).format(l=l))
        idx = [h * dh + k for h in hs for k in range(dh)]
        with torch.no_grad():
            if type(mod).__name__ == "Conv1D":
                mod.weight[idx, :] = 0
            else:
                mod.weight[:, idx] = 0
    ids = tokenize(model, [TEXT])[0][None]
    with torch.no_grad():
        ref = hf(ids).logits
        with maybe_apply(HeadIntervention(heads, mode="z"), model):
            mine = model(ids)
        plain = model(ids)  # the hooks are gone: the unablated model differs from the edited reference
    assert float((mine - ref).abs().max()) < 1e-4
    assert float((plain - ref).abs().max()) > 1e-3
    support(name, "head ablation", "hook")


def test_wanda_input_norms_equal_the_inputs_of_the_weights_that_run(anyfam, support):
    """Wanda's linear layers cover every weight of every block's linear layers (counted in elements against the
    plain Hugging Face model, so no layer is silently missing, fused ones included), and each layer's ||X_j||
    equals the input its own torch module receives in the forward pass (a torch hook, not a bridge hook)."""
    name, model = anyfam
    layers = linear_layers(model)
    params = named_params(model)
    hf = _plain(name)
    blocks = [m for mn, m in hf.named_modules() if type(m).__name__ in ("Linear", "Conv1D")
              and any(f".{b}." in f".{mn}." for b in ("layers", "h", "layer"))]
    assert sum(params[n].numel() for n, _, _, _ in layers) == sum(m.weight.numel() for m in blocks)
    ps = load_context("finance").prompts("race", templates=[0], names="selection")
    mine = input_norms(model, ps)
    owners = {}
    for l in range(model.cfg.n_layers):
        for comp in LINEAR_COMPONENTS:
            mod = block_component(model, l, comp)
            lin = getattr(mod, "original_component", None) if mod is not None else None
            if lin is not None:
                owners[next(n for n, p in params.items() if p is lin.weight)] = lin
    assert set(owners) == {n for n, _, _, _ in layers}
    sums: dict = {}
    count = [0.0, 0.0]
    for text, g in zip(ps.texts, ps.groups.tolist(), strict=True):
        seen = {}
        handles = [m.register_forward_pre_hook(lambda mod, args, n=n, seen=seen: seen.__setitem__(n, args[0].detach()))
                   for n, m in owners.items()]
        ids = tokenize(model, [text])[0][None]
        try:
            with torch.no_grad():
                model(ids)
        finally:
            for h in handles:
                h.remove()
        assert set(seen) == set(owners), sorted(set(owners) - set(seen))  # every weight's module ran
        for n, x in seen.items():
            sums[(n, g)] = sums.get((n, g), 0) + (x.double() ** 2).reshape(-1, x.shape[-1]).sum(0)
        count[g] += ids.shape[1]
    for g in (0, 1):
        for n in owners:
            ref = (sums[(n, g)] / count[g]).sqrt().float()
            assert torch.allclose(mine[g][n], ref, rtol=1e-4, atol=1e-6), (n, g)
    support(name, "Wanda norms", "exact")


def test_atp_equals_a_central_finite_difference(fam, support):
    """AtP's estimate (gradient x activation difference) at one residual site equals the directional
    derivative of the plain forward along that difference (central finite difference)."""
    name, model = fam
    pairs = make_pairs(model, "finance", "race", templates=[0], max_pairs=2)
    atp = attribution_patch(model, pairs, components=("resid_pre",))
    i, l = 0, 1
    p = pairs.diff_positions(i)[-1]
    clean, corr = pairs.clean_tokens[i][None], pairs.corrupt_tokens[i][None]
    hook = f"blocks.{l}.hook_resid_pre"
    _, cc = model.run_with_cache(clean, names_filter=[hook])
    _, rc = model.run_with_cache(corr, names_filter=[hook])
    d = cc[hook][0, p] - rc[hook][0, p]
    y, n = model.to_single_token(pairs.positive), model.to_single_token(pairs.negative)

    def f(eps):
        def hk(x, hook):
            x = x.clone()
            x[0, p] = x[0, p] + eps * d
            return x

        with torch.no_grad(), model.hooks(fwd_hooks=[(hook, hk)]):
            lg = model(corr).double()
        return float(lg[0, -1, y] - lg[0, -1, n])

    fd = (f(0.01) - f(-0.01)) / 0.02
    assert float(atp.estimates["resid_pre"][i, l, p]) == pytest.approx(fd, rel=0.02, abs=1e-4)
    assert abs(fd) > 1e-3
    support(name, "AtP", "exact (one backward)")


def test_pruning_scores_equal_plain_hf_activations_and_attention(fam, support):
    """Neuron scores (mean |activation| x ||W_out row||) from torch hooks on the plain model's down projection,
    and head scores (attention from the last position to the name tokens, averaged over the name's tokens as
    the paper's code, or summed) from the plain model's own
    attention probabilities (eager attention, ``output_attentions``)."""
    name, model = fam
    ps = load_context("finance").prompts("race", templates=[0, 1], names="selection")
    hf = _plain(name)
    hf.set_attn_implementation("eager")
    ctx = load_context("finance")
    L = model.cfg.n_layers
    downs = [hf.get_submodule(DOWN.get(name, DOWN_DEFAULT).format(l=l)) for l in range(L)]
    w_norm = [(d.weight.norm(dim=1) if type(d).__name__ == "Conv1D" else d.weight.norm(dim=0)).double()
              for d in downs]
    n_sum = [0, 0]
    h_sum = [0, 0]
    hs_sum = [0, 0]
    count = [0, 0]
    for p in ps:
        seen = {}
        handles = [d.register_forward_pre_hook(lambda mod, args, l=l, seen=seen: seen.__setitem__(l, args[0].detach()))
                   for l, d in enumerate(downs)]
        try:
            with torch.no_grad():
                out = hf(tokenize(model, [p.text])[0][None], output_attentions=True)
        finally:
            for h in handles:
                h.remove()
        g = int(p.group)
        n_sum[g] = n_sum[g] + torch.stack([seen[l][0].double().abs().mean(0) * w_norm[l] for l in range(L)])
        pos = name_positions(model, p, ctx.templates[p.template])
        h_sum[g] = h_sum[g] + torch.stack([out.attentions[l][0, :, -1, pos].double().mean(-1) for l in range(L)])
        hs_sum[g] = hs_sum[g] + torch.stack([out.attentions[l][0, :, -1, pos].double().sum(-1) for l in range(L)])
        count[g] += 1
    mine_n, mine_h = neuron_scores(model, ps), head_scores(model, ps)
    mine_hs = head_scores(model, ps, reduce="sum")
    for g in (0, 1):
        assert torch.allclose(mine_n[g].double(), n_sum[g] / count[g], rtol=1e-4, atol=1e-6)
        assert torch.allclose(mine_h[g].double(), h_sum[g] / count[g], rtol=1e-4, atol=1e-6)
        assert torch.allclose(mine_hs[g].double(), hs_sum[g] / count[g], rtol=1e-4, atol=1e-6)
    assert float(mine_h.std()) > 0
    support(name, "neuron scores", "exact")
    support(name, "head scores", "exact")


def test_gradiend_edit_equals_a_plain_weight_edit(anyfam, support):
    """A GRADIEND edit (``θ + α·Δ`` on the MLP parameter set, as ``GradiendResult.edit_for`` builds it) on the
    bridge equals adding the same Δ to the plain Hugging Face model's weights (Phi-3: into the gate and up
    halves of its fused matrix), and leaves the weights bit for bit as they were afterwards."""
    from mechbias.interventions.weights import WeightEdit

    name, model = anyfam
    ps = param_set(model, "mlp")
    gen = torch.Generator().manual_seed(3)
    deltas = {n: torch.randn(s, generator=gen) * 0.05 for n, s in zip(ps.names, ps.shapes, strict=True)}
    ids = tokenize(model, [TEXT])[0][None]
    before = {n: p.detach().clone() for n, p in named_params(model).items()}
    hf = _plain(name)
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for n, d in deltas.items():
            if n in params:
                params[n] += 0.5 * d
                continue
            fused, k = FUSED[name][n.rsplit(".", 2)[-2]]
            params[n.rsplit(".", 2)[0] + "." + fused].chunk(2, dim=0)[k].add_(0.5 * d)
        ref = hf(ids).logits
        with WeightEdit(deltas, scale=0.5).apply(model):
            mine = model(ids)
        assert float((mine - ref).abs().max()) < 1e-4
        assert float((model(ids) - ref).abs().max()) > 1e-3  # the edit changed the output, and is undone
    assert all(torch.equal(p, before[n]) for n, p in named_params(model).items())
    support(name, "GRADIEND edits", "exact")


@pytest.mark.parametrize("kind", ["neurons", "heads q", "gradiend edit"])
def test_export_gives_the_hooked_logits(anyfam, kind, tmp_path, support):
    """``mechbias export`` on every family: the intervention folded into a transformers checkpoint (fused
    q/k/v and gate/up tensors rebuilt from the split layers the bridge computes with: GPT-2's Conv1D
    ``c_attn``, Phi-3's ``qkv_proj`` and ``gate_up_proj``, GPT-NeoX's per-head ``query_key_value``), reloaded
    with plain ``AutoModelForCausalLM`` (masked LMs: ``AutoModelForMaskedLM``), gives the hooked model's
    logits."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from mechbias.apps.export import export_model
    from mechbias.interventions.weights import WeightEdit

    name, model = anyfam
    ps = param_set(model, "mlp")
    gen = torch.Generator().manual_seed(5)
    iv = {"neurons": NeuronIntervention({0: [1, 5, 9], 1: [7, 30]}),
          "heads q": HeadIntervention({0: [0, 3], 1: [1]}, mode="q"),
          "gradiend edit": WeightEdit({n: torch.randn(s, generator=gen) * 0.05 for n, s in zip(ps.names, ps.shapes, strict=True)},
                                      scale=0.5)}[kind]
    ids = tokenize(model, [TEXT])[0][None]
    with torch.no_grad():
        base = model(ids)
        with iv.apply(model):
            hooked = model(ids)
    summary = export_model(model, iv, tmp_path / "m")
    auto = AutoModelForMaskedLM if is_masked_lm(model) else AutoModelForCausalLM
    hf = auto.from_pretrained(tmp_path / "m", local_files_only=True).eval()
    with torch.no_grad():
        plain = hf(ids).logits
    assert float((hooked - base).abs().max()) > 1e-3
    assert float((plain - hooked).abs().max()) < 5e-5 and summary["max_abs_logit_diff"] < 5e-5
    support(name, f"export ({kind})", "exact")
