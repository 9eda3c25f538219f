"""The official ``gradiend`` package (PyPI) beside mechbias' GRADIEND: its training table, its trained
model read back as a :class:`GradiendResult`, and run-time settings that make it usable on a CPU.

Nothing here imports ``gradiend``; callers pass its objects (so mechbias does not depend on it).

The package's decoder-only training rows (``gradiend`` 0.2.3) put the label on the *last token of the
text* and Hugging Face's causal loss shifts labels by one, so the package's gradient for
``"... Hunter said that[MASK]"`` is the gradient of predicting " he" *in place of* " that" (measured in
``tests/test_gradiend_package.py``: equal to mechbias' gradient of the text without its last word). To
train the package on the same prediction as mechbias (the token after the whole text),
:func:`package_frame` appends one filler token after the text (:data:`FILLER`); under a causal mask the
filler cannot change the logits before it. ``filler=""`` gives the package's own convention.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ...data.axes import load_axis
from ...data.prompts import tokenize
from .gradients import ParamSet, batch_gradient
from .model import GradiendModel
from .pool import validation_names
from .texts import feature_texts
from .train import GradiendResult

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

FILLER = " ."
PAD_TO = 48


def package_frame(model: TransformerBridge, context: str, axis: str, *, seed: int = 0, filler: str = FILLER) -> pd.DataFrame:
    """The package's merged training table for one context and axis, on mechbias' splits.

    Selection templates with training names -> ``train``, with validation names -> ``validation``
    (as mechbias splits them for ``seed``); held-out templates and names -> ``test``. Columns are the
    package's (``masked``, ``label``, ``label_class``, ``alternative``, ``alternative_class``, ``split``).
    """
    ax = load_axis(axis)
    val = validation_names(ax, seed)
    tok = model.tokenizer
    rows = []
    longest = 0
    for which in ("selection", "heldout"):
        for t in feature_texts(model, context, axis, templates=which, names=which, seed=seed):
            ids_f = tokenize(model, [t.text + filler])[0].tolist()
            if filler:
                ids = tokenize(model, [t.text])[0].tolist()
                if len(ids_f) != len(ids) + 1 or ids_f[:-1] != ids:
                    raise ValueError(f"the filler {filler!r} is not one separate token after {t.text!r}")
            longest = max(longest, len(ids_f))
            split = "test" if which == "heldout" else ("validation" if t.name in val else "train")
            rows.append({"masked": t.text + filler + "[MASK]", "label": tok.decode([t.factual]),
                         "label_class": ax.groups[t.group], "alternative": tok.decode([t.counterfactual]),
                         "alternative_class": ax.groups[1 - t.group], "split": split, "name": t.name,
                         "template": t.template})
    if longest + 1 > PAD_TO:
        raise ValueError(f"a text has {longest} tokens; the package pads to PAD_TO = {PAD_TO}")
    return pd.DataFrame(rows)


def from_package(gradiend_model: Any, ps: ParamSet, context: str, axis: str, *,
                 param_sizes: dict[str, int]) -> GradiendResult:
    """Read a trained package model (``ModelWithGradiend.gradiend``) into a :class:`GradiendResult`.

    The package's encoder and decoder are dense layers over its parameter map in the map's order (its
    names are the Hugging Face names, as mechbias'); the entries of ``ps`` are picked out in ``ps``'s
    order. ``param_sizes`` gives each mapped parameter's element count (from the base model).
    """
    pmap = gradiend_model.param_map
    if any(spec.get("repr") != "all" for spec in pmap.values()):
        raise ValueError("the package's parameter map is not dense ('all'); cannot read it out")
    enc, dec = gradiend_model.encoder[0].linear, gradiend_model.decoder[0].linear
    w_e = enc.weight.detach().reshape(-1).float()
    w_d = dec.weight.detach().reshape(-1).float()
    b_d = dec.bias.detach().reshape(-1).float()
    offsets, lo = {}, 0
    for n in pmap:
        offsets[n] = (lo, lo + int(param_sizes[n]))
        lo += int(param_sizes[n])
    if lo != w_e.numel() or lo != w_d.numel():
        raise ValueError(f"the package's encoder has {w_e.numel()} inputs, its parameter map {lo}")
    missing = [n for n in ps.names if n not in offsets]
    if missing:
        raise ValueError(f"parameters not in the package's map: {missing}")
    pick = torch.cat([torch.arange(*offsets[n]) for n in ps.names])
    b_e = enc.bias.detach().reshape(-1).float().clone()
    return GradiendResult(context, axis, list(ps.names), [list(s) for s in ps.shapes], w_e[pick].clone(), b_e,
                          w_d[pick].clone(), b_d[pick].clone(), meta={"source": "gradiend package"})


def selection_sign(model: TransformerBridge, res: GradiendResult, frame: pd.DataFrame, n: int = 16) -> float:
    """+1 if ``res`` encodes group A above group B on the frame's validation rows (selection templates,
    validation names), else -1: the orientation is decided without the held-out split."""
    rows = frame[frame["split"] == "validation"]
    groups = sorted(set(rows["label_class"]))
    ax_groups = load_axis(res.axis).groups
    tok = model.tokenizer
    means = []
    for cls in (ax_groups[0], ax_groups[1]):
        sub = rows[rows["label_class"] == cls].head(n)
        if sub.empty:
            raise ValueError(f"no validation rows of group {cls!r} (groups present: {groups})")
        vals = []
        for _, r in sub.iterrows():
            text = r["masked"].replace("[MASK]", "")
            text = text[: len(text) - len(FILLER)] if text.endswith(FILLER) else text
            target = tok(r["label"], add_special_tokens=False)["input_ids"][0]
            vals.append(res.model.encode(batch_gradient(model, res.param_set, [text], [target])))
        means.append(sum(vals) / len(vals))
    return 1.0 if means[0] >= means[1] else -1.0


def oriented(res: GradiendResult, sign: float) -> GradiendResult:
    """``res`` with its encoding negated when ``sign < 0`` (the package may encode group A as -1)."""
    if sign >= 0:
        return res
    gm = GradiendModel.from_state({"w_e": res.w_e.clone(), "b_e": res.b_e.clone(), "w_d": res.w_d.clone(),
                                   "b_d": res.b_d.clone()})
    gm.flip()
    st = gm.state()
    return GradiendResult(res.context, res.axis, res.param_names, res.param_shapes, st["w_e"], st["b_e"], st["w_d"],
                          st["b_d"], meta={**res.meta, "flipped": True})


@contextmanager
def package_speed(dataset_cls: Any, tokenizer_cls: Any, pad_to: int = PAD_TO) -> Iterator[None]:
    """Run-time settings for the package on a CPU; neither changes what it computes.

    ``dataset_cls`` (its ``TextTrainingDataset``) pads every text to ``max_length`` (256, not exposed by
    its trainer): set to ``pad_to``; right padding under a causal mask leaves the last real token's
    gradient unchanged. ``tokenizer_cls`` (transformers' ``TokenizersBackend``) rebuilds its vocabulary
    dictionary on every ``vocab`` access (49 ms for 49k tokens, twice per row): cached per tokenizer.
    Both are restored on exit.
    """
    init, get_vocab = dataset_cls.__init__, tokenizer_cls.get_vocab

    def init_short(self, *a, **k):
        k["max_length"] = pad_to
        init(self, *a, **k)

    def cached_vocab(self):
        if "_mechbias_vocab" not in self.__dict__:
            self.__dict__["_mechbias_vocab"] = get_vocab(self)
        return self.__dict__["_mechbias_vocab"]

    dataset_cls.__init__, tokenizer_cls.get_vocab = init_short, cached_vocab
    try:
        yield
    finally:
        dataset_cls.__init__, tokenizer_cls.get_vocab = init, get_vocab
