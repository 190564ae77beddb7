"""The project's training objectives reproduce the reference's losses and gradients.

Golden data: tests/data/reference_tiny_a_train.pt (the reference's own training forward and
``backward()`` on the model of reference_tiny_a.pt, dropout 0; see GOLDEN_README.md). The batch has
unique video ids, so the duplicate-aware contrastive loss must agree with the reference exactly.
Losses within 1e-5 (relative or absolute); gradients, which are sums of many float32 terms,
within 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import diffusionret
from diffusionret.diffusion.gaussian import GaussianDiffusion
from diffusionret.distributed import DistContext
from diffusionret.training.stage1_contrastive import ContrastiveObjective, prepare_stage1_model
from diffusionret.training.stage2_diffusion import GenerationObjective, prepare_stage2_model

TRAIN_GOLDEN = Path(__file__).parent / "data" / "reference_tiny_a_train.pt"
TOKEN_EMBEDDING = "clip.token_embedding.weight"
DENOISERS = ("diffusion_model.", "diffusion_model_v.")


@pytest.fixture(scope="module")
def train_golden() -> dict:
    return torch.load(TRAIN_GOLDEN, weights_only=True)


def _batch(inputs: dict) -> tuple[torch.Tensor, ...]:
    return inputs["text_ids"], inputs["text_mask"], inputs["video"], inputs["video_mask"], inputs["video_ids"]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_stage1_objective_matches_the_reference(golden: dict, train_golden: dict) -> None:
    # A discrimination-stage model: the golden checkpoint without its denoisers.
    state = {k: v for k, v in golden["checkpoint"].items() if not k.startswith(DENOISERS)}
    model = prepare_stage1_model(diffusionret.load_model(state))
    inputs, out = train_golden["inputs"], train_golden["outputs"]

    result = ContrastiveObjective(model, DistContext())(*_batch(inputs))
    torch.testing.assert_close(result["loss"], out["stage1_loss"], atol=1e-5, rtol=1e-5)
    result["loss"].backward()

    grads = _grads(model)
    # The same trainable set as the reference (conv1 frozen); the token embedding is compared by row.
    assert set(grads) == set(out["stage1_grads"]) | {TOKEN_EMBEDDING}
    for name, expected in out["stage1_grads"].items():
        torch.testing.assert_close(grads[name], expected, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    ids = out["stage1_token_embedding_ids"]
    torch.testing.assert_close(grads[TOKEN_EMBEDDING][ids], out["stage1_token_embedding_grad_rows"],
                               atol=1e-4, rtol=1e-4)
    others = torch.ones(grads[TOKEN_EMBEDDING].shape[0], dtype=torch.bool)
    others[ids] = False
    assert not grads[TOKEN_EMBEDDING][others].any()  # tokens outside the batch get no gradient


class _RecordedDraws(GenerationObjective):
    """The generation objective with the reference's recorded ``t`` and q_sample noise."""

    def __init__(self, *args, draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.draws = draws

    def draw_noise(self, n: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t, noise_t2v, noise_v2t = self.draws
        assert t.shape == (n,) and noise_t2v.shape == noise_v2t.shape == (n, k)
        return t, noise_t2v, noise_v2t


@pytest.mark.parametrize("factored", [False, True], ids=["reference-form", "factored-form"])
def test_stage2_objective_matches_the_reference(golden: dict, train_golden: dict, factored: bool) -> None:
    """Both denoiser forms: the reference's arithmetic (online) and the factored one (from the cache)."""
    model = prepare_stage2_model(diffusionret.load_model(golden["checkpoint"]))
    inputs, out, cfg = train_golden["inputs"], train_golden["outputs"], train_golden["config"]
    objective = _RecordedDraws(model, DistContext(), num_negatives=cfg["num"], negative_label=0,
                               loss_temp=cfg["d_temp"], generator=torch.Generator(),
                               diffusion=GaussianDiffusion(50, "cosine"),  # the reference's setting
                               draws=(inputs["t"], inputs["noise_t2v"], inputs["noise_v2t"]), factored=factored)
    objective.train()

    result = objective(*_batch(inputs))
    assert result["num_negatives"].item() == cfg["num"]
    torch.testing.assert_close(result["gen_loss"], out["stage2_gen_loss"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result["disc_loss"], out["stage2_disc_loss"], atol=1e-5, rtol=1e-5)
    # The reference's total adds the (frozen, gradient-free) contrastive term.
    torch.testing.assert_close(result["gen_loss"] + result["disc_loss"], out["stage2_loss"], atol=1e-5, rtol=1e-5)
    result["loss"].backward()

    grads = _grads(model)
    assert set(grads) == set(out["stage2_grads"])  # only the 26 denoiser tensors learn
    for name, expected in out["stage2_grads"].items():
        torch.testing.assert_close(grads[name], expected, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
