"""The planted-bias deltas: their values, the shipped versions and how they load.

A planted model is the embedded SmolLM2 with a :class:`PlantedDelta` written into a few MLP neurons and attention
heads (:mod:`mechbias.groundtruth.construct` builds v3 and v4, :mod:`mechbias.groundtruth.staged` trained v2).
The shipped deltas live in ``data/files/planted/v*``; this module registers their names with
:func:`mechbias.core.models.register_model`, so ``load_model("planted-v4")`` works wherever mechbias is imported.
The manifest (which units carry which context's bias) is kept in the model's
:class:`~mechbias.core.models.ModelInfo`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..core.embedded import load_embedded
from ..core.models import DATA_FILES, EMBEDDED, model_info, register_model
from ..core.params import attn_weights, head_rows, mlp_weights

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

PLANTED = "planted"
PLANTED_DIR = DATA_FILES / "planted"
#: model names of the shipped planted variants and their folders: v2 (trained; shared neurons carry most of every
#: context's gap), v3 (built by construction; private finance and commerce chains), v4 (gender, realistic
#: size, built on selection data only) and v5 (v4 with a pooled context read, ramp-gated prediction neurons and
#: erasers: 0.1-0.3 held out in its own context, at most 0.05 in every other; see docs/groundtruth.md)
PLANTED_VERSIONS = {PLANTED: PLANTED_DIR / "v2", "planted-v2": PLANTED_DIR / "v2", "planted-v3": PLANTED_DIR / "v3",
                    "planted-v4": PLANTED_DIR / "v4", "planted-v5": PLANTED_DIR / "v5"}


@dataclass
class PlantedDelta:
    """New values for a set of MLP neurons and attention heads.

    ``layers``: per layer, neuron indices with their gate/up rows and down columns.
    ``heads``: per layer, head indices with their query rows ``[n, d_head, d_model]``
    and output columns ``[d_model, n, d_head]`` (empty for neuron-only deltas).
    """

    layers: dict  # layer -> {"index": Tensor, "gate": Tensor[n, d], "up": Tensor[n, d], "down": Tensor[d, n]}
    heads: dict = field(default_factory=dict)  # layer -> {"index": Tensor, "q": Tensor, "o": Tensor}

    def apply(self, model: TransformerBridge) -> None:
        """Write the values into the model (a permanent edit)."""
        with torch.no_grad():
            for l, d in self.layers.items():
                g, u, o = mlp_weights(model, int(l))
                idx = d["index"].long()
                g[idx] = d["gate"].to(g.dtype)
                u[idx] = d["up"].to(u.dtype)
                o[:, idx] = d["down"].to(o.dtype)
            for l, d in self.heads.items():
                q, o = attn_weights(model, int(l))
                rows = head_rows(d["index"].long(), model.cfg.d_head)
                q[rows] = d["q"].reshape(len(rows), -1).to(q.dtype)
                o[:, rows] = d["o"].reshape(o.shape[0], len(rows)).to(o.dtype)

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for l, d in self.layers.items():
            for k, v in d.items():
                out[f"{l}.{k}"] = v.contiguous()
        for l, d in self.heads.items():
            for k, v in d.items():
                out[f"attn.{l}.{k}"] = v.contiguous()
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor]) -> PlantedDelta:
        layers: dict = {}
        heads: dict = {}
        for key, v in t.items():
            parts = key.split(".")
            if parts[0] == "attn":
                heads.setdefault(int(parts[1]), {})[parts[2]] = v
            else:
                layers.setdefault(int(parts[0]), {})[parts[1]] = v
        return cls(layers, heads)

    @classmethod
    def capture(cls, model: TransformerBridge, neurons, heads=()) -> PlantedDelta:
        """The current values of the given ``(layer, neuron)`` and ``(layer, head)`` pairs."""
        layers: dict = {}
        for l in sorted({l for l, _ in neurons}):
            idx = torch.tensor(sorted(i for ll, i in neurons if ll == l))
            g, u, o = mlp_weights(model, l)
            layers[l] = {"index": idx, "gate": g.detach()[idx].clone(), "up": u.detach()[idx].clone(),
                         "down": o.detach()[:, idx].clone()}
        by_head: dict = {}
        d_head = model.cfg.d_head
        for l in sorted({l for l, _ in heads}):
            idx = torch.tensor(sorted(h for ll, h in heads if ll == l))
            q, o = attn_weights(model, l)
            rows = head_rows(idx, d_head)
            by_head[l] = {"index": idx, "q": q.detach()[rows].clone().reshape(len(idx), d_head, -1),
                          "o": o.detach()[:, rows].clone().reshape(o.shape[0], len(idx), d_head)}
        return cls(layers, by_head)




def load_delta(folder: Path = PLANTED_DIR / "v2") -> tuple[PlantedDelta, dict]:
    """A planted delta and its manifest from a folder (``delta.safetensors`` + ``manifest.json``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "delta.safetensors").exists():
        raise FileNotFoundError(f"no planted delta in {folder}; run analyses/train_planted.py to create it")
    return PlantedDelta.from_tensors(load_file(str(folder / "delta.safetensors"))), json.loads(
        (folder / "manifest.json").read_text())


def load_planted(*, device=None, dtype=None, folder: Path = PLANTED_DIR / "v2"):
    """The embedded model with the shipped planted-bias delta applied."""
    model = load_embedded(EMBEDDED, device, dtype)
    delta, manifest = load_delta(folder)
    delta.apply(model)
    set_planted_manifest(model, manifest)
    return model


def set_planted_manifest(model: TransformerBridge, manifest: dict) -> None:
    """Attach a planted model's manifest (which units carry which context's bias)."""
    model_info(model).planted = manifest


def planted_manifest(model: TransformerBridge) -> dict[str, Any]:
    """The manifest of a planted model (which neurons carry which context's bias)."""
    m = model_info(model).planted
    if m is None:
        raise ValueError("this model is not the planted model (load it with load_model('planted'))")
    return m


for _name, _folder in PLANTED_VERSIONS.items():
    register_model(_name, partial(load_planted, folder=_folder))
