"""The study runs end to end (tiny model, quick configuration), writes its report and figures, and resumes."""

import json
import shutil

import pytest

from mechbias.apps.cli import main
from mechbias.apps.study import StudyConfig, study_steps
from mechbias.core.results import run_summary_json


def test_study_writes_report_and_resumes(tmp_path):
    out, figs = tmp_path / "study", tmp_path / "figures"
    args = ["study", "--model", "tiny", "--quick", "--workers", "1", "--out", str(out)]
    assert main([*args, "--figures", str(figs)]) == 0
    report = (out / "report.md").read_text()
    steps = study_steps(StudyConfig(quick=True))
    # the default study: three methods and the LEACE baseline, one variant each (GRADIEND and steering with --full)
    assert [s.name for s in steps] == ["baseline", "ig2", "patching", "prune_neuron_paper", "leace"]
    assert "gradiend" in [s.name for s in study_steps(StudyConfig(quick=True, full=True))]
    for st in steps:
        assert (out / "steps" / st.name / "summary.json").exists(), st.name
        assert f"## {st.title}" in report
    for f in ("baseline_bias.png", "transfer_ig2.png", "transfer_leace.png", "methods_summary.png"):
        assert (figs / f).stat().st_size > 1000 and (out / "figures" / f).exists()
    # --axis auto (the default) chose the axis on the selection split and kept the choice
    choice = json.loads((out / "axis_choice.json").read_text())
    assert {r["axis"] for r in choice["candidates"]} == {"race", "gender"}
    assert json.loads((out / "study_config.json").read_text())["axis"] == choice["axis"]
    summary = json.loads((out / "steps" / "summary" / "summary.json").read_text())
    assert len(summary["rows"]) == len(steps) - 1  # every method step
    work = json.loads((out / "work.json").read_text())
    assert work["computed_now"] == work["jobs"] > 0 and work["reused"] == 0
    assert set(work["by_kind"]) >= {"select", "scores", "controls", "evalset", "baseline", "analyze", "axis_choice"}
    # the baseline ran beside the axis choice (before the method steps) and is counted once
    assert work["by_kind"]["baseline"]["jobs"] == 1 and work["by_kind"]["axis_choice"]["jobs"] == 1
    busy = 100 * work["total_work_seconds"] / (work["workers"] * work["jobs_span_seconds"])
    assert f"the workers were busy {busy:.0f}% of it" in report  # the report's line is work.json's numbers
    # the interactive report: one matrix per method, every cell's hover text holds that cell's numbers, no network
    page = (out / "report.html").read_text()
    assert page.count("data-matrix=") == len(steps) - 1
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    from mechbias.viz.html import cell_tip, esc

    for st in steps[1:]:
        for cell in run_summary_json(out / "steps" / st.name)["cells"]:
            assert f"data-tip='{esc(cell_tip(cell))}'" in page
            assert f"gap change   {cell['gap_change']:+.3f}" in cell_tip(cell)
    # an interrupted study continues: remove one finished job; only it is computed again
    sel = sorted((out / "jobs" / "select").iterdir())[0]
    shutil.rmtree(sel)
    before = run_summary_json(out / "steps" / "ig2")
    assert main(args) == 0
    work = json.loads((out / "work.json").read_text())
    assert work["computed_now"] == 1 and work["reused"] == work["jobs"] - 1
    assert run_summary_json(out / "steps" / "ig2")["cells"] == before["cells"]


def test_axis_choice_reads_only_the_selection_split_and_finds_the_planted_axis(planted_tiny):
    from mechbias.apps.study import choose_axis
    from mechbias.eval.metrics import measure_bias

    model, _ = planted_tiny
    choice = choose_axis(model, ["finance", "commerce"], ["gender", "race"], n_boot=200)
    assert choice["axis"] == "race"  # the planted bias is on race; gender has none planted
    race = {r["axis"]: r for r in choice["candidates"]}["race"]
    direct = measure_bias(model, ["finance", "commerce"], "race", templates="selection", names="selection",
                          n_boot=200, templates_per_name=5)
    for row in direct.rows:
        assert race["gaps"][row["context"]][0] == row["gap"]  # the same prompts: the selection split


