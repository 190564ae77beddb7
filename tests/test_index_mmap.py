"""A loaded index maps its frame features from the shards: same values as in RAM, checked shards,
updates that never disturb an open index, old indexes still searchable."""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from diffusionret.index import catalog
from diffusionret.index.builder import build_index, update_index
from diffusionret.index.first_stage import FirstStageConfig
from diffusionret.index.frame_store import InMemoryFrames, MappedFrames
from diffusionret.index.shards import SHARD_DIR, ShardFormatError
from diffusionret.index.store import VideoIndex
from diffusionret.safetensors_mmap import mmap_tensors
from diffusionret.testing.index import SyntheticExtractor
from helpers import make_videos

LEGACY_INDEX = Path(__file__).parent / "data" / "refactor_golden" / "legacy_index"


def in_ram_copy(index: VideoIndex) -> VideoIndex:
    """The same index with every row's features read into RAM straight from the shard files (safetensors'
    own reader), as the index loaded before it mapped them."""
    shards = {name: load_file(index.root / SHARD_DIR / name) for name in {r.shard for r in index.records}}
    rows = [(shards[r.shard], r.row) for r in index.records]
    frames = torch.stack([s["frames"][i] for s, i in rows])
    mask = torch.stack([s["frame_mask"][i].bool() for s, i in rows])
    pooled = torch.stack([s["pooled"][i] for s, i in rows])
    has = [("frame_weights" in s) for s, _ in rows]
    weights = torch.stack([s["frame_weights"][i] if "frame_weights" in s else torch.zeros(mask.shape[1])
                           for s, i in rows]) if any(has) else None
    return VideoIndex(index.root, index.info, index.records, frames, mask, pooled, frame_weights=weights,
                      weights_known=torch.tensor(has) if any(has) else None)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mmap")
    make_videos(root / "videos", 23)
    build_index(root / "idx", root / "videos", SyntheticExtractor(frames=5, dim=16, with_weights=True),
                shard_size=4, progress=False)
    return root / "idx"


