"""The interactive report's pieces: matrices with their numbers on hover, colours by sign, rich Jupyter tables."""

import re

from mechbias.eval.crows import CrowsResult
from mechbias.viz.html import cell_tip, diverging, esc, matrix_html, page, svg_heatmap

CELLS = [
    {"selected_on": "finance", "evaluated_on": "finance", "level": "L1", "gap_before": -0.2, "gap_change": 0.1,
     "ci_low": 0.02, "ci_high": 0.18, "p_value": 0.01, "p_adjusted": 0.02, "min_detectable": 0.07,
     "gap_removed": 0.1, "reduction": 0.5, "reduction_ci_low": 0.1, "reduction_ci_high": 0.9,
     "perplexity_change": 1.25, "n_components": 4,
     "controls": {"matched": {"gap_change": 0.01, "ci_low": -0.02, "ci_high": 0.04, "perplexity_change": 0.5}}},
    {"selected_on": "finance", "evaluated_on": "commerce", "level": "L1", "gap_before": -0.1, "gap_change": -0.05,
     "ci_low": -0.12, "ci_high": 0.02, "p_value": 0.2, "p_adjusted": 0.3, "min_detectable": 0.1,
     "gap_removed": -0.05, "reduction": None, "perplexity_change": 1.25, "n_components": 4, "controls": {}},
]


def test_matrix_cells_carry_their_numbers_and_colours():
    out = matrix_html(CELLS, title="m")
    tds = re.findall(r"<td class='cell' style='background:(rgb\([^)]*\))' data-tip='([^']*)'>([^<]*)", out)
    assert len(tds) == 2
    (c1, tip1, txt1), (c2, tip2, txt2) = tds
    assert txt1 == "+0.100*" and txt2 == "-0.050"  # * = BH-adjusted p < 0.05
    # full colour = the largest |gap before| (0.2): +0.1 removes half of it; negative is blue
    assert c1 == "rgb(255,180,180)" and c2 == "rgb(217,217,255)"
    assert "gap change   +0.100 [+0.020, +0.180]" in tip1 and "control matched: gap change +0.010" in tip1
    assert "perplexity change +1.250" in tip1
    assert "not estimable" in tip2
    assert tip1 == esc(cell_tip(CELLS[0]))


def test_diverging_is_white_at_zero_and_grey_for_missing():
    assert diverging(0.0, 1.0) == "rgb(255,255,255)" and diverging(float("nan"), 1.0) == "#eeeeee"
    assert diverging(5.0, 1.0) == diverging(1.0, 1.0)  # saturated


def test_heatmap_and_page_are_self_contained():
    import numpy as np

    svg = svg_heatmap(np.array([[0.5, -0.25], [0.0, 1.0]]), "layer", "head", lambda i, j: f"L{i}H{j}")
    assert svg.count("<rect") == 4 and "data-tip='L1H0'" in svg
    doc = page("t", [svg])
    assert doc.startswith("<!DOCTYPE html>") and "<script>" in doc and "src=" not in doc and "http" not in doc


def test_results_render_as_rich_tables():
    res = CrowsResult(55.0, 40.0, 70.0, 10, {}, per_pair=[{"bias_type": "race", "logprob_stereo": -3.25}])
    out = res._repr_html_()
    assert out.startswith("<b>CrowsResult</b>") and "-3.25" in out and "race" in out


def _step(root, name: str, summary: dict) -> None:
    import json

    d = root / "steps" / name
    (d / "transfer").mkdir(parents=True)  # a method run's layout: the cells in transfer/, no cells in summary.json
    (d / "transfer" / "result.json").write_text(json.dumps({"result_type": "transfer", "cells": CELLS}))
    (d / "summary.json").write_text(json.dumps({"title": name, "selections": {}, **summary}))


def test_methods_render_their_own_report_sections(tmp_path):
    """The study page lays out what each registered method renders from its own step (viz never reads a
    method's files): a pruning curve from the pruning step's summary, nothing for a name no method holds."""
    from mechbias.apps.study import method_sections
    from mechbias.viz.html import study_html

    curve = [{"k": 2, "gap_change": 0.04}, {"k": 5, "gap_change": 0.09}, {"k": 10, "gap_change": 0.125}]
    _step(tmp_path, "prune_head", {"method": "prune", "analysis": {"curve": curve}})
    _step(tmp_path, "mystery", {"method": "no-such-method"})
    with_sections = study_html(tmp_path, sections=method_sections)
    plain = study_html(tmp_path)
    assert "<h3>Pruning curve</h3>" in with_sections and "<h3>Pruning curve</h3>" not in plain
    # the curve's points carry their numbers: one tooltip per k, in order
    tips = re.findall(r'&quot;k&quot;: (\d+)', with_sections)
    assert tips == ["2", "5", "10"]
    assert with_sections.count("data-matrix=") == plain.count("data-matrix=") == 2
