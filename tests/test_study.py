"""The study runs end to end (tiny model, quick configuration), writes its report and figures, and resumes."""

import json

from mechbias.apps.cli import main
from mechbias.apps.study import StudyConfig, study_steps


def test_study_writes_report_and_resumes(tmp_path):
    out, figs = tmp_path / "study", tmp_path / "figures"
    assert main(["study", "--model", "tiny", "--quick", "--out", str(out), "--figures", str(figs)]) == 0
    report = (out / "report.md").read_text()
    steps = study_steps(StudyConfig(quick=True))
    for st in steps:
        assert (out / "steps" / st.name / "summary.json").exists(), st.name
        assert f"## {st.title}" in report
    for f in ("baseline_bias.png", "transfer_ig2.png", "transfer_gradiend.png", "methods_summary.png"):
        assert (figs / f).stat().st_size > 1000 and (out / "figures" / f).exists()
    # --axis auto (the default) chose the axis on the selection split and kept the choice
    choice = json.loads((out / "axis_choice.json").read_text())
    assert {r["axis"] for r in choice["candidates"]} == {"race", "gender"}
    assert json.loads((out / "study_config.json").read_text())["axis"] == choice["axis"]
    summary = json.loads((out / "steps" / "summary" / "summary.json").read_text())
    assert len(summary["rows"]) == len(steps) - 2  # every method step; not the baseline or the summary itself
    # an interrupted study continues: remove one finished step and run again; the others are not redone
    (out / "steps" / "gradiend" / "summary.json").unlink()
    stamps = {st.name: (out / "steps" / st.name / "summary.json").stat().st_mtime_ns
              for st in steps if st.name != "gradiend"}
    assert main(["study", "--model", "tiny", "--quick", "--out", str(out)]) == 0
    assert (out / "steps" / "gradiend" / "summary.json").exists()
    for name, ns in stamps.items():
        changed = (out / "steps" / name / "summary.json").stat().st_mtime_ns != ns
        assert changed == (name == "summary"), name  # only the comparison of the methods is redone


def test_axis_choice_reads_only_the_selection_split_and_finds_the_planted_axis(planted_tiny):
    from mechbias.apps.study import choose_axis
    from mechbias.eval.metrics import measure_bias

    model, _ = planted_tiny
    choice = choose_axis(model, ["finance", "commerce"], ["gender", "race"], n_boot=200)
    assert choice["axis"] == "race"  # the planted bias is on race; gender has none planted
    race = {r["axis"]: r for r in choice["candidates"]}["race"]
    direct = measure_bias(model, ["finance", "commerce"], "race", templates="selection", names="selection",
                          n_boot=200)
    for row in direct.rows:
        assert race["gaps"][row["context"]][0] == row["gap"]  # the same prompts: the selection split
