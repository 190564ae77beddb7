"""The first stage of the cascade: exact fp32 / fp16 search against brute force, the IVF and PQ files
(FAISS) and their freshness across ``index update``, stored WTI frame weights, and running without FAISS.

Indexes come from :class:`diffusionret.testing.index.SyntheticExtractor` (no model).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffusionret.index.ann_build import AnnBuildConfig
from diffusionret.index.builder import build_index, update_index
from diffusionret.index.features import pool_frames
from diffusionret.index.first_stage import (
    AnnUnavailableError,
    ExactFirstStage,
    FirstStageConfig,
    PqFirstStage,
    ann_files,
    ann_path,
    default_pq_m,
    exact_topk,
    half_product_error_bound,
    half_topk,
    ivf_files,
    ivf_path,
    max_row_norm,
)
from diffusionret.index.store import VideoIndex
from diffusionret.testing.index import SyntheticExtractor
from helpers import make_videos, require_faiss

ON = AnnBuildConfig(mode="on", nlist=4, kind="ivf")
PQ_ON = AnnBuildConfig(mode="on", kind="pq")


def _queries(count: int, dim: int, seed: int = 1) -> torch.Tensor:
    return F.normalize(torch.randn(count, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _build(tmp_path: Path, count: int = 37, ann: AnnBuildConfig | None = None, **kwargs) -> Path:
    make_videos(tmp_path / "videos", count)
    extractor = SyntheticExtractor(frames=5, dim=24, **kwargs)
    build_index(tmp_path / "idx", tmp_path / "videos", extractor, shard_size=6, progress=False, ann=ann)
    return tmp_path / "idx"


@pytest.fixture
def no_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import faiss`` fail, as on a machine without the ``ann`` extra."""
    monkeypatch.setitem(sys.modules, "faiss", None)


# ------------------------------------------------------------------------------------ exact fp16
def test_half_product_error_is_within_the_bound() -> None:
    """The fp16 kernel of this torch build accumulates precisely enough for :func:`half_topk`'s bound."""
    generator = torch.Generator().manual_seed(0)
    for dim in (24, 512):
        database = F.normalize(torch.randn(20_000, dim, generator=generator), dim=-1).half()
        queries = _queries(8, dim)
        approx = (queries.half() @ database.T).float()
        exact = (queries.double() @ database.double().T).float()
        assert float((approx - exact).abs().max()) <= half_product_error_bound(dim) / 2


def test_half_topk_is_the_exact_top_k_of_the_stored_fp16_vectors() -> None:
    generator = torch.Generator().manual_seed(2)
    database = F.normalize(torch.randn(5_000, 64, generator=generator), dim=-1)
    # Near-ties closer than the fp16 resolution, so the shortlist must widen to stay exact.
    database[100:400] = database[7] + 1e-4 * torch.randn(300, 64, generator=generator)
    database = F.normalize(database, dim=-1).half()
    queries = torch.cat([_queries(5, 64), database[7:8].float() * 3.0, torch.zeros(1, 64)])  # any norm, even 0
    for k in (1, 10, 100, 350):
        scores, rows = half_topk(queries, database, k, max_norm=max_row_norm(database))
        brute = queries @ database.float().T
        expected = brute.topk(k, dim=1).values
        torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-6)
        # The returned rows are a top k of the brute force (rows may differ only between exact ties).
        torch.testing.assert_close(brute.gather(1, rows), expected, rtol=1e-6, atol=1e-6)
        assert all(len(set(r.tolist())) == k for r in rows)


def test_index_search_equals_brute_force_in_each_precision(tmp_path: Path) -> None:
    index = VideoIndex.load(_build(tmp_path))
    queries = _queries(6, 24)
    for precision, stored in (("float32", index.pooled), ("float16", index.pooled.half().float())):
        stage = index.configure_first_stage(FirstStageConfig(method="exact", precision=precision))
        assert isinstance(stage, ExactFirstStage) and stage.describe()["precision"] == precision
        brute = queries @ stored.T  # the same stored precision, scored in float32
        for k in (1, 5, 37, 100):
            scores, rows = index.search(queries, k)
            expected_scores, expected_rows = brute.topk(min(k, 37), dim=1)
            assert torch.equal(rows, expected_rows)
            torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-6)


