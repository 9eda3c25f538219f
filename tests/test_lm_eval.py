"""The lm-eval model type: local tasks, log-likelihoods equal to the hooked model's, the CLI entry point."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mechbias.apps.lm_eval_model import MechbiasLM, check_tasks, run_tasks
from mechbias.data.prompts import tokenize
from mechbias.interventions.base import maybe_apply
from mechbias.interventions.units import NeuronIntervention

DATA = Path(__file__).parent / "data" / "lm_eval"


def write_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mb_choice.yaml").write_text(f"""task: mb_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / 'mb_choice.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    (folder / "mb_text.yaml").write_text(f"""task: mb_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / 'mb_text.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
""")
    (folder / "mb_gen.yaml").write_text(f"""task: mb_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / 'mb_choice.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 3
metric_list:
  - metric: exact_match
""")
    return folder


def _brute_loglik(model, context, continuation, iv=None):
    """Plain: tokens of the whole text after the context's tokens, one forward, summed log-probs."""
    ctx = model.to_tokens(context, prepend_bos=True)[0]
    whole = model.to_tokens(context + continuation, prepend_bos=True)[0]
    with torch.no_grad(), maybe_apply(iv, model):
        lp = model(whole[None])[0].double().log_softmax(-1)
    return float(sum(lp[t - 1, whole[t]] for t in range(len(ctx), len(whole))))


def test_task_loglikelihoods_equal_the_hooked_model(tiny, tmp_path):
    inc = write_tasks(tmp_path / "tasks")
    iv = NeuronIntervention({0: list(range(0, 128, 2)), 1: list(range(0, 128, 3))})
    res = {k: run_tasks(MechbiasLM(tiny, v), ["mb_choice", "mb_text"], inc) for k, v in (("base", None), ("iv", iv))}
    docs = [json.loads(x) for x in (DATA / "mb_choice.jsonl").read_text().splitlines()]
    changed = 0.0
    base_got: dict[int, list[float]] = {}
    for key, use in (("base", None), ("iv", iv)):
        samples = sorted(res[key]["samples"]["mb_choice"], key=lambda s: s["doc_id"])
        for s, d in zip(samples, docs, strict=True):
            got = [float(r[0][0]) for r in s["resps"]]
            want = [_brute_loglik(tiny, d["question"], " " + c, use) for c in d["choices"]]
            np.testing.assert_allclose(got, want, atol=1e-4)
            assert s["acc"] == float(int(np.argmax(want)) == d["label"])
            if key == "iv":
                changed = max(changed, max(abs(a - b) for a, b in zip(got, base_got[s["doc_id"]], strict=True)))
            else:
                base_got[s["doc_id"]] = got
    assert changed > 1e-2  # the intervention reached the task's log-likelihoods
    # rolling log-likelihood = the whole text's log-probability after BOS, under the intervention
    texts = [json.loads(x)["text"] for x in (DATA / "mb_text.jsonl").read_text().splitlines()]
    for s in res["iv"]["samples"]["mb_text"]:
        ids = tokenize(tiny, [texts[s["doc_id"]]])[0]
        with torch.no_grad(), iv.apply(tiny):
            lp = tiny(ids[None])[0].double().log_softmax(-1)
        want = float(sum(lp[t - 1, ids[t]] for t in range(1, len(ids))))
        assert abs(float(s["resps"][0][0]) - want) < 1e-3


def test_rolling_windows_equal_the_plain_sum_when_the_text_fits(tiny):
    """With max_length shorter than the text, each window is conditioned on what fits; with a long enough
    max_length it is the plain sum (checked against a direct forward)."""
    text = "the bank approved the loan and the client paid the bill at the store every week"

    class Req:
        args = (text,)

    ids = tokenize(tiny, [text])[0]
    with torch.no_grad():
        lp = tiny(ids[None])[0].double().log_softmax(-1)
    whole = float(sum(lp[t - 1, ids[t]] for t in range(1, len(ids))))
    assert abs(MechbiasLM(tiny, max_length=256).loglikelihood_rolling([Req()])[0] - whole) < 1e-4
    # windows of 6: token t is predicted from at most the 5 tokens before it
    want = 0.0
    start = 1
    while start < len(ids):
        end = min(len(ids), start + 5)
        ctx0 = max(0, end - 6)
        with torch.no_grad():
            w = tiny(ids[None, ctx0:end])[0].double().log_softmax(-1)
        want += float(sum(w[t - ctx0 - 1, ids[t]] for t in range(start, end)))
        start = end
    got = MechbiasLM(tiny, max_length=6).loglikelihood_rolling([Req()])[0]
    assert abs(got - want) < 1e-4 and abs(got - whole) > 1e-3


