"""Diffusion schedules, DDIM, the hoisted denoiser form and batched re-ranking vs straightforward code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusionret.diffusion.gaussian import GaussianDiffusion
from diffusionret.diffusion.schedules import cosine_betas, linear_betas
from diffusionret.models.config import ModelConfig
from diffusionret.models.denoiser import T2VDenoiser, V2TDenoiser, sinusoidal_table
from diffusionret.models.diffusionret import init_head_weights
from diffusionret.models.factory import build_model
from diffusionret.retrieval import RerankConfig, Reranker


def _reranker(model, steps, **changes):
    return Reranker(model, RerankConfig(steps=steps, **changes))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A tiny generation-stage model with a 5-step sampler."""
    torch.manual_seed(0)  # open_clip initialises CLIP from the global RNG
    return build_model(ModelConfig.tiny(denoisers=True), generator=torch.Generator().manual_seed(0))


def test_cosine_schedule_values_from_spec():
    betas = cosine_betas(50)
    np.testing.assert_allclose(betas[:3], [0.001748, 0.003689, 0.005634], atol=5e-7)
    np.testing.assert_allclose(betas[-3:], [0.5548, 0.7498, 0.999], atol=5e-5)
    a_bar = np.cumprod(1 - betas)
    assert abs(a_bar[0] - 0.998252) < 1e-6 and abs(a_bar[-1] - 9.71e-7) < 1e-8


def test_linear_schedule():
    betas = linear_betas(50)
    assert betas[0] == pytest.approx(0.002) and betas[-1] == pytest.approx(0.4) and betas.dtype == np.float64
    np.testing.assert_allclose(linear_betas(1000)[[0, -1]], [1e-4, 0.02])
    with pytest.raises(ValueError, match="more than 20 steps"):
        linear_betas(20)


def test_sinusoidal_table():
    table = sinusoidal_table(10, 8)
    assert torch.allclose(table[0, 0::2], torch.zeros(4)) and torch.allclose(table[0, 1::2], torch.ones(4))
    assert table[3, 2] == pytest.approx(np.sin(3 * np.exp(-2 * np.log(10000) / 8)), abs=1e-6)


def test_q_sample_moments():
    diffusion = GaussianDiffusion(50)
    x0 = torch.ones(20000, 1)
    t = torch.full((20000,), 10)
    xt = diffusion.q_sample(x0, t, generator=torch.Generator().manual_seed(0))
    a = diffusion.alphas_cumprod[10].item()
    assert xt.mean().item() == pytest.approx(a**0.5, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - a, abs=0.02)


