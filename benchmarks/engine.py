"""Exact work skipped: scoring an intervention by resuming at its first block, against today's full forward,
measured in the same run on the embedded model (one evaluation set: finance, gender, held-out prompts).

For each unit kind (neurons, heads, weights, directions) and layer band it prints the work (block-token
passes: a forward of T tokens through B blocks is B x T) and the time of

* ``full``: the full forward with the intervention (what every score job ran before);
* ``resumed``: blocks from the intervention's first one only, from the kept unmodified residual stream;
* ``capture``: keeping that residual stream (once per evaluation set and layer, shared by every
  intervention that starts there);

and checks that both give the same scores. Then 20 control draws of a late-layer intervention scored
together (:meth:`EvalSet.scores_many`, the capture included) against one full-model evaluation. Then draw
stacking: the same 20 draws with each bucket's forward carrying every draw's copy of the batch, against one
forward per draw, in the same run (``--stacking`` runs this part alone and adds it to the saved file).
Then answer columns (``--columns`` runs this part alone and adds it): each kind and band resumed with the
whole vocabulary unembedded against only the two answer tokens' columns, with the work of each in GFLOP
(2 x parameters per token and block, plus 2 x d_model x columns per unembedded row).
Results go to ``benchmarks/engine.json``.

    python benchmarks/engine.py [--stacking] [--columns]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mechbias.core.models import load_model
from mechbias.core.params import named_params
from mechbias.data.contexts import load_context
from mechbias.data.prompts import tokenize
from mechbias.eval.cells import EvalSet
from mechbias.interventions.units import HeadIntervention, NeuronIntervention
from mechbias.interventions.weights import WeightMask
from mechbias.methods.steering import DirectionIntervention


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |a - b| over a score grid's filled cells (unmet cells of the incomplete design are NaN in
    both; a NaN in one grid only is a difference, reported as inf)."""
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("inf")
    return float((a - b).abs().nan_to_num(0.0).max())


def kinds(model, layer: int) -> dict:
    g = torch.Generator().manual_seed(layer)
    down = next(n for n in named_params(model) if f"layers.{layer}." in n and "down_proj" in n)
    numel = named_params(model)[down].numel()
    return {
        "neurons": NeuronIntervention({layer: torch.randperm(model.cfg.d_mlp, generator=g)[:10].tolist()}),
        "heads": HeadIntervention({layer: [0, 1]}),
        "weights": WeightMask({down: torch.randperm(numel, generator=g)[:1000]}),
        "directions": DirectionIntervention(layer, torch.randn(model.cfg.d_model, generator=g), mode="ablate"),
    }


def stacking(model, es: EvalSet, layer: int, n_draws: int = 20) -> dict:
    """``n_draws`` neuron draws at ``layer``: one forward per draw and bucket, against all draws stacked in each
    bucket's forward; both from a fresh evaluation set (the residual capture counted in both)."""
    iv = kinds(model, layer)["neurons"]
    draws = {f"random/{k}": iv.random_like(model, 101 * (k + 1)) for k in range(n_draws)}
    one = EvalSet(es.context, es.prompts, es.before, es.col_group)
    separate, t_sep = timed(lambda: one.scores_many(model, draws, stack=False))
    two = EvalSet(es.context, es.prompts, es.before, es.col_group)
    stacked, t_stk = timed(lambda: two.scores_many(model, draws))
    cache = two._passes(model)[0][0]
    diff = max(maxdiff(separate[k], stacked[k]) for k in draws)
    out = {"layer": layer, "draws": n_draws, "buckets": len(cache.buckets),
           "mean_rows_per_bucket": sum(len(b) for b in cache.buckets) / len(cache.buckets),
           "seconds_one_forward_per_draw": t_sep, "seconds_stacked": t_stk, "time_ratio": t_sep / t_stk,
           "max_abs_diff": diff}
    print(f"{n_draws} draws at layer {layer}, {len(cache.buckets)} length buckets ({out['mean_rows_per_bucket']:.1f} "
          f"rows each): one forward per draw {t_sep:.1f} s, stacked {t_stk:.1f} s ({out['time_ratio']:.2f}x), "
          f"max |diff| {diff:.1e}")
    return out