def test_auto_precision_follows_the_size_threshold(tmp_path: Path, no_faiss: None) -> None:
    index = VideoIndex.load(_build(tmp_path, count=8))
    assert index.configure_first_stage().describe() == {"method": "exact", "precision": "float32"}
    large = index.configure_first_stage(FirstStageConfig(large_index=8))
    assert large.describe() == {"method": "exact", "precision": "float16"}


# -------------------------------------------------------------------------------------------- IVF
def test_ivf_file_is_built_named_by_content_and_searched(tmp_path: Path) -> None:
    require_faiss()
    root = _build(tmp_path, ann=ON)
    index = VideoIndex.load(root)
    assert [p.name for p in ivf_files(root)] == [ivf_path(root, index.content_fingerprint).name]
    # auto uses the file for a "large" index; scanning every list it is exact.
    stage = index.configure_first_stage(FirstStageConfig(large_index=10, nprobe=4))
    assert stage.describe()["method"] == "ivf" and stage.describe()["nlist"] == 4
    queries = _queries(6, 24)
    brute = queries @ index.pooled.T
    for k in (1, 10, 37):
        scores, rows = index.search(queries, k)
        expected_scores, expected_rows = brute.topk(k, dim=1)
        assert torch.equal(rows, expected_rows)
        torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5)
    # Probing fewer lists is approximate, but every score is the row's exact score, never a row -1.
    index.configure_first_stage(FirstStageConfig(method="ivf", nprobe=1))
    scores, rows = index.search(queries, 30)
    assert rows.shape == (6, 30) and bool((rows >= 0).all())
    torch.testing.assert_close(scores, brute.gather(1, rows), rtol=0, atol=1e-5)
    # Small indexes stay exact under auto even when a file exists.
    assert index.configure_first_stage(FirstStageConfig()).describe()["method"] == "exact"


def _update_replaces_the_ann_file(tmp_path: Path, ann: AnnBuildConfig, kind: str):
    """Build with ``ann``, add 3 videos and update: the update's file replaces the old one.

    Returns ``(root, updated index, old file, its bytes, new file)``.
    """
    require_faiss()
    root = _build(tmp_path, ann=ann)
    (old_file,) = ann_files(root)
    old_bytes = old_file.read_bytes()
    make_videos(tmp_path / "videos" / "more", 3, start=200)
    update_index(root, SyntheticExtractor(frames=5, dim=24), shard_size=6, progress=False, ann=ann)
    index = VideoIndex.load(root)
    (new_file,) = ann_files(root)  # the stale file was deleted by the update
    assert new_file != old_file and new_file == ann_path(root, kind, index.content_fingerprint)
    return root, index, old_file, old_bytes, new_file


def test_stale_ivf_file_is_replaced_by_update_and_never_used(tmp_path: Path) -> None:
    root, index, old_file, old_bytes, new_file = _update_replaces_the_ann_file(tmp_path, ON, "ivf")
    assert new_file == ivf_path(root, index.content_fingerprint)

    # A stale file (e.g. restored from a backup of the old contents) is never picked up.
    old_file.write_bytes(old_bytes)
    config = FirstStageConfig(large_index=0, nprobe=4)
    assert index.configure_first_stage(config).describe()["videos"] == len(index) == 40
    new_file.unlink()
    fresh = VideoIndex.load(root)
    assert fresh.configure_first_stage(config).describe() == {"method": "exact", "precision": "float16"}
    # Forcing IVF builds it in memory only: a reader never writes to the index folder.
    built = fresh.configure_first_stage(FirstStageConfig(method="ivf", nprobe=64))
    assert built.describe()["videos"] == 40 and ivf_files(root) == [old_file]
    assert built.fingerprint == fresh.content_fingerprint


def test_ivf_off_and_auto_threshold(tmp_path: Path) -> None:
    require_faiss()
    root = _build(tmp_path, ann=AnnBuildConfig(mode="auto", min_videos=1_000))
    assert ivf_files(root) == []  # below the threshold
    update_index(root, SyntheticExtractor(frames=5, dim=24), progress=False,
                 ann=AnnBuildConfig(mode="auto", min_videos=30, nlist=2, kind="ivf"))
    assert len(ivf_files(root)) == 1
    update_index(root, SyntheticExtractor(frames=5, dim=24), progress=False, ann=AnnBuildConfig(mode="off"))
    assert ivf_files(root) == []


