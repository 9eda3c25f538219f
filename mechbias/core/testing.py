"""Small seeded random models for tests, built locally (no download): ``tiny_model`` and the word tokenizer.

``load_model("tiny")`` (also ``"tiny-llama"``, ``"tiny-native"``) builds one; this module registers those names
with :func:`mechbias.core.models.register_model` when mechbias is imported. The tiny models read a frozen base
vocabulary (``data/files/tiny_vocab.lst``), so their random weights stay the same as the data files grow.
"""

from __future__ import annotations

import hashlib
import re
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .embedded import atomic_dir, cache_dir
from .models import DATA_FILES, ensure_embedded_cache, register_model, set_model_label

_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
_MASKED_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


TINY_VOCAB = DATA_FILES / "tiny_vocab.lst"


def _base_words() -> list[str]:
    """The frozen base vocabulary of the tiny test models (``tiny_vocab.lst``), in its order."""
    return [w for w in TINY_VOCAB.read_text().splitlines() if w and not w.startswith("# ")]


def _builtin_words() -> list[str]:
    """Every word and punctuation mark in the built-in data files: the frozen base vocabulary first, in its
    order, then the words the data gained since, sorted."""
    base = _base_words()
    text = []
    for p in sorted(DATA_FILES.rglob("*")):
        if p.suffix in (".yaml", ".txt"):
            text.append(p.read_text())
    words = set(re.findall(r"\w+|[^\w\s]", "\n".join(text)))
    words.update(str(d) for d in range(10))
    return base + sorted(words - set(base))


def word_tokenizer(*, masked: bool = False, base_only: bool = False):
    """A word-level tokenizer covering the built-in data (cached on disk).

    Words are split on whitespace and punctuation. Causal (default): a BOS token is
    prepended. ``masked=True``: BERT's layout for masked LMs, ``[CLS] text [SEP]`` with a
    ``[MASK]`` token.
    """
    from transformers import AutoTokenizer

    words = _base_words() if base_only else _builtin_words()  # base_only: later words read as unknown
    key = hashlib.sha256("\n".join(words).encode()).hexdigest()[:12]
    target = cache_dir() / f"tiny-tokenizer-{'masked-' if masked else ''}{key}"

    def build(tmp: Path) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        specials = _MASKED_SPECIALS if masked else _SPECIALS
        vocab = {w: i for i, w in enumerate(specials + words)}
        unk = "[UNK]" if masked else "<unk>"
        tk = Tokenizer(models.WordLevel(vocab, unk_token=unk))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        if masked:
            tk.post_processor = processors.TemplateProcessing(
                single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
            )
            special: dict[str, Any] = dict(cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", pad_token="[PAD]",
                           unk_token=unk)
        else:
            tk.post_processor = processors.TemplateProcessing(
                single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)]
            )
            special = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token=unk,
                           add_bos_token=True)
        tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        fast = PreTrainedTokenizerFast(tokenizer_object=tk, **special)
        fast.save_pretrained(tmp)

    atomic_dir(target, build)
    return AutoTokenizer.from_pretrained(target, local_files_only=True)


def tiny_model(
    *,
    arch: str = "llama",
    seed: int = 0,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    tokenizer: str | Any = "words",
    init_range: float = 0.08,
):
    """A small random model with the real model's layout (RMSNorm, rotary, gated SiLU, GQA).

    Args:
        arch: ``"llama"`` (a random Hugging Face Llama wrapped by ``boot_transformers``; same adapter and
            KV-cache support as the embedded model) or ``"native"`` (``TransformerBridge.boot_native``;
            TransformerLens' own modules, with q/k/v/o biases and no KV cache).
        seed: seed of the random weights.
        n_layers: number of blocks.
        d_model: residual width.
        n_heads: attention heads per block.
        n_kv_heads: key/value heads (grouped-query attention).
        d_mlp: MLP width.
        tokenizer: ``"words"`` (word-level tokenizer over the built-in data's frozen base vocabulary,
            ``data/files/tiny_vocab.lst``: words the data gained later read as ``<unk>``), ``"smollm2"``
            (the embedded model's tokenizer; needs its cache), or a tokenizer object.
        init_range: standard deviation of the random weights.

    Returns:
        The model, in eval mode.
    """
    from transformer_lens import TransformerBridge
    from transformers import AutoTokenizer

    if tokenizer == "words":
        # the frozen base vocabulary: a tiny model stays the same model when the data gains words (they read as
        # <unk> here); the model families' tiny models use the whole vocabulary
        tok = word_tokenizer(base_only=True)
    elif tokenizer == "smollm2":
        tok = AutoTokenizer.from_pretrained(ensure_embedded_cache(), local_files_only=True)
    else:
        tok = tokenizer
    vocab = len(tok)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp,
            num_hidden_layers=n_layers, num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads, max_position_embeddings=256,
            rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,  # type: ignore[call-arg]
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, initializer_range=init_range,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            hf = LlamaForCausalLM(cfg)
        hf.eval()
        model = TransformerBridge.boot_transformers("tiny-llama", hf_model=hf, tokenizer=tok, device="cpu")
    elif arch == "native":
        native_cfg = dict(
            d_model=d_model, d_head=d_model // n_heads, n_heads=n_heads,
            n_key_value_heads=n_kv_heads, n_layers=n_layers, n_ctx=256, d_mlp=d_mlp,
            d_vocab=vocab, act_fn="silu", normalization_type="RMS",
            positional_embedding_type="rotary", gated_mlp=True, seed=seed,
        )
        model = TransformerBridge.boot_native(native_cfg, tokenizer=tok, device="cpu")
    else:
        raise ValueError(f"Unknown tiny-model arch {arch!r}; use 'llama' or 'native'.")
    model.eval()
    set_model_label(model, f"tiny-{arch}-seed{seed}")
    return model


def _load_tiny(arch: str, *, device=None, dtype=None):
    """The ``load_model`` entry of a tiny model (built on the CPU in float32; ``device``/``dtype`` move it)."""
    model = tiny_model(arch=arch)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


for _name, _arch in (("tiny", "llama"), ("tiny-llama", "llama"), ("tiny-native", "native")):
    register_model(_name, partial(_load_tiny, _arch))
