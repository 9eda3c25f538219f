import json

import pytest
import torch

from mechbias.apps.cli import main
from mechbias.core.results import run_summary_json


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
    rc = main(["ig2", "--model", "tiny", "--select-on", "finance", "--axis", "race", "--pairs", "3",
               "--steps", "4", "--verify-random", "1", "--random", "1", "--boot", "100", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "summary.json").read_text())
    sel = data["selections"]["finance"]
    assert len(sel["completeness_error_per_layer"]) == 2
    assert {r["operation"] for r in data["analysis"]["verification"]} == {"suppress", "amplify"}
    assert (tmp_path / "interventions" / "finance" / "intervention.json").exists()
    assert (tmp_path / "figures" / "ig2_attributions.png").exists()
    assert (tmp_path / "figures" / "transfer_ig2_race.png").exists()
    from mechbias.interventions.base import load_intervention

    iv = load_intervention(tmp_path / "interventions" / "finance")
    assert iv.n_components == len(sel["selected_neurons"])


def test_patch_command(tmp_path):
    rc = main(["patch", "--model", "tiny", "--select-on", "finance", "--axis", "gender", "--pairs", "3",
               "--components", "resid_pre", "heads", "--random", "1", "--boot", "100", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "summary.json").read_text())
    sel = data["selections"]["finance"]
    assert sel["direction"] == "denoise" and set(sel["top"]) == {"resid_pre", "heads"}
    assert {a["component"] for a in sel["atp_agreement"]} == {"resid_pre", "heads"}
    assert {s["direction"] for s in sel["set_patching"]} == {"denoise", "noise"}
    assert (tmp_path / "figures" / "patch_resid.png").exists()
    assert sel["n_components"] == 5


def test_prune_command(tmp_path):
    rc = main(["prune", "--model", "tiny", "--unit", "head", "--select-on", "finance", "--evaluate-on", "finance",
               "commerce", "--axis", "race", "--k", "2", "--common", "none", "--random", "1", "--boot", "100",
               "--out", str(tmp_path)])
    assert rc == 0
    data = run_summary_json(tmp_path)  # summary.json with the cells of transfer/result.json
    assert [c["evaluated_on"] for c in data["cells"]] == ["finance", "commerce"]
    assert {"gap_change", "ci_low", "ci_high", "p_value", "p_adjusted", "min_detectable", "reduction",
            "random_reduction", "perplexity_change", "controls"} <= set(data["cells"][0])
    assert {"gap_change", "perplexity_change"} <= set(data["cells"][0]["controls"]["random"])
    # one selection row: no column holds two rows' cells, so there is no within - cross test (the earlier
    # diagonal - off-diagonal statistic compared finance's column with commerce's here)
    assert data["transfer_test"]["within_minus_cross"] is None and "note" in data["transfer_test"]
    assert "hook_q" in json.loads((tmp_path / "summary.json").read_text())["selections"]["finance"]["head_ablation"]
    assert data["config"]["common"] is None and data["config"]["k"] == 2
    from mechbias.interventions.base import load_intervention

    assert load_intervention(tmp_path / "interventions" / "finance").n_components == 2
    rc = main(["bias", "--model", "tiny", "--contexts", "finance", "--axis", "race", "--boot", "100",
               "--intervention", str(tmp_path / "interventions" / "finance"), "--out", str(tmp_path / "b")])
    assert rc == 0 and "heads" in json.loads((tmp_path / "b" / "bias.json").read_text())["meta"]["intervention"]


def test_method_commands_refuse_flags_they_do_not_use(tmp_path, capsys):
    """--intervention was accepted by prune/ig2/patch/gradiend and silently ignored; now it is refused."""
    for cmd in ("prune", "ig2", "patch", "gradiend"):
        with pytest.raises(SystemExit) as err:
            main([cmd, "--model", "tiny", "--select-on", "finance", "--axis", "gender", "--intervention",
                  str(tmp_path), "--out", str(tmp_path)])
        assert err.value.code == 2
        assert "unrecognized arguments: --intervention" in capsys.readouterr().err
    # there is no default axis (the library has none either): a method command must say which one
    with pytest.raises(SystemExit) as err:
        main(["prune", "--model", "tiny", "--select-on", "finance", "--out", str(tmp_path)])
    assert err.value.code == 2 and "the following arguments are required: --axis" in capsys.readouterr().err


