"""The model fingerprint is stable across versions: indexes built before the sampler left the model
config must still match the same weights.

The two digests were computed with the previous release's ``diffusionret.index.identity.model_fingerprint``
(whose ModelConfig still had ``stage``, ``diffusion_steps`` and ``noise_schedule``) on the model
:func:`_fixed_model` builds, with::

    model = DiffusionRet(ModelConfig.tiny(stage=stage, diffusion_steps=10))  # then the same fill
"""

from __future__ import annotations

import pytest
import torch

from diffusionret.models.config import ModelConfig
from diffusionret.models.diffusionret import DiffusionRet
from diffusionret.models.fingerprint import identity_config, model_fingerprint

LEGACY_DIGESTS = {
    False: "eee9c87bf180ee347bedb72c308fa78555aefd7ed2008416aef47c6c58546cc9",  # stage: discrimination
    True: "91490d720cee01af2ffa33d1fd8ebe826e9e61ce22ee17abf1178bade6035165",  # stage: generation
}


def _fixed_model(denoisers: bool) -> DiffusionRet:
    """A tiny model whose every float tensor is a fixed pattern (independent of any random init)."""
    torch.manual_seed(0)
    model = DiffusionRet(ModelConfig.tiny(denoisers=denoisers))
    state = model.state_dict()
    with torch.no_grad():
        for i, name in enumerate(sorted(state)):
            tensor = state[name]
            if tensor.is_floating_point():
                pattern = torch.arange(tensor.numel(), dtype=torch.float64) % 7 / 7 * (i % 3 + 1) - 0.5
                tensor.copy_(pattern.view_as(tensor).to(tensor.dtype))
    return model


@pytest.mark.parametrize("denoisers", [False, True])
def test_fingerprint_equals_the_previous_release(denoisers):
    assert model_fingerprint(_fixed_model(denoisers)) == LEGACY_DIGESTS[denoisers]


def test_identity_config_has_the_legacy_shape():
    config = identity_config(_fixed_model(True))
    assert config["stage"] == "generation" and "denoisers" not in config
    assert not {"diffusion_steps", "noise_schedule"} & set(config)


def test_fingerprint_covers_weights_and_architecture():
    a, b = _fixed_model(True), _fixed_model(True)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.text_weight_fc[0].bias[0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
    b = _fixed_model(True)
    b.config = b.config.replace(denoiser_temp=2.0)
    assert model_fingerprint(a) != model_fingerprint(b)