def test_a_file_for_another_index_size_is_ignored(tmp_path: Path) -> None:
    faiss = require_faiss()
    root = _build(tmp_path)
    index = VideoIndex.load(root)
    # Same name (fingerprint) but the wrong number of vectors: ignored, not trusted.
    wrong = faiss.IndexIVFFlat(faiss.IndexFlatIP(24), 24, 1, faiss.METRIC_INNER_PRODUCT)
    wrong.train(torch.randn(50, 24).numpy())
    wrong.add(torch.randn(5, 24).numpy())
    faiss.write_index(wrong, str(ivf_path(root, index.content_fingerprint)))
    assert index.configure_first_stage(FirstStageConfig(large_index=0)).describe()["method"] == "exact"


# --------------------------------------------------------------------------------------------- PQ
def _clustered(n: int, dim: int, clusters: int, seed: int = 0) -> torch.Tensor:
    """(n, dim) unit vectors around ``clusters`` random centres, like real embeddings (not isotropic)."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, dim, generator=generator), dim=-1)
    members = torch.randint(clusters, (n,), generator=generator)
    return F.normalize(centres[members] + 0.05 * torch.randn(n, dim, generator=generator), dim=-1)


def test_default_pq_m_divides_the_dimension() -> None:
    assert default_pq_m(512) == 256 and default_pq_m(24) == 12 and default_pq_m(768) == 384
    assert all(dim % default_pq_m(dim) == 0 for dim in (2, 6, 10, 24, 30, 64, 100, 1024))


def test_pq_recall_is_high_and_scores_are_exact() -> None:
    require_faiss()
    pooled = _clustered(20_000, 64, clusters=200)
    stage = PqFirstStage.build(pooled, "f" * 24, m=16, rescore=10)  # 4 bits: 8 bytes per vector
    assert stage.describe()["m"] == 16 and stage.index.ntotal == 20_000
    generator = torch.Generator().manual_seed(3)
    # Queries near the data (as a text embedding is near its videos) and isotropic ones.
    queries = torch.cat([F.normalize(pooled[torch.randint(20_000, (20,), generator=generator)]
                                     + 0.2 * torch.randn(20, 64, generator=generator), dim=-1), _queries(10, 64)])
    k = 100
    _, expected_rows = exact_topk(queries, pooled, k)
    scores, rows = stage.search(queries, k)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(rows, expected_rows, strict=True)) / rows.numel()
    assert recall >= 0.9, recall
    # Exact re-scoring: each returned score is the row's exact score, sorted, no duplicates.
    torch.testing.assert_close(scores, (pooled[rows] @ queries[:, :, None])[..., 0], rtol=0, atol=1e-6)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all()) and all(len(set(r.tolist())) == k for r in rows)
    # A longer shortlist can only find better rows (the k-th score never drops).
    stage.rescore = 30
    wider, _ = stage.search(queries, k)
    assert bool((wider[:, -1] >= scores[:, -1] - 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pq_rescoring_equals_the_row_by_row_form(dtype: torch.dtype) -> None:
    """The re-scoring (one reused gather buffer) returns exactly ``pooled[rows].float() @ q`` and its top k."""
    require_faiss()
    pooled = _clustered(3_000, 32, clusters=40).to(dtype)
    stage = PqFirstStage.build(pooled, "f" * 24, m=8, rescore=7)
    queries = _queries(6, 32)
    k = 25
    scores, rows = stage.search(queries, k)
    _, shortlist = stage.index.search(queries.numpy(), 7 * k)
    for i, candidates in enumerate(torch.from_numpy(shortlist).long()):
        expected_scores, order = (pooled[candidates].float() @ queries[i]).topk(k)
        assert torch.equal(scores[i], expected_scores) and torch.equal(rows[i], candidates[order])


def test_pq_reservoir_scan_finds_what_faiss_default_scan_finds() -> None:
    """The fast-scan implementation PqFirstStage picks gives the shortlist of FAISS's own choice."""
    require_faiss()
    from diffusionret.index.first_stage import FAST_SCAN_IMPLEM

    pooled = _clustered(20_000, 32, clusters=60)
    stage = PqFirstStage.build(pooled, "f" * 24, m=8, rescore=20)
    assert stage.index.implem == FAST_SCAN_IMPLEM
    for n in (1, 3, 8):
        queries = _queries(n, 32)
        scores, rows = stage.search(queries, 50)
        short_d, short_rows = stage.index.search(queries.numpy(), 1_000)
        stage.index.implem = 0  # FAISS chooses
        try:
            default_scores, default_rows = stage.search(queries, 50)
            default_d, default_short = stage.index.search(queries.numpy(), 1_000)
        finally:
            stage.index.implem = FAST_SCAN_IMPLEM
        assert torch.equal(scores, default_scores) and torch.equal(rows, default_rows)
        for mine, theirs in zip(short_rows, default_short, strict=True):
            assert set(mine.tolist()) == set(theirs.tolist())


