"""Every command on malformed inputs (issue 31): exit 2, one line on stderr, no traceback, nothing written or
deleted. Each case is something a new user or a careless collaborator did; before the fixes about 15 of them
crashed with a traceback, and several ran to exit 0 with wrong results (``--boot 0`` gave p = 0, an empty
CrowS-Pairs sentence was scored, positions past every prompt and a negative weight-mask index were applied)."""

import json
from pathlib import Path

import pytest
import torch

from mechbias.apps.cli import main
from mechbias.core.testing import tiny_model
from mechbias.interventions.base import model_identity
from mechbias.interventions.units import NeuronIntervention
from mechbias.interventions.weights import WeightMask

FINANCE = (Path(__file__).resolve().parents[1] / "mechbias/data/files/contexts/finance.yaml").read_text()


def _yaml(name: str, text: str):
    def make(d: Path) -> str:
        (d / name).write_text(text)
        return str(d / name)
    return make


def _bytes(name: str, data: bytes):
    def make(d: Path) -> str:
        (d / name).write_bytes(data)
        return str(d / name)
    return make


def _folder(name: str):
    def make(d: Path) -> str:
        (d / name).mkdir()
        return str(d / name)
    return make


def _iv(make_iv, edit=None, keep_tensors=True):
    """A saved intervention folder, optionally with its intervention.json edited or its tensors truncated."""
    def make(d: Path) -> str:
        folder = d / "iv"
        make_iv().save(folder)
        meta = folder / "intervention.json"
        if edit == "truncate":
            meta.write_text(meta.read_text()[:20])
        elif callable(edit):
            data = json.loads(meta.read_text())
            edit(data)
            meta.write_text(json.dumps(data))
        if not keep_tensors:
            t = folder / "tensors.safetensors"
            t.write_bytes(t.read_bytes()[:30])
        return str(folder)
    return make


def _other_model_iv():
    iv = NeuronIntervention({0: [1, 2]})
    iv.origin = model_identity(tiny_model(seed=7))  # same shape as --model tiny, other weights
    return iv


def _ctx(**replace):
    text = FINANCE
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


CSV_HEAD = "sent_more,sent_less,stereo_antistereo,bias_type\n"
BBQ_OK = {"context": "c", "question": "q", "ans0": "a", "ans1": "b", "ans2": "Unknown", "label": 2,
          "question_polarity": "neg", "context_condition": "ambig", "category": "Gender_identity",
          "answer_info": {"ans0": ["a", "F"], "ans1": ["b", "M"], "ans2": ["Unknown", "unknown"]},
          "additional_metadata": {"stereotyped_groups": ["F"]}}

B = ["bias", "--model", "tiny", "--contexts", "finance", "--axis", "gender"]
CROWS = ["crows", "--model", "tiny"]
CARD = ["card", "--model", "tiny", "--no-perplexity"]
EXPORT = ["export", "--model", "tiny"]
PRUNE = ["prune", "--model", "tiny", "--axis", "gender", "--select-on", "finance"]

