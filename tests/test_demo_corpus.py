"""The synthetic demo corpus: deterministic, decodable, distinguishable, in the user-data format."""

from __future__ import annotations

import csv
import json

import av
import numpy as np
import pytest

from diffusionret.demo.corpus import (
    BACKGROUNDS,
    MOTIONS,
    SHAPE_COLOURS,
    SHAPES,
    SIZES,
    ClipSpec,
    CorpusConfig,
    caption,
    num_attribute_tuples,
    render_clip,
    sample_clips,
    write_corpus,
    write_mp4,
)


def _decode(path):
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_attribute_space_is_large_enough_for_distinct_test_clips():
    assert num_attribute_tuples() == len(SHAPE_COLOURS) * len(SHAPES) * len(SIZES) * len(MOTIONS) * len(BACKGROUNDS)
    assert num_attribute_tuples() >= 1000
    specs = sample_clips(300, np.random.default_rng(0), prefix="test", distinct=True)
    assert len({s.attributes for s in specs}) == 300
    assert [s.video_id for s in specs[:2]] == ["test_0000", "test_0001"]


def test_captions_name_every_attribute_and_vary():
    rng = np.random.default_rng(1)
    spec = ClipSpec("x", "orange", "circle", "small", "left", "black")
    texts = {caption(spec, rng) for _ in range(60)}
    assert len(texts) > 10  # several templates and synonyms
    for text in texts:
        lower = text.lower()
        assert "orange" in lower
        assert any(w in lower for w in ("circle", "disc", "ball", "dot"))
        assert any(w in lower for w in ("small", "tiny", "little"))
        assert "left" in lower
        assert any(w in lower for w in ("black", "dark"))
        assert " a orange" not in lower and not lower.startswith("a orange")  # article agreement


@pytest.mark.parametrize("motion", MOTIONS)
def test_render_shapes_motion_and_colours(motion):
    config = CorpusConfig(num_train=1, num_test=1, frame_size=32, num_frames=8)
    spec = ClipSpec("x", "red", "square", "large", motion, "black")
    frames = render_clip(spec, config, np.random.default_rng(2))
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8
    # The shape is red on black: red pixels mark it; their centroid follows the motion.
    red = (frames[..., 0] > 128) & (frames[..., 1] < 100)
    assert red.sum(axis=(1, 2)).min() > 20
    ys, xs = np.mgrid[0:32, 0:32]
    cx = np.array([(xs * m).sum() / m.sum() for m in red])
    cy = np.array([(ys * m).sum() / m.sum() for m in red])
    dx, dy = cx[-1] - cx[0], cy[-1] - cy[0]
    expected = {"left": dx < -4, "right": dx > 4, "up": dy < -4, "down": dy > 4,
                "still": abs(dx) + abs(dy) < 1, "orbit": np.ptp(cx) > 4 and np.ptp(cy) > 4}
    assert expected[motion], (motion, dx, dy)


def test_write_mp4_round_trip(tmp_path):
    config = CorpusConfig(num_train=1, num_test=1, frame_size=32, num_frames=6)
    frames = render_clip(ClipSpec("x", "blue", "circle", "large", "right", "white"), config, np.random.default_rng(3))
    write_mp4(tmp_path / "a.mp4", frames, fps=6)
    decoded = _decode(tmp_path / "a.mp4")
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 6  # lossy, but close
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "b.mp4", frames[:, :31], fps=6)


def test_write_corpus_is_deterministic_and_in_user_format(tmp_path):
    config = CorpusConfig(num_train=12, num_test=8, max_train_captions=3, num_frames=6)
    a = write_corpus(tmp_path / "a", config, np.random.default_rng(7))
    b = write_corpus(tmp_path / "b", config, np.random.default_rng(7))
    c = write_corpus(tmp_path / "c", config, np.random.default_rng(8))
    assert a.train_csv.read_text() == b.train_csv.read_text()
    assert a.test_csv.read_text() == b.test_csv.read_text()
    assert a.test_csv.read_text() != c.test_csv.read_text()
    with open(a.train_csv, newline="") as f:
        train_rows = list(csv.DictReader(f))
    with open(a.test_csv, newline="") as f:
        test_rows = list(csv.DictReader(f))
    assert set(train_rows[0]) == {"video", "caption"}
    assert 12 <= len(train_rows) <= 36
    assert len(test_rows) == 8 and [r["caption"] for r in test_rows] == list(a.test_captions)
    assert {r["video"] for r in test_rows}.isdisjoint({r["video"] for r in train_rows})
    for row in test_rows[:2] + train_rows[:2]:
        assert _decode(a.video_dir / row["video"]).shape == (6, 32, 32, 3)
    facts = [json.loads(line) for line in (a.root / "clips.jsonl").read_text().splitlines()]
    assert len(facts) == 20 and {f["split"] for f in facts} == {"train", "test"}


def test_config_validation():
    with pytest.raises(ValueError, match="even"):
        CorpusConfig(frame_size=33)
    with pytest.raises(ValueError, match="num_test"):
        CorpusConfig(num_test=num_attribute_tuples() + 1)
