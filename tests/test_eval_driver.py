"""Evaluation driver: missing videos are refused unless allowed, chunking does not change the scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusionret.cli import main
from diffusionret.config import load_run_config
from diffusionret.data.errors import MissingVideosError
from diffusionret.evaluation.evaluate import evaluate, extract_features, similarity_matrix
from diffusionret.evaluation.features import CorpusFeatures
from diffusionret.models.checkpoint import save_model
from diffusionret.models.config import DiffusionSchedule, ModelConfig
from diffusionret.models.factory import build_model
from diffusionret.distributed import DistContext
from helpers import SMOKE2, padded_wti, write_smoke_corpus


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = write_smoke_corpus(tmp_path_factory.mktemp("eval"))
    torch.manual_seed(0)
    config = ModelConfig.tiny(denoisers=True)
    model = build_model(config, generator=torch.Generator().manual_seed(0))
    ckpt = save_model(model, root / "model.safetensors", diffusion=DiffusionSchedule(10, "cosine"))
    return root, ckpt


def _cfg(root: Path, *overrides: str):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFUSIONRET_SMOKE", str(root))
        return load_run_config(SMOKE2, [f"output_dir={root / 'out'}", *overrides])


def test_missing_test_videos_are_refused_unless_allowed(setup: tuple[Path, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root, ckpt = setup
    full = evaluate(_cfg(root), ckpt)
    assert (full["num_captions"], full["num_videos"], full["num_missing_videos"]) == (3, 2, 0)
    broken = tmp_path / "videos"
    broken.mkdir()
    for video in (root / "videos").iterdir():
        if video.name != "v11.mp4":  # the test video with two captions
            (broken / video.name).symlink_to(video)
    cfg = _cfg(root, f"data.video_path={broken}", "data.on_error=skip")
    with pytest.raises(MissingVideosError, match="1 of 2 test videos"):
        evaluate(cfg, ckpt)
    partial = evaluate(cfg, ckpt, allow_missing=True)
    assert (partial["num_captions"], partial["num_videos"], partial["num_missing_videos"]) == (1, 1, 1)
    # The CLI: refusal is an error exit, --allow-missing reports (and says how many are missing).
    monkeypatch.setenv("DIFFUSIONRET_SMOKE", str(root))
    base = ["eval", "--checkpoint", str(ckpt), "--config", str(SMOKE2), f"output_dir={root / 'out'}",
            f"data.video_path={broken}", "data.on_error=skip", "--output", str(tmp_path / "m.json")]
    assert main(base) == 1
    assert main(base + ["--allow-missing"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["num_missing_videos"] == 1
    # With the default on_error=raise an unreadable video is an error exit, not a traceback.
    assert main(base[:-4] + [f"data.video_path={broken}", "--output", str(tmp_path / "m.json")]) == 1


def test_chunked_similarity_equals_one_block(setup: tuple[Path, Path]) -> None:
    root, ckpt = setup
    from diffusionret.models.checkpoint import load_model

    model = load_model(ckpt)
    feats = extract_features(_cfg(root), model, split="train")
    assert feats.num_captions == 10 and feats.num_videos == 8  # two train videos have two captions
    one = similarity_matrix(model, feats, chunk_size=64, ctx=DistContext(), progress=False)
    chunked = similarity_matrix(model, feats, chunk_size=3, ctx=DistContext(), progress=False)
    assert one.shape == (10, 8)
    torch.testing.assert_close(chunked, one)
    direct = model.similarity(feats.tokens, feats.text_mask, feats.video, feats.frame_mask)
    torch.testing.assert_close(one, direct)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_similarity_matrix_in_length_order_equals_padded(chunk: int) -> None:
    """Captions scored in length buckets come back in caption order with the padded computation's scores."""
    model = build_model(ModelConfig.tiny(), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(3)
    nt, nv, length, frames, d = 13, 6, 9, 4, model.embed_dim
    real = torch.randint(0, length + 1, (nt,), generator=g)
    text_mask = (torch.arange(length)[None] < real[:, None]).long()
    frame_mask = (torch.arange(frames)[None] < torch.randint(1, frames + 1, (nv,), generator=g)[:, None]).long()
    feats = CorpusFeatures(tokens=torch.randn(nt, length, d, generator=g), text_mask=text_mask,
                           cls=torch.randn(nt, d, generator=g), video=torch.randn(nv, frames, d, generator=g),
                           frame_mask=frame_mask, caption_to_video=torch.arange(nt) % nv, video_ids=list("abcdef"))
    with torch.no_grad():
        got = similarity_matrix(model, feats, chunk_size=chunk, ctx=DistContext(), progress=False)
        expected = padded_wti(model, feats.tokens, text_mask, feats.video, frame_mask)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_unstated_input_settings_come_from_the_checkpoint(setup: tuple[Path, Path], tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from diffusionret.inputs import InputConfig
    from diffusionret.models.checkpoint import load_model

    root, ckpt = setup
    recorded = InputConfig(max_frames=2, fps=1.0, sampling="head", size=32, max_words=12)
    model_file = save_model(load_model(ckpt), tmp_path / "recorded.safetensors", input_config=recorded)
    cfg = _cfg(root)  # the smoke YAML states max_words, max_frames, fps and size, not sampling
    assert cfg.data_inputs_given == {"max_words", "max_frames", "fps", "size"}
    assert "data_inputs_given" not in cfg.to_dict()
    with caplog.at_level("WARNING"):
        feats = extract_features(cfg, model_file)
    # What the run states wins (with a warning naming the difference); the rest is the model's.
    assert (feats.meta["sampling"], feats.meta["max_frames"], feats.meta["max_words"]) == ("head", 3, 16)
    assert "max_frames 2 (model) != 3 (run)" in caplog.text
    # An override states a setting too.
    stated = _cfg(root, "data.sampling=tail")
    assert extract_features(stated, model_file).meta["sampling"] == "tail"
    # A config built in Python states every setting: nothing is taken from the model.
    assert extract_features(cfg.__class__(**{**{f: getattr(cfg, f) for f in ("stage", "output_dir", "data", "model",
                                                                                 "optim", "train", "diffusion",
                                                                                 "eval", "seed")}}),
                            model_file).meta["sampling"] == cfg.data.sampling
