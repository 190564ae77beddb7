"""Cascade search with a real (tiny, randomly initialised) DiffusionRet model.

Covers the model-backed path end to end: decoding + encoding into the index (compared with the
evaluation pipeline), the cascade against brute force at every stage, determinism, and the
``index``/``search`` commands (in process), including the refusal of another model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import require_faiss
from diffusionret.cli import main
from diffusionret.data.decode import read_frames
from diffusionret.data.transforms import ClipTransform
from diffusionret.demo.corpus import CorpusConfig, write_corpus
from diffusionret.index.features import pool_frames
from diffusionret.index.identity import ModelMismatchError
from diffusionret.index.searcher import SearchConfig, Searcher
from diffusionret.index.store import VideoIndex
from diffusionret.models.checkpoint import load_model, save_model
from diffusionret.models.config import ModelConfig
from diffusionret.models.factory import build_model
from diffusionret.retrieval import RerankConfig, Reranker
from diffusionret.tokenizer import tokenize

FRAMES, FPS = 4, 3.0


@pytest.fixture(autouse=True)
def _restore_logging():
    """``cli.main`` installs its own root handler (on the stream of the moment); undo it after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("search")
    paths = {}
    for name, seed in (("a", 0), ("b", 1)):
        model = build_model(ModelConfig.tiny(denoisers=True), generator=torch.Generator().manual_seed(seed))
        paths[name] = save_model(model, root / f"model_{name}.safetensors")
    corpus = write_corpus(root / "corpus", CorpusConfig(num_train=1, num_test=16), np.random.default_rng(0))
    (corpus.video_dir / "train_0000.mp4").unlink()  # index the test clips only
    index_dir = root / "idx"
    code = main(["index", "build", "--model", str(paths["a"]), "--videos", str(corpus.video_dir), "--out",
                 str(index_dir), "--frames", str(FRAMES), "--fps", str(FPS), "--batch-size", "5", "--shard-size", "6",
                 "--no-progress"])
    assert code == 0
    model = load_model(paths["a"])
    return {"root": root, "models": paths, "model": model, "corpus": corpus, "index_dir": index_dir,
            "index": VideoIndex.load(index_dir)}


def test_index_holds_the_evaluation_features(setup: dict) -> None:
    index, model = setup["index"], setup["model"]
    assert len(index) == 16
    assert index.info.settings == {"extractor": "diffusionret", "max_frames": FRAMES, "fps": FPS,
                                   "sampling": "uniform", "image_size": 32}
    transform = ClipTransform(model.image_size)
    frames = torch.zeros(len(index), FRAMES, 3, 32, 32)
    mask = torch.zeros(len(index), FRAMES, dtype=torch.long)
    for row, record in enumerate(index.records):  # decoded the way evaluation decodes
        raw, _ = read_frames(record.path, fps=FPS, max_frames=FRAMES, size=model.image_size)
        frames[row, : len(raw)] = transform(raw)
        mask[row, : len(raw)] = 1
        assert record.duration == pytest.approx(2.0, abs=0.1) and record.width == record.height == 32
        assert index.thumbnail(record.id)[:2] == b"\xff\xd8"
    with torch.no_grad():
        expected = model.encode_video(frames, mask)
    assert torch.equal(index.frame_mask, mask.bool())
    real = mask.bool()
    torch.testing.assert_close(index.frames[real].float(), expected[real], atol=2e-3, rtol=2e-3)
    assert not index.frames[~real].any()  # padded frames are stored as zeros


def _brute_force(model, index: VideoIndex, query: str) -> tuple[torch.Tensor, ...]:
    """(coarse (Nv,), wti (Nv,), cls (1, D), frames (Nv, T, D)) for one query over the whole index."""
    ids, mask = tokenize([query], 32)
    with torch.no_grad():
        tokens, cls = model.encode_text(ids, mask)
        video, frame_mask = index.frames.float(), index.frame_mask.long()
        wti = model.similarity(tokens, mask, video, frame_mask)[0]
    coarse = F.normalize(cls, dim=-1)[0] @ pool_frames(video, frame_mask).T
    return coarse, wti, cls, video


