"""The first stage of the search cascade: top-N over every video's pooled embedding.

Three implementations of one contract, ``search(queries (Nq, D), k) -> (scores (Nq, k), rows (Nq, k))``
sorted by descending inner product:

* :class:`ExactFirstStage` over float32 embeddings: one chunked matrix product (the reference).
* :class:`ExactFirstStage` over float16 embeddings: the same ranking of the *stored* fp16 vectors
  at half the memory traffic. A fast fp16 product shortlists candidates, which are re-scored in
  float32; a bound on the fp16 product's error decides how many candidates are needed, so the
  result is the exact float32 top-k of ``query @ pooled_fp16.float().T`` (see :func:`half_topk`).
* :class:`IvfFirstStage`: an inverted-file index (FAISS ``IndexIVFFlat``, inner product) that scans
  ``nprobe`` of its ``nlist`` clusters: approximate (recall < 1), but its returned scores are exact.
* :class:`PqFirstStage`: 4-bit product quantisation scanned with FAISS fast-scan
  (``IndexPQFastScan``, inner product, ``M`` sub-quantisers of ``D / M`` dimensions: ``M / 2``
  bytes per video) shortlists ``rescore * k`` rows, which are re-scored exactly against the pooled
  embeddings the index already holds in RAM: approximate (recall < 1), returned scores exact.

These two "ANN" structures are persisted in the index folder as ``<kind>-<content>.faiss``
(``ivf-...`` or ``pq-...``), where ``<content>`` is
:func:`content_fingerprint` of the rows it covers (model, dimension, and every video's id, shard
and shard row, in the loaded row order). Shards are immutable and uniquely named, so equal
fingerprints mean equal pooled vectors in the same rows; after ``index update`` the fingerprint
changes and the old file is simply not found (it is rebuilt by the update, or ignored). This module
only reads them: writing and deleting them is the index writer's job
(:func:`diffusionret.index.builder.refresh_ann`). FAISS is optional (``pip install 'diffusionret[ann]'``)
and imported only when an ANN index is used.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Indexes at least this large are "large": an ANN file is built for them (``index build``/``update``
# with ``--ann auto``), searched with it (``--first-stage auto``), and their exact path keeps fp16
# embeddings. Below it the exact fp32 product takes a few ms (2.4 ms at 10k, 21 ms at 100k).
LARGE_INDEX_VIDEOS = 100_000
ANN_SUFFIX = ".faiss"
# The persisted approximate structures; ``auto`` prefers them in this order (see FirstStageConfig).
ANN_KINDS: tuple[str, ...] = ("pq", "ivf")
# What ``index build``/``update`` write by default: on the 1M synthetic benchmark PQ fast-scan with
# exact re-scoring reached far higher recall@100 than IVF-Flat at a similar first-stage time
# (BENCHMARKS.md, "Search latency").
DEFAULT_ANN_KIND = "pq"
# PQ shortlist size per result: rescore * k rows are re-scored exactly. At 1M (synthetic, M = D/2)
# 10 gave recall@100 0.95 in 11 ms, 20 gave 0.99 in 13 ms: near-exact for 2 ms of a ~80 ms query.
DEFAULT_RESCORE = 20
# Database rows scored at once by the exact paths: bounds the (Nq, chunk) score buffer.
_SCORE_CHUNK = 65_536
# Extra fp16 candidates re-scored in float32 beyond k (the bound check widens it when needed).
_HALF_MARGIN = 64

FirstStageMethod = Literal["auto", "exact", "ivf", "pq"]
AnnKind = Literal["ivf", "pq"]
Precision = Literal["auto", "float32", "float16"]


class AnnUnavailableError(RuntimeError):
    """An ANN (IVF or PQ) first stage was requested but FAISS is not installed."""


@dataclass(frozen=True)
class FirstStageConfig:
    """How the first stage searches the pooled embeddings.

    Attributes:
        method: ``exact`` (always exact), ``ivf`` / ``pq`` (that ANN index; built in memory when
            the index folder has no up-to-date one, never written by a reader), or ``auto``: when the index has at
            least ``large_index`` videos and FAISS is installed, its up-to-date PQ file, else its
            up-to-date IVF file (``index build``/``update`` write one), exact otherwise.
        nprobe: IVF clusters scanned per query (more: higher recall, slower).
        rescore: PQ shortlist per result: ``rescore * k`` rows re-scored exactly (more: higher
            recall, slower).
        precision: storage of the exact path's embeddings: ``float32``, ``float16`` (half the
            memory traffic, same ranking of the stored fp16 vectors), or ``auto`` (fp16 for large
            indexes).
        large_index: the size from which ``auto`` means an ANN file / fp16.
    """

    method: FirstStageMethod = "auto"
    nprobe: int = 32
    precision: Precision = "auto"
    large_index: int = LARGE_INDEX_VIDEOS
    rescore: int = DEFAULT_RESCORE

    def __post_init__(self) -> None:
        if self.method not in ("auto", "exact", "ivf", "pq"):
            raise ValueError(f"method must be auto, exact, ivf or pq, got {self.method!r}")
        if self.rescore <= 0:
            raise ValueError(f"rescore must be positive, got {self.rescore}")
        if self.precision not in ("auto", "float32", "float16"):
            raise ValueError(f"precision must be auto, float32 or float16, got {self.precision!r}")
        if self.nprobe <= 0:
            raise ValueError(f"nprobe must be positive, got {self.nprobe}")
        if self.large_index < 0:
            raise ValueError(f"large_index must be >= 0, got {self.large_index}")


# ----------------------------------------------------------------------------------------- exact
class ExactFirstStage:
    """Exact maximum-inner-product search over ``pooled`` (float32 or float16 rows).

    Args:
        pooled: (N, D) float32 or float16 embeddings (kept by reference, not copied).
    """

    name = "exact"

    def __init__(self, pooled: Tensor) -> None:
        if pooled.dtype not in (torch.float32, torch.float16):
            raise TypeError(f"pooled embeddings must be float32 or float16, got {pooled.dtype}")
        self.pooled = pooled
        self._max_norm: float | None = None

    def describe(self) -> dict[str, Any]:
        return {"method": "exact", "precision": str(self.pooled.dtype).removeprefix("torch.")}

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(Nq, D) float32 queries -> ``scores`` (Nq, k) float32, ``rows`` (Nq, k) long, descending."""
        if self.pooled.dtype == torch.float32:
            return exact_topk(queries, self.pooled, k)
        if self._max_norm is None:
            self._max_norm = max_row_norm(self.pooled)
        return half_topk(queries, self.pooled, k, max_norm=self._max_norm)


