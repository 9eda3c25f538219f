"""No decision sees held-out data: selection runs inside a guard that refuses reporting texts and held-out
prompts, and every registered method selects under it."""

import pytest

from mechbias.data.axes import load_axis
from mechbias.data.contexts import load_context
from mechbias.data.leakage import LeakageError, selection_phase
from mechbias.data.neutral import neutral_texts
from mechbias.eval.transfer import transfer_matrix
from mechbias.interventions.units import NeuronIntervention
from mechbias.methods.base import registered_methods
from mechbias.methods.ig2 import demographic_units


def test_capability_texts_are_split_in_two_disjoint_halves():
    sel, rep, every = (neutral_texts(split=s) for s in ("selection", "reporting", "all"))
    assert not set(sel) & set(rep) and set(sel) | set(rep) == set(every) and len(sel) == len(rep) == 14
    with pytest.raises(ValueError, match="split"):
        neutral_texts(split="train")


def test_the_guard_refuses_reporting_data_inside_a_decision():
    ctx = load_context("finance")
    with selection_phase("a test"):
        neutral_texts(split="selection")
        ctx.prompts("race", templates="selection", names="selection")
        for call in (lambda: neutral_texts(split="reporting"), lambda: neutral_texts(split="all"),
                     lambda: ctx.prompts("race", templates="heldout", names="selection"),
                     lambda: ctx.prompts("race", templates="selection", names="heldout"),
                     lambda: load_axis("race").split_people("all"),
                     lambda: demographic_units(ctx, "race", outcomes="heldout")):
            with pytest.raises(LeakageError, match="a test"):
                call()
    ctx.prompts("race", templates="heldout", names="heldout")  # evaluation outside the guard is fine


def test_a_selector_that_peeks_at_held_out_prompts_is_stopped(tiny):
    def peeking(model, context, axis):
        context.prompts(axis, templates="heldout", names="heldout")  # a decision must not look here
        return NeuronIntervention({0: [1]})

    with pytest.raises(LeakageError):
        transfer_matrix(tiny, peeking, ["finance"], "race", n_random=0, capability=False, n_boot=20)


@pytest.mark.parametrize("name", sorted(registered_methods()))
def test_every_registered_method_selects_on_selection_data_only(tiny, name):
    cls = registered_methods()[name]
    small = {"ig2": dict(pairs=1, min_per_bag=1, steps=2, plain_ig=False),
             "patch": dict(pairs=2, components=("heads",), atp=False),
             "prune": dict(unit="head", k=2, common=None), "steer": dict(layer=1),
             "gradiend": dict(steps=2, seeds=(0,), h=(1.0,), alpha=(0.01,),
                              max_ppl_increase=10.0, edit_names=4, edit_texts=1, shuffled_control=False)}
    cfg = cls.Config(**small.get(name, {}))
    method = cls(cfg)
    with selection_phase(f"{name} under test"):
        sel = method.select(tiny, load_context("finance"), "race")
    assert sel.intervention is not None and sel.context == "finance"