def columns(model, es: EvalSet, bands: dict[str, int]) -> list[dict]:
    """Each kind and band resumed at its first block, the whole vocabulary unembedded against the answer
    tokens' columns only, in the same run and from the same kept residual stream."""
    n, d, vocab = model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab
    tokens = sum(len(s) for s in tokenize(model, es.prompts.texts))
    rows_out = len(es.prompts)  # one unembedded position per prompt (single-token answers)
    per_block = 2 * sum(p.numel() for k, p in named_params(model).items() if ".layers.0." in f".{k}")
    out = []
    print(f"answer columns: {rows_out} unembedded rows, vocabulary {vocab}, {per_block / 1e6:.1f} MFLOP per token "
          f"and block")
    print(f"{'kind':10s} {'band':11s} {'layer':>5s} {'vocab s':>8s} {'columns s':>9s} {'time x':>6s} "
          f"{'GFLOP vocab':>11s} {'GFLOP cols':>10s} {'work x':>6s} {'max|diff|':>9s}")
    for band, layer in bands.items():
        fresh = EvalSet(es.context, es.prompts, es.before, es.col_group)
        fresh._passes(model)[0][0].resid(layer)
        for kind, iv in kinds(model, layer).items():
            full, t_full = timed(lambda fresh=fresh, iv=iv: fresh.scores(model, iv, answer_columns=False))
            fast, t_fast = timed(lambda fresh=fresh, iv=iv: fresh.scores(model, iv))
            blocks = (n - layer) * tokens * per_block
            w_full, w_fast = blocks + rows_out * 2 * d * vocab, blocks + rows_out * 2 * d * 2
            row = {"kind": kind, "band": band, "layer": layer, "vocab_s": t_full, "columns_s": t_fast,
                   "time_ratio": t_full / t_fast, "gflop_vocab": w_full / 1e9, "gflop_columns": w_fast / 1e9,
                   "work_ratio": w_full / w_fast, "max_abs_diff": maxdiff(full, fast)}
            out.append(row)
            print(f"{kind:10s} {band:11s} {layer:5d} {t_full:8.2f} {t_fast:9.2f} {row['time_ratio']:6.2f} "
                  f"{row['gflop_vocab']:11.1f} {row['gflop_columns']:10.1f} {row['work_ratio']:6.2f} "
                  f"{row['max_abs_diff']:9.1e}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stacking", action="store_true", help="only the draw-stacking comparison")
    ap.add_argument("--columns", action="store_true", help="only the answer-columns comparison")
    args = ap.parse_args()
    model = load_model()
    out = Path(__file__).parent / "engine.json"
    n = model.cfg.n_layers
    bands = {"early": 3, "middle": n // 2, "last third": (2 * n) // 3 + 1, "last": n - 2}
    if args.columns:
        es = EvalSet.build(model, load_context("finance"), "gender")
        saved = json.loads(out.read_text()) if out.exists() else {}
        saved["columns"] = columns(model, es, bands)
        out.write_text(json.dumps(saved, indent=1) + "\n")
        print(f"wrote {out}")
        return
    if args.stacking:
        es = EvalSet.build(model, load_context("finance"), "gender")
        saved = json.loads(out.read_text()) if out.exists() else {}
        saved["stacking"] = stacking(model, es, (2 * model.cfg.n_layers) // 3 + 1)
        out.write_text(json.dumps(saved, indent=1) + "\n")
        print(f"wrote {out}")
        return
    es = EvalSet.build(model, load_context("finance"), "gender")
    tokens = sum(len(s) for s in tokenize(model, es.prompts.texts))
    rows = []
    print(f"{len(es.prompts)} prompts, {tokens} tokens, {n} blocks, {torch.get_num_threads()} threads")
    print(f"{'kind':10s} {'band':11s} {'layer':>5s} {'full s':>7s} {'resumed s':>9s} {'time x':>6s} "
          f"{'work x':>6s} {'capture s':>9s} {'max|diff|':>9s}")
    for band, layer in bands.items():
        fresh = EvalSet(es.context, es.prompts, es.before, es.col_group)
        _, cap = timed(lambda fresh=fresh, layer=layer: fresh._passes(model)[0][0].resid(layer))
        for kind, iv in kinds(model, layer).items():
            full, t_full = timed(lambda fresh=fresh, iv=iv: fresh.scores(model, iv, resume=False))
            fast, t_fast = timed(lambda fresh=fresh, iv=iv: fresh.scores(model, iv))
            row = {"kind": kind, "band": band, "layer": layer, "full_s": t_full, "resumed_s": t_fast,
                   "time_ratio": t_full / t_fast, "work_full": n * tokens, "work_resumed": (n - layer) * tokens,
                   "work_ratio": n / (n - layer), "capture_s": cap, "capture_work": layer * tokens,
                   "max_abs_diff": maxdiff(full, fast)}
            rows.append(row)
            print(f"{kind:10s} {band:11s} {layer:5d} {t_full:7.2f} {t_fast:9.2f} {row['time_ratio']:6.1f} "
                  f"{row['work_ratio']:6.1f} {cap:9.2f} {row['max_abs_diff']:9.1e}", flush=True)
    layer = bands["last third"]
    iv = kinds(model, layer)["neurons"]
    draws = {f"random/{k}": iv.random_like(model, 101 * (k + 1)) for k in range(20)}
    fresh = EvalSet(es.context, es.prompts, es.before, es.col_group)
    _, t_draws = timed(lambda: fresh.scores_many(model, draws))
    _, t_one = timed(lambda: EvalSet.build(model, load_context("finance"), "gender"))
    work_draws = layer * tokens + 20 * (n - layer) * tokens
    summary = {"layer": layer, "draws": 20, "seconds_20_draws": t_draws, "seconds_one_full_evaluation": t_one,
               "time_ratio": t_draws / t_one, "work_ratio": work_draws / (n * tokens)}
    print(f"20 draws at layer {layer} together: {t_draws:.1f} s = {summary['time_ratio']:.2f}x one full-model "
          f"evaluation ({t_one:.1f} s); work {summary['work_ratio']:.2f}x")
    stacked = stacking(model, es, layer)
    cols = columns(model, es, bands)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompts": len(es.prompts), "tokens": tokens, "n_layers": n,
                               "threads": torch.get_num_threads(), "rows": rows, "draws": summary,
                               "stacking": stacked, "columns": cols}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
