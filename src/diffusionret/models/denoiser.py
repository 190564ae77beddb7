"""The two DiffusionRet denoisers (SPEC.md 1.6) and their fast, timestep-hoisted form.

Both networks predict x0, a score vector over N candidates, from a noisy vector ``x_t``, the
timestep and the query/candidate features. Parameter names mirror the reference
(``q_proj``, ``k_proj``, ``v_proj``, ``proj``, ``embed_timestep.time_embed.{0,2}``, ``decoder.{0,2}``).

Fast form (:meth:`prepare`): apart from the additive ``x_t`` bias and the timestep embedding,
every projection is linear in time-independent inputs, so those products are computed once per
query; a DDIM step then costs O(K * D) per query instead of O(K * D^2). It equals :meth:`forward`
up to float re-association (tests check 1e-5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """(length, dim) table: even columns sin(p * w_i), odd columns cos(p * w_i), w_i = 10000^(-2i/dim)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


class TimestepEmbedder(nn.Module):
    """``e(t) = W2 SiLU(W1 pe[t] + b1) + b2`` over a fixed sinusoidal table indexed by integer t."""

    def __init__(self, dim: int, max_len: int = 5000) -> None:
        super().__init__()
        # Derived, not learned: kept out of the state dict (the reference stores it twice).
        self.register_buffer("table", sinusoidal_table(max_len, dim), persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) int -> (B, D)."""
        return self.time_embed(self.table[t.long()])


def _pool_frames(query: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor, temp: float) -> torch.Tensor:
    """Query-conditioned frame pooling: softmax over frames, masked *after* the softmax (no renorm).

    Args:
        query: (..., D); frames: (..., T, D) broadcastable; frame_mask: (..., T).
    Returns:
        (..., D).
    """
    logits = torch.einsum("...d,...td->...t", query, frames) / temp
    weights = torch.softmax(logits, dim=-1) * frame_mask.to(logits.dtype)
    return torch.einsum("...t,...td->...d", weights, frames)


class _DenoiserBase(nn.Module):
    def __init__(self, dim: int, temp: float = 1.0) -> None:
        super().__init__()
        self.dim = dim
        self.temp = temp
        self.embed_timestep = TimestepEmbedder(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.decoder = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, 1))

    def _head(self, logits: torch.Tensor, values: torch.Tensor, dec_in: torch.Tensor) -> torch.Tensor:
        """logits (B, N), values (B, N, D), dec_in (B, N, D) -> x0 (B, N)."""
        w = torch.softmax(logits, dim=-1)
        h = self.proj(torch.einsum("bn,bnd->bd", w, values))
        h = h.unsqueeze(1).expand(-1, dec_in.shape[1], -1)
        return self.decoder(torch.cat([h, dec_in], dim=-1)).squeeze(-1) + w

    def _time_terms(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the distinct timesteps only, and the index of each row's timestep."""
        unique, inverse = torch.unique(t.long(), return_inverse=True)
        return self.embed_timestep(unique), inverse


