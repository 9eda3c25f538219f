"""An lm-evaluation-harness model type: any mechbias model, optionally under a saved intervention.

Registered with lm-eval's own registry (``lm_eval.api.registry.register_model``)
as ``mechbias`` when this module is imported. lm-eval 0.4 discovers model types
only in modules it has imported, so the command ``mechbias-lm-eval`` is lm-eval's
own command line with this module imported first::

    mechbias-lm-eval --model mechbias --model_args model=planted,intervention=OUT/intervention --tasks ...

In Python, ``import mechbias.apps.lm_eval_model`` and pass ``model="mechbias"`` to
``lm_eval.simple_evaluate``, or pass a :class:`MechbiasLM` built around a model you
already loaded. Log-likelihoods are those of :mod:`mechbias.eval.loglik` with
the intervention applied, so a task sees exactly what the hooked model computes.
Requires the optional extra ``mechbias[eval]`` (``lm-eval``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core.families import is_masked_lm
from ..core.models import load_model
from ..data.prompts import tokenize
from ..eval.bench.common import BenchResult, cluster_ids, metric_rows
from ..eval.loglik import continuation_logprob, token_logprobs
from ..interventions.base import Intervention, load_intervention, maybe_apply

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

try:
    import lm_eval.models  # noqa: F401 - lm-eval registers its own model types only while its registry is empty
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    HAVE_LM_EVAL = True
except ImportError:  # the optional extra is not installed: the class exists, lm-eval's functions refuse
    HAVE_LM_EVAL = False
    LM = object  # type: ignore[misc, assignment]

    def register_model(*names):  # type: ignore[no-redef]
        """Stand-in for lm-eval's decorator when lm-eval is not installed: registers nothing."""
        return lambda cls: cls

NEEDS_EXTRA = "lm-eval is not installed: pip install 'mechbias[eval]' (package lm-eval)"


def _need_lm_eval() -> None:
    if not HAVE_LM_EVAL:
        raise ValueError(NEEDS_EXTRA)


@register_model("mechbias")
class MechbiasLM(LM):
    """lm-eval's ``LM`` over a mechbias model.

    Args:
        model: a loaded model (TransformerBridge) or a name for :func:`mechbias.core.models.load_model`
            (empty / None: the embedded SmolLM2-135M-Instruct).
        intervention: an :class:`Intervention` or the folder of a saved one (None: the unmodified model).
        max_length: longest sequence scored at once (default: the model's context length).
        max_gen_toks: default generation length for ``generate_until``.
    """

    def __init__(self, model: TransformerBridge | str | None = None, intervention: Any = None, max_length: int | None = None,
                 max_gen_toks: int = 256, batch_size: Any = None, device: Any = None, **unused: Any) -> None:
        _need_lm_eval()
        super().__init__()
        unknown = sorted(k for k in unused if k not in ("max_batch_size", "dtype", "trust_remote_code"))
        if unknown:
            raise ValueError(f"mechbias model_args: unknown {unknown}; known: model, intervention, max_length, "
                             "max_gen_toks")
        if isinstance(intervention, (str, Path)) and str(intervention):
            intervention = load_intervention(intervention)
        self.intervention: Intervention | None = intervention or None
        self.model = load_model(model or None) if model is None or isinstance(model, str) else model
        if is_masked_lm(self.model):
            raise ValueError("the mechbias lm-eval model type scores causal models; this is a masked LM")
        self.max_length = int(max_length or getattr(self.model.cfg, "n_ctx", None) or 2048)
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> MechbiasLM:
        args: dict[str, Any] = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv.strip()) if arg_string else {}
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**args, **extra)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.model.tokenizer, "name_or_path", "mechbias"))

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        with maybe_apply(self.intervention, self.model):
            res = continuation_logprob(self.model, pairs)
        return [(c.logprob, c.greedy) for c in res]

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Sum of log P over every token of each text after BOS, in windows of ``max_length`` tokens (each
        window after the first conditioned on the ``max_length - 1`` tokens before it)."""
        out = []
        with maybe_apply(self.intervention, self.model):
            for (text, *_rest) in (r.args for r in requests):
                ids = tokenize(self.model, [text])[0]
                total, start = 0.0, 1
                while start < len(ids):
                    end = min(len(ids), start + self.max_length - 1)
                    ctx0 = max(0, end - self.max_length)
                    lp, _ = token_logprobs(self.model, [ids[ctx0:end]])
                    total += float(lp[0][start - ctx0 - 1:].double().sum())
                    start = end
                out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Greedy decoding (lm-eval's default), stopped at the first ``until`` string or ``max_gen_toks``."""
        out = []
        eos = getattr(self.model.tokenizer, "eos_token_id", None)
        with maybe_apply(self.intervention, self.model):
            for context, kwargs in (r.args for r in requests):
                kwargs = dict(kwargs or {})
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
                ids = tokenize(self.model, [context])[0].to(self.model.cfg.device)
                new: list[int] = []
                text = ""
                for _ in range(n):
                    nxt = int(self.model(ids[None, -self.max_length:])[0, -1].argmax())
                    if eos is not None and nxt == eos:
                        break
                    new.append(nxt)
                    ids = torch.cat([ids, ids.new_tensor([nxt])])
                    text = self.model.tokenizer.decode(new)
                    if any(u in text for u in until):
                        break
                for u in until:
                    text = text.split(u)[0]
                out.append(text)
        return out


