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
