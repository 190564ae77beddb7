"""Batched search (:meth:`Searcher.search_batch`) gives every query the result it gets alone.

A tiny, randomly initialised model with denoisers over an in-memory index of random features (no
decoding): mixed query lengths (the batch is trimmed to its longest query, so short queries carry
extra padded positions) and mixed ``k`` (more hits than candidates get a larger first stage).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusionret.index.catalog import VideoRecord
from diffusionret.index.features import pool_frames
from diffusionret.index.identity import model_fingerprint
from diffusionret.index.searcher import SearchConfig, Searcher
from diffusionret.index.store import IndexInfo, VideoIndex
from diffusionret.models.config import DiffusionSchedule, ModelConfig
from diffusionret.models.factory import build_model

VIDEOS, FRAMES = 120, 4
WORDS = ["a", "man", "is", "cooking", "pasta", "dog", "runs", "on", "the", "beach", "red", "car", "sings", "loudly"]


def _index(model: torch.nn.Module, root: Path, *, weights_for: int = VIDEOS) -> VideoIndex:
    """An index of VIDEOS random videos (some shorter than FRAMES); the first ``weights_for`` have stored weights."""
    generator = torch.Generator().manual_seed(1)
    dim = model.embed_dim
    real = torch.randint(1, FRAMES + 1, (VIDEOS,), generator=generator)
    mask = torch.arange(FRAMES)[None, :] < real[:, None]
    frames = (torch.randn(VIDEOS, FRAMES, dim, generator=generator) * mask[..., None]).half()
    info = IndexInfo(model_id=model_fingerprint(model), model_config={}, model_path=None, settings={},
                     num_frames=FRAMES, embed_dim=dim)
    records = [VideoRecord(id=f"{i:016x}", path=f"/videos/{i}.mp4", size=1, mtime_ns=0, duration=1.0, width=32,
                           height=32, num_frames=int(real[i]), shard="s.safetensors", row=i) for i in range(VIDEOS)]
    with torch.no_grad():
        weights = model.frame_weights(frames.float(), mask.long())
    known = torch.arange(VIDEOS) < weights_for
    return VideoIndex(root, info, records, frames, mask, pool_frames(frames, mask), frame_weights=weights,
                      weights_known=known)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(ModelConfig.tiny(denoisers=True), generator=torch.Generator().manual_seed(0)).eval()


@pytest.fixture(scope="module")
def searcher(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Searcher:
    index = _index(model, tmp_path_factory.mktemp("batch"))
    return Searcher(model, index, SearchConfig(candidates=20, rerank_top_k=6, seed=3),
                    diffusion=DiffusionSchedule(8))


def _assert_same(batch: list[list], alone: list[list]) -> None:
    """Same videos, ranks and re-ranked set; every score within 1e-6.

    Each query runs the same arithmetic in a batch as alone, but BLAS picks its kernels by matrix
    size (e.g. a one-row product is a matrix-vector kernel), so a batched product may round the
    last bit of a float32 differently.
    """
    assert [[(h.id, h.rank, h.wti_rank) for h in r] for r in batch] == [[(h.id, h.rank, h.wti_rank) for h in r]
                                                                         for r in alone]
    for got, want in zip(batch, alone, strict=True):
        for a, b in zip(got, want, strict=True):
            assert a.stage_scores.keys() == b.stage_scores.keys()
            assert a.stage_scores == pytest.approx(b.stage_scores, abs=1e-6, rel=0)
            assert a.score == pytest.approx(b.score, abs=1e-6, rel=0)


QUERIES = ["red", "a man is cooking pasta in a small kitchen while a dog runs on the beach", "a dog runs",
           "the car sings loudly on the beach", "man", "a " * 40]


@pytest.mark.parametrize("ks", [[5] * len(QUERIES), [1, 20, 7, 20, 3, 12], [25, 2, 20, 30, 1, 20]])
def test_batch_equals_one_at_a_time(searcher: Searcher, ks: list[int]) -> None:
    """Mixed lengths (1 token to longer than max_words) and k (up to more than the candidates)."""
    batch = searcher.search_batch(QUERIES, ks)
    _assert_same(batch, [searcher.search(q, k) for q, k in zip(QUERIES, ks, strict=True)])
    assert [len(r) for r in batch] == ks


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.lists(st.sampled_from(WORDS), min_size=1, max_size=20), st.integers(1, 24)),
                min_size=1, max_size=6))
def test_batch_equals_one_at_a_time_property(searcher: Searcher, requests: list[tuple[list[str], int]]) -> None:
    queries = [" ".join(words) for words, _ in requests]
    ks = [k for _, k in requests]
    _assert_same(searcher.search_batch(queries, ks), [searcher.search(q, k) for q, k in zip(queries, ks, strict=True)])


def test_batch_without_reranking_and_with_missing_weights(model: torch.nn.Module, tmp_path: Path) -> None:
    """WTI only; and an index where some videos have no stored weights (a query whose candidates
    include one computes its weights, as alone, while the others use the stored ones)."""
    index = _index(model, tmp_path, weights_for=VIDEOS // 2)
    for top_k in (0, 6):
        searcher = Searcher(model, index, SearchConfig(candidates=15, rerank_top_k=top_k), diffusion=DiffusionSchedule(5))
        ks = [3, 15, 9, 4]
        queries = QUERIES[:4]
        _assert_same(searcher.search_batch(queries, ks), [searcher.search(q, k) for q, k in zip(queries, ks, strict=True)])


def test_search_batch_checks_its_arguments(searcher: Searcher) -> None:
    with pytest.raises(ValueError, match="values of k"):
        searcher.search_batch(["a", "b"], [1])
    with pytest.raises(ValueError, match="positive"):
        searcher.search_batch(["a", "b"], [1, 0])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 9), min_size=1, max_size=5))
def test_packed_text_tower_equals_each_text_alone(model: torch.nn.Module, lengths: list[int]) -> None:
    """Packed (each text's real positions plus one, attention kept inside each text) = alone, trimmed to its own.

    Lengths 0 (SOT and EOT only) to 9 words in a context of 12, where the longest has no padded
    position left; the padded positions past the one kept come back 0. Tolerance: the tower's
    products change size with the batch, as when texts are padded to the longest (the unnormalised
    features differ there by ~1e-6 too; the search scores stay within 1e-6, tests above).
    """
    max_words = 12
    generator = torch.Generator().manual_seed(len(lengths) * 31 + sum(lengths))
    ids = torch.zeros(len(lengths), max_words, dtype=torch.long)
    mask = torch.zeros(len(lengths), max_words, dtype=torch.long)
    for row, n in enumerate(lengths):
        real = min(n + 2, max_words)
        ids[row, 0], ids[row, real - 1] = 49406, 49407  # SOT ... EOT (the largest id)
        ids[row, 1:real - 1] = torch.randint(1, 49000, (real - 2,), generator=generator)
        mask[row, :real] = 1
    with torch.no_grad():
        tokens, cls = model.encode_text(ids, mask, packed=True)
        for row, n in enumerate(lengths):
            keep = min(max_words, int(mask[row].sum()) + 1)
            alone_tokens, alone_cls = model.encode_text(ids[row:row + 1, :keep], mask[row:row + 1, :keep])
            assert torch.allclose(tokens[row, :keep], alone_tokens[0], atol=1e-5, rtol=1e-5)
            assert torch.allclose(cls[row], alone_cls[0], atol=1e-5, rtol=1e-5)
            assert not tokens[row, keep:].any()


def test_a_batch_of_mixed_lengths_is_packed(searcher: Searcher, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    encode = searcher.model.encode_text

    def spy(ids: torch.Tensor, mask: torch.Tensor, **kwargs: bool) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(kwargs.get("packed", False))
        return encode(ids, mask, **kwargs)

    monkeypatch.setattr(searcher.model, "encode_text", spy)
    searcher.search_batch(["red", "a man is cooking pasta"], 3)
    searcher.search_batch(["red car", "dog runs"], 3)  # same lengths: nothing to save, padded as before
    searcher.search("a man is cooking pasta", 3)
    assert calls == [True, False, False]


def test_a_large_batch_is_packed_in_bounded_groups(searcher: Searcher, monkeypatch: pytest.MonkeyPatch) -> None:
    """Packed sequences stay within PACK_POSITIONS (attention over one is quadratic in its length)."""
    from diffusionret.retrieval import cascade

    monkeypatch.setattr(cascade, "PACK_POSITIONS", 12)
    groups: list[tuple[int, int]] = []  # (texts, packed positions) of each tower call
    encode = searcher.model.encode_text

    def spy(ids: torch.Tensor, mask: torch.Tensor, **kwargs: bool) -> tuple[torch.Tensor, torch.Tensor]:
        groups.append((ids.shape[0], int(torch.clamp(mask.sum(dim=1) + 1, max=mask.shape[1]).sum())))
        return encode(ids, mask, **kwargs)

    queries = ["red", "a man is cooking pasta", "a dog runs", "man", "the car sings loudly", "dog"]
    ks = [3, 5, 2, 4, 1, 3]
    monkeypatch.setattr(searcher.model, "encode_text", spy)
    batch = searcher.search_batch(queries, ks)
    monkeypatch.undo()
    assert len(groups) > 1 and sum(texts for texts, _ in groups) == len(queries)
    assert all(positions <= 12 or texts == 1 for texts, positions in groups)
    _assert_same(batch, [searcher.search(q, k) for q, k in zip(queries, ks, strict=True)])