# (id, argv with {f} for the made file or folder and {out} for a fresh output folder, maker, expected words)
CASES = [
    ("unknown context", [*B[:4], "astrology", "--out", "{out}"], None, "Unknown context"),
    ("unknown axis", [*B[:6], "zodiac", "--out", "{out}"], None, "zodiac"),
    ("boot 0", [*B, "--boot", "0", "--out", "{out}"], None, ">= 100"),
    ("boot negative", [*B, "--boot", "-5", "--out", "{out}"], None, ">= 100"),
    ("boot not a number", [*B, "--boot", "many", "--out", "{out}"], None, "not an integer"),
    ("seed negative", [*B, "--seed", "-1", "--out", "{out}"], None, ">= 0"),
    ("threads negative", [*B, "--threads", "-1", "--out", "{out}"], None, ">= 0"),
    ("yaml not utf-8", [*B[:4], "{f}", "--out", "{out}"], _bytes("c.yaml", b"name: caf\xe9\n"), "UTF-8"),
    ("yaml is a folder", [*B[:4], "{f}", "--out", "{out}"], _folder("c.yaml"), "folder"),
    ("yaml top-level list", [*B[:4], "{f}", "--out", "{out}"], _yaml("c.yaml", "- a\n- b\n"), "no context"),
    ("yaml no templates", [*B[:4], "{f}", "--out", "{out}"], _yaml("c.yaml", "name: x\nanswers: {positive: a}\n"),
     "templates"),
    ("yaml giant format spec", [*B[:4], "{f}", "--out", "{out}"],
     _yaml("c.yaml", _ctx(**{"{name}": "{name:>20000000}"})), "format spec"),
    ("yaml name is a relative path", [*B[:4], "{f}", "--out", "{out}"],
     _yaml("c.yaml", _ctx(**{"name: finance": "name: ../../evil"})), "name"),
    ("yaml name is an absolute path", [*B[:4], "{f}", "--out", "{out}"],
     _yaml("c.yaml", _ctx(**{"name: finance": "name: /tmp/evil"})), "name"),
    ("yaml outcomes a string", [*B[:4], "{f}", "--out", "{out}"],
     _yaml("c.yaml", _ctx() + "demographic:\n  outcomes: {positive: approved}\n"), "list of strings"),
    ("yaml syntax error", [*B[:4], "{f}", "--out", "{out}"], _yaml("c.yaml", "name: [x\n"), "YAML"),
    ("yaml python tag", [*B[:4], "{f}", "--out", "{out}"],
     _yaml("c.yaml", "!!python/object/apply:os.system ['true']\n"), "YAML"),
    ("yaml empty", [*B[:4], "{f}", "--out", "{out}"], _yaml("c.yaml", ""), "empty"),
    ("yaml too large", [*B[:4], "{f}", "--out", "{out}"], _yaml("c.yaml", "#" * 1_100_000), "at most"),
    ("out is a file", [*B, "--out", "{f}"], _yaml("taken.txt", "x"), "is a file"),
    ("out not empty", [*B, "--out", "{f}"], lambda d: (_folder("full")(d), (d / "full" / "x").write_text("x"))[0],
     "not empty"),
    ("intervention empty folder", [*B, "--intervention", "{f}", "--out", "{out}"], _folder("iv"),
     "no saved intervention"),
    ("intervention truncated json", [*B, "--intervention", "{f}", "--out", "{out}"],
     _iv(lambda: NeuronIntervention({0: [1]}), "truncate"), "not valid JSON"),
    ("intervention missing neurons", [*B, "--intervention", "{f}", "--out", "{out}"],
     _iv(lambda: NeuronIntervention({0: [1]}), lambda d: d.pop("neurons")), "neurons"),
    ("intervention unknown kind", [*B, "--intervention", "{f}", "--out", "{out}"],
     _iv(lambda: NeuronIntervention({0: [1]}), lambda d: d.update(kind="telepathy")), "telepathy"),
    ("intervention truncated tensors", [*B, "--intervention", "{f}", "--out", "{out}"],
     _iv(lambda: WeightMask({"model.layers.0.mlp.down_proj.weight": torch.tensor([1, 2])}), keep_tensors=False),
     "cannot be read"),
    ("intervention position past the context", [*B, "--intervention", "{f}", "--out", "{out}"],
     _iv(lambda: NeuronIntervention({0: [1]}, positions=[9999])), "outside this model's context"),
    ("intervention negative mask index", [*B, "--intervention", "{f}", "--out", "{out}"],
     _iv(lambda: WeightMask({"model.layers.0.mlp.down_proj.weight": torch.tensor([-1])})), "indices must lie"),
    ("intervention layer past the model", [*B, "--intervention", "{f}", "--out", "{out}"],
     _iv(lambda: NeuronIntervention({25: [1]})), "outside"),
    ("intervention from another model", [*B, "--intervention", "{f}", "--out", "{out}"],
     _iv(_other_model_iv), "made on"),
    ("crows missing column", [*CROWS, "--csv", "{f}", "--out", "{out}"], _yaml("c.csv", "sent_more\nx\n"),
     "missing columns"),
    ("crows empty sent_less", [*CROWS, "--csv", "{f}", "--out", "{out}"],
     _yaml("c.csv", CSV_HEAD + "A man ran,,stereo,gender\n"), "empty"),
    ("crows no bias_type", [*CROWS, "--csv", "{f}", "--out", "{out}"],
     _yaml("c.csv", CSV_HEAD + "A man ran,A woman ran,stereo,\n"), "bias_type"),
    ("crows latin-1", [*CROWS, "--csv", "{f}", "--out", "{out}"],
     _bytes("c.csv", (CSV_HEAD + "caf\xe9 a,caf\xe9 b,stereo,gender\n").encode("latin-1")), "UTF-8"),
    ("crows csv is a folder", [*CROWS, "--csv", "{f}", "--out", "{out}"], _folder("c.csv"), "folder"),
    ("crows boot 0", [*CROWS, "--csv", "x.csv", "--boot", "0", "--out", "{out}"], None, ">= 100"),
    ("bbq line is a number", [*CARD, "--bbq", "{f}", "--out", "{out}"], _yaml("b.jsonl", "42\n"), "JSON object"),
    ("bbq not utf-8", [*CARD, "--bbq", "{f}", "--out", "{out}"], _bytes("b.jsonl", b"\xff\xfe{}\n"), "UTF-8"),
    ("bbq missing fields", [*CARD, "--bbq", "{f}", "--out", "{out}"],
     _yaml("b.jsonl", json.dumps({k: v for k, v in BBQ_OK.items() if k != "label"}) + "\n"), "missing"),
    ("stereoset item not an object", [*CARD, "--stereoset", "{f}", "--out", "{out}"],
     _yaml("s.json", json.dumps({"data": {"intrasentence": [42]}})), "not an object"),
    ("card with nothing to measure", [*CARD, "--out", "{out}"], None, "nothing to measure"),
    ("export over the current folder", [*EXPORT, "--intervention", "{f}", "--out", ".", "--overwrite"],
     _iv(lambda: NeuronIntervention({0: [1]})), "refusing to replace"),
    ("export truncated intervention", [*EXPORT, "--intervention", "{f}", "--out", "{out}"],
     _iv(lambda: NeuronIntervention({0: [1]}), "truncate"), "not valid JSON"),
    ("export over a file", [*EXPORT, "--intervention", "{d}/iv", "--out", "{f}"],
     lambda d: (_iv(lambda: NeuronIntervention({0: [1]}))(d), _yaml("taken.bin", "x")(d))[1], "is a file"),
    ("prune unknown context", ["prune", "--model", "tiny", "--axis", "gender", "--select-on", "astrology", "--out", "{out}"], None,
     "Unknown context"),
    ("prune context twice", [*PRUNE, "finance", "--out", "{out}"], None, "twice"),
    ("prune k 0", [*PRUNE, "--k", "0", "--out", "{out}"], None, "k"),
    ("prune user yaml with a path as name", ["prune", "--model", "tiny", "--axis", "gender", "--select-on", "{f}", "--out", "{out}"],
     _yaml("c.yaml", _ctx(**{"name: finance": "name: ../x"})), "name"),
    ("gradiend layers past the model", ["gradiend", "--model", "tiny", "--axis", "gender", "--select-on", "finance", "--layers", "999",
                                        "--out", "{out}"], None, "999"),
    ("steer layer past the model", ["steer", "--model", "tiny", "--axis", "gender", "--select-on", "finance", "--layer", "999",
                                    "--out", "{out}"], None, "999"),
    ("study workers 0", ["study", "--model", "tiny", "--workers", "0", "--out", "{out}"], None, "workers"),
    ("study unknown context", ["study", "--model", "tiny", "--contexts", "astrology", "--out", "{out}"], None,
     "Unknown context"),
    ("unknown command", ["astrology"], None, "invalid choice"),
]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_exits_2_with_one_line_and_touches_nothing(case, tmp_path, monkeypatch, capsys):
    _, argv, maker, words = case
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    made = maker(tmp_path) if maker else ""
    out = tmp_path / "out"
    argv = [a.replace("{f}", made).replace("{out}", str(out)).replace("{d}", str(tmp_path)) for a in argv]
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as exited:
        raise SystemExit(main(argv))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[mechbias]")]
    assert exited.value.code == 2, err[-2000:]
    assert len(lines) == 1 and "error:" in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert words.lower() in lines[0].lower(), lines[0]
    assert _snapshot(tmp_path) == before  # nothing written, nothing deleted (--out not created either)


def test_the_fuzz_table_is_large():
    assert len(CASES) >= 40
    commands = {c[1][0] for c in CASES}
    assert {"bias", "crows", "card", "export", "prune", "gradiend", "steer", "study"} <= commands
