"""Optimizer groups, LR schedule, hard-negative mining, EMA, RNG capture, stage-2 loss."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from diffusionret.diffusion.gaussian import GaussianDiffusion
from diffusionret.models.config import ModelConfig
from diffusionret.models.factory import build_model
from diffusionret.training.checkpoint import capture_rng_state, restore_rng_state
from diffusionret.distributed import DistContext
from diffusionret.training.ema import ModelEMA
from diffusionret.training.negatives import cap_num_negatives, candidate_indices, mine_hard_negatives
from diffusionret.training.optim import build_optimizer, build_param_groups, build_scheduler, warmup_cosine
from diffusionret.training.stage2_diffusion import (
    GenerationObjective,
    joint_distribution_target,
    prepare_stage2_model,
)


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig.tiny(), generator=torch.Generator().manual_seed(0))


def test_param_groups_follow_the_reference(tiny: nn.Module) -> None:
    groups = {g["name"]: g for g in build_param_groups(tiny, lr=1e-4, clip_lr_scale=1e-3, weight_decay=0.2)}
    assert set(groups) == {"clip_decay", "clip_no_decay", "other_decay", "other_no_decay"}
    names = {id(p): n for n, p in tiny.named_parameters()}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert groups["clip_decay"]["lr"] == pytest.approx(1e-7) and groups["other_decay"]["lr"] == 1e-4
    assert groups["clip_decay"]["weight_decay"] == 0.2 and groups["clip_no_decay"]["weight_decay"] == 0.0
    # CLIP's norms are ln_*: no decay on them (the reference's LayerNorm. pattern missed them), nor on biases.
    assert "clip.ln_final.weight" in members["clip_no_decay"] and "clip.logit_scale" in members["clip_no_decay"]
    assert "clip.transformer.resblocks.0.attn.in_proj_bias" in members["clip_no_decay"]
    assert "clip.token_embedding.weight" in members["clip_decay"]
    # transformerClip is the temporal module, not CLIP: base learning rate.
    assert any(n.startswith("transformerClip.") for n in members["other_decay"])
    assert not any(n.startswith("transformerClip.") for n in members["clip_decay"] | members["clip_no_decay"])
    # conv1 is frozen (docs/reference.md §1.8) and in no group.
    assert all("clip.visual.conv1.weight" not in m for m in members.values())


def test_warmup_cosine_table() -> None:
    # 10 steps, 2 of warm-up: (s+1)/2 during warm-up, then a cosine from 1 to 0 over the other 8.
    table = [warmup_cosine(s, 2, 10) for s in range(11)]
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)] + [0.0]
    assert table == pytest.approx(expected)
    assert warmup_cosine(0, 0, 5) == 1.0 and warmup_cosine(50, 0, 5) == 0.0  # never rises again


def test_scheduler_drives_adamw_over_the_real_step_count(tiny: nn.Module) -> None:
    model = build_model(ModelConfig.tiny())
    opt = build_optimizer(model, lr=1e-3, clip_lr_scale=0.1, weight_decay=0.2)
    sched = build_scheduler(opt, total_steps=20, warmup_proportion=0.1)
    lrs = []
    for _ in range(20):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0][0] > 0  # the first update is not wasted (reference: lr 0)
    assert max(l[0] for l in lrs) == pytest.approx(max(g["initial_lr"] for g in opt.param_groups[:1]))
    assert lrs[-1][0] < lrs[2][0] and all(a[0] >= b[0] for a, b in zip(lrs[2:], lrs[3:]))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.98)


def test_mining_never_returns_a_copy_of_the_query_video() -> None:
    keys = torch.tensor([1, 2, 1, 3, 4])
    positives = keys[:, None] == keys[None, :]
    scores = torch.tensor([[0.9, 0.1, 0.95, 0.3, 0.2],
                           [0.2, 0.8, 0.4, 0.1, 0.5],
                           [0.9, 0.3, 0.9, 0.7, 0.6],
                           [0.1, 0.2, 0.3, 0.9, 0.4],
                           [0.5, 0.4, 0.3, 0.2, 0.1]])
    num, usable = cap_num_negatives(127, positives)
    assert num == 3 and usable.all()  # rows of video 1 have 3 negatives: capped, positives never used
    neg = mine_hard_negatives(scores, positives, num)
    assert neg[0].tolist() == [3, 4, 1] and neg[2].tolist() == [3, 4, 1] and neg[4].tolist() == [0, 1, 2]
    cand = candidate_indices(scores, positives, torch.arange(5), num)
    assert cand[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert not positives.gather(1, cand[:, 1:]).any()
    with pytest.raises(ValueError, match="exceeds"):
        mine_hard_negatives(scores, positives, 4)
    same = torch.ones(2, 2, dtype=torch.bool)
    assert cap_num_negatives(5, same)[0] == 0


def test_joint_distribution_target() -> None:
    assert joint_distribution_target(2, 3, 0).tolist() == [[1, 0, 0], [1, 0, 0]]
    assert joint_distribution_target(1, 3, -1).tolist() == [[1, -1, -1]]


def test_ema_starts_from_the_model_and_swaps_back(tiny: nn.Module) -> None:
    model = nn.Linear(3, 2)
    ema = ModelEMA(model, 0.5)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], before + 1.0)
    with ema.applied_to(model):
        torch.testing.assert_close(model.weight, before + 1.0)
    torch.testing.assert_close(model.weight, before + 2.0)
    state = ema.state_dict()
    other = ModelEMA(model, 0.9)
    other.load_state_dict(state)
    assert other.decay == 0.5 and torch.equal(other.shadow["weight"], ema.shadow["weight"])


def test_rng_capture_restores_every_stream() -> None:
    gen = torch.Generator().manual_seed(3)
    state = capture_rng_state({"g": gen})
    first = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    restore_rng_state(state, {"g": gen})
    again = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    assert first == again


def test_generation_objective_trains_only_the_denoisers(tiny: nn.Module) -> None:
    torch.manual_seed(1)
    model = prepare_stage2_model(build_model(ModelConfig.tiny(), generator=torch.Generator().manual_seed(1)))
    gen = torch.Generator().manual_seed(0)
    objective = GenerationObjective(model, DistContext(), num_negatives=127, negative_label=0, loss_temp=100.0,
                                    generator=gen, diffusion=GaussianDiffusion(50, "cosine"))
    objective.train()
    assert not model.clip.training and model.diffusion_model.training
    b = 5
    ids = torch.zeros(b, 8, dtype=torch.long)
    ids[:, 0], ids[:, 1:4], ids[:, 4] = 49406, torch.randint(1, 4000, (b, 3)), 49407
    mask = (ids > 0).long()
    frames, frame_mask = torch.randn(b, 3, 3, 32, 32), torch.ones(b, 3, dtype=torch.long)
    keys = torch.tensor([7, 7, 8, 9, 10])
    out = objective(ids, mask, frames, frame_mask, keys)
    assert out["num_negatives"].item() == 3  # rows of video 7 have 3 negatives; 127 capped
    out["loss"].backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith(("diffusion_model.", "diffusion_model_v.")) for n in grads)
    # t and the noise come from the generator only: same state, same loss; next draw, another loss.
    other = objective(ids, mask, frames, frame_mask, keys)["loss"]
    gen.manual_seed(0)
    again = objective(ids, mask, frames, frame_mask, keys)["loss"]
    assert torch.equal(again, out["loss"].detach()) and not torch.equal(other, again)
