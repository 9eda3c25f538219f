"""Masked-LM scoring of the benchmarks that define it (CrowS-Pairs' shared-token pseudo-log-likelihood,
StereoSet's masked filling) on a tiny random BERT under TransformerLens, against plain masked forward passes."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mechbias.apps.card import CardInputs, run_card
from mechbias.core.families import is_masked_lm
from mechbias.eval.bench import read_stereoset, stereoset_score
from mechbias.eval.bench.crowspairs import crows_bench
from mechbias.eval.loglik import masked_fill_logprob, shared_token_pll
from mechbias.interventions.base import maybe_apply
from mechbias.interventions.units import NeuronIntervention

DATA = Path(__file__).parent / "data"
WORDS = ["the", "a", "man", "woman", "he", "she", "doctor", "nurse", "is", "was", "good", "bad", "at", "work", ".", ",", "poor", "rich", "people", "are", "lazy", "smart", "chess", "player", "quiet", "loud", "every", "i", "know", "shy", "social", "my", "mother", "very", "caring", "strict", "manager", "harsh", "kind", "meeting"]


@pytest.fixture(scope="module")
def bert():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformer_lens import TransformerBridge
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    t.normalizer = normalizers.Lowercase()
    t.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                               ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = TransformerBridge.boot_transformers("google-bert/bert-base-uncased", hf_model=BertForMaskedLM(cfg).eval(),
                                                tokenizer=tok, device="cpu")
    return model.eval()


def _plain_masked(model, ids, positions, iv=None):
    """log P(original token) at each position, masking all ``positions`` in one forward."""
    x = ids.clone()
    x[positions] = model.tokenizer.mask_token_id
    with torch.no_grad(), maybe_apply(iv, model):
        lp = model(x[None])[0].double().log_softmax(-1)
    return [float(lp[p, ids[p]]) for p in positions]


def _ids(model, text):
    return torch.tensor(model.tokenizer(text)["input_ids"])


def test_the_bridge_is_a_masked_lm(bert, tiny):
    assert is_masked_lm(bert) and not is_masked_lm(tiny)


def test_crows_shared_token_pll_equals_masking_each_shared_token(bert):
    a, b = "the man is a good doctor .", "the woman is a good doctor ."
    ia, ib = _ids(bert, a), _ids(bert, b)
    # by hand: tokens 1 (the) and 3..7 (is a good doctor .) are shared; 2 (man / woman) is not
    want_a = sum(_plain_masked(bert, ia, [p])[0] for p in (1, 3, 4, 5, 6, 7))
    want_b = sum(_plain_masked(bert, ib, [p])[0] for p in (1, 3, 4, 5, 6, 7))
    got = shared_token_pll(bert, a, b)
    assert got == pytest.approx((want_a, want_b), abs=1e-5)
    # an inserted word: "very" appears in one sentence only and is not scored
    c = "the man is a very good doctor ."
    ic = _ids(bert, c)
    want_c = sum(_plain_masked(bert, ic, [p])[0] for p in (1, 2, 3, 4, 6, 7, 8))
    assert shared_token_pll(bert, c, a)[0] == pytest.approx(want_c, abs=1e-5)


def test_stereoset_masked_filling_equals_masking_the_filled_words(bert):
    ids = _ids(bert, "the chess player was quiet .")
    assert masked_fill_logprob(bert, "the chess player was BLANK .", "quiet") == pytest.approx(
        _plain_masked(bert, ids, [5])[0], abs=1e-5)
    ids = _ids(bert, "my mother is very caring and strict")  # "and" is unknown: still one token each
    two = _plain_masked(bert, ids, [5, 6, 7])
    assert masked_fill_logprob(bert, "my mother is very BLANK", "caring and strict") == pytest.approx(
        np.mean(two), abs=1e-5)


def test_masked_benchmarks_and_the_card(bert, tmp_path, caplog):
    iv = NeuronIntervention({0: list(range(0, 64, 2)), 1: list(range(1, 64, 2))})
    res = stereoset_score(bert, DATA / "bench" / "stereoset_small.json", intervention=iv, n_boot=100)
    ex = read_stereoset(DATA / "bench" / "stereoset_small.json")
    for use, col in ((None, "unmodified"), (iv, "intervention")):
        s, a = [], []
        for e in ex:
            for lab, dst in (("stereotype", s), ("anti-stereotype", a)):
                filled = _ids(bert, e[lab])
                rest = _ids(bert, e["context"].replace("BLANK", "").replace("  ", " "))
                pos = [i for i in range(len(filled)) if i >= len(rest) - 2 or filled[i] != rest[i]][:1]
                dst.append(np.mean(_plain_masked(bert, filled, pos, use)))
        assert getattr(res.row("SS"), col) == pytest.approx(100 * np.mean(np.array(s) > np.array(a)))
    assert "masked LM" in res.meta["score"]
    crows = crows_bench(bert, DATA / "crows_small.csv", n_boot=100)
    assert "shared tokens" in crows.meta["score"]
    with caplog.at_level("INFO", logger="mechbias"):  # progress lines go to the "mechbias" logger
        card = run_card(bert, iv, CardInputs(stereoset=DATA / "bench" / "stereoset_small.json",
                                             crows=DATA / "crows_small.csv"), tmp_path / "c", n_boot=100)
    assert [b.benchmark for b in card.benchmarks] == ["StereoSet", "CrowS-Pairs"]
    assert any("perplexity skipped" in r.getMessage() and r.name == "mechbias.apps.card" for r in caplog.records)
    with pytest.raises(ValueError, match="causal models only"):
        run_card(bert, iv, CardInputs(bbq=[DATA / "bench" / "bbq_small.jsonl"]), tmp_path / "d", n_boot=10)
