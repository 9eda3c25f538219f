"""Export a fix: a Hugging Face checkpoint with the intervention written into its weights.

``export_model(model, intervention, out)`` folds the intervention into a copy of
the weights (:meth:`~mechbias.interventions.base.Intervention.fold`: zeroed or
scaled neurons become down-projection columns, ``hook_z`` head ablations
output-projection columns, ``hook_q`` ablations query rows and biases, weight
masks and edits are written as they are), builds a fresh model of the same
``transformers`` class from the same config, and saves it with
``save_pretrained`` next to the tokenizer. The folder loads with plain
``AutoModelForCausalLM.from_pretrained`` (a masked LM: ``AutoModelForMaskedLM``); mechbias is not
needed to use it.
An intervention with no exact weight form (positions, residual-stream
directions) is refused before anything is written; nothing is approximated.
The live model is never changed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from importlib.metadata import version as _pkg_version
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from ..core.families import is_masked_lm
from ..core.models import model_label
from ..core.params import named_params
from ..data.prompts import tokenize
from ..interventions.base import Identity, Intervention, maybe_apply

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

CHECK_TEXTS = ("The bank approved the loan for Maria because her credit history was long.",
               "After the meeting, the manager thanked everyone and went home early.")


def folded_weights(model: TransformerBridge, intervention: Intervention | None) -> dict[str, torch.Tensor]:
    """Detached copies of the model's weights (clean names) with the intervention folded in."""
    params = {n: p.detach().clone() for n, p in named_params(model).items()}
    (intervention or Identity()).fold(model, params)
    return params


