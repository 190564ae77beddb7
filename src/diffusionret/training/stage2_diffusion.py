"""Stage 2 ("generation", docs/reference.md §1.7): train the two denoisers on a frozen stage-1 model.

For every query of the global batch the candidate list is its positive (index 0) followed by the
``num`` hardest negatives of the global batch by WTI similarity, never a sample of its own video.
The denoisers learn to recover the one-hot "joint distribution" ``x0 = [1, 0, ..., 0]`` (or
``[1, -1, ..., -1]``) from ``q_sample(x0, t, noise)``; the loss is ``CE(out * d_temp, 0)`` for both
directions with the same ``t``.

Differences from the reference, on purpose: ``t`` and the noise come from an explicit
``torch.Generator`` (not NumPy's global RNG); each rank computes the loss for its *own* queries
against candidates from the global batch (DDP's gradient average then equals the single-process
gradient); ``num`` is capped to the negatives the batch has instead of returning positives.

The frozen features are either encoded here, every step (the reference), or given already encoded
(``tokens``/``cls``/``video`` from the feature cache, :mod:`.feature_cache`); everything after the
encoders is the same code, so both paths give the same losses and gradients. With
``negatives="dataset"`` the candidates come from a nearest-neighbour table over the whole cached
training split (:mod:`.dataset_negatives`) instead of the global batch.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from diffusionret.diffusion.gaussian import GaussianDiffusion
from diffusionret.distributed import DistContext, all_gather_no_grad, batch_sizes
from diffusionret.models.denoiser import gather_rows
from diffusionret.training.losses import positive_mask, soft_target_cross_entropy
from diffusionret.training.negatives import cap_num_negatives, candidate_indices

logger = logging.getLogger(__name__)


def joint_distribution_target(batch: int, candidates: int, negative_label: int, *,
                              device: torch.device | str = "cpu") -> torch.Tensor:
    """x0 of the generation loss: (batch, candidates), 1 at index 0, ``negative_label`` elsewhere."""
    if negative_label not in (0, -1):
        raise ValueError(f"negative_label must be 0 or -1, got {negative_label}")
    x0 = torch.full((batch, candidates), float(negative_label), device=device)
    x0[:, 0] = 1.0
    return x0


class GenerationObjective(nn.Module):
    """The two denoisers' generation loss over hard-negative candidate lists.

    Args:
        model: a generation-stage model whose backbone is frozen (see :func:`prepare_stage2_model`).
        ctx: distributed context.
        num_negatives: negatives per query (reference ``--num`` 127), capped per batch.
        negative_label: label of the negatives in x0 (reference ``--neg``: 0 or -1).
        loss_temp: CE temperature ``d_temp`` (reference 100).
        generator: source of ``t`` and of the q_sample noise, on the training device.
        diffusion: the diffusion process trained (the run's ``diffusion.steps`` / ``schedule``).
        dataset_negatives: a :class:`~diffusionret.training.dataset_negatives.DatasetNegatives`
            table: negatives from the whole training split (batches must then come from the cache).
        factored: run the denoisers in their factored training form (``forward_factored``: the same
            x0 up to float re-association, no D x D product per (query, candidate) pair, and with
            batch negatives the candidates stay rows of the global batch instead of being gathered
            per query). Off: the reference's arithmetic (:meth:`T2VDenoiser.forward`), which the
            online path keeps: there the encoders are the step, and its float order pins the
            demo's numbers. The trainer turns it on when training from the feature cache, where the
            denoisers are the whole step.
    """

    def __init__(self, model: nn.Module, ctx: DistContext, *, num_negatives: int, negative_label: int,
                 loss_temp: float, generator: torch.Generator, diffusion: GaussianDiffusion,
                 dataset_negatives: Any = None, factored: bool = False) -> None:
        super().__init__()
        self.model = model
        self.diffusion = diffusion
        self.ctx = ctx
        self.num_negatives = num_negatives
        self.negative_label = negative_label
        self.loss_temp = loss_temp
        self.generator = generator
        self.dataset_negatives = dataset_negatives
        self.factored = factored
        self._warned_cap = False

    def train(self, mode: bool = True) -> "GenerationObjective":
        # The frozen backbone always runs in eval mode; only the denoisers follow ``mode``.
        super().train(mode)
        self.model.eval()
        self.model.diffusion_model.train(mode)
        self.model.diffusion_model_v.train(mode)
        return self

    def draw_noise(self, n: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The random draws of one step, all from ``self.generator``.

        A method of its own so that a test can substitute the reference's recorded draws.

        Returns:
            ``t`` (n,) int64 timesteps shared by both directions, and the q_sample noise of the
            text->video and of the video->text loss, (n, k) each.
        """
        t = self.diffusion.sample_timesteps(n, generator=self.generator, device=device)
        noise_t2v = torch.randn((n, k), generator=self.generator, device=device)
        noise_v2t = torch.randn((n, k), generator=self.generator, device=device)
        return t, noise_t2v, noise_v2t

    @torch.no_grad()
    def _frozen_features(self, text_ids: torch.Tensor, text_mask: torch.Tensor, frames: torch.Tensor,
                         frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, cls = self.model.encode_text(text_ids, text_mask)
        video = self.model.encode_video(frames, frame_mask)
        return tokens.float(), cls.float(), video.float()

    def forward(self, text_ids: torch.Tensor | None, text_mask: torch.Tensor, frames: torch.Tensor | None,
                frame_mask: torch.Tensor, video_key: torch.Tensor, *, tokens: torch.Tensor | None = None,
                cls: torch.Tensor | None = None, video: torch.Tensor | None = None,
                caption_row: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One local batch -> losses, from raw inputs (``text_ids``, ``frames``) or cached features.

        Args:
            text_ids: (b, L) int64 and frames: (b, T, 3, H, W): encoded here (online path); ``None``
                with cached features.
            text_mask: (b, L) int64; frame_mask: (b, T) int64.
            video_key: (b,) int64 stable video identity.
            tokens: (b, L, D), cls: (b, D), video: (b, T, D) float32: the frozen features (cached path).
            caption_row: (b,) rows of the samples in the feature cache (``negatives="dataset"`` only).

        Returns:
            ``loss`` = ``gen_loss`` = L_t2v + L_v2t (differentiable, denoisers only), and detached
            ``gen_t2v``, ``gen_v2t``, ``disc_loss`` (the frozen contrastive loss, for logging) and
            ``num_negatives`` (after capping).
        """
        ctx = self.ctx
        model = self.model
        b = text_mask.shape[0]
        if tokens is None or cls is None or video is None:
            if text_ids is None or frames is None:
                raise ValueError("GenerationObjective: give text_ids and frames, or the cached tokens, cls and video")
            tokens, cls, video = self._frozen_features(text_ids, text_mask, frames, frame_mask)
        if self.dataset_negatives is not None and caption_row is None:
            raise ValueError("negatives 'dataset' needs batches from the feature cache (caption_row)")
        sizes = batch_sizes(b, ctx)
        with torch.no_grad():
            keys = all_gather_no_grad(video_key, ctx, sizes)
            all_tokens = all_gather_no_grad(tokens, ctx, sizes)
            all_text_mask = all_gather_no_grad(text_mask, ctx, sizes)
            all_cls = all_gather_no_grad(cls, ctx, sizes)
            all_video = all_gather_no_grad(video, ctx, sizes)
            all_frame_mask = all_gather_no_grad(frame_mask, ctx, sizes)
            t2v = model.similarity(tokens, text_mask, all_video, all_frame_mask)            # (b, B)
            if ctx.is_distributed:
                v2t = model.similarity(all_tokens, all_text_mask, video, frame_mask).t()    # (b, B)
            else:  # one rank: the local batch is the global batch, and the same scores transposed
                v2t = t2v.t()
            positives = positive_mask(video_key, keys)
            scale = model.logit_scale.exp()
            disc = (soft_target_cross_entropy(scale * t2v, positives).mean()
                    + soft_target_cross_entropy(scale * v2t, positives).mean()) / 2
            # Rescaled like the loss below, so that the logged all-rank mean is the global mean.
            share = b * ctx.world_size / sum(sizes)
            if self.dataset_negatives is not None:
                num = min(self.num_negatives, self.dataset_negatives.num)
                usable = torch.ones(b, dtype=torch.bool, device=video_key.device)
            else:
                num, usable = cap_num_negatives(self.num_negatives, positives)
            if num < self.num_negatives and not self._warned_cap:
                logger.warning("generation stage: %d negatives requested but the global batch only has %d per query "
                               "(batch size and duplicate videos); using %d", self.num_negatives, num, num)
                self._warned_cap = True
            rows = usable.nonzero().squeeze(1)                                              # (n,) usable queries
            own = rows + sum(sizes[:ctx.rank])
        device = cls.device
        if num == 0:
            # No query of this rank has a negative: nothing to learn, but DDP still needs a graph
            # through every trainable parameter.
            zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            loss_t2v = loss_v2t = zero
        else:
            # Extra keyword arguments of the denoisers: the candidates' bank rows (factored form).
            t2v_rows: dict[str, torch.Tensor] = {}
            v2t_rows: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                if self.dataset_negatives is not None:
                    cand_video, cand_mask, cand_cls = self.dataset_negatives.candidates(caption_row[rows], num,
                                                                                        device=device)
                else:
                    t2v_idx = candidate_indices(t2v[rows], positives[rows], own, num)      # (n, K)
                    v2t_idx = candidate_indices(v2t[rows], positives[rows], own, num)      # (n, K)
                    if self.factored:
                        # Candidates stay rows of the global batch: the factored denoisers map each
                        # row once, not once per query that sees it.
                        cand_video, cand_mask, cand_cls = all_video, all_frame_mask, all_cls
                        t2v_rows, v2t_rows = {"cand_idx": t2v_idx}, {"cand_idx": v2t_idx}
                    else:
                        # index_select (gather_rows): the same rows as advanced indexing, 2-5x faster
                        # on CPU for these (n, K, T, D) gathers.
                        cand_video = gather_rows(all_video, t2v_idx)                        # (n, K, T, D)
                        cand_mask = gather_rows(all_frame_mask, t2v_idx)                    # (n, K, T)
                        cand_cls = gather_rows(all_cls, v2t_idx)                            # (n, K, D)
            n, k = rows.numel(), num + 1
            x0 = joint_distribution_target(n, k, self.negative_label, device=device)
            diffusion = self.diffusion
            t, noise_t2v, noise_v2t = self.draw_noise(n, k, device)
            if self.factored:
                denoise_t2v, denoise_v2t = model.denoise_t2v_factored, model.denoise_v2t_factored
            else:
                denoise_t2v, denoise_v2t = model.denoise_t2v, model.denoise_v2t
            loss_t2v = diffusion.generation_loss(denoise_t2v, x0, t, noise_t2v, temp=self.loss_temp,
                                                 cls=cls[rows], cand_video=cand_video, cand_mask=cand_mask, **t2v_rows)
            loss_v2t = diffusion.generation_loss(denoise_v2t, x0, t, noise_v2t, temp=self.loss_temp,
                                                 cand_cls=cand_cls, video=video[rows], frame_mask=frame_mask[rows],
                                                 **v2t_rows)
        # generation_loss is a mean over the local rows; scaled by the local share of the global batch
        # so that DDP's average over ranks is the global-batch mean (equal shares: factor 1).
        loss_t2v = loss_t2v * share
        loss_v2t = loss_v2t * share
        loss = loss_t2v + loss_v2t
        return {
            "loss": loss,
            "gen_loss": loss.detach(),
            "gen_t2v": loss_t2v.detach(),
            "gen_v2t": loss_v2t.detach(),
            "disc_loss": (disc * share).detach(),
            "num_negatives": torch.tensor(float(num), device=device),
        }


def prepare_stage2_model(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Add fresh denoisers if needed and freeze everything else (docs/reference.md §1.8).

    Raises:
        RuntimeError: if anything outside the denoisers is left trainable.
    """
    if not model.has_denoisers:
        model.add_denoisers(generator)
    model.freeze_backbone()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    stray = [n for n in trainable if not n.startswith(("diffusion_model.", "diffusion_model_v."))]
    if stray:
        raise RuntimeError(f"generation stage: backbone parameters left trainable: {stray[:5]}")
    if not trainable:
        raise RuntimeError("generation stage: the denoisers have no trainable parameters")
    logger.info("generation stage: %d trainable tensors (denoisers), backbone frozen", len(trainable))
    model.eval()
    return model