def _random_denoiser(cls, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    module = cls(dim)
    init_head_weights(module, g)
    with torch.no_grad():  # non-trivial biases and larger weights than the init, to exercise every term
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


@pytest.mark.parametrize("cls", [T2VDenoiser, V2TDenoiser])
def test_prepared_denoiser_equals_forward(cls):
    g = torch.Generator().manual_seed(1)
    b, n, t_frames, d = 5, 7, 4, 16
    module = _random_denoiser(cls, d)
    mask = (torch.rand(b, n, t_frames, generator=g) > 0.3).long() if cls is T2VDenoiser else (torch.rand(b, t_frames, generator=g) > 0.3).long()
    if cls is T2VDenoiser:
        cond = (torch.randn(b, d, generator=g), torch.randn(b, n, t_frames, d, generator=g), mask)
    else:
        cond = (torch.randn(b, n, d, generator=g), torch.randn(b, t_frames, d, generator=g), mask)
    x = torch.randn(b, n, generator=g)
    # The value path fused into one matrix (the default) and kept as three products (few rows).
    for steps in (50, module.step_tables(50, value_rows=1)):
        prepared = module.prepare(*cond, steps)
        for t in (torch.full((b,), 3), torch.tensor([0, 49, 3, 3, 17])):
            with torch.no_grad():
                expected = module(x, t, *cond)
            torch.testing.assert_close(prepared(x, t), expected, atol=1e-5, rtol=1e-5)
    assert len(module.step_tables(50).value_chain) == 1 and len(module.step_tables(50, value_rows=1).value_chain) == 3


def test_v2t_prepare_with_shared_candidate_texts():
    """Text terms computed once for a bank and gathered per query equal those computed per (query, text)."""
    g = torch.Generator().manual_seed(5)
    b, n, m, f, d, steps = 4, 6, 9, 3, 16, 20
    module = _random_denoiser(V2TDenoiser, d)
    bank = torch.randn(m, d, generator=g)
    idx = torch.stack([torch.randperm(m, generator=g)[:n] for _ in range(b)])  # (B, N)
    video, mask = torch.randn(b, f, d, generator=g), (torch.rand(b, f, generator=g) > 0.3).long()
    x, t = torch.randn(b, n, generator=g), torch.tensor([19, 0, 7, 7])
    tables = module.step_tables(steps)
    shared = module.prepare(bank[idx], video, mask, tables, candidates=module.candidate_texts(bank, tables), cand_idx=idx)
    with torch.no_grad():
        expected = module(x, t, bank[idx], video, mask)
    torch.testing.assert_close(shared(x, t), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared(x, t), module.prepare(bank[idx], video, mask, steps)(x, t), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="cand_idx"):
        module.prepare(bank[idx], video, mask, tables, candidates=module.candidate_texts(bank, tables))


@pytest.mark.parametrize("cls", [T2VDenoiser, V2TDenoiser])
def test_denoiser_permutation_equivariant(cls):
    g = torch.Generator().manual_seed(2)
    module = _random_denoiser(cls, 16)
    b, n, f, d = 3, 6, 3, 16
    x, t = torch.randn(b, n, generator=g), torch.tensor([1, 5, 9])
    perm = torch.randperm(n, generator=g)
    if cls is T2VDenoiser:
        text, video, mask = torch.randn(b, d, generator=g), torch.randn(b, n, f, d, generator=g), torch.ones(b, n, f)
        out, out_p = module(x, t, text, video, mask), module(x[:, perm], t, text, video[:, perm], mask[:, perm])
    else:
        text, video, mask = torch.randn(b, n, d, generator=g), torch.randn(b, f, d, generator=g), torch.ones(b, f)
        out, out_p = module(x, t, text, video, mask), module(x[:, perm], t, text[:, perm], video, mask)
    torch.testing.assert_close(out[:, perm], out_p, atol=1e-5, rtol=1e-5)


def test_ddim_eta():
    g = torch.Generator().manual_seed(3)
    module = _random_denoiser(T2VDenoiser, 16)
    diffusion = GaussianDiffusion(20)
    cond = dict(text_emb=torch.randn(4, 16, generator=g), video_emb=torch.randn(4, 5, 3, 16, generator=g), video_mask=torch.ones(4, 5, 3))
    noise = torch.randn(4, 5, generator=g)
    a = diffusion.ddim_sample(module, noise, **cond)
    b = diffusion.ddim_sample(module, noise, **cond)
    assert torch.equal(a, b) and a.abs().max() <= 1.0  # deterministic, clamped x0 at t = 0
    s1 = diffusion.ddim_sample(module, noise, eta=0.5, generator=torch.Generator().manual_seed(9), **cond)
    s2 = diffusion.ddim_sample(module, noise, eta=0.5, generator=torch.Generator().manual_seed(9), **cond)
    s3 = diffusion.ddim_sample(module, noise, eta=0.5, generator=torch.Generator().manual_seed(10), **cond)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3) and not torch.equal(s1, a)


def _naive_rerank(model, diffusion, sim, cls, video, mask, k, noise_t2v, noise_v2t):
    """Straightforward per-query implementation of docs/reference.md §3.3 (reference algorithm)."""
    t2v, v2t = sim.clone(), sim.T.clone()
    for i in range(sim.shape[0]):
        idx = torch.topk(sim[i], k).indices
        x0 = diffusion.ddim_sample(model.denoise_t2v, noise_t2v[i:i + 1], cls=cls[i:i + 1], cand_video=video[idx][None],
                                         cand_mask=mask[idx][None])
        t2v[i, idx] += torch.softmax(x0[0], -1)
    for j in range(sim.shape[1]):
        idx = torch.topk(sim.T[j], k).indices
        x0 = diffusion.ddim_sample(model.denoise_v2t, noise_v2t[j:j + 1], cand_cls=cls[idx][None], video=video[j:j + 1],
                                         frame_mask=mask[j:j + 1])
        v2t[j, idx] += torch.softmax(x0[0], -1)
    return t2v, v2t


