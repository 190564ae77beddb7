"""The Reranker's reuse of its denoisers' step tables: identical results, fresh tables after any weight change."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffusionret.models.config import ModelConfig
from diffusionret.models.factory import build_model
from diffusionret.retrieval import RerankConfig, Reranker
from diffusionret.retrieval.reranker import Reranker as RerankerClass


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # open_clip initialises CLIP from the global RNG
    g = torch.Generator().manual_seed(seed)
    model = build_model(ModelConfig.tiny(denoisers=True), generator=g)
    with torch.no_grad():  # larger weights, so that every term of the tables matters
        for p in [*model.diffusion_model.parameters(), *model.diffusion_model_v.parameters()]:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _inputs(model, seed: int = 1, nt: int = 3, nv: int = 7, frames: int = 4):
    g = torch.Generator().manual_seed(seed)
    d = model.embed_dim
    cls, video = torch.randn(nt, d, generator=g), torch.randn(nv, frames, d, generator=g)
    mask = torch.ones(nv, frames, dtype=torch.long)
    mask[::2, 3:] = 0
    return torch.rand(nt, nv, generator=g), cls, video, mask, g


@torch.no_grad()  # as evaluation and search call the re-ranker
def _run_all(reranker: Reranker, model) -> list[torch.Tensor]:
    """t2v, v2t and t2v_rows (the search path) on fixed inputs and noise."""
    sim, cls, video, mask, g = _inputs(model)
    k = reranker.config.top_k
    t2v = reranker.t2v(sim, cls, video, mask, noise=torch.randn(sim.shape[0], k, generator=g))
    v2t = reranker.v2t(sim.T.contiguous(), cls, video, mask, noise=torch.randn(sim.shape[1], k, generator=g))
    rows_video = torch.cat([video, video.flip(0)])[:sim.shape[0] * 4]  # 4 candidates per query
    rows_mask = torch.cat([mask, mask.flip(0)])[:sim.shape[0] * 4]
    rows = reranker.t2v_rows(sim[:, :4].contiguous(), cls, rows_video, rows_mask,
                             noise=torch.randn(sim.shape[0], min(k, 4), generator=g))
    return [t2v, v2t, rows]


def _tables(reranker: Reranker, name: str, value_rows: int):
    """The re-ranker's step tables as search and evaluation get them (gradients off)."""
    with torch.no_grad():
        return reranker._step_tables(name, value_rows)


def _fresh(self, name: str, value_rows: int):
    return getattr(self.model, name).step_tables(self.diffusion.num_steps, value_rows=value_rows)


@pytest.mark.parametrize("native", [True, False])
def test_reused_tables_give_bit_identical_reranking(native, monkeypatch):
    model = _model()
    reranker = Reranker(model, RerankConfig(steps=10, top_k=3, native=native))
    first = _run_all(reranker, model)
    again = _run_all(reranker, model)  # every call now reuses the tables of the first
    assert reranker._tables, "the tables were not kept"
    monkeypatch.setattr(RerankerClass, "_step_tables", _fresh)
    uncached = _run_all(Reranker(model, RerankConfig(steps=10, top_k=3, native=native)), model)
    for a, b, c in zip(first, again, uncached, strict=True):
        assert torch.equal(a, c) and torch.equal(b, c)


def _assert_tables_equal(a, b) -> None:
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, tuple):
            assert len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y)), field.name
        else:
            assert torch.equal(x, y), field.name


def test_tables_are_reused_until_an_optimizer_step_changes_the_weights():
    model = _model()
    reranker = Reranker(model, RerankConfig(steps=10, top_k=3))
    before = _tables(reranker, "diffusion_model", 3)
    assert _tables(reranker, "diffusion_model", 3) is before  # reused
    before_qe = before.qe.clone()
    before_out = _run_all(reranker, model)

    # One training step of the text->video denoiser (in-place parameter updates).
    denoiser = model.diffusion_model
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=1e-2)
    sim, cls, video, mask, g = _inputs(model)
    x0 = denoiser(torch.randn(2, 5, generator=g), torch.tensor([1, 7]), cls[:2],
                  video[:5].unsqueeze(0).expand(2, -1, -1, -1), mask[:5].unsqueeze(0).expand(2, -1, -1))
    x0.square().sum().backward()
    optimizer.step()

    after = _tables(reranker, "diffusion_model", 3)
    assert after is not before and not torch.equal(after.qe, before_qe)
    _assert_tables_equal(after, denoiser.step_tables(10, value_rows=3))
    after_out = _run_all(reranker, model)
    expected = _run_all(Reranker(model, RerankConfig(steps=10, top_k=3)), model)
    assert all(torch.equal(a, b) for a, b in zip(after_out, expected, strict=True))
    assert not torch.equal(after_out[0], before_out[0])


def test_other_weight_changes_and_schedules_get_fresh_tables():
    model = _model()
    reranker = Reranker(model, RerankConfig(steps=10, top_k=3))
    tables = _tables(reranker, "diffusion_model", 3)
    # load_state_dict copies in place (the version counters move).
    other = _model(seed=5)
    model.diffusion_model.load_state_dict(other.diffusion_model.state_dict())
    loaded = _tables(reranker, "diffusion_model", 3)
    assert loaded is not tables
    _assert_tables_equal(loaded, other.diffusion_model.step_tables(10, value_rows=3))
    # Replaced storage (.data) without an in-place update.
    weight = model.diffusion_model.q_proj.weight
    weight.data = weight.data * 2
    replaced = _tables(reranker, "diffusion_model", 3)
    assert replaced is not loaded
    _assert_tables_equal(replaced, model.diffusion_model.step_tables(10, value_rows=3))
    # A replaced denoiser module.
    model.diffusion_model = other.diffusion_model
    _assert_tables_equal(_tables(reranker, "diffusion_model", 3),
                         other.diffusion_model.step_tables(10, value_rows=3))
    # Another number of steps; and the fused value path (many rows) apart from the chain.
    reranker.diffusion = RerankConfig(steps=20).diffusion()
    assert _tables(reranker, "diffusion_model", 3).qe.shape[0] == 20
    fused = _tables(reranker, "diffusion_model", 10_000)
    assert len(fused.value_chain) == 1 and len(_tables(reranker, "diffusion_model", 3).value_chain) == 3
    # The video->text denoiser has its own tables.
    _assert_tables_equal(_tables(reranker, "diffusion_model_v", 3),
                         model.diffusion_model_v.step_tables(20, value_rows=3))


def test_tables_are_not_kept_with_gradients_enabled():
    model = _model()
    reranker = Reranker(model, RerankConfig(steps=10, top_k=3))
    sim, cls, video, mask, g = _inputs(model)
    reranker.t2v(sim, cls, video, mask, noise=torch.randn(sim.shape[0], 3, generator=g))
    assert not reranker._tables  # they would hold an autograd graph
    with torch.no_grad():
        reranker.t2v(sim, cls, video, mask, noise=torch.randn(sim.shape[0], 3, generator=g))
    assert reranker._tables
