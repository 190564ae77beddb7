"""The stage-2 feature cache: same training as encoding online, resumable, invalidated, memory-mapped;
and ``diffusion.negatives: dataset`` (exclusions, distributed merge)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from diffusionret.config import DiffusionConfig, EvalConfig, ModelSection, RunConfig, TrainConfig
from diffusionret.data.collate import collate
from diffusionret.data.config import DataConfig
from diffusionret.data.dataset import VideoTextDataset
from diffusionret.data.records import VideoTextPair
from diffusionret.distributed import DistContext, TrainSampler
from diffusionret.diffusion.gaussian import GaussianDiffusion
from diffusionret.evaluation.features import CorpusFeatures
from diffusionret.safetensors_mmap import mmap_tensors, write_streamed
from diffusionret.models.config import ModelConfig
from diffusionret.models.factory import build_model
from diffusionret.training.dataset_negatives import build_dataset_negatives, excluded_videos
from diffusionret.training.feature_cache import (
    CacheSpec,
    CachedBatches,
    TrainFeatureCache,
    cache_fingerprint,
    ensure_feature_cache,
    input_settings,
)
from diffusionret.training.stage1_contrastive import stage1_batch_args
from diffusionret.training.stage2_diffusion import GenerationObjective, prepare_stage2_model

from test_distributed import _free_port, run_workers

FRAMES, SIZE, WORDS = 3, 32, 12
# 7 videos, 12 captions: v0 and v3 have several captions (duplicates of a video in one batch), and
# "a red thing" is the caption of both v0 and v5 (a duplicate caption of two videos).
CAPTIONS = [("v0", "a red thing"), ("v1", "green grass"), ("v2", "blue sky"), ("v3", "a yellow car"),
            ("v4", "purple rain"), ("v5", "a red thing"), ("v6", "orange fruit"), ("v0", "red again"),
            ("v3", "yellow again"), ("v1", "green field"), ("v2", "blue water"), ("v3", "a third yellow")]
GLOBAL_BATCH = 6


class _SyntheticVideos(VideoTextDataset):
    """Frames drawn from the video index (no decoding): fast, deterministic; ``broken`` ids fail."""

    broken: frozenset[str] = frozenset()

    def load_video(self, video_index: int, *, generator: torch.Generator | None = None):
        from diffusionret.data.errors import VideoDecodeError

        video_id = self.videos[video_index].video_id
        if video_id in self.broken:
            raise VideoDecodeError(video_id, "synthetic failure")
        gen = torch.Generator().manual_seed(1000 + video_index)
        n = 2 + video_index % 2  # some videos are shorter than max_frames: a masked frame
        frames = torch.zeros(self.max_frames, 3, self.size, self.size)
        frames[:n] = torch.randn(n, 3, self.size, self.size, generator=gen)
        mask = torch.zeros(self.max_frames, dtype=torch.long)
        mask[:n] = 1
        return frames, mask


def _dataset(broken: tuple[str, ...] = ()) -> VideoTextDataset:
    records = [VideoTextPair(video_id=v, caption=c, video_path=Path(f"/nonexistent/{v}.mp4")) for v, c in CAPTIONS]
    ds = _SyntheticVideos(records, max_words=WORDS, max_frames=FRAMES, size=SIZE, name="synthetic",
                          on_error="skip" if broken else "raise")
    ds.broken = frozenset(broken)
    return ds


def _model(seed: int = 7) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(ModelConfig.tiny(), generator=torch.Generator().manual_seed(seed))
    return prepare_stage2_model(model, generator=torch.Generator().manual_seed(seed))


def _spec(directory: Path, model: torch.nn.Module, *, shard_size: int = 4, size: int = SIZE,
          batch_size: int = 4, store_dtype: str = "float32") -> CacheSpec:
    inputs = {"max_frames": FRAMES, "size": size, "max_words": WORDS, "dataset": "synthetic"}
    fp = cache_fingerprint(model, inputs, encode_dtype="float32", store_dtype=store_dtype)
    return CacheSpec(directory=directory, fingerprint=fp, meta=inputs, batch_size=batch_size, shard_size=shard_size,
                     store_dtype=store_dtype)


def _build(directory: Path, model: torch.nn.Module, ds: VideoTextDataset, **kw) -> TrainFeatureCache:
    path = ensure_feature_cache(model, ds, _spec(directory, model, **kw), DistContext())
    return TrainFeatureCache(path, len(ds))


def _objective(model: torch.nn.Module, ctx: DistContext, seed: int, negatives=None,
               factored: bool = False) -> GenerationObjective:
    objective = GenerationObjective(model, ctx, num_negatives=127, negative_label=0, loss_temp=100.0,
                                    generator=torch.Generator().manual_seed(seed), diffusion=GaussianDiffusion(10),
                                    dataset_negatives=negatives, factored=factored)
    objective.train()
    return objective


def _loss_and_grads(model: torch.nn.Module, objective: torch.nn.Module, args: dict) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    out = objective(**args)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach().clone() for k, v in out.items()}, grads


def _assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (out_a, grads_a), (out_b, grads_b) = a, b
    for key in ("loss", "gen_t2v", "gen_v2t", "disc_loss", "num_negatives"):
        torch.testing.assert_close(out_a[key], out_b[key], rtol=0, atol=1e-6, msg=key)
    assert set(grads_a) == set(grads_b) and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("factored", [False, True], ids=["reference-form", "factored-form"])
def test_cached_path_gives_the_online_losses_and_gradients(tmp_path: Path, factored: bool) -> None:
    ds, model = _dataset(), _model()
    cache = _build(tmp_path / "cache", model, ds)
    sampler = TrainSampler(len(ds), GLOBAL_BATCH, DistContext(), seed=3)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        cached_batches = list(CachedBatches(cache, sampler))
        assert len(cached_batches) == sampler.steps_per_epoch == 2
        for step, cached in enumerate(cached_batches):
            chunk = indices[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
            online_args = stage1_batch_args(collate([ds[i] for i in chunk]), torch.device("cpu"))
            assert torch.equal(cached.video_key, online_args["video_key"])
            online = _loss_and_grads(model, _objective(model, DistContext(), seed=step, factored=factored),
                                     online_args)
            from_cache = _loss_and_grads(model, _objective(model, DistContext(), seed=step, factored=factored),
                                         cached.args(torch.device("cpu")))
            assert online[0]["num_negatives"].item() >= 3  # hard negatives were mined
            _assert_same(online, from_cache)


def test_unreadable_videos_are_dropped_like_the_data_loader_does(tmp_path: Path) -> None:
    ds, model = _dataset(broken=("v3",)), _model()
    cache = _build(tmp_path / "cache", model, ds)
    assert cache.features.missing_video_ids == ["v3"] and cache.features.num_captions == 9
    chunk = [0, 3, 8, 1]  # 3 and 8 are captions of v3
    cached = cache.batch(chunk)
    online = collate([ds[i] for i in chunk])
    assert online is not None and cached is not None and len(online) == cached.tokens.shape[0] == 2
    assert torch.equal(online.video_key, cached.video_key)
    assert cache.batch([3, 8]) is None


def _assert_close_forms(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    """The reference and the factored denoiser forms: the same numbers up to float re-association."""
    (out_a, grads_a), (out_b, grads_b) = a, b
    for key in ("loss", "gen_t2v", "gen_v2t", "disc_loss", "num_negatives"):
        torch.testing.assert_close(out_a[key], out_b[key], rtol=1e-5, atol=1e-5, msg=key)
    assert set(grads_a) == set(grads_b) and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_factored_denoisers_train_like_the_reference_form(tmp_path: Path) -> None:
    """Global-batch negatives (videos with several captions in a batch, masked frames), shared banks."""
    ds, model = _dataset(), _model()
    cache = _build(tmp_path / "cache", model, ds)
    sampler = TrainSampler(len(ds), GLOBAL_BATCH, DistContext(), seed=5)
    for step, cached in enumerate(CachedBatches(cache, sampler)):
        args = cached.args(torch.device("cpu"))
        reference = _loss_and_grads(model, _objective(model, DistContext(), seed=step), args)
        assert reference[0]["num_negatives"].item() >= 3
        _assert_close_forms(reference, _loss_and_grads(model, _objective(model, DistContext(), seed=step,
                                                                         factored=True), args))


# ---------------------------------------------------------------------------------------------- resume / invalidation
def test_a_killed_encoding_resumes_from_its_finished_shards(tmp_path: Path) -> None:
    ds, model = _dataset(), _model()
    reference = _build(tmp_path / "fresh", model, ds, shard_size=2).features
    spec = _spec(tmp_path / "cache", model, shard_size=2)
    real_encode = model.encode_video
    calls = {"text": 0, "video": 0}

    def dies_on_second_video_batch(frames, mask):
        calls["video"] += 1
        if calls["video"] == 2:
            raise KeyboardInterrupt("killed")
        return real_encode(frames, mask)

    model.encode_video = dies_on_second_video_batch
    with pytest.raises(KeyboardInterrupt):
        ensure_feature_cache(model, ds, spec, DistContext())
    assert not spec.path.exists()
    shards = sorted(p.name for p in spec.shard_dir.glob("*.safetensors"))
    assert len(shards) == 6 + 1 and not list(spec.shard_dir.glob("*.tmp"))  # 6 text shards + 1 video shard

    real_text = model.encode_text

    def counting_text(ids, mask):
        calls["text"] += 1
        return real_text(ids, mask)

    def counting_video(frames, mask):
        calls["video"] += 1
        return real_encode(frames, mask)

    model.encode_video, model.encode_text = counting_video, counting_text
    calls["video"] = 0
    cache = TrainFeatureCache(ensure_feature_cache(model, ds, spec, DistContext()), len(ds))
    assert calls == {"text": 0, "video": 3}  # only the 3 unfinished video shards (2 videos each, 7 videos)
    assert not spec.shard_dir.exists()
    for name in ("tokens", "text_mask", "cls", "video", "frame_mask", "caption_to_video", "text_index"):
        assert torch.equal(getattr(cache.features, name), getattr(reference, name)), name


def test_a_stale_cache_is_rebuilt_and_a_matching_one_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds, model = _dataset(), _model()
    directory = tmp_path / "cache"
    first = _build(directory, model, ds).features.video.clone()
    stamp = (directory / "train.safetensors").stat().st_mtime_ns

    # Other denoiser weights (a resumed run): same frozen features, the cache is re-used.
    with torch.no_grad():
        next(model.diffusion_model.parameters()).add_(1.0)
    assert _spec(directory, model).fingerprint == _spec(tmp_path / "x", _model()).fingerprint
    _build(directory, model, ds)
    assert (directory / "train.safetensors").stat().st_mtime_ns == stamp

    # Other backbone weights: another fingerprint, re-encoded (logged), new features.
    with torch.no_grad():
        model.clip.visual.conv1.weight.mul_(1.5)
    with caplog.at_level(logging.WARNING, logger="diffusionret.training.feature_cache"):
        rebuilt = _build(directory, model, ds).features
    assert "re-encoding" in caplog.text
    assert not torch.allclose(rebuilt.video, first)
    assert rebuilt.meta["fingerprint"] == _spec(directory, model).fingerprint

    # Other input settings: another fingerprint too.
    assert _spec(directory, model, size=64).fingerprint != _spec(directory, model).fingerprint


def test_shards_of_another_fingerprint_are_discarded(tmp_path: Path) -> None:
    ds, model = _dataset(), _model()
    spec = _spec(tmp_path / "cache", model, shard_size=2)
    spec.shard_dir.mkdir(parents=True)
    (spec.shard_dir / "FINGERPRINT").write_text("someone-else\n")
    (spec.shard_dir / "text_000000.safetensors").write_bytes(b"garbage from another model")
    cache = TrainFeatureCache(ensure_feature_cache(model, ds, spec, DistContext()), len(ds))
    reference = _build(tmp_path / "fresh", model, ds, shard_size=2).features
    assert torch.equal(cache.features.tokens, reference.tokens)


def test_the_cache_records_the_run_input_config() -> None:
    data = DataConfig(dataset="custom", anno_path=Path("a"), video_path=Path("v"), max_frames=5, fps=2.0, size=64)
    cfg = RunConfig(stage="generation", output_dir=Path("o"), data=data,
                    model=ModelSection(preset="tiny", init_checkpoint=Path("m")), eval=EvalConfig(model_selection="last"))
    settings = input_settings(cfg.input_config())
    assert {k: settings[k] for k in ("max_frames", "fps", "sampling", "size", "max_words")} == \
        {"max_frames": 5, "fps": 2.0, "sampling": "uniform", "size": 64, "max_words": 32}


# ---------------------------------------------------------------------------------------------- memory mapping
def _mapped_from(tensor: torch.Tensor, path: Path) -> bool:
    """Whether the tensor's memory lies in a mapping of ``path`` (Linux ``/proc/self/maps``)."""
    address = tensor.data_ptr()
    target = str(path.resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == target:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return True
    return False


def test_the_cache_is_memory_mapped_and_is_an_extract_features_file(tmp_path: Path) -> None:
    ds, model = _dataset(), _model()
    cache = _build(tmp_path / "cache", model, ds)
    path = tmp_path / "cache" / "train.safetensors"
    eager = CorpusFeatures.load(path)  # what `diffusionret eval --features` reads
    for name in ("tokens", "cls", "video", "frame_mask", "caption_to_video"):
        mapped = getattr(cache.features, name)
        assert _mapped_from(mapped, path), name
        assert torch.equal(mapped, getattr(eager, name))
    assert eager.video_ids == ds.video_ids and eager.num_captions == len(ds)
    # Writing to a mapped tensor never touches the file (copy-on-write map).
    cache.features.tokens[0].zero_()
    assert torch.equal(CorpusFeatures.load(path).tokens, eager.tokens)


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.integers(0, 5), min_size=1, max_size=4), width=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.int64]))
def test_streamed_files_are_safetensors_files(tmp_path_factory: pytest.TempPathFactory, rows: list[int], width: int,
                                              dtype: torch.dtype) -> None:
    parts = [(torch.arange(n * width * 2).reshape(n, width, 2) + 100 * i).to(dtype) for i, n in enumerate(rows)]
    path = tmp_path_factory.mktemp("stream") / "x.safetensors"
    write_streamed(path, {"a": list(range(len(parts))), "b": [0]}, {"k": "v"},
                   lambda name, i: parts[i] if name == "a" else torch.ones(3, dtype=torch.int64))
    loaded = load_file(str(path))
    assert torch.equal(loaded["a"], torch.cat(parts)) and torch.equal(loaded["b"], torch.ones(3, dtype=torch.int64))
    assert torch.equal(mmap_tensors(path)["a"], torch.cat(parts))


