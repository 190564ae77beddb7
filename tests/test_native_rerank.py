"""The compiled DDIM kernel (diffusionret.native) against the PyTorch sampling loop, and its fallback."""

from __future__ import annotations

import subprocess

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusionret.diffusion.gaussian import GaussianDiffusion
from diffusionret.models.config import ModelConfig
from diffusionret.models.denoiser import T2VDenoiser, V2TDenoiser
from diffusionret.models.diffusionret import init_head_weights
from diffusionret.models.factory import build_model
from diffusionret.native import DdimKernel, load_ddim_kernel
from diffusionret.native import build as native_build
from diffusionret.retrieval import RerankConfig, Reranker
from diffusionret.retrieval import reranker as reranker_module


@pytest.fixture(scope="module")
def kernel() -> DdimKernel:
    # CI's machines have a C compiler, so a missing one fails here rather than skipping the kernel's
    # tests (users without one get the PyTorch loop, which the fallback tests below cover).
    assert native_build._compiler() is not None, "no C compiler (cc/gcc/clang) found: the native kernel cannot be tested"
    loaded = load_ddim_kernel()
    assert loaded is not None, "a C compiler exists but the kernel did not build (see the .failed note in the cache)"
    return loaded


def _denoiser(cls, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    module = cls(dim)
    init_head_weights(module, g)
    with torch.no_grad():  # non-trivial biases and larger weights, so that every term matters
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


def _sample(kernel, prepared, diffusion, noise, threads=1):
    tables = prepared.tables
    return kernel.sample(prepared.logit_table, prepared.g, prepared.c, tables.he, tables.out_w, float(tables.out_b),
                         diffusion.ddim_coefficients(0.0), noise, cand_idx=prepared.cand_idx, mix=prepared.mix,
                         c_bias=prepared.c_bias, threads=threads)


@settings(max_examples=40, deadline=None)
@given(form=st.sampled_from(["pairs", "text_bank", "frame_bank"]), b=st.integers(1, 4), n=st.integers(1, 9),
       dim=st.sampled_from([2, 6, 10, 16]), frames=st.integers(1, 4), steps=st.sampled_from([1, 3, 10]), threads=st.integers(1, 3),
       seed=st.integers(0, 10_000))
def test_kernel_equals_pytorch_ddim(kernel, form, b, n, dim, frames, steps, threads, seed):
    """All three candidate layouts, widths that are not multiples of the vector width, K below 4, T = 1."""
    g = torch.Generator().manual_seed(seed)
    diffusion = GaussianDiffusion(steps)
    m = n + 3
    idx = torch.stack([torch.randperm(m, generator=g)[:n] for _ in range(b)])  # (B, N) rows of a bank
    if form == "text_bank":
        module = _denoiser(V2TDenoiser, dim, seed)
        tables = module.step_tables(steps)
        bank = torch.randn(m, dim, generator=g)
        video, mask = torch.randn(b, frames, dim, generator=g), (torch.rand(b, frames, generator=g) > 0.3).long()
        prepared = module.prepare(bank[idx], video, mask, tables, candidates=module.candidate_texts(bank, tables),
                                  cand_idx=idx)
    else:
        module = _denoiser(T2VDenoiser, dim, seed)
        tables = module.step_tables(steps)
        bank = torch.randn(m, frames, dim, generator=g)
        bank_mask = (torch.rand(m, frames, generator=g) > 0.3).long()
        text = torch.randn(b, dim, generator=g)
        frame_terms = module.candidate_frames(bank, tables) if form == "frame_bank" else None
        prepared = module.prepare(text, bank[idx], bank_mask[idx], tables, frames=frame_terms,
                                  cand_idx=idx if frame_terms is not None else None)
    noise = torch.randn(b, n, generator=g)
    expected = diffusion.ddim_sample(prepared, noise)
    torch.testing.assert_close(_sample(kernel, prepared, diffusion, noise, threads), expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("frame_bank", [True, False])
def test_reranker_with_kernel_equals_pytorch_loop(kernel, monkeypatch, frame_bank):
    """The evaluation path (both directions) against the PyTorch loop: scores <= 1e-5, same rankings."""
    # Force each text->video form: per-frame bank mixed in the kernel, or per-pair terms.
    monkeypatch.setattr(reranker_module, "FRAME_BANK_MIN_RATIO", 0.0 if frame_bank else float("inf"))
    g = torch.Generator().manual_seed(7)
    model = build_model(ModelConfig.tiny(denoisers=True), generator=g)
    with torch.no_grad():  # larger than the init, so x0 varies across candidates
        for p in list(model.diffusion_model.parameters()) + list(model.diffusion_model_v.parameters()):
            p.normal_(0, 0.1, generator=g)
    nt, nv, frames, d, k = 37, 29, 5, model.embed_dim, 7
    cls, video = torch.randn(nt, d, generator=g), torch.randn(nv, frames, d, generator=g)
    mask = torch.ones(nv, frames, dtype=torch.long)
    mask[::3, 2:] = 0
    # Well-separated base scores (distinct multiples of 1e-3 in both directions).
    sim = torch.randperm(nt * nv, generator=g).view(nt, nv).float() * 1e-3
    noise_t2v, noise_v2t = torch.randn(nt, k, generator=g), torch.randn(nv, k, generator=g)
    compiled = Reranker(model, RerankConfig(steps=20, top_k=k, chunk_size=8))
    loop = Reranker(model, RerankConfig(steps=20, top_k=k, chunk_size=8, native=False))
    assert compiled.native and not loop.native
    fast = compiled.both(sim, cls, video, mask, noise_t2v=noise_t2v, noise_v2t=noise_v2t)
    slow = loop.both(sim, cls, video, mask, noise_t2v=noise_t2v, noise_v2t=noise_v2t)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        # Identical rankings wherever the loop's scores are separated by more than the tolerance.
        order = torch.argsort(b, dim=1, descending=True)
        gaps = (torch.gather(b, 1, order)[:, :-1] - torch.gather(b, 1, order)[:, 1:]).min(1).values
        separated = gaps > 1e-5
        assert separated.float().mean() > 0.5
        assert torch.equal(torch.argsort(a, dim=1, descending=True)[separated], order[separated])


def test_kernel_rejects_mismatched_shapes(kernel):
    coef = GaussianDiffusion(3).ddim_coefficients(0.0)
    logits, he, out_w, noise = torch.zeros(2, 3, 4), torch.zeros(3, 6), torch.zeros(6), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="must be"):
        kernel.sample(logits, torch.zeros(2, 5, 6), torch.zeros(2, 5, 6), he, out_w, 0.0, coef, noise)
    with pytest.raises(ValueError, match="inconsistent"):
        kernel.sample(logits, torch.zeros(2, 4, 6), torch.zeros(2, 4, 6), he, out_w, 0.0, coef, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="do not"):
        kernel.sample(logits, torch.zeros(9, 6), torch.zeros(9, 6), he, out_w, 0.0, coef, noise,
                      cand_idx=torch.zeros(2, 4, dtype=torch.long), mix=torch.ones(2, 4, 1))


def test_kernel_is_built_once_and_reused(kernel, tmp_path, monkeypatch):
    first = load_ddim_kernel(tmp_path)
    assert first is not None and first.path.parent == tmp_path and first.path.suffix == ".so"

    def no_compiler(*args, **kwargs):
        raise AssertionError("the cached library should have been reused")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert load_ddim_kernel(tmp_path).path == first.path
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.failed"))


def test_failed_build_falls_back_and_is_not_retried(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.delenv(native_build.ENV_SWITCH, raising=False)
    assert load_ddim_kernel(tmp_path) is None
    assert "unavailable" in caplog.text and len(list(tmp_path.glob("*.failed"))) == 1
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    assert load_ddim_kernel(tmp_path) is None and calls == []


def test_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(native_build.ENV_SWITCH, "0")
    assert load_ddim_kernel() is None
    model = build_model(ModelConfig.tiny(denoisers=True), generator=torch.Generator().manual_seed(0))
    assert not Reranker(model).native
    monkeypatch.delenv(native_build.ENV_SWITCH)
    # Stochastic DDIM (eta > 0) always uses the PyTorch loop, which draws the step noise.
    assert not Reranker(model, RerankConfig(eta=0.5)).native


def test_t2v_prepare_with_candidate_frames_equals_forward():
    """Pooling moved after the linear maps (a per-frame bank mixed per pair) still computes the network."""
    g = torch.Generator().manual_seed(3)
    b, n, m, frames, d = 4, 5, 8, 3, 16
    module = _denoiser(T2VDenoiser, d, 3)
    bank, bank_mask = torch.randn(m, frames, d, generator=g), (torch.rand(m, frames, generator=g) > 0.3).long()
    idx = torch.stack([torch.randperm(m, generator=g)[:n] for _ in range(b)])
    text, x, t = torch.randn(b, d, generator=g), torch.randn(b, n, generator=g), torch.tensor([0, 9, 4, 4])
    tables = module.step_tables(10)
    prepared = module.prepare(text, bank[idx], bank_mask[idx], tables, frames=module.candidate_frames(bank, tables),
                              cand_idx=idx)
    with torch.no_grad():
        expected = module(x, t, text, bank[idx], bank_mask[idx])
    torch.testing.assert_close(prepared(x, t), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cand_idx"):
        module.prepare(text, bank[idx], bank_mask[idx], tables, frames=module.candidate_frames(bank, tables))
