"""The dataset: items, padding, multi-caption grouping, views, the bad-input policy, loaders and seeding."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from diffusionret.data import (
    ClipTransform,
    MissingVideosError,
    TrainTransform,
    VideoDecodeError,
    VideoTextDataset,
    VideoTextPair,
    collate,
    read_frames,
    read_skip_report,
    require_complete,
    video_key,
    worker_init_fn,
)
from diffusionret.testing.videos import read_index, write_index_video

L, T, S = 8, 4, 48


def fake_tokenize(texts, max_words):
    """A stand-in tokenizer: id 1 + one id per word (its length), then 2 as "EOT"; zero padded."""
    ids = torch.zeros(len(texts), max_words, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, text in enumerate(texts):
        words = [1, *(len(w) + 10 for w in text.split())][: max_words - 1] + [2]
        ids[row, : len(words)] = torch.tensor(words)
        mask[row, : len(words)] = 1
    return ids, mask


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    write_index_video(root / "a.mp4", 25, fps=10)  # 2.5 s -> 5 targets at 2 fps
    write_index_video(root / "b.mp4", 10, fps=10)  # 1 s -> 2 targets: padded
    write_index_video(root / "c.mp4", 30, fps=10)  # clipped to [1, 2.5)
    (root / "broken.mp4").write_bytes(b"definitely not a video")
    records = [
        VideoTextPair("a", "a first caption of a", root / "a.mp4"),
        VideoTextPair("b", "only caption of b", root / "b.mp4"),
        VideoTextPair("a", "second caption of a", root / "a.mp4"),
        VideoTextPair("c#t=1,2.5", "a clip of c", root / "c.mp4", start=1.0, end=2.5),
    ]
    bad = [
        VideoTextPair("broken", "a broken file", root / "broken.mp4"),
        VideoTextPair("gone", "a missing file", root / "gone.mp4"),
    ]
    return {"root": root, "records": records, "bad": bad}


def make(records, **kwargs) -> VideoTextDataset:
    options = {"tokenizer": fake_tokenize, "max_words": L, "max_frames": T, "fps": 2.0, "size": S}
    options.update(kwargs)
    return VideoTextDataset(records, **options)


def test_item_layout_and_values(corpus):
    ds = make(corpus["records"])
    assert len(ds) == 4
    item = ds[0]
    assert set(item) == {"text_ids", "text_mask", "frames", "frame_mask", "video_id", "video_key", "video_index",
                         "index", "caption_index"}
    assert item["text_ids"].shape == (L,) and item["text_ids"].dtype == torch.long
    assert item["text_ids"].tolist() == [1, 11, 15, 17, 12, 11, 2, 0] and item["text_mask"].sum() == 7
    assert item["frames"].shape == (T, 3, S, S) and item["frames"].dtype == torch.float32
    assert item["frame_mask"].tolist() == [1, 1, 1, 1] and item["frame_mask"].dtype == torch.long
    assert (item["video_id"], item["video_index"], item["index"], item["caption_index"]) == ("a", 0, 0, 0)
    assert item["video_key"] == video_key("a")
    # The frames are the decoder's frames through the CLIP transform: 5 targets -> floor(linspace(0, 4, 4)).
    raw, times = read_frames(corpus["root"] / "a.mp4", fps=2.0, max_frames=T, size=S)
    assert [read_index(f) for f in raw] == [0, 5, 10, 20] and times.tolist() == [0.0, 0.5, 1.0, 2.0]
    torch.testing.assert_close(item["frames"], ClipTransform(S)(raw), rtol=0, atol=0)


def test_short_video_is_zero_padded_with_mask(corpus):
    item = make(corpus["records"])[1]
    assert item["frame_mask"].tolist() == [1, 1, 0, 0]
    assert item["frames"][2:].abs().sum() == 0 and item["frames"][:2].abs().sum() > 0


def test_clip_window_is_respected(corpus):
    item = make(corpus["records"])[3]
    raw, times = read_frames(corpus["root"] / "c.mp4", fps=2.0, max_frames=T, start=1.0, end=2.5, size=S)
    assert [read_index(f) for f in raw] == [10, 15, 20] and item["frame_mask"].tolist() == [1, 1, 1, 0]
    torch.testing.assert_close(item["frames"][:3], ClipTransform(S)(raw))


def test_multi_caption_grouping(corpus):
    ds = make(corpus["records"])
    assert ds.video_ids == ["a", "b", "c#t=1,2.5"] and ds.num_videos == 3 and ds.multi_caption
    assert ds.caption_to_video == [0, 1, 0, 2] and ds.caption_index == [0, 0, 1, 0]
    assert ds.video_captions == [[0, 2], [1], [3]]
    assert ds.caption_to_video_tensor().tolist() == [0, 1, 0, 2]
    assert [ds[i]["caption_index"] for i in range(4)] == [0, 0, 1, 0]
    assert not make(corpus["records"][:2]).multi_caption


def test_records_of_one_video_must_agree(corpus):
    a = corpus["records"][0]
    clash = VideoTextPair("a", "x", a.video_path, start=1.0)
    with pytest.raises(ValueError, match="records of video 'a' disagree"):
        make([a, clash])


def test_text_and_video_views_encode_each_once(corpus):
    ds = make(corpus["records"])
    texts, videos = ds.text_view(), ds.video_view()
    assert len(texts) == 4 and len(videos) == 3
    text = texts[2]
    assert "frames" not in text and text["video_index"] == 0 and text["caption_index"] == 1
    torch.testing.assert_close(text["text_ids"], ds[2]["text_ids"])
    video = videos[0]
    assert "text_ids" not in video and video["video_id"] == "a" and video["video_key"] == video_key("a")
    torch.testing.assert_close(video["frames"], ds[2]["frames"])
    batch = collate([videos[i] for i in range(3)])
    assert batch.frames.shape == (3, T, 3, S, S) and batch.text_ids is None and batch.video_index.tolist() == [0, 1, 2]


def test_collate_batches_and_drops_skipped_items(corpus):
    ds = make(corpus["records"])
    batch = collate([ds[0], None, ds[1]])
    assert len(batch) == 2 and batch.video_id == ["a", "b"]
    assert batch.text_ids.shape == (2, L) and batch.frames.shape == (2, T, 3, S, S)
    assert batch.frame_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]] and batch.index.tolist() == [0, 1]
    assert batch.video_key.dtype == torch.long and batch.video_key.tolist() == [video_key("a"), video_key("b")]
    assert collate([None, None]) is None
    moved = batch.to("cpu")
    assert torch.equal(moved.frames, batch.frames) and moved.video_id == batch.video_id


def test_on_error_raise_names_the_file(corpus):
    ds = make(corpus["records"] + corpus["bad"])
    with pytest.raises(VideoDecodeError, match="broken.mp4: not a readable video"):
        ds[4]
    with pytest.raises(VideoDecodeError, match="gone.mp4: file not found"):
        ds[5]


def test_on_error_skip_drops_and_reports(corpus, tmp_path):
    report = tmp_path / "skipped.jsonl"
    ds = make(corpus["records"] + corpus["bad"], on_error="skip", skip_report=report)
    assert ds[4] is None and ds[5] is None and ds[0] is not None
    assert ds.video_view()[3] is None  # the broken video through the video-only view
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert [r["video_id"] for r in rows] == ["broken", "gone", "broken"]
    assert rows[1] == {"video_id": "gone", "path": str(corpus["root"] / "gone.mp4"), "cause": "file not found"}
    assert [s.video_id for s in read_skip_report(report)] == ["broken", "gone"]
    batch = collate([ds[i] for i in range(6)])
    assert batch.video_id == ["a", "b", "a", "c#t=1,2.5"]  # no zero-tensor stand-ins


def test_validate_up_front(corpus, tmp_path):
    ds = make(corpus["records"] + corpus["bad"], on_error="skip", skip_report=tmp_path / "r.jsonl")
    dropped = ds.validate(workers=2)
    assert sorted(s.video_id for s in dropped) == ["broken", "gone"]
    assert len(ds) == 4 and ds.video_ids == ["a", "b", "c#t=1,2.5"] and [s.video_id for s in ds.skipped] == [
        "broken", "gone"]
    assert ds.validate() == []
    strict = make(corpus["records"] + corpus["bad"])
    with pytest.raises(VideoDecodeError, match=r"broken.mp4.*2 bad video\(s\)"):
        strict.validate()


def test_require_complete():
    assert require_complete(1000, []) == 0
    with pytest.raises(MissingVideosError, match="2 of 1000 test videos were skipped") as info:
        require_complete(1000, ["video3", "video7", "video3"])
    assert info.value.missing == ["video3", "video7"]
    assert require_complete(1000, ["video3", "video7"], allow_missing=True) == 2


def test_dataloader_workers_and_distributed_sampler(corpus, tmp_path):
    report = tmp_path / "workers.jsonl"
    ds = make(corpus["records"] * 3 + corpus["bad"], on_error="skip", skip_report=report)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(ds, batch_size=3, sampler=sampler, num_workers=2, collate_fn=collate,
                            worker_init_fn=worker_init_fn)
        for batch in loader:
            if batch is None:
                continue
            assert batch.frames.shape[1:] == (T, 3, S, S)
            seen += batch.index.tolist()
    assert sorted(set(seen)) == list(range(12))  # every good item, on one rank or the other
    assert {s.video_id for s in read_skip_report(report)} == {"broken", "gone"}  # written by the workers


def test_augmentation_is_reproducible_across_workers_and_epochs(corpus):
    ds = make(corpus["records"], transform=TrainTransform(S), seed=7)
    direct = [ds[i]["frames"] for i in range(len(ds))]
    torch.testing.assert_close(ds[0]["frames"], direct[0], rtol=0, atol=0)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate, worker_init_fn=worker_init_fn)
    via_workers = torch.cat([batch.frames for batch in loader])
    torch.testing.assert_close(via_workers, torch.stack(direct), rtol=0, atol=0)
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i]["frames"], direct[i]) for i in range(len(ds)))
    other_seed = make(corpus["records"], transform=TrainTransform(S), seed=8)
    assert any(not torch.equal(other_seed[i]["frames"], direct[i]) for i in range(len(ds)))


def test_video_key_is_independent_of_the_hash_seed():
    code = "from diffusionret.data import video_key; print(video_key('video7020'), hash('video7020'))"
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.append(out.stdout.split())
    assert outputs[0][0] == outputs[1][0] == str(video_key("video7020"))
    assert outputs[0][1] != outputs[1][1]  # what the reference used does change (docs/reference.md §8.4)


def test_default_tokenizer_is_the_project_tokenizer(corpus):
    ds = VideoTextDataset(corpus["records"][:1], max_words=16, max_frames=T, fps=2.0, size=S)
    item = ds[0]
    from diffusionret.tokenizer import tokenize

    ids, mask = tokenize(["a first caption of a"], 16)
    assert item["text_ids"].tolist() == ids[0].tolist() and item["text_mask"].tolist() == mask[0].tolist()
    assert item["text_ids"][0].item() == 49406


def test_constructor_validation(corpus):
    with pytest.raises(ValueError, match="on_error"):
        make(corpus["records"], on_error="ignore")
    with pytest.raises(ValueError, match="max_words"):
        make(corpus["records"], max_words=1)
    assert np.isfinite(make(corpus["records"])[0]["frames"].numpy()).all()
