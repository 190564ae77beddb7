"""Annotation readers on miniatures in each dataset's real format, the real MSR-VTT lists, and errors."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import pytest

from diffusionret.data import READERS, AnnotationError, VideoTextPair, video_key
from diffusionret.data.annotations import get_reader, read_custom, read_lsmdc, read_msrvtt, read_msvd
from diffusionret.data.records import VideoLocator

ASSETS = Path(__file__).parent / "assets" / "annotations"
MSRVTT_REAL = Path(__file__).parent / "data" / "msrvtt"


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_registry_is_explicit():
    assert sorted(READERS) == ["activitynet", "custom", "didemo", "lsmdc", "msrvtt", "msvd"]
    assert get_reader("activity") is READERS["activitynet"]
    with pytest.raises(ValueError, match="unknown dataset"):
        get_reader("kinetics")


# -- MSR-VTT -----------------------------------------------------------------------------------------------


def test_msrvtt_miniature_splits(tmp_path):
    root = ASSETS / "msrvtt"
    train = read_msrvtt(root, tmp_path, "train")
    # Every caption of the 9k-list videos, in JSON order (not grouped by video).
    assert [(r.video_id, r.caption) for r in train] == [
        ("video0", "a cartoon animals runs through an ice cave in a video game"),
        ("video1", "a person is driving a car down the road"),
        ("video0", "a cartoon character runs around inside of a video game"),
        ("video1", "a man talks about a car"),
        ("video2", "people are dancing"),
    ]
    assert train[0].video_path == tmp_path / "video0.mp4" and train[0].start is None and train[0].end is None
    assert [r.video_id for r in read_msrvtt(root, tmp_path, "train7k")] == ["video0", "video0", "video2"]
    assert {r.video_id for r in read_msrvtt(root, tmp_path, "train_full")} == {"video0", "video1"}
    test = read_msrvtt(root, tmp_path, "test")
    assert [(r.video_id, r.caption) for r in test] == [
        ("video3", "a man is singing on stage"),
        ("video4", "a dog plays in the snow"),
    ]
    assert read_msrvtt(root, tmp_path, "val") == test  # the reference validates on the test set
    assert [r.video_id for r in read_msrvtt(root, tmp_path, "test_full")] == ["video3", "video3", "video4"]
    assert [r.video_id for r in read_msrvtt(root, tmp_path, "train", exclude_ids=["video1"])] == [
        "video0", "video0", "video2"
    ]
    with pytest.raises(ValueError, match="unknown MSR-VTT split"):
        read_msrvtt(root, tmp_path, "train10k")


def test_msrvtt_real_test_list():
    records = read_msrvtt(MSRVTT_REAL, "/videos", "test")
    assert len(records) == 1000 and len({r.video_id for r in records}) == 1000
    assert len({r.caption for r in records}) == 995  # four captions repeat (docs/reference.md §5.5)
    assert records[0] == VideoTextPair("video9770", "a person is connecting something to system",
                                       Path("/videos/video9770.mp4"))
    ids = sorted(int(r.video_id[5:]) for r in records)
    assert ids[0] == 7020 and ids[-1] == 9975


def test_msrvtt_real_9k_train_list(tmp_path):
    # The real 9k list plus a synthetic MSRVTT_data.json with 2 captions for each of the 10,000 videos.
    shutil.copy(MSRVTT_REAL / "MSRVTT_train.9k.csv", tmp_path)
    sentences = [{"video_id": f"video{i}", "caption": f"caption {k} of video {i}", "sen_id": 2 * i + k}
                 for k in range(2) for i in range(10000)]
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))
    records = read_msrvtt(tmp_path, tmp_path / "videos", "train")
    train_ids = {r.video_id for r in records}
    assert len(records) == 18000 and len(train_ids) == 9000
    with open(MSRVTT_REAL / "MSRVTT_JSFUSION_test.csv") as f:
        test_ids = {row["video_id"] for row in csv.DictReader(f)}
    assert not train_ids & test_ids and len(train_ids | test_ids) == 10000
    assert records[0].caption == "caption 0 of video 0" and records[9000].caption == "caption 1 of video 0"


def test_msrvtt_errors_name_file_and_entry(tmp_path):
    (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\n")
    with pytest.raises(AnnotationError, match=r"MSRVTT_data.json: MSR-VTT annotations .* not found"):
        read_msrvtt(tmp_path, tmp_path, "train")
    data = '{"sentences": [{"video_id": "video0", "caption": "ok"},\n{"video_id": 3}]}'
    (tmp_path / "MSRVTT_data.json").write_text(data)
    with pytest.raises(AnnotationError, match=r"MSRVTT_data.json \(entry sentences\[1\]\)"):
        read_msrvtt(tmp_path, tmp_path, "train")
    (tmp_path / "MSRVTT_data.json").write_text('{"sentences": [\n{"video_id": "video0",, }]}')
    with pytest.raises(AnnotationError, match=r"MSRVTT_data.json:2: invalid JSON") as info:
        read_msrvtt(tmp_path, tmp_path, "train")
    assert info.value.line == 2
    header = "key,vid_key,video_id,sentence\n"
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(header + "ret0,msr1,video1,fine\nret1,msr2,,\n")
    with pytest.raises(AnnotationError, match=r"MSRVTT_JSFUSION_test.csv:3: empty video_id"):
        read_msrvtt(tmp_path, tmp_path, "test")
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text("key,video\nret0,video1\n")
    with pytest.raises(AnnotationError, match=r"MSRVTT_JSFUSION_test.csv:1: missing column"):
        read_msrvtt(tmp_path, tmp_path, "test")


# -- MSVD --------------------------------------------------------------------------------------------------


def test_msvd_all_captions_grouped_per_video(tmp_path):
    touch(tmp_path, "YouTubeClips/-4wsuPCjDBc_5_15.avi", "YouTubeClips/-7KMZQEsJW4_205_208.avi")
    train = read_msvd(ASSETS / "msvd", tmp_path, "train")
    assert [(r.video_id, r.caption) for r in train] == [
        ("-4wsuPCjDBc_5_15", "a squirrel is eating a peanut"),
        ("-4wsuPCjDBc_5_15", "a chipmunk is eating"),
        ("-4wsuPCjDBc_5_15", "an animal eats a nut"),
        ("-7KMZQEsJW4_205_208", "a man is riding a bike"),
        ("-7KMZQEsJW4_205_208", "a cyclist rides"),
    ]
    assert train[0].video_path == tmp_path / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi"  # found recursively
    test = read_msvd(ASSETS / "msvd", tmp_path, "test")
    assert [r.video_id for r in test] == ["-8y1Q0rA3n8_108_115"] * 3 + ["-AwoiGR6c8M_10_14"]
    assert test[0].video_path == tmp_path / "-8y1Q0rA3n8_108_115.avi"  # missing: the expected path
    assert len(read_msvd(ASSETS / "msvd", tmp_path, "val")) == 3


def test_msvd_errors(tmp_path):
    shutil.copy(ASSETS / "msvd" / "raw-captions.pkl", tmp_path)
    (tmp_path / "train_list.txt").write_text("-4wsuPCjDBc_5_15\nnot_in_captions\n")
    with pytest.raises(AnnotationError, match=r"train_list.txt:2: video 'not_in_captions' has no captions"):
        read_msvd(tmp_path, tmp_path, "train")
    (tmp_path / "train_list.txt").write_text("-4wsuPCjDBc_5_15\n")
    with open(tmp_path / "raw-captions.pkl", "wb") as f:
        pickle.dump({"-4wsuPCjDBc_5_15": [["ok"], 3]}, f)
    with pytest.raises(AnnotationError, match=r"raw-captions.pkl \(entry -4wsuPCjDBc_5_15\): caption 1"):
        read_msvd(tmp_path, tmp_path, "train")
    with open(tmp_path / "raw-captions.pkl", "wb") as f:
        pickle.dump({"-4wsuPCjDBc_5_15": [Path("x")]}, f)  # names a class: refused, never executed
    with pytest.raises(AnnotationError, match="refusing to load"):
        read_msvd(tmp_path, tmp_path, "train")


# -- LSMDC -------------------------------------------------------------------------------------------------


def test_lsmdc_tab_separated(tmp_path):
    train = read_lsmdc(ASSETS / "lsmdc", tmp_path, "train")
    assert [(r.video_id, r.caption) for r in train] == [
        ("0001_American_Beauty_00.00.51.926-00.00.54.129", "SOMEONE looks out of a window."),
        ("0001_American_Beauty_00.00.56.224-00.00.58.961", "He turns and walks away."),
    ]  # the known-broken 0017_Pianist clip is excluded
    test = read_lsmdc(ASSETS / "lsmdc", tmp_path, "test")
    assert len(test) == 2 and test[0].video_id == test[1].video_id  # one record per sentence
    bad = tmp_path / "anno"
    bad.mkdir()
    (bad / "LSMDC16_annos_training.csv").write_text("a\tb\tc\td\te\tfine\nonly\tthree\tfields\n")
    with pytest.raises(AnnotationError, match=r"LSMDC16_annos_training.csv:2: expected 6 tab-separated fields, got 3"):
        read_lsmdc(bad, tmp_path, "train")


# -- ActivityNet -------------------------------------------------------------------------------------------


def test_activitynet_paragraphs(tmp_path):
    touch(tmp_path, "v_QOlSCBRmfWY.mp4", "ehGHCYKzyZ8.mkv")
    train = READERS["activitynet"](ASSETS / "activitynet", tmp_path, "train")
    assert [r.video_id for r in train] == ["v_QOlSCBRmfWY", "v_ehGHCYKzyZ8"]  # no-caption id skipped
    assert train[0].caption == (
        "A young woman is seen standing in a room and leads into her dancing. The girl dances around the room "
        "while the camera captures her movements. She continues dancing around the room and ends by laying on "
        "the floor."
    )
    assert train[0].start is None and train[0].end is None  # the whole video
    assert train[0].video_path == tmp_path / "v_QOlSCBRmfWY.mp4"
    assert train[1].video_path == tmp_path / "ehGHCYKzyZ8.mkv"  # found without the v_ prefix
    val = READERS["activitynet"](ASSETS / "activitynet", tmp_path, "val")
    assert [r.video_id for r in val] == ["v_uqiMw7tQ1Cc", "v_bXdq2zI1Ms0"]
    assert READERS["activitynet"](ASSETS / "activitynet", tmp_path, "test") == val
    anno = tmp_path / "anno"
    anno.mkdir()
    (anno / "train_ids.json").write_text('["v_a"]')
    (anno / "train.json").write_text('{"v_a": {"duration": 3, "sentences": "not a list"}}')
    with pytest.raises(AnnotationError, match=r"train.json \(entry v_a\)"):
        READERS["activitynet"](anno, tmp_path, "train")


# -- DiDeMo ------------------------------------------------------------------------------------------------


def test_didemo_paragraphs(tmp_path):
    touch(tmp_path, "10015567@N08_3655084291_d8b58466fa.mov.mp4")
    train = READERS["didemo"](ASSETS / "didemo", tmp_path, "train")
    assert [(r.video_id, r.caption) for r in train] == [
        ("10015567@N08_3655084291_d8b58466fa.mov",
         "a girl in a pink shirt walks into view the girl waves at the camera"),
        ("10060556@N05_3281813290_6d3cbd2cf3.mp4", "a dog runs across the yard"),
    ]
    assert train[0].video_path == tmp_path / "10015567@N08_3655084291_d8b58466fa.mov.mp4"
    assert train[0].start is None and train[0].end is None  # not the reference's hard-coded 0-31 s
    assert len(READERS["didemo"](ASSETS / "didemo", tmp_path, "test")) == 1
    (tmp_path / "train_list.txt").write_text("a\n")
    (tmp_path / "train_data.json").write_text('[{"video": "a", "description": "x"}, {"video": "a"}]')
    with pytest.raises(AnnotationError, match=r"train_data.json \(entry \[1\]\)"):
        READERS["didemo"](tmp_path, tmp_path, "train")


# -- user's own data ---------------------------------------------------------------------------------------


def test_custom_csv_and_jsonl(tmp_path):
    touch(tmp_path, "clips/a.mp4", "b.mp4")
    train = read_custom(ASSETS / "custom", tmp_path, "train")
    assert [(r.video_id, r.caption, r.start, r.end) for r in train] == [
        ("clips/a", "a red square moves left", None, None),
        ("clips/a", "a red square, moving to the left", None, None),
        ("b#t=0.5,1.5", "a blue circle", 0.5, 1.5),
    ]
    assert train[0].video_path == tmp_path / "clips" / "a.mp4"
    test = read_custom(ASSETS / "custom", tmp_path, "test")
    assert [(r.video_id, r.video_path) for r in test] == [
        ("clips/a", tmp_path / "clips" / "a.mp4"),
        ("b#t=0,1", tmp_path / "b.mp4"),  # a bare name is looked up by stem
    ]
    # anno_path may be the file itself.
    assert read_custom(ASSETS / "custom" / "train.csv", tmp_path, "anything") == train


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.csv", "video,text\nx.mp4,hi\n", r"a.csv:1: missing column\(s\) \['caption'\]"),
        ("a.csv", "video,caption\nx.mp4,hi\n,empty video\n", r"a.csv:3: missing or empty 'video'"),
        ("a.csv", "video,caption,start,end\nx.mp4,hi,2,1\n", r"a.csv:2: end \(1.0\) must be after start"),
        ("a.csv", "video,caption,start\nx.mp4,hi,soon\n", r"a.csv:2: start must be a number"),
        ("a.csv", "video,caption\nx.mp4,hi,extra\n", r"a.csv:2: 3 fields, header has 2"),
        ("a.jsonl", '{"video": "x.mp4", "caption": "hi"}\n{"video": "x.mp4",\n', r"a.jsonl:2: invalid JSON"),
        ("a.jsonl", '{"video": "x.mp4", "caption": "hi"}\n["x.mp4", "hi"]\n', r"a.jsonl:2: expected a JSON object"),
        ("a.jsonl", '{"video": "x.mp4"}\n', r"a.jsonl:1: missing or empty 'caption'"),
        ("a.txt", "x.mp4 hi\n", r"a.txt: unsupported annotation format"),
    ],
)
def test_custom_errors_name_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(AnnotationError, match=message):
        read_custom(path, tmp_path)


def test_custom_missing_split_file(tmp_path):
    with pytest.raises(AnnotationError, match="no annotation file for split 'val'"):
        read_custom(tmp_path, tmp_path, "val")


# -- records -----------------------------------------------------------------------------------------------


def test_video_key_is_stable_and_signed_int64():
    # Pinned: the key must not change between processes, ranks or releases (docs/reference.md §8.4).
    assert video_key("video7020") == video_key("video7020")
    assert video_key("video7020") != video_key("video7021")
    assert all(-(2**63) <= video_key(f"video{i}") < 2**63 for i in range(100))
    assert video_key("video0") == int.from_bytes(
        __import__("hashlib").blake2b(b"video0", digest_size=8).digest(), "little", signed=True
    )


def test_locator_prefers_root_layout_and_walks_otherwise(tmp_path):
    touch(tmp_path, "a.mp4", "sub/b.avi", "sub/.hidden.mp4", "sub/notes.txt")
    locator = VideoLocator(tmp_path)
    assert locator.find("a") == tmp_path / "a.mp4"
    assert locator.find("b") == tmp_path / "sub" / "b.avi"
    assert locator.find(".hidden") == tmp_path / ".hidden.mp4" and not locator.exists(".hidden")
    assert locator.find("notes") == tmp_path / "notes.mp4"
    with pytest.raises(ValueError, match="end 1 is before start 2"):
        VideoTextPair("v", "c", tmp_path, start=2, end=1)
