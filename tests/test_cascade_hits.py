"""The cascade's hit lists against a straightforward element-by-element reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusionret.retrieval.cascade import Hit, _hits


@dataclass(frozen=True)
class _Record:
    id: str


class _Store:
    def record(self, row: int) -> _Record:
        assert type(row) is int
        return _Record(f"v{row}")


def _reference_hits(final, wti, coarse, rows, store, *, k, top_k) -> list[Hit]:
    """One hit at a time, every value read with float()/int() of a tensor element."""
    wti_order = torch.sort(wti, descending=True, stable=True).indices
    wti_rank = torch.empty_like(wti_order)
    wti_rank[wti_order] = torch.arange(1, wti_order.numel() + 1)
    order = torch.sort(final, descending=True, stable=True).indices[:k]
    hits = []
    for rank, position in enumerate(order.tolist(), start=1):
        stages = {} if coarse is None else {"coarse": float(coarse[position])}
        stages["wti"] = float(wti[position])
        if top_k > 0 and rank <= top_k:
            stages["rerank"] = float(final[position])
        hits.append(Hit(rank=rank, score=float(final[position]), record=store.record(int(rows[position])),
                        stage_scores=stages, wti_rank=int(wti_rank[position])))
    return hits


def _same(a: list[Hit], b: list[Hit]) -> bool:
    """Equal hits, with every number of the same Python type (so bit-identical floats)."""
    def flat(hit: Hit) -> list:
        return [hit.rank, hit.score, hit.record, list(hit.stage_scores.items()), hit.wti_rank, hit.start, hit.end]
    return len(a) == len(b) and all(
        flat(x) == flat(y) and [type(v) for v in flat(x)] == [type(v) for v in flat(y)] for x, y in zip(a, b))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 50), top_k=st.integers(0, 40), ties=st.booleans(),
       with_coarse=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_hits_equal_the_element_by_element_reference(n, k, top_k, ties, with_coarse, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    wti = torch.randn(n, generator=g)
    if ties:  # few distinct values: the stable sorts' tie order matters
        wti = torch.randint(0, 3, (n,), generator=g).float() / 7
    final = wti.clone()
    top = torch.sort(wti, descending=True, stable=True).indices[:top_k]
    final[top] += torch.rand(top.numel(), generator=g)
    final, wti = final.to(dtype), wti.to(dtype)
    coarse = torch.randn(n, generator=g).to(dtype) if with_coarse else None
    rows = torch.randperm(1000, generator=g)[:n]
    store = _Store()
    got = _hits(final, wti, coarse, rows, store, k=k, top_k=top_k)
    assert _same(got, _reference_hits(final, wti, coarse, rows, store, k=k, top_k=top_k))
    assert [h.rank for h in got] == list(range(1, min(k, n) + 1))
