"""The CLIP backbone, built through open_clip, with the token-level outputs DiffusionRet needs.

We do not carry CLIP code: the towers are open_clip's ``CLIP`` (whose parameter names are the
OpenAI ones, so OpenAI-format state dicts and the ``clip.*`` part of DiffusionRet checkpoints load
without renaming). This module adds what open_clip does not expose: every text position through
``ln_final`` and the projection, with the reference's per-sample key-padding mask (docs/reference.md §1.2.2).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

import torch
from torch import nn

from diffusionret.models.config import ClipConfig

logger = logging.getLogger(__name__)

# Entries of OpenAI's TorchScript archives that are not parameters.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class ClipFormatError(ValueError):
    """A CLIP weight file or state dict does not have the OpenAI ViT layout."""


def infer_clip_config(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> ClipConfig:
    """Infer the CLIP architecture from OpenAI-format tensor shapes (docs/reference.md §1.1).

    Args:
        state_dict: keys without prefix (``visual.conv1.weight``, ``transformer.resblocks.0...``).
        source: what to name in error messages (a file path).
    """
    required = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection",
                "positional_embedding", "token_embedding.weight", "ln_final.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        if any(k.startswith("visual.layer1.") for k in state_dict):
            raise ClipFormatError(f"{source}: ResNet CLIP checkpoints are not supported (ViT only)")
        raise ClipFormatError(f"{source}: not an OpenAI-format ViT CLIP state dict; missing {missing}")
    conv = state_dict["visual.conv1.weight"]
    if conv.ndim != 4:
        raise ClipFormatError(f"{source}: visual.conv1.weight has shape {tuple(conv.shape)}, expected 4-D")
    vision_layers = len([k for k in state_dict if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
    text_layers = len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")})
    patch = conv.shape[-1]
    n_pos = state_dict["visual.positional_embedding"].shape[0]
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid + 1 != n_pos:
        raise ClipFormatError(f"{source}: visual.positional_embedding has {n_pos} rows, not a square grid + 1")
    return ClipConfig(
        embed_dim=int(state_dict["text_projection"].shape[1]),
        image_size=int(patch * grid),
        vision_width=int(conv.shape[0]),
        vision_layers=vision_layers,
        vision_patch_size=int(patch),
        text_width=int(state_dict["ln_final.weight"].shape[0]),
        text_layers=text_layers,
        context_length=int(state_dict["positional_embedding"].shape[0]),
        vocab_size=int(state_dict["token_embedding.weight"].shape[0]),
    )


def read_openai_clip_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read CLIP weights: a safetensors file, a plain state dict, or a TorchScript archive (``ViT-B-32.pt``).

    The loaders that cannot run code come first (safetensors, then ``torch.load(weights_only=True)``);
    ``torch.jit.load`` is used only for files that are TorchScript archives (see
    :mod:`diffusionret.models.safe_load`). The archive's non-parameter entries (``input_resolution``
    ...) are dropped.

    Raises:
        UnsafeTorchError: a pickle-based file and a torch older than 2.6.
    """
    from diffusionret.models.safe_load import (
        UnsafeTorchError,
        is_safetensors_file,
        is_torchscript_archive,
        require_safe_torch,
        torch_load_weights,
    )

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP weights not found: {path}")
    if os.path.getsize(path) == 0:
        raise ClipFormatError(f"{path}: file is empty")
    state: Any = None
    if is_safetensors_file(path):
        from safetensors.torch import load_file

        try:
            state = load_file(path, device="cpu")
        except Exception as exc:  # noqa: BLE001 - re-raised with the path
            raise ClipFormatError(f"{path}: unreadable safetensors file ({exc})") from exc
    elif is_torchscript_archive(path):  # (torch.load would hand these to torch.jit.load itself)
        require_safe_torch()
        try:
            state = torch.jit.load(path, map_location="cpu").state_dict()
        except (RuntimeError, ValueError) as exc:
            raise ClipFormatError(f"{path}: unreadable TorchScript archive ({str(exc).splitlines()[0]})") from exc
    else:
        try:
            state = torch_load_weights(path)
        except UnsafeTorchError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the path and the cause
            raise ClipFormatError(f"{path}: cannot read as a state dict ({str(exc).splitlines()[0]})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ClipFormatError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS and isinstance(v, torch.Tensor)}


def build_open_clip(cfg: ClipConfig) -> nn.Module:
    """An fp32 open_clip ``CLIP`` with OpenAI's layout (QuickGELU, width//64 heads, token projection)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=cfg.vision_layers, width=cfg.vision_width, head_width=cfg.vision_width // cfg.vision_heads,
                           patch_size=cfg.vision_patch_size, image_size=cfg.image_size)
    text = CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
                       heads=cfg.text_heads, layers=cfg.text_layers)
    model = CLIP(cfg.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True, cast_dtype=None)
    return model.float()


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                     ignore: tuple[str, ...] = ()) -> None:
    """Raise a ``ValueError`` listing missing keys, unexpected keys and shape mismatches."""
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state_dict and not k.endswith(ignore or ("\0",)))
    unexpected = sorted(k for k in state_dict if k not in expected)
    shapes = sorted(f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in state_dict if k in expected and tuple(state_dict[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {_short(shapes)}")
    if problems:
        raise ValueError(f"{source} does not match the model: " + "; ".join(problems))


def _short(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def load_clip_weights(clip: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Strictly copy OpenAI-format weights into an open_clip ``CLIP`` (casting dtypes on copy)."""
    check_state_dict(clip, state_dict, source)
    own = clip.state_dict()
    clip.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, strict=True)


