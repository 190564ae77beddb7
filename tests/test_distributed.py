"""Distributed training pieces: 2-process gloo runs against one process on the same global batch."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from diffusionret.models.config import ModelConfig
from diffusionret.models.factory import build_model
from diffusionret.distributed import DistContext, TrainSampler, all_gather_variable, shard_range
from diffusionret.training.losses import symmetric_info_nce
from diffusionret.training.stage1_contrastive import ContrastiveObjective, prepare_stage1_model

GLOBAL_BATCH = 6
FRAMES = 3
WORDS = 8
# Video keys of the global batch: sample 1 and sample 4 are the same video and land on different
# ranks (3 samples per rank), sample 2 and 3 the same video on different ranks too.
KEYS = [11, 22, 33, 33, 22, 66]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    ids = torch.zeros(GLOBAL_BATCH, WORDS, dtype=torch.long)
    mask = torch.zeros(GLOBAL_BATCH, WORDS, dtype=torch.long)
    for i in range(GLOBAL_BATCH):
        n = 3 + i % 4  # words incl. SOT and EOT
        ids[i, 0] = 49406
        ids[i, 1:n - 1] = torch.randint(1, 49000, (n - 2,), generator=gen)
        ids[i, n - 1] = 49407
        mask[i, :n] = 1
    frame_mask = torch.ones(GLOBAL_BATCH, FRAMES, dtype=torch.long)
    frame_mask[0, 2:] = 0
    frame_mask[4, 1:] = 0
    return {
        "text_ids": ids,
        "text_mask": mask,
        "frames": torch.randn(GLOBAL_BATCH, FRAMES, 3, 32, 32, generator=gen),
        "frame_mask": frame_mask,
        "video_key": torch.tensor(KEYS, dtype=torch.long),
    }


def _model() -> torch.nn.Module:
    torch.manual_seed(7)  # open_clip initialises CLIP from the global RNG
    model = build_model(ModelConfig.tiny(), generator=torch.Generator().manual_seed(7))
    return prepare_stage1_model(model)


def run_workers(fn, args: tuple, nprocs: int, timeout: float = 180.0) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` forked processes and wait (raising on failure or timeout).

    Fork, not spawn: children inherit the imported torch/open_clip (a spawned child re-imports them,
    ~10 s each on a loaded 2-core machine). Each child runs single-threaded, which also keeps the
    parent's OpenMP pool out of the children.
    """
    ctx = mp.start_processes(_single_threaded, args=(fn, args), nprocs=nprocs, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            raise TimeoutError(f"distributed workers did not finish in {timeout} s")


def _single_threaded(rank: int, fn, args: tuple) -> None:
    torch.set_num_threads(1)
    fn(rank, *args)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ctx = DistContext(rank=rank, world_size=world, backend="gloo")
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(ContrastiveObjective(model, ctx))
        batch = _inputs()
        local = GLOBAL_BATCH // world
        part = {k: v[rank * local:(rank + 1) * local] for k, v in batch.items()}
        loss = ddp(**part)["loss"]
        loss.backward()
        global_loss = loss.detach().clone()
        torch.distributed.all_reduce(global_loss)
        global_loss /= world
        # Uneven shards gathered without padding (evaluation path).
        shard = shard_range(5, ctx)
        gathered = all_gather_variable(torch.tensor(list(shard), dtype=torch.long), ctx)
        if rank == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            torch.save({"loss": global_loss, "grads": grads, "gathered": gathered}, Path(out_dir) / "dist.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes
def test_two_process_contrastive_loss_and_grads_match_single_process(tmp_path: Path) -> None:
    model = _model()  # also imports open_clip before the fork, so the children need not
    loss = ContrastiveObjective(model, DistContext())(**_inputs())["loss"]
    loss.backward()
    run_workers(_worker, (2, _free_port(), str(tmp_path)), nprocs=2)
    dist_out = torch.load(tmp_path / "dist.pt", weights_only=True)

    torch.testing.assert_close(dist_out["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(dist_out["grads"]) == set(single)
    assert len(single) > 50  # CLIP towers, temporal module, WTI MLPs and logit_scale all receive gradients
    for name, grad in single.items():
        torch.testing.assert_close(dist_out["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert dist_out["gathered"].tolist() == [0, 1, 2, 3, 4]


def test_duplicates_are_not_negatives() -> None:
    """Two copies of a video in the batch: the loss equals the multi-positive loss, not the diagonal one."""
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.8, 0.9, 0.2], [0.1, 0.3, 0.7]])

    def sim_fn(tok, tmask, vid, fmask):  # rows/columns picked by index, to reuse the fixed matrix
        return sim[tok[:, 0, 0].long()][:, vid[:, 0, 0].long()]

    idx = torch.arange(3).float().view(3, 1, 1)
    ones = torch.ones(3, 1, dtype=torch.long)
    keys = torch.tensor([5, 5, 9])
    out = symmetric_info_nce(sim_fn, idx, ones, idx, ones, keys, torch.tensor(0.0), DistContext())
    log_p = torch.log_softmax(sim, dim=1)
    expected_rows = torch.stack([-(log_p[0, 0] + log_p[0, 1]) / 2, -(log_p[1, 0] + log_p[1, 1]) / 2, -log_p[2, 2]])
    log_pt = torch.log_softmax(sim.t(), dim=1)
    expected_cols = torch.stack([-(log_pt[0, 0] + log_pt[0, 1]) / 2, -(log_pt[1, 0] + log_pt[1, 1]) / 2,
                                 -log_pt[2, 2]])
    torch.testing.assert_close(out.loss, (expected_rows.mean() + expected_cols.mean()) / 2)
    # Without duplicates it is the reference CrossEn on the diagonal.
    out = symmetric_info_nce(sim_fn, idx, ones, idx, ones, torch.tensor([1, 2, 3]), torch.tensor(0.0), DistContext())
    ref = (-log_p.diagonal().mean() - log_pt.diagonal().mean()) / 2
    torch.testing.assert_close(out.loss, ref)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_train_sampler_rank_order_concatenation_is_the_global_batch(world: int) -> None:
    n, batch = 25, 6
    per_rank = []
    for rank in range(world):
        sampler = TrainSampler(n, batch, DistContext(rank=rank, world_size=world), seed=3)
        sampler.set_epoch(2)
        per_rank.append(list(sampler))
    single = TrainSampler(n, batch, DistContext(), seed=3)
    single.set_epoch(2)
    expected = list(single)
    assert len(expected) == (n // batch) * batch and len(set(expected)) == len(expected)
    local = batch // world
    for step in range(n // batch):
        merged = sum((per_rank[r][step * local:(step + 1) * local] for r in range(world)), [])
        assert merged == expected[step * batch:(step + 1) * batch]
    # Resuming at step 2 yields exactly the remaining batches.
    single.set_epoch(2, start_step=2)
    assert list(single) == expected[2 * batch:]
    # Another epoch, another order.
    single.set_epoch(3)
    assert list(single) != expected


@pytest.mark.parametrize("n,world", [(0, 2), (5, 2), (7, 3), (2, 4)])
def test_shard_range_covers_each_index_once(n: int, world: int) -> None:
    covered = [i for r in range(world) for i in shard_range(n, DistContext(rank=r, world_size=world))]
    assert covered == list(range(n))


def _train_worker(rank: int, world: int, port: int, corpus: str, out: str) -> None:
    from diffusionret.training.loop import train
    from helpers import SMOKE1, SMOKE2

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DIFFUSIONRET_SMOKE=corpus)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ctx = DistContext(rank=rank, world_size=world, backend="gloo")
        train(_smoke_config(SMOKE1, Path(out) / "stage1"), dist=ctx)
        init = Path(out) / "stage1" / "model.safetensors"
        train(_smoke_config(SMOKE2, Path(out) / "stage2", f"model.init_checkpoint={init}"), dist=ctx)
    finally:
        torch.distributed.destroy_process_group()


def _smoke_config(path: Path, out: Path, *extra: str):
    from diffusionret.config import load_run_config

    # One epoch of 2 steps with a global batch of 4 (2 per rank); the 3-caption test split is sharded
    # unevenly (2 + 1 captions, 1 + 1 videos).
    return load_run_config(path, [f"output_dir={out}", "train.epochs=1", *extra])


def _train_losses(run: Path) -> list[float]:
    import json

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.mark.slow  # two training processes, both stages
def test_ddp_smoke_run_of_both_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from diffusionret.training.loop import train
    from helpers import SMOKE1, write_smoke_corpus

    corpus = write_smoke_corpus(tmp_path / "corpus")
    monkeypatch.setenv("DIFFUSIONRET_SMOKE", str(corpus))
    single = tmp_path / "single"
    train(_smoke_config(SMOKE1, single, "eval.test_after_training=false"))  # also imports everything pre-fork
    run_workers(_train_worker, (2, _free_port(), str(corpus), str(tmp_path / "ddp")), nprocs=2, timeout=300)

    for stage in ("stage1", "stage2"):
        run = tmp_path / "ddp" / stage
        for name in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "model.safetensors", "test_metrics.json"):
            assert (run / name).is_file(), f"{stage}/{name}"
        test = json.loads((run / "test_metrics.json").read_text())
        assert test["num_captions"] == 3 and test["num_videos"] == 2  # no padded duplicates, none lost
        assert len(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["rng"]) == 2  # every rank's RNG
    ddp_test = json.loads((tmp_path / "ddp" / "stage2" / "test_metrics.json").read_text())
    assert "rerank" in ddp_test
    # Sharded evaluation (uneven shards, seeded re-ranking noise) = single-process evaluation.
    from diffusionret.evaluation.evaluate import evaluate

    stage2 = tmp_path / "ddp" / "stage2" / "model.safetensors"
    alone = evaluate(_smoke_config(SMOKE1.with_name("smoke_stage2.yaml"), tmp_path / "alone",
                                   f"model.init_checkpoint={stage2}"), stage2)
    for key in ("t2v", "v2t"):
        assert alone[key] == pytest.approx(ddp_test[key]), key
        assert alone["rerank"][key] == pytest.approx(ddp_test["rerank"][key]), f"rerank {key}"
    # Same global batches: the 2-process losses (all-rank means) equal the single-process ones, step by
    # step, so the gathered forward and the averaged backward/update match too.
    ddp_losses, single_losses = _train_losses(tmp_path / "ddp" / "stage1"), _train_losses(single)
    assert len(ddp_losses) == len(single_losses) == 2
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single_losses), rtol=1e-4, atol=1e-5)
