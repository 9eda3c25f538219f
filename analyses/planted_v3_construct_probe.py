"""Where the v3 construction loses its signal (docs/groundtruth.md, second attempt; the defaults are that
build's layout, pass --layer 18 --head 6 for the shipped build's finance head).

    python analyses/train_planted.py --version 3 --out /tmp/v3build     # builds the chain (~20 min, 2 threads)
    python analyses/planted_v3_construct_probe.py /tmp/v3build [--layer 15 --head 1 --read-layer 21]

On 40 finance prompts (selection templates and names) of the built model, per group: the planted head's
value read at the name (the input that the value projection sees, and the value hook), the head's output
read, and the direction the head writes, right after its layer and at the prediction-position neurons'
layer. The head's output columns are rank one; their singular vectors give the read and written directions.
"""

import argparse
from pathlib import Path

import torch

from mechbias.core.hooks import hooked
from mechbias.core.models import load_model
from mechbias.core.sites import hook_name
from mechbias.data.contexts import load_context
from mechbias.data.prompts import tokenize
from mechbias.groundtruth.delta import load_delta
from mechbias.groundtruth.planted import mention_positions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--head", type=int, default=1)
    ap.add_argument("--read-layer", type=int, default=21)
    args = ap.parse_args()
    m = load_model()
    delta, _ = load_delta(args.folder)
    delta.apply(m)
    l, h, dh = args.layer, args.head, m.cfg.d_head
    kv = h // (m.cfg.n_heads // m.cfg.n_key_value_heads)
    w_v = m.blocks[l].attn.v.original_component.weight.detach().double()[kv * dh:(kv + 1) * dh]
    o = m.blocks[l].attn.o.original_component.weight.detach().double()[:, h * dh:(h + 1) * dh]
    U, S, Vt = torch.linalg.svd(o, full_matrices=False)
    print("head output singular values", [f"{x:.3g}" for x in S[:3].tolist()])
    p, e = U[:, 0], Vt[0]
    ps = list(load_context("finance").prompts("race", templates="selection", names="selection"))[:40]
    rows = []
    for pr, t in zip(ps, tokenize(m, [x.text for x in ps]), strict=True):
        pos = mention_positions(m, pr.text, pr.person.name)
        st: dict = {}
        fwd = [(hook_name("in:attn.v", l), lambda a, hook, st=st: st.__setitem__("x", a[0].double())),
               (hook_name("v", l), lambda a, hook, st=st: st.__setitem__("v", a[0].double())),
               (hook_name("z", l), lambda a, hook, st=st: st.__setitem__("z", a[0].double())),
               (hook_name("resid_pre", l + 1), lambda a, hook, st=st: st.__setitem__("after", a[0].double())),
               (hook_name("resid_pre", args.read_layer), lambda a, hook, st=st: st.__setitem__("read", a[0].double()))]
        with torch.no_grad(), hooked(m, fwd):
            m(t[None])
        rows.append((1.0 if pr.group == 0 else -1.0, float((st["x"][pos] @ w_v.T @ e).mean()),
                     float((st["v"][pos, kv] @ e).mean()), float(st["z"][-1, h] @ e),
                     float(st["after"][-1] @ p), float(st["read"][-1] @ p)))
    R = torch.tensor(rows)
    for k, name in enumerate(["value read at the name (input @ W_V)", "value read at the name (hook_v)",
                              "head output read at the last position", f"written direction after layer {l}",
                              f"written direction at layer {args.read_layer}"], 1):
        a, b = R[R[:, 0] > 0, k], R[R[:, 0] < 0, k]
        print(f"{name}: group A {float(a.mean()):+.3f}, group B {float(b.mean()):+.3f} (SD {float(a.std()):.3f})")


if __name__ == "__main__":
    main()