def load_open_clip_weights(name: str, pretrained: str) -> dict[str, torch.Tensor]:
    """State dict of an open_clip model from a pretrained tag (local cache only) or a local file."""
    import open_clip

    if os.path.isfile(pretrained):
        return read_openai_clip_file(pretrained)
    model = open_clip.create_model(name, pretrained=pretrained, cache_dir=os.environ.get("OPEN_CLIP_CACHE"))
    return {k: v for k, v in model.state_dict().items()}


def causal_key_padding_mask(text_mask: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask of the reference text tower (docs/reference.md §1.2.2).

    ``A[b, i, j] = 0`` where ``j <= i`` and token ``j`` is valid, ``-inf`` elsewhere; repeated
    sample-major over heads as ``nn.MultiheadAttention`` expects.

    Args:
        text_mask: (B, L) 0/1.
    Returns:
        (B * heads, L, L) float mask.
    """
    batch, length = text_mask.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=text_mask.device).tril()
    allowed = causal.unsqueeze(0) & text_mask.bool().unsqueeze(1)
    # Position 0 (SOT) is always a valid key, so no row is fully masked; guard all-padding rows anyway.
    allowed[:, :, 0] |= ~allowed.any(-1)
    mask = torch.zeros(batch, length, length, dtype=dtype, device=text_mask.device)
    mask.masked_fill_(~allowed, float("-inf"))
    return mask.repeat_interleave(heads, dim=0)


def _text_tower(clip: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """The text transformer, ``ln_final`` and ``text_projection`` of embedded tokens.

    Args:
        x: (B, L, W) token + positional embeddings in the tower's dtype; attn_mask: its additive mask.
    Returns:
        (B, L, D) float32.
    """
    if not getattr(clip.transformer, "batch_first", True):
        x = clip.transformer(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
    else:
        x = clip.transformer(x, attn_mask=attn_mask)
    x = clip.ln_final(x)
    proj = clip.text_projection
    hidden = proj(x) if isinstance(proj, nn.Linear) else x @ proj.to(x.dtype)
    return hidden.float()


def encode_text_tokens(clip: nn.Module, text_ids: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level text features of an open_clip ``CLIP``.

    Args:
        text_ids: (B, L) int64, SOT ... EOT then 0-padding (L <= context length).
        text_mask: (B, L) 0/1.
    Returns:
        tokens (B, L, D): every position through ``ln_final`` and ``text_projection`` (float32);
        cls (B, D): the projected EOT token (the largest id of each row).
    """
    length = text_ids.shape[1]
    if length > clip.positional_embedding.shape[0]:
        raise ValueError(f"text length {length} exceeds the CLIP context length {clip.positional_embedding.shape[0]}")
    dtype = clip.token_embedding.weight.dtype
    x = clip.token_embedding(text_ids).to(dtype) + clip.positional_embedding[:length].to(dtype)
    heads = clip.transformer.resblocks[0].attn.num_heads
    hidden = _text_tower(clip, x, causal_key_padding_mask(text_mask, heads, x.dtype))
    eot = text_ids.argmax(dim=-1)
    cls = hidden[torch.arange(hidden.shape[0], device=hidden.device), eot]
    return hidden, cls


def packed_attention_mask(lengths: list[int], valid: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask of several texts packed into one sequence (:func:`encode_text_packed`).

    Each text attends only to its own earlier valid positions, exactly as
    :func:`causal_key_padding_mask` lets it alone.

    Args:
        lengths: positions of each text in the packed sequence (their sum is S).
        valid: (S,) 0/1, the packed text mask.
    Returns:
        (heads, S, S) float mask.
    """
    total = sum(lengths)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=valid.device),
                                      torch.tensor(lengths, device=valid.device))
    causal = torch.ones(total, total, dtype=torch.bool, device=valid.device).tril()
    allowed = causal & (segment[:, None] == segment[None, :]) & valid.bool()[None, :]
    starts = torch.tensor([0, *lengths[:-1]], device=valid.device).cumsum(0)
    allowed[torch.arange(total, device=valid.device), starts[segment]] |= ~allowed.any(-1)  # as alone: the SOT key
    mask = torch.zeros(total, total, dtype=dtype, device=valid.device)
    mask.masked_fill_(~allowed, float("-inf"))
    return mask.unsqueeze(0).expand(heads, total, total)


def encode_text_packed(clip: nn.Module, text_ids: torch.Tensor,
                       text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_text_tokens` of each text's valid positions plus one padded one, packed in one sequence.

    A batch of texts padded to the longest pays the tower (mostly its linear layers) for every
    padded position; packed, the rows go through the linear layers together and attention stays
    inside each text (:func:`packed_attention_mask`), so each text's outputs are those it gets
    alone with its own padding trimmed to one position (the causal tower never lets a position
    see later ones). Search batches use it: their queries' lengths differ.

    Args:
        text_ids: (B, L) int64, SOT ... EOT then 0-padding; text_mask: (B, L) 0/1 with each
            row's valid positions first.
    Returns:
        tokens (B, L, D) float32: each row's valid positions and the one after them (when
        ``L`` has it) as alone, 0 at the other padded positions (masked, so unused); cls (B, D).
    """
    batch, length = text_ids.shape
    if length > clip.positional_embedding.shape[0]:
        raise ValueError(f"text length {length} exceeds the CLIP context length {clip.positional_embedding.shape[0]}")
    keep = [min(length, int(n) + 1) for n in text_mask.sum(dim=1).tolist()]
    device = text_ids.device
    rows = torch.repeat_interleave(torch.arange(batch, device=device), torch.tensor(keep, device=device))
    cols = torch.cat([torch.arange(n, device=device) for n in keep])
    ids, valid = text_ids[rows, cols], text_mask[rows, cols]
    dtype = clip.token_embedding.weight.dtype
    x = (clip.token_embedding(ids).to(dtype) + clip.positional_embedding[cols].to(dtype)).unsqueeze(0)  # (1, S, W)
    heads = clip.transformer.resblocks[0].attn.num_heads
    hidden = _text_tower(clip, x, packed_attention_mask(keep, valid, heads, x.dtype))[0]  # (S, D)
    tokens = hidden.new_zeros(batch, length, hidden.shape[-1])
    tokens[rows, cols] = hidden
    eot = text_ids.argmax(dim=-1)
    return tokens, tokens[torch.arange(batch, device=tokens.device), eot]


def encode_frames(clip: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """Projected CLS feature of every frame.

    Args:
        frames: (N, 3, H, W) normalised images.
    Returns:
        (N, D) float32.
    """
    dtype = clip.visual.conv1.weight.dtype
    return clip.encode_image(frames.to(dtype)).float()


_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.*)$")


def text_layers_for_temporal_init(clip_state: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The reference's initialisation trick: CLIP text layers ``0..layers-1`` as temporal layers.

    Returns a dict keyed like the temporal transformer's state dict (``resblocks.{i}.*``).
    """
    out = {}
    for key, value in clip_state.items():
        match = _RESBLOCK.match(key)
        if match and int(match.group(1)) < layers:
            out[f"resblocks.{match.group(1)}.{match.group(2)}"] = value
    return out
