"""The reference's own outputs (tests/data/reference_tiny_a.pt) reproduced through the public API.

Tolerances are those of the golden README: 1e-5 for features, similarity, denoisers and losses;
1e-4 for DDIM samples and re-ranked matrices (float32, CPU).
"""

from __future__ import annotations

import pytest
import torch

import diffusionret
from diffusionret.diffusion.gaussian import GaussianDiffusion
from diffusionret.distributed import DistContext
from diffusionret.retrieval import RerankConfig, Reranker
from diffusionret.training.losses import symmetric_info_nce

# The reference evaluates with 50 cosine steps (official checkpoints record no sampler).
DIFFUSION = GaussianDiffusion(50, "cosine")


@pytest.fixture(scope="module")
def setup(golden):
    model = diffusionret.load_model(golden["checkpoint"])
    inputs = golden["inputs"]
    with torch.no_grad():
        tokens, cls = model.encode_text(inputs["text_ids"], inputs["text_mask"])
        video = model.encode_video(inputs["video"], inputs["video_mask"])
    return model, inputs, golden["outputs"], tokens, cls, video


def test_architecture_inferred_from_tensors(golden):
    model = diffusionret.load_model(golden["checkpoint"])
    cfg, gcfg = model.config, golden["config"]
    assert cfg.denoisers and model.has_denoisers
    assert cfg.agg_module == "seqTransf" and cfg.temporal_layers == gcfg["agg_layers"]
    assert (cfg.clip.vision_width, cfg.clip.vision_layers, cfg.clip.vision_patch_size, cfg.clip.image_size) == (
        gcfg["vw"], gcfg["vl"], gcfg["patch"], gcfg["res"])
    assert (cfg.clip.text_width, cfg.clip.text_layers, cfg.clip.embed_dim) == (gcfg["tw"], gcfg["tl"], gcfg["emb"])
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_text_features(setup):
    _, inputs, out, tokens, cls, _ = setup
    valid = inputs["text_mask"].bool()
    torch.testing.assert_close(tokens[valid], out["text_feat"][valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(cls, out["cls"], atol=1e-5, rtol=0)


def test_video_features(setup):
    _, _, out, _, _, video = setup
    torch.testing.assert_close(video, out["video_feat"], atol=1e-5, rtol=0)


def test_similarity(setup):
    model, inputs, out, tokens, _, video = setup
    sim = model.similarity(tokens, inputs["text_mask"], video, inputs["video_mask"])
    torch.testing.assert_close(sim, out["sim"], atol=1e-5, rtol=0)
    # chunking must not change anything
    torch.testing.assert_close(model.similarity(tokens, inputs["text_mask"], video, inputs["video_mask"], chunk_size=1), sim)


def test_denoisers(setup):
    model, inputs, out, _, cls, video = setup
    k, kv, mask = inputs["topk_t2v"], inputs["topk_v2t"], inputs["video_mask"]
    with torch.no_grad():
        t2v = model.denoise_t2v(inputs["x_t"], inputs["t"], cls, video[k], mask[k])
        v2t = model.denoise_v2t(inputs["x_t"], inputs["t"], cls[kv], video, mask)
    torch.testing.assert_close(t2v, out["denoise_t2v"], atol=1e-5, rtol=0)
    torch.testing.assert_close(v2t, out["denoise_v2t"], atol=1e-5, rtol=0)


def test_q_sample_and_losses(setup):
    model, inputs, out, tokens, cls, video = setup
    k, mask = inputs["topk_t2v"], inputs["video_mask"]
    q = DIFFUSION.q_sample(inputs["micro"], inputs["q_t"], inputs["q_noise"])
    torch.testing.assert_close(q, out["q_sample"], atol=1e-5, rtol=0)
    with torch.no_grad():
        loss = DIFFUSION.generation_loss(model.denoise_t2v, inputs["micro"], inputs["q_t"], inputs["q_noise"], temp=100.0,
                                               cls=cls, cand_video=video[k], cand_mask=mask[k])
    torch.testing.assert_close(loss, out["gen_loss_t2v"], atol=1e-5, rtol=0)
    # The project's stage-1 loss (unique videos: each text's positive is its own video).
    with torch.no_grad():
        disc = symmetric_info_nce(model.similarity, tokens, inputs["text_mask"], video, inputs["video_mask"],
                                  torch.arange(video.shape[0]), model.logit_scale, DistContext()).loss
    torch.testing.assert_close(disc, out["disc_loss"], atol=1e-5, rtol=0)


def test_ddim(setup):
    model, inputs, out, _, cls, video = setup
    k, kv, mask = inputs["topk_t2v"], inputs["topk_v2t"], inputs["video_mask"]
    x = DIFFUSION.ddim_sample(model.denoise_t2v, inputs["ddim_noise"], cls=cls, cand_video=video[k], cand_mask=mask[k])
    torch.testing.assert_close(x, out["ddim_t2v"], atol=1e-4, rtol=0)
    x = DIFFUSION.ddim_sample(model.denoise_v2t, inputs["ddim_noise"], cand_cls=cls[kv], video=video, frame_mask=mask)
    torch.testing.assert_close(x, out["ddim_v2t"], atol=1e-4, rtol=0)


def test_rerank(setup):
    model, inputs, out, tokens, cls, video = setup
    noise = inputs["rerank_noise"]
    k = inputs["ddim_noise"].shape[1]
    n_t2v = -(-inputs["text_ids"].shape[0] // k)  # the reference consumes ceil(B/K) chunks per direction
    t2v, v2t = Reranker(model, RerankConfig(top_k=k)).both(out["sim"], cls, video, inputs["video_mask"],
                                                           noise_t2v=torch.cat(noise[:n_t2v]),
                                                           noise_v2t=torch.cat(noise[n_t2v:]))
    torch.testing.assert_close(t2v, out["rerank_t2v"], atol=1e-4, rtol=0)
    torch.testing.assert_close(v2t, out["rerank_v2t"], atol=1e-4, rtol=0)


def test_rerank_generator_reproducible(setup):
    model, inputs, out, tokens, cls, video = setup
    runs = [Reranker(model, RerankConfig(top_k=4)).both(out["sim"], cls, video, inputs["video_mask"],
                                                        generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=0, rtol=0)
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=0, rtol=0)