def test_pq_file_is_built_named_by_content_and_searched(tmp_path: Path) -> None:
    require_faiss()
    root = _build(tmp_path, ann=PQ_ON)
    index = VideoIndex.load(root)
    assert [p.name for p in ann_files(root)] == [ann_path(root, "pq", index.content_fingerprint).name]
    assert ivf_files(root) == []
    stage = index.configure_first_stage(FirstStageConfig(large_index=10))  # auto uses it for a "large" index
    assert stage.describe()["method"] == "pq" and stage.describe()["m"] == 12
    queries = _queries(6, 24)
    brute = queries @ index.pooled.T
    # The shortlist covers every row (rescore * k >= 37): exact.
    scores, rows = index.search(queries, 10)
    expected_scores, expected_rows = brute.topk(10, dim=1)
    assert torch.equal(rows, expected_rows)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-6)
    # A short list is approximate, but scores are the rows' exact ones.
    index.configure_first_stage(FirstStageConfig(method="pq", rescore=1))
    scores, rows = index.search(queries, 5)
    torch.testing.assert_close(scores, brute.gather(1, rows), rtol=0, atol=1e-6)
    # With both files up to date, auto prefers PQ; small indexes stay exact.
    update_index(root, SyntheticExtractor(frames=5, dim=24), shard_size=6, progress=False, ann=ON)
    assert len(ann_files(root)) == 2  # the up-to-date PQ file is kept
    fresh = VideoIndex.load(root)
    assert fresh.configure_first_stage(FirstStageConfig(large_index=10)).describe()["method"] == "pq"
    assert fresh.configure_first_stage(FirstStageConfig(method="ivf", nprobe=4)).describe()["method"] == "ivf"
    assert fresh.configure_first_stage(FirstStageConfig()).describe()["method"] == "exact"


def test_stale_pq_file_is_replaced_by_update_and_never_used(tmp_path: Path) -> None:
    root, index, old_file, old_bytes, new_file = _update_replaces_the_ann_file(tmp_path, PQ_ON, "pq")
    old_file.write_bytes(old_bytes)  # a stale file (e.g. restored from a backup) is never used
    config = FirstStageConfig(large_index=0)
    assert index.configure_first_stage(config).describe()["videos"] == len(index) == 40
    new_file.unlink()
    fresh = VideoIndex.load(root)
    assert fresh.configure_first_stage(config).describe() == {"method": "exact", "precision": "float16"}
    # Forcing PQ builds it in memory only (the folder is unchanged); an update writes it and drops the stale one.
    built = fresh.configure_first_stage(FirstStageConfig(method="pq"))
    assert built.describe()["videos"] == 40 and ann_files(root) == [old_file]
    update_index(root, SyntheticExtractor(frames=5, dim=24), shard_size=6, progress=False, ann=PQ_ON)
    assert ann_files(root) == [new_file]
    # A PQ file of the right name but the wrong size is ignored.
    faiss = require_faiss()
    wrong = faiss.IndexPQFastScan(24, 12, 4, faiss.METRIC_INNER_PRODUCT)
    wrong.train(torch.randn(100, 24).numpy())
    wrong.add(torch.randn(5, 24).numpy())
    faiss.write_index(wrong, str(new_file))
    assert VideoIndex.load(root).configure_first_stage(config).describe()["method"] == "exact"
    # Switching ANN files off deletes it.
    update_index(root, SyntheticExtractor(frames=5, dim=24), progress=False, ann=AnnBuildConfig(mode="off"))
    assert ann_files(root) == []


