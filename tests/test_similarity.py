"""WTI similarity: an oracle loop, chunking, permutation and batch invariants; temporal variants."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusionret.models.config import ModelConfig
from diffusionret.models.factory import build_model

_MODEL = build_model(ModelConfig.tiny(), generator=torch.Generator().manual_seed(0))


def _oracle(model, tokens, tmask, video, vmask):
    """Per-pair loop following SPEC.md 1.4 literally (including the zero floor for padding)."""
    out = torch.zeros(tokens.shape[0], video.shape[0])
    for a in range(tokens.shape[0]):
        wt = model.text_weight_fc(tokens[a]).squeeze(-1).masked_fill(tmask[a] == 0, -9e15).softmax(-1)
        for b in range(video.shape[0]):
            wv = model.video_weight_fc(video[b]).squeeze(-1).masked_fill(vmask[b] == 0, -9e15).softmax(-1)
            s = (tokens[a] / tokens[a].norm(dim=-1, keepdim=True)) @ (video[b] / video[b].norm(dim=-1, keepdim=True)).T
            s = s * tmask[a][:, None] * vmask[b][None, :]
            out[a, b] = ((wt * s.max(1).values).sum() + (wv * s.max(0).values).sum()) / 2
    return out


def _inputs(g, nt, nv, length=6, frames=4, d=64):
    tokens, video = torch.randn(nt, length, d, generator=g), torch.randn(nv, frames, d, generator=g)
    tl = torch.randint(2, length + 1, (nt,), generator=g)
    fl = torch.randint(1, frames + 1, (nv,), generator=g)
    tmask = (torch.arange(length)[None] < tl[:, None]).long()
    vmask = (torch.arange(frames)[None] < fl[:, None]).long()
    return tokens, tmask, video, vmask


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 4), st.integers(0, 10_000))
def test_wti_matches_oracle_and_chunking(nt, nv, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    tokens, tmask, video, vmask = _inputs(g, nt, nv)
    with torch.no_grad():
        full = _MODEL.similarity(tokens, tmask, video, vmask)
        chunked = _MODEL.similarity(tokens, tmask, video, vmask, chunk_size=chunk)
        oracle = _oracle(_MODEL, tokens, tmask, video, vmask)
    torch.testing.assert_close(full, oracle, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    assert full.abs().max() <= 1 + 1e-5


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 6), st.integers(2, 6), st.integers(0, 10_000))
def test_wti_permutation_equivariance(nt, nv, seed):
    g = torch.Generator().manual_seed(seed)
    tokens, tmask, video, vmask = _inputs(g, nt, nv)
    pt, pv = torch.randperm(nt, generator=g), torch.randperm(nv, generator=g)
    with torch.no_grad():
        base = _MODEL.similarity(tokens, tmask, video, vmask)
        perm = _MODEL.similarity(tokens[pt], tmask[pt], video[pv], vmask[pv])
    torch.testing.assert_close(perm, base[pt][:, pv], atol=1e-6, rtol=0)


def test_padding_content_is_ignored():
    g = torch.Generator().manual_seed(5)
    tokens, tmask, video, vmask = _inputs(g, 3, 3)
    tokens2, video2 = tokens.clone(), video.clone()
    tokens2[tmask == 0] = 123.0
    video2[vmask == 0] = -7.0
    with torch.no_grad():
        torch.testing.assert_close(_MODEL.similarity(tokens2, tmask, video2, vmask), _MODEL.similarity(tokens, tmask, video, vmask))


def test_encoders_batch_consistent_and_padding():
    g = torch.Generator().manual_seed(6)
    model = _MODEL
    frames = torch.randn(3, 4, 3, 32, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    with torch.no_grad():
        batch = model.encode_video(frames, mask)
        single = torch.cat([model.encode_video(frames[i:i + 1], mask[i:i + 1]) for i in range(3)])
        # padded frames do not influence valid ones (key mask)
        frames2 = frames.clone()
        frames2[1, 2:] = torch.randn(2, 3, 32, 32, generator=g)
        changed = model.encode_video(frames2, mask)
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(changed[1, :2], batch[1, :2], atol=1e-5, rtol=0)
    ids = torch.tensor([[49406, 320, 1929, 49407, 0, 0], [49406, 320, 49407, 0, 0, 0]])
    tmask = (ids > 0).long()
    with torch.no_grad():
        tokens, cls = model.encode_text(ids, tmask)
        tokens_long, cls_long = model.encode_text(torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1),
                                                  torch.cat([tmask, torch.zeros(2, 4, dtype=torch.long)], 1))
    assert tokens.shape == (2, 6, 64) and cls.shape == (2, 64)
    torch.testing.assert_close(cls, tokens[torch.arange(2), ids.argmax(1)])
    torch.testing.assert_close(cls_long, cls, atol=1e-5, rtol=0)  # padding length does not change EOT features


def test_temporal_variants():
    g = torch.Generator().manual_seed(7)
    frames, mask = torch.randn(2, 3, 3, 32, 32, generator=g), torch.tensor([[1, 1, 1], [1, 1, 0]])
    for agg in ("meanP", "seqLSTM", "seqTransf"):
        model = build_model(ModelConfig.tiny(agg_module=agg))
        with torch.no_grad():
            out = model.encode_video(frames, mask)
            per_frame = model.encode_frames(frames)
        assert out.shape == (2, 3, 64) and torch.isfinite(out).all()
        if agg == "meanP":
            torch.testing.assert_close(out, per_frame)
        else:
            assert not torch.allclose(out, per_frame)


def test_contrastive_gradient_flows():
    model = build_model(ModelConfig.tiny())
    model.train()
    g = torch.Generator().manual_seed(8)
    ids = torch.tensor([[49406, 320, 49407, 0], [49406, 1929, 49407, 0]])
    tokens, _ = model.encode_text(ids, (ids > 0).long())
    video = model.encode_video(torch.randn(2, 2, 3, 32, 32, generator=g), torch.ones(2, 2, dtype=torch.long))
    sim = model.similarity(tokens, (ids > 0).long(), video, torch.ones(2, 2, dtype=torch.long))
    loss = F.cross_entropy(sim * model.logit_scale.exp(), torch.arange(2))
    loss.backward()
    assert model.text_weight_fc[0].weight.grad is not None and model.clip.visual.conv1.weight.grad is None
    assert model.transformerClip.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0