def task_manager(tasks: list[str], include_path: str | Path | None = None):
    """lm-eval's TaskManager: only the ``include_path`` tasks when they are all that is asked for (indexing the
    built-in tasks takes seconds), else those and the built-in ones."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=str(include_path) if include_path else None)


def check_tasks(tasks: list[str], include_path: str | Path | None = None) -> None:
    """A clear error for task names lm-eval does not know (checked before a model loads)."""
    _need_lm_eval()
    known = set(task_manager(tasks, include_path).all_tasks)
    bad = [t for t in tasks if t not in known]
    if bad:
        raise ValueError(f"lm-eval does not know the tasks {bad}" + (f" (include path {include_path})"
                                                                     if include_path else ""))


def run_tasks(lm: MechbiasLM, tasks: list[str], include_path: str | Path | None = None, *,
              limit: int | None = None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``lm`` with per-sample logs."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager(tasks, include_path), limit=limit, log_samples=True,
                           bootstrap_iters=0, verbosity="ERROR")


def _per_sample(results: dict, task: str) -> tuple[list, dict[str, np.ndarray]]:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    metrics = {k for s in samples for k, v in s.items()
               if k in ("acc", "acc_norm", "exact_match", "word_perplexity") and isinstance(v, (int, float))}
    return [s["doc_id"] for s in samples], {m: np.array([float(s[m]) for s in samples]) for m in sorted(metrics)}


def task_bench(model: TransformerBridge, intervention: Intervention | None, tasks: list[str], include_path=None, *,
               limit: int | None = None, n_boot: int = 2000, seed: int = 0) -> BenchResult:
    """Accuracy-type metrics of lm-eval tasks (x 100), unmodified vs. under the intervention, with paired
    intervals that resample documents."""
    base = run_tasks(MechbiasLM(model), tasks, include_path, limit=limit)
    after = run_tasks(MechbiasLM(model, intervention), tasks, include_path, limit=limit) if intervention else None
    rows = []
    for task in tasks:
        docs, b = _per_sample(base, task)
        a = _per_sample(after, task)[1] if after else None
        for metric in b:
            def fn(o, idx, m=metric):
                return float(100.0 * o[m][idx].mean())

            rows += metric_rows("lm-eval", {metric: (fn, "%")}, b, a, cluster_ids(docs),
                                {task: np.arange(len(docs))}, n_boot=n_boot, seed=seed)
    return BenchResult("lm-eval", rows, [], {"tasks": list(tasks), "limit": limit})


def cli() -> None:
    """``mechbias-lm-eval``: lm-eval's command line with the ``mechbias`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
