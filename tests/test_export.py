"""Export: a saved intervention folded into a transformers checkpoint gives the hooked model's logits."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mechbias.apps.cli import main
from mechbias.apps.export import export_model
from mechbias.core.params import named_params
from mechbias.data.prompts import tokenize
from mechbias.interventions.base import Compose, NotFoldable
from mechbias.interventions.units import HeadIntervention, NeuronIntervention
from mechbias.interventions.weights import WeightEdit, WeightMask
from mechbias.methods.steering import DirectionIntervention

TEXTS = ["the manager approved the loan for the client", "she paid the bill at the store and left"]


def _logits(model, intervention=None):
    from mechbias.interventions.base import maybe_apply

    ids = tokenize(model, TEXTS)
    with torch.no_grad(), maybe_apply(intervention, model):
        return [model(i[None]).float() for i in ids]


def _plain(folder, model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        return [hf(i[None]).logits.float() for i in tokenize(model, TEXTS)]


def _interventions(model):
    params = named_params(model)
    down = "model.layers.1.mlp.down_proj.weight"
    g = torch.Generator().manual_seed(0)
    return {
        "neurons": NeuronIntervention({0: [1, 5, 9], 1: [7, 30]}),
        "neurons x3": NeuronIntervention({1: [3, 4]}, factor=3.0),
        "heads z": HeadIntervention({0: [1], 1: [0, 2]}, mode="z"),
        "heads q": HeadIntervention({0: [0, 3]}, mode="q"),
        "weight mask": WeightMask({down: torch.arange(0, params[down].numel(), 3)}),
        "weight edit": WeightEdit({down: 0.2 * torch.randn(params[down].shape, generator=g)}, scale=-1.5),
        "compose": Compose([NeuronIntervention({0: [2]}), HeadIntervention({1: [1]})]),
    }


@pytest.mark.parametrize("kind", ["neurons", "neurons x3", "heads z", "heads q", "weight mask", "weight edit",
                                  "compose"])
def test_exported_llama_gives_the_hooked_logits(tiny, tmp_path, kind):
    iv = _interventions(tiny)[kind]
    before = {n: p.detach().clone() for n, p in named_params(tiny).items()}
    base, hooked = _logits(tiny), _logits(tiny, iv)
    summary = export_model(tiny, iv, tmp_path / "m")
    plain = _plain(tmp_path / "m", tiny)
    for b, h, p in zip(base, hooked, plain, strict=True):
        assert (h - b).abs().max() > 1e-3  # the intervention changes the model ...
        torch.testing.assert_close(p, h, atol=2e-5, rtol=0)  # ... and the checkpoint carries the change
    assert summary["max_abs_logit_diff"] < 2e-5
    assert all(torch.equal(p, before[n]) for n, p in named_params(tiny).items())  # the live model is unchanged


def _tiny_gpt2():
    from transformer_lens import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    from mechbias.core.testing import word_tokenizer

    tok = word_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = TransformerBridge.boot_transformers("gpt2", hf_model=GPT2LMHeadModel(cfg).eval(), tokenizer=tok,
                                                device="cpu")
    return model.eval()


def test_exported_gpt2_folds_conv1d_and_the_fused_qkv(tmp_path):
    """GPT-2 stores Conv1D weights as [in, out] and fuses q/k/v into c_attn, which the bridge splits."""
    model = _tiny_gpt2()
    for i, iv in enumerate([NeuronIntervention({0: [1, 5], 1: [7]}), HeadIntervention({1: [0, 2]}, mode="z"),
                            HeadIntervention({0: [1, 3]}, mode="q")]):
        hooked, base = _logits(model, iv), _logits(model)
        export_model(model, iv, tmp_path / str(i))
        for b, h, p in zip(base, hooked, _plain(tmp_path / str(i), model), strict=True):
            assert (h - b).abs().max() > 1e-4
            torch.testing.assert_close(p, h, atol=2e-5, rtol=0)


def test_unfoldable_interventions_are_refused_and_nothing_is_written(tiny, tmp_path):
    d = torch.ones(tiny.cfg.d_model)
    for iv in [NeuronIntervention({0: [1]}, positions="last"), HeadIntervention({0: [1]}, positions=[2, 3]),
               DirectionIntervention(1, d, mode="ablate"), DirectionIntervention(1, d, mode="add", alpha=2.0),
               Compose([NeuronIntervention({0: [1]}), DirectionIntervention(1, d)])]:
        with pytest.raises(NotFoldable, match=r"positions|residual stream"):
            iv.check_foldable()
        with pytest.raises(NotFoldable):
            export_model(tiny, iv, tmp_path / "m")
        assert not (tmp_path / "m").exists()


def test_the_checkpoint_loads_without_mechbias(tiny, tmp_path):
    iv = NeuronIntervention({0: [1, 5], 1: [7]})
    export_model(tiny, iv, tmp_path / "m")
    ids = tokenize(tiny, TEXTS[:1])[0]
    np.save(tmp_path / "ids.npy", ids.numpy())
    np.save(tmp_path / "want.npy", _logits(tiny, iv)[0][0].numpy())
    code = (
        "import sys, numpy as np, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}, local_files_only=True).eval()\n"
        f"ids = torch.from_numpy(np.load({str(tmp_path / 'ids.npy')!r}))[None]\n"
        "got = m(ids).logits[0].detach().float().numpy()\n"
        f"want = np.load({str(tmp_path / 'want.npy')!r})\n"
        "assert not any(k.startswith('mechbias') for k in sys.modules), 'mechbias was imported'\n"
        "print(float(np.abs(got - want).max()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 2e-5
    meta = json.loads((tmp_path / "m" / "mechbias_export.json").read_text())
    assert meta["intervention_spec"]["kind"] == "neurons" and meta["architecture"] == "LlamaForCausalLM"


def test_export_command(tmp_path, capsys, monkeypatch):
    from mechbias.core.testing import tiny_model

    NeuronIntervention({0: [1, 5]}).save(tmp_path / "iv")
    assert main(["export", "--model", "tiny", "--intervention", str(tmp_path / "iv"), "--out",
                 str(tmp_path / "m"), "--threads", "1"]) == 0
    tiny = tiny_model()
    for h, p in zip(_logits(tiny, NeuronIntervention({0: [1, 5]})), _plain(tmp_path / "m", tiny), strict=True):
        torch.testing.assert_close(p, h, atol=2e-5, rtol=0)
    # refused before any model is loaded: an unfoldable intervention, and a non-empty --out
    DirectionIntervention(1, torch.ones(64)).save(tmp_path / "steer")
    monkeypatch.setattr("mechbias.apps.cli.load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["export", "--model", "tiny", "--intervention", str(tmp_path / "steer"), "--out",
                 str(tmp_path / "m2")]) == 2
    assert "residual stream" in capsys.readouterr().err
    assert main(["export", "--model", "tiny", "--intervention", str(tmp_path / "iv"), "--out",
                 str(tmp_path / "m")]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.real
def test_exported_embedded_model_gives_the_hooked_logits(real, tmp_path):
    """The hub neuron (28, 1095) and two heads, folded into the embedded SmolLM2's weights."""
    iv = Compose([NeuronIntervention({28: [1095], 20: [5, 77]}), HeadIntervention({12: [3], 25: [0]}, mode="z")])
    summary = export_model(real, iv, tmp_path / "m")
    assert summary["architecture"] == "LlamaForCausalLM"
    hooked, base = _logits(real, iv), _logits(real)
    for b, h, p in zip(base, hooked, _plain(tmp_path / "m", real), strict=True):
        assert (h - b).abs().max() > 1e-2
        torch.testing.assert_close(p, h, atol=1e-4, rtol=0)


