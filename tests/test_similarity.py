"""WTI similarity: an oracle loop, chunking, permutation and batch invariants, memory bounded by the chunk
size, precomputed frame weights; temporal variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diffusionret.models.config import ModelConfig
from diffusionret.models.factory import build_model
from diffusionret.models.similarity import chunked_token_weights, length_buckets, token_weights, wti_similarity
from helpers import random_mask, wti_problem


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)  # open_clip initialises CLIP from the global RNG
    return build_model(ModelConfig.tiny(), generator=torch.Generator().manual_seed(0))


def _oracle(model, tokens, tmask, video, vmask):
    """Per-pair loop following docs/reference.md §1.4 literally (including the zero floor for padding)."""
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
def test_wti_matches_oracle_and_chunking(model, nt, nv, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    tokens, tmask, video, vmask = _inputs(g, nt, nv)
    with torch.no_grad():
        full = model.similarity(tokens, tmask, video, vmask)
        chunked = model.similarity(tokens, tmask, video, vmask, chunk_size=chunk)
        oracle = _oracle(model, tokens, tmask, video, vmask)
    torch.testing.assert_close(full, oracle, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    assert full.abs().max() <= 1 + 1e-5


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 6), st.integers(2, 6), st.integers(0, 10_000))
def test_wti_permutation_equivariance(model, nt, nv, seed):
    g = torch.Generator().manual_seed(seed)
    tokens, tmask, video, vmask = _inputs(g, nt, nv)
    pt, pv = torch.randperm(nt, generator=g), torch.randperm(nv, generator=g)
    with torch.no_grad():
        base = model.similarity(tokens, tmask, video, vmask)
        perm = model.similarity(tokens[pt], tmask[pt], video[pv], vmask[pv])
    torch.testing.assert_close(perm, base[pt][:, pv], atol=1e-6, rtol=0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 7), st.integers(1, 5), st.sampled_from([None, 1, 2, 3, 4]),
       st.sampled_from(["prefix", "scattered"]), st.sampled_from(["prefix", "scattered"]), st.booleans(),
       st.integers(0, 10_000))
def test_bucketed_wti_equals_padded(model, nt, nv, length, frames, chunk, text_kind, video_kind, precomputed, seed):
    """Length bucketing (real tokens/frames, the zero floor applied to the maxima) gives the padded scores,
    for any masks: all-padded rows, full rows, L = 1, T = 1, valid positions anywhere."""
    tokens, tmask, video, vmask, fw, expected = wti_problem(model, nt, nv, length, frames, text_kind, video_kind,
                                                            precomputed, seed)
    with torch.no_grad():
        got = wti_similarity(model.text_weight_fc, model.video_weight_fc, tokens, tmask, video, vmask, chunk,
                             frame_weights=fw, trim=True)
        padded = wti_similarity(model.text_weight_fc, model.video_weight_fc, tokens, tmask, video, vmask, chunk,
                                frame_weights=fw)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(padded, expected, atol=1e-6, rtol=0)
    # A row with nothing valid on either side scores exactly 0 against everything.
    assert (got[tmask.sum(1) == 0] == 0).all() and (got[:, vmask.sum(1) == 0] == 0).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 20), st.integers(1, 9), st.integers(1, 6), st.sampled_from(["prefix", "scattered"]),
       st.integers(0, 10_000))
def test_length_buckets_cover_rows_once(rows, length, chunk, kind, seed):
    """Every row lands in exactly one bucket, which keeps all its valid positions (at least one, at
    most L) and marks the rows with padding for the zero floor."""
    g = torch.Generator().manual_seed(seed)
    mask = random_mask(g, rows, length, kind)
    buckets = length_buckets(mask, chunk)
    seen = torch.cat([b.rows for b in buckets])
    assert sorted(seen.tolist()) == list(range(rows))
    for b in buckets:
        kept = b.take(mask)  # (n, keep)
        assert b.keep <= length and kept.shape == (len(b.rows), b.keep) and len(b.rows) <= chunk
        assert torch.equal(kept.sum(1), mask[b.rows].sum(1))  # every valid position kept
        assert b.keep == max(1, int(mask[b.rows].sum(1).max()))
        assert torch.equal(b.floor, mask[b.rows].sum(1) < length)  # the zero floor where there is padding


class _LargestOutputs(TorchDispatchMode):
    """Records the shape of every tensor an aten op allocates inside the block (views and in-place
    results, e.g. a transposed weight or a slice of the output, are not new memory and are skipped)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if all(r.alias_info is None for r in func._schema.returns):
            self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


class _RowSpy:
    """Forward pre-hooks recording how many rows each weight-MLP call gets."""

    def __init__(self, *modules):
        self.rows = {id(m): [] for m in modules}
        self._handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, module, inputs):
        self.rows[id(module)].append(inputs[0].shape[0])

    def remove(self):
        for h in self._handles:
            h.remove()


def _largest_intermediate(model, nt, nv, chunk, frame_weights=False):
    """Largest tensor produced during one call, ignoring the (Nt, Nv) output and the (Nv, T) weights."""
    g = torch.Generator().manual_seed(nt * 100 + nv)
    tokens, tmask, video, vmask = _inputs(g, nt, nv)
    fw = model.frame_weights(video, vmask, chunk_size=chunk) if frame_weights else None
    spy = _RowSpy(model.text_weight_fc, model.video_weight_fc)
    try:
        with torch.no_grad(), _LargestOutputs() as rec:
            out = model.similarity(tokens, tmask, video, vmask, chunk, frame_weights=fw)
    finally:
        spy.remove()
    assert out.shape == (nt, nv)
    ignored = {(nt, nv), (nv, video.shape[1])}
    largest = max(torch.Size(s).numel() for s in rec.shapes if s not in ignored)
    return largest, spy.rows[id(model.text_weight_fc)], spy.rows[id(model.video_weight_fc)]