def test_generation_follows_greedy_argmax_under_the_intervention(tiny, tmp_path):
    iv = NeuronIntervention({0: list(range(64))})
    res = run_tasks(MechbiasLM(tiny, iv), ["mb_gen"], write_tasks(tmp_path / "tasks"), limit=2)
    for s in res["samples"]["mb_gen"]:
        ids = tokenize(tiny, [s["doc"]["question"]])[0]
        new = []
        with torch.no_grad(), iv.apply(tiny):
            for _ in range(3):
                nxt = int(tiny(ids[None])[0, -1].argmax())
                new.append(nxt)
                ids = torch.cat([ids, ids.new_tensor([nxt])])
        want = tiny.tokenizer.decode(new).split(".")[0]
        assert s["resps"][0][0] == want


def test_lm_evals_own_model_types_stay_available():
    from lm_eval.api.registry import get_model

    assert get_model("mechbias") is MechbiasLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours must not hide lm-eval's (its registry is lazy)


def test_unknown_tasks_and_args_are_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="does not know"):
        check_tasks(["mb_nope"], write_tasks(tmp_path / "tasks"))
    with pytest.raises(ValueError, match="unknown"):
        MechbiasLM(tiny, interventon="x")


def test_lm_eval_command_line_runs_the_mechbias_model_type(tmp_path):
    inc = write_tasks(tmp_path / "tasks")
    NeuronIntervention({0: list(range(0, 128, 2))}).save(tmp_path / "iv")
    exe = Path(sys.executable).parent / "mechbias-lm-eval"
    outs = {}
    for name, extra in (("base", ""), ("iv", f",intervention={tmp_path / 'iv'}")):
        r = subprocess.run([str(exe), "run", "--model", "mechbias", "--model_args", f"model=tiny{extra}",
                            "--tasks", "mb_choice", "--include_path", str(inc), "--output_path",
                            str(tmp_path / name), "--log_samples"],
                           capture_output=True, text=True, timeout=600,
                           env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                "HOME": str(tmp_path)})
        assert r.returncode == 0, r.stderr[-3000:]
        files = sorted((tmp_path / name).rglob("samples_mb_choice*.jsonl"))
        assert files, list((tmp_path / name).rglob("*"))
        outs[name] = [json.loads(x) for x in files[0].read_text().splitlines()]
    assert len(outs["base"]) == 6
    diffs = [abs(float(a["resps"][0][0][0]) - float(b["resps"][0][0][0])) for a, b in zip(outs["base"], outs["iv"], strict=True)]
    assert max(diffs) > 1e-2


def test_card_reports_lm_eval_tasks_paired(tiny, tmp_path):
    from mechbias.apps.card import CardInputs, run_card

    inc = write_tasks(tmp_path / "tasks")
    iv = NeuronIntervention({0: list(range(0, 128, 2)), 1: list(range(0, 128, 3))})
    card = run_card(tiny, iv, CardInputs(tasks=["mb_choice"], include_path=inc, perplexity=False), tmp_path / "c",
                    n_boot=100)
    (row,) = card.as_dict()["benchmarks"][0]["rows"]
    for lm, key in ((MechbiasLM(tiny), "unmodified"), (MechbiasLM(tiny, iv), "intervention")):
        accs = [s["acc"] for s in run_tasks(lm, ["mb_choice"], inc)["samples"]["mb_choice"]]
        assert row[key] == pytest.approx(100 * np.mean(accs))
    assert row["difference"] == pytest.approx(row["intervention"] - row["unmodified"])
    assert "mb_choice acc" in (tmp_path / "c" / "card.md").read_text()
