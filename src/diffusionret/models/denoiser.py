"""The two DiffusionRet denoisers (docs/reference.md §1.6) and their fast, precomputed sampling form.

Both networks predict x0, a score vector over N candidates, from a noisy vector ``x_t``, the
timestep and the query/candidate features. Parameter names mirror the reference
(``q_proj``, ``k_proj``, ``v_proj``, ``proj``, ``embed_timestep.time_embed.{0,2}``, ``decoder.{0,2}``).

Fast form (:meth:`T2VDenoiser.prepare`, :meth:`V2TDenoiser.prepare`), for sampling only. Apart from
the additive ``x_t`` bias, the attention logits are bilinear in time-independent features and the
timestep embedding, and the value path and the decoder's first layer are linear, so:

* every timestep's terms are computed once per call for all S sampling steps (:class:`StepTables`),
  and the products ``W1_h P Wv`` are fused into one matrix;
* the logits of every (query, candidate, step) are one table (B, S, N) built with one batched GEMM;
* a DDIM step is then a softmax, one (N,)x(N, 2D) product per query, one pass over a (B, N, 2D)
  tensor (the ReLU) and one matrix-vector product: O(N * D) per query, no D x D products.

For text->video evaluation, where each video is a candidate of many queries,
:meth:`T2VDenoiser.candidate_frames` maps every frame once instead of every pair's pooled video
(pooling is a weighted sum of frames, and both maps after it are linear); the pairs then keep only
their T pooling weights. The steps themselves can run in the compiled kernel of
:mod:`diffusionret.native` (same arithmetic, one query at a time).

It equals :meth:`forward` up to float re-association (tests check 1e-5).

Factored training form (:meth:`T2VDenoiser.forward_factored`, :meth:`V2TDenoiser.forward_factored`),
differentiable: the same algebra for a training step over N candidates per query. Keys and values are
never projected per (query, candidate) pair (the logits are dot products with per-query vectors, the
values enter through their attention-weighted sum), the decoder's first layer is split into its
h-columns (once per query) and candidate columns, and candidates may be rows of a bank shared by all
queries (stage 2's global batch), mapped once per row or frame instead of once per pair. The
parameters are the same (the split is a view of ``decoder.0.weight``); x0 and gradients equal
:meth:`forward`'s up to float re-association.
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
    return torch.einsum("...t,...td->...d", _pool_weights(query, frames, frame_mask, temp), frames)


def _pool_weights(query: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor, temp: float) -> torch.Tensor:
    """The frame weights of :func:`_pool_frames`: (..., D), (..., T, D), (..., T) -> (..., T)."""
    logits = torch.einsum("...d,...td->...t", query, frames) / temp
    return torch.softmax(logits, dim=-1) * frame_mask.to(logits.dtype)


def gather_rows(source: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``source[idx]`` for an integer index of any shape: (M, *F), idx (*I) -> (*I, *F).

    ``index_select`` on the flattened index: 2-5x faster on CPU than advanced indexing for the
    large per-chunk gathers of re-ranking.
    """
    return source.index_select(0, idx.reshape(-1)).view(*idx.shape, *source.shape[1:])


