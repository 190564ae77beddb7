"""Finding the videos of a collection: folders, text lists, CSV files."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusionret.index.discover import discover_videos


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_folder_is_scanned_recursively(tmp_path: Path) -> None:
    a = touch(tmp_path / "v" / "a.mp4")
    b = touch(tmp_path / "v" / "deep" / "er" / "B.MKV")
    touch(tmp_path / "v" / "notes.txt")
    touch(tmp_path / "v" / ".hidden" / "c.mp4")  # hidden folders (caches, indexes) are skipped
    touch(tmp_path / "v" / ".d.mp4")
    (tmp_path / "v" / "link.mp4").symlink_to(a)  # the same file twice is indexed once
    assert discover_videos(tmp_path / "v") == sorted([a.resolve(), b.resolve()])


def test_text_list_with_relative_paths_and_comments(tmp_path: Path) -> None:
    a = touch(tmp_path / "clips" / "a.mp4")
    b = touch(tmp_path / "elsewhere" / "b.webm")
    listing = tmp_path / "clips" / "list.txt"
    listing.write_text(f"# my collection\na.mp4\n\n{b}\nmissing.mp4\n")
    assert discover_videos(listing) == sorted([a.resolve(), b.resolve()])


def test_csv_list_msrvtt_style(tmp_path: Path) -> None:
    a = touch(tmp_path / "videos" / "video7.mp4")
    b = touch(tmp_path / "videos" / "video9.mp4")
    csv_path = tmp_path / "videos" / "test.csv"
    csv_path.write_text("key,vid_key,video_id,video,sentence\n"
                        "ret0,msr7,video7,video7,a cat\nret1,msr9,video9,video9,a dog\n")
    assert discover_videos(csv_path) == sorted([a.resolve(), b.resolve()])
    bad = tmp_path / "bad.csv"
    bad.write_text("caption\nhello\n")
    with pytest.raises(ValueError, match="no path column"):
        discover_videos(bad)


def test_several_sources_and_missing_source(tmp_path: Path) -> None:
    a = touch(tmp_path / "one" / "a.mov")
    b = touch(tmp_path / "two" / "b.mp4")
    assert discover_videos([tmp_path / "one", b, tmp_path / "one"]) == sorted([a.resolve(), b.resolve()])
    with pytest.raises(FileNotFoundError, match="video source not found"):
        discover_videos(tmp_path / "absent")


def test_list_entries_relative_to_a_video_root(tmp_path: Path) -> None:
    a = touch(tmp_path / "videos" / "clip_a.mp4")
    listing = tmp_path / "annotations" / "test.csv"
    listing.parent.mkdir()
    listing.write_text("video,caption\nclip_a.mp4,a caption\n")
    assert discover_videos(listing) == []  # relative to the list's own folder: not there
    assert discover_videos(listing, video_root=tmp_path / "videos") == [a.resolve()]
