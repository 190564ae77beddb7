"""End to end on the demo: index the demo corpus with the trained demo model, then search it.

The demo model is trained by ``diffusionret demo --seed 3`` (the session's run, shared with
``tests/test_demo.py``). Each of the 250 test captions, searched through the full cascade (first stage,
WTI, diffusion re-ranking), must retrieve its own clip in the top 5 for most captions, through the CLI,
the Python API and the HTTP API; the index's WTI ranking must agree with the demo's own evaluation.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from helpers import cli_logging
from diffusionret.cli import main
from diffusionret.index.searcher import SearchConfig, Searcher
from diffusionret.serve.app import create_app

pytestmark = pytest.mark.slow  # the full demo (demo_run)


@pytest.fixture(scope="module")
def demo_out(demo_run: tuple[int, Path, str]) -> Path:
    """Output folder of the session's ``diffusionret demo --seed 3`` (see ``conftest.py``)."""
    code, out, _ = demo_run
    assert code == 0
    return out


@pytest.fixture(scope="module")
def demo_index(demo_out: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    metrics = json.loads((demo_out / "metrics.json").read_text())
    settings = metrics["config"]
    cfg = {"frames": settings["corpus"]["num_frames"], "fps": settings["corpus"]["fps"],
           "max_words": settings["max_words"], "top_k": settings["top_k"]}
    corpus = demo_out / "corpus"
    out = tmp_path_factory.mktemp("demo_index") / "idx"
    with cli_logging():
        code = main(["index", "build", "--model", metrics["models"]["stage2"], "--videos", str(corpus / "test.csv"),
                     "--video-root", str(corpus / "videos"), "--out", str(out), "--frames", str(cfg["frames"]),
                     "--fps", str(cfg["fps"]), "--no-progress"])
    assert code == 0
    with open(corpus / "test.csv", newline="", encoding="utf-8") as handle:
        pairs = [(row["caption"], row["video"]) for row in csv.DictReader(handle)]
    return {"dir": out, "pairs": pairs, "cfg": cfg, "metrics": metrics}


def recall_at(searcher: Searcher, pairs: list[tuple[str, str]], k: int) -> tuple[float, list[list[str]]]:
    results = searcher.search_batch([caption for caption, _ in pairs], k=k)
    names = [[Path(hit.path).name for hit in hits] for hits in results]
    return sum(video in found for (_, video), found in zip(pairs, names, strict=True)) / len(pairs), names


def test_captions_retrieve_their_video_in_the_top_5(demo_index: dict) -> None:
    pairs, cfg, evaluation = demo_index["pairs"], demo_index["cfg"], demo_index["metrics"]["test"]
    assert len(pairs) == demo_index["metrics"]["corpus"]["test_videos"] >= 20

    def open_index(candidates: int, rerank_top_k: int) -> Searcher:
        config = SearchConfig(candidates=candidates, rerank_top_k=rerank_top_k, max_words=cfg["max_words"])
        return Searcher.open(demo_index["dir"], config=config)

    # The product as users run it: the default cascade (first stage -> WTI on 100 -> diffusion on the
    # top K), most captions find their video in the top 5.
    cascade = open_index(100, cfg["top_k"])
    assert cascade.reranks
    r5, found = recall_at(cascade, pairs, 5)
    r1 = sum(names[0] == video for (_, video), names in zip(pairs, found, strict=True)) / len(pairs)
    assert r5 > 0.5, f"most captions must find their video in the top 5 (cascade R@5 {r5:.2f})"
    assert r1 >= 25 * (1 / len(pairs))  # chance is 1/N

    # It behaves like the evaluation's exhaustive re-ranking (which draws its noise differently, and
    # the index stores fp16 features: a small tolerance) ...
    assert abs(r5 - evaluation["rerank"]["t2v"]["R5"] / 100.0) <= 0.05
    # ... because the pooled first stage keeps the right video among the 100 candidates ...
    first_stage_r100, _ = recall_at(open_index(100, 0), pairs, 100)
    assert first_stage_r100 >= 0.95
    # ... and WTI over every video is the ranking the demo's own evaluation measured.
    wti_r5, _ = recall_at(open_index(len(pairs), 0), pairs, 5)
    assert abs(wti_r5 - evaluation["wti"]["t2v"]["R5"] / 100.0) <= 1.5 / len(pairs)
    print(f"\ndemo index: cascade R@1 {r1:.2f} R@5 {r5:.2f} (evaluation with re-ranking "
          f"{evaluation['rerank']['t2v']['R5']:.0f}%), first stage R@100 {first_stage_r100:.2f}, WTI R@5 "
          f"{wti_r5:.2f} (evaluation {evaluation['wti']['t2v']['R5']:.0f}%)")


def test_cli_and_http_agree_with_the_python_api(demo_index: dict, capsys: pytest.CaptureFixture) -> None:
    cfg = demo_index["cfg"]
    searcher = Searcher.open(demo_index["dir"], config=SearchConfig(candidates=20, rerank_top_k=cfg["top_k"],
                                                                    max_words=cfg["max_words"]))
    caption, _ = demo_index["pairs"][0]
    expected = searcher.search(caption, 5)

    with cli_logging():
        code = main(["search", str(demo_index["dir"]), caption, "-k", "5", "--json", "--candidates", "20",
                     "--rerank", str(cfg["top_k"]), "--max-words", str(cfg["max_words"])])
    assert code == 0
    cli_ids = [r["id"] for r in json.loads(capsys.readouterr().out)]
    assert cli_ids == [h.id for h in expected]

    with TestClient(create_app(searcher), base_url="http://127.0.0.1") as client:
        body = client.get("/api/search", params={"q": caption, "k": 5}).json()
        assert [r["id"] for r in body["results"]] == [h.id for h in expected]
        top = body["results"][0]
        media = client.get(top["media_url"], headers={"Range": "bytes=0-11"})
        assert media.status_code == 206 and media.content[4:8] == b"ftyp"  # an mp4, streamed by range
        thumb = client.get(top["thumb_url"])
        assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
        assert client.get("/api/info").json()["rerank_top_k"] == cfg["top_k"]
