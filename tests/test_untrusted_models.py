"""Model files from untrusted sources: a safe torch is required, and code-running loaders come last."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

import diffusionret
from diffusionret.models.checkpoint import CheckpointError
from diffusionret.models.clip_backbone import read_openai_clip_file

ROOT = Path(__file__).resolve().parents[1]


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.arange(6.0).reshape(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_the_package_requires_a_torch_with_safe_weights_only_loading() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_dep = next(d for d in deps if d.replace(" ", "").startswith("torch>="))
    major, minor = (int(x) for x in torch_dep.split(">=")[1].split(",")[0].split(".")[:2])
    assert (major, minor) >= (2, 6)


@pytest.mark.parametrize("version", ["2.5.1", "2.1.0+cu118", "1.13.1"])
def test_an_old_torch_is_refused_with_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    version: str) -> None:
    path = tmp_path / "official.pth"
    torch.save({"clip.logit_scale": torch.tensor(1.0)}, path)
    clip = tmp_path / "clip.pt"
    torch.save({"visual.proj": torch.zeros(2, 2)}, clip)
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(CheckpointError, match=r"torch>=2\.6"):
        diffusionret.load_model(path)
    with pytest.raises(RuntimeError, match=r"cannot load model files safely"):
        read_openai_clip_file(clip)


def test_a_plain_zip_checkpoint_never_reaches_torchscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "clip_state.pt"
    torch.save({"visual.proj": torch.ones(2, 2), "input_resolution": torch.tensor(224)}, path)  # a zip since torch 1.6

    def no_torchscript(*args, **kwargs):
        raise AssertionError("torch.jit.load called on a file that is not a TorchScript archive")

    monkeypatch.setattr(torch.jit, "load", no_torchscript)
    state = read_openai_clip_file(path)
    assert torch.equal(state["visual.proj"], torch.ones(2, 2)) and "input_resolution" not in state


def test_torchscript_only_for_torchscript_archives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "ViT.pt"
    torch.jit.script(_Holder()).save(str(archive))
    calls = []
    real = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert torch.equal(read_openai_clip_file(archive)["weight"], torch.arange(6.0).reshape(2, 3))
    assert len(calls) == 1
    junk = tmp_path / "junk.pt"
    import zipfile

    with zipfile.ZipFile(junk, "w") as handle:  # a zip with a code/ folder but not TorchScript
        handle.writestr("archive/code/readme.txt", "hello")
    with pytest.raises(ValueError, match="junk.pt"):
        read_openai_clip_file(junk)
    assert len(calls) == 1


def test_safetensors_clip_weights_are_read_without_unpickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "clip.safetensors"
    save_file({"visual.proj": torch.full((2, 2), 3.0)}, str(path))
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("unpickled")))
    assert torch.equal(read_openai_clip_file(path)["visual.proj"], torch.full((2, 2), 3.0))