def test_overwrite_never_deletes_what_export_did_not_write(tmp_path, capsys, monkeypatch):
    """`export --out . --overwrite` once deleted every file in the current folder (issue 31)."""
    NeuronIntervention({0: [1, 5]}).save(tmp_path / "iv")
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (work / "sub" / "data.csv").write_text("1,2")
    monkeypatch.chdir(work / "sub")
    monkeypatch.setattr("mechbias.apps.cli.load_model", lambda *a, **k: pytest.fail("model loaded"))
    for out in (".", "..", str(work)):
        assert main(["export", "--model", "tiny", "--intervention", str(tmp_path / "iv"), "--out", out,
                     "--overwrite"]) == 2
        assert "refusing to replace" in capsys.readouterr().err
    # a non-empty folder that export did not write is refused too, and a file is not a folder
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    assert main(["export", "--model", "tiny", "--intervention", str(tmp_path / "iv"), "--out", str(other),
                 "--overwrite"]) == 2
    assert "not written by mechbias export" in capsys.readouterr().err
    assert main(["export", "--model", "tiny", "--intervention", str(tmp_path / "iv"), "--out",
                 str(other / "keep.txt"), "--overwrite"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (work / "notes.txt").read_text() == "mine" and (work / "sub" / "data.csv").read_text() == "1,2"
    assert (other / "keep.txt").read_text() == "keep"
    # the library call refuses as well, before anything is computed
    from mechbias.apps.export import export_model

    with pytest.raises(ValueError, match="refusing to replace"):
        export_model(object(), None, other)
