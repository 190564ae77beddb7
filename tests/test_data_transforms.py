"""Frame transforms: the reference's CLIP preprocessing (oracle: torchvision on PIL) and augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from diffusionret.data.transforms import (
    ClipTransform,
    RandAugmentPolicy,
    TrainTransform,
    build_transform,
    center_crop,
    clip_mean_std,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def random_video(t: int = 3, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_clip_constants_come_from_open_clip_and_match_the_spec():
    mean, std = clip_mean_std()
    assert mean == CLIP_MEAN and std == CLIP_STD


@pytest.mark.parametrize(("h", "w", "size"), [(48, 64, 32), (64, 48, 32), (49, 65, 24), (40, 40, 40), (30, 80, 32)])
def test_clip_transform_matches_torchvision_pipeline(h, w, size):
    video = random_video(h=h, w=w)
    reference = T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            lambda image: image.convert("RGB"),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    expected = torch.stack([reference(Image.fromarray(frame)) for frame in video])
    actual = ClipTransform(size)(video)
    assert actual.shape == (3, 3, size, size) and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_center_crop_offsets_round_like_torchvision():
    frames = torch.arange(42 * 32).view(1, 1, 42, 32)
    out = center_crop(frames, 32)
    assert out.shape == (1, 1, 32, 32) and out[0, 0, 0, 0].item() == 5 * 32  # top = round(10 / 2) = 5
    small = center_crop(torch.ones(1, 3, 20, 30, dtype=torch.uint8), 24)  # padded with zeros
    assert small.shape == (1, 3, 24, 24) and small.sum().item() == 3 * 20 * 24


def test_rejects_wrong_layout():
    with pytest.raises(ValueError, match="uint8 frames"):
        ClipTransform(32)(np.zeros((3, 3, 48, 64), np.uint8))


@pytest.mark.parametrize("augment", ["crop_flip", "randaugment", "crop_flip_randaugment"])
def test_train_augmentation_is_consistent_across_frames_and_reproducible(augment):
    transform = build_transform(32, augment)
    assert isinstance(transform, TrainTransform)
    frame = random_video(t=1)[0]
    video = np.stack([frame] * 4)  # identical frames must stay identical: one draw per video
    draws = []
    for seed in range(6):
        out = transform(video, torch.Generator().manual_seed(seed))
        assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
        for t in range(1, 4):
            torch.testing.assert_close(out[t], out[0], rtol=0, atol=0)
        again = transform(video, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(again, out, rtol=0, atol=0)
        draws.append(out[0])
    # Different seeds give different views (not all equal to the first).
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert not torch.equal(draws[0], ClipTransform(32)(video)[0]) or not torch.equal(draws[1], draws[0])


def test_full_crop_with_forced_flip_is_a_mirror():
    video = random_video(h=32, w=32)
    transform = TrainTransform(32, crop_flip=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=1.0)
    out = transform(video, torch.Generator().manual_seed(0))
    expected = ClipTransform(32)(np.ascontiguousarray(video[:, :, ::-1]))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("op", RandAugmentPolicy.OPS)
def test_every_randaugment_op_runs_and_keeps_shape(op):
    # Low contrast with structure and texture, so that every op visibly changes something.
    ramp = np.linspace(60, 180, 32)[None, :, None] + np.linspace(0, 20, 32)[:, None, None]
    noisy = ramp + random_video(t=2, h=32, w=32).astype(np.float64) / 16
    video = torch.from_numpy(noisy.clip(0, 255).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()
    for sign in (1.0, -1.0):
        out = RandAugmentPolicy.apply(video, [(op, 0.7, sign)])
        assert out.shape == video.shape and out.dtype == torch.uint8
        assert not torch.equal(out, video)


def test_policy_sampling_respects_probability():
    generator = torch.Generator().manual_seed(0)
    assert RandAugmentPolicy(num_ops=4, prob=0.0).sample(generator) == []
    ops = RandAugmentPolicy(num_ops=4, prob=1.0).sample(generator)
    assert len(ops) == 4 and all(0.0 <= m <= 1.0 and s in (1.0, -1.0) for _, m, s in ops)


def test_build_transform_names():
    assert build_transform(224, "none") == ClipTransform(224)
    with pytest.raises(ValueError, match="unknown augment"):
        build_transform(224, "mixup")