def exact_topk(queries: Tensor, database: Tensor, k: int, chunk: int = _SCORE_CHUNK) -> tuple[Tensor, Tensor]:
    """Top-``k`` inner products of each query against every database row, in bounded memory.

    Args:
        queries: (Nq, D).
        database: (N, D), ``N >= k``.
        k: results per query.
        chunk: database rows scored at once.

    Returns:
        ``scores`` (Nq, k) and ``rows`` (Nq, k) long, sorted descending.
    """
    best_scores = torch.empty(queries.shape[0], 0, dtype=torch.float32)
    best_rows = torch.empty(queries.shape[0], 0, dtype=torch.long)
    for start in range(0, database.shape[0], chunk):
        scores = queries @ database[start:start + chunk].T  # (Nq, chunk)
        top_scores, top_rows = scores.topk(min(k, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, top_scores], dim=1)
        merged_rows = torch.cat([best_rows, top_rows + start], dim=1)
        best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_rows = merged_rows.gather(1, order)
    return best_scores, best_rows


def max_row_norm(database: Tensor, chunk: int = _SCORE_CHUNK) -> float:
    """Largest L2 norm of a row of ``database`` (N, D), in float32, chunk by chunk."""
    if database.shape[0] == 0:
        return 0.0
    return max(float(database[i:i + chunk].float().norm(dim=1).max()) for i in range(0, database.shape[0], chunk))