def test_cascade_without_pruning_equals_brute_force_wti(setup: dict) -> None:
    index, model = setup["index"], setup["model"]
    searcher = Searcher(model, index, SearchConfig(candidates=len(index), rerank_top_k=0))
    for query in setup["corpus"].test_captions[:4]:
        _, wti, _, _ = _brute_force(model, index, query)
        hits = searcher.search(query, k=len(index))
        # Same scores in the same order; every hit carries its own brute-force score (ties may swap).
        expected = torch.sort(wti, descending=True).values
        torch.testing.assert_close(torch.tensor([h.score for h in hits]), expected, atol=1e-5, rtol=0)
        assert sorted(index.row(h.id) for h in hits) == list(range(len(index)))
        for hit in hits:
            assert hit.score == pytest.approx(float(wti[index.row(hit.id)]), abs=1e-5)
        assert all("rerank" not in h.stage_scores for h in hits)


def test_first_stage_prunes_to_the_pooled_top_n(setup: dict) -> None:
    index, model = setup["index"], setup["model"]
    n = 5
    searcher = Searcher(model, index, SearchConfig(candidates=n, rerank_top_k=0))
    for query in setup["corpus"].test_captions[4:8]:
        coarse, wti, _, _ = _brute_force(model, index, query)
        hits = searcher.search(query, k=n)
        expected_rows = set(coarse.topk(n).indices.tolist())
        assert {index.row(h.id) for h in hits} == expected_rows
        for hit in hits:
            row = index.row(hit.id)
            assert hit.stage_scores["coarse"] == pytest.approx(float(coarse[row]), abs=1e-5)
            assert hit.stage_scores["wti"] == pytest.approx(float(wti[row]), abs=1e-5)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_diffusion_reranks_the_top_k(setup: dict) -> None:
    index, model = setup["index"], setup["model"]
    n, k_rerank = 10, 4
    config = SearchConfig(candidates=n, rerank_top_k=k_rerank, seed=7)
    searcher = Searcher(model, index, config)
    assert searcher.reranks
    query = setup["corpus"].test_captions[0]
    coarse, wti, cls, video = _brute_force(model, index, query)
    rows = coarse.topk(n).indices
    with torch.no_grad():
        reranker = Reranker(model, RerankConfig(steps=50, top_k=k_rerank))  # the reference's schedule (default)
        expected = reranker.t2v(wti[rows][None], cls, video[rows], index.frame_mask[rows].long(),
                                generator=torch.Generator().manual_seed(7))[0]
    order = torch.sort(expected, descending=True, stable=True).indices
    hits = searcher.search(query, k=n)
    assert [index.row(h.id) for h in hits] == rows[order].tolist()
    torch.testing.assert_close(torch.tensor([h.score for h in hits]), expected[order], atol=1e-5, rtol=0)
    # The K re-ranked candidates got a positive bonus and lead; the rest keep their WTI order and score.
    assert [("rerank" in h.stage_scores) for h in hits] == [True] * k_rerank + [False] * (n - k_rerank)
    for hit in hits[:k_rerank]:
        assert 0 < hit.score - hit.stage_scores["wti"] < 1
    assert [h.score for h in hits[k_rerank:]] == [h.stage_scores["wti"] for h in hits[k_rerank:]]
    # Deterministic, and independent of batching.
    again = searcher.search(query, k=n)
    assert [(h.id, h.score) for h in again] == [(h.id, h.score) for h in hits]
    other = setup["corpus"].test_captions[1]
    batch = searcher.search_batch([query, other], k=n)
    alone = [searcher.search(q, k=n) for q in (query, other)]
    # Same hits; scores within 1e-6 (a batch of two lengths goes through the text tower packed,
    # whose products differ in size from a lone query's and may round the last bits differently).
    assert [[h.id for h in result] for result in batch] == [[h.id for h in result] for result in alone]
    for got, want in zip(batch, alone, strict=True):
        torch.testing.assert_close(torch.tensor([h.score for h in got]), torch.tensor([h.score for h in want]),
                                   atol=1e-6, rtol=0)