def _grid_rows(cand_idx: torch.Tensor, queries: int) -> torch.Tensor:
    """(B, N) bank rows -> (B, N) cells ``m * B + b`` of a flattened (M, B) grid of (bank row, query)."""
    return cand_idx * queries + torch.arange(queries, device=cand_idx.device).unsqueeze(1)


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

    def _candidate_columns(self) -> torch.Tensor:
        """``W1_c``: the (2D, D) columns of the decoder's first layer that see the candidate (a view)."""
        return self.decoder[0].weight[:, self.dim:]

    def _factored_head(self, w: torch.Tensor, pooled: torch.Tensor, e: torch.Tensor, cand: torch.Tensor,
                       grid_rows: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`_head` with the value path and the decoder's h-columns applied once per query.

        ``sum_n w_n Wv(c_n + e) = Wv(sum_n w_n c_n + e)`` (the weights sum to 1), and the decoder's
        first layer on ``cat([h, c_n])`` is ``W1_h h + W1_c c_n + b1``, with ``W1_h h`` the same for
        all N candidates.

        Args:
            w: (B, N) attention weights; pooled: (B, D) ``sum_n w_n c_n`` of the value inputs;
            e: (B, D) timestep embedding.
            cand: ``W1_c c`` (no bias): (B, N, 2D) per pair; or, with ``grid_rows``, for every
                (bank row m, query b) as (M, B, 2D) or (M, 1, 2D) (the same for all queries).
            grid_rows: (B, N) the flat (M, B) grid cell of every pair, ``m * B + b``: the decoder
                then runs on the grid and its output is gathered, instead of gathering (B, N, 2D)
                inputs (worth it when the lists cover most of the bank).
        Returns:
            x0 (B, N).
        """
        first, last = self.decoder[0], self.decoder[2]
        h = self.proj(self.v_proj(pooled + e))  # (B, D)
        per_query = torch.addmm(first.bias, h, first.weight[:, :self.dim].T)  # (B, 2D)
        if grid_rows is None:
            return torch.matmul(torch.relu(cand + per_query.unsqueeze(1)), last.weight[0]) + last.bias + w
        grid = torch.matmul(torch.relu(cand + per_query.unsqueeze(0)), last.weight[0])  # (M, B)
        return gather_rows(grid.reshape(-1), grid_rows) + last.bias + w

    @torch.no_grad()
    def step_tables(self, num_steps: int, *, value_rows: int | None = None) -> StepTables:
        """The time-dependent terms for timesteps ``0 .. num_steps - 1`` and the output weights.

        Args:
            num_steps: S, the diffusion steps of the sampler.
            value_rows: how many candidate rows the value path will be applied to. Fusing
                ``W1_h P Wv`` into one (D, 2D) matrix costs 3 D^3 multiply-adds and saves 2 D^2 per
                row, so it is done only from 1.5 D rows on (None: always); a single search query
                (32 candidates) keeps the chain of three products.
        """
        d = self.dim
        w1 = self.decoder[0].weight  # (2D, 2D): columns [:D] see h, [D:] see the candidate
        w1_h, w1_c = w1[:, :d], w1[:, d:]
        e = self.embed_timestep(torch.arange(num_steps, device=w1.device))  # (S, D)
        qe, ke = self.q_proj(e), self.k_proj(e)
        # Value path v -> proj -> decoder h-columns (row-vector convention), fused or as a chain.
        chain = (self.v_proj.weight.T, self.proj.weight.T, w1_h.T)
        fuse = self.fuses_values(value_rows)
        return StepTables(
            qe=qe, ke=ke,
            qe_k=qe @ self.k_proj.weight, ke_q=ke @ self.q_proj.weight,
            qke=(qe * ke).sum(-1),
            he=self.proj(self.v_proj(e)) @ w1_h.T,  # includes proj's bias: sum_n w_n = 1
            value_chain=((chain[0] @ chain[1]) @ chain[2],) if fuse else chain,
            cand_w=w1_c.T.contiguous(), cand_b=self.decoder[0].bias,
            out_w=self.decoder[2].weight[0].contiguous(), out_b=self.decoder[2].bias,
        )

    def fuses_values(self, value_rows: int | None) -> bool:
        """Whether :meth:`step_tables` fuses the value path for ``value_rows`` rows (see there)."""
        return value_rows is None or value_rows >= 1.5 * self.dim

    def _tables(self, steps: int | StepTables) -> StepTables:
        return steps if isinstance(steps, StepTables) else self.step_tables(steps)


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

    def forward_factored(self, x: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, video_emb: torch.Tensor,
                         video_mask: torch.Tensor, cand_idx: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` rearranged for training on shared candidates: the same x0 up to float re-association.

        No D x D product runs per (query, candidate) pair: the keys enter only through
        ``<q, Wk vbar_n> = <Wk^T q, vbar_n>``, the values only through their attention-weighted sum
        (:meth:`_factored_head`), and the decoder's candidate columns ``W1_c`` through a pooled
        video, a weighted sum of frames. With a bank of M videos shared by all queries (stage 2's
        global batch), each frame is mapped by ``W1_c`` once and the frame pooling runs for every
        (query, bank video): ``M T D 2D + B M T 2D`` multiply-adds instead of ``B N D 2D`` per pair.

        Args:
            x: (B, N) noisy scores; t: (B,) integer timesteps; text_emb: (B, D) query text.
            video_emb, video_mask: candidates per query (B, N, T, D), (B, N, T); or, with
                ``cand_idx`` (B, N) rows into it, a bank (M, T, D), (M, T).
        Returns:
            (B, N).
        """
        b, n = x.shape
        d = self.dim
        w1_c = self._candidate_columns()
        grid_rows = None
        if cand_idx is not None:
            m, frames = video_emb.shape[:2]
            if m * frames * (d + b) > b * n * d:  # a bank much larger than the lists: per pair is cheaper
                video_emb, video_mask = gather_rows(video_emb, cand_idx), gather_rows(video_mask, cand_idx)
                cand_idx = None
        if cand_idx is None:
            vbar = _pool_frames(text_emb.unsqueeze(1), video_emb, video_mask, self.temp)  # (B, N, D)
            cand = torch.matmul(vbar, w1_c.T)  # (B, N, 2D)
        else:
            # Pooling weights of every (query, bank video), laid out (M, B, T) for batched products.
            logits_mbt = torch.matmul(video_emb, text_emb.T).transpose(1, 2) / self.temp  # (M, B, T)
            weights = torch.softmax(logits_mbt, dim=-1) * video_mask.unsqueeze(1).to(logits_mbt.dtype)
            grid_rows = _grid_rows(cand_idx, b)
            vbar = gather_rows(torch.bmm(weights, video_emb).view(m * b, d), grid_rows)  # (B, N, D)
            frame_cols = torch.matmul(video_emb, w1_c.T)  # (M, T, 2D): W1_c of every frame, once
            cand = torch.bmm(weights, frame_cols)  # (M, B, 2D)
            if m > 1.5 * n:  # the decoder on the (M, B) grid would do much more than the N pairs need
                cand = gather_rows(cand.view(m * b, 2 * d), grid_rows)  # (B, N, 2D)
                grid_rows = None
        e = self.embed_timestep(t)
        q = self.q_proj(text_emb + e)  # (B, D)
        q_k = q @ self.k_proj.weight  # (B, D): <q, Wk v> = <q Wk, v>
        logits = torch.einsum("bnd,bd->bn", vbar, q_k) + (q_k * e).sum(-1, keepdim=True) + x
        w = torch.softmax(logits, dim=-1)
        return self._factored_head(w, torch.bmm(w.unsqueeze(1), vbar).squeeze(1), e, cand, grid_rows)

    @torch.no_grad()
    def candidate_frames(self, video_emb: torch.Tensor, steps: int | StepTables) -> CandidateFrames:
        """Every frame of M candidate videos through the two linear maps that follow frame pooling.

        A pooled video is a weighted sum of its frames, and the value path ``W1_h P Wv`` and the
        decoder's candidate columns ``W1_c`` are linear, so a (query, candidate) pair's terms are the
        same weighted sum of these per-frame terms: T (2D)-vectors per pair instead of two (D, 2D)
        products. Worth it when each video is a candidate of many more than T queries (evaluation).

        Args:
            video_emb: (M, T, D).
        """
        tables = self._tables(steps)
        m, t, d = video_emb.shape
        flat = video_emb.reshape(m * t, d)
        return CandidateFrames(g=tables.values(flat).view(m, t, -1), c=(flat @ tables.cand_w).view(m, t, -1))

    @torch.no_grad()
    def prepare(self, text_emb: torch.Tensor, video_emb: torch.Tensor, video_mask: torch.Tensor,
                steps: int | StepTables, *, frames: CandidateFrames | None = None,
                cand_idx: torch.Tensor | None = None) -> PreparedDenoiser:
        """Fold the conditioning into per-step tables; the result's ``(x, t)`` equals :meth:`forward`.

        Args:
            text_emb: (B, D); video_emb: (B, N, T, D); video_mask: (B, N, T).
            steps: the number of diffusion steps S (timesteps ``0 .. S - 1``), or their
                :meth:`step_tables` when several calls share them.
            frames, cand_idx: precomputed :meth:`candidate_frames` of a video bank (M rows) and the
                (B, N) rows of ``video_emb`` in it; the result then keeps the pooling weights and
                the bank instead of per-pair terms (see :class:`PreparedDenoiser`).
        Returns:
            a :class:`PreparedDenoiser` over B queries and N candidates.
        """
        tables = self._tables(steps)
        b, n, d = video_emb.shape[0], video_emb.shape[1], self.dim
        if frames is not None and cand_idx is None:
            raise ValueError("cand_idx is required with precomputed frames")
        weights = _pool_weights(text_emb.unsqueeze(1), video_emb, video_mask, self.temp)  # (B, N, T)
        vbar = torch.einsum("...t,...td->...d", weights, video_emb)  # (B, N, D), as _pool_frames
        q_text = self.q_proj(text_emb)  # (B, D)
        # <Wq(x + e_s), Wk(vbar_n + e_s)> = <vbar_n, Wk^T Wq x + Wk^T qe_s> + <Wq x, ke_s> + <qe_s, ke_s>:
        # the keys are never projected, and all S steps' logits come from one batched product.
        k_query = (q_text @ self.k_proj.weight).unsqueeze(1) + tables.qe_k  # (B, S, D)
        per_step = (q_text @ tables.ke.T + tables.qke).unsqueeze(-1)  # (B, S, 1)
        logit_table = torch.baddbmm(per_step, k_query, vbar.transpose(1, 2))  # (B, S, N)
        if frames is not None:
            return PreparedDenoiser(tables=tables, logit_table=logit_table, g=frames.g, c=frames.c, cand_idx=cand_idx,
                                    mix=weights, c_bias=tables.cand_b)
        flat = vbar.reshape(b * n, d)
        g = tables.values(flat).view(b, n, 2 * d)
        c = torch.addmm(tables.cand_b, flat, tables.cand_w).view(b, n, 2 * d)
        return PreparedDenoiser(tables=tables, logit_table=logit_table, g=g, c=c)


@dataclass(frozen=True)
class CandidateFrames:
    """Per-frame terms of M candidate videos for :meth:`T2VDenoiser.prepare`, shared by all queries.

    Attributes:
        g: (M, T, 2D) each frame through ``W1_h P Wv``; c: (M, T, 2D) ``W1_c frame`` (no bias).
    """

    g: torch.Tensor
    c: torch.Tensor


@dataclass(frozen=True)
class CandidateTexts:
    """Time-independent terms of M candidate texts for :meth:`V2TDenoiser.prepare`, shared by all queries.

    Attributes:
        kq: (M, D) ``Wq^T Wk text``, to be dotted with the text-pooled query video.
        k_qe: (M, S) ``<Wk text, qe_s> + <qe_s, ke_s>`` for every step s.
        g: (M, 2D) the text's value through ``W1_h P Wv``; c: (M, 2D) ``W1_c text + b1``.
    """

    kq: torch.Tensor
    k_qe: torch.Tensor
    g: torch.Tensor
    c: torch.Tensor


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

    def forward_factored(self, x: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, video_emb: torch.Tensor,
                         video_mask: torch.Tensor, cand_idx: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` rearranged for training on shared candidates: the same x0 up to float re-association.

        ``<Wq(vbar_n + e), Wk(c_n + e)> = <vbar_n, Wq^T Wk c_n> + <vbar_n, Wq^T Wk e> + <c_n, Wk^T Wq e>
        + <Wq e, Wk e>``: the only D x D products per candidate text are ``Wq^T Wk c`` and ``W1_c c``,
        computed once per bank row when candidates come from a bank shared by all queries; the values
        enter through their attention-weighted sum (:meth:`_factored_head`).

        Args:
            x: (B, N) noisy scores; t: (B,) integer timesteps.
            text_emb: (B, N, D) candidate texts per query; or, with ``cand_idx`` (B, N) rows into
                it, a bank (M, D).
            video_emb: (B, T, D) query video; video_mask: (B, T).
        Returns:
            (B, N).
        """
        b, n = x.shape
        d = self.dim
        bank = text_emb.reshape(-1, d)  # (M, D)
        wq, wk = self.q_proj.weight, self.k_proj.weight
        # Wq^T Wk c for every bank row: two thin products, or one through the fused (D, D) matrix.
        text_qk = (bank @ wk.T) @ wq if bank.shape[0] <= d else bank @ (wk.T @ wq)  # (M, D)
        cand = torch.matmul(bank, self._candidate_columns().T)  # (M, 2D)
        grid_rows = None
        if cand_idx is None:
            text, text_qk, cand = text_emb, text_qk.view(b, n, d), cand.view(b, n, 2 * d)
        else:
            text, text_qk = gather_rows(bank, cand_idx), gather_rows(text_qk, cand_idx)
            if bank.shape[0] > 1.5 * n:  # see T2VDenoiser.forward_factored
                cand = gather_rows(cand, cand_idx)
            else:
                cand, grid_rows = cand.unsqueeze(1), _grid_rows(cand_idx, b)
        vbar = _pool_frames(text, video_emb.unsqueeze(1), video_mask.unsqueeze(1), self.temp)  # (B, N, D)
        e = self.embed_timestep(t)
        qe, ke = self.q_proj(e), self.k_proj(e)  # (B, D)
        logits = (torch.einsum("bnd,bnd->bn", vbar, text_qk + (ke @ wq).unsqueeze(1))
                  + torch.einsum("bnd,bd->bn", text, qe @ wk) + (qe * ke).sum(-1, keepdim=True) + x)
        w = torch.softmax(logits, dim=-1)
        return self._factored_head(w, torch.bmm(w.unsqueeze(1), text).squeeze(1), e, cand, grid_rows)

    @torch.no_grad()
    def candidate_texts(self, text_emb: torch.Tensor, steps: int | StepTables) -> CandidateTexts:
        """Everything that depends on a candidate text alone: computed once per text, not per (query, text).

        Args:
            text_emb: (M, D) candidate texts.
        """
        tables = self._tables(steps)
        k_text = self.k_proj(text_emb)  # (M, D)
        return CandidateTexts(
            kq=k_text @ self.q_proj.weight,
            k_qe=torch.addmm(tables.qke, k_text, tables.qe.T),
            g=tables.values(text_emb),
            c=torch.addmm(tables.cand_b, text_emb, tables.cand_w),
        )

    @torch.no_grad()
    def prepare(self, text_emb: torch.Tensor, video_emb: torch.Tensor, video_mask: torch.Tensor,
                steps: int | StepTables, *, candidates: CandidateTexts | None = None,
                cand_idx: torch.Tensor | None = None) -> PreparedDenoiser:
        """Fold the conditioning into per-step tables; the result's ``(x, t)`` equals :meth:`forward`.

        Args:
            text_emb: (B, N, D) candidate texts; video_emb: (B, T, D); video_mask: (B, T).
            steps: the number of diffusion steps S, or their :meth:`step_tables`.
            candidates, cand_idx: precomputed :meth:`candidate_texts` of a text bank (M rows) and the
                (B, N) rows of ``text_emb`` in it; computed from ``text_emb`` when not given.
        """
        tables = self._tables(steps)
        b, n, d = text_emb.shape
        if candidates is None:
            candidates = self.candidate_texts(text_emb.reshape(b * n, d), tables)
            cand_idx = torch.arange(b * n, device=text_emb.device).view(b, n)
        elif cand_idx is None:
            raise ValueError("cand_idx is required with precomputed candidates")
        vbar = _pool_frames(text_emb, video_emb.unsqueeze(1), video_mask.unsqueeze(1), self.temp)  # (B, N, D)
        # <Wq(vbar_n + e_s), Wk(text_n + e_s)> = <vbar_n, Wq^T Wk text_n> + <vbar_n, Wq^T ke_s>
        #                                      + <qe_s, Wk text_n> + <qe_s, ke_s>
        static = (vbar * gather_rows(candidates.kq, cand_idx)).sum(-1, keepdim=True)  # (B, N, 1)
        logits = torch.addmm((gather_rows(candidates.k_qe, cand_idx) + static).view(b * n, -1), vbar.reshape(b * n, d),
                             tables.ke_q.T)  # (B N, S)
        # The candidates' g and c stay in the bank (gathered on first use by the PyTorch step; the
        # compiled sampler reads the bank rows in place).
        return PreparedDenoiser(tables=tables, logit_table=logits.view(b, n, -1).transpose(1, 2).contiguous(),
                                g=candidates.g, c=candidates.c, cand_idx=cand_idx)


@dataclass(frozen=True)
class StepTables:
    """A denoiser's time-dependent terms for timesteps ``0 .. S - 1`` and its fused weights.

    Row-vector convention (``y = x @ W``). ``e_s`` is the timestep embedding of step s.

    Attributes:
        qe, ke: (S, D) ``Wq e_s``, ``Wk e_s``; qe_k, ke_q: (S, D) ``Wk^T Wq e_s``, ``Wq^T Wk e_s``.
        qke: (S,) ``<qe_s, ke_s>``; he: (S, 2D) ``W1_h (P Wv e_s + b_p)``.
        value_chain: ``(W1_h P Wv)^T`` (D, 2D), fused or as its three factors (see :meth:`values`).
        cand_w: (D, 2D) ``W1_c^T``; cand_b: (2D,) ``b1``; out_w: (2D,) and out_b: (1,): the
        decoder's last layer.
    """

    qe: torch.Tensor
    ke: torch.Tensor
    qe_k: torch.Tensor
    ke_q: torch.Tensor
    qke: torch.Tensor
    he: torch.Tensor
    value_chain: tuple[torch.Tensor, ...]
    cand_w: torch.Tensor
    cand_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """Candidate features through the value path: (M, D) -> (M, 2D) ``x @ (W1_h P Wv)^T``."""
        for matrix in self.value_chain:
            x = x @ matrix
        return x


@dataclass
class PreparedDenoiser:
    """A denoiser with its conditioning folded in; ``__call__(x, t)`` equals ``module.forward``.

    With attention weights ``w = softmax(L[t] + x)`` over the N candidates, the decoder's hidden
    layer is ``relu(sum_n w_n G_n + he_t + C_n)`` and the output ``out_w . hidden + out_b + w``.

    Attributes:
        logit_table: (B, S, N) the logits without ``x`` for every step.
        g: (B, N, 2D) each candidate's value through ``W1_h P Wv``; c: (B, N, 2D) ``W1_c cand + b1``.
            With ``cand_idx`` both are (M, 2D) banks of candidates instead, and ``cand_idx`` (B, N)
            names each query's rows in them. With ``mix`` (B, N, T) too, they are (M, T, 2D)
            per-frame banks and a candidate's terms are ``sum_t mix[b, n, t] bank[cand_idx[b, n], t]``
            (plus ``c_bias`` (2D,) for c): frame pooling moved after the linear maps.
    """

    tables: StepTables
    logit_table: torch.Tensor
    g: torch.Tensor
    c: torch.Tensor
    cand_idx: torch.Tensor | None = None
    mix: torch.Tensor | None = None
    c_bias: torch.Tensor | None = None
    _buffer: torch.Tensor | None = None
    _rows: torch.Tensor | None = None
    _gc: tuple[torch.Tensor, torch.Tensor] | None = None

    def per_query(self) -> tuple[torch.Tensor, torch.Tensor]:
        """g and c as (B, N, 2D) tensors (gathered from the banks once when ``cand_idx`` is set)."""
        if self.cand_idx is None:
            return self.g, self.c
        if self._gc is None:
            g, c = gather_rows(self.g, self.cand_idx), gather_rows(self.c, self.cand_idx)
            if self.mix is not None:
                g = torch.einsum("bnt,bntd->bnd", self.mix, g)
                c = torch.einsum("bnt,bntd->bnd", self.mix, c) + self.c_bias
            self._gc = (g, c)
        return self._gc

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, N), t: (B,) integer timesteps in ``[0, S)`` -> x0 (B, N)."""
        tables = self.tables
        g, c = self.per_query()
        if self._rows is None:
            self._rows = torch.arange(x.shape[0], device=x.device)
            # One reused (B, N, 2D) buffer: a fresh allocation of that size every step costs more
            # in page faults than the arithmetic.
            self._buffer = torch.empty_like(c)
        t = t.long()
        # Gathers of B x N logits and B x 2D terms rather than a branch on a shared t: no host
        # synchronisation on accelerators, and mixed timesteps work too.
        w = torch.softmax(self.logit_table[self._rows, t] + x, dim=-1)  # (B, N)
        # -h = -(he_t + sum_n w_n g_n), negated inside the product for the maximum below.
        neg_h = torch.baddbmm(tables.he.index_select(0, t).unsqueeze(1), w.unsqueeze(1), g, beta=-1, alpha=-1)
        neg_h = neg_h.squeeze(1)  # (B, 2D)
        # out_w . relu(c + h) = out_w . max(c, -h) + out_w . h: one pass over (B, N, 2D) instead of
        # two (add, then ReLU), and the h term is per query.
        torch.maximum(c, neg_h.unsqueeze(1), out=self._buffer)
        base = w + torch.addmv(tables.out_b, neg_h, tables.out_w, alpha=-1).unsqueeze(1)  # (B, N)
        return torch.addmv(base.view(-1), self._buffer.view(-1, self._buffer.shape[-1]), tables.out_w).view_as(x)
