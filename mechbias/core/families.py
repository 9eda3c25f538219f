"""Model families mechbias is tested on, as small random models with each family's real architecture class.

Every family is built from its ``transformers`` configuration class with its defaults (so the family's
own features stay on: GPT-2's ``Conv1D`` weights, GPT-NeoX's parallel attention + MLP, Qwen2's q/k/v
biases, Gemma 2's extra norms and logit soft-capping, Phi-3's fused projections, OLMo 2's q/k norms,
Mistral's sliding window, BERT/RoBERTa's bidirectional encoders) and only the sizes shrunk: 2 layers,
width 64, 4 heads. They load offline (no hub access) and run through ``TransformerBridge.boot_transformers``
exactly like a named model.

:func:`family_of` says which family a loaded model belongs to and whether it is a causal or a masked LM;
:func:`require_causal` is the one check every next-token method calls before it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .models import set_model_label
from .testing import word_tokenizer

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge


@dataclass(frozen=True)
class Family:
    """A model family of the support matrix: its transformers classes and what sets its layout apart."""
    name: str
    config: str          # transformers configuration class
    model: str           # transformers model class
    kind: str            # "causal" or "masked"
    features: str        # what makes it differ from the Llama layout
    extra: tuple = ()    # (key, value) pairs besides the shared small sizes


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("gpt2", "GPT2Config", "GPT2LMHeadModel", "causal", "Conv1D weights (transposed), learned positions, "
           "LayerNorm, GELU MLP", (("n_embd", 64), ("n_layer", 2), ("n_head", 4), ("n_positions", 256))),
    Family("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", "causal",
           "parallel attention + MLP (no resid_mid), fused qkv, partial rotary"),
    Family("llama", "LlamaConfig", "LlamaForCausalLM", "causal", "the reference layout (SmolLM2's)",
           (("num_key_value_heads", 2),)),
    Family("mistral", "MistralConfig", "MistralForCausalLM", "causal", "sliding-window attention, GQA",
           (("num_key_value_heads", 2),)),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "causal", "q/k/v biases, GQA",
           (("num_key_value_heads", 2),)),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", "causal", "pre+post norms, logit and attention "
           "soft-capping, scaled embeddings", (("num_key_value_heads", 2), ("head_dim", 16),
                                               ("query_pre_attn_scalar", 16))),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", "causal", "fused qkv and gate_up projections",
           (("num_key_value_heads", 2), ("pad_token_id", 0))),
    Family("olmo2", "Olmo2Config", "Olmo2ForCausalLM", "causal", "post-norms, q/k norms",
           (("num_key_value_heads", 2),)),
    Family("bert", "BertConfig", "BertForMaskedLM", "masked", "bidirectional encoder, masked-LM head"),
    Family("roberta", "RobertaConfig", "RobertaForMaskedLM", "masked", "bidirectional encoder, masked-LM head",
           (("max_position_embeddings", 258), ("pad_token_id", 0))),
)}

_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "max_position_embeddings": 256}


def family_hf_model(name: str, *, seed: int = 0, tokenizer=None, init_range: float = 0.08,
                    dtype: torch.dtype | None = None):
    """The plain Hugging Face model of :func:`family_model` (same weights for the same seed, initialised in
    float32 and then cast to ``dtype``) and its tokenizer."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    fam = FAMILIES[name]
    tok = tokenizer if tokenizer is not None else word_tokenizer(masked=fam.kind == "masked")
    kw: dict[str, Any] = {} if name == "gpt2" else dict(_SMALL)
    kw.update(dict(fam.extra))
    kw.update(vocab_size=len(tok), initializer_range=init_range)
    if fam.kind == "causal":
        kw.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    import transformers  # imported when a model is built: `import mechbias` stays light

    cfg = getattr(transformers, fam.config)(**kw)
    cfg.architectures = [fam.model]  # the bridge picks its adapter from this
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = getattr(transformers, fam.model)(cfg)
    if dtype is not None:
        hf = hf.to(dtype)
    return hf.eval(), tok


def family_model(name: str, *, seed: int = 0, tokenizer=None, init_range: float = 0.08,
                 dtype: torch.dtype | None = None):
    """A small random model of family ``name`` (see :data:`FAMILIES`) as a ``TransformerBridge``."""
    from transformer_lens import TransformerBridge  # imported when a model is built (a light `import mechbias`)

    hf, tok = family_hf_model(name, seed=seed, tokenizer=tokenizer, init_range=init_range, dtype=dtype)
    model = TransformerBridge.boot_transformers(f"tiny-{name}", hf_model=hf, tokenizer=tok, device="cpu",
                                                dtype=dtype or torch.float32)
    model.eval()
    set_model_label(model, f"tiny-{name}-seed{seed}")
    return model


def family_of(model: TransformerBridge) -> Family | None:
    """The :data:`FAMILIES` entry whose model class the bridge wraps (None for an unlisted class)."""
    cls = type(getattr(model, "original_model", None)).__name__
    for fam in FAMILIES.values():
        if fam.model == cls:
            return fam
    return None


def model_class(model: TransformerBridge) -> str:
    """The class name of the model under the bridge (e.g. ``LlamaForCausalLM``)."""
    return type(getattr(model, "original_model", model)).__name__


def is_masked_lm(model: TransformerBridge) -> bool:
    """Whether the model is a masked LM (a ``...ForMaskedLM`` under the bridge)."""
    return model_class(model).endswith("ForMaskedLM")


def require_causal(model: TransformerBridge, what: str) -> None:
    """Refuse a masked LM before a method that has no masked-LM form (patching, AtP, head scores) runs."""
    if is_masked_lm(model):
        raise ValueError(
            f"{what} reads a prompt's last position, which needs a causal language model; "
            f"this model is {model_class(model)} (a masked LM: bidirectional, no next-token prediction). "
            "For masked LMs mechbias reads predictions at a [MASK] in the bias metric, IG², GRADIEND, "
            "pruning's neuron scores and Wanda, and scores CrowS-Pairs and StereoSet (mechbias card).")