def test_index_stores_the_model_frame_weights(setup: dict) -> None:
    index, model = setup["index"], setup["model"]
    assert index.frame_weights is not None and bool(index.weights_known.all())
    with torch.no_grad():  # from the stored fp16 frames, as a query would compute them
        expected = model.frame_weights(index.frames.float(), index.frame_mask.long())
    torch.testing.assert_close(index.frame_weights, expected, rtol=0, atol=1e-6)


def test_stored_frame_weights_give_the_scores_of_query_time_weights(setup: dict) -> None:
    index, model = setup["index"], setup["model"]
    # The same index without stored weights, as an index built before they existed.
    old = VideoIndex(index.root, index.info, index.records, index.frames, index.frame_mask, index.pooled)
    assert old.frame_weights is None
    config = SearchConfig(candidates=12, rerank_top_k=4)
    stored, computed = Searcher(model, index, config), Searcher(model, old, config)
    for query in setup["corpus"].test_captions[:3]:
        a, b = stored.search(query, k=12), computed.search(query, k=12)
        assert [h.id for h in a] == [h.id for h in b]
        for x, y in zip(a, b, strict=True):
            assert x.stage_scores == pytest.approx(y.stage_scores, abs=1e-6)


def test_trimmed_query_gives_identical_scores(setup: dict) -> None:
    index, model = setup["index"], setup["model"]
    full = Searcher(model, index, SearchConfig(candidates=len(index), rerank_top_k=4, trim_query=False))
    trimmed = Searcher(model, index, SearchConfig(candidates=len(index), rerank_top_k=4))
    queries = [*setup["corpus"].test_captions[:3], "red", "a " * 40]  # short, and longer than max_words
    for query in queries:
        _, mask, _ = trimmed.encode_queries([query])
        real = int(mask.sum())
        assert mask.shape[1] == min(32, real + 1)  # one padded position kept (unless the query fills L)
        a, b = full.search(query, k=len(index)), trimmed.search(query, k=len(index))
        assert [h.id for h in a] == [h.id for h in b]
        for x, y in zip(a, b, strict=True):
            assert x.stage_scores == pytest.approx(y.stage_scores, abs=1e-6)
    # A batch is trimmed to its longest query; results do not depend on the batch.
    batch = trimmed.search_batch(queries[:4], k=5)
    assert [[h.id for h in r] for r in batch] == [[h.id for h in full.search(q, k=5)] for q in queries[:4]]


def test_trimming_keeps_the_zero_floor(setup: dict) -> None:
    """Why one padded position stays: with all real similarities negative, the padded positions'
    0 is the maximum over tokens; dropping every padded position would change the scores."""
    model = setup["model"]
    generator = torch.Generator().manual_seed(3)
    length, real, dim = 32, 7, model.embed_dim
    base = F.normalize(torch.randn(dim, generator=generator), dim=0)
    tokens = base + 0.1 * torch.randn(1, length, dim, generator=generator)
    mask = (torch.arange(length) < real).long()[None]
    video = -base + 0.1 * torch.randn(2, 5, dim, generator=generator)  # opposite to every token
    frame_mask = torch.ones(2, 5, dtype=torch.long)
    assert bool((F.normalize(tokens[0, :real], dim=-1) @ F.normalize(video, dim=-1).reshape(-1, dim).T < 0).all())
    with torch.no_grad():
        reference = model.similarity(tokens, mask, video, frame_mask)
        keep_one = model.similarity(tokens[:, :real + 1], mask[:, :real + 1], video, frame_mask)
        keep_none = model.similarity(tokens[:, :real], mask[:, :real], video, frame_mask)
    torch.testing.assert_close(keep_one, reference, rtol=0, atol=1e-7)
    assert float((keep_none - reference).abs().max()) > 1e-3