def _hf_state_dict(model: TransformerBridge, fresh, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of ``fresh`` (a new model of the same class) filled from the live model, with folded values.

    Tensors are matched by name, then by storage (tied embedding and unembedding share one, so a change to one
    is a change to both). A tensor the live model holds that the new model has no place for is an error unless
    it is all zeros (TransformerLens adds a zero unembedding bias)."""
    by_ptr = {p.data_ptr(): n for n, p in named_params(model).items()}
    live = {k.replace("._original_component", ""): t for k, t in model.original_model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    used: set[int] = set()
    for key in fresh.state_dict():
        fused = _fused(key, params, live, fresh.config)
        if fused is not None:
            out[key], parts = fused
            used.update(live[p].data_ptr() for p in parts)
            if key in live:
                used.add(live[key].data_ptr())
            continue
        if key not in live:
            raise RuntimeError(f"the live model has no tensor for {key!r}; it cannot be exported as {type(fresh).__name__}")
        name = key if key in params else by_ptr.get(live[key].data_ptr())
        out[key] = params[name] if name is not None else live[key].detach().clone()
        used.add(live[key].data_ptr())
    lost = [k for k, t in live.items() if t.data_ptr() not in used and bool(t.detach().abs().max() > 0)]
    if lost:
        raise RuntimeError(f"the export would lose the non-zero tensors {lost[:5]}")
    return out


#: fused Hugging Face tensors the bridge computes with as separate layers: (fused name, part names, layout)
_FUSED = (("c_attn", ("q", "k", "v"), "conv1d"),                 # GPT-2: Conv1D [d_model, 3 d_model]
          ("qkv_proj", ("q", "k", "v"), "concat"),               # Phi-3: q, k, v rows stacked
          ("gate_up_proj", ("gate", "in"), "concat"),            # Phi-3: gate rows, then up rows
          ("query_key_value", ("q", "k", "v"), "per_head"))      # GPT-NeoX: (head, q/k/v, head_dim) rows


def _fused(key: str, params: dict[str, torch.Tensor], live: dict[str, torch.Tensor], config
           ) -> tuple[torch.Tensor, list[str]] | None:
    """A fused tensor of the checkpoint rebuilt from the separate layers the bridge computes with (folded values
    included), and the live names it was built from; None when ``key`` is not one."""
    for fused, names, layout in _FUSED:
        if f".{fused}." not in key:
            continue
        parts = [key.replace(fused, c) for c in names]
        if not all(p in live for p in parts):
            return None
        vals = [params.get(p, live[p]).detach() for p in parts]
        if layout == "conv1d":
            return (torch.cat([v.T for v in vals], dim=1) if key.endswith("weight") else torch.cat(vals)), parts
        if layout == "concat":
            return torch.cat(vals, dim=0), parts
        heads = config.num_attention_heads
        split = [v.reshape(heads, v.shape[0] // heads, *v.shape[1:]) for v in vals]
        return torch.stack(split, dim=1).reshape(-1, *vals[0].shape[1:]), parts
    return None


MARKER = "mechbias_export.json"


def check_replaceable(out: str | Path) -> None:
    """Refuse to replace ``out`` unless mechbias wrote it: it must not exist, be empty, or hold the export
    marker (``mechbias_export.json``); it must never be the current directory, one of its parents, the home
    folder or a filesystem root. Raises ``ValueError`` with the reason (the CLI's exit 2)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose a folder name")
    real, cwd = out.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents or real == Path.home().resolve() or real == Path(real.anchor):
        raise ValueError(f"refusing to replace {out}: it is the current folder, one of its parents, the home "
                         "folder or a root; choose a new folder for --out")
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise ValueError(f"refusing to replace {out}: it is not empty and was not written by mechbias export "
                         f"(no {MARKER}); choose a new folder for --out")


class ExportSummary(TypedDict):
    """What :func:`export_model` wrote (also ``out/mechbias_export.json``)."""

    source_model: str
    architecture: str
    intervention: str
    intervention_spec: dict[str, Any] | None
    dtype: str
    check_texts: list[str]
    max_abs_logit_diff: float
    mechbias_version: str | None


def export_model(model: TransformerBridge, intervention: Intervention | None, out: str | Path, *,
                 check_texts: Sequence[str] = CHECK_TEXTS) -> ExportSummary:
    """Write ``out`` as a ``transformers`` checkpoint of ``model`` with ``intervention`` folded in.

    Returns a summary (including the largest |logit difference| between the
    exported model and the hooked model on ``check_texts``), also written to
    ``out/mechbias_export.json``. The folder is written atomically.
    """
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    out = Path(out)
    check_replaceable(out)
    hf = getattr(model, "original_model", None)
    if hf is None or not hasattr(hf, "save_pretrained"):
        raise ValueError(f"{model_label(model)} is not a Hugging Face model under TransformerLens; only those can be "
                         "exported as a transformers checkpoint")
    params = folded_weights(model, intervention)  # raises NotFoldable before anything is written
    dtype = next(iter(params.values())).dtype
    fresh = type(hf)(hf.config).to(dtype)
    fresh.load_state_dict(_hf_state_dict(model, fresh, params), strict=True)
    fresh.config.dtype = dtype
    fresh.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        if getattr(model, "tokenizer", None) is not None:
            model.tokenizer.save_pretrained(tmp)
        auto = AutoModelForMaskedLM if is_masked_lm(model) else AutoModelForCausalLM
        reloaded = auto.from_pretrained(tmp, local_files_only=True).eval()
        diff = _max_logit_diff(model, reloaded, intervention, check_texts)
        summary: ExportSummary = {"source_model": model_label(model), "architecture": type(hf).__name__,
                   "intervention": intervention.describe() if intervention else "none",
                   "intervention_spec": ({"kind": intervention.kind, **intervention.to_dict()} if intervention
                                         else None),
                   "dtype": str(dtype).replace("torch.", ""), "check_texts": list(check_texts),
                   "max_abs_logit_diff": diff, "mechbias_version": _pkg_version("mechbias")}
        (tmp / MARKER).write_text(json.dumps(summary, indent=2, default=str))
        if out.exists():
            check_replaceable(out)  # again: the folder may have changed while the model was exported
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return summary


@torch.no_grad()
def _max_logit_diff(model: TransformerBridge, hf_model, intervention, texts) -> float:
    worst = 0.0
    for ids in tokenize(model, list(texts)):
        ids = ids[None].to(model.cfg.device)
        with maybe_apply(intervention, model):
            hooked = model(ids).float().cpu()
        plain = hf_model(ids.to(hf_model.device)).logits.float().cpu()
        worst = max(worst, float((hooked - plain).abs().max()))
    return worst
