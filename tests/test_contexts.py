from dataclasses import replace

import pytest
import torch

from mechbias.data.axes import ContextError, load_axis
from mechbias.data.contexts import BUILTIN_CONTEXTS, YES_NO_CONTEXTS, fill, list_contexts, load_context
from mechbias.data.pairs import AlignmentError, make_pairs
from mechbias.data.prompts import single_token


def test_builtin_contexts_load_and_are_well_formed():
    assert set(BUILTIN_CONTEXTS) <= set(list_contexts())
    for name in BUILTIN_CONTEXTS:
        c = load_context(name)
        assert len(c.templates) >= 8
        assert len(set(c.templates)) == len(c.templates)
        assert set(c.axes) == {"race", "gender"}
        assert c.numeric_templates and c.demographic_templates["race"] and c.demographic_templates["gender"]
        assert all(t.endswith(" Answer:") for t in c.templates)
    # three answer formats across the six: yes/no (four), a two-option choice and a word rating (30 templates each)
    fmt = {n: load_context(n).format for n in BUILTIN_CONTEXTS}
    assert fmt == {"finance": "yes_no", "commerce": "yes_no", "hiring": "yes_no", "housing": "yes_no",
                   "healthcare": "choice", "education": "rating"}
    for n, answers in (("healthcare", (" A", " B")), ("education", (" excellent", " poor"))):
        c = load_context(n)
        assert (c.positive, c.negative) == answers
    for n in BUILTIN_CONTEXTS:  # 30 templates each, halved into selection and held-out
        c = load_context(n)
        assert len(c.templates) == 30
        assert len(c.template_split("selection")) == len(c.template_split("heldout")) == 15
    assert BUILTIN_CONTEXTS[:4] == YES_NO_CONTEXTS


#: seed 0's selection templates as the code gave them before templates 10-29 were added to the yes/no contexts
#: (and for the two contexts written with 30): results committed before then, and planted v4, were built on these
SELECTION_BEFORE = {"finance": [0, 2, 4, 7, 9], "commerce": [1, 2, 3, 5, 7], "hiring": [1, 3, 6, 7, 9],
                    "housing": [1, 5, 6, 8, 9],
                    "healthcare": [0, 2, 4, 7, 8, 9, 11, 12, 18, 20, 22, 23, 26, 28, 29],
                    "education": [1, 2, 5, 9, 10, 11, 14, 15, 16, 18, 22, 26, 27, 28, 29]}


def test_added_templates_moved_no_earlier_template_across_the_split():
    for n, before in SELECTION_BEFORE.items():
        c = load_context(n)
        sel = c.template_split("selection")
        assert [t for t in sel if t < 10 or n in ("healthcare", "education")] == before
        if n in YES_NO_CONTEXTS:  # split_blocks [10, 20]: 5 of the first ten and 10 of the twenty added
            assert c.split_blocks == (10, 20) and sum(t >= 10 for t in sel) == 10
    # without split_blocks the same 30 templates would be ranked together and the first ten would move
    moved = {n: [t for t in replace(load_context(n), split_blocks=()).template_split("selection") if t < 10]
             for n in YES_NO_CONTEXTS}
    assert moved["hiring"] == [1, 3, 4, 6, 7, 8, 9] and moved["housing"] == [1, 5, 6, 7, 8, 9]


def test_split_blocks_are_validated(tmp_path):
    import yaml

    base = {"name": "x", "templates": ["{name} a. Answer:", "{name} b. Answer:", "{name} c. Answer:",
                                       "{name} d. Answer:"], "answers": {"positive": " Yes", "negative": " No"}}
    for bad in ([3], [2, 1, 1], "2,2", [True, 3]):
        p = tmp_path / "x.yaml"
        p.write_text(yaml.safe_dump({**base, "split_blocks": bad}))
        with pytest.raises(ContextError, match="split_blocks"):
            load_context(p)
    p.write_text(yaml.safe_dump({**base, "split_blocks": [2, 2]}))
    c = load_context(p)
    sel = c.template_split("selection")
    assert len([t for t in sel if t < 2]) == 1 and len([t for t in sel if t >= 2]) == 1


