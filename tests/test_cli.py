import json

from mechbias.cli import main


def test_bias_command_writes_json_and_figure(tmp_path, capsys):
    rc = main(["bias", "--model", "tiny", "--contexts", "finance", "commerce", "--axis", "race",
               "--templates", "selection", "--boot", "200", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "bias.json").read_text())
    assert [r["context"] for r in data["rows"]] == ["finance", "commerce"]
    for r in data["rows"]:
        assert {"gap", "ci_low", "ci_high", "n_prompts"} <= set(r) and r["axis"] == "race"
    assert (tmp_path / "figures" / "baseline_bias.png").stat().st_size > 1000
    assert data["meta"]["model"] == "tiny"


def test_bad_input_gets_a_clear_error(tmp_path, capsys):
    rc = main(["bias", "--model", "tiny", "--contexts", "astrology", "--out", str(tmp_path)])
    assert rc == 2
    assert "Unknown context 'astrology'" in capsys.readouterr().err
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    rc = main(["bias", "--model", "tiny", "--contexts", str(empty), "--out", str(tmp_path)])
    assert rc == 2 and "empty" in capsys.readouterr().err


def test_ig2_command(tmp_path):
    rc = main(["ig2", "--model", "tiny", "--context", "finance", "--axis", "race", "--pairs", "1",
               "--steps", "4", "--random", "1", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "ig2.json").read_text())
    assert len(data["completeness_error_per_layer"]) == 2
    assert {r["operation"] for r in data["verification"]} == {"suppress", "amplify"}
    assert (tmp_path / "intervention" / "intervention.json").exists()
    assert (tmp_path / "figures" / "ig2_finance_race.png").exists()
    from mechbias.hooks import load_intervention

    iv = load_intervention(tmp_path / "intervention")
    assert iv.n_components == len(data["selected_neurons"])


def test_patch_command(tmp_path):
    rc = main(["patch", "--model", "tiny", "--context", "finance", "--axis", "gender", "--pairs", "3",
               "--components", "resid_pre", "heads", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "patch.json").read_text())
    assert data["direction"] == "denoise" and set(data["top"]) == {"resid_pre", "heads"}
    assert {a["component"] for a in data["atp_agreement"]} == {"resid_pre", "heads"}
    assert {s["direction"] for s in data["set_patching"]} == {"denoise", "noise"}
    assert (tmp_path / "figures" / "patch_finance_gender_resid_pre.png").exists()


def test_prune_command(tmp_path):
    rc = main(["prune", "--model", "tiny", "--unit", "head", "--select-on", "finance", "--evaluate-on", "finance",
               "commerce", "--k", "2", "--common", "0", "--random", "1", "--boot", "100", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "transfer.json").read_text())
    assert [c["evaluated_on"] for c in data["cells"]] == ["finance", "commerce"]
    assert {"reduction", "ci_low", "ci_high", "random_reduction", "perplexity_change"} <= set(data["cells"][0])
    assert "hook_q" in data["head_ablation"]
    from mechbias.hooks import load_intervention

    assert load_intervention(tmp_path / "intervention").n_components == 2
    rc = main(["bias", "--model", "tiny", "--contexts", "finance", "--axis", "race", "--boot", "100",
               "--intervention", str(tmp_path / "intervention"), "--out", str(tmp_path / "b")])
    assert rc == 0 and "heads" in json.loads((tmp_path / "b" / "bias.json").read_text())["meta"]["intervention"]


def test_gradiend_command(tmp_path):
    rc = main(["gradiend", "--model", "tiny", "--train-on", "finance", "--axis", "gender", "--evaluate-on", "finance",
               "hiring", "--steps", "6", "--batch", "6", "--seeds", "1", "--lr", "1e-3", "--h", "-1", "1",
               "--alpha", "0.01", "--max-ppl-increase", "10", "--random", "1", "--boot", "100", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "gradiend.json").read_text())
    assert {"sign_accuracy", "pearson"} <= set(data["feature"])
    assert data["chosen_edit"] is not None and len(data["transfer"]) == 2
    assert (tmp_path / "gradiend" / "tensors.safetensors").exists()
    assert (tmp_path / "figures" / "gradiend_grid_finance_gender.png").exists()


def test_crows_command_before_and_under_an_intervention(tmp_path):
    from pathlib import Path

    from mechbias.hooks import NeuronIntervention

    csv = Path(__file__).parent / "data" / "crows_small.csv"
    iv = tmp_path / "iv"
    NeuronIntervention({0: list(range(64)), 1: list(range(64))}).save(iv)
    rc = main(["crows", "--model", "tiny", "--csv", str(csv), "--intervention", str(iv), "--boot", "200",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    data = json.loads((tmp_path / "out" / "crows.json").read_text())
    assert {"score", "ci_low", "ci_high", "n", "bias_type"} <= set(data) and data["n"] == 6
    assert set(data["bias_type"]) == {"gender", "socioeconomic", "age"}
    assert 0 <= data["unmodified"]["score"] <= 100 and "intervention" in data


def test_crows_scoring_is_correct_and_validates_input(tmp_path, tiny):
    from pathlib import Path

    from mechbias.crows import crows_score, sentence_logprob

    csv = Path(__file__).parent / "data" / "crows_small.csv"
    res = crows_score(tiny, csv, n_boot=100)
    # brute force: the stereotypical sentence of row 2 (antistereo) is sent_less
    lp = sentence_logprob(tiny, ["My neighbour bakes bread every evening after work.",
                                 "My neighbour bakes bread every morning before work."])
    with_hf = []
    for t in ["My neighbour bakes bread every evening after work.",
              "My neighbour bakes bread every morning before work."]:
        ids = tiny.to_tokens(t)
        l = tiny.original_model(ids).logits[0, :-1].double().log_softmax(-1)
        with_hf.append(float(l.gather(-1, ids[0, 1:, None]).sum()))
    assert abs(float(lp[0]) - with_hf[0]) < 1e-3 and abs(float(lp[1]) - with_hf[1]) < 1e-3
    assert res.per_pair[2]["stereotypical"].endswith("evening after work.")
    bad = tmp_path / "bad.csv"
    bad.write_text("sent_more,sent_less\na,b\n")
    import pytest as _pytest

    with _pytest.raises(ValueError, match="missing columns"):
        crows_score(tiny, bad)
