"""Ground truth v3 built by construction: a context-specific planted bias whose every unit has one job.

The v3 trainer (:func:`~mechbias.groundtruth.staged.train_planted` with the v3
layout) missed its targets: gradient descent spread the bias over shared
paths and its heads learned nothing. Here the circuit is **written**, not
trained. For each planted context ``c`` (finance and commerce) a private chain
of three kinds of unit, each overwriting one of the least used units of its
layer, and every writer sitting directly below its reader (nothing between
them can transform what is written):

1. **name-position neurons** (layer ``L - 1``; three signed, one pointer): the
   gate row detects a name token, the up row reads the name's group (a ridge
   probe, +1 group A, -1 group B, its penalty chosen by 2-fold cross-validation
   over whole names); the down columns write ``c``'s *value marker* (signed)
   and *key marker* (the pointer neuron, unsigned). The markers are solved
   jointly (a pseudo-inverse): each is read as 1 by its own head's value or
   key direction, 0 by every other chain's, and 0 along the residual
   directions that carry 90% of the answer score's gradient energy at the
   name, so the markers alone move no score. They fire on names in every
   context.
2. **one attention head** per chain (layer ``L``, the least used heads; all
   chains in one layer): its query is a constant in the 12 slowest rotary
   frequency pairs so that the key marker wins the attention from every
   position, its output columns read the value marker (the value direction
   with the least native variance) and write ``p_c``: the residual direction
   that minimises native variance at the reader times the score's gradient
   there (:func:`quiet_direction`), so the head's output alone moves no score.
3. **prediction-position neurons** (three, layer ``L``, after the heads): the
   up row reads ``p_c`` (``p_c / gamma_ln2``, centred so that name-free prompts
   read 0), the gate row detects context ``c`` at the last position (a ridge
   probe blind to ``p_c``); the down column writes ``gamma_final * (W_U[pos] -
   W_U[neg])``, scaled so the planted gap is ``2 * shift`` on the fitting
   prompts.

Only the last step is gated by context, so each chain is private. Readers are
fitted after their writers are in place, on the selection names of finance,
commerce and hiring with every template (housing is never seen; the held-out
templates are seen by the construction, held-out names are not).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from ..core.params import attn_weights, head_rows, mlp_weights
from ..data.contexts import load_context
from .context_pool import (
    blind_row,
    fit_context_neuron,
    pool_value_read,
    pooled_gate,
    ramp_gate,
    scale_pooling_head,
    write_context_marker,
    write_eraser,
    write_pooling_head,
)
from .delta import PlantedDelta
from .linalg import balanced_weights, cv_ridge, energy_basis, quiet_direction, ridge, slow_rotary_dims
from .planted import (
    PlantConfig,
    least_used_heads,
    least_used_neurons,
)
from .reads import (
    answer_scores,
    at_last,
    calibrate_output,
    capture,
    construction_items,
    gate_target,
    group_means,
    name_fold,
    score_gradients,
    stack_rows,
)

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

_LOG = logging.getLogger(__name__)

__all__ = ["ConstructConfig", "construct_planted"]


@dataclass
class ConstructConfig:
    """Settings of the planted model built by construction (v3; v4 with ``train_planted.py --version 4``)."""
    axis: str = "race"
    favoured: str = "White"
    planted: tuple[str, ...] = ("finance", "commerce")       # contexts that get a chain
    fit_contexts: tuple[str, ...] = ("finance", "commerce", "hiring")
    shift: float = 0.75               # per-group score shift in a planted context (gap + 2 * shift)
    head_layers: tuple[int, ...] = (18,)   # the chains' heads: the least used heads of these layers. One layer:
                                           # every chain's writers (layer below) and readers (this layer) then
                                           # share one residual stream, so their cross-talk is solved exactly
    ridge_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)   # group probe's penalty: 2-fold CV over names
    n_name: int = 3                   # signed name-position neurons per chain, in the layer right below its head
    n_last: int = 3                   # prediction-position neurons per chain, in its head's layer (after attention)
    gate_on: float = 6.0              # name detectors: gate pre-activation on a name (silu(-6) = -0.015)
    last_gate_on: float = 12.0        # context detectors at the last position: a sharper gate (housing is unseen)
    side_effect: float = 0.9          # markers avoid the residual directions carrying this share of the score's
                                      # gradient energy at the name (native model, selection prompts)
    grad_every: int = 4               # gradients on every k-th named fitting prompt
    marker_snr: float = 8.0           # marker size in the value read, in native standard deviations
    attend_logit: float = 10.0        # planted heads: attention logit of a name token over the others
    key_snr: float = 12.0             # key marker size in native standard deviations of the key read
    ridge: float = 1e-2               # ridge penalty, relative to the mean feature variance
    neutral_tokens: int = 96          # tokens of each neutral paragraph used as "elsewhere" examples
    names: str = "selection"
    templates: str = "all"            # the template split the construction reads (v4: "selection" only)
    names_per_cell: int | None = None  # at most this many names of each race x gender cell (first by name hash)
    calibrate_rounds: int = 0         # re-measure the output scale at the scale it is used. 0 = v3's and v4's one-shot
                                      # extrapolation from unit output (7-15% low in the 2026-12-07 v4 attempt)
    calibrate_tol: float = 0.03       # relative tolerance of the measured planted gap
    context_pool: bool = False        # gate by a pooled read of the prompt (a context neuron and a uniformly
                                      # attending head per chain; mechbias.groundtruth.context_pool). False: v3/v4
    pool_ridge_grid: tuple[float, ...] = (0.1, 1.0, 10.0)   # the context read's penalty: 2-fold CV over templates
    ramp_gate: bool = False           # with context_pool: the prediction neurons are a pair making a saturating ramp
                                      # of the pooled context read (context_pool.ramp_gate; n_last must be 2), and
                                      # every prediction-neuron row is blind to every chain's writes
    ramp_max_other: float = 0.1       # the ramp window's largest mean opening on the other contexts' out-of-fold reads
    erase_head_output: bool = False   # one more neuron per chain in its head's layer removes the head's write along p_c
                                      # after the prediction neurons read it (context_pool.write_eraser), so no later
                                      # layer reads the group signal: listed with the chain's name-side units
    seed: int = 0


def construct_planted(model: TransformerBridge, cfg: ConstructConfig | None = None) -> tuple[PlantedDelta, PlantConfig, dict]:
    """Write the v3 circuit into ``model`` (in place). Returns the delta, the layout as a
    :class:`~mechbias.groundtruth.planted.PlantConfig` (``only`` = name-position neurons, ``heads``,
    ``only_last`` = prediction-position neurons) and the fit statistics."""
    cfg = cfg or ConstructConfig()
    for c in cfg.planted:
        if c not in cfg.fit_contexts:
            raise ValueError(f"planted context {c!r} must be among the fitting contexts {cfg.fit_contexts}")
    n_ctx = len(cfg.planted)
    if cfg.ramp_gate and not (cfg.context_pool and cfg.n_last == 2):
        raise ValueError("ramp_gate needs context_pool=True and n_last=2 (one rising and one falling neuron)")
    if cfg.context_pool and not cfg.pool_ridge_grid:
        raise ValueError("pool_ridge_grid must name at least one penalty")
    if not all(1 <= l < model.cfg.n_layers for l in cfg.head_layers):
        raise ValueError(f"head layers must lie in 1..{model.cfg.n_layers - 1} (a name neuron sits one layer below)")
    if n_ctx > len(set(cfg.head_layers)) * model.cfg.n_heads:
        raise ValueError(f"{n_ctx} planted contexts need {n_ctx} heads; the head layers have fewer")
    # one head per planted context: the least used heads of the head layers (their query and output are
    # overwritten, so what they did before is lost)
    heads = least_used_heads(model, cfg.head_layers, len(cfg.planted))
    pool_heads = (least_used_heads(model, cfg.head_layers, len(cfg.planted), exclude=set(heads)) if cfg.context_pool
                  else [None] * len(cfg.planted))
    layout: dict[str, dict[str, Any]] = {}
    taken: set = set()
    for c, (lh, h), ph in zip(cfg.planted, heads, pool_heads, strict=True):
        below = least_used_neurons(model, [lh - 1], cfg.n_name + 1 + cfg.context_pool, exclude=taken)
        taken |= set(below)
        last = least_used_neurons(model, [lh], cfg.n_last + cfg.erase_head_output, exclude=taken)
        taken |= set(last)
        layout[c] = {"name": below[: cfg.n_name], "pointer": below[cfg.n_name], "head": (lh, h), "last": last[: cfg.n_last]}
        if cfg.erase_head_output:
            layout[c]["erase"] = last[cfg.n_last]
        if cfg.context_pool:
            layout[c] |= {"ctx": below[cfg.n_name + 1], "pool": ph}
        _LOG.info(f"[construct] {c}: name neurons {layout[c]['name']}, pointer {layout[c]['pointer']}, head L{lh}H{h}, "
            f"last neurons {last}")
    name_units = [u for c in cfg.planted for u in layout[c]["name"]]
    ptr_units = [layout[c]["pointer"] for c in cfg.planted]
    last_units = [u for c in cfg.planted for u in layout[c]["last"]]
    ctx_units = [layout[c]["ctx"] for c in cfg.planted if cfg.context_pool]
    erase_units = [layout[c]["erase"] for c in cfg.planted if cfg.erase_head_output]
    dh = model.cfg.d_head
    group_size = model.cfg.n_heads // model.cfg.n_key_value_heads if getattr(model.cfg, "n_key_value_heads", None) else 1
    # silence every planted unit: what the readers see before their writers are in place is the native model
    with torch.no_grad():
        for l, i in name_units + ptr_units + last_units + ctx_units + erase_units:
            g, u, o = mlp_weights(model, l)
            g[i] = 0.0
            u[i] = 0.0
            o[:, i] = 0.0
        for c in cfg.planted:
            for l, h in [layout[c]["head"]] + ([layout[c]["pool"]] if cfg.context_pool else []):
                attn_weights(model, l)[1][:, head_rows(torch.tensor([h]), dh)] = 0.0
    items = construction_items(model, cfg.axis, cfg.favoured, cfg.fit_contexts, names=cfg.names,
                               templates=cfg.templates, names_per_cell=cfg.names_per_cell,
                               neutral_tokens=cfg.neutral_tokens, seed=cfg.seed)
    named = [it for it in items if it.sign != 0]
    ctx0 = load_context(cfg.planted[0])
    pos_id, neg_id = model.to_single_token(ctx0.positive), model.to_single_token(ctx0.negative)
    signs = torch.tensor([it.sign for it in named], dtype=torch.float64)
    stats: dict = {"layout": {c: {k: (list(map(list, v)) if k in ("name", "last") else list(v)) for k, v in lay.items()}
                              for c, lay in layout.items()}}

    # 1. name-position neurons: gate = "is a name token", up = the name's group; output written in step 2
    name_layers = sorted({layout[c]["head"][0] - 1 for c in cfg.planted})
    feats = capture(model, items, [("in:mlp.gate", l) for l in name_layers])
    name_rows = {}
    for l in name_layers:
        f = feats[("in:mlp.gate", l)]
        Xg, yg = stack_rows(f, items, lambda it, p: 1.0 if p in it.name_positions and it.sign != 0 else -1.0)
        g_row = ridge(Xg, yg, cfg.ridge, balanced_weights(yg))
        on = Xg[yg > 0].double() @ g_row
        g_row = g_row * cfg.gate_on / float(on.median())
        Xu, yu = stack_rows(f, items, lambda it, p: it.sign if p in it.name_positions and it.sign != 0 else None)
        _, fold = stack_rows(f, items, lambda it, p: float(name_fold(it.name)) if p in it.name_positions and it.sign != 0
                        else None)
        lam, cv = cv_ridge(Xu, yu, fold, cfg.ridge_grid)
        u_row = ridge(Xu, yu, lam)
        pu = Xu.double() @ u_row
        u_row = u_row * 2.0 / float(pu[yu > 0].mean() - pu[yu < 0].mean())
        pg = Xg.double() @ g_row
        stats[f"name_gate_L{l}"] = {"group_ridge": lam, "group_cv_sign_accuracy": cv,
                                    "on_q05": float((pg[yg > 0]).quantile(0.05)),
                                    "off_q95": float((pg[yg < 0]).quantile(0.95)),
                                    "group_sign_accuracy": float(((Xu.double() @ u_row > 0) == (yu > 0)).double().mean())}
        # pointer neurons: the same name gate, an up row that reads ~1 everywhere (the mean normalised input):
        # an unsigned "a name is here" signal for the heads' keys
        mean_in = torch.cat([x[1:] for x in f]).double().mean(0)
        name_rows[l] = (g_row, u_row, mean_in / mean_in.norm() ** 2)
        _LOG.info(f"[construct] name gate L{l}: {stats[f'name_gate_L{l}']}")
    with torch.no_grad():
        for c in cfg.planted:
            for l, i in layout[c]["name"] + [layout[c]["pointer"]]:
                g, u, _ = mlp_weights(model, l)
                g[i] = name_rows[l][0].to(g)
                u[i] = (name_rows[l][1] if (l, i) != layout[c]["pointer"] else name_rows[l][2]).to(u)
    if cfg.context_pool:  # 1b. context neurons: a constant gate, up = a read of the context from the prompt's mean
        pooled = {}
        for c in cfg.planted:
            l, i = layout[c]["ctx"]
            pooled[c] = fit_context_neuron(model, (l, i), feats[("in:mlp.gate", l)], items, c, cfg.fit_contexts,
                                           name_rows[l][2], cfg.gate_on, cfg.pool_ridge_grid)
            stats[f"context_read_{c}"] = pooled[c].stats
            _LOG.info(f"[construct] {c} context neuron L{l}N{i}: {pooled[c].stats}")

    # 2. markers. Per context, at its head's layer: the value direction e_c and the key direction k_c (in the
    #    slow rotary dimensions) with the least native variance; the residual directions that the value and
    #    key projections map onto e_c (value marker, written by the group neurons one layer below) and onto k_c
    #    (key marker, written by the pointer neuron), each solved with every other context's reads held at 0
    head_layers = sorted({layout[c]["head"][0] for c in cfg.planted})
    feats = capture(model, items, [("in:attn.v", l) for l in head_layers] + [("resid_pre", l) for l in head_layers]
                     + [("post", l) for l in name_layers])
    slow = slow_rotary_dims(dh)
    marker: dict = {}
    reads = []                                                                    # constraint rows, in order
    used: dict = {}
    for c in cfg.planted:
        l, h = layout[c]["head"]
        kv = h // group_size
        attn = model.blocks[l].attn
        w_v = attn.v.original_component.weight.detach().double()[kv * dh:(kv + 1) * dh]
        w_k = attn.k.original_component.weight.detach().double()[kv * dh:(kv + 1) * dh][slow]
        gamma = model.blocks[l].ln1.original_component.weight.detach().double()
        Xn = torch.cat(feats[("in:attn.v", l)]).double()                           # normalised inputs, BOS included
        ev, evec = torch.linalg.eigh(torch.cov((Xn @ w_v.T).T))
        ek, eveck = torch.linalg.eigh(torch.cov((Xn @ w_k.T).T))
        k_used = used.setdefault((l, kv), 0)
        used[(l, kv)] = k_used + 1
        e, kd = evec[:, k_used], eveck[:, k_used]
        marker[c] = {"e": e, "k": kd, "head": (l, h), "kv": kv, "w_v": w_v,
                     "sd_v": float(ev[k_used].clamp(min=1e-12).sqrt()),
                     "sd_k": float(ek[k_used].clamp(min=1e-12).sqrt()), "mean_q": Xn[1:].mean(0)}
        reads += [(e @ w_v) * gamma, (kd @ w_k) * gamma]
    for c in cfg.planted if cfg.context_pool else ():    # the pooling heads' value directions (uniform attention)
        marker[c]["pool"], row = pool_value_read(model, layout[c]["pool"], feats[("in:attn.v", layout[c]["pool"][0])],
                                                 used, group_size, pooled[c].own | pooled[c].other)
        reads.append(row)
    # where a write would move the answer score (native model, planted units silent): the score's gradient
    # at the name positions (markers) and at the last position after attention (p_c), on selection prompts
    sub = named[:: cfg.grad_every]
    grads = score_gradients(model, sub, [(pt, l) for l in head_layers for pt in ("resid_pre", "resid_mid")],
                         pos_id, neg_id)
    reads_m = torch.stack(reads)
    free_all = torch.linalg.pinv(reads_m)                                       # the markers without avoidance
    solve = {}
    for j, c in enumerate(cfg.planted):
        l = marker[c]["head"][0]
        G = torch.cat([g[it.name_positions] for g, it in zip(grads[("resid_pre", l)], sub, strict=True)]).double()
        avoid = energy_basis(G, cfg.side_effect)
        rows = torch.cat([reads_m, avoid])
        solve[c] = torch.linalg.pinv(rows)[:, 2 * j: 2 * j + 2]                 # value / key marker columns
        free = free_all[:, 2 * j: 2 * j + 2]
        score_v = float((G @ solve[c][:, 0]).pow(2).mean().sqrt() / solve[c][:, 0].norm())
        score_v0 = float((G @ free[:, 0]).pow(2).mean().sqrt() / free[:, 0].norm())
        stats[f"marker_avoid_{c}"] = {"directions": len(avoid), "norm_ratio": float(solve[c][:, 0].norm() / free[:, 0].norm()),
                                      "score_gradient_per_unit_norm": score_v, "without_avoidance": score_v0}
        _LOG.info(f"[construct] {c} markers avoid {len(avoid)} gradient directions: value marker norm x"
            f"{stats[f'marker_avoid_{c}']['norm_ratio']:.2f}, rms score gradient per unit norm {score_v:.4f} "
            f"(min-norm marker {score_v0:.4f})")
    rms = {l: float(torch.cat([x[it.name_positions] for x, it in zip(feats[("resid_pre", l)], items, strict=True) if it.sign != 0])
                    .pow(2).mean(-1).sqrt().median()) for l in head_layers}
    for c in cfg.planted:
        mk = marker[c]
        l_head = mk["head"][0]
        m_v, m_k = solve[c][:, 0], solve[c][:, 1]                                  # read 1 by own e / k, 0 by the rest
        signed = torch.stack([torch.cat([x[it.name_positions, i] * it.sign for x, it in zip(feats[("post", ll)], items, strict=True)
                                         if it.sign != 0]) for ll, i in layout[c]["name"]]).sum(0).mean()
        lp, ip = layout[c]["pointer"]
        ptr = torch.cat([x[it.name_positions, ip] for x, it in zip(feats[("post", lp)], items, strict=True) if it.sign != 0]).mean()
        # written vector v at the name adds v . read / rms to the read
        a_v = cfg.marker_snr * mk["sd_v"] * rms[l_head] / float(signed)
        a_k = cfg.key_snr * mk["sd_k"] * rms[l_head] / float(ptr)
        with torch.no_grad():
            for l, i in layout[c]["name"]:
                mlp_weights(model, l)[2][:, i] = (a_v * m_v).to(mlp_weights(model, l)[2])
            mlp_weights(model, lp)[2][:, ip] = (a_k * m_k).to(mlp_weights(model, lp)[2])
        mk.update(value_norm=float(a_v * m_v.norm()), key_norm=float(a_k * m_k.norm()), signed_act=float(signed),
                  pointer_act=float(ptr))
        _LOG.info(f"[construct] {c} markers for L{l_head}: value sd {mk['sd_v']:.3f} (output norm {mk['value_norm']:.2f}), "
            f"key sd {mk['sd_k']:.3f} (output norm {mk['key_norm']:.2f}), rms {rms[l_head]:.2f}")
    for j, c in enumerate(cfg.planted if cfg.context_pool else ()):
        l = layout[c]["pool"][0]
        write_context_marker(model, layout[c]["ctx"], grads[("resid_pre", l)], feats[("resid_pre", l)], reads_m,
                             2 * len(cfg.planted) + j, pooled[c], marker[c]["pool"], cfg.marker_snr, cfg.side_effect)
        _LOG.info(f"[construct] {c} context marker: pooled native sd {marker[c]['pool']['sd']:.4f}, output norm "
                  f"{marker[c]['pool']['marker_norm']:.2f}")

    # 3. heads: a constant query along k_c in the slow rotary dimensions (the name's key marker then beats every
    #    other key by attend_logit), output columns reading e_c and writing p_c: the direction of the normalised
    #    residual with the least native variance at the head's own MLP input. The prediction-position neurons
    #    of the same layer read it there (u_c = p_c / gamma_ln2 reads p_c . x / rms), so nothing between the
    #    writer and the reader can transform it; scaled so the group difference along p_c at the last position
    #    is marker_snr native standard deviations
    feats = capture(model, items, [("in:mlp.gate", l) for l in head_layers] + [("in:attn.v", l) for l in head_layers])
    for c in cfg.planted:
        mk = marker[c]
        l, h = mk["head"]
        vals = torch.tensor([float((x[it.name_positions].double() @ mk["w_v"].T @ mk["e"]).mean())
                             for x, it in zip(feats[("in:attn.v", l)], items, strict=True) if it.sign != 0])
        va, vb = group_means(vals, signs)
        designed = cfg.marker_snr * mk["sd_v"]
        stats[f"value_read_{c}"] = {"designed": designed, "group_A": va, "group_B": vb}
        _LOG.info(f"[construct] {c} value read at the name: designed +/-{designed:.3f}, measured A {va:+.3f}, B {vb:+.3f}")
        g2 = model.blocks[l].ln2.original_component.weight.detach().double()
        xhat = torch.cat([x[1:] for x in feats[("in:mlp.gate", l)]]).double() / g2
        Gl = torch.stack([g[-1] for g in grads[("resid_mid", l)]]).double()
        taken_p = [marker[o]["p"] for o in cfg.planted if "p" in marker[o]]     # earlier chains' directions
        p_dir, info = quiet_direction(torch.cov(xhat.T), Gl.T @ Gl / len(Gl),
                                      torch.stack(taken_p) if taken_p else None)
        mk["p"], mk["u"], mk["native_p"] = p_dir, p_dir / g2, info["native_var"] ** 0.5
        stats[f"p_{c}"] = info
        _LOG.info(f"[construct] {c} head output direction: native var {info['native_var']:.2e}, score gradient second "
            f"moment {info['grad_second_moment']:.2e} (lowest-variance direction: "
            f"{info['grad_second_moment_lowest_variance']:.2e}), mu {info['mu']:.3g}")
        nu = mk["mean_q"] / mk["mean_q"].norm() ** 2                                # nu . x_normed ~ 1
        s_q = cfg.attend_logit * dh ** 0.5 / (cfg.key_snr * mk["sd_k"])
        with torch.no_grad():
            q_w, o = attn_weights(model, l)
            rows = head_rows(torch.tensor([h]), dh)
            new_q = torch.zeros(dh, q_w.shape[1], dtype=torch.float64)
            new_q[slow] = torch.outer(s_q * mk["k"], nu)
            q_w[rows] = new_q.to(q_w)
            o[:, rows] = torch.outer(mk["p"], mk["e"]).to(o)
    for c in cfg.planted if cfg.context_pool else ():
        l = layout[c]["pool"][0]
        write_pooling_head(model, layout[c]["pool"], feats[("in:mlp.gate", l)], grads[("resid_mid", l)],
                           [marker[o]["p"] for o in cfg.planted]
                           + [marker[o]["pool"]["r"] for o in cfg.planted if "r" in marker[o]["pool"]], marker[c]["pool"])
    feats = capture(model, items, [("in:mlp.gate", l) for l in head_layers] + [("pattern", l) for l in head_layers])
    for c in cfg.planted if cfg.context_pool else ():
        l = layout[c]["pool"][0]
        stats[f"pool_{c}"] = scale_pooling_head(model, layout[c]["pool"], feats[("in:mlp.gate", l)],
                                                feats[("pattern", l)], items, marker[c]["pool"], pooled[c],
                                                cfg.marker_snr)
        _LOG.info(f"[construct] {c} pooling head L{l}H{layout[c]['pool'][1]}: {stats[f'pool_{c}']}")
    for c in cfg.planted:
        mk = marker[c]
        l, h = mk["head"]
        on_name = torch.tensor([float(x[h, -1, it.name_positions].sum()) for x, it in zip(feats[("pattern", l)], items, strict=True)
                                if it.sign != 0])
        proj = torch.tensor([float(x[-1].double() @ mk["u"]) for x in feats[("in:mlp.gate", l)]])
        pa, pb = group_means(proj[[k for k, it in enumerate(items) if it.sign != 0]], signs)
        diff = (pa - pb) / 2                                                      # per unit output scale
        if abs(diff) < 1e-4:
            raise RuntimeError(f"{c}'s head carries no group signal to the last position (read {diff:.2e})")
        beta = cfg.marker_snr * mk["native_p"] / diff
        with torch.no_grad():
            attn_weights(model, l)[1][:, head_rows(torch.tensor([h]), dh)] *= beta
        stats[f"head_{c}"] = {"attention_on_name_median": float(on_name.median()),
                              "attention_on_name_q05": float(on_name.quantile(0.05)), "scale": beta,
                              "read_per_unit_scale": diff, "native_sd": mk["native_p"]}
        _LOG.info(f"[construct] {c} head L{l}H{h}: attention from the last position to the name median "
            f"{float(on_name.median()):.3f} (5% {float(on_name.quantile(0.05)):.3f}); read along p {diff:+.4f} per unit, "
            f"native sd {mk['native_p']:.4f}, scale {beta:+.2f}")

    # 4. prediction-position neurons (same layer as the head, after its attention): up = u_c (the head's group
    #    signal), gate = context c at the last position (a ridge probe made blind to p_c); output = the answer
    #    direction, scaled to the target shift
    w_u = model.W_U.detach().float()
    gamma_f = model.ln_final.original_component.weight.detach().float()
    answer = gamma_f * (w_u[:, pos_id] - w_u[:, neg_id])
    answer = answer / answer.norm()
    feats = capture(model, items, [("in:mlp.gate", l) for l in head_layers])
    last_rows: dict = {}
    for c in cfg.planted:
        mk = marker[c]
        l = mk["head"][0]
        g2 = model.blocks[l].ln2.original_component.weight.detach().double()
        f = feats[("in:mlp.gate", l)]
        # up = a * u_c + b * (a row that reads ~1): +1 / -1 for the groups' names, 0 for name-free prompts
        mean_in = torch.cat([x[1:] for x in f]).double().mean(0)
        ones_row = mean_in / mean_in.norm() ** 2
        if cfg.ramp_gate:  # blind to every chain's writes, so no chain reads another's p or r through its constant
            ones_row = blind_row(ones_row, g2, [marker[o]["p"] for o in cfg.planted]
                                 + [marker[o]["pool"]["r"] for o in cfg.planted])
        Xu, yu = stack_rows(f, items, lambda it, p: it.sign if at_last(it, p) else None)
        ab = ridge(torch.stack([Xu.double() @ mk["u"], Xu.double() @ ones_row], 1), yu, 0.0, balanced_weights(yu))
        u_row = float(ab[0]) * mk["u"] + float(ab[1]) * ones_row
        pu = Xu.double() @ u_row
        Xg, yg = stack_rows(f, items, partial(gate_target, c))
        if cfg.ramp_gate:
            rows, st = ramp_gate([marker[o]["p"] for o in cfg.planted], {o: marker[o]["pool"] for o in cfg.planted}, c,
                                 f, items, g2, ones_row, cfg.ridge, cfg.last_gate_on, pooled[c], cfg.ramp_max_other)
            st["group_sign_accuracy"] = float(((pu > 0) == (yu > 0))[yu != 0].double().mean())
            stats[f"last_{c}_L{l}"] = st
            _LOG.info(f"[construct] {c} ramp gate L{l}: " + str({k: v for k, v in st.items() if k != "window_table"}))
            up, down = layout[c]["last"]
            last_rows[up], last_rows[down] = (rows[0], u_row), (rows[1], -u_row)   # silu(A) up - silu(B) up
            continue
        if cfg.context_pool:
            g_row, stats[f"last_gate_{c}"] = pooled_gate([marker[o]["p"] for o in cfg.planted],
                                                        {o: marker[o]["pool"] for o in cfg.planted}, c, f, items, Xg, yg,
                                                        g2, ones_row, cfg.ridge, cfg.last_gate_on)
            _LOG.info(f"[construct] {c} pooled gate (context, position, constant): {stats[f'last_gate_{c}']}")
        else:
            g_row = ridge(Xg, yg, cfg.ridge, balanced_weights(yg))
        v = g_row * g2                                                            # the gate's read of x / rms
        g_row = (v - (v @ mk["p"]) * mk["p"]) / g2                                # blind to p_c
        pg = Xg.double() @ g_row
        g_row = g_row * cfg.last_gate_on / float(pg[yg > 0].median())
        pg = Xg.double() @ g_row
        named_u = yu != 0
        st = {"on_q05": float(pg[yg > 0].quantile(0.05)), "off_q95": float(pg[yg < 0].quantile(0.95)),
              "group_sign_accuracy": float(((pu > 0) == (yu > 0))[named_u].double().mean()),
              "up_name_free_mean": float(pu[~named_u].mean()), "up_name_free_sd": float(pu[~named_u].std())}
        stats[f"last_{c}_L{l}"] = st
        _LOG.info(f"[construct] {c} last neurons L{l}: {st}")
        for u in layout[c]["last"]:
            last_rows[u] = (g_row, u_row)
    with torch.no_grad():
        for c in cfg.planted:
            for l, i in layout[c]["last"]:
                g, u, o = mlp_weights(model, l)
                g[i] = last_rows[(l, i)][0].to(g)
                u[i] = last_rows[(l, i)][1].to(u)
                o[:, i] = answer.to(o)
    if cfg.erase_head_output:
        feats = capture(model, items, [("in:mlp.gate", l) for l in head_layers] + [("resid_mid", l) for l in head_layers])
        writes = [marker[o]["p"] for o in cfg.planted] + [marker[o]["pool"]["r"] for o in cfg.planted if cfg.context_pool]
        for c in cfg.planted:
            l = marker[c]["head"][0]
            stats[f"erase_{c}"] = write_eraser(model, layout[c]["erase"], marker[c]["p"], feats[("in:mlp.gate", l)],
                                               feats[("resid_mid", l)], items, writes, cfg.gate_on)
            _LOG.info(f"[construct] {c} eraser L{l}N{layout[c]['erase'][1]}: {stats[f'erase_{c}']}")
    # calibrate the output scale: the planted gap on the fitting prompts of c is 2 * shift
    scores_on = answer_scores(model, named, pos_id, neg_id)
    with torch.no_grad():
        for c in cfg.planted:
            for l, i in layout[c]["last"]:
                mlp_weights(model, l)[2][:, i] = 0.0
    scores_off = answer_scores(model, named, pos_id, neg_id)
    for c in cfg.planted:
        idx = [k for k, it in enumerate(named) if it.context == c]
        d = scores_on[idx] - scores_off[idx]
        da, db = group_means(d, signs[idx])
        gap_unit = da - db
        kappa = 2 * cfg.shift / gap_unit
        stats[f"last_{c}_scale"] = kappa
        _LOG.info(f"[construct] {c}: unit output gives gap {gap_unit:+.4f}; output norm {kappa:.3f}")
        with torch.no_grad():
            for l, i in layout[c]["last"]:
                mlp_weights(model, l)[2][:, i] = (kappa * answer).to(mlp_weights(model, l)[2])
    if cfg.calibrate_rounds:
        # the later layers respond non-linearly: the extrapolation from unit output fell 7-15% short of the target
        # on the fitting prompts of the 2026-12-07 attempt (docs/groundtruth.md), so the scale is measured where it
        # is used (planted contexts' fitting prompts)
        calibrate_output(model, {c: layout[c]["last"] for c in cfg.planted}, answer, named, signs, scores_off,
                         pos_id, neg_id, 2 * cfg.shift, cfg.calibrate_rounds, cfg.calibrate_tol, stats)
    neurons = name_units + ptr_units + last_units + ctx_units + erase_units
    pool_units = [layout[c]["pool"] for c in cfg.planted if cfg.context_pool]
    head_units = [layout[c]["head"] for c in cfg.planted] + pool_units
    delta = PlantedDelta.capture(model, neurons, head_units)
    plant = PlantConfig(axis=cfg.axis, favoured=cfg.favoured, contexts=tuple(cfg.fit_contexts),
                        only={c: layout[c]["name"] + [layout[c]["pointer"]]
                              + ([layout[c]["ctx"]] if cfg.context_pool else [])
                              + ([layout[c]["erase"]] if cfg.erase_head_output else []) for c in cfg.planted},
                        heads={c: [layout[c]["head"]] + ([layout[c]["pool"]] if cfg.context_pool else [])
                               for c in cfg.planted},
                        only_last={c: layout[c]["last"] for c in cfg.planted},
                        shift_only=cfg.shift, shift_head=cfg.shift, shift_last=cfg.shift, names=cfg.names, seed=cfg.seed)
    stats["markers"] = {c: {k: mk[k] for k in ("sd_v", "sd_k", "value_norm", "key_norm", "signed_act", "pointer_act",
                                                "kv", "native_p")} for c, mk in marker.items()}
    return delta, plant, stats