def test_load_maps_frames_and_keeps_pooled_in_ram(built: Path) -> None:
    index = VideoIndex.load(built)
    assert isinstance(index.frame_store, MappedFrames) and len(index.frame_store.shards) > 1
    assert index.pooled.dtype == torch.float32  # small index: the exact fp32 first stage, unchanged
    assert VideoIndex.load(built, pooled_precision="float16").pooled.dtype == torch.float16


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.integers(0, 22), min_size=0, max_size=30))
def test_mapped_gather_equals_in_ram_gather(built: Path, rows: list[int]) -> None:
    mapped = VideoIndex.load(built)
    ram = in_ram_copy(mapped)
    selected = torch.tensor(rows, dtype=torch.long)
    for a, b in zip(mapped.gather(selected), ram.gather(selected), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    a, b = mapped.gather_weights(selected), ram.gather_weights(selected)
    assert a is not None and b is not None and torch.equal(a, b)
    assert torch.equal(mapped.pooled, ram.pooled)


def test_mapped_search_equals_in_ram_search(built: Path) -> None:
    mapped = VideoIndex.load(built)
    ram = in_ram_copy(mapped)
    queries = torch.nn.functional.normalize(torch.randn(7, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    for config in (FirstStageConfig(method="exact", precision="float32"),
                   FirstStageConfig(method="exact", precision="float16")):
        for a, b in zip(mapped.search(queries, 9, stage=mapped.open_first_stage(config)),
                        ram.search(queries, 9, stage=ram.open_first_stage(config)), strict=True):
            assert torch.equal(a, b)


def test_float16_pooled_index_reads_float32_originals_for_an_exact_float32_stage(built: Path) -> None:
    half = VideoIndex.load(built, pooled_precision="float16")
    full = VideoIndex.load(built)
    stage = half.open_first_stage(FirstStageConfig(method="exact", precision="float32"))
    assert stage.pooled.dtype == torch.float32 and torch.equal(stage.pooled, full.pooled)
    assert torch.equal(half.pooled, full.pooled.half())


# ------------------------------------------------------------------------------ damaged shards
def damaged_copy(built: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the index and the path of its first shard (to damage)."""
    root = tmp_path / "idx"
    shutil.copytree(built, root)
    shard = sorted((root / SHARD_DIR).glob("*.safetensors"))[0]
    return root, shard


def test_truncated_shard_is_an_error_at_load_naming_the_file(built: Path, tmp_path: Path) -> None:
    root, shard = damaged_copy(built, tmp_path)
    with open(shard, "r+b") as handle:  # cut into the tensor bytes (the frames live near the end)
        handle.truncate(shard.stat().st_size - 100)
    with pytest.raises(ShardFormatError, match=rf"{shard.name}.*truncated"):
        VideoIndex.load(root)


@pytest.mark.parametrize("damage", ["garbage header", "short file", "header length too large"])
def test_corrupt_shard_header_is_an_error_naming_the_file(built: Path, tmp_path: Path, damage: str) -> None:
    root, shard = damaged_copy(built, tmp_path)
    data = shard.read_bytes()
    if damage == "garbage header":
        data = data[:8] + b"\xff" * 40 + data[48:]
    elif damage == "short file":
        data = data[:5]
    else:
        data = struct.pack("<Q", len(data) * 2) + data[8:]
    shard.write_bytes(data)
    with pytest.raises(ShardFormatError, match=shard.name):
        VideoIndex.load(root)


def rewrite_tensor(shard: Path, name: str, value: torch.Tensor | None) -> None:
    """Rewrite ``shard`` with tensor ``name`` replaced (or dropped when ``value`` is None), metadata kept."""
    tensors = load_file(shard)
    header_len = struct.unpack("<Q", shard.read_bytes()[:8])[0]
    metadata = json.loads(shard.read_bytes()[8:8 + header_len])["__metadata__"]
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value.contiguous()
    save_file(tensors, shard, metadata=metadata)


@pytest.mark.parametrize("name, value, message", [
    ("frames", lambda t: t[:-1], "shape"),  # one row short of what the catalogue registered
    ("frames", lambda t: t.float(), "dtype"),
    ("frame_mask", lambda t: t[:, :-1], "shape"),
    ("pooled", lambda t: t[:, :8], "shape"),
    ("frame_mask", None, "no 'frame_mask'"),
])
def test_shard_not_matching_the_catalogue_is_an_error_naming_the_file(built: Path, tmp_path: Path, name: str,
                                                                      value, message: str) -> None:
    root, shard = damaged_copy(built, tmp_path)
    rewrite_tensor(shard, name, None if value is None else value(load_file(shard)[name]))
    with pytest.raises(ShardFormatError, match=rf"{shard.name}.*{message}"):
        VideoIndex.load(root)


# ---------------------------------------------------------------------------- updates, old indexes
def test_update_replacing_shards_keeps_an_open_mapped_index_readable(tmp_path: Path) -> None:
    videos = make_videos(tmp_path / "videos", 9)
    extractor = SyntheticExtractor(frames=5, dim=16, with_weights=True)
    build_index(tmp_path / "idx", tmp_path / "videos", extractor, shard_size=4, progress=False)
    index = VideoIndex.load(tmp_path / "idx")
    rows = torch.arange(len(index))
    before = index.gather(rows), index.gather_weights(rows)
    old_shards = set((tmp_path / "idx" / SHARD_DIR).iterdir())
    # Change every file: the update re-encodes them all, compaction retires (unlinks) every old shard
    # and writes new ones under new names (temp + rename).
    for path in videos:
        path.write_bytes(path.read_bytes() + b" changed")
    make_videos(tmp_path / "videos", 3, start=9)
    update_index(tmp_path / "idx", extractor, shard_size=4, progress=False)
    assert not old_shards & set((tmp_path / "idx" / SHARD_DIR).iterdir())  # the mapped files are gone by name
    # The open index still reads what it mapped: an unlinked (or renamed-over) file's inode lives
    # on while a process maps it, and shards are never modified in place.
    after = index.gather(rows), index.gather_weights(rows)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0], strict=True))
    assert torch.equal(before[1], after[1])
    reloaded = VideoIndex.load(tmp_path / "idx")
    assert len(reloaded) == 12 and not torch.equal(reloaded.gather(rows[:9])[0], before[0][0])


def test_index_built_by_old_code_is_searchable(tmp_path: Path) -> None:
    """The golden legacy index, written before segments existed (no ``segments`` table)."""
    root = tmp_path / "legacy"
    shutil.copytree(LEGACY_INDEX, root)
    with contextlib.closing(catalog.connect(root, readonly=True)) as conn:
        assert not catalog.has_segments_table(conn)
    index = VideoIndex.load(root)
    ram = in_ram_copy(index)
    rows = torch.arange(len(index)).flip(0)
    assert all(torch.equal(a, b) for a, b in zip(index.gather(rows), ram.gather(rows), strict=True))
    assert torch.equal(index.gather_weights(rows), ram.gather_weights(rows))
    queries = torch.nn.functional.normalize(
        torch.randn(3, index.info.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert all(torch.equal(a, b) for a, b in zip(index.search(queries, 5), ram.search(queries, 5), strict=True))


def test_a_shard_mixing_old_and_new_rows_keeps_weights_per_shard(built: Path, tmp_path: Path) -> None:
    root, shard = damaged_copy(built, tmp_path)
    rewrite_tensor(shard, "frame_weights", None)  # as written before weights were stored
    index = VideoIndex.load(root)
    ram = in_ram_copy(index)
    assert torch.equal(index.weights_known, ram.weights_known) and not bool(index.weights_known.all())
    old = next(i for i, r in enumerate(index.records) if r.shard == shard.name)
    new = next(i for i, r in enumerate(index.records) if r.shard != shard.name)
    assert index.gather_weights(torch.tensor([old, new])) is None
    assert torch.equal(index.gather_weights(torch.tensor([new])), ram.gather_weights(torch.tensor([new])))
    for other in sorted((root / SHARD_DIR).glob("*.safetensors"))[1:]:
        rewrite_tensor(other, "frame_weights", None)
    none = VideoIndex.load(root)  # every shard from before weights were stored
    assert none.weights_known is None and none.frame_weights is None
    assert none.gather_weights(torch.tensor([0])) is None
    assert torch.equal(none.gather(torch.tensor([old, new]))[0], ram.gather(torch.tensor([old, new]))[0])


# ------------------------------------------------------------------------------ the map helper
@pytest.mark.parametrize("order", [["a", "b", "c"], ["c", "b", "a"]])
def test_mmap_tensors_equals_load_file_aligned_or_not(tmp_path: Path, order: list[str]) -> None:
    from diffusionret.safetensors_mmap import write_streamed

    values = {"a": torch.arange(6, dtype=torch.uint8).reshape(2, 3), "b": torch.randn(3, 4).half(),
              "c": torch.randn(2, 5)}
    # write_streamed keeps the given order: after the 6 bytes of "a", "c" (float32) starts at byte 30,
    # not a multiple of 4, and is mapped on its own; in the other order everything is aligned.
    path = write_streamed(tmp_path / "x.safetensors", {k: [values[k]] for k in order}, {}, lambda _n, t: t)
    mapped = mmap_tensors(path)
    for name, value in load_file(path).items():
        assert mapped[name].dtype == value.dtype and torch.equal(mapped[name], value)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 8), max_size=20), st.integers(0, 2**31 - 1))
def test_in_memory_rows_equal_indexing(rows, seed):
    """InMemoryFrames hands back exactly ``tensor[rows]`` (repeats, any order, none at all)."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(9, 3, 4, generator=g).half()
    mask, weights = torch.rand(9, 3, generator=g) > 0.3, torch.rand(9, 3, generator=g)
    known = torch.rand(9, generator=g) > 0.5
    store, index = InMemoryFrames(frames, mask, weights, known), torch.tensor(rows, dtype=torch.long)
    got = (*store.stored(index), *store.stored_weights(index))
    expected = (frames[index], mask[index], weights[index], known[index])
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, expected, strict=True))