def test_a_half_precision_cache_stores_fp16_and_feeds_fp32(tmp_path: Path) -> None:
    ds, model = _dataset(), _model()
    full = _build(tmp_path / "fp32", model, ds)
    half = _build(tmp_path / "fp16", model, ds, store_dtype="float16")
    assert half.features.tokens.dtype == torch.float16 and half.features.video.dtype == torch.float16
    assert _spec(tmp_path, model, store_dtype="float16").fingerprint != _spec(tmp_path, model).fingerprint
    args = half.batch([0, 1]).args(torch.device("cpu"))
    assert args["tokens"].dtype == args["video"].dtype == args["cls"].dtype == torch.float32
    torch.testing.assert_close(args["video"], full.batch([0, 1]).args(torch.device("cpu"))["video"],
                               rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------- dataset negatives
def test_exclusions_cover_own_and_duplicate_caption_videos() -> None:
    captions = ["A red  thing", "blue", "a red thing", "green", "blue"]
    c2v = torch.tensor([0, 1, 2, 0, 3])
    assert excluded_videos(captions, c2v) == [[0, 2], [1, 3], [0, 2], [0], [1, 3]]


def _fake_cache(nv: int, captions: list[str], c2v: list[int], seed: int = 0) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(seed)
    nt, dim = len(captions), 8
    feats = SimpleNamespace(tokens=torch.randn(nt, 4, dim, generator=gen), text_mask=torch.ones(nt, 4, dtype=torch.long),
                            cls=torch.randn(nt, dim, generator=gen), video=torch.randn(nv, 2, dim, generator=gen),
                            frame_mask=torch.ones(nv, 2, dtype=torch.long), num_captions=nt, num_videos=nv)
    return SimpleNamespace(features=feats, caption_to_video=torch.tensor(c2v))


class _MeanCosine(torch.nn.Module):
    """A stand-in similarity (any score works for the exclusions): cosine of mean token and mean frame."""

    def similarity(self, tokens, text_mask, video, frame_mask):
        t = torch.nn.functional.normalize(tokens.mean(1), dim=-1)
        v = torch.nn.functional.normalize(video.mean(1), dim=-1)
        return t @ v.t()


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_dataset_negatives_never_return_positives_and_are_the_hardest(data: st.DataObject) -> None:
    nv = data.draw(st.integers(4, 8))
    c2v = list(range(nv)) + data.draw(st.lists(st.integers(0, nv - 1), max_size=6))
    words = ["red", "blue", "green", "dark", "tall", "fast", "slow", "old", "new", "cold", "hot", "big", "odd", "wet"]
    captions = [data.draw(st.sampled_from(words[:nv + 2])) for _ in c2v]  # collisions: duplicate captions
    cache = _fake_cache(nv, captions, c2v, seed=data.draw(st.integers(0, 1000)))
    excluded = excluded_videos(captions, torch.tensor(c2v))
    try:
        neg = build_dataset_negatives(_MeanCosine(), cache, captions, 3, ctx=DistContext(),
                                      chunk_size=data.draw(st.integers(1, 5)))
    except ValueError:
        # Raised only when some caption has no other video, or some video no caption that is not its own
        # (nor a duplicate of one of its own).
        per_video = [sum(v in e for e in excluded) for v in range(nv)]
        assert min(nv - max(map(len, excluded)), len(c2v) - max(per_video)) <= 0
        return
    scores = _MeanCosine().similarity(cache.features.tokens, None, cache.features.video, None)
    forbidden = torch.zeros(len(c2v), nv, dtype=torch.bool)
    for r, videos in enumerate(excluded):
        forbidden[r, videos] = True
    masked = scores.masked_fill(forbidden, float("-inf"))
    for r in range(len(c2v)):
        assert not set(neg.t2v[r].tolist()) & set(excluded[r])
        assert torch.equal(masked[r, neg.t2v[r]], masked[r].topk(neg.num).values)
    for v in range(nv):
        assert not forbidden[neg.v2t[v], v].any()  # never its own caption nor a duplicate of one
        assert torch.equal(masked[neg.v2t[v], v], masked[:, v].topk(neg.num).values)
    # Candidate lists: the positive first, then the table.
    cand_video, cand_mask, cand_cls = neg.candidates(torch.tensor([0, 1]), neg.num, device=torch.device("cpu"))
    assert cand_video.shape == (2, neg.num + 1, 2, 8) and torch.equal(cand_video[0, 0], cache.features.video[c2v[0]])
    assert torch.equal(cand_cls[1, 0], cache.features.cls[1])


def test_dataset_negatives_train_end_to_end_on_a_cache(tmp_path: Path) -> None:
    ds, model = _dataset(), _model()
    cache = _build(tmp_path / "cache", model, ds)
    captions = [ds.records[i].caption for i in cache.features.text_index.tolist()]
    neg = build_dataset_negatives(model, cache, captions, 127, ctx=DistContext())
    assert neg.num == 5  # 7 videos; "a red thing" excludes v0 and v5
    batch = cache.batch([0, 5, 7, 2]).args(torch.device("cpu"))
    reference = _loss_and_grads(model, _objective(model, DistContext(), 0, negatives=neg), batch)
    assert reference[0]["num_negatives"].item() == 5 and torch.isfinite(reference[0]["loss"])
    # The trainer's form from the cache (per-query candidates: no shared bank) gives the same training.
    _assert_close_forms(reference, _loss_and_grads(model, _objective(model, DistContext(), 0, negatives=neg,
                                                                     factored=True), batch))


# ---------------------------------------------------------------------------------------------- config
def _run_config(**changes) -> RunConfig:
    data = DataConfig(dataset="custom", anno_path=Path("a"), video_path=Path("v"), augment=changes.pop("augment", "none"))
    return RunConfig(stage="generation", output_dir=Path("o"), data=data,
                     model=ModelSection(preset="tiny", init_checkpoint=Path("m")),
                     eval=EvalConfig(model_selection="last"), **changes)


def test_config_resolves_and_validates_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _run_config().uses_feature_cache()
    assert not _run_config(augment="crop_flip").uses_feature_cache()  # auto keeps augmentation online
    assert not _run_config(train=TrainConfig(feature_cache="off")).uses_feature_cache()
    with pytest.raises(ValueError, match="augment"):
        _run_config(augment="crop_flip", train=TrainConfig(feature_cache="on"))
    with pytest.raises(ValueError, match="negatives 'dataset'"):
        _run_config(train=TrainConfig(feature_cache="off"), diffusion=DiffusionConfig(negatives="dataset"))
    assert _run_config(diffusion=DiffusionConfig(negatives="dataset")).diffusion.negatives == "dataset"
    stage1 = RunConfig(stage="discrimination", output_dir=Path("o"), data=_run_config().data,
                       eval=EvalConfig(model_selection="last"), diffusion=DiffusionConfig(negatives="dataset"))
    assert not stage1.uses_feature_cache()  # the diffusion section does not concern stage 1
    # Unquoted on/off in YAML arrive as booleans.
    from diffusionret.config import load_run_config

    assert TrainConfig(feature_cache=False).feature_cache == "off" and TrainConfig(feature_cache=True).feature_cache == "on"
    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke_stage2.yaml"
    monkeypatch.setenv("DIFFUSIONRET_SMOKE", "/nonexistent")
    for raw, value in (("off", "off"), ("on", "on"), ("auto", "auto")):
        cfg = load_run_config(smoke, ["output_dir=o", "model.init_checkpoint=m", f"train.feature_cache={raw}"])
        assert cfg.train.feature_cache == value
        assert f"feature_cache: {value}" in cfg.to_yaml().replace("'", "")


def test_config_resolves_and_validates_augmented_views() -> None:
    views = TrainConfig(feature_cache_views=3)
    assert _run_config(augment="crop_flip", train=views).uses_feature_cache()  # auto: views stand in for draws
    on, off = (TrainConfig(feature_cache=value, feature_cache_views=2) for value in ("on", "off"))
    assert _run_config(augment="crop_flip", train=on).uses_feature_cache()
    assert not _run_config(augment="crop_flip", train=off).uses_feature_cache()
    with pytest.raises(ValueError, match="without augmentation every view is the same"):
        _run_config(train=views)
    with pytest.raises(ValueError, match="negatives 'dataset'"):
        _run_config(augment="crop_flip", train=views, diffusion=DiffusionConfig(negatives="dataset"))
    with pytest.raises(ValueError, match="feature_cache_views must be >= 1"):
        TrainConfig(feature_cache_views=0)


class _AugmentedVideos(_SyntheticVideos):
    """Synthetic frames plus a draw from the item's augmentation generator (the dataset's seed/epoch)."""

    def load_video(self, video_index: int, *, generator: torch.Generator | None = None):
        frames, mask = super().load_video(video_index)
        if generator is not None:
            frames = frames + torch.rand(1, generator=generator) * mask[:, None, None, None]
        return frames, mask


def test_augmented_views_are_the_epoch_draws_and_epochs_cycle_through_them(tmp_path: Path) -> None:
    from diffusionret.data.transforms import build_transform
    from diffusionret.training.feature_cache import ensure_view_caches, view_directory

    records = [VideoTextPair(video_id=v, caption=c, video_path=Path(f"/nonexistent/{v}.mp4")) for v, c in CAPTIONS]
    ds = _AugmentedVideos(records, max_words=WORDS, max_frames=FRAMES, size=SIZE, name="synthetic",
                          transform=build_transform(SIZE, "crop_flip"), seed=11)
    model = _model()
    ds.set_epoch(5)
    specs = []
    for view in range(2):
        spec = _spec(tmp_path / "cache", model)
        fp = cache_fingerprint(model, {**spec.meta, "augment": "crop_flip", "view": view}, encode_dtype="float32",
                               store_dtype="float32")
        specs.append(CacheSpec(directory=view_directory(spec.directory, view, 2), fingerprint=fp, meta=spec.meta,
                               batch_size=4, shard_size=4))
    caches = [TrainFeatureCache(p, len(ds)) for p in ensure_view_caches(model, ds, specs, DistContext())]
    assert ds.epoch == 5  # restored
    first, second = caches[0].features, caches[1].features
    assert torch.equal(first.tokens, second.tokens)  # captions are not augmented
    assert not torch.allclose(first.video, second.video)  # each view its own draw
    for view, feats in enumerate((first, second)):  # ... and that draw is the epoch's
        ds.set_epoch(view)
        items = [ds.video_view()[j] for j in range(ds.num_videos)]
        frames, masks = torch.stack([i["frames"] for i in items]), torch.stack([i["frame_mask"] for i in items])
        online = model.encode_video(frames, masks)
        torch.testing.assert_close(feats.video, online, rtol=0, atol=1e-6)
    sampler = TrainSampler(len(ds), GLOBAL_BATCH, DistContext(), seed=3)
    batches = CachedBatches(caches, sampler)
    for epoch, view in ((0, 0), (1, 1), (2, 0), (3, 1)):
        sampler.set_epoch(epoch)
        batch = next(iter(batches))
        expected = caches[view].features.video[batch.video_row]
        assert batches.cache is caches[view] and torch.equal(batch.video, expected)


# ---------------------------------------------------------------------------------------------- two processes
def _dist_worker(rank: int, world: int, port: int, directory: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ctx = DistContext(rank=rank, world_size=world, backend="gloo")
        ds, model = _dataset(), _model()
        # Encoding sharded over both ranks (shard k on rank k % 2).
        spec = _spec(Path(directory) / "dist_cache", model, shard_size=2)
        cache = TrainFeatureCache(ensure_feature_cache(model, ds, spec, ctx), len(ds))
        # The factored form, as ``train`` uses from the cache: local queries against global-batch rows.
        ddp = torch.nn.parallel.DistributedDataParallel(_objective(model, ctx, seed=10 + rank, factored=True))
        sampler = TrainSampler(len(ds), GLOBAL_BATCH, ctx, seed=3)
        sampler.set_epoch(1)
        local = list(sampler)[:GLOBAL_BATCH // world]
        online = _loss_and_grads(model, ddp, stage1_batch_args(collate([ds[i] for i in local]), ctx.device))
        ddp.module.generator.manual_seed(10 + rank)
        cached = _loss_and_grads(model, ddp, cache.batch(local).args(ctx.device))
        captions = [ds.records[i].caption for i in cache.features.text_index.tolist()]
        neg = build_dataset_negatives(model, cache, captions, 4, ctx=ctx, chunk_size=2)
        torch.save({"online": online, "cached": cached, "t2v": neg.t2v, "v2t": neg.v2t},
                   Path(directory) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes
def test_two_processes_build_the_same_cache_and_train_the_same_from_it(tmp_path: Path) -> None:
    ds, model = _dataset(), _model()
    # The same encoding batches as each rank's (2 of a global 4): features are then bit-equal.
    single = _build(tmp_path / "single", model, ds, shard_size=2, batch_size=2)
    captions = [ds.records[i].caption for i in single.features.text_index.tolist()]
    neg = build_dataset_negatives(model, single, captions, 4, ctx=DistContext(), chunk_size=2)
    feats = single.features
    scores = model.similarity(feats.tokens, feats.text_mask, feats.video, feats.frame_mask)
    for r, videos in enumerate(excluded_videos(captions, single.caption_to_video)):
        scores[r, videos] = float("-inf")
    run_workers(_dist_worker, (2, _free_port(), str(tmp_path)), nprocs=2)
    dist = TrainFeatureCache(tmp_path / "dist_cache" / "train.safetensors", len(ds)).features
    for name in ("tokens", "cls", "video", "frame_mask", "caption_to_video", "text_index"):
        assert torch.equal(getattr(dist, name), getattr(single.features, name)), name
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["online"][0]["num_negatives"].item() >= 3  # negatives mined from the global batch
        _assert_same(out["online"], out["cached"])
        # The same neighbours up to the order of equal scores (the random tiny model has many ties at 0).
        assert torch.equal(scores.gather(1, out["t2v"]), scores.gather(1, neg.t2v))
        assert torch.equal(scores.t().gather(1, out["v2t"]), scores.t().gather(1, neg.v2t))
