"""Data-parallel training with torch.distributed, for runs launched by torchrun.

    torchrun --nproc_per_node N train_task1.py ...      (the same for train_teracon_tK.py)

Every rank holds the whole model. Each global batch (the single-process batch: same seed, same shuffle
on every rank) is split rows rank::world; a rank computes the step's loss on its rows and, after
`loss.backward()`, the gradients are averaged explicitly (`average_gradients`) instead of wrapping the
model in DistributedDataParallel: a TERACON step calls the model several times (current task, one
student per earlier task, task masks), which DDP's hooks handle poorly. The average is weighted by each
rank's share of the batch, so it is the gradient of the single-process batch mean whenever the loss is a
mean over rows (task 1 exactly; stage K up to which rows the retention term samples). Only rank 0
validates, writes files and prints; the others receive its validation scores and so take the same
early-stopping decisions.

Without torchrun's environment (RANK / WORLD_SIZE unset) every function here is a no-op and training is
exactly the single-process code. Backend: gloo on CPU, nccl on CUDA (rank on cuda:LOCAL_RANK).
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

import data_loader
from utils import resolve_device

BUCKET_ELEMENTS = 1 << 24  # gradients are all-reduced in flat buckets of up to 16 M elements (64 MB fp32)


@dataclass(frozen=True)
class Shard:
    """Where this process's rows sit in the global batch: rank r holds global rows r, r + world, … (see
    `batches`). A single process is Shard(size, 0, 1); a rank holding a weight-0 stand-in row has rows = 0."""
    size: int        # rows of the global batch
    rank: int = 0
    world: int = 1

    def local(self, positions: np.ndarray) -> np.ndarray:
        """This rank's local indices of the given global positions."""
        return positions[positions % self.world == self.rank] // self.world

    @property
    def rows(self) -> int:
        """Rows of the global batch this rank holds."""
        return len(range(self.rank, self.size, self.world))

    @property
    def share(self) -> float:
        """This rank's share of the global batch, the weight of its gradient (1 in a single process)."""
        return self.rows / self.size


def launched() -> bool:
    """True in a process started by torchrun (or with RANK and WORLD_SIZE set by hand)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that validates, writes files and prints."""
    return rank() == 0


class _NotATerminal:
    """stderr of ranks > 0: errors still show, but tqdm sees no terminal and draws no progress bar."""

    def __init__(self, stream: Any):
        self._stream = stream

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def session(args: argparse.Namespace) -> Iterator[None]:
    """Join the process group for the duration of a run (a no-op outside torchrun).

    On CUDA each rank uses cuda:LOCAL_RANK (args.device is rewritten to it; pick the GPUs with
    CUDA_VISIBLE_DEVICES) and the nccl backend; on CPU gloo. Ranks > 0 print nothing to stdout.
    """
    if not launched() or active():  # single process, or a group the caller set up
        yield
        return
    device = resolve_device(args.device, args.gpu_num)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device, args.gpu_num = f"cuda:{local}", None
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    stdout, stderr = sys.stdout, sys.stderr
    if not is_main():
        sys.stdout, sys.stderr = open(os.devnull, "w"), _NotATerminal(stderr)
    try:
        yield
        barrier()  # leave together: a gloo rank exiting while rank 0 still works could abort at exit
    except BaseException:
        _restore(stdout, stderr)
        dist.destroy_process_group()
        raise
    _restore(stdout, stderr)
    # The run is over on every rank (the barrier) and every file is written. Leave now, without the group's
    # and the interpreter's teardown: a gloo rank sometimes aborts in it ("terminate called without an active
    # exception", about 1 run in 10 of tests/test_distributed.py on the 2-core machine), failing the launch.
    os._exit(0)


def _restore(stdout: Any, stderr: Any) -> None:
    if sys.stdout is not stdout:
        sys.stdout.close()
    sys.stdout, sys.stderr = stdout, stderr
    sys.stdout.flush()
    sys.stderr.flush()


