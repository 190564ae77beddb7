"""The DiffusionRet model: CLIP towers, temporal module, WTI head and the two denoisers.

Attribute names follow the reference so that its state dicts map one-to-one onto ours
(``clip.*``, ``text_weight_fc``, ``video_weight_fc``, ``frame_position_embeddings``,
``transformerClip``, ``lstm_visual``, ``diffusion_model``, ``diffusion_model_v``).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from diffusionret.models import clip_backbone
from diffusionret.models.config import ModelConfig
from diffusionret.models.denoiser import T2VDenoiser, V2TDenoiser
from diffusionret.models.similarity import chunked_token_weights, wti_similarity
from diffusionret.models.temporal import TemporalTransformer, aggregate_seq_lstm, aggregate_seq_transf

logger = logging.getLogger(__name__)

#: Sampling methods that left the network for :class:`diffusionret.retrieval.Reranker`, with what to call instead.
_MOVED = {
    "rerank": "Reranker(model, RerankConfig(...)).both(sim, cls, video, frame_mask, ...)",
    "rerank_t2v": "Reranker(model, RerankConfig(...)).t2v(sim, cls, video, frame_mask, ...)",
    "rerank_v2t": "Reranker(model, RerankConfig(...)).v2t(sim_v2t, cls, video, frame_mask, ...)",
    "set_sampler": "RerankConfig(steps=..., schedule=...) for re-ranking (the sampler is not part of the model)",
    "diffusion": "GaussianDiffusion(steps, schedule) (diffusionret.diffusion; the sampler is not part of the model)",
}


def _weight_mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(inplace=True), nn.Linear(2 * dim, 1))


def init_head_weights(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """The reference's init: Linear/Embedding weights N(0, 0.02^2), Linear biases 0, LayerNorm 1/0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            with torch.no_grad():
                m.weight.normal_(0.0, 0.02, generator=generator)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DiffusionRet(nn.Module):
    """Generative text-video retrieval model (docs/reference.md §1): the networks only.

    Re-ranking with the denoisers (the DDIM sampler) is :class:`diffusionret.retrieval.Reranker`.
    Build it with :func:`diffusionret.build_model` or :func:`diffusionret.load_model`.
    """

    def __init__(self, config: ModelConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.clip = clip_backbone.build_open_clip(config.clip)
        self.text_weight_fc = _weight_mlp(dim)
        self.video_weight_fc = _weight_mlp(dim)
        if config.agg_module in ("seqTransf", "seqLSTM"):
            self.frame_position_embeddings = nn.Embedding(config.max_position, dim)
        if config.agg_module == "seqTransf":
            self.transformerClip = TemporalTransformer(dim, config.temporal_layers, max(1, dim // 64))
        elif config.agg_module == "seqLSTM":
            self.lstm_visual = nn.LSTM(dim, dim, batch_first=True, bidirectional=False, num_layers=1)
        for name in ("text_weight_fc", "video_weight_fc", "frame_position_embeddings", "transformerClip"):
            if hasattr(self, name):
                init_head_weights(getattr(self, name), generator)
        if config.denoisers:
            self._create_denoisers(generator)
        # conv1 is frozen in every stage of the reference (docs/reference.md §1.8).
        self.clip.visual.conv1.weight.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ structure
    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_size(self) -> int:
        return self.config.clip.image_size

    @property
    def has_denoisers(self) -> bool:
        return hasattr(self, "diffusion_model")

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def _create_denoisers(self, generator: torch.Generator | None) -> None:
        dim = self.config.embed_dim
        self.diffusion_model = T2VDenoiser(dim, self.config.denoiser_temp)
        self.diffusion_model_v = V2TDenoiser(dim, self.config.denoiser_temp)
        init_head_weights(self.diffusion_model, generator)
        init_head_weights(self.diffusion_model_v, generator)
        device = self.text_weight_fc[0].weight.device
        self.diffusion_model.to(device)
        self.diffusion_model_v.to(device)

    def add_denoisers(self, generator: torch.Generator | None = None) -> None:
        """Turn a discrimination-stage model into a generation-stage one (fresh denoisers)."""
        if self.has_denoisers:
            raise RuntimeError("model already has denoisers")
        self._create_denoisers(generator)
        self.config = dataclasses.replace(self.config, denoisers=True)

    def __getattr__(self, name: str):
        # nn.Module resolves parameters and submodules here; the sampling API that moved out of the
        # network is named with its replacement instead of a bare "no attribute".
        if name in _MOVED:
            raise AttributeError(f"DiffusionRet.{name} was removed: the diffusion sampler is not part of the model; "
                                 f"use diffusionret.retrieval.{_MOVED[name]}")
        return super().__getattr__(name)

    def freeze_backbone(self) -> None:
        """Generation stage: everything but the two denoisers is frozen (docs/reference.md §1.8)."""
        for name, param in self.named_parameters():
            param.requires_grad_(name.startswith(("diffusion_model.", "diffusion_model_v.")))

    def init_temporal_from_clip(self) -> None:
        """The reference's initialisation trick (docs/reference.md §1.1).

        Frame positions from CLIP's text positional table and, for seqTransf, the first
        ``temporal_layers`` CLIP text layers as the temporal transformer.
        """
        clip_state = self.clip.state_dict()
        if not hasattr(self, "frame_position_embeddings"):
            return
        pos = clip_state["positional_embedding"]
        if pos.shape != self.frame_position_embeddings.weight.shape:
            logger.warning("CLIP text width %s differs from the embedding width %s: keeping random temporal init",
                           tuple(pos.shape), tuple(self.frame_position_embeddings.weight.shape))
            return
        with torch.no_grad():
            self.frame_position_embeddings.weight.copy_(pos)
        if hasattr(self, "transformerClip"):
            layers = clip_backbone.text_layers_for_temporal_init(clip_state, self.config.temporal_layers)
            own = self.transformerClip.state_dict()
            usable = {k: v.to(own[k].dtype) for k, v in layers.items() if k in own and own[k].shape == v.shape}
            self.transformerClip.load_state_dict(usable, strict=False)
            if len(usable) < len(own):
                logger.info("temporal transformer: %d of %d tensors initialised from CLIP text layers", len(usable), len(own))

    # ------------------------------------------------------------------ encoders
    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor, *,
                    packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Text features.

        Args:
            text_ids: (B, L) int64 (SOT ... EOT then 0); (B, 1, L) paragraph batches are flattened.
            text_mask: (B, L) 0/1.
            packed: compute only each text's valid positions and the one after them, in one packed
                sequence (:func:`~diffusionret.models.clip_backbone.encode_text_packed`): the same
                outputs there, 0 at the other padded positions (a search batch of mixed lengths).
        Returns:
            tokens (B, L, D) float32, every position projected; cls (B, D): the projected EOT token.
        """
        text_ids = _flatten_text(text_ids, "text_ids")
        text_mask = _flatten_text(text_mask, "text_mask")
        if text_ids.shape != text_mask.shape:
            raise ValueError(f"text_ids {tuple(text_ids.shape)} and text_mask {tuple(text_mask.shape)} differ in shape")
        if text_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"text_ids must be integer token ids, got {text_ids.dtype}")
        if packed:
            return clip_backbone.encode_text_packed(self.clip, text_ids.long(), text_mask)
        return clip_backbone.encode_text_tokens(self.clip, text_ids.long(), text_mask)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame projected CLS features before the temporal module.

        Args:
            frames: (B, T, 3, H, W) normalised frames (H = W = ``image_size``).
        Returns:
            (B, T, D) float32.
        """
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be (B, T, 3, H, W), got {tuple(frames.shape)}")
        size = self.image_size
        if frames.shape[-2:] != (size, size):
            raise ValueError(f"frames must be {size}x{size} for this model, got {tuple(frames.shape[-2:])}")
        b, t = frames.shape[:2]
        return clip_backbone.encode_frames(self.clip, frames.reshape(b * t, *frames.shape[2:])).view(b, t, -1)

    def aggregate(self, frame_feats: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Temporal module: (B, T, D), (B, T) -> (B, T, D)."""
        if frame_mask.shape != frame_feats.shape[:2]:
            raise ValueError(f"frame_mask {tuple(frame_mask.shape)} does not match frames {tuple(frame_feats.shape[:2])}")
        agg = self.config.agg_module
        if agg == "seqTransf":
            return aggregate_seq_transf(frame_feats, frame_mask, self.frame_position_embeddings, self.transformerClip)
        if agg == "seqLSTM":
            return aggregate_seq_lstm(frame_feats, frame_mask, self.lstm_visual)
        return frame_feats

    def encode_video(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W), (B, T) -> (B, T, D) frame features after the temporal module."""
        if frame_mask.ndim != 2 or frame_mask.shape != frames.shape[:2]:
            raise ValueError(f"frame_mask must be (B, T) = {tuple(frames.shape[:2])}, got {tuple(frame_mask.shape)}")
        return self.aggregate(self.encode_frames(frames), frame_mask)

    def frame_weights(self, video: torch.Tensor, frame_mask: torch.Tensor, *,
                      chunk_size: int | None = None) -> torch.Tensor:
        """WTI's video-side softmax weights: (N, T, D), (N, T) -> (N, T) float32, 0 where masked.

        Exactly what :meth:`similarity` computes (the video weight MLP on the float32-cast
        features, ``chunk_size`` rows at a time), so they can be stored with an index and passed
        back as ``similarity(..., frame_weights=...)`` to skip the MLP at query time.
        """
        if frame_mask.ndim != 2 or frame_mask.shape != video.shape[:2] or video.ndim != 3:
            raise ValueError(f"expected video (N, T, D) and frame_mask (N, T), got {tuple(video.shape)} "
                             f"and {tuple(frame_mask.shape)}")
        return chunked_token_weights(self.video_weight_fc, video, frame_mask, chunk_size)

    def similarity(self, tokens: torch.Tensor, text_mask: torch.Tensor, video: torch.Tensor, frame_mask: torch.Tensor,
                   chunk_size: int | None = None, *, frame_weights: torch.Tensor | None = None,
                   trim: bool = False) -> torch.Tensor:
        """WTI scores (Nt, Nv) in [-1, 1]; no logit scale (docs/reference.md §1.4).

        ``frame_weights``: optional (Nv, T) from :meth:`frame_weights`; the video weight MLP is then skipped.
        ``trim``: compute on the real tokens and frames only (same scores up to rounding; see
        :func:`~diffusionret.models.similarity.wti_similarity`), for evaluation and search.
        """
        text_mask = _flatten_text(text_mask, "text_mask")
        return wti_similarity(self.text_weight_fc, self.video_weight_fc, tokens, text_mask, video, frame_mask,
                              chunk_size, frame_weights=frame_weights, trim=trim)

    # ------------------------------------------------------------------ denoisers
    def require_denoisers(self) -> None:
        if not self.has_denoisers:
            raise RuntimeError("this is a discrimination-stage (stage 1) model: it has no denoisers, so it cannot "
                               "re-rank; train stage 2 or evaluate without re-ranking")

    def denoise_t2v(self, x_t: torch.Tensor, t: torch.Tensor, cls: torch.Tensor, cand_video: torch.Tensor,
                    cand_mask: torch.Tensor) -> torch.Tensor:
        """Text->video denoiser: x_t (B, K), t (B,), cls (B, D), cand_video (B, K, T, D), cand_mask (B, K, T) -> (B, K)."""
        self.require_denoisers()
        _check_shapes("denoise_t2v", x_t=(x_t, 2), t=(t, 1), cls=(cls, 2), cand_video=(cand_video, 4), cand_mask=(cand_mask, 3))
        if cand_video.shape[:2] != x_t.shape or cand_mask.shape != cand_video.shape[:3] or cls.shape[0] != x_t.shape[0]:
            raise ValueError(f"denoise_t2v: inconsistent shapes x_t {tuple(x_t.shape)}, cls {tuple(cls.shape)}, "
                             f"cand_video {tuple(cand_video.shape)}, cand_mask {tuple(cand_mask.shape)}")
        return self.diffusion_model(x_t, t, cls, cand_video, cand_mask)

    def denoise_v2t(self, x_t: torch.Tensor, t: torch.Tensor, cand_cls: torch.Tensor, video: torch.Tensor,
                    frame_mask: torch.Tensor) -> torch.Tensor:
        """Video->text denoiser: x_t (B, K), t (B,), cand_cls (B, K, D), video (B, T, D), frame_mask (B, T) -> (B, K)."""
        self.require_denoisers()
        _check_shapes("denoise_v2t", x_t=(x_t, 2), t=(t, 1), cand_cls=(cand_cls, 3), video=(video, 3), frame_mask=(frame_mask, 2))
        if cand_cls.shape[:2] != x_t.shape or frame_mask.shape != video.shape[:2] or video.shape[0] != x_t.shape[0]:
            raise ValueError(f"denoise_v2t: inconsistent shapes x_t {tuple(x_t.shape)}, cand_cls {tuple(cand_cls.shape)}, "
                             f"video {tuple(video.shape)}, frame_mask {tuple(frame_mask.shape)}")
        return self.diffusion_model_v(x_t, t, cand_cls, video, frame_mask)

    def denoise_t2v_factored(self, x_t: torch.Tensor, t: torch.Tensor, cls: torch.Tensor, cand_video: torch.Tensor,
                             cand_mask: torch.Tensor, cand_idx: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`denoise_t2v` in the training form of :meth:`T2VDenoiser.forward_factored` (same x0 up to rounding).

        With ``cand_idx`` (B, K), ``cand_video`` (M, T, D) and ``cand_mask`` (M, T) are a bank of
        videos shared by all queries and ``cand_idx`` their rows; otherwise as :meth:`denoise_t2v`.
        """
        self.require_denoisers()
        _check_factored_shapes("denoise_t2v_factored", x_t, cand_idx,
                               {"cand_video": (cand_video, 4), "cand_mask": (cand_mask, 3)})
        return self.diffusion_model.forward_factored(x_t, t, cls, cand_video, cand_mask, cand_idx)

    def denoise_v2t_factored(self, x_t: torch.Tensor, t: torch.Tensor, cand_cls: torch.Tensor, video: torch.Tensor,
                             frame_mask: torch.Tensor, cand_idx: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`denoise_v2t` in the training form of :meth:`V2TDenoiser.forward_factored` (same x0 up to rounding).

        With ``cand_idx`` (B, K), ``cand_cls`` (M, D) is a bank of texts shared by all queries and
        ``cand_idx`` their rows; otherwise as :meth:`denoise_v2t`.
        """
        self.require_denoisers()
        _check_factored_shapes("denoise_v2t_factored", x_t, cand_idx, {"cand_cls": (cand_cls, 3)},
                               video=(video, 3))
        return self.diffusion_model_v.forward_factored(x_t, t, cand_cls, video, frame_mask, cand_idx)


def _flatten_text(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim == 3 and x.shape[1] == 1:  # ActivityNet/DiDeMo loaders give (B, 1, L)
        return x[:, 0]
    if x.ndim != 2:
        raise ValueError(f"{name} must be (B, L), got {tuple(x.shape)}")
    return x


def _check_shapes(where: str, **tensors: tuple[torch.Tensor, int]) -> None:
    for name, (tensor, ndim) in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor, got {type(tensor).__name__}")
        if tensor.ndim != ndim:
            raise ValueError(f"{where}: {name} must be {ndim}-D, got shape {tuple(tensor.shape)}")


def _check_factored_shapes(where: str, x_t: torch.Tensor, cand_idx: torch.Tensor | None,
                           candidates: dict[str, tuple[torch.Tensor, int]], **others: tuple[torch.Tensor, int]) -> None:
    """:func:`_check_shapes` for a factored denoiser call.

    ``candidates`` map a name to its tensor and its ndim per query; with ``cand_idx`` (B, K) they are
    a bank shared by all queries (one dimension fewer) and ``cand_idx`` must have ``x_t``'s shape.
    """
    bank = cand_idx is not None
    shapes = {name: (tensor, ndim - bank) for name, (tensor, ndim) in candidates.items()}
    if bank:
        others = {**others, "cand_idx": (cand_idx, 2)}
    _check_shapes(where, x_t=(x_t, 2), **shapes, **others)
    if bank and cand_idx.shape != x_t.shape:
        raise ValueError(f"{where}: cand_idx {tuple(cand_idx.shape)} != x_t {tuple(x_t.shape)}")