# ---------------------------------------------------------------------------------- without FAISS
def test_exact_search_works_without_faiss(tmp_path: Path, no_faiss: None) -> None:
    index = VideoIndex.load(_build(tmp_path))
    stage = index.configure_first_stage(FirstStageConfig(large_index=0))  # auto, "large", no FAISS
    assert stage.describe()["method"] == "exact"
    for method in ("ivf", "pq"):
        with pytest.raises(AnnUnavailableError, match=r"pip install 'diffusionret\[ann\]'"):
            index.configure_first_stage(FirstStageConfig(method=method))


def test_forced_ivf_build_without_faiss_fails_before_encoding(tmp_path: Path, no_faiss: None) -> None:
    make_videos(tmp_path / "videos", 3)
    with pytest.raises(AnnUnavailableError):
        build_index(tmp_path / "idx", tmp_path / "videos", SyntheticExtractor(), progress=False, ann=ON)
    assert not (tmp_path / "idx" / "shards").exists()
    # auto goes on without it.
    report = build_index(tmp_path / "idx", tmp_path / "videos", SyntheticExtractor(), progress=False,
                         ann=AnnBuildConfig(mode="auto", min_videos=1))
    assert report.total == 3 and ivf_files(tmp_path / "idx") == []


# --------------------------------------------------------------------------------- frame weights
def test_frame_weights_are_stored_and_survive_compaction(tmp_path: Path) -> None:
    extractor = SyntheticExtractor(frames=5, dim=24, with_weights=True)
    root = _build(tmp_path, with_weights=True)
    index = VideoIndex.load(root)
    assert index.frame_weights is not None and bool(index.weights_known.all())
    expected = extractor.frame_weights(index.frames, index.frame_mask)
    torch.testing.assert_close(index.frame_weights, expected, rtol=0, atol=1e-6)
    assert torch.equal(index.gather_weights(torch.tensor([3, 1])), index.frame_weights[[3, 1]])
    # Removing files leaves holes; compaction rewrites shards and keeps the weights.
    for path in sorted((tmp_path / "videos").rglob("*.mp4"))[::4]:
        path.unlink()
    update_index(root, extractor, shard_size=6, progress=False, prune=True)  # 10 of 37: on purpose
    after = VideoIndex.load(root)
    assert len(after) < len(index) and after.frame_weights is not None and bool(after.weights_known.all())
    torch.testing.assert_close(after.frame_weights, extractor.frame_weights(after.frames, after.frame_mask),
                               rtol=0, atol=1e-6)


def test_index_without_weights_and_mixed_index(tmp_path: Path) -> None:
    root = _build(tmp_path, count=8)  # an "old" index: the extractor stores no weights
    index = VideoIndex.load(root)
    assert index.frame_weights is None and index.gather_weights(torch.tensor([0])) is None
    # New videos encoded by an extractor that stores weights: only their rows have them.
    make_videos(tmp_path / "videos" / "new", 6, start=50)
    update_index(root, SyntheticExtractor(frames=5, dim=24, with_weights=True), shard_size=6, progress=False)
    mixed = VideoIndex.load(root)
    known = mixed.weights_known
    assert known is not None and 0 < int(known.sum()) < len(mixed)
    old_row, new_row = int((~known).nonzero()[0]), int(known.nonzero()[0])
    assert mixed.gather_weights(torch.tensor([new_row])) is not None
    assert mixed.gather_weights(torch.tensor([new_row, old_row])) is None  # computed at query time instead


def test_pooled_embeddings_follow_from_the_stored_frames(tmp_path: Path) -> None:
    index = VideoIndex.load(_build(tmp_path, count=5))
    torch.testing.assert_close(index.pooled, pool_frames(index.frames, index.frame_mask))


def test_ivf_file_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing leaves no file under the final name and no temp file behind."""
    faiss = require_faiss()
    root = _build(tmp_path)

    def broken_write(index_obj, path):  # writes part of a file, then fails
        Path(path).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        update_index(root, SyntheticExtractor(frames=5, dim=24), progress=False, ann=ON)
    assert ivf_files(root) == [] and not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    index = VideoIndex.load(root)  # the index itself is intact, and a reader can still build IVF in memory
    index.configure_first_stage(FirstStageConfig(method="ivf", nprobe=2))
    assert index.search(_queries(1, 24), 3)[1].shape == (1, 3) and ivf_files(root) == []
