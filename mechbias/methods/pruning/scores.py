r"""Per-context pruning of neurons, weights and attention heads (Breaking Down Bias).

Ma, Salinas, Henderson, Nyarko, *Breaking Down Bias: On The Limits of
Generalizable Pruning Strategies* (FAccT 2025). Components are scored
separately on prompts with group-A and group-B names from a context's
selection split, and the pruned set is a **set difference**: the top-p% for
the *target* group minus the top-q% for the other group (components specific
to processing the target group's prompts). The paper's code builds both
one-sided versions (its "Black" version prunes Top(S_Black) \ Top(S_White));
which side carries a bias is not known in advance, so the default here,
``target="both"``, prunes the union of the two set differences, ranked by
|S_A - S_B|; ``"disfavoured"``, ``"favoured"`` or a group name give one side.

Units:

* **neurons** (``blocks.{l}.mlp.hook_post``): score = mean ``|activation|`` over
  tokens x the L2 norm of the neuron's ``W_out`` row (``activation``), or
  |activation x d score / d activation| summed over positions (``attribution``);
  pruned by zeroing at all positions. Defaults p = 40%, q = 35% (the
  reproduction of the paper's appendix).
* **weights** (Wanda, as the authors' code): ``S_ij = |W_ij| * ||X_j||_2`` for
  every linear layer of every block (q, k, v, o, gate, up, down) with **each
  layer's true inputs** read at its TransformerLens hook (the released code
  fed layer-0 inputs to every layer, a bug); set difference per matrix with
  p = q = 15%; pruned by zeroing a copy-restored set of weights.
* **heads**: score = attention from the answer position to the name tokens
  (as the paper's code; group scores summed for selection), or |patching
  effect|; pruned by ``hook_q`` zeroing (uniform attention, the paper's code)
  or ``hook_z`` zeroing (output ablation). Outputs say which.

Generalization levels: L0 select on one template, evaluate on it with held-out
names; L1 select on the selection templates (components common to a fraction
of them), evaluate on held-out templates; L2 select on context A, evaluate on B.
"""


from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ...core.families import require_causal
from ...core.hooks import hooked
from ...core.params import frozen, linear_layers, named_params, w_out_row_norms
from ...core.runner import length_buckets
from ...core.sites import hook_name
from ...data.axes import pronouns, stable_hash
from ...data.contexts import load_context
from ...data.prompts import PromptSet, tokenize
from ...eval.generation import chat_prompt, sample_replies

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

def _batches(model: TransformerBridge, prompts: PromptSet, max_tokens: int = 2048, seqs=None):
    seqs = tokenize(model, prompts.texts) if seqs is None else seqs
    groups = prompts.groups
    for bucket in length_buckets([len(s) for s in seqs], max_tokens):
        yield torch.stack([seqs[i] for i in bucket]).to(model.cfg.device), groups[bucket], bucket