def half_product_error_bound(dim: int) -> float:
    """Bound on ``|fp16 product - float32 product|`` for unit queries and rows of norm <= 1.

    The fp16 pass rounds the query to fp16 (relative error <= 2^-11 per component, so at most
    2^-11 |q||v| on the product), accumulates in float32 (<= D 2^-24 |q||v|) and rounds the result
    to fp16 (<= 2^-11 |s| <= 2^-11 |q||v|); subnormal query components add at most D 2^-25. The
    sum is doubled as a safety margin. ``tests/test_index_first_stage.py`` checks the bound on the
    installed torch kernels.
    """
    return 2.0 * (2 * 2.0**-11 + dim * 2.0**-24 + dim * 2.0**-25)


def half_topk(queries: Tensor, database: Tensor, k: int, *, max_norm: float = 1.0) -> tuple[Tensor, Tensor]:
    """Exact float32 top-``k`` of ``queries @ database.float().T`` for a float16 ``database``.

    A float16 product (half the memory traffic of float32) scores every row approximately; the
    best ``k + 64`` are re-scored in float32. Every row outside the shortlist scores, in fp16, below
    the k-th re-scored value minus the fp16 error bound (:func:`half_product_error_bound`), so it
    cannot belong to the top k; when that does not hold, the shortlist grows to every row within
    the bound.

    Args:
        queries: (Nq, D) float32 (any norm; scaled to unit norm for the fp16 pass).
        database: (N, D) float16, ``N >= k``.
        k: results per query.
        max_norm: the largest row norm of ``database`` (see :func:`max_row_norm`).

    Returns:
        ``scores`` (Nq, k) float32 and ``rows`` (Nq, k) long, sorted descending.
    """
    n, dim = database.shape
    norms = queries.norm(dim=1).clamp_min(1e-30)
    unit = (queries / norms[:, None]).to(torch.float16)
    out_scores = torch.empty(queries.shape[0], k, dtype=torch.float32)
    out_rows = torch.empty(queries.shape[0], k, dtype=torch.long)
    # Scores of the unit query are within `tol` of the exact ones divided by |q|.
    tol = half_product_error_bound(dim) * max(max_norm, 1.0)
    for i in range(queries.shape[0]):
        # One product over all rows: its (N,) fp16 output is small, and chunking it measured slower.
        approx = (unit[i:i + 1] @ database.T)[0]
        shortlist = approx.topk(min(n, k + _HALF_MARGIN))
        rows = shortlist.indices
        exact = database[rows].float() @ queries[i]
        kth = float(exact.topk(k).values[-1]) / float(norms[i])
        if rows.numel() < n and float(shortlist.values[-1]) >= kth - tol:
            rows = (approx >= kth - tol).nonzero()[:, 0]
            exact = database[rows].float() @ queries[i]
        scores, order = exact.topk(k)
        out_scores[i], out_rows[i] = scores, rows[order]
    return out_scores, out_rows


# ------------------------------------------------------------------------------------- ANN files
def content_fingerprint(model_id: str, embed_dim: int, rows: Sequence[tuple[str, str, int]]) -> str:
    """Digest of what a first-stage structure over an index covers.

    Args:
        model_id: the index's model.
        embed_dim: D.
        rows: ``(video id, shard name, row in shard)`` of every video, in loaded row order.

    Returns:
        24 hex digits (sha256).
    """
    digest = hashlib.sha256(f"diffusionret-first-stage/1\n{model_id}\n{embed_dim}\n{len(rows)}\n".encode())
    digest.update("\n".join(f"{vid} {shard} {row}" for vid, shard, row in rows).encode())
    return digest.hexdigest()[:24]


def ann_path(root: Path, kind: str, fingerprint: str) -> Path:
    """``<root>/<kind>-<fingerprint>.faiss``."""
    if kind not in ANN_KINDS:
        raise ValueError(f"ANN kind must be one of {ANN_KINDS}, got {kind!r}")
    return Path(root) / f"{kind}-{fingerprint}{ANN_SUFFIX}"


def ann_files(root: Path, kinds: Sequence[str] = ANN_KINDS) -> list[Path]:
    """Every ANN file of ``kinds`` in an index folder (up to date or not)."""
    return sorted(p for kind in kinds for p in Path(root).glob(f"{kind}-*{ANN_SUFFIX}"))