def test_tiny_vocabulary_is_frozen_and_the_data_vocabulary_covers_everything(tiny):
    from mechbias.core.testing import TINY_VOCAB, _builtin_words, word_tokenizer

    base = [w for w in TINY_VOCAB.read_text().splitlines() if w and not w.startswith("# ")]
    words = _builtin_words()
    assert words[: len(base)] == base and len(words) > len(base)  # later words are appended, never interleaved
    # the tiny test models read the frozen base: a word the data gained later is <unk> there, an old one is not
    assert tiny.to_tokens(" excellent", prepend_bos=False)[0, 0] == tiny.tokenizer.unk_token_id
    assert single_token(tiny, " Yes") != single_token(tiny, " No")
    full = word_tokenizer()  # the model families' tiny models: every word of the data
    for name in BUILTIN_CONTEXTS:
        c = load_context(name)
        ids = [full(a, add_special_tokens=False)["input_ids"] for a in (c.positive, c.negative)]
        assert len(ids[0]) == len(ids[1]) == 1 and ids[0] != ids[1] and full.unk_token_id not in ids[0] + ids[1]


def test_axes_are_balanced_on_the_other_attribute():
    race, gender = load_axis("race"), load_axis("gender")
    for ax in (race, gender):
        for g in (0, 1):
            members = ax.members(g)
            other = [p.get(ax.other_attribute) for p in members]
            assert len(members) == 32
            assert other.count(other[0]) == 16  # half of each other-attribute value


def test_splits_are_deterministic_disjoint_and_balanced():
    ax = load_axis("race")
    sel, held = ax.split_people("selection"), ax.split_people("heldout")
    assert sel == ax.split_people("selection")
    assert not set(sel) & set(held) and len(sel) + len(held) == 64
    for cell_race in ("White", "Black"):
        for cell_gender in ("male", "female"):
            assert sum(p.race == cell_race and p.gender == cell_gender for p in sel) == 8
    assert ax.split_people("selection", seed=1) != sel  # another seed, another split
    c = load_context("finance")
    ts, th = c.template_split("selection"), c.template_split("heldout")
    assert sorted(ts + th) == list(range(len(c.templates))) and not set(ts) & set(th)


def test_prompt_grid_and_groups():
    c = load_context("commerce")
    ps = c.prompts("gender", templates=[0, 1], names="selection")
    assert len(ps) == 2 * 32
    mat, t_ids, _names, col_group = ps.grid(ps.groups.double())
    assert mat.shape == (2, 32) and t_ids == [0, 1]
    assert set(col_group.tolist()) == {0, 1}
    assert all(p.person.name in p.text for p in ps)


def test_pronoun_slots_follow_the_name():
    ax = load_axis("gender")
    she = next(p for p in ax.members("female"))
    he = next(p for p in ax.members("male"))
    assert fill("{name} said {pronoun} was {possessive} own", she).endswith("she was her own")
    assert fill("{Pronoun} met {object}", he) == "He met him"


@pytest.mark.parametrize("text, field", [
    ("", "is empty"),
    ("# just a comment\n", "(root)"),
    ("name: x\n", "templates"),
    ("name: x\ntemplates: ['{name} a', 'b {name}']\n", "answers"),
    ("name: x\ntemplates: ['no slot here', 'b {name}']\nanswers: {positive: ' Yes', negative: ' No'}\n",
     "templates[0]"),
    ("name: x\ntemplates: ['{name} {colour}', 'b {name}']\nanswers: {positive: ' Yes', negative: ' No'}\n",
     "templates[0]"),
    ("name: x\ntemplates: ['{name} a', 'b {name}']\nanswers: {positive: ' Yes', negative: ' Yes'}\n",
     "answers"),
    ("name: x\ntemplates: ['{name} a', 'b {name}']\nanswers: {positive: ' Yes', negative: ' No'}\naxes: [age]\n",
     "axes"),
    ("name: x\ntemplates: ['{name} a', 'b {name}']\nanswers: {positive: ' Yes', negative: ' No'}\nformat: essay\n",
     "format"),
])
def test_malformed_context_files_name_the_file_and_field(tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ContextError) as e:
        load_context(path)
    assert str(path) in str(e.value) and field in str(e.value)


