"""The compiled WTI reduction (native/wti_reduce.c): the trimmed WTI it computes equals the PyTorch
reductions and the padded computation on any masks, it is switched off by DIFFUSIONRET_NATIVE=0, it
is bypassed where gradients are needed, and it rejects inconsistent inputs."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusionret.distributed import DistContext
from diffusionret.evaluation import evaluate as evaluate_module
from diffusionret.evaluation.features import CorpusFeatures
from diffusionret.models import similarity as similarity_module
from diffusionret.models.config import ModelConfig
from diffusionret.models.factory import build_model
from diffusionret.models.similarity import wti_similarity
from diffusionret.native import build as native_build
from diffusionret.native import load_wti_kernel
from diffusionret.native.wti import WtiKernel
from helpers import padded_wti, random_mask, wti_problem


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)  # open_clip initialises CLIP from the global RNG
    return build_model(ModelConfig.tiny(), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def kernel() -> WtiKernel:
    # CI's machines have a C compiler: a missing one fails here rather than skipping the kernel's tests.
    assert native_build._compiler() is not None, "no C compiler (cc/gcc/clang) found: the WTI kernel cannot be tested"
    loaded = load_wti_kernel()
    assert loaded is not None, ("a C compiler exists but the WTI kernel did not build "
                                "(see the .failed note in the cache)")
    return loaded


def _trimmed(model, tokens, tmask, video, vmask, chunk, fw, native: bool) -> torch.Tensor:
    with mock.patch.dict(os.environ, {native_build.ENV_SWITCH: "1" if native else "0"}), torch.no_grad():
        return wti_similarity(model.text_weight_fc, model.video_weight_fc, tokens, tmask, video, vmask, chunk,
                              frame_weights=fw, trim=True)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 7), st.integers(1, 5), st.sampled_from([None, 1, 2, 4]),
       st.sampled_from(["prefix", "scattered"]), st.sampled_from(["prefix", "scattered"]), st.booleans(),
       st.sampled_from([1, 2, 32]), st.integers(0, 10_000))
def test_native_trimmed_wti_equals_pytorch_and_padded(model, kernel, nt, nv, length, frames, chunk, text_kind,
                                                      video_kind, precomputed, video_block, seed):
    """All-padded and full rows, L = 1, T = 1, valid positions anywhere, video blocks split or not."""
    tokens, tmask, video, vmask, fw, expected = wti_problem(model, nt, nv, length, frames, text_kind, video_kind,
                                                            precomputed, seed)
    calls = []
    reduce = WtiKernel.reduce

    def spy(self, *args, **kwargs):
        calls.append(1)
        return reduce(self, *args, **kwargs)

    with mock.patch.object(similarity_module, "RAGGED_VIDEO_BLOCK", video_block), \
            mock.patch.object(WtiKernel, "reduce", spy):
        compiled = _trimmed(model, tokens, tmask, video, vmask, chunk, fw, native=True)
        assert calls, "the compiled reduction was not used"
        calls.clear()
        loop = _trimmed(model, tokens, tmask, video, vmask, chunk, fw, native=False)
        assert not calls, "DIFFUSIONRET_NATIVE=0 must keep the PyTorch reductions"
    torch.testing.assert_close(compiled, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(compiled, loop, atol=1e-6, rtol=0)
    # A row with nothing valid on either side scores exactly 0 against everything.
    assert (compiled[tmask.sum(1) == 0] == 0).all() and (compiled[:, vmask.sum(1) == 0] == 0).all()


def test_switched_off_and_gradients_keep_pytorch(model, monkeypatch):
    monkeypatch.setenv(native_build.ENV_SWITCH, "0")
    assert load_wti_kernel() is None
    monkeypatch.delenv(native_build.ENV_SWITCH)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    video = torch.randn(4, 3, 64, generator=g)
    out = wti_similarity(model.text_weight_fc, model.video_weight_fc, tokens, torch.ones(3, 5), video,
                         torch.ones(4, 3), trim=True)
    out.sum().backward()  # the kernel has no backward: with gradients the PyTorch ops run
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0


def test_kernel_rejects_inconsistent_inputs(kernel):
    scores, out = torch.zeros(5, 6), torch.zeros(2, 3)
    args = dict(offsets=torch.tensor([0, 2, 5]), text_w=torch.ones(5), text_floor=torch.zeros(2, dtype=torch.bool),
                video_w=torch.ones(3, 2), video_floor=torch.zeros(3, dtype=torch.bool), out=out,
                out_rows=torch.arange(2), out_cols=torch.arange(3))
    kernel.reduce(scores, **args)
    assert torch.equal(out, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="inconsistent"):
        kernel.reduce(torch.zeros(5, 7), **args)
    with pytest.raises(ValueError, match="offsets"):
        kernel.reduce(scores, **{**args, "offsets": torch.tensor([0, 4, 3])})
    with pytest.raises(ValueError, match="inside"):
        kernel.reduce(scores, **{**args, "out_cols": torch.tensor([0, 1, 3])})
    with pytest.raises(ValueError, match="float32"):
        kernel.reduce(scores.double(), **args)


def test_similarity_matrix_groups_equal_one_call(model, monkeypatch):
    """The evaluation's caption groups (one model call each) give the scores of a single call."""
    g = torch.Generator().manual_seed(5)
    nt, nv, length, frames, d = 23, 7, 9, 4, model.embed_dim
    text_mask = random_mask(g, nt, length, "prefix")
    feats = CorpusFeatures(tokens=torch.randn(nt, length, d, generator=g), text_mask=text_mask,
                           cls=torch.randn(nt, d, generator=g), video=torch.randn(nv, frames, d, generator=g),
                           frame_mask=random_mask(g, nv, frames, "prefix"), caption_to_video=torch.arange(nt) % nv,
                           video_ids=[str(i) for i in range(nv)])
    whole = evaluate_module.similarity_matrix(model, feats, chunk_size=4, ctx=DistContext(), progress=False)
    monkeypatch.setattr(evaluate_module, "CAPTION_GROUP", 5)
    grouped = evaluate_module.similarity_matrix(model, feats, chunk_size=4, ctx=DistContext(), progress=False)
    with torch.no_grad():
        expected = padded_wti(model, feats.tokens, text_mask, feats.video, feats.frame_mask)
    torch.testing.assert_close(grouped, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(whole, expected, atol=1e-6, rtol=0)


def test_single_query_scores_are_bit_identical(model, kernel):
    """A search query's trimmed WTI is the PyTorch path's to the bit (the demo's pinned query results
    compare exact floats): the kernel rounds products and sums separately, as the PyTorch reductions do."""
    g = torch.Generator().manual_seed(2)
    tokens, video = torch.randn(1, 12, 64, generator=g), torch.randn(40, 5, 64, generator=g)
    tmask = (torch.arange(12)[None] < 7).long()
    vmask = random_mask(g, 40, 5, "prefix")
    compiled = _trimmed(model, tokens, tmask, video, vmask, None, None, native=True)
    loop = _trimmed(model, tokens, tmask, video, vmask, None, None, native=False)
    assert torch.equal(compiled, loop)
