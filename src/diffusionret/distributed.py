"""Process-group plumbing for torchrun, passed around as a :class:`DistContext` value (no globals).

``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; a
plain ``python -m diffusionret`` has none of them and runs as a single process. CUDA runs use NCCL
with one GPU per local rank, CPU runs use gloo. Nothing below the training recipe calls
``torch.distributed.get_rank()``: collectives take the context (or nothing, when the world is one).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)

Backend = Literal["nccl", "gloo"]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank in ``[0, world_size)``.
        local_rank: rank on this machine (selects the GPU).
        world_size: number of processes in the job.
        backend: ``nccl`` (CUDA) or ``gloo`` (CPU); ``None`` for a single process without a group.
        device: the device this process computes on.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: Backend | None = None
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def single(cls, device: str | torch.device | None = None) -> "DistContext":
        """A one-process context on ``device`` (default: the first GPU if there is one, else CPU)."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(device=torch.device(device))


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group described by torchrun's environment variables.

    Args:
        device: ``"cpu"`` forces gloo on CPU even on a GPU machine; ``"cuda"`` requires CUDA;
            ``None`` picks CUDA (one GPU per local rank, NCCL) when available, else CPU (gloo).
        timeout_s: collective timeout; evaluation on rank 0 can be long, so the default is generous.

    Returns:
        The context; a single-process context when ``WORLD_SIZE`` is unset or 1.
    """
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size <= 1:
        return DistContext(device=dev)
    backend: Backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if use_cuda else {}))
    logger.info("process group: backend=%s world_size=%d", backend, world_size)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, backend=backend, device=dev)


def destroy_distributed(ctx: DistContext) -> None:
    """Leave the process group (a no-op for a single process)."""
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        # gloo has no device_ids; NCCL needs them to avoid a warning about the current device.
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.local_rank])
        else:
            dist.barrier()


def batch_sizes(local: int, ctx: DistContext) -> list[int]:
    """Every rank's local batch size, in rank order (a collective; ``[local]`` for one process).

    Local batches can differ when a data loader drops unreadable videos (``on_error: skip``).
    """
    if not ctx.is_distributed:
        return [local]
    size = torch.tensor([local], device=ctx.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather_padded(tensor: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    longest = max(sizes)
    if tensor.shape[0] != longest:
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        tensor = padded
    parts = [torch.empty_like(tensor) for _ in sizes]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate a tensor from every rank along dim 0, keeping gradients for the local slice.

    Backward sums the incoming gradient over ranks (every rank's loss may depend on every rank's
    features) and returns this rank's slice, so that DDP's gradient *average* over ranks gives the
    gradient of the mean of the per-rank losses, which is what a single process computes on the
    global batch. (The reference returned the local slice without the sum: a 1/world_size smaller
    gradient, docs/reference.md §4.2.)
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
        ctx.start = sum(sizes[:rank])
        ctx.count = sizes[rank]
        return _gather_padded(tensor, sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start:ctx.start + ctx.count], None, None


def all_gather_with_grad(tensor: torch.Tensor, ctx: DistContext, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """(b_r, ...) on every rank -> (sum_r b_r, ...) in rank order, differentiable.

    Args:
        tensor: this rank's batch.
        ctx: distributed context; with one process this is the identity.
        sizes: every rank's batch size (:func:`batch_sizes`); ``None`` means all equal to ``b``.
    """
    if not ctx.is_distributed:
        return tensor
    sizes = tuple(sizes) if sizes is not None else (tensor.shape[0],) * ctx.world_size
    return _AllGatherWithGrad.apply(tensor, sizes, ctx.rank)


def all_gather_no_grad(tensor: torch.Tensor, ctx: DistContext, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """(b_r, ...) on every rank -> (sum_r b_r, ...) in rank order, without autograd."""
    if not ctx.is_distributed:
        return tensor
    sizes = tuple(sizes) if sizes is not None else (tensor.shape[0],) * ctx.world_size
    with torch.no_grad():
        return _gather_padded(tensor.detach(), sizes)


def all_gather_variable(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Gather tensors whose first dimension differs per rank: (b_r, ...) -> (sum_r b_r, ...).

    Used by evaluation, where shards are not padded (padding would duplicate samples and corrupt
    retrieval metrics): the padding needed by the collective is cut away again.
    """
    if not ctx.is_distributed:
        return tensor
    return all_gather_no_grad(tensor, ctx, batch_sizes(tensor.shape[0], ctx))


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Average a tensor over ranks (for logging); returns a new tensor."""
    out = value.detach().clone()
    if ctx.is_distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= ctx.world_size
    return out


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if ``flag`` is true on at least one rank (a collective)."""
    if not ctx.is_distributed:
        return flag
    value = torch.tensor([1 if flag else 0], device=ctx.device, dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's picklable ``obj`` on every rank, in rank order."""
    if not ctx.is_distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not ctx.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_range(n: int, ctx: DistContext) -> range:
    """The contiguous, unpadded slice of ``range(n)`` this rank evaluates.

    Shards differ in size by at most one; concatenating them in rank order gives ``range(n)``
    exactly once, so gathered features need no re-ordering or de-duplication.
    """
    base, extra = divmod(n, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return range(start, start + base + (1 if ctx.rank < extra else 0))


class TrainSampler(Sampler[int]):
    """Epoch-seeded shuffling, sharded over ranks, resumable in the middle of an epoch.

    Every epoch draws one permutation of the dataset from ``seed + epoch`` (identical on every rank),
    drops the tail that does not fill a whole *global* batch (as the reference's ``drop_last``), and
    gives rank ``r`` the ``r``-th ``local_batch`` of every global batch. So rank-order concatenation
    of the local batches of step ``s`` is exactly global batch ``s`` whatever the world size, which
    is what makes a 2-process run comparable with a single process.

    Args:
        num_samples: dataset length.
        global_batch: samples per optimizer step over all ranks (divisible by the world size).
        ctx: distributed context.
        seed: base seed of the permutation.
        shuffle: ``False`` keeps dataset order (tests, debugging).
    """

    def __init__(self, num_samples: int, global_batch: int, ctx: DistContext, seed: int = 0,
                 shuffle: bool = True) -> None:
        if global_batch % ctx.world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {ctx.world_size}")
        if num_samples < global_batch:
            raise ValueError(f"dataset has {num_samples} samples, fewer than one global batch of {global_batch}")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.local_batch = global_batch // ctx.world_size
        self.rank = ctx.rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start_step`` steps (resume)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        self.epoch = epoch
        self.start_step = start_step

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        gen = torch.Generator()
        gen.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.global_batch + self.rank * self.local_batch
            yield from order[start:start + self.local_batch]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.local_batch


class IndexSampler(Sampler[int]):
    """Yields a fixed list of dataset indices (an evaluation shard)."""

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = list(indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
