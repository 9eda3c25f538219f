"""GRADIEND on the embedded model: gradient-capture throughput and peak memory of training.

Each measurement runs in its own process so peak RSS (VmHWM) is its own:

* mechbias: batched gradient capture over all MLP weight matrices (79.6 M
  parameters), texts per second; then GRADIEND training for a few steps, peak RSS.
* the ``gradiend`` package from PyPI (if installed): its per-text
  ``create_gradients`` on the same local model folder, the same parameters and
  the same texts, texts per second and peak RSS. Its decoder-only label
  handling places the label at the last input position, so its loss is not
  identical to ours; the comparison is about throughput and memory.

    python benchmarks/bench_gradiend.py [--texts 32] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _peak_rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def run_mechbias(texts: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))
    from mechbias.core.models import load_model
    from mechbias.methods.gradiend import GradiendConfig, batch_gradient, feature_texts, param_set, train_gradiend

    model = load_model()
    ps = param_set(model, "mlp")
    data = feature_texts(model, "finance", "gender")[:texts]
    batch_gradient(model, ps, [d.text for d in data[:4]], [d.factual for d in data[:4]])  # warm-up
    t = time.perf_counter()
    for k in range(0, len(data), 16):
        b = data[k:k + 16]
        batch_gradient(model, ps, [d.text for d in b], [d.factual for d in b])
    tps = len(data) / (time.perf_counter() - t)
    rss_capture = _peak_rss_gib()
    t = time.perf_counter()
    train_gradiend(model, "finance", "gender", GradiendConfig(params="mlp", steps=steps, seeds=(0,)), progress=False)
    return {"texts_per_second": tps, "n_params": ps.numel, "peak_rss_gib_capture": rss_capture,
            "peak_rss_gib_training": _peak_rss_gib(), "train_seconds_per_step": (time.perf_counter() - t) / steps}


def run_gradiend_package(texts: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", os.cpu_count() or 1)))
    from mechbias.core.models import ensure_embedded_cache, load_model
    from mechbias.methods.gradiend import feature_texts, param_set

    folder = str(ensure_embedded_cache())
    ours = load_model()
    params = param_set(ours, "mlp").names
    data = feature_texts(ours, "finance", "gender")[:texts]
    labels = [ours.to_string([d.factual]).strip() for d in data]
    del ours
    import gc

    gc.collect()
    from gradiend.trainer.text.prediction.model_with_gradiend import TextPredictionModelWithGradiend

    m = TextPredictionModelWithGradiend.from_pretrained(folder, params=params)
    m.create_gradients(data[0].text, labels[0])  # warm-up
    t = time.perf_counter()
    for d, lab in zip(data, labels, strict=True):
        m.create_gradients(d.text, lab)
    tps = len(data) / (time.perf_counter() - t)
    return {"texts_per_second": tps, "peak_rss_gib": _peak_rss_gib()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", choices=["mechbias", "gradiend"])
    args = ap.parse_args()
    if args.worker == "mechbias":
        print(json.dumps(run_mechbias(args.texts, args.steps)))
        return
    if args.worker == "gradiend":
        print(json.dumps(run_gradiend_package(args.texts)))
        return

    def worker(name):
        out = subprocess.run([sys.executable, __file__, "--worker", name, "--texts", str(args.texts), "--steps",
                              str(args.steps)], capture_output=True, text=True)
        lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
        if not lines:
            return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
        return json.loads(lines[-1])

    mb = worker("mechbias")
    print(f"embedded SmolLM2-135M-Instruct; gradients w.r.t. all MLP matrices ({mb.get('n_params', 0):,} parameters)")
    print(f"mechbias: {mb['texts_per_second']:.2f} texts/s (batches of 16); peak RSS {mb['peak_rss_gib_capture']:.2f} GiB "
          f"capturing, {mb['peak_rss_gib_training']:.2f} GiB training GRADIEND "
          f"({mb['train_seconds_per_step']:.1f} s per step: factual + counterfactual batch of 16 and the update)")
    try:
        import gradiend  # noqa: F401
    except ImportError:
        print("gradiend package: not installed (pip install gradiend==0.2.3 --no-deps); comparison skipped")
        return
    gp = worker("gradiend")
    if "error" in gp:
        print(f"gradiend package: could not run on this model offline: {gp['error']}")
        return
    print(f"gradiend package: {gp['texts_per_second']:.2f} texts/s (one text per call); peak RSS "
          f"{gp['peak_rss_gib']:.2f} GiB capturing")
    print(f"ratio (mechbias / gradiend throughput): {mb['texts_per_second'] / gp['texts_per_second']:.1f}x")


if __name__ == "__main__":
    main()
