"""The denoisers' factored training form equals the reference arithmetic (``forward``) up to rounding.

``forward_factored`` is exact algebra (keys and values folded into per-query vectors, the decoder's
first layer split, candidates from a shared bank), so in float64 it must match ``forward``'s x0 and
every parameter gradient to ~1e-9 on every path it can take: per-pair candidates, a bank with the
decoder on the (bank row, query) grid, a bank larger than the lists (gathered), and repeated rows.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusionret.models.denoiser import T2VDenoiser, V2TDenoiser, gather_rows


def _inputs(direction: str, d: int, frames: int, b: int, m: int, n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, m, (b, n), generator=g)  # rows may repeat within a list
    if direction == "t2v":
        bank = torch.randn(m, frames, d, generator=g, dtype=torch.float64)
        mask = (torch.rand(m, frames, generator=g) > 0.3).long()
        mask[:, 0] = 1
        text = torch.randn(b, d, generator=g, dtype=torch.float64)
        per_pair = (text, gather_rows(bank, idx), gather_rows(mask, idx))
        shared = (per_pair[0], bank, mask)
    else:
        bank = torch.randn(m, d, generator=g, dtype=torch.float64)
        video = torch.randn(b, frames, d, generator=g, dtype=torch.float64)
        mask = (torch.rand(b, frames, generator=g) > 0.3).long()
        mask[:, 0] = 1
        per_pair, shared = (gather_rows(bank, idx), video, mask), (bank, video, mask)
    return {"x": torch.randn(b, n, generator=g, dtype=torch.float64), "t": torch.randint(0, 50, (b,), generator=g),
            "idx": idx, "per_pair": per_pair, "shared": shared, "upstream": torch.randn(b, n, generator=g,
                                                                                       dtype=torch.float64)}


def _run(denoiser: torch.nn.Module, call) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    denoiser.zero_grad(set_to_none=True)
    out, upstream = call()
    (out * upstream).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in denoiser.named_parameters()}


def _check(direction: str, d: int, frames: int, b: int, m: int, n: int, seed: int) -> None:
    torch.manual_seed(seed)
    denoiser = (T2VDenoiser if direction == "t2v" else V2TDenoiser)(d, temp=0.5).double()
    inp = _inputs(direction, d, frames, b, m, n, seed)
    x, t, up = inp["x"], inp["t"], inp["upstream"]
    reference = _run(denoiser, lambda: (denoiser(x, t, *inp["per_pair"]), up))
    per_pair = _run(denoiser, lambda: (denoiser.forward_factored(x, t, *inp["per_pair"]), up))
    shared = _run(denoiser, lambda: (denoiser.forward_factored(x, t, *inp["shared"], cand_idx=inp["idx"]), up))
    for out, grads in (per_pair, shared):
        torch.testing.assert_close(out, reference[0], rtol=1e-9, atol=1e-9)
        assert set(grads) == set(reference[1])
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[1][name], rtol=1e-8, atol=1e-9, msg=name)


@pytest.mark.parametrize("direction", ["t2v", "v2t"])
@pytest.mark.parametrize(("d", "frames", "b", "m", "n"), [
    (64, 2, 5, 6, 6),     # t2v: frame bank, decoder on the grid
    (512, 1, 4, 8, 4),    # t2v: frame bank larger than the lists: gathered pairs
    (16, 4, 5, 7, 4),     # t2v: a bank too large for the frame form: per pair
    (32, 3, 1, 1, 1),     # one query, one candidate
])
def test_every_path_of_the_factored_form_equals_forward(direction: str, d: int, frames: int, b: int, m: int,
                                                        n: int) -> None:
    _check(direction, d, frames, b, m, n, seed=d + m)


@settings(max_examples=25, deadline=None)
@given(direction=st.sampled_from(["t2v", "v2t"]), d=st.sampled_from([8, 32, 128]), frames=st.integers(1, 4),
       b=st.integers(1, 6), m=st.integers(1, 10), n=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_the_factored_form_equals_forward_on_any_shapes(direction: str, d: int, frames: int, b: int, m: int, n: int,
                                                        seed: int) -> None:
    _check(direction, d, frames, b, m, n, seed)


def test_the_factored_form_keeps_the_checkpoint_layout() -> None:
    """The split of the decoder's first layer is a view: parameters and state-dict keys are unchanged."""
    for cls in (T2VDenoiser, V2TDenoiser):
        keys = set(cls(8).state_dict())
        assert "decoder.0.weight" in keys and not any("w1" in k for k in keys)
        assert cls(8).state_dict()["decoder.0.weight"].shape == (16, 16)
