"""Retrieval metric tests: naive-loop oracles, hand-computed reference counting, multi-caption, properties."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from diffusionret.evaluation import metrics as metrics_module
from diffusionret.evaluation.metrics import (
    format_table,
    multi_caption_metrics,
    retrieval_metrics,
    t2v_v2t_metrics,
)

TIES = ("optimistic", "pessimistic", "mean", "reference")
KS = (1, 2, 3, 5, 10, 50)


# ----------------------------------------------------------------------------------------------------------
# Naive oracles: one Python loop per query, written independently of the vectorised implementation.
# ----------------------------------------------------------------------------------------------------------


def naive_rank(row: list[float], positive: set[int], ties: str) -> float:
    """1-based rank of the best positive by sorting; ties placed per policy, 'mean' by enumeration."""
    row = [-math.inf if math.isnan(x) else x for x in row]
    if ties == "optimistic":
        order = sorted(range(len(row)), key=lambda c: (-row[c], c not in positive))
        return 1 + next(i for i, c in enumerate(order) if c in positive)
    if ties == "pessimistic":
        order = sorted(range(len(row)), key=lambda c: (-row[c], c in positive))
        return 1 + next(i for i, c in enumerate(order) if c in positive)
    # mean: average over every placement of the tied positives inside the tied block
    best = max(row[c] for c in positive)
    ahead = sum(x > best for x in row)
    tied_pos = sum(row[c] == best for c in positive)
    tied = sum(x == best for x in row)
    firsts = [min(slots) for slots in itertools.combinations(range(tied), tied_pos)]
    return ahead + 1 + sum(firsts) / len(firsts)


def naive_metrics(sim: np.ndarray, positives: list[set[int]], ties: str, ks=KS) -> dict:
    if ties == "reference":
        # compute_metrics as described in docs/reference.md §3.4: sort each negated row, every column where
        # sorted - negated target == 0 is an entry (0-based rank).
        entries = []
        with np.errstate(invalid="ignore"):
            for q, pos in enumerate(positives):
                (target,) = pos
                negated = np.sort(-sim[q])
                entries += [j for j, v in enumerate(negated) if v - (-sim[q, target]) == 0]
        entries = np.array(entries, dtype=np.float64)
        out = {f"R{k}": 100.0 * np.mean(entries < k) for k in ks}
        out.update(MedianR=float(np.median(entries)) + 1, MeanR=float(np.mean(entries)) + 1)
        return out
    ranks = np.array([naive_rank(list(sim[q]), pos, ties) for q, pos in enumerate(positives)], dtype=np.float64)
    out = {f"R{k}": 100.0 * np.mean(ranks <= k) for k in ks}
    out.update(MedianR=float(np.median(ranks)), MeanR=float(np.mean(ranks)))
    return out


def assert_metrics_close(got: dict, want: dict) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-9), (key, got, want)


def random_scores(rng: np.random.Generator, shape: tuple[int, int], with_ties: bool) -> np.ndarray:
    if with_ties:
        return rng.integers(0, 4, size=shape).astype(np.float32)  # many exact ties
    return rng.standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Oracle tests
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("with_ties", [False, True])
def test_diagonal_matches_naive_loop(ties, with_ties):
    rng = np.random.default_rng(0)
    for trial in range(15):
        n = int(rng.integers(1, 12))
        sim = random_scores(rng, (n, n), with_ties)
        got = retrieval_metrics(sim, ties=ties, ks=KS)
        assert_metrics_close(got, naive_metrics(sim, [{q} for q in range(n)], ties))


def random_problems(rng: np.random.Generator, max_queries: int, with_ties: bool, trials: int = 15):
    """``trials`` random (queries, candidates, scores) problems: up to ``max_queries - 1`` x 8."""
    for _ in range(trials):
        nq, nc = int(rng.integers(1, max_queries)), int(rng.integers(1, 9))
        yield nq, nc, random_scores(rng, (nq, nc), with_ties)


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("with_ties", [False, True])
def test_query_to_target_matches_naive_loop(ties, with_ties):
    rng = np.random.default_rng(1)
    for nq, nc, sim in random_problems(rng, 15, with_ties):
        target = rng.integers(0, nc, size=nq)
        got = retrieval_metrics(sim, query_to_target=target, ties=ties, ks=KS)
        assert_metrics_close(got, naive_metrics(sim, [{int(t)} for t in target], ties))
        assert got["num_queries"] == nq


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic", "mean"])
@pytest.mark.parametrize("with_ties", [False, True])
def test_positive_mask_matches_naive_loop(ties, with_ties):
    rng = np.random.default_rng(2)
    for nq, nc, sim in random_problems(rng, 10, with_ties):
        positives = rng.random((nq, nc)) < 0.3
        positives[np.arange(nq), rng.integers(0, nc, size=nq)] = True
        got = retrieval_metrics(sim, positives=positives, ties=ties, ks=KS)
        want = naive_metrics(sim, [set(np.flatnonzero(p).tolist()) for p in positives], ties)
        assert_metrics_close(got, want)


@pytest.mark.parametrize("ties", TIES)
def test_nan_and_inf_match_naive_loop(ties):
    rng = np.random.default_rng(3)
    for trial in range(20):
        n = int(rng.integers(2, 10))
        sim = random_scores(rng, (n, n), with_ties=bool(trial % 2))
        special = rng.random((n, n))
        sim[special < 0.1] = np.nan
        sim[(special >= 0.1) & (special < 0.15)] = np.inf
        sim[(special >= 0.15) & (special < 0.2)] = -np.inf
        sim[0, 0] = 1.0  # keep at least one finite target so 'reference' has something to rank
        got = retrieval_metrics(sim, ties=ties, ks=KS)
        kept = [{q} for q in range(n) if ties != "reference" or np.isfinite(sim[q, q])]
        sub = sim if ties != "reference" else sim[[next(iter(p)) for p in kept]]
        assert_metrics_close(got, naive_metrics(sub, kept, ties))
        assert got["num_queries"] == len(kept)


@pytest.mark.parametrize("ties", TIES)
def test_chunked_equals_single_block(ties, monkeypatch):
    rng = np.random.default_rng(4)
    sim = random_scores(rng, (23, 11), with_ties=True)
    sim[rng.random(sim.shape) < 0.05] = np.nan
    target = rng.integers(0, 11, size=23)
    sim[np.arange(23), target] = np.where(np.isnan(sim[np.arange(23), target]), 0.0, sim[np.arange(23), target])
    whole = retrieval_metrics(sim, query_to_target=target, ties=ties)
    monkeypatch.setattr(metrics_module, "_MAX_CHUNK_ELEMENTS", 7)  # 1-row blocks with 11 candidates
    assert retrieval_metrics(sim, query_to_target=target, ties=ties) == whole
    monkeypatch.setattr(metrics_module, "_MAX_CHUNK_ELEMENTS", 50)  # 4-row blocks, last one partial
    assert retrieval_metrics(sim, query_to_target=target, ties=ties) == whole


# ----------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ----------------------------------------------------------------------------------------------------------

# row 0: target 3 ties with column 1                  -> g=0, t=2 (reference entries 0, 1)
# row 1: target 1 is the unique maximum               -> g=0, t=1 (entry 0)
# row 2: target NaN                                   -> dropped by 'reference'; -inf elsewhere (rank 4)
# row 3: three candidates above the target            -> g=3, t=1 (entry 3)
HAND = np.array(
    [
        [3.0, 3.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, np.nan, 0.0],
        [9.0, 9.0, 9.0, 1.0],
    ],
    dtype=np.float32,
)


def test_reference_counting_hand_computed():
    got = retrieval_metrics(HAND, ties="reference", ks=(1, 2, 5))
    # entries [0, 1, 0, 3]: 4 entries from 3 queries; sorted [0, 0, 1, 3] -> median (0 + 1) / 2 = 0.5
    assert got == {
        "R1": 50.0,
        "R2": 75.0,
        "R5": 100.0,
        "MedianR": 1.5,
        "MeanR": 2.0,
        "num_queries": 3,
        "num_entries": 4,
    }


@pytest.mark.parametrize(
    ("ties", "expected"),
    [
        # ranks [1, 1, 4, 4]
        ("optimistic", {"R1": 50.0, "R2": 50.0, "R5": 100.0, "MedianR": 2.5, "MeanR": 2.5}),
        # ranks [2, 1, 4, 4]
        ("pessimistic", {"R1": 25.0, "R2": 50.0, "R5": 100.0, "MedianR": 3.0, "MeanR": 2.75}),
        # ranks [1.5, 1, 4, 4]
        ("mean", {"R1": 25.0, "R2": 50.0, "R5": 100.0, "MedianR": 2.75, "MeanR": 2.625}),
    ],
)
def test_tie_policies_hand_computed(ties, expected):
    got = retrieval_metrics(HAND, ties=ties, ks=(1, 2, 5))
    assert got == {**expected, "num_queries": 4, "num_entries": 4}


def test_reference_duplicate_columns_enlarge_denominator():
    """docs/reference.md §8.7: duplicated captions give identical v2t columns, so two queries count twice each."""
    rng = np.random.default_rng(5)
    v2t = rng.standard_normal((6, 6)).astype(np.float32)
    v2t[:, 4] = v2t[:, 1]  # captions 1 and 4 are the same sentence
    got = retrieval_metrics(v2t, ties="reference")
    assert got["num_queries"] == 6
    assert got["num_entries"] == 8  # rows 1 and 4 each tie their target with the duplicate column
    assert retrieval_metrics(v2t)["num_entries"] == 6


def test_reference_constant_matrix_is_not_materialised():
    n = 2000  # 4M entries: every column ties with every target
    got = retrieval_metrics(np.zeros((n, n), dtype=np.float32), ties="reference")
    assert got["num_entries"] == n * n
    assert got["R1"] == pytest.approx(100.0 / n)
    assert got["R50"] == pytest.approx(100.0 * 50 / n)
    assert got["MedianR"] == pytest.approx((n - 1) / 2 + 1)
    assert got["MeanR"] == pytest.approx((n - 1) / 2 + 1)


def test_perfect_diagonal():
    sim = np.eye(7) + 0.01 * np.random.default_rng(6).random((7, 7))
    sim[np.arange(7), np.arange(7)] += 1.0
    for ties in TIES:
        got = retrieval_metrics(sim, ties=ties)
        assert (got["R1"], got["MedianR"], got["MeanR"]) == (100.0, 1.0, 1.0)
    assert retrieval_metrics(np.eye(7), ties="pessimistic")["R1"] == 100.0


def test_worst_rank_and_fully_tied():
    for ties in TIES:  # every other candidate strictly better: rank 5 whatever the tie policy
        got = retrieval_metrics(1.0 - np.eye(5), ties=ties, ks=(1, 4, 5))
        assert (got["R1"], got["R4"], got["R5"], got["MedianR"], got["MeanR"]) == (0.0, 0.0, 100.0, 5.0, 5.0)
    tied = np.zeros((5, 5))
    expected = {"optimistic": (100.0, 100.0, 1.0), "mean": (0.0, 100.0, 3.0), "pessimistic": (0.0, 0.0, 5.0)}
    for ties, (r1, r3, rank) in expected.items():
        got = retrieval_metrics(tied, ties=ties, ks=(1, 3))
        assert (got["R1"], got["R3"], got["MedianR"], got["MeanR"]) == (r1, r3, rank, rank)


# ----------------------------------------------------------------------------------------------------------
# Inputs, outputs, validation
# ----------------------------------------------------------------------------------------------------------


def test_numpy_torch_and_dtypes_agree():
    rng = np.random.default_rng(7)
    sim = rng.integers(0, 5, size=(9, 9))
    target = rng.integers(0, 9, size=9)
    for ties in TIES:
        want = retrieval_metrics(sim.astype(np.float64), query_to_target=target, ties=ties)
        for variant in (sim, torch.from_numpy(sim).float(), torch.from_numpy(sim).half(), sim.astype(np.float32)):
            assert retrieval_metrics(variant, query_to_target=torch.from_numpy(target), ties=ties) == want
        assert retrieval_metrics(sim.tolist(), query_to_target=target.tolist(), ties=ties) == want


# torch warns (once per process) that a read-only array becomes a tensor it could write to; we only read.
@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_read_only_and_strided_numpy_inputs():
    rng = np.random.default_rng(8)
    sim = rng.standard_normal((6, 6))
    want = retrieval_metrics(sim[:, ::-1].copy(), query_to_target=np.arange(6)[::-1].copy())
    assert retrieval_metrics(sim[:, ::-1], query_to_target=np.arange(6)[::-1]) == want
    frozen = sim.copy()
    frozen.flags.writeable = False
    assert retrieval_metrics(frozen) == retrieval_metrics(sim)
    tensor = torch.from_numpy(sim).requires_grad_()
    assert retrieval_metrics(tensor) == retrieval_metrics(sim)


def test_results_are_json_builtins():
    result = t2v_v2t_metrics(np.random.default_rng(9).standard_normal((5, 5)))
    json.dumps(result)
    for metrics in result.values():
        for key, value in metrics.items():
            assert type(value) is (int if key.startswith("num_") else float), (key, type(value))
    assert list(result["t2v"]) == ["R1", "R5", "R10", "R50", "MedianR", "MeanR", "num_queries", "num_entries"]


def test_t2v_v2t_metrics_directions():
    sim = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    got = t2v_v2t_metrics(sim, ks=(1,))
    assert got["t2v"]["R1"] == pytest.approx(100 / 3)  # rows: only query 1 is right
    assert got["v2t"]["R1"] == pytest.approx(100 / 3)  # columns: only query 0 is right
    assert got["v2t"] == retrieval_metrics(sim.T, ks=(1,))
    separate = t2v_v2t_metrics(sim, np.eye(3), ks=(1,))
    assert separate["t2v"] == got["t2v"] and separate["v2t"]["R1"] == 100.0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"sim": np.zeros((2, 3))}, ValueError),  # not square, no ground truth
        ({"sim": np.zeros(3)}, ValueError),
        ({"sim": np.zeros((0, 0))}, ValueError),
        ({"sim": np.zeros((2, 2)), "ties": "random"}, ValueError),
        ({"sim": np.zeros((2, 2)), "ks": ()}, ValueError),
        ({"sim": np.zeros((2, 2)), "ks": (0, 1)}, ValueError),
        ({"sim": np.zeros((2, 2)), "ks": (1, 1)}, ValueError),
        ({"sim": np.zeros((2, 2)), "ks": (1.5,)}, ValueError),
        ({"sim": np.zeros((2, 3)), "query_to_target": np.array([0.0, 1.0])}, TypeError),
        ({"sim": np.zeros((2, 3)), "query_to_target": np.array([0, 3])}, ValueError),
        ({"sim": np.zeros((2, 3)), "query_to_target": np.array([0, -1])}, ValueError),
        ({"sim": np.zeros((2, 3)), "query_to_target": np.array([0, 1, 2])}, ValueError),
        ({"sim": np.zeros((2, 3)), "positives": np.ones((2, 3), dtype=np.int64)}, TypeError),
        ({"sim": np.zeros((2, 3)), "positives": np.array([[1, 0, 0], [0, 0, 0]], dtype=bool)}, ValueError),
        ({"sim": np.zeros((2, 3)), "positives": np.ones((2, 3), dtype=bool), "ties": "reference"}, ValueError),
        ({"sim": np.zeros((2, 2)), "positives": np.eye(2, dtype=bool), "query_to_target": [0, 1]}, ValueError),
        ({"sim": np.full((2, 2), np.nan), "ties": "reference"}, ValueError),  # every query dropped
        ({"sim": np.zeros((2, 2), dtype=np.complex64)}, TypeError),
    ],
)
def test_validation(kwargs, error):
    sim = kwargs.pop("sim")
    with pytest.raises(error):
        retrieval_metrics(sim, **kwargs)


def test_nan_warning_is_logged(caplog):
    sim = np.eye(3)
    sim[0, 1] = np.nan
    with caplog.at_level("WARNING", logger="diffusionret.evaluation.metrics"):
        assert retrieval_metrics(sim)["R1"] == 100.0
    assert "1 NaN" in caplog.text


def test_large_matrix_is_fast_enough():
    # Guards against an accidental per-query Python loop (which would take minutes here).
    sim = torch.randn(2000, 2000, generator=torch.Generator().manual_seed(0))
    for ties in TIES:
        got = retrieval_metrics(sim, ties=ties)
        assert 0.0 <= got["R1"] <= 100.0 and got["num_queries"] == 2000


def test_format_table():
    results = {
        "t2v": {"R1": 44.25, "R5": 70.0, "MedianR": 2.0, "MeanR": 12.345, "num_queries": 1000},
        "v2t": {"R1": 5.0, "R5": 100.0, "MedianR": 10.5, "MeanR": 1.0, "num_queries": 7},
    }
    assert format_table(results) == (
        "       R1     R5  MedianR  MeanR  num_queries\n"
        "t2v  44.2   70.0      2.0   12.3         1000\n"
        "v2t   5.0  100.0     10.5    1.0            7"
    )
    # A single metrics dict has no row-name column.
    assert format_table(results["v2t"], precision=2).splitlines() == [
        "  R1      R5  MedianR  MeanR  num_queries",
        "5.00  100.00    10.50   1.00            7",
    ]
    assert format_table({}) == ""
    assert format_table({"t2v": {"R1": 1.0}, "v2t": {"R5": 2}}).splitlines() == [
        "      R1  R5",
        "t2v  1.0",
        "v2t        2",
    ]


# ----------------------------------------------------------------------------------------------------------
# Multi-caption (MSVD-style)
# ----------------------------------------------------------------------------------------------------------

# captions 0, 1 -> video 0; caption 2 -> video 1; captions 3, 4, 5 -> video 2
CAPTION_TO_VIDEO = np.array([0, 0, 1, 2, 2, 2])
MULTI_SIM = np.array(
    [
        [0.9, 0.45, 0.2],  # own video 0: rank 1
        [0.3, 0.5, 0.1],  # own video 0: rank 2
        [0.2, 0.4, 0.6],  # own video 1: rank 2
        [0.1, 0.2, 0.8],  # own video 2: rank 1
        [0.7, 0.6, 0.5],  # own video 2: rank 3
        [0.0, 0.3, 0.2],  # own video 2: rank 2
    ]
)


def test_multi_caption_hand_computed():
    got = multi_caption_metrics(MULTI_SIM, CAPTION_TO_VIDEO, ks=(1, 2, 3))
    # t2v ranks [1, 2, 2, 1, 3, 2]
    assert got["t2v"] == pytest.approx(
        {"R1": 100 / 3, "R2": 500 / 6, "R3": 100.0, "MedianR": 2.0, "MeanR": 11 / 6}
        | {"num_queries": 6, "num_entries": 6}
    )
    # v2t over caption sets (best caption per set):
    #   video 0: sets (.9, .2, .7) -> 1;  video 1: sets (.5, .4, .6) -> 3;  video 2: sets (.2, .6, .8) -> 1
    assert got["v2t"] == pytest.approx(
        {"R1": 200 / 3, "R2": 200 / 3, "R3": 100.0, "MedianR": 1.0, "MeanR": 5 / 3, "num_queries": 3, "num_entries": 3}
    )
    # v2t over individual captions: video 1's own caption (.4) is beaten by captions 0 (.45), 1 (.5), 4 (.6)
    got = multi_caption_metrics(MULTI_SIM, CAPTION_TO_VIDEO, ks=(1, 2, 3), v2t_candidates="captions")
    assert got["v2t"] == pytest.approx(
        {"R1": 200 / 3, "R2": 200 / 3, "R3": 200 / 3, "MedianR": 1.0, "MeanR": 2.0, "num_queries": 3, "num_entries": 3}
    )


def test_multi_caption_grouping_ignores_caption_order():
    """Groups come from caption_to_video: the reference's positional off-by-one (docs/reference.md §3.5) cannot happen."""
    perm = np.random.default_rng(10).permutation(len(CAPTION_TO_VIDEO))
    for mode in ("videos", "captions"):
        want = multi_caption_metrics(MULTI_SIM, CAPTION_TO_VIDEO, v2t_candidates=mode)
        assert multi_caption_metrics(MULTI_SIM[perm], CAPTION_TO_VIDEO[perm], v2t_candidates=mode) == want


