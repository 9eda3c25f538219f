"""The GRADIEND encoder-decoder (one neuron) and its chunked AdamW with closed-form gradients."""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

# ----------------------------------------------------------------------------
# the one-neuron model
# ----------------------------------------------------------------------------

class GradiendModel:
    """``h = tanh(w_e . g + b_e)``, ``ĝ = h w_d + b_d``, stored as flat float32 tensors."""

    def __init__(self, n: int, seed: int = 0, decoder_factor: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(n)  # torch.nn.Linear's default for a 1 x n layer
        self.w_e = torch.empty(n).uniform_(-bound, bound, generator=g)  # in place: no n-sized temporaries
        self.b_e = float(torch.empty(1).uniform_(-bound, bound, generator=g))
        x = float(self.w_e.abs().max()) * decoder_factor  # the paper's decoder init range
        self.w_d = torch.empty(n).uniform_(-x, x, generator=g)
        self.b_d = torch.empty(n).uniform_(-x, x, generator=g)
        self.n = n

    def encode(self, g: Float[Tensor, " params"], chunk: int = 1 << 22) -> float:
        """The feature value h of a gradient (the encoder, a tanh of a weighted sum)."""
        if g.dtype == torch.float32:
            z = float(torch.dot(self.w_e, g))
        else:  # e.g. float16 gradients streamed from disk: convert chunk by chunk
            z = sum(float(torch.dot(self.w_e[a:a + chunk], g[a:a + chunk].float())) for a in range(0, self.n, chunk))
        return math.tanh(z + self.b_e)

    def decode(self, h: float) -> Float[Tensor, " params"]:
        """The decoder's gradient-space update for feature value ``h``."""
        return self.w_d * h + self.b_d

    def state(self) -> dict[str, Tensor]:
        return {"w_e": self.w_e, "b_e": torch.tensor([self.b_e]), "w_d": self.w_d, "b_d": self.b_d}

    @classmethod
    def from_state(cls, d: dict[str, Tensor]) -> GradiendModel:
        m = cls.__new__(cls)
        m.w_e, m.b_e, m.w_d, m.b_d = d["w_e"], float(d["b_e"][0]), d["w_d"], d["b_d"]
        m.n = len(m.w_e)
        return m

    def flip(self) -> None:
        """Negate the encoding (h -> -h) without changing the decoder's output for a given input."""
        self.w_e.neg_()  # in place: no second copy of n-sized vectors
        self.w_d.neg_()
        self.b_e = -self.b_e


class ChunkedAdamW:
    """AdamW on the GRADIEND model with closed-form gradients, chunked; moments in bfloat16."""

    def __init__(self, net: GradiendModel, lr: float, weight_decay: float = 1e-2, betas=(0.9, 0.999),
                 eps: float = 1e-8, chunk: int = 1 << 20, moment_dtype: torch.dtype = torch.bfloat16):
        self.m, self.lr, self.wd, self.eps, self.chunk = net, float(lr), float(weight_decay), float(eps), int(chunk)
        self.b1, self.b2 = float(betas[0]), float(betas[1])
        n = net.n
        self.dtype = moment_dtype
        self.state = {k: (torch.zeros(n, dtype=moment_dtype), torch.zeros(n, dtype=moment_dtype))
                      for k in ("w_e", "w_d", "b_d")}
        self.state_be = [0.0, 0.0]
        self.t = 0

    def _update(self, name: str, param: Tensor, grad_fn, a: int, b: int) -> None:
        m, v = self.state[name]
        g = grad_fn(a, b)
        mc = m[a:b].float().mul_(self.b1).add_(g, alpha=1 - self.b1)
        vc = v[a:b].float().mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        m[a:b] = mc.to(self.dtype)
        v[a:b] = vc.to(self.dtype)
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        p = param[a:b]
        p.mul_(1 - self.lr * self.wd)
        p.addcdiv_(mc / bc1, (vc / bc2).sqrt_().add_(self.eps), value=-self.lr)

    def step(self, g: Float[Tensor, " params"], target: Float[Tensor, " params"]) -> float:
        """One step on (input ``g``, target ``target``); returns the MSE before the step."""
        M, n = self.m, self.m.n
        self.t += 1
        z = float(torch.dot(M.w_e, g)) + M.b_e
        h = math.tanh(z)
        # pass 1: residual statistics (loss and dL/dh) without storing the residual
        loss, dh = 0.0, 0.0
        for a in range(0, n, self.chunk):
            b = min(a + self.chunk, n)
            r = M.w_d[a:b] * h + M.b_d[a:b] - target[a:b]
            loss += float(r.pow(2).sum())
            dh += float(torch.dot(M.w_d[a:b], r))
        loss /= n
        dh *= 2.0 / n
        dz = dh * (1 - h * h)
        # pass 2: updates (the residual is recomputed chunk by chunk from the pre-step weights)
        for a in range(0, n, self.chunk):
            b = min(a + self.chunk, n)
            r = M.w_d[a:b] * h + M.b_d[a:b] - target[a:b]
            self._update("w_d", M.w_d, lambda a_, b_, r=r: r * (2.0 * h / n), a, b)
            self._update("b_d", M.b_d, lambda a_, b_, r=r: r * (2.0 / n), a, b)
            self._update("w_e", M.w_e, lambda a_, b_: g[a_:b_] * dz, a, b)
        mb, vb = self.state_be
        mb = self.b1 * mb + (1 - self.b1) * dz
        vb = self.b2 * vb + (1 - self.b2) * dz * dz
        self.state_be = [mb, vb]
        M.b_e = M.b_e * (1 - self.lr * self.wd) - self.lr * (mb / (1 - self.b1 ** self.t)) / (
            math.sqrt(vb / (1 - self.b2 ** self.t)) + self.eps)
        return loss