def ivf_path(root: Path, fingerprint: str) -> Path:
    return ann_path(root, "ivf", fingerprint)


def ivf_files(root: Path) -> list[Path]:
    """Every IVF file in an index folder (up to date or not)."""
    return ann_files(root, ("ivf",))


# ------------------------------------------------------------------------------------------- IVF
def default_nlist(n: int) -> int:
    """IVF clusters for ``n`` vectors: the power of two nearest to sqrt(n) (1,024 at 1M), 1..65,536."""
    if n <= 1:
        return 1
    return int(min(65_536, max(1, 2 ** round(math.log2(math.sqrt(n))))))


def import_faiss() -> Any:
    """The ``faiss`` module, or :class:`AnnUnavailableError` with the install command."""
    try:
        import faiss
    except ImportError as exc:
        raise AnnUnavailableError(
            "the IVF/PQ first stage needs FAISS, which is not installed: pip install 'diffusionret[ann]' "
            "(or faiss-cpu); exact search works without it"
        ) from exc
    return faiss


class IvfFirstStage:
    """Approximate inner-product search with a FAISS ``IndexIVFFlat`` whose ids are index rows.

    Args:
        index: the FAISS index (metric inner product).
        fingerprint: :func:`content_fingerprint` of the rows it covers.
        nprobe: clusters scanned per query.
    """

    name = "ivf"

    def __init__(self, index: Any, fingerprint: str, nprobe: int = 32) -> None:
        self.index = index
        self.fingerprint = fingerprint
        self.nprobe = nprobe

    def describe(self) -> dict[str, Any]:
        return {"method": "ivf", "nlist": int(self.index.nlist), "nprobe": self.nprobe,
                "videos": int(self.index.ntotal), "fingerprint": self.fingerprint}

    @classmethod
    def build(cls, pooled: Tensor, fingerprint: str, *, nlist: int | None = None, nprobe: int = 32,
              train_per_list: int = 64, seed: int = 0) -> "IvfFirstStage":
        """Train the coarse quantiser (k-means) on a sample of ``pooled`` (N, D) and add every row.

        Args:
            pooled: (N, D) embeddings, float32 or float16 (row ``i`` gets id ``i``).
            fingerprint: what they are (:func:`content_fingerprint`).
            nlist: clusters (default :func:`default_nlist`), at most N.
            train_per_list: k-means training points per cluster (a seeded sample of the rows).
        """
        faiss = import_faiss()
        n, dim = pooled.shape
        if n == 0:
            raise ValueError("cannot build an IVF index over an empty index")
        nlist = min(n, nlist or default_nlist(n))
        start = time.perf_counter()
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = min(n, max(nlist * train_per_list, nlist))
        generator = torch.Generator().manual_seed(seed)
        train_rows = torch.randperm(n, generator=generator)[:sample].sort().values
        index.cp.seed = seed
        index.train(pooled[train_rows].float().contiguous().numpy())
        for lo in range(0, n, _SCORE_CHUNK):
            block = pooled[lo:lo + _SCORE_CHUNK].float().contiguous().numpy()
            index.add_with_ids(block, torch.arange(lo, lo + block.shape[0], dtype=torch.int64).numpy())
        logger.info("built IVF index: %d vectors, %d lists, %.1f s", n, nlist, time.perf_counter() - start)
        return cls(index, fingerprint, nprobe)

    @classmethod
    def load(cls, root: Path, fingerprint: str, *, expected_rows: int, embed_dim: int,
             nprobe: int = 32) -> "IvfFirstStage | None":
        """The IVF file for ``fingerprint`` in ``root``, or ``None`` when there is none (or it is unusable)."""
        index = _load_faiss(ann_path(root, cls.name, fingerprint), expected_rows, embed_dim)
        return None if index is None else cls(index, fingerprint, nprobe)

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(Nq, D) float32 queries -> ``scores`` (Nq, k) float32, ``rows`` (Nq, k) long, descending.

        When the probed clusters hold fewer than ``k`` vectors (FAISS pads with row -1), the query
        is repeated over every cluster, so ``k`` results always come back (``k <= N``).
        """
        faiss = import_faiss()
        # FAISS has its own OpenMP pool; follow torch's thread setting (e.g. serve --threads 1).
        faiss.omp_set_num_threads(torch.get_num_threads())
        scores, rows = self._search(queries, k, self.nprobe)
        short = (rows < 0).any(dim=1)
        if short.any():
            again = self._search(queries[short], k, int(self.index.nlist))
            scores[short], rows[short] = again
        return scores, rows

    def _search(self, queries: Tensor, k: int, nprobe: int) -> tuple[Tensor, Tensor]:
        faiss = import_faiss()
        params = faiss.SearchParametersIVF(nprobe=min(nprobe, int(self.index.nlist)))
        scores, rows = self.index.search(queries.contiguous().numpy(), k, params=params)
        return torch.from_numpy(scores), torch.from_numpy(rows).long()


def _load_faiss(path: Path, expected_rows: int, embed_dim: int) -> Any | None:
    """The FAISS index in ``path`` when it exists, reads and covers ``expected_rows`` x ``embed_dim``; else ``None``."""
    if not path.is_file():
        return None
    faiss = import_faiss()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:  # a damaged file is not trusted; it will be rebuilt
        logger.warning("ignoring unreadable ANN file %s: %s", path.name, exc)
        return None
    if index.ntotal != expected_rows or index.d != embed_dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        logger.warning("ignoring ANN file %s: it holds %d x %d vectors, the index %d x %d",
                       path.name, index.ntotal, index.d, expected_rows, embed_dim)
        return None
    return index


# -------------------------------------------------------------------------------------------- PQ
def default_pq_m(dim: int) -> int:
    """PQ sub-quantisers for ``dim``: ``dim / 2`` (2 dimensions each, 256 at D = 512), an even divisor of ``dim``.

    Fast-scan packs two 4-bit codes per byte, so an even ``M`` wastes nothing. On the 1M benchmark
    (BENCHMARKS.md) ``D / 2`` (128 B per video) reached recall@100 0.95-0.99 where ``D / 4`` (64 B)
    reached 0.55-0.76, for 1-3 ms more per query.
    """
    for m in range(max(1, dim // 2), 0, -1):
        if dim % m == 0 and (m % 2 == 0 or m == 1):
            return m
    return 1


#: FAISS fast-scan search implementation used by :class:`PqFirstStage` (see its constructor).
FAST_SCAN_IMPLEM = 15


class PqFirstStage:
    """PQ fast-scan shortlist (FAISS ``IndexPQFastScan``, 4 bits, inner product) re-scored exactly.

    Args:
        index: the FAISS index; its row ``i`` is index row ``i``.
        fingerprint: :func:`content_fingerprint` of the rows it covers.
        pooled: (N, D) float32 or float16 embeddings the shortlist is re-scored against (held by
            reference: the index's own pooled embeddings, so re-scoring costs no memory).
        rescore: shortlist size per result (``rescore * k`` rows, at most N).
    """

    name = "pq"

    def __init__(self, index: Any, fingerprint: str, pooled: Tensor, rescore: int = DEFAULT_RESCORE) -> None:
        if pooled.shape[0] != index.ntotal or pooled.shape[1] != index.d:
            raise ValueError(f"PQ index of {index.ntotal} x {index.d} over {tuple(pooled.shape)} embeddings")
        self.index = index
        self.fingerprint = fingerprint
        self.pooled = pooled
        self.rescore = rescore
        # Fast-scan implementation 15 (no query blocking, reservoir of the best distances) instead of
        # FAISS's choice: the shortlist is long (rescore * k rows, 2,000 for k = 100), which a reservoir
        # keeps cheaper than a heap. At 1M rows, 1 thread: 4 queries 14.7-18.9 ms instead of 21.3-23.5,
        # 8 queries 36.9 instead of 43.3, 1 query 5.7 instead of 5.4; the same shortlists, rows and
        # scores on 256 queries (BENCHMARKS.md, search under concurrency).
        if hasattr(index, "implem"):
            index.implem = FAST_SCAN_IMPLEM

    def describe(self) -> dict[str, Any]:
        return {"method": "pq", "m": int(self.index.M), "nbits": int(self.index.nbits), "rescore": self.rescore,
                "videos": int(self.index.ntotal), "fingerprint": self.fingerprint}

    @classmethod
    def build(cls, pooled: Tensor, fingerprint: str, *, m: int | None = None, rescore: int = DEFAULT_RESCORE,
              train_size: int = 65_536, seed: int = 0) -> "PqFirstStage":
        """Train the sub-quantisers (k-means, 16 centroids each) on a sample of ``pooled`` (N, D) and add every row.

        Args:
            pooled: (N, D) embeddings, float32 or float16 (row ``i`` gets id ``i``); kept for re-scoring.
            fingerprint: what they are (:func:`content_fingerprint`).
            m: sub-quantisers (default :func:`default_pq_m`); must divide D.
            train_size: training rows (a seeded sample).
        """
        faiss = import_faiss()
        n, dim = pooled.shape
        if n == 0:
            raise ValueError("cannot build a PQ index over an empty index")
        m = m or default_pq_m(dim)
        if dim % m:
            raise ValueError(f"PQ sub-quantisers must divide the dimension {dim}, got {m}")
        start = time.perf_counter()
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexPQFastScan(dim, m, 4, faiss.METRIC_INNER_PRODUCT)
        generator = torch.Generator().manual_seed(seed)
        train_rows = torch.randperm(n, generator=generator)[:min(n, train_size)].sort().values
        index.pq.cp.seed = seed
        index.train(pooled[train_rows].float().contiguous().numpy())
        for lo in range(0, n, _SCORE_CHUNK):
            index.add(pooled[lo:lo + _SCORE_CHUNK].float().contiguous().numpy())
        logger.info("built PQ index: %d vectors, M=%d x 4 bits, %.1f s", n, m, time.perf_counter() - start)
        return cls(index, fingerprint, pooled, rescore)

    @classmethod
    def load(cls, root: Path, fingerprint: str, *, pooled: Tensor, rescore: int = DEFAULT_RESCORE,
             ) -> "PqFirstStage | None":
        """The PQ file for ``fingerprint`` in ``root`` over ``pooled`` (N, D), or ``None`` (none, or unusable)."""
        index = _load_faiss(ann_path(root, cls.name, fingerprint), pooled.shape[0], pooled.shape[1])
        return None if index is None else cls(index, fingerprint, pooled, rescore)

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(Nq, D) float32 queries -> ``scores`` (Nq, k) float32, ``rows`` (Nq, k) long, descending.

        The scores are the exact ``queries @ pooled.float().T`` of the returned rows; only the
        shortlist is approximate.
        """
        faiss = import_faiss()
        faiss.omp_set_num_threads(torch.get_num_threads())
        n = int(self.index.ntotal)
        shortlist = min(n, max(k, self.rescore * k))
        _, rows = self.index.search(queries.contiguous().numpy(), shortlist)
        rows = torch.from_numpy(rows).long()  # (Nq, R); a flat index never pads with -1 when R <= N
        out_scores = torch.empty(queries.shape[0], k, dtype=torch.float32)
        out_rows = torch.empty(queries.shape[0], k, dtype=torch.long)
        # Each query's shortlist is gathered (index_select: 2-3x faster than advanced indexing) into
        # one float32 buffer reused by every query of the call (a fresh (R, D) tensor per query
        # faulted its pages in again); the same float32 rows and product, so the same scores.
        gathered = torch.empty(shortlist, self.pooled.shape[1], dtype=self.pooled.dtype)
        exact_rows = gathered if self.pooled.dtype == torch.float32 else torch.empty(gathered.shape)
        for i in range(queries.shape[0]):
            torch.index_select(self.pooled, 0, rows[i], out=gathered)
            if exact_rows is not gathered:
                exact_rows.copy_(gathered)  # float16 -> float32, exact as .float()
            exact = exact_rows @ queries[i]  # (R,)
            scores, order = exact.topk(k)
            out_scores[i], out_rows[i] = scores, rows[i][order]
        return out_scores, out_rows