def test_study_settings_are_checked_before_any_work():
    import pytest

    with pytest.raises(ValueError, match="unknown steps"):
        StudyConfig(skip=("summary",))  # not a step: skipping it would silently do nothing
    with pytest.raises(ValueError, match="choose one"):
        StudyConfig(workers=1, address="127.0.0.1:6379")
    with pytest.raises(ValueError, match="workers must be"):
        StudyConfig(workers=0)
    assert StudyConfig().contexts == ("finance", "commerce")
    assert len(StudyConfig(full=True).contexts) > 2
    with pytest.raises(ValueError, match="--random must be"):
        StudyConfig(n_random=-1)
    # draws per control: 2 by default, 50 in the complete study (a rank p-value can then reach 0.02), 1 quick;
    # a stated count wins
    assert [StudyConfig(**kw).n_random for kw in ({}, {"full": True}, {"quick": True}, {"full": True, "n_random": 3})
            ] == [2, 50, 1, 3]


def test_user_yaml_contexts_work_in_method_commands_and_the_study(tmp_path):
    """A context from the user's own file (issue 31: method commands refused it as an unknown name, and the
    study turned its path into a name). Its bytes enter the job keys: editing the file recomputes."""
    from pathlib import Path

    finance = (Path(__file__).resolve().parents[1] / "mechbias/data/files/contexts/finance.yaml").read_text()
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text(finance.replace("name: finance", "name: mycredit"))
    assert main(["prune", "--model", "tiny", "--select-on", str(yaml_file), "--evaluate-on", str(yaml_file),
                 "finance", "--axis", "gender", "--k", "5", "--random", "1", "--boot", "100", "--out", str(tmp_path / "p")]) == 0
    cells = run_summary_json(tmp_path / "p")["cells"]
    assert {(c["selected_on"], c["evaluated_on"]) for c in cells} == {("mycredit", "mycredit"),
                                                                      ("mycredit", "finance")}
    argv = ["study", "--model", "tiny", "--quick", "--contexts", str(yaml_file), "finance", "--axis", "race",
            "--methods", "prune", "--workers", "1", "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    s = run_summary_json(tmp_path / "s" / "steps" / "prune_neuron_paper")
    assert {c["selected_on"] for c in s["cells"]} == {"mycredit", "finance"}
    cfg = StudyConfig(contexts=(str(yaml_file), "finance"))
    assert cfg.contexts == (str(yaml_file.resolve()), "finance")
    # the file's bytes are part of every job's key: an edit means recomputation, never a stale reuse
    from mechbias.apps.study import study_salt
    from mechbias.core.models import load_model

    model = load_model("tiny")
    before = study_salt(model, cfg)
    yaml_file.write_text(yaml_file.read_text().replace("loan", "mortgage"))
    assert study_salt(model, cfg) != before


def test_a_rerun_with_other_steps_reports_only_its_own_and_rechooses_the_axis(tmp_path):
    """Stale state (issue 31): the report once showed every steps/*/summary.json on disk, and axis_choice.json
    was reused whatever the model, contexts or seed."""
    from mechbias.viz.html import study_html

    out = tmp_path / "s"
    base = ["study", "--model", "tiny", "--quick", "--contexts", "finance", "commerce", "--workers", "1",
            "--out", str(out)]
    assert main([*base, "--axis", "auto", "--methods", "prune"]) == 0
    pruning_title = json.loads((out / "steps" / "prune_neuron_paper" / "summary.json").read_text())["title"]
    assert pruning_title in study_html(out)
    choice = json.loads((out / "axis_choice.json").read_text())
    assert choice["key"]["contexts"] == ["finance", "commerce"] and choice["key"]["seed"] == 0
    assert main([*base, "--axis", "auto", "--methods", "steer", "--seed", "1"]) == 0
    html = study_html(out)
    # steering renders its own section (methods/steering.py alone): its rows and the |cosine| between them
    page = (out / "report.html").read_text()
    assert "<h3>Steering directions</h3>" in page and "finance vs commerce" in page
    assert "<h3>Steering directions</h3>" not in html  # study_html without the methods' sections
    assert (out / "steps" / "prune_neuron_paper" / "summary.json").exists()  # kept on disk, not deleted
    assert pruning_title not in html  # but not reported as part of this run
    assert json.loads((out / "axis_choice.json").read_text())["key"]["seed"] == 1  # chosen again for seed 1


def test_a_method_command_and_the_study_compute_the_same_cells(tmp_path):
    """The CLI's in-process transfer engine and the study's jobs (one score job per row and column, all control
    draws together, resumed at the intervention's first block) give the same cells for the same settings."""
    study = tmp_path / "s"
    assert main(["study", "--model", "tiny", "--quick", "--contexts", "finance", "commerce", "--axis", "race",
                 "--methods", "prune", "--workers", "1", "--out", str(study)]) == 0
    cli = tmp_path / "c"
    assert main(["prune", "--model", "tiny", "--select-on", "finance", "commerce", "--evaluate-on", "finance",
                 "commerce", "--axis", "race", "--unit", "neuron", "--k", "none", "--score", "activation",
                 "--random", "1", "--boot", "300", "--seed", "0", "--no-capability", "--precision", "fast",
                 "--out", str(cli)]) == 0
    a, b = run_summary_json(study / "steps" / "prune_neuron_paper"), run_summary_json(cli)
    assert a["config"]["precision"] == b["config"]["precision"] == "fast"  # neuron pruning selects fast by default
    assert a["transfer_config"]["controls"] == b["transfer_config"]["controls"]
    key = lambda c: (c["selected_on"], c["evaluated_on"])
    ca, cb = sorted(a["cells"], key=key), sorted(b["cells"], key=key)
    assert [key(c) for c in ca] == [key(c) for c in cb] and len(ca) == 4
    for x, y in zip(ca, cb, strict=True):
        for k in ("gap_before", "gap_after", "gap_change", "ci_low", "ci_high", "p_value", "n_components"):
            assert abs(x[k] - y[k]) <= 1e-9, (key(x), k, x[k], y[k])
        assert x["controls"].keys() == y["controls"].keys() and x["controls"]
        for name in x["controls"]:
            assert x["controls"][name]["draws"] == pytest.approx(y["controls"][name]["draws"], abs=1e-9)
    for k in ("within_minus_cross", "ci_low", "ci_high"):
        assert a["transfer_test"][k] == pytest.approx(b["transfer_test"][k], abs=1e-9)
    # the in-process engine a notebook uses (transfer_matrix on a method instance, no job store) gives them too
    from mechbias.core.models import load_model
    from mechbias.eval.cells import TransferConfig
    from mechbias.eval.transfer import transfer_matrix
    from mechbias.methods.pruning.method import Pruning
    from mechbias.methods.pruning.ranking import PruneConfig

    method = Pruning(PruneConfig(unit="neuron", k=None, score="activation", precision="fast"), seed=0)
    tm = transfer_matrix(load_model("tiny"), method, ["finance", "commerce"], "race",
                         config=TransferConfig(n_random=1, n_boot=300, seed=0, capability=False))
    for x in ca:
        y = tm.cell(x["selected_on"], x["evaluated_on"])
        for k in ("gap_before", "gap_after", "gap_change", "ci_low", "ci_high", "p_value"):
            assert abs(x[k] - getattr(y, k)) <= 1e-9, (key(x), k)
        for name in x["controls"]:
            assert x["controls"][name]["draws"] == pytest.approx(y.controls[name].draws, abs=1e-9)


def test_an_interrupted_method_command_resumes_from_its_job_store(tmp_path):
    """A method command is a one-step study: its jobs stay in OUT/jobs, so the same command on the same --out
    after an interruption (here: its outputs lost and one finished job removed) recomputes only what is
    missing and writes the same cells. A folder holding anything else is still refused."""
    out = tmp_path / "p"
    argv = ["prune", "--model", "tiny", "--select-on", "finance", "commerce", "--axis", "race", "--k", "5",
            "--random", "1", "--boot", "100", "--out", str(out)]
    assert main(argv) == 0
    first = run_summary_json(out)["cells"]
    entries = {p: p.stat().st_mtime_ns for p in (out / "jobs").glob("*/*") if (p / "job.json").exists()}
    assert len(entries) >= 8
    for p in list(out.iterdir()):
        if p.name != "jobs":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    gone = sorted(out.glob("jobs/scores/*"))[0]
    shutil.rmtree(gone)
    assert main(argv) == 0
    assert run_summary_json(out)["cells"] == first
    redone = [p for p, t in entries.items() if p.stat().st_mtime_ns != t]
    assert redone == [gone] and gone.exists()
    assert main(argv) == 2  # now the folder holds a finished run: refused, never mixed


def test_the_study_cross_fits_as_crossfit_matrix_does(tmp_path):
    """--crossfit N plans each split and fold as jobs (selections and evaluation sets inside the fold, the fixed
    split's fold 0 shared with the step's own); its cross-fitted cells and test equal the in-process
    crossfit_matrix's for the same settings, and both folds of a split select on different data."""
    out = tmp_path / "s"
    assert main(["study", "--model", "tiny", "--quick", "--contexts", "finance", "commerce", "--axis", "race",
                 "--methods", "erase", "--crossfit", "2", "--workers", "1", "--out", str(out)]) == 0
    got = json.loads((out / "steps" / "leace" / "crossfit" / "result.json").read_text())
    summary = run_summary_json(out / "steps" / "leace")
    assert summary["crossfit"]["splits"] == 2 and "Cross-fitted" in (out / "report.md").read_text()
    work = json.loads((out / "work.json").read_text())
    # one extra selection per row and fit beyond the step's own (fit (0, 0) is reused): 2 rows x 3 fits
    assert work["by_kind"]["select"]["jobs"] == 2 + 2 * 3
    from mechbias.core.models import load_model
    from mechbias.eval.cells import TransferConfig
    from mechbias.eval.crossfit import crossfit_matrix
    from mechbias.methods.base import get_method

    config = next(s.config for s in study_steps(StudyConfig(quick=True, methods=("erase",))) if s.name == "leace")
    cls = get_method("erase")
    ref = crossfit_matrix(load_model("tiny"), lambda: cls(config, seed=0), ["finance", "commerce"], "race", splits=2,
                          config=TransferConfig(n_random=0, controls=(), capability=False, n_boot=300, seed=0))
    assert len(got["cells"]) == 4
    for c in got["cells"]:
        r = ref.cell(c["selected_on"], c["evaluated_on"])
        for k in ("gap_removed", "se", "ci_low", "ci_high", "p_value", "between_split_sd"):
            assert c[k] == pytest.approx(r[k], abs=1e-9), (c["selected_on"], c["evaluated_on"], k)
        assert [x for f in c["folds"] for x in f] == pytest.approx([x for f in r["folds"] for x in f], abs=1e-9)
        assert all(a != b for a, b in c["folds"])  # the folds select and evaluate on different halves
    for k in ("within_minus_cross", "ci_low", "ci_high", "between_split_sd"):
        assert got["test"][k] == pytest.approx(ref.test[k], abs=1e-9)
    assert StudyConfig(full=True).crossfit == 5 and StudyConfig().crossfit == 0
    with pytest.raises(ValueError, match="--crossfit"):
        StudyConfig(crossfit=-1)