def _collective_device() -> torch.device:
    """Where small control tensors live: the rank's GPU for nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if not active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0, device=_collective_device())
    return holder[0]


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's (picklable) `value` in rank order on rank 0, None on the others; [value] in a single process."""
    if not active():
        return [value]
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def from_main(compute: Callable[[], Any]) -> Any:
    """`compute()` run on rank 0 only, its (picklable) result handed to every rank."""
    if not active():
        return compute()
    return broadcast_object(compute() if is_main() else None)


def batches(n: int, batch_size: int, rng: np.random.Generator) -> list[tuple[np.ndarray, float, int]]:
    """This rank's (rows, weight, global batch rows) for every global batch of `data_loader.batches(n, batch_size, rng)`.

    Every rank first takes rank 0's generator state, so all ranks draw the same shuffle even after
    drawing different retention samples; then rank r keeps rows r::world of each batch, so the union over
    ranks is the single-process batch. `weight` is the rank's share of the batch (its rows / batch rows;
    1.0 in a single process). A rank left with no rows (a last batch smaller than the world) gets the
    batch's first row as a stand-in with weight 0, so that it still runs the step's collectives.
    """
    if not active():
        return [(rows, 1.0, rows.size) for rows in data_loader.batches(n, batch_size, rng)]
    rng.bit_generator.state = broadcast_object(rng.bit_generator.state)
    me, world = rank(), world_size()
    shards = []
    for rows in data_loader.batches(n, batch_size, rng):
        mine = rows[me::world]
        shards.append((mine, mine.size / rows.size, rows.size) if mine.size else (rows[:1], 0.0, rows.size))
    return shards


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank (every rank gets the same answer, so all act at the same step)."""
    if not active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def all_finite(loss: torch.Tensor, weight: float = 1.0) -> bool:
    """Whether the loss is finite on every rank (ranks with weight 0 do not count): all ranks skip together."""
    if not active():
        return bool(torch.isfinite(loss))
    bad = torch.tensor([0.0 if weight == 0 or bool(torch.isfinite(loss)) else 1.0], device=_collective_device())
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item() == 0)


def average_gradients(model: torch.nn.Module, weight: float = 1.0) -> None:
    """After backward: every parameter's gradient becomes Σ_ranks weight_r · grad_r, the same on every rank.

    With weight_r = rank r's rows / batch rows and per-rank losses that are means over their rows, this is
    the single-process gradient of the batch mean (what DDP computes when the shards are equal). A rank
    that has no gradient for a parameter (e.g. an earlier task's head when its retention sample was
    empty) contributes zeros; a parameter without a gradient on every rank keeps grad None, as in a single
    process (Adam then leaves it alone). A weight-0 rank contributes zeros everywhere, even if its loss
    was not finite.
    """
    if not active():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    device = params[0].device
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(present)  # how many ranks hold a gradient for each parameter
    used = [p for p, count in zip(params, present.tolist()) if count > 0]
    for p in used:
        if p.grad is None or weight == 0:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.nn.Parameter] = []
    for p in used:
        if bucket and (sum(q.numel() for q in bucket) + p.numel() > BUCKET_ELEMENTS
                       or p.grad.dtype != bucket[0].grad.dtype or p.grad.device != bucket[0].grad.device):
            _reduce_bucket(bucket, weight)
            bucket = []
        bucket.append(p)
    if bucket:
        _reduce_bucket(bucket, weight)


def _reduce_bucket(params: list[torch.nn.Parameter], weight: float) -> None:
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    if weight != 1.0:
        flat.mul_(weight)
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        size = p.numel()
        p.grad.copy_(flat[offset:offset + size].view_as(p.grad))
        offset += size


def average_stats(stats: dict, keys: tuple[str, ...] = ("loss", "retention")) -> dict:
    """Epoch statistics for printing: `keys` averaged over ranks (the rest are equal on every rank)."""
    if not active():
        return stats
    values = torch.tensor([float(stats[key]) for key in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(values)
    return {**stats, **dict(zip(keys, (values / world_size()).tolist()))}