def test_no_random_control_is_allowed(tmp_path):
    """--random 0 raised KeyError (the cells had no random keys); now the cells say there is no control."""
    rc = main(["prune", "--model", "tiny", "--unit", "head", "--select-on", "finance", "--axis", "race", "--k", "2",
               "--random", "0", "--boot", "50", "--no-capability", "--out", str(tmp_path)])
    assert rc == 0
    cell = run_summary_json(tmp_path)["cells"][0]
    assert cell["controls"] == {} and "random_reduction" not in cell and cell["perplexity_change"] is None


def test_bad_settings_are_refused_before_a_model_loads(tmp_path, capsys, monkeypatch):
    from mechbias.apps import cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    cases = [(["prune", "--select-on", "astrology", "--axis", "gender"], "Unknown context"),
             (["prune", "--select-on", "finance", "--axis", "height"], "Unknown axis"),
             (["prune", "--select-on", "finance", "--axis", "gender", "--common", "0"], "common is a fraction"),
             (["prune", "--select-on", "finance", "--axis", "gender", "--unit", "weight", "--score", "attention"],
              "does not apply"),
             (["ig2", "--select-on", "finance", "--axis", "gender", "--steps", "0"], "steps"),
             (["bias", "--intervention", str(tmp_path / "none")], "no saved intervention")]
    for argv, msg in cases:
        assert main([*argv, "--model", "tiny", "--out", str(tmp_path)]) == 2, argv
        assert msg in capsys.readouterr().err, argv


def test_gradiend_command(tmp_path):
    rc = main(["gradiend", "--model", "tiny", "--select-on", "finance", "--axis", "gender", "--evaluate-on", "finance",
               "hiring", "--steps", "6", "--batch", "6", "--seeds", "0", "--lr", "1e-3", "--h", "-1", "1",
               "--alpha", "0.01", "--max-ppl-increase", "10", "--random", "1", "--boot", "100", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "summary.json").read_text())
    feat = data["analysis"]["features"][0]
    assert {"sign_accuracy", "pearson", "auc"} <= set(feat)
    assert data["selections"]["finance"]["chosen_edit"] is not None and len(run_summary_json(tmp_path)["cells"]) == 2
    assert (tmp_path / "selections" / "finance" / "gradiend" / "tensors.safetensors").exists()
    assert (tmp_path / "figures" / "gradiend_grid_finance.png").exists()
    assert (tmp_path / "figures" / "gradiend_training_finance.png").exists()
    # the training curve's endpoints and held-out encoder statistics are in summary.json
    assert feat["steps_run"] == 6 and feat["loss_first"] > 0 and {"male", "female", "neutral"} <= set(feat["stats"])


def test_crows_command_before_and_under_an_intervention(tmp_path):
    from pathlib import Path

    from mechbias.interventions.units import NeuronIntervention

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

    from mechbias.eval.crows import crows_score, sentence_logprob

    csv = Path(__file__).parent / "data" / "crows_small.csv"
    res = crows_score(tiny, csv, n_boot=100)
    # brute force: the stereotypical sentence of row 2 (antistereo) is sent_less
    lp = sentence_logprob(tiny, ["My neighbour bakes bread every evening after work.",
                                 "My neighbour bakes bread every morning before work."])
    with_hf = []
    for t in ["My neighbour bakes bread every evening after work.",
              "My neighbour bakes bread every morning before work."]:
        ids = tiny.to_tokens(t)
        with torch.no_grad():
            l = tiny.original_model(ids).logits[0, :-1].double().log_softmax(-1)
        with_hf.append(float(l.gather(-1, ids[0, 1:, None]).sum()))
    assert abs(float(lp[0]) - with_hf[0]) < 1e-3 and abs(float(lp[1]) - with_hf[1]) < 1e-3
    assert res.per_pair[2]["stereotypical"].endswith("evening after work.")
    # one implementation: the report card's CrowS-Pairs gives the same score from the same per-pair scorer
    from mechbias.eval.bench.crowspairs import crows_bench

    card = crows_bench(tiny, csv, n_boot=100)
    row = next(r for r in card.rows if r.subset == "all")
    assert row.unmodified == pytest.approx(res.score, abs=1e-9)
    bad = tmp_path / "bad.csv"
    bad.write_text("sent_more,sent_less\na,b\n")
    with pytest.raises(ValueError, match="missing columns"):
        crows_score(tiny, bad)


def test_every_command_help_shows_an_example_and_version_prints(capsys):
    import argparse

    from mechbias.apps.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"bias", "crows", "card", "export", "study", "doctor", "erase", "ig2", "prune"} <= set(sub.choices)
    for name in sub.choices:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        out = " ".join(capsys.readouterr().out.split())
        assert f"example: mechbias {name} " in out, name
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("mechbias ")


