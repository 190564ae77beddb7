"""Loading: official checkpoints (variants), OpenAI CLIP files (state dict, TorchScript), our format, errors."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import diffusionret
from diffusionret.cli import main as cli_main
from diffusionret.diffusion.gaussian import GaussianDiffusion
from diffusionret.models.checkpoint import CheckpointError, load_checkpoint, read_metadata
from diffusionret.models.clip_backbone import ClipFormatError, read_openai_clip_file
from diffusionret.models.config import REFERENCE_INPUT, DiffusionSchedule, InputConfig, ModelConfig
from diffusionret.models.factory import build_model
from diffusionret.retrieval import RerankConfig, Reranker


def _features(model, golden):
    inputs = golden["inputs"]
    with torch.no_grad():
        tokens, cls = model.encode_text(inputs["text_ids"], inputs["text_mask"])
        video = model.encode_video(inputs["video"], inputs["video_mask"])
    return tokens, cls, video


def _clip_state(golden):
    return {k[len("clip."):]: v for k, v in golden["checkpoint"].items() if k.startswith("clip.")}


def _head_state(golden):
    return {k: v for k, v in golden["checkpoint"].items() if not k.startswith("clip.") and not k.endswith(".pe")}


def _assert_golden_features(model, golden):
    tokens, cls, video = _features(model, golden)
    out, valid = golden["outputs"], golden["inputs"]["text_mask"].bool()
    torch.testing.assert_close(tokens[valid], out["text_feat"][valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(cls, out["cls"], atol=1e-5, rtol=0)
    torch.testing.assert_close(video, out["video_feat"], atol=1e-5, rtol=0)


def test_build_from_openai_state_dict_plus_head(golden):
    cfg = ModelConfig(agg_module="seqTransf", temporal_layers=golden["config"]["agg_layers"], denoisers=True)
    model = build_model(cfg, clip_state_dict=_clip_state(golden))
    assert model.config.clip.vision_width == golden["config"]["vw"]
    # the reference's initialisation trick: frame positions and temporal layers come from CLIP text
    torch.testing.assert_close(model.frame_position_embeddings.weight, model.clip.positional_embedding)
    torch.testing.assert_close(model.transformerClip.resblocks[0].attn.in_proj_weight,
                               model.clip.transformer.resblocks[0].attn.in_proj_weight)
    missing, unexpected = model.load_state_dict(_head_state(golden), strict=False)
    assert not unexpected and all(k.startswith("clip.") for k in missing)
    _assert_golden_features(model, golden)


class _Holder(nn.Module):
    """A TorchScript-able module tree whose state dict has given (dotted) keys."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key, value in tensors.items():
            *path, leaf = key.split(".")
            node = self
            for part in path:
                if not hasattr(node, part):
                    node.add_module(part, nn.Module())
                node = getattr(node, part)
            if value.ndim == 0 or key in ("input_resolution", "context_length", "vocab_size"):
                node.register_buffer(leaf, value)
            else:
                node.register_parameter(leaf, nn.Parameter(value, requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_torchscript_clip_archive(golden, tmp_path):
    state = _clip_state(golden)
    # OpenAI's archives store most Linear/attention weights in fp16; check dtype conversion too.
    state = {k: (v.half() if k.endswith("in_proj_weight") else v) for k, v in state.items()}
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.script(_Holder(state)).save(str(path))
    read = read_openai_clip_file(path)
    assert "input_resolution" not in read and read["transformer.resblocks.0.attn.in_proj_weight"].dtype == torch.float16
    model = build_model(ModelConfig(temporal_layers=2), clip_path=path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    expected = state["visual.transformer.resblocks.0.attn.in_proj_weight"].float()
    torch.testing.assert_close(model.clip.visual.transformer.resblocks[0].attn.in_proj_weight, expected)


def test_plain_state_dict_clip_file(golden, tmp_path):
    path = tmp_path / "clip_state.pt"
    torch.save(_clip_state(golden), path)
    model = build_model(ModelConfig(temporal_layers=2, denoisers=True), clip_path=path)
    assert not model.load_state_dict(_head_state(golden), strict=False).unexpected_keys
    _assert_golden_features(model, golden)


def test_official_checkpoint_variants(golden, tmp_path):
    ckpt = golden["checkpoint"]
    # module. prefixes, fp16 tensors and no duplicated pe buffers must all load to the same model
    variant = OrderedDict((f"module.{k}", v.half() if v.is_floating_point() else v)
                          for k, v in ckpt.items() if not k.endswith(".pe"))
    path = tmp_path / "best.pth"
    torch.save(variant, path)
    model = diffusionret.load_model(path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ref = diffusionret.load_model(ckpt)
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b.half().float(), atol=0, rtol=0, msg=name)


def test_stage1_checkpoint_has_no_denoisers(golden):
    stage1 = {k: v for k, v in golden["checkpoint"].items() if not k.startswith("diffusion_model")}
    model = diffusionret.load_model(stage1)
    assert not model.config.denoisers and not model.has_denoisers
    with pytest.raises(RuntimeError, match="no denoisers"):
        Reranker(model, RerankConfig(top_k=4))


def test_missing_unexpected_and_shape_errors(golden):
    ckpt = dict(golden["checkpoint"])
    broken = dict(ckpt)
    del broken["text_weight_fc.0.weight"]
    broken["something.extra"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as info:
        diffusionret.load_model(broken)
    assert "text_weight_fc.0.weight" in str(info.value) and "something.extra" in str(info.value)
    bad_shape = dict(ckpt)
    bad_shape["video_weight_fc.2.weight"] = torch.zeros(1, 7)
    with pytest.raises(CheckpointError, match="video_weight_fc.2.weight"):
        diffusionret.load_model(bad_shape)


def test_corrupt_and_foreign_files(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x03this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt.pth"):
        diffusionret.load_model(corrupt)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        diffusionret.load_model(empty)
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(10, 4)}, foreign)
    with pytest.raises(CheckpointError, match="not a DiffusionRet checkpoint"):
        diffusionret.load_model(foreign)
    with pytest.raises(FileNotFoundError):
        diffusionret.load_model(tmp_path / "nope.pth")


def test_unknown_clip_layout(tmp_path):
    path = tmp_path / "rn50.pt"
    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(4, 4, 1, 1), "text_projection": torch.zeros(4, 4)}, path)
    with pytest.raises(ClipFormatError, match="ResNet"):
        build_model(clip_path=path)
    junk = tmp_path / "junk.pt"
    torch.save({"a": torch.zeros(2)}, junk)
    with pytest.raises(ClipFormatError, match="missing"):
        build_model(clip_path=junk)


def test_own_format_roundtrip(golden, tmp_path):
    loaded = load_checkpoint(golden["checkpoint"])
    model = loaded.model
    # official weights record no settings: the reference's, in one place
    assert loaded.input == REFERENCE_INPUT.replace(size=model.image_size) and not loaded.input_recorded
    assert loaded.diffusion == DiffusionSchedule(50, "cosine")
    inp = InputConfig(max_frames=8, fps=2.0, sampling="head", size=model.image_size, max_words=24)
    path = diffusionret.save_model(model, tmp_path / "m.safetensors", metadata={"note": "x"}, input_config=inp,
                                   diffusion=DiffusionSchedule(30, "linear"))
    meta = read_metadata(path)
    assert meta["format"] == "diffusionret" and meta["note"] == "x" and meta["format_version"] == "2"
    again = load_checkpoint(path)
    assert again.model.config == model.config and again.diffusion == DiffusionSchedule(30, "linear")
    assert again.input == inp and again.input_recorded
    for (n, a), (_, b) in zip(model.state_dict().items(), again.model.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)
    # a folder with model.safetensors loads too
    (tmp_path / "run").mkdir()
    diffusionret.save_model(model, tmp_path / "run" / "model.safetensors")
    assert diffusionret.load_model(tmp_path / "run").config == model.config


def test_removed_sampler_arguments_name_the_replacement(golden):
    with pytest.raises(TypeError, match=r"no longer takes diffusion_steps.*RerankConfig"):
        diffusionret.load_model(golden["checkpoint"], diffusion_steps=30)
    with pytest.raises(TypeError, match="noise_schedule"):
        diffusionret.load_model(golden["checkpoint"], noise_schedule="linear")


def _legacy_safetensors(model, path, config_changes, extra):
    """A file as the first format version wrote it: ``stage`` and the sampler in the config, ``data`` unversioned."""
    import json

    from safetensors.torch import save_file

    config = diffusionret.save_model(model, path) and json.loads(read_metadata(path)["diffusionret_config"])
    config.pop("denoisers")
    config.update(config_changes)
    meta = {"format": "diffusionret", "format_version": "1", "diffusionret_config": json.dumps(config), **extra}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path


def test_first_format_version_files_load_with_their_settings(golden, tmp_path):
    import json

    model = diffusionret.load_model(golden["checkpoint"])
    data = {"max_frames": 6, "fps": 3.0, "sampling": "tail", "max_words": 20, "size": model.image_size}
    path = _legacy_safetensors(model, tmp_path / "old.safetensors",
                               {"stage": "generation", "diffusion_steps": 10, "noise_schedule": "linear"},
                               {"data": json.dumps(data)})
    loaded = load_checkpoint(path)
    assert loaded.model.config == model.config and loaded.model.config.denoisers
    assert loaded.diffusion == DiffusionSchedule(10, "linear")
    assert loaded.input == InputConfig(**data) and loaded.input_recorded
    # without "size" (older training runs): the model's image size; without "data": the reference's
    del data["size"]
    path = _legacy_safetensors(model, tmp_path / "older.safetensors", {"stage": "generation"},
                               {"data": json.dumps(data)})
    assert load_checkpoint(path).input.size == model.image_size
    path = _legacy_safetensors(model, tmp_path / "plain.safetensors", {"stage": "generation"}, {})
    assert load_checkpoint(path).input == InputConfig.for_image_size(model.image_size)
    # a stage that contradicts the weights is an error, not a guess
    path = _legacy_safetensors(model, tmp_path / "wrong.safetensors", {"stage": "discrimination"}, {})
    with pytest.raises(CheckpointError, match="wrong.safetensors"):
        load_checkpoint(path)


@pytest.mark.parametrize("key,value", [
    ("diffusionret_input", "{not json"),
    ("diffusionret_input", '{"version": 1, "max_frames": 0}'),
    ("diffusionret_input", '{"version": 7, "max_frames": 12}'),
    ("diffusionret_input", '{"version": 1, "frames": 12}'),
    ("diffusionret_diffusion", '{"steps": -1, "schedule": "cosine"}'),
    ("data", '["not", "a", "mapping"]'),
])
def test_malformed_recorded_settings_are_errors_naming_the_file(golden, tmp_path, key, value):
    from safetensors.torch import save_file

    model = diffusionret.load_model(golden["checkpoint"])
    path = diffusionret.save_model(model, tmp_path / "bad.safetensors")
    meta = {**read_metadata(path), key: value}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_checkpoint(path)


def test_convert_cli(golden, tmp_path):
    src = tmp_path / "best.pth"
    torch.save(golden["checkpoint"], src)
    dst = tmp_path / "converted.safetensors"
    assert cli_main(["convert", str(src), str(dst), "--max-words", "24"]) == 0
    loaded = load_checkpoint(dst)
    _assert_golden_features(loaded.model, golden)
    assert loaded.input == REFERENCE_INPUT.replace(max_words=24, size=32) and loaded.input_recorded


def test_api_shape_errors(golden):
    model = diffusionret.load_model(golden["checkpoint"])
    inputs = golden["inputs"]
    with pytest.raises(ValueError, match="frames must be"):
        model.encode_video(inputs["video"][:, :, :, :16], inputs["video_mask"])
    with pytest.raises(ValueError, match="frame_mask"):
        model.encode_video(inputs["video"], inputs["video_mask"][:, :3])
    with pytest.raises(ValueError, match="differ in shape"):
        model.encode_text(inputs["text_ids"], inputs["text_mask"][:, :5])
    with pytest.raises(TypeError, match="token ids"):
        model.encode_text(inputs["text_ids"].float(), inputs["text_mask"])
    tokens, cls, video = _features(model, golden)
    with pytest.raises(ValueError, match="widths differ"):
        model.similarity(tokens[..., :10], inputs["text_mask"], video, inputs["video_mask"])
    with pytest.raises(ValueError, match="denoise_t2v"):
        model.denoise_t2v(inputs["x_t"], inputs["t"], cls, video, inputs["video_mask"])
    with pytest.raises(ValueError, match="timesteps"):
        GaussianDiffusion(50).q_sample(inputs["micro"], torch.full((6,), 50), inputs["q_noise"])
    with pytest.raises(ValueError, match="noise must have shape"):
        Reranker(model, RerankConfig(top_k=4)).t2v(golden["outputs"]["sim"], cls, video, inputs["video_mask"],
                                                   noise=torch.zeros(3, 4))


def test_half_precision_on_request(golden):
    model = build_model(ModelConfig.tiny(), half=True)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in build_model(ModelConfig.tiny()).parameters())
