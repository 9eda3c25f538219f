"""IG² units: what gets attributed (demographic-prediction prompts, or contrast pairs of names)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...data.axes import load_axis, stable_hash
from ...data.contexts import Context, fill, load_context
from ...data.leakage import check_not_reporting

# ----------------------------------------------------------------------------
# units: what gets attributed
# ----------------------------------------------------------------------------

@dataclass
class Unit:
    """A weighted sum of prompt gaps: ``Σ_j weights[j] · G(texts[j])`` for targets ``d1``, ``d2``."""

    texts: list[str]
    weights: list[float]
    d1: str
    d2: str
    bag: str
    info: dict = field(default_factory=dict)


def demographic_units(context: Context | str, axis, *, favoured: int = 0, outcomes: str = "selection",
                      paired: bool = True, seed: int = 0) -> list[Unit]:
    """IG² demographic-prediction units (the paper's prompts, per context).

    After a favourable outcome the stereotyped prediction is the favoured
    group's word, after an unfavourable one the other group's word, so
    d1 = the favoured group's word and a prompt's weight is +1 after a
    favourable and -1 after an unfavourable outcome.

    ``paired=False`` is the paper's form: one prompt per unit, a bag is one
    outcome word in every template. ``paired=True`` (default) pairs the k-th
    favourable with the k-th unfavourable outcome word in the same template
    (weights +1, -1): the template's fixed preference between the two words
    (e.g. for the word mentioned last) cancels, leaving the outcome-dependent
    association. A bag is then one outcome pair in every template.
    ``outcomes`` keeps half of the outcome words (or pairs): ``selection``,
    ``heldout`` or ``all``, deterministically.
    """
    check_not_reporting("outcome words", outcomes)
    ctx = load_context(context)
    ax = load_axis(axis)
    fav, other = ax.words[ax.groups[favoured]], ax.words[ax.groups[1 - favoured]]
    if not ctx.outcomes or ax.name not in ctx.demographic_templates:
        raise ValueError(f"context {ctx.name!r} has no demographic prompts for axis {ax.name!r}")
    tpls = ctx.demographic_templates[ax.name]
    pos, neg = list(ctx.outcomes.get("positive", ())), list(ctx.outcomes.get("negative", ()))

    def keep(items, key):
        ordered = sorted(items, key=lambda w: stable_hash(seed, f"{ctx.name}:outcome:{key(w)}"))
        half = (len(ordered) + 1) // 2
        return {"selection": ordered[:half], "heldout": ordered[half:], "all": ordered}[outcomes]

    units = []
    if paired:
        if not pos or not neg:
            raise ValueError(f"context {ctx.name!r} needs positive and negative outcomes for paired units")
        pairs = keep(list(zip(pos, neg, strict=True)), key=lambda pn: f"{pn[0]}/{pn[1]}")
        for pw, nw in pairs:
            for t, tpl in enumerate(tpls):
                units.append(Unit([tpl.replace("{outcome}", pw), tpl.replace("{outcome}", nw)], [1.0, -1.0], fav,
                                  other, bag=f"{pw}/{nw}", info={"template": t, "outcome": f"{pw}/{nw}"}))
    else:
        for pol, words in (("positive", pos), ("negative", neg)):
            for w in keep(words, key=lambda w: w):
                for t, tpl in enumerate(tpls):
                    units.append(Unit([tpl.replace("{outcome}", w)], [1.0 if pol == "positive" else -1.0], fav,
                                      other, bag=f"{pol}:{w}", info={"template": t, "outcome": w, "polarity": pol}))
    if not units:
        raise ValueError(f"no demographic units for context {ctx.name!r} ({outcomes})")
    return units


def contrast_units(context: Context | str, axis, *, favoured: int = 0, templates="selection",
                   names="selection", pairs_per_template: int | None = 8, seed: int = 0) -> list[Unit]:
    """IG² contrast-pair units: one template with a group-A and a group-B name.

    The target is the contrast answer (d1 = positive, d2 = negative answer,
    both single tokens); weights ``+s, -s`` with ``s`` = +1 if group A is
    favoured, so attributions point towards the observed bias. A bag is a
    template. Pairs match the other attribute (same gender for race pairs) but
    need not align token by token.
    """
    ctx = load_context(context)
    ax = load_axis(axis)
    t_idx = ctx.template_split(templates, seed) if isinstance(templates, str) else list(templates)
    ppl = ax.split_people(names, seed)
    s = 1.0 if favoured == 0 else -1.0
    units = []
    for t in t_idx:
        a = sorted([p for p in ppl if ax.group_index(p) == 0], key=lambda p: stable_hash(seed, f"u:{t}:{p.name}"))
        b = sorted([p for p in ppl if ax.group_index(p) == 1], key=lambda p: stable_hash(seed, f"u:{t}:{p.name}"))
        pairs = []
        used = set()
        for pa in a:
            pb = next((p for p in b if p not in used and p.get(ax.other_attribute) == pa.get(ax.other_attribute)), None)
            if pb is None:
                continue
            used.add(pb)
            pairs.append((pa, pb))
        if pairs_per_template is not None:
            pairs = pairs[:pairs_per_template]
        for pa, pb in pairs:
            units.append(Unit([fill(ctx.templates[t], pa), fill(ctx.templates[t], pb)], [s, -s], ctx.positive,
                              ctx.negative, bag=f"template:{t}",
                              info={"template": t, "name_a": pa.name, "name_b": pb.name}))
    return units