def test_one_vocabulary_for_the_contexts_of_a_matrix():
    """The library and the CLI say select_on / evaluate_on (--select-on / --evaluate-on); the earlier keyword
    names are refused with the new ones named, and there is no default axis, before any work."""
    from mechbias.eval.transfer import transfer_matrix

    def never(model, context, axis):
        raise AssertionError("selected")

    with pytest.raises(TypeError, match="eval_contexts= is now evaluate_on="):
        transfer_matrix(None, never, ["finance"], "gender", eval_contexts=["commerce"])
    with pytest.raises(TypeError, match="contexts= is now select_on="):
        transfer_matrix(None, never, axis="gender", contexts=["finance"])
    with pytest.raises(ValueError, match="needs the axis"):
        transfer_matrix(None, never, ["finance"])


def test_progress_lines_go_through_logging(capsys):
    """The library logs under "mechbias" and prints nothing by itself; log_to_console (what the command line
    attaches) shows INFO lines as "[mechbias] ..." on the current stderr, once however often it is called."""
    import logging

    from mechbias.core.log import log_to_console

    logger = logging.getLogger("mechbias")
    before = list(logger.handlers)
    for h in before:  # an earlier command in this process attached the console handler: start without it
        logger.removeHandler(h)
    try:
        logging.getLogger("mechbias.eval.transfer").info("select on finance")
        assert "select on finance" not in capsys.readouterr().err  # no handler attached by the library
        h1, h2 = log_to_console(), log_to_console()
        assert h1 is h2 and logger.handlers.count(h1) == 1
        logging.getLogger("mechbias.eval.transfer").info("select on commerce")
        logging.getLogger("mechbias.methods.gradiend.train").debug("a step")
        assert capsys.readouterr().err == "[mechbias] select on commerce\n"
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
        for h in before:
            logger.addHandler(h)


def test_a_method_run_saves_each_cell_and_intervention_once_and_old_folders_still_load(tmp_path):
    """One run artifact (issue 37): the cells live in transfer/result.json alone, each intervention in
    interventions/<context>/ alone; load_run reads that layout and the committed layout before it."""
    from pathlib import Path

    from mechbias.apps.workflow import load_run
    from mechbias.interventions.base import load_intervention

    rc = main(["prune", "--model", "tiny", "--unit", "head", "--select-on", "finance", "commerce", "--axis", "race",
               "--k", "2", "--common", "none", "--random", "1", "--boot", "50", "--no-capability",
               "--out", str(tmp_path)])
    assert rc == 0
    written = [p for p in tmp_path.rglob("intervention.json") if "jobs" not in p.relative_to(tmp_path).parts]
    assert sorted(str(p.parent.relative_to(tmp_path)) for p in written) == ["interventions/commerce",
                                                                             "interventions/finance"]
    holding_cells = [p.relative_to(tmp_path) for p in tmp_path.rglob("*.json") if "jobs" not in p.parts
                     and '"gap_change"' in p.read_text()]
    assert holding_cells == [Path("transfer/result.json")]
    assert not (tmp_path / "transfer.json").exists() and not (tmp_path / "prune.json").exists()
    run = load_run(tmp_path)
    assert run.method == "prune" and run.transfer.rows == ["finance", "commerce"] and len(run.transfer.cells) == 4
    assert set(run.transfer.interventions) == {"finance", "commerce"}
    assert run.transfer.interventions["finance"].describe() == load_intervention(
        tmp_path / "interventions" / "finance").describe() == run.selections["finance"]["intervention"]
    assert [c["gap_change"] for c in run.cells()] == [c.gap_change for c in run.transfer.cells]
    # a study step of the layout before (transfer_result/, transfer.json; the default study committed until
    # 2026-12-06, kept under tests/data): read, cells equal to its JSON
    old = Path(__file__).resolve().parent / "data" / "run_layout1_prune"
    before = load_run(old)
    saved = json.loads((old / "transfer.json").read_text())["cells"]
    assert [c.gap_change for c in before.transfer.cells] == [c["gap_change"] for c in saved]
    assert before.title and before.selections
    with pytest.raises(FileNotFoundError, match=r"summary.json and transfer/result.json"):
        load_run(tmp_path / "jobs")
    # the old place of an intervention (OUT/intervention) is refused with the new one named
    with pytest.raises(FileNotFoundError, match=r"interventions/<context> \(one of: commerce, finance\)"):
        load_intervention(tmp_path / "intervention")
