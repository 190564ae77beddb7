"""Diffusion re-ranking with a model's denoisers: :class:`RerankConfig` and :class:`Reranker`.

The sampler is not part of the network (:class:`~diffusionret.models.DiffusionRet` holds the
denoisers only): a :class:`Reranker` pairs a model with a
:class:`~diffusionret.diffusion.GaussianDiffusion` and re-ranks score matrices in either direction
(docs/reference.md §3.3). Evaluation, search and the demo all re-rank through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import nn

from diffusionret.diffusion.gaussian import GaussianDiffusion
from diffusionret.models.config import DiffusionSchedule
from diffusionret.models.denoiser import PreparedDenoiser, StepTables, gather_rows
from diffusionret.native import load_ddim_kernel
from diffusionret.rerank import Sampler, rerank_rows


#: Text->video: map every candidate frame once when there are at least this many (query, candidate)
#: pairs per video frame (pairs per video / T; mapping frames then costs at most half of mapping pairs).
FRAME_BANK_MIN_RATIO = 2.0
#: ... and when the per-frame bank (two (Nv, T, 2D) float32 tensors) fits in this many bytes.
FRAME_BANK_BYTES = 1 << 30


@dataclass(frozen=True)
class RerankConfig:
    """How the top candidates of each query are re-ranked.

    Attributes:
        steps, schedule: the diffusion process sampled (the denoisers embed the timestep: use the
            schedule they were trained with, :attr:`LoadedModel.diffusion`; reference 50, cosine).
        top_k: candidates per query handed to the denoiser (``t2v_num``/``v2t_num`` 32; 0 disables).
        alpha, temperature: fusion ``sim + alpha * softmax(temperature * x0)`` (reference 1, 1).
        eta: DDIM eta; 0 is the deterministic sampler of the reference, > 0 draws fresh noise at
            every step from the re-ranking generator.
        chunk_size: query rows per denoiser batch (memory and speed only; ``None``: by device,
            :func:`diffusionret.rerank.default_chunk_size`).
        native: on CPU with eta 0, run the DDIM steps in the compiled kernel
            (:mod:`diffusionret.native`, built on first use) when a C compiler is available; the
            PyTorch loop otherwise. Same results up to float rounding (summation order).
    """

    steps: int = 50
    schedule: Literal["cosine", "linear"] = "cosine"
    top_k: int = 32
    alpha: float = 1.0
    temperature: float = 1.0
    eta: float = 0.0
    chunk_size: Optional[int] = None
    native: bool = True

    def __post_init__(self) -> None:
        DiffusionSchedule(self.steps, self.schedule)  # validates both
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or null, got {self.chunk_size}")

    @classmethod
    def for_schedule(cls, schedule: DiffusionSchedule, **changes: Any) -> "RerankConfig":
        """Re-ranking with the diffusion schedule a model was trained with (``changes`` on top)."""
        return cls(**{"steps": schedule.steps, "schedule": schedule.schedule, **changes})

    def diffusion(self) -> GaussianDiffusion:
        """The sampler of this config."""
        return GaussianDiffusion(self.steps, self.schedule)


class Reranker:
    """Re-ranks similarity matrices with a model's denoisers.

    Args:
        model: a :class:`~diffusionret.models.DiffusionRet` with denoisers.
        config: sampler and fusion settings.
        diffusion: the sampler; by default built from ``config`` (``steps``, ``schedule``).

    Raises:
        RuntimeError: the model has no denoisers (a stage-1 model).
    """

    def __init__(self, model: nn.Module, config: RerankConfig | None = None,
                 diffusion: GaussianDiffusion | None = None) -> None:
        model.require_denoisers()
        self.model = model
        self.config = config or RerankConfig()
        device = next(model.parameters()).device
        self.diffusion = (diffusion or self.config.diffusion()).to(device)
        self._sample = self._native_sampler(device, next(model.parameters()).dtype)
        # Step tables reused between calls (see _step_tables): (denoiser name, steps, fused) ->
        # (the denoiser's parameters and buffers, their stamp, the tables).
        self._tables: dict[tuple[str, int, bool], tuple[tuple[torch.Tensor, ...], tuple, StepTables]] = {}

    def _native_sampler(self, device: torch.device, dtype: torch.dtype) -> Sampler | None:
        """The compiled DDIM loop as a :func:`rerank_rows` sampler, or None where it does not apply.

        The kernel computes in float32: a model held in another precision keeps the PyTorch loop,
        which computes in the model's own.
        """
        if not self.config.native or self.config.eta != 0 or device.type != "cpu" or dtype != torch.float32:
            return None
        kernel = load_ddim_kernel()
        if kernel is None:
            return None
        coefficients = self.diffusion.ddim_coefficients(0.0, device)

        def sample(denoise: PreparedDenoiser, noise: torch.Tensor) -> torch.Tensor:
            tables = denoise.tables
            return kernel.sample(denoise.logit_table, denoise.g, denoise.c, tables.he, tables.out_w,
                                 float(tables.out_b), coefficients, noise, cand_idx=denoise.cand_idx,
                                 mix=denoise.mix, c_bias=denoise.c_bias, threads=torch.get_num_threads())

        return sample

    def _step_tables(self, name: str, value_rows: int) -> StepTables:
        """``step_tables`` of the denoiser ``self.model.<name>``, reused while nothing they depend on changes.

        The tables depend only on the denoiser's parameters and buffers and on the number of
        sampling steps, yet rebuilding them (three (S, D) x (D, D) products and the value chain) cost
        about as much as a search query's whole re-ranking. An entry is reused only while every
        parameter and buffer is the same tensor with the same version counter (which in-place
        updates bump: optimizer steps, ``load_state_dict``, ``copy_`` under ``no_grad``), storage,
        dtype, device and shape, so training and evaluation see fresh tables after any update; the
        cached tables are the very tensors a fresh call would compute. Not reused under autocast,
        for inference-mode weights (they carry no version counter), nor with gradients enabled.

        Args:
            name: ``"diffusion_model"`` (text->video) or ``"diffusion_model_v"`` (video->text).
            value_rows: as for ``step_tables`` (only whether it fuses the value path matters).
        """
        denoiser = getattr(self.model, name)
        steps = self.diffusion.num_steps
        tensors = (*denoiser.parameters(), *denoiser.buffers())
        device_type = tensors[0].device.type
        # Not under autocast, for inference-mode weights, or where the tables would carry an
        # autograd graph (a reused graph could not be backpropagated through twice).
        grads = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if grads or torch.is_autocast_enabled(device_type) or any(t.is_inference() for t in tensors):
            return denoiser.step_tables(steps, value_rows=value_rows)
        stamp = tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device, t.shape) for t in tensors)
        key = (name, steps, denoiser.fuses_values(value_rows))
        cached = self._tables.get(key)
        # The entry holds its tensors, so their ids cannot be reused by other tensors while it lives.
        if cached is not None and cached[1] == stamp:
            return cached[2]
        tables = denoiser.step_tables(steps, value_rows=value_rows)
        self._tables[key] = (tensors, stamp, tables)
        return tables

    def _use_candidate_frames(self, pairs: int, video: torch.Tensor) -> bool:
        """Whether text->video re-ranking maps every candidate frame once (:meth:`T2VDenoiser.candidate_frames`).

        Mapping the Nv T frames costs T / (pairs per video) of mapping every pair's pooled video,
        so it pays when videos are candidates of many queries (evaluation: Nt K / Nv = 32 per video
        against T = 12), not for a search query's 32 candidates. The per-pair terms are then formed
        inside the compiled kernel (the PyTorch loop would have to materialise them), and the
        per-frame bank must fit :data:`FRAME_BANK_BYTES`.
        """
        nv, t, d = video.shape
        bank_bytes = 2 * nv * t * 2 * d * 4
        return self._sample is not None and pairs >= FRAME_BANK_MIN_RATIO * nv * t and bank_bytes <= FRAME_BANK_BYTES

    @property
    def native(self) -> bool:
        """Whether the DDIM steps run in the compiled kernel."""
        return self._sample is not None

    def t2v(self, sim: torch.Tensor, cls: torch.Tensor, video: torch.Tensor, frame_mask: torch.Tensor, *,
            noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Re-rank text->video rows: sim (Nt, Nv), cls (Nt, D), video (Nv, T, D), frame_mask (Nv, T) -> (Nt, Nv).

        ``noise`` (Nt, min(top_k, Nv)) is the initial x_T (drawn from ``generator`` when not given).
        """
        if sim.shape != (cls.shape[0], video.shape[0]):
            raise ValueError(f"sim {tuple(sim.shape)} does not match cls {tuple(cls.shape)} x video {tuple(video.shape)}")
        cfg = self.config
        cls, video = cls.float(), video.float()
        denoiser = self.model.diffusion_model
        pairs = sim.shape[0] * min(cfg.top_k, sim.shape[1])
        frames = None
        if self._use_candidate_frames(pairs, video):
            # Every frame through the linear maps once; pairs then mix T per-frame terms.
            tables = self._step_tables("diffusion_model", video.shape[0] * video.shape[1])
            frames = denoiser.candidate_frames(video, tables)
        else:
            # Shared by all chunks; the value path is applied to every (query, candidate) pair.
            tables = self._step_tables("diffusion_model", pairs)

        def prepare(rows: torch.Tensor, idx: torch.Tensor) -> PreparedDenoiser:
            return denoiser.prepare(cls[rows], gather_rows(video, idx), gather_rows(frame_mask, idx), tables,
                                    frames=frames, cand_idx=None if frames is None else idx)

        return rerank_rows(sim, prepare, self.diffusion, top_k=cfg.top_k, noise=noise, generator=generator,
                           alpha=cfg.alpha, temp=cfg.temperature, chunk_size=cfg.chunk_size, eta=cfg.eta,
                           sample=self._sample)

    def t2v_rows(self, sim: torch.Tensor, cls: torch.Tensor, video: torch.Tensor, frame_mask: torch.Tensor, *,
                 noise: torch.Tensor) -> torch.Tensor:
        """Re-rank text->video rows that each have their own candidates (a batch of search queries).

        Args:
            sim: (B, N) scores of each query's N candidates; cls: (B, D).
            video: (B * N, T, D) and frame_mask (B * N, T): query i's candidates are rows
                ``i * N .. (i + 1) * N - 1``, in the column order of ``sim``.
            noise: (B, min(top_k, N)) initial x_T per query (one query's draw per row).

        Returns:
            (B, N): row i equals :meth:`t2v` of query i alone with its candidates and noise row.
        """
        b, n = sim.shape
        if cls.shape[0] != b or video.shape[0] != b * n or frame_mask.shape[0] != b * n:
            raise ValueError(f"sim {tuple(sim.shape)} does not match cls {tuple(cls.shape)}, video "
                             f"{tuple(video.shape)} and frame_mask {tuple(frame_mask.shape)}")
        if self.config.eta > 0:
            # Stochastic steps draw from one generator: a batch could not reproduce each query's draws.
            raise ValueError("t2v_rows needs the deterministic sampler (eta = 0)")
        cfg = self.config
        cls, video = cls.float(), video.float()
        denoiser = self.model.diffusion_model
        # The tables of one query alone (value_rows: its own K rows), so each row's arithmetic, and
        # so its result, does not depend on the batch.
        tables = self._step_tables("diffusion_model", min(cfg.top_k, n))
        offsets = torch.arange(b, device=sim.device) * n

        def prepare(rows: torch.Tensor, idx: torch.Tensor) -> PreparedDenoiser:
            flat = idx + offsets[rows, None]  # (rows, K) candidate columns -> rows of video
            # Prepared query by query: a one-row product (the query's projections) runs another BLAS
            # kernel than a B-row one and can round differently, and a query's result must not
            # depend on its batch. The DDIM steps then run once for all rows.
            parts = [denoiser.prepare(cls[r:r + 1], gather_rows(video, flat[j:j + 1]),
                                      gather_rows(frame_mask, flat[j:j + 1]), tables)
                     for j, r in enumerate(rows.tolist())]
            if len(parts) == 1:
                return parts[0]
            return PreparedDenoiser(tables=tables, logit_table=torch.cat([part.logit_table for part in parts]),
                                    g=torch.cat([part.g for part in parts]), c=torch.cat([part.c for part in parts]))

        # The compiled sampler (when loaded) runs the steps query by query, as for one query alone.
        return rerank_rows(sim, prepare, self.diffusion, top_k=cfg.top_k, noise=noise, alpha=cfg.alpha,
                           temp=cfg.temperature, chunk_size=cfg.chunk_size, sample=self._sample)

    def v2t(self, sim_v2t: torch.Tensor, cls: torch.Tensor, video: torch.Tensor, frame_mask: torch.Tensor, *,
            noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Re-rank video->text rows: sim_v2t (Nv, Nt), cls (Nt, D), video (Nv, T, D), frame_mask (Nv, T) -> (Nv, Nt).

        ``noise`` (Nv, min(top_k, Nt)) as in :meth:`t2v`.
        """
        if sim_v2t.shape != (video.shape[0], cls.shape[0]):
            raise ValueError(f"sim_v2t {tuple(sim_v2t.shape)} does not match video {tuple(video.shape)} x cls "
                             f"{tuple(cls.shape)}")
        cfg = self.config
        cls, video = cls.float(), video.float()
        denoiser = self.model.diffusion_model_v
        tables = self._step_tables("diffusion_model_v", cls.shape[0])
        # The candidates are texts: their projections are computed once per text, not per (video, text).
        texts = denoiser.candidate_texts(cls, tables)

        def prepare(rows: torch.Tensor, idx: torch.Tensor) -> PreparedDenoiser:
            return denoiser.prepare(gather_rows(cls, idx), video[rows], frame_mask[rows], tables, candidates=texts,
                                    cand_idx=idx)

        return rerank_rows(sim_v2t, prepare, self.diffusion, top_k=cfg.top_k, noise=noise, generator=generator,
                           alpha=cfg.alpha, temp=cfg.temperature, chunk_size=cfg.chunk_size, eta=cfg.eta,
                           sample=self._sample)

    def both(self, sim: torch.Tensor, cls: torch.Tensor, video: torch.Tensor, frame_mask: torch.Tensor, *,
             noise_t2v: torch.Tensor | None = None, noise_v2t: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both directions from the same base matrix (docs/reference.md §3.3).

        Args:
            sim: (Nt, Nv) WTI scores; cls (Nt, D); video (Nv, T, D); frame_mask (Nv, T).
            noise_t2v, noise_v2t: (Nt, K), (Nv, K) initial x_T per query in descending-score order;
                drawn from ``generator`` (t2v first, then v2t) when not given.
        Returns:
            t2v (Nt, Nv), v2t (Nv, Nt).
        """
        t2v = self.t2v(sim, cls, video, frame_mask, noise=noise_t2v, generator=generator)
        v2t = self.v2t(sim.T, cls, video, frame_mask, noise=noise_v2t, generator=generator)
        return t2v, v2t
