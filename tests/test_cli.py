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