def test_searcher_rejects_bad_arguments(setup: dict) -> None:
    searcher = Searcher(setup["model"], setup["index"])
    with pytest.raises(ValueError):
        searcher.search("x", k=0)
    with pytest.raises(ValueError):
        searcher.search_batch("not a list", k=1)
    with pytest.raises(ValueError):
        SearchConfig(candidates=0)


def test_cli_search_prints_table_and_json(setup: dict, capsys: pytest.CaptureFixture) -> None:
    index_dir, query = str(setup["index_dir"]), setup["corpus"].test_captions[2]
    assert main(["search", index_dir, query, "-k", "3", "--json", "--rerank", "4"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert isinstance(hits, list) and [r["rank"] for r in hits] == [1, 2, 3]
    expected = Searcher.open(index_dir, config=SearchConfig(rerank_top_k=4)).search(query, 3)
    assert [r["id"] for r in hits] == [h.id for h in expected]
    assert main(["search", index_dir, query, "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "moment", "path"] and len(lines) == 4
    # Whole-video hits are the moment [0, duration], shown mm:ss-mm:ss.
    assert all(set(r) >= {"rank", "score", "path", "video_id", "start", "end"} for r in hits)
    assert all(r["start"] == 0.0 and r["end"] == pytest.approx(r["duration"]) for r in hits)
    assert lines[1].split()[2] == "00:00-00:02"
    assert lines[1].split()[0] == "1" and lines[1].endswith(".mp4")


def test_api_search_gives_the_cli_json_fields(setup: dict, capsys: pytest.CaptureFixture) -> None:
    """``GET /api/search`` answers each hit with the fields and values of ``search --json`` (plus URLs)."""
    from fastapi.testclient import TestClient

    from diffusionret.serve.app import ServeConfig, create_app

    index_dir, query = str(setup["index_dir"]), setup["corpus"].test_captions[4]
    assert main(["search", index_dir, query, "-k", "4", "--json", "--rerank", "4"]) == 0
    cli = json.loads(capsys.readouterr().out)
    searcher = Searcher.open(index_dir, config=SearchConfig(rerank_top_k=4))
    with TestClient(create_app(searcher, ServeConfig(show_paths=True)), base_url="http://127.0.0.1") as client:
        api = client.get("/api/search", params={"q": query, "k": 4}).json()["results"]
    assert len(api) == len(cli) == 4
    for a, c in zip(api, cli, strict=True):
        assert set(c) <= set(a), "every CLI field"
        for key, value in c.items():  # with the CLI's value (scores up to float noise)
            if isinstance(value, float):
                assert a[key] == pytest.approx(value, abs=1e-6), key
            elif isinstance(value, dict):
                assert a[key] == pytest.approx(value, abs=1e-6), key
            else:
                assert a[key] == value, key


def test_another_model_is_refused(setup: dict, capsys: pytest.CaptureFixture) -> None:
    index_dir, other = setup["index_dir"], setup["models"]["b"]
    with pytest.raises(ModelMismatchError):
        Searcher.open(index_dir, other)
    with pytest.raises(ModelMismatchError):
        Searcher(load_model(other), setup["index"])
    assert main(["search", str(index_dir), "a red circle", "--model", str(other)]) == 2
    assert "refusing to query it with model" in capsys.readouterr().err
    assert main(["index", "update", str(index_dir), "--model", str(other), "--no-progress"]) == 2
    assert "Build a new index for it" in capsys.readouterr().err


@pytest.mark.slow  # torchrun: two processes
def test_torchrun_build_equals_single_process_build(setup: dict, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m diffusionret index build`: each rank encodes a share, rank 0 merges."""
    out = tmp_path / "idx"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "diffusionret", "index", "build", "--model", str(setup["models"]["a"]), "--videos",
               str(setup["corpus"].video_dir), "--out", str(out), "--frames", str(FRAMES), "--fps", str(FPS),
               "--shard-size", "3", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "16 videos indexed: 16 added" in result.stdout
    merged = VideoIndex.load(out)
    single = setup["index"]
    assert [r.path for r in merged.records] == [r.path for r in single.records]
    assert [r.id for r in merged.records] == [r.id for r in single.records]
    assert torch.equal(merged.frame_mask, single.frame_mask)
    torch.testing.assert_close(merged.frames.float(), single.frames.float(), atol=2e-3, rtol=0)
    shard_ranks = {p.name.split("-")[1] for p in (out / "shards").iterdir()}
    assert shard_ranks == {"r000", "r001"}  # both ranks wrote shards


@pytest.mark.slow  # torchrun: two processes
def test_torchrun_update_refused_on_rank_0_ends_both_ranks(setup: dict, tmp_path: Path) -> None:
    """Rank 0 refuses to prune most of the index while planning: rank 1 stops too instead of waiting for it."""
    videos = tmp_path / "videos"
    shutil.copytree(setup["corpus"].video_dir, videos)
    out = tmp_path / "idx"
    assert main(["index", "build", "--model", str(setup["models"]["a"]), "--videos", str(videos), "--out", str(out),
                 "--frames", str(FRAMES), "--fps", str(FPS), "--no-progress"]) == 0
    for path in sorted(videos.iterdir())[:10]:
        path.unlink()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "diffusionret", "index", "update", str(out), "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert "refusing to remove 10 videos" in result.stderr, result.stderr[-3000:]
    assert "another rank failed while planning the build" in result.stderr, result.stderr[-3000:]
    # Both ranks report a user error (exit code 2), not a crash (torchrun adds its own summary).
    assert "[rank 0] ERROR" in result.stderr and "[rank 1] ERROR" in result.stderr


def test_cli_update_and_info(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    videos = tmp_path / "videos"
    shutil.copytree(setup["corpus"].video_dir, videos)
    index_dir = tmp_path / "idx"
    model = str(setup["models"]["a"])
    assert main(["index", "build", "--model", model, "--videos", str(videos), "--out", str(index_dir), "--frames", "4",
                 "--fps", "3", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("16 videos indexed: 16 added")
    shutil.copy(videos / "test_0000.mp4", videos / "copy_of_0.mp4")
    (videos / "test_0001.mp4").unlink()
    (videos / "test_0002.mp4").write_bytes(b"\x00 broken now")
    assert main(["index", "update", str(index_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("15 videos indexed: 1 added, 0 re-encoded, 1 removed, 14 unchanged, 1 failed"), out
    assert main(["index", "info", str(index_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["videos"] == 15 and info["failures"] == 1 and info["model_path"] == str(Path(model).resolve())
    assert info["settings"]["max_frames"] == 4 and info["sources"] == [str(videos.resolve())]


def test_cli_ivf_first_stage(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    require_faiss()
    index_dir = tmp_path / "idx"
    shutil.copytree(setup["index_dir"], index_dir)
    assert main(["index", "update", str(index_dir), "--ivf", "on", "--ann-kind", "ivf", "--ivf-nlist", "2",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["index", "info", str(index_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ivf_file"].startswith("ivf-") and info["stale_ivf_files"] == []
    query = setup["corpus"].test_captions[5]
    results = {}
    for method in ("exact", "ivf"):  # probing both lists, IVF is exact
        assert main(["search", str(index_dir), query, "-k", "5", "--json", "--first-stage", method,
                     "--nprobe", "2"]) == 0
        results[method] = [(r["id"], round(r["score"], 5)) for r in json.loads(capsys.readouterr().out)]
    assert results["ivf"] == results["exact"]
    assert main(["index", "update", str(index_dir), "--ivf", "off", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["index", "info", str(index_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ivf_file"] is None


def test_cli_pq_first_stage(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    require_faiss()
    index_dir = tmp_path / "idx"
    shutil.copytree(setup["index_dir"], index_dir)
    assert main(["index", "update", str(index_dir), "--ann", "on", "--no-progress"]) == 0  # PQ by default
    capsys.readouterr()
    assert main(["index", "info", str(index_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [name[:3] for name in info["ann_files"]] == ["pq-"] and info["stale_ann_files"] == []
    assert info["ivf_file"] is None
    query = setup["corpus"].test_captions[5]
    results = {}
    for method in ("exact", "pq"):  # the shortlist covers this small index: PQ + re-scoring is exact
        assert main(["search", str(index_dir), query, "-k", "5", "--json", "--first-stage", method,
                     "--rescore", "100"]) == 0
        results[method] = [(r["id"], round(r["score"], 5)) for r in json.loads(capsys.readouterr().out)]
    assert results["pq"] == results["exact"]


def test_cli_forced_ivf_without_faiss_is_a_clear_error(setup: dict, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert main(["search", str(setup["index_dir"]), "red", "--first-stage", "ivf"]) == 2
    assert "pip install 'diffusionret[ann]'" in capsys.readouterr().err
    assert main(["search", str(setup["index_dir"]), "red", "-k", "2"]) == 0  # exact needs no FAISS


def test_searcher_does_not_change_the_index(setup: dict) -> None:
    from diffusionret.index.first_stage import FirstStageConfig

    index = VideoIndex.load(setup["index_dir"])
    assert index.first_stage is None
    searcher = Searcher(setup["model"], index, SearchConfig(first_stage=FirstStageConfig(precision="float16")))
    searcher.search("a red circle", k=3)
    assert index.first_stage is None  # the searcher owns its first stage
    assert searcher.describe()["first_stage"] == {"method": "exact", "precision": "float16"}


def _trainer_checkpoint(model, path: Path, *, legacy: bool) -> Path:
    """A training run's ``last.pt`` around ``model``; ``legacy``: the model config as the previous release wrote it."""
    from diffusionret.config_utils import to_dict
    from diffusionret.training.checkpoint import TrainProgress, capture_rng_state, save_trainer_checkpoint

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    run_config = {"stage": "generation", "data": {"max_frames": FRAMES, "fps": FPS, "sampling": "uniform",
                                                  "size": 32, "max_words": 24},
                  "diffusion": {"steps": 50, "schedule": "cosine"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_trainer_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, ema=None,
                            rng=[capture_rng_state()], progress=TrainProgress(), run_config=run_config)
    if legacy:
        payload = torch.load(path, weights_only=True)
        config = to_dict(model.config)
        config.pop("denoisers")
        payload["model_config"] = {**config, "stage": "generation", "diffusion_steps": 50, "noise_schedule": "cosine"}
        torch.save(payload, path)
    return path


@pytest.mark.parametrize("legacy", [False, True])
def test_index_build_from_a_training_checkpoint(setup: dict, tmp_path: Path, legacy: bool) -> None:
    """`index build --model runs/x/checkpoints/last.pt`: the run's input settings, the same model identity."""
    last = _trainer_checkpoint(setup["model"], tmp_path / "runs" / "x" / "checkpoints" / "last.pt", legacy=legacy)
    out = tmp_path / "idx"
    assert main(["index", "build", "--model", str(last), "--videos", str(setup["corpus"].video_dir), "--out", str(out),
                 "--no-progress"]) == 0
    built = VideoIndex.load(out)
    assert built.info.settings == setup["index"].info.settings  # frames and fps from the run's data section
    assert built.model_id == setup["index"].model_id
    torch.testing.assert_close(built.frames.float(), setup["index"].frames.float(), atol=0, rtol=0)
    # searching it loads the recorded last.pt, with the run's query length (24 words)
    searcher = Searcher.open(out)
    assert searcher.max_words == 24 and searcher.reranks