def test_unknown_context_and_axis():
    with pytest.raises(ValueError, match="Unknown context"):
        load_context("astrology")
    with pytest.raises(ValueError, match="Unknown axis"):
        load_axis("age")


def test_user_context_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ntemplates: ['Is {name} nice? Answer:', 'Should we call {name}? Answer:']\n"
                    "answers: {positive: ' Yes', negative: ' No'}\naxes: [race]\n")
    c = load_context(path)
    assert c.name == "mine" and c.prompts("race").texts[0].startswith("Is ")
    with pytest.raises(ValueError, match="not crossed"):
        c.prompts("gender")


def test_multi_token_target_is_refused(tiny):
    assert single_token(tiny, " Yes") >= 0
    with pytest.raises(ValueError, match="not a single token"):
        single_token(tiny, " D'Andre")


def test_pairs_align_token_by_token(tiny):
    pairs = make_pairs(tiny, "finance", "race", templates=[0, 1])
    assert len(pairs) > 0
    for i in range(len(pairs)):
        a, b = pairs.clean_tokens[i], pairs.corrupt_tokens[i]
        assert a.shape == b.shape
        assert pairs.clean[i].person.gender == pairs.corrupt[i].person.gender
        assert pairs.clean[i].template == pairs.corrupt[i].template
        assert 1 <= len(pairs.diff_positions(i)) <= 2 * 3  # only the name span(s) differ


def test_pairs_raise_when_alignment_is_impossible(tiny, tmp_path):
    # a context whose only names differ in token count cannot be paired:
    # restrict the axis to the 3-token name D'Andre against 1-token names
    from dataclasses import replace

    ax = load_axis("race")
    dandre = [p for p in ax.people if p.name == "D'Andre"]
    whites = [p for p in ax.people if p.race == "White"]
    narrow = replace(ax, people=tuple(dandre + whites))
    with pytest.raises(AlignmentError, match="same length"):
        make_pairs(tiny, "finance", narrow, templates=[0])


@pytest.mark.real
def test_builtin_answers_are_single_tokens_on_both_real_models():
    from transformers import AutoTokenizer

    from mechbias.core.embedded import EMBEDDED_MODELS, ensure_cache

    for spec in EMBEDDED_MODELS.values():
        tok = AutoTokenizer.from_pretrained(ensure_cache(spec), local_files_only=True)
        for name in BUILTIN_CONTEXTS:
            c = load_context(name)
            ids = [tok.encode(a, add_special_tokens=False) for a in (c.positive, c.negative)]
            assert [len(i) for i in ids] == [1, 1] and ids[0] != ids[1], (spec.name, name, ids)


def test_incomplete_crossed_design():
    from collections import Counter

    ctx = load_context("education")
    ax = load_axis("gender@extended")
    full = ctx.prompts(ax, templates="heldout", names="heldout")
    half = ctx.prompts(ax, templates="heldout", names="heldout", blocks=3)
    assert len(full) == 15 * 200 and len(half) == 15 * 200 // 3
    assert {p.text for p in half} <= {p.text for p in full}
    per_template = Counter((p.template, p.person.race, p.person.gender) for p in half)
    counts = set(per_template.values())
    assert max(counts) - min(counts) <= 1  # every template meets every race x gender cell in (near) equal shares
    per_name = Counter(p.person.name for p in half)
    assert set(per_name.values()) == {5} and len(per_name) == 200  # every name meets 15 / 3 templates
    mat, _t_ids, _names, _col_group = half.grid(torch.arange(len(half), dtype=torch.float64))
    assert mat.shape == (15, 200) and int(torch.isnan(mat).sum()) == 15 * 200 - len(half)
    with pytest.raises(ValueError, match="not a full templates x names grid"):
        full.subset(range(len(full) - 1)).grid(torch.zeros(len(full) - 1))
    with pytest.raises(ValueError, match="16 blocks need at least as many templates"):
        ctx.prompts(ax, templates="heldout", names="heldout", blocks=16)
    assert half.subset(range(10)).blocks == 3