def test_multi_caption_one_caption_per_video_equals_t2v_v2t():
    sim = np.random.default_rng(11).standard_normal((6, 6))
    for ties in TIES:
        want = t2v_v2t_metrics(sim, ties=ties)
        assert multi_caption_metrics(sim, np.arange(6), ties=ties) == want
        assert multi_caption_metrics(sim, np.arange(6), ties=ties, v2t_candidates="captions") == want


def naive_multi_v2t(sim_t2v: np.ndarray, c2v: np.ndarray, ties: str, mode: str) -> dict:
    videos = sorted(set(c2v.tolist()))
    if mode == "captions":
        rows = np.array([sim_t2v[:, v] for v in videos])
        return naive_metrics(rows, [set(np.flatnonzero(c2v == v).tolist()) for v in videos], ties)
    # rows: query videos, columns: caption sets, entry = best caption score with NaN as -inf
    clean = np.where(np.isnan(sim_t2v), -np.inf, sim_t2v)
    sets = np.array([[max(clean[c, j] for c in np.flatnonzero(c2v == k)) for k in videos] for j in videos])
    return naive_metrics(sets, [{i} for i in range(len(videos))], ties)


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("mode", ["videos", "captions"])
def test_multi_caption_matches_naive_loop(ties, mode):
    rng = np.random.default_rng(12)
    for trial in range(10):
        num_videos = int(rng.integers(1, 6))
        c2v = rng.integers(0, num_videos, size=int(rng.integers(1, 12)))
        sim = random_scores(rng, (len(c2v), num_videos), with_ties=bool(trial % 2))
        if mode == "captions" and ties == "reference" and np.bincount(c2v).max() > 1:
            with pytest.raises(ValueError):
                multi_caption_metrics(sim, c2v, ties=ties, v2t_candidates=mode)
            continue
        got = multi_caption_metrics(sim, c2v, ties=ties, ks=KS, v2t_candidates=mode)
        assert_metrics_close(got["t2v"], naive_metrics(sim, [{int(v)} for v in c2v], ties))
        assert_metrics_close(got["v2t"], naive_multi_v2t(sim, c2v, ties, mode))
        assert got["v2t"]["num_queries"] <= len(set(c2v.tolist()))