class T2VDenoiser(_DenoiserBase):
    """Text query, N candidate videos (the reference's ``Diffusion``)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, video_emb: torch.Tensor,
                video_mask: torch.Tensor) -> torch.Tensor:
        """Predict x0.

        Args:
            x: (B, N) noisy scores; t: (B,) integer timesteps.
            text_emb: (B, D) query text (projected EOT); video_emb: (B, N, T, D) candidates;
            video_mask: (B, N, T).
        Returns:
            (B, N).
        """
        e = self.embed_timestep(t)
        vbar = _pool_frames(text_emb.unsqueeze(1), video_emb, video_mask, self.temp)  # (B, N, D)
        q = self.q_proj(text_emb + e)  # (B, D)
        k = self.k_proj(vbar + e.unsqueeze(1))
        v = self.v_proj(vbar + e.unsqueeze(1))
        logits = torch.einsum("bd,bnd->bn", q, k) + x  # no 1/sqrt(D), as in the reference
        return self._head(logits, v, vbar)

    def prepare(self, text_emb: torch.Tensor, video_emb: torch.Tensor, video_mask: torch.Tensor) -> "PreparedDenoiser":
        """Hoist every time-independent product out of the sampling loop (see module docstring)."""
        vbar = _pool_frames(text_emb.unsqueeze(1), video_emb, video_mask, self.temp)
        qc = self.q_proj(text_emb)  # (B, D)
        kv = self.k_proj(vbar)  # (B, N, D)
        # (B, 1, D): the text query is shared by its N candidates; broadcasting avoids N copies.
        return self._prepared(qc.unsqueeze(1), kv, self.v_proj(vbar), vbar)

    def _prepared(self, q_static: torch.Tensor, k_static: torch.Tensor, v_static: torch.Tensor,
                  dec_static: torch.Tensor) -> "PreparedDenoiser":
        w1 = self.decoder[0].weight  # (2D, 2D): columns [:D] see h, [D:] see the candidate
        d = self.dim
        w1_h, w1_c = w1[:, :d], w1[:, d:]
        pv = v_static @ self.proj.weight.T  # (B, N, D): proj applied to each value
        return PreparedDenoiser(
            module=self,
            qk=(q_static * k_static).sum(-1),
            q_static=q_static, k_static=k_static,
            g=pv @ w1_h.T,  # (B, N, 2D): decoder's h-columns applied to each projected value
            c=dec_static @ w1_c.T + self.decoder[0].bias,  # (B, N, 2D)
        )


class V2TDenoiser(_DenoiserBase):
    """Video query, N candidate texts (the reference's ``Diffusion_v``)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, video_emb: torch.Tensor,
                video_mask: torch.Tensor) -> torch.Tensor:
        """Predict x0.

        Args:
            x: (B, N) noisy scores; t: (B,) integer timesteps.
            text_emb: (B, N, D) candidate texts; video_emb: (B, T, D) query video; video_mask: (B, T).
        Returns:
            (B, N).
        """
        e = self.embed_timestep(t).unsqueeze(1)
        vbar = _pool_frames(text_emb, video_emb.unsqueeze(1), video_mask.unsqueeze(1), self.temp)  # (B, N, D)
        q = self.q_proj(vbar + e)
        k = self.k_proj(text_emb + e)
        v = self.v_proj(text_emb + e)
        logits = (q * k).sum(-1) + x  # per-candidate dot product, not full attention
        return self._head(logits, v, text_emb)

    def prepare(self, text_emb: torch.Tensor, video_emb: torch.Tensor, video_mask: torch.Tensor) -> "PreparedDenoiser":
        vbar = _pool_frames(text_emb, video_emb.unsqueeze(1), video_mask.unsqueeze(1), self.temp)
        return T2VDenoiser._prepared(self, self.q_proj(vbar), self.k_proj(text_emb), self.v_proj(text_emb), text_emb)


@dataclass
class PreparedDenoiser:
    """A denoiser with its conditioning folded in; ``__call__(x, t)`` equals ``module.forward``.

    With ``q = Qs + Wq e`` and ``k = Ks + Wk e`` (e the timestep embedding, shared by a row):
    ``<q, k> = <Qs, Ks> + <Qs, Wk e> + <Wq e, Ks> + <Wq e, Wk e>``; the value path and the
    decoder's first layer are linear, so ``W1 [proj(sum w v); c] = sum_n w_n G_n + W1_h (P Wv e + b_p) + C``.
    """

    module: _DenoiserBase
    qk: torch.Tensor  # (B, N)
    q_static: torch.Tensor  # (B, N, D), or (B, 1, D) when shared by the candidates
    k_static: torch.Tensor  # (B, N, D)
    g: torch.Tensor  # (B, N, 2D)
    c: torch.Tensor  # (B, N, 2D)
    _buffer: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, N), t: (B,) -> x0 (B, N)."""
        m = self.module
        d = m.dim
        w1_h = m.decoder[0].weight[:, :d]
        if bool((t == t[0]).all()):
            # DDIM: one timestep for the whole batch, so its terms are single vectors (broadcast,
            # no per-row gathers).
            e = m.embed_timestep(t[:1])  # (1, D)
            qe, ke = m.q_proj(e)[0], m.k_proj(e)[0]  # (D,)
            he = (m.proj(m.v_proj(e)) @ w1_h.T)[0]  # (2D,)
            logits = self.qk + self.q_static @ ke + self.k_static @ qe + (qe @ ke) + x
        else:
            e_unique, inverse = m._time_terms(t)
            qe, ke = m.q_proj(e_unique)[inverse], m.k_proj(e_unique)[inverse]  # (B, D)
            he = (m.proj(m.v_proj(e_unique)) @ w1_h.T)[inverse]  # (B, 2D)
            logits = (self.qk + torch.einsum("bnd,bd->bn", self.q_static, ke)
                      + torch.einsum("bnd,bd->bn", self.k_static, qe) + (qe * ke).sum(-1, keepdim=True) + x)
        w = torch.softmax(logits, dim=-1)
        hidden = torch.bmm(w.unsqueeze(1), self.g).squeeze(1) + he  # (B, 2D): W1_h h
        # One reused (B, N, 2D) buffer: a fresh allocation of that size every step costs more in
        # page faults than the arithmetic.
        if torch.is_grad_enabled():
            pre = torch.relu(self.c + hidden.unsqueeze(1))
        else:
            if self._buffer is None or self._buffer.shape != self.c.shape:
                self._buffer = torch.empty_like(self.c)
            pre = torch.add(self.c, hidden.unsqueeze(1), out=self._buffer).relu_()
        out = pre @ m.decoder[2].weight[0] + m.decoder[2].bias
        return out + w