def name_positions(model: TransformerBridge, prompt, template: str) -> list[int]:
    """Token positions (BOS included) covering the name in a filled template (every occurrence)."""
    pron = pronouns(prompt.person.gender)
    spans, pos = [], 0
    for piece in template.split("{name}")[:-1]:
        pos += len(piece.format(name=prompt.person.name, **pron))
        spans.append((pos, pos + len(prompt.person.name)))
        pos += len(prompt.person.name)
    offsets = model.tokenizer(prompt.text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    shift = len(model.to_tokens(prompt.text)[0]) - len(offsets)  # the prepended BOS
    return [i + shift for i, (a, b) in enumerate(offsets) if any(a < e and b > s for s, e in spans)]


def top_fraction(x: Float[Tensor, ...], k: int) -> Bool[Tensor, ...]:
    """Boolean mask of the ``k`` largest entries of ``x`` (ties at the cut broken by lowest flat index). A
    linear-time partition finds the cut (``x.topk`` with ``k`` a large fraction of a weight matrix cost most of
    Wanda's ranking); non-finite inputs take ``topk``."""
    flat = x.detach().flatten()
    n = flat.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    if k <= 0:
        return mask.view(x.shape)
    if k >= n:
        return torch.ones(x.shape, dtype=torch.bool)
    if not bool(torch.isfinite(flat).all()):
        mask[flat.topk(k).indices] = True
        return mask.view(x.shape)
    a = flat.cpu().numpy() if flat.dtype in (torch.float32, torch.float64) else flat.float().cpu().numpy()  # bf16/fp16: exact in fp32
    cut = np.partition(a, n - k)[n - k]  # the k-th largest value
    above = a > cut
    need = k - int(above.sum())
    at = np.flatnonzero(a == cut)[:need]
    above[at] = True
    return torch.from_numpy(above).view(x.shape)


def set_difference(target: Float[Tensor, ...], other: Float[Tensor, ...], p: float, q: float
                   ) -> Bool[Tensor, ...]:
    """Boolean mask: in the top ``p`` fraction of ``target`` and not in the top ``q`` fraction of ``other``."""
    if target.shape != other.shape:
        raise ValueError("score tensors differ in shape")
    n = target.numel()
    return top_fraction(target, round(p * n)) & ~top_fraction(other, round(q * n))


# ----------------------------------------------------------------------------
# scores: one pass over the prompts, sums kept per (template, group)
# ----------------------------------------------------------------------------

@dataclass
class GroupStats:
    """Sums of a per-prompt statistic and counts, per (template, group)."""

    sums: dict = field(default_factory=dict)    # (template, group) -> Tensor
    counts: dict = field(default_factory=dict)  # (template, group) -> float

    def add(self, key, value: Float[Tensor, ...], count: float) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.counts[key] = self.counts.get(key, 0.0) + count

    def mean(self, templates: Sequence[int] | None = None) -> Float[Tensor, "2 ..."]:
        """``[2, ...]``: the statistic's mean for group A and B over the given templates."""
        out = []
        for g in (0, 1):
            keys = [k for k in self.sums if k[1] == g and (templates is None or k[0] in templates)]
            if not keys:
                raise ValueError(f"no prompts of group {g} in templates {templates}")
            out.append(sum(self.sums[k] for k in keys) / sum(self.counts[k] for k in keys))
        return torch.stack(out)

    @property
    def templates(self) -> list[int]:
        return sorted({k[0] for k in self.sums})


def _accumulate(model: TransformerBridge, prompts: PromptSet, per_row, *, grad: bool = False, seqs=None) -> GroupStats:
    """Run every prompt once; ``per_row(ids) -> ([b, ...] stats, [b] counts)`` is added per (template, group).
    ``seqs`` replaces the prompts' token ids (one sequence per prompt)."""
    stats = GroupStats()
    tpl = [p.template for p in prompts]
    for ids, groups, rows in _batches(model, prompts, seqs=seqs):
        vals, counts = per_row(ids)
        for b, r in enumerate(rows):
            stats.add((tpl[r], int(groups[b])), vals[b].double().cpu(), float(counts[b]))
    return stats


def neuron_stats(model: TransformerBridge, prompts: PromptSet, *, method: str = "activation") -> GroupStats:
    """Per (template, group): sums of neuron scores ``[n_layers, d_mlp]`` over prompts.

    ``activation``: mean ``|activation|`` over positions x ``||W_out row||``;
    ``attribution``: ``|sum over positions of activation x d(score)/d(activation)|``;
    ``signed_attribution``: the same without the absolute value. Magnitude scores
    miss components that matter for both groups with opposite signs (a neuron
    that pushes group A up and group B down is in both top sets, so the set
    difference drops it); the signed score keeps them apart.
    """
    L = model.cfg.n_layers
    if method != "activation":
        require_causal(model, f"Neuron {method} scores (gradient of the next-token score)")
    if method == "activation":
        w_out_norm = torch.stack([w_out_row_norms(model, l) for l in range(L)]).double()  # [L, d]

        def per_row(ids):
            acc: dict[int, Tensor] = {}
            fwd = [(hook_name("post", l), lambda a, hook, l=l: acc.__setitem__(l, a.abs().mean(1)))
                   for l in range(L)]
            with torch.no_grad(), hooked(model, fwd):
                model(ids)
            vals = torch.stack([acc[l].double().cpu() for l in range(L)], 1) * w_out_norm[None]
            return vals, torch.ones(len(ids))

        return _accumulate(model, prompts, per_row)
    if method in ("attribution", "signed_attribution"):
        signed = method == "signed_attribution"
        pos = model.to_single_token(prompts.positive)
        neg = model.to_single_token(prompts.negative)

        def per_row(ids):
            acts: dict[int, Tensor] = {}
            grads: dict[int, Tensor] = {}
            fwd: list = [(hook_name("embed"), lambda x, hook: x.detach().requires_grad_(True))]
            fwd += [(hook_name("post", l), lambda x, hook, l=l: acts.__setitem__(l, x.detach()))
                    for l in range(L)]
            bwd = [(hook_name("post", l), lambda g, hook, l=l: grads.__setitem__(l, g.detach()))
                   for l in range(L)]
            with frozen(model), hooked(model, fwd, bwd):
                lg = model(ids)
                (lg[:, -1, pos] - lg[:, -1, neg]).sum().backward()
            contrib = [(acts[l] * grads[l]).sum(1).double().cpu() for l in range(L)]
            vals = torch.stack(contrib if signed else [c.abs() for c in contrib], 1)
            return vals, torch.ones(len(ids))

        return _accumulate(model, prompts, per_row)
    raise ValueError(f"neuron score method must be 'activation', 'attribution' or 'signed_attribution', "
                     f"not {method!r}")


def neuron_scores(model: TransformerBridge, prompts: PromptSet, *, method: str = "activation"
                  ) -> Float[Tensor, "2 layer d_mlp"]:
    """Per-group neuron scores ``[2, n_layers, d_mlp]`` (group A, group B), pooled over templates."""
    return neuron_stats(model, prompts, method=method).mean().float()


def head_stats(model: TransformerBridge, prompts: PromptSet, *, reduce: str = "mean") -> GroupStats:
    """Per (template, group): sums over prompts of the attention from the last position to the name tokens,
    ``[L, H]``, averaged over the name's tokens (``reduce="mean"``, the paper's code) or summed (``"sum"``).
    Interventions active in the caller's context apply (greedy selection re-scores under the heads pruned
    so far)."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', not {reduce!r}")
    require_causal(model, "Head scores (attention from the prediction position to the name)")
    L = model.cfg.n_layers
    ctx = load_context(prompts.context)
    name_pos = {p.text: name_positions(model, p, ctx.templates[p.template]) for p in prompts}
    texts = prompts.texts
    state: dict[str, list[int]] = {}

    def per_row(ids):
        att: dict[int, Tensor] = {}
        fwd = [(hook_name("pattern", l), lambda pat, hook, l=l: att.__setitem__(l, pat[:, :, -1, :]))
               for l in range(L)]
        with torch.no_grad(), hooked(model, fwd):
            model(ids)
        rows = state["rows"]
        red = (lambda x: x.mean(-1)) if reduce == "mean" else (lambda x: x.sum(-1))
        vals = torch.stack([torch.stack([red(att[l][b][:, name_pos[texts[r]]]) for l in range(L)])
                            for b, r in enumerate(rows)])
        return vals, torch.ones(len(ids))

    stats = GroupStats()
    tpl = [p.template for p in prompts]
    for ids, groups, rows in _batches(model, prompts):
        state["rows"] = rows
        vals, counts = per_row(ids)
        for b, r in enumerate(rows):
            stats.add((tpl[r], int(groups[b])), vals[b].double().cpu(), float(counts[b]))
    return stats


def head_scores(model: TransformerBridge, prompts: PromptSet, *, reduce: str = "mean"
                ) -> Float[Tensor, "2 layer n_heads"]:
    """Per-group attention from the last position to the name tokens, ``[2, n_layers, n_heads]``."""
    return head_stats(model, prompts, reduce=reduce).mean().float()


Calibration = Literal["auto", "prompt", "chat"]
CALIBRATIONS: tuple[str, ...] = get_args(Calibration)


def calibration_mode(model: TransformerBridge, calibration: str) -> str:
    """``auto``: ``chat`` when the tokenizer has a chat template (the Wanda pruning code of Breaking Down
    Bias calibrates on the chat-formatted prompt and a sampled response), else ``prompt``."""
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, not {calibration!r}")
    has_chat = bool(getattr(model.tokenizer, "chat_template", None))
    if calibration == "chat" and not has_chat:
        raise ValueError("calibration='chat' needs a tokenizer with a chat template; this one has none "
                         "(use 'prompt')")
    return ("chat" if has_chat else "prompt") if calibration == "auto" else calibration


def calibration_seqs(model: TransformerBridge, prompts: PromptSet, *, response_tokens: int = 16, seed: int = 0) -> list[Tensor]:
    """Each prompt as a user turn in the chat template followed by a response sampled from the model
    (temperature 0.6, ``response_tokens`` tokens, one seed per prompt; prompts of equal length sampled in one
    batch, :func:`~mechbias.eval.generation.sample_replies`)."""
    chats = [chat_prompt(model, text) for text in prompts.texts]
    seeds = [int(stable_hash(seed, f"calibration:{prompts.context}:{i}")[:8], 16) for i in range(len(chats))]
    replies = sample_replies(model, chats, seeds, max_new_tokens=response_tokens)
    out = []
    for ids, reply in zip(chats, replies, strict=True):
        more = model.to_tokens(reply, prepend_bos=False)[0].cpu() if reply.strip() else ids[:0]
        out.append(torch.cat([ids, more]))
    return out


def input_stats(model: TransformerBridge, prompts: PromptSet, *, calibration: str = "prompt", response_tokens: int = 16,
                seed: int = 0) -> GroupStats:
    """Per (template, group): sums over tokens of x_j^2 for the true input of every linear layer,
    concatenated in the order of :func:`linear_layers` (counts are tokens). ``calibration``: the prompt
    texts (``prompt``) or each prompt in the chat template with a sampled response (``chat``; ``auto``
    picks chat when the tokenizer has a template, see :func:`calibration_mode`)."""
    layers = linear_layers(model)
    mode = calibration_mode(model, calibration)

    def per_row(ids):
        seen: dict[str, Tensor] = {}
        fwd = [(hook, lambda x, hook, n=name: seen.__setitem__(n, (x.reshape(x.shape[0], x.shape[1], -1).double() ** 2)
                                                               .sum(1).cpu()))
               for name, hook, _, _ in layers]
        with torch.no_grad(), hooked(model, fwd):
            model(ids)
        return torch.cat([seen[n] for n, _, _, _ in layers], 1), torch.full((len(ids),), float(ids.shape[1]))

    seqs = calibration_seqs(model, prompts, response_tokens=response_tokens, seed=seed) if mode == "chat" else None
    return _accumulate(model, prompts, per_row, seqs=seqs)


def split_norms(model: TransformerBridge, flat: Float[Tensor, " total"]) -> dict[str, Tensor]:
    """Cut a concatenated vector of mean squares back into per-layer ``||X_j||`` (sqrt of the mean)."""
    out, i = {}, 0
    params = named_params(model)
    for name, _, _, transposed in linear_layers(model):
        n_in = params[name].shape[0 if transposed else 1]
        out[name] = flat[i : i + n_in].sqrt().float()
        i += n_in
    return out


def input_norms(model: TransformerBridge, prompts: PromptSet, **calibration) -> list[dict[str, Tensor]]:
    """Per group: for each linear layer, ``sqrt(mean over tokens of x_j^2)`` of its true input
    (``calibration``: the keywords of :func:`input_stats`)."""
    m = input_stats(model, prompts, **calibration).mean()
    return [split_norms(model, m[g]) for g in (0, 1)]


def wanda_scores(model: TransformerBridge, norms: dict[str, Tensor]) -> dict[str, Tensor]:
    """``|W| * ||X||`` per weight, for every linear layer (computed on demand; large)."""
    params = named_params(model)
    out = {}
    for name, _, _, transposed in linear_layers(model):
        w = params[name].detach().abs().cpu()
        n = norms[name]
        out[name] = w * (n[:, None] if transposed else n[None, :])
    return out


# ----------------------------------------------------------------------------