def test_multi_caption_separate_v2t_matrix_and_uncaptioned_video():
    rng = np.random.default_rng(13)
    c2v = np.array([0, 0, 1, 3, 3])  # video 2 has no caption
    sim_t2v = rng.standard_normal((5, 4))
    other = rng.standard_normal((5, 4))
    got = multi_caption_metrics(sim_t2v, c2v, sim_v2t=other.T)
    assert got["t2v"] == multi_caption_metrics(sim_t2v, c2v)["t2v"]
    assert got["v2t"] == multi_caption_metrics(other, c2v)["v2t"]
    assert got["t2v"]["num_queries"] == 5 and got["v2t"]["num_queries"] == 3
    with pytest.raises(ValueError):
        multi_caption_metrics(sim_t2v, c2v, sim_v2t=other)  # wrong orientation
    with pytest.raises(ValueError):
        multi_caption_metrics(sim_t2v, np.array([0, 0, 1, 4, 3]))
    with pytest.raises(ValueError):
        multi_caption_metrics(sim_t2v, c2v, v2t_candidates="sets")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------------


@st.composite
def scored_queries(draw):
    nq = draw(st.integers(1, 8))
    nc = draw(st.integers(1, 8))
    elements = draw(
        st.sampled_from(
            [st.integers(-2, 2).map(float), st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32)]
        )
    )
    sim = draw(hnp.arrays(np.float32, (nq, nc), elements=elements))
    target = np.array(draw(st.lists(st.integers(0, nc - 1), min_size=nq, max_size=nq)))
    return sim, target