@pytest.mark.parametrize("frame_weights", [False, True])
def test_memory_bounded_by_chunk(model, frame_weights):
    """Peak memory does not grow with Nt or Nv: the weight MLPs never see more than ``chunk`` rows,
    and no intermediate tensor is larger than a chunk's worth (an implementation that ran the MLPs or
    normalised all features at once would produce (Nt, L, 2D) / (Nt, L, D) tensors and fail)."""
    chunk, length, frames, d = 3, 6, 4, 64
    small, t_rows, v_rows = _largest_intermediate(model, chunk, chunk, chunk, frame_weights)
    large, t_rows_l, v_rows_l = _largest_intermediate(model, 7 * chunk + 1, 5 * chunk + 2, chunk, frame_weights)
    hidden = 2 * d  # the weight MLP's hidden layer
    # Length buckets make the block sizes depend on the lengths drawn, so the two runs need not hit
    # the same largest tensor; both stay within one full chunk's worth, whatever Nt and Nv are.
    bound = max(chunk * length * chunk * frames, chunk * max(length, frames) * hidden)
    assert small <= bound and large <= bound
    assert max(t_rows + t_rows_l) <= chunk and sum(t_rows_l) == 7 * chunk + 1
    if frame_weights:
        assert v_rows == v_rows_l == []  # the video MLP is skipped
    else:
        assert max(v_rows + v_rows_l) <= chunk and sum(v_rows_l) == 5 * chunk + 2  # once per video, not per text chunk


def test_chunked_token_weights_matches_unchunked(model):
    g = torch.Generator().manual_seed(11)
    tokens, tmask, video, vmask = _inputs(g, 9, 7)
    with torch.no_grad():
        for fc, x, m in ((model.text_weight_fc, tokens, tmask), (model.video_weight_fc, video, vmask)):
            full = token_weights(fc, x, m)
            for chunk in (None, 1, 2, 4, 100):
                torch.testing.assert_close(chunked_token_weights(fc, x, m, chunk), full, atol=1e-7, rtol=0)
            assert chunked_token_weights(fc, x.half(), m, 2).dtype == torch.float32
    assert (full[m == 0] == 0).all()


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.sampled_from([None, 1, 2, 3]), st.sampled_from([None, 1, 4]),
       st.sampled_from([torch.float32, torch.float16]), st.integers(0, 10_000))
def test_precomputed_frame_weights_equal(model, nt, nv, chunk, weight_chunk, dtype, seed):
    """Weights from ``frame_weights`` (e.g. stored with an fp16 index, gathered per query) give the same scores."""
    g = torch.Generator().manual_seed(seed)
    tokens, tmask, video, vmask = _inputs(g, nt, nv)
    tokens, video = tokens.to(dtype), video.to(dtype)
    with torch.no_grad():
        fw = model.frame_weights(video, vmask, chunk_size=weight_chunk)
        assert fw.shape == vmask.shape and fw.dtype == torch.float32
        base = model.similarity(tokens, tmask, video, vmask, chunk)
        torch.testing.assert_close(model.similarity(tokens, tmask, video, vmask, chunk, frame_weights=fw), base,
                                   atol=1e-6, rtol=0)
        pick = torch.randint(0, nv, (max(1, nv // 2),), generator=g)  # a candidate subset, as in search
        torch.testing.assert_close(
            model.similarity(tokens, tmask, video[pick], vmask[pick], frame_weights=fw[pick]),
            model.similarity(tokens, tmask, video[pick], vmask[pick]), atol=1e-6, rtol=0)
        if dtype == torch.float16:  # fp16 features score like their float32 cast
            torch.testing.assert_close(base, model.similarity(tokens.float(), tmask, video.float(), vmask, chunk),
                                       atol=0, rtol=0)
        # the same chunking gives bit-identical scores
        assert torch.equal(model.similarity(tokens, tmask, video, vmask, chunk,
                                             frame_weights=model.frame_weights(video, vmask, chunk_size=chunk)),
                           model.similarity(tokens, tmask, video, vmask, chunk))


def test_frame_weights_shape_checked(model):
    g = torch.Generator().manual_seed(12)
    tokens, tmask, video, vmask = _inputs(g, 2, 3)
    with pytest.raises(ValueError, match="frame_weights"):
        wti_similarity(model.text_weight_fc, model.video_weight_fc, tokens, tmask, video, vmask,
                       frame_weights=torch.ones(3, 5))
    with pytest.raises(ValueError):
        model.frame_weights(video, vmask[:, :2])


def test_padding_content_is_ignored(model):
    g = torch.Generator().manual_seed(5)
    tokens, tmask, video, vmask = _inputs(g, 3, 3)
    tokens2, video2 = tokens.clone(), video.clone()
    tokens2[tmask == 0] = 123.0
    video2[vmask == 0] = -7.0
    with torch.no_grad():
        torch.testing.assert_close(model.similarity(tokens2, tmask, video2, vmask), model.similarity(tokens, tmask, video, vmask))


def test_encoders_batch_consistent_and_padding(model):
    g = torch.Generator().manual_seed(6)
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