def test_batched_rerank_equals_per_query_reference():
    g = torch.Generator().manual_seed(4)
    model = build_model(ModelConfig.tiny(denoisers=True), generator=g)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for p in model.diffusion_model_v.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    nt, nv, frames, d, k = 9, 11, 4, model.embed_dim, 5
    cls, video = torch.randn(nt, d, generator=g), torch.randn(nv, frames, d, generator=g)
    mask = torch.ones(nv, frames, dtype=torch.long)
    mask[::3, 2:] = 0
    sim = torch.rand(nt, nv, generator=g) * 2 - 1
    noise_t2v, noise_v2t = torch.randn(nt, k, generator=g), torch.randn(nv, k, generator=g)
    fast = _reranker(model, 10, top_k=k).both(sim, cls, video, mask, noise_t2v=noise_t2v, noise_v2t=noise_v2t)
    slow = _naive_rerank(model, GaussianDiffusion(10), sim, cls, video, mask, k, noise_t2v, noise_v2t)
    torch.testing.assert_close(fast[0], slow[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast[1], slow[1], atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.integers(1, 5), st.integers(0, 10_000))
def test_rerank_invariants(model, nq, nc, k, seed):
    """Only each row's top-K change, each by a positive bonus summing to alpha; the top-K set stays on top."""
    g = torch.Generator().manual_seed(seed)
    d = model.embed_dim
    cls, video = torch.randn(nq, d, generator=g), torch.randn(nc, 2, d, generator=g)
    mask = torch.ones(nc, 2, dtype=torch.long)
    sim = torch.rand(nq, nc, generator=g)
    out = _reranker(model, 5, top_k=k, alpha=0.5).t2v(sim, cls, video, mask, generator=g)
    delta = out - sim
    kk = min(k, nc)
    assert torch.all(delta >= 0)
    torch.testing.assert_close(delta.sum(1), torch.full((nq,), 0.5), atol=1e-5, rtol=0)
    assert torch.all((delta > 0).sum(1) == kk)
    top = torch.topk(sim, kk, dim=1).indices
    assert torch.all(torch.gather(delta, 1, top) > 0)


def test_rerank_independent_of_chunk_size(model):
    """The initial noise is drawn for all rows up front, so splitting the rows differently changes nothing."""
    g = torch.Generator().manual_seed(6)
    nt, nv, frames, d, k = 11, 8, 3, model.embed_dim, 4
    cls, video = torch.randn(nt, d, generator=g), torch.randn(nv, frames, d, generator=g)
    mask = torch.ones(nv, frames, dtype=torch.long)
    mask[::2, 1:] = 0
    sim = torch.rand(nt, nv, generator=g)
    runs = {}
    for chunk in (3, 64):
        runs[chunk] = (
            _reranker(model, 5, top_k=k, chunk_size=chunk).t2v(sim, cls, video, mask,
                                                               generator=torch.Generator().manual_seed(11)),
            _reranker(model, 5, top_k=k, chunk_size=chunk).v2t(sim.T, cls, video, mask,
                                                               generator=torch.Generator().manual_seed(12)),
        )
    for a, b in zip(runs[3], runs[64]):
        # Not bit-equal in general: a GEMM over 3 rows may round its last bit differently from one over 11.
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # And the noise is the generator's first (Nq, K) draw, whatever the chunking.
    noise = torch.randn(nt, k, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(_reranker(model, 5, top_k=k, chunk_size=5).t2v(sim, cls, video, mask, noise=noise),
                               runs[3][0], atol=1e-6, rtol=0)


def test_rerank_eta_draws_step_noise_from_the_generator(model):
    """eta = 0 (default) is the deterministic sampler; eta > 0 is stochastic but reproducible per seed."""
    g = torch.Generator().manual_seed(8)
    cls, video = torch.randn(3, model.embed_dim, generator=g), torch.randn(6, 2, model.embed_dim, generator=g)
    mask = torch.ones(6, 2, dtype=torch.long)
    sim = torch.rand(3, 6, generator=g)
    noise = torch.randn(3, 4, generator=g)

    def run(eta, seed):
        return _reranker(model, 5, top_k=4, eta=eta).t2v(sim, cls, video, mask, noise=noise,
                                                        generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0.0, 1), run(0.0, 2))  # eta 0 never touches the generator
    assert torch.equal(run(0.7, 1), run(0.7, 1)) and not torch.equal(run(0.7, 1), run(0.7, 2))
    assert not torch.equal(run(0.7, 1), run(0.0, 1))


def test_reranker_needs_denoisers_and_rerank_config_validates():
    stage1 = build_model(ModelConfig.tiny(), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="no denoisers"):
        Reranker(stage1)
    for bad in (dict(steps=0), dict(schedule="quadratic"), dict(top_k=-1), dict(eta=-0.1), dict(chunk_size=0)):
        with pytest.raises(ValueError):
            RerankConfig(**bad)


@pytest.mark.parametrize("name", ["rerank", "rerank_t2v", "rerank_v2t", "set_sampler", "diffusion"])
def test_sampling_api_left_the_model_with_a_pointer(model, name):
    """The old model methods fail at attribute access, naming the replacement (no silent fallback)."""
    with pytest.raises(AttributeError, match=r"removed.*diffusionret\.retrieval\.") as info:
        getattr(model, name)
    assert ("Reranker" in str(info.value)) or ("RerankConfig" in str(info.value)) or ("GaussianDiffusion" in str(info.value))
    assert not hasattr(model, name)