@settings(max_examples=60, deadline=None)
@given(data=scored_queries(), ties=st.sampled_from(TIES))
def test_recall_monotone_and_bounds(data, ties):
    sim, target = data
    nc = sim.shape[1]
    got = retrieval_metrics(sim, query_to_target=target, ties=ties, ks=(*KS, nc) if nc not in KS else KS)
    recalls = [got[f"R{k}"] for k in KS]
    assert all(a <= b for a, b in zip(recalls, recalls[1:]))
    assert got[f"R{nc}"] == 100.0
    assert 1.0 <= got["MedianR"] <= nc and 1.0 <= got["MeanR"] <= nc
    assert 0.0 <= got["R1"] <= 100.0


@settings(max_examples=60, deadline=None)
@given(data=scored_queries(), ties=st.sampled_from(TIES), seed=st.integers(0, 2**16))
def test_invariant_to_permuting_candidates_and_queries(data, ties, seed):
    sim, target = data
    rng = np.random.default_rng(seed)
    column_perm = rng.permutation(sim.shape[1])  # new column j holds old column column_perm[j]
    row_perm = rng.permutation(sim.shape[0])
    new_position = np.argsort(column_perm)  # old column c is now at new_position[c]
    permuted = sim[row_perm][:, column_perm]
    want = retrieval_metrics(sim, query_to_target=target, ties=ties, ks=KS)
    got = retrieval_metrics(permuted, query_to_target=new_position[target[row_perm]], ties=ties, ks=KS)
    assert_metrics_close(got, want)


@settings(max_examples=60, deadline=None)
@given(data=scored_queries())
def test_tie_policies_are_ordered(data):
    sim, target = data
    opt, mean, pess = (
        retrieval_metrics(sim, query_to_target=target, ties=t, ks=KS) for t in ("optimistic", "mean", "pessimistic")
    )
    for k in KS:
        assert opt[f"R{k}"] >= mean[f"R{k}"] >= pess[f"R{k}"]
    assert opt["MeanR"] <= mean["MeanR"] <= pess["MeanR"]
    assert mean["MeanR"] == pytest.approx((opt["MeanR"] + pess["MeanR"]) / 2)  # one target per query
    assert opt["MedianR"] <= mean["MedianR"] <= pess["MedianR"]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 10), seed=st.integers(0, 2**16), ties=st.sampled_from(TIES))
def test_dominant_diagonal_is_perfect(n, seed, ties):
    sim = np.random.default_rng(seed).random((n, n)) + 2.0 * np.eye(n)
    got = retrieval_metrics(sim, ties=ties)
    assert (got["R1"], got["MedianR"], got["MeanR"]) == (100.0, 1.0, 1.0)
