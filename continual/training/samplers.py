"""Where a stage's randomness comes from: the sampler the loop draws its split, batches, scored rows and
retention rows from, and the optimiser it builds. The loop has no branch on --streams: it asks its sampler.

`OurSampler` (--streams ours, the default) draws batches and retention rows from one numpy Generator,
keeps the last partial batch, scores every validation and test row, and lets the model initialise a new
stage's parameters in its own order.

`AuthorsSampler` (--streams authors) replays the authors' codes (Sein-Kim/TERACON_original,
Sein-Kim/TERACON) step for step. They draw from three generators:

* numpy's global RandomState: the split; per epoch the training order (the original permutes it twice,
  the first permutation compounding from epoch to epoch), then the validation order; the test order at
  epoch 0 and at each new best. Batches are consecutive slices while `end < n` (utils.getBatch), so the
  last partial batch is dropped, and the last full one too when B divides n; validation and test score
  only the rows of those batches.
* Python's `random`: retention rows, `buf = list(range(B)); random.shuffle(buf)` per batch; earlier task
  j takes `buf[:int(B · ratio_j)]` (original: one shuffle whose prefixes every task shares; revised: one
  shuffle per earlier task).
* torch's CPU generator: only the constructor of the stage's model, right after `torch.manual_seed`. The
  fresh parameters of stage K (the new head, every relation layer, the revision's new task row) are those
  the authors' constructor draws, so `original_fresh` and `revised_fresh` replay its calls shape for shape
  (CPU normal_ takes another path below 16 elements: the same count of draws in other shapes gives other
  values). The original never draws the new task's embedding row: rows 1..5 of the stage-1 model's
  ec1/ec2 stay as drawn at stage 1 and become tasks 2..6's rows (`spare_task_rows`, kept by
  original_checkpoints).

Their optimiser is Adam's per-parameter loop, and they back-propagate empty retention samples, so every
parameter without a gradient gets zeros (Adam moves it). `--variant original` replays the original from
its checkpoints and index; `--variant revised` the revision from its own, whose numbering has no `<UNK>`
(data_loader.ItemIndex.offset 0). README, "Step-for-step replay".
"""
from __future__ import annotations

import math
import random
from typing import Iterable

import numpy as np
import torch

from continual import distributed
from continual.methods.base import Rows
from data_loader import ItemIndex, split_indices, split_permutation
from model import NextItNet
from utils import DataError

STREAMS = ("ours", "authors")


Shards = list[tuple[np.ndarray, float, int]]  # per batch: (this rank's rows, its share, the global batch's rows)


ParamGroups = list[dict]  # torch's parameter groups ("params", "lr"); a group's params may hold Rows


def adam(groups: Iterable[torch.nn.Parameter] | ParamGroups, lr: float) -> torch.optim.Adam:
    """Adam (β = 0.9, 0.999, eps 1e-8, no weight decay), as the authors, over `groups` (parameters, or parameter
    groups whose params may name Rows); the fused kernel where torch has one for the device (one pass over all
    parameters instead of a dozen small ops per tensor).

    A Rows entry steps through a parameter that aliases the row's memory: before each step its table's gradient row
    moves to it (and is zeroed in the table, whose Adam moments for that row then stay 0, so its own step leaves the
    row unchanged), so the row is Adam at its group's lr exactly."""
    groups = list(groups)
    if not groups or not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    routed: list[tuple[torch.nn.Parameter, int, torch.nn.Parameter]] = []
    built = []
    for group in groups:
        tables = {id(entry.parameter) for entry in group["params"] if isinstance(entry, Rows)}
        if any(id(entry) in tables for entry in group["params"]):   # one kernel launch would write the row twice
            raise ValueError("a parameter group holds a table and Rows of it: give the Rows a group of their own")
        params = []
        for parameter in group["params"]:
            if isinstance(parameter, Rows):
                alias = torch.nn.Parameter(parameter.parameter.data[parameter.index])   # shares the row's memory
                routed.append((parameter.parameter, parameter.index, alias))
                parameter = alias
            params.append(parameter)
        built.append({**group, "params": params})
    try:
        optimizer = torch.optim.Adam(built, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        optimizer = torch.optim.Adam(built, lr=lr)
    if routed:
        optimizer.register_step_pre_hook(lambda *_: route_row_gradients(routed))
    return optimizer


def route_row_gradients(routed: list[tuple[torch.nn.Parameter, int, torch.nn.Parameter]]) -> None:
    """Each Rows alias takes its table's gradient row (after torchrun's averaging: the step's pre-hook), which the
    table then holds as 0."""
    for table, index, alias in routed:
        if table.grad is None:
            alias.grad = None
            continue
        alias.grad = table.grad[index].clone()
        table.grad[index] = 0


class OurSampler:
    """This suite's draws: the split from --seed, batches and retention rows from one numpy Generator."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def start(self, checkpoint: dict, index: ItemIndex, n_classes: int) -> None:
        """Stage ≥ 2, before anything else draws from torch (the authors' constructor draws here)."""

    def split(self, n: int, seed: int, split_percentage: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return split_indices(n, seed, split_percentage)

    def epoch_batches(self, n: int, batch: int) -> Shards:
        """Every batch of an epoch, shuffled; the last partial one kept (sharded under torchrun)."""
        return distributed.batches(n, batch, self.rng)

    def scored_rows(self, rows: np.ndarray, batch: int) -> np.ndarray:
        """The validation or test rows scored: all of them."""
        return rows

    def retention_rows(self, counts: list[int], size: int, one_shuffle: bool) -> list[np.ndarray]:
        """Global positions of `counts` rows each (a method's retention rows of each earlier task), drawn from the
        GLOBAL batch of `size` rows, so N ranks use the rows one process would (every rank draws the same
        permutations: their generators are in step). With `one_shuffle`, each takes a prefix of one shuffle;
        otherwise a shuffle each (after the shared one, which is drawn either way)."""
        shared = self.rng.permutation(size)
        return [(shared if one_shuffle else self.rng.permutation(size))[:count] for count in counts]

    def optimizer(self, groups: ParamGroups, lr: float) -> torch.optim.Optimizer:
        """Adam over the method's parameter groups (Method.param_groups)."""
        return adam(groups, lr)

    def after_grow(self, model: NextItNet) -> None:
        """Stage ≥ 2, after the method grew the model (the authors' fresh values are set here)."""

    def checkpoint_extra(self) -> dict:
        """Entries of the stage's checkpoint beyond the loop's own."""
        return {}


class AuthorsSampler:
    """--streams authors: the numpy-global and Python-`random` draws of the authors' stage-K script (seeded by
    utils.set_seed), their fresh parameters and their optimiser."""

    def __init__(self, variant: str, stage: int, paths: str, datapath_index: str):
        self.variant, self.stage, self.paths, self.datapath_index = variant, stage, paths, datapath_index
        self.order: np.ndarray | None = None   # original: the training order, re-permuted every epoch
        self.fresh: dict[str, torch.Tensor] = {}
        self.spare_rows: torch.Tensor | None = None

    def start(self, checkpoint: dict, index: ItemIndex, n_classes: int) -> None:
        """The new stage's fresh parameters as the authors' constructor draws them, right after seeding."""
        self.fresh = authors_fresh(self.variant, self.stage, self.paths, self.datapath_index, checkpoint, index,
                                   n_classes)
        self.spare_rows = checkpoint.get("spare_task_rows")

    def split(self, n: int, seed: int, split_percentage: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The 80/5/15 split from the global RandomState (the same rows as data_loader.split_indices)."""
        return split_permutation(np.random.permutation(np.arange(n)), split_percentage)

    def epoch_batches(self, n: int, batch: int) -> Shards:
        """Positions in the training rows of every batch of an epoch, as the authors' getBatch yields them."""
        order = np.arange(n)
        if self.variant == "original":          # train_set = train_set[perm] at each epoch, kept
            self.order = (order if self.order is None else self.order)[np.random.permutation(np.arange(n))]
            order = self.order
        order = order[np.random.permutation(np.arange(n))]   # getBatch's own permutation
        return [(rows, 1.0, rows.size) for rows in full_batches(order, batch)]

    def scored_rows(self, rows: np.ndarray, batch: int) -> np.ndarray:
        """The validation or test rows the authors score: getBatch's full batches of a permutation."""
        order = rows[np.random.permutation(np.arange(len(rows)))]
        batches = full_batches(order, batch)
        return np.concatenate(batches) if batches else order[:0]

    def retention_rows(self, counts: list[int], size: int, one_shuffle: bool) -> list[np.ndarray]:
        """Batch positions of `counts` rows each, from Python's `random`: prefixes of one shuffle, or a shuffle each."""
        if one_shuffle:                         # original: one shuffle, nested prefixes
            buffer = list(range(size))
            random.shuffle(buffer)
            return [np.array(buffer[:count], dtype=np.int64) for count in counts]
        buffers = [list(range(size)) for _ in counts]
        for buffer in buffers:                  # revised: one shuffle per earlier task, in task order
            random.shuffle(buffer)
        return [np.array(buffer[:count], dtype=np.int64) for buffer, count in zip(buffers, counts)]

    def optimizer(self, groups: ParamGroups, lr: float) -> torch.optim.Optimizer:
        """The authors' Adam over the whole model: its per-parameter loop; a parameter without a gradient gets zeros
        before each step. Only TERACON's paper rule replays, whose groups are the default one."""
        params = [parameter for group in groups for parameter in group["params"]]
        rates = {group.get("lr", lr) for group in groups}
        if any(isinstance(parameter, Rows) for parameter in params) or len(rates) > 1:
            raise DataError("--streams authors replays the authors' Adam: one learning rate for every parameter")
        optimizer = torch.optim.Adam(params, lr=lr, foreach=False)
        optimizer.register_step_pre_hook(zero_missing_grads)
        return optimizer

    def after_grow(self, model: NextItNet) -> None:
        apply_fresh(model, self.fresh)

    def checkpoint_extra(self) -> dict:
        """The original's later tasks' embedding rows, one fewer: this stage used the first."""
        return {} if self.spare_rows is None else {"spare_task_rows": self.spare_rows[1:]}


def make_sampler(streams: str, rng: np.random.Generator, variant: str, stage: int, paths: str | None,
                 datapath_index: str) -> OurSampler | AuthorsSampler:
    """--streams' sampler: `ours` draws from `rng`; `authors` replays the --variant's code."""
    if streams == "authors":
        return AuthorsSampler(variant, stage, paths, datapath_index)
    return OurSampler(rng)


def zero_missing_grads(optimizer: torch.optim.Optimizer, *_) -> None:
    """The authors back-propagate empty retention samples: their parameters get zero gradients (Adam moves them)."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)


def full_batches(order: np.ndarray, batch: int) -> list[np.ndarray]:
    """Consecutive slices of `batch` while the slice ends before the last row (utils.getBatch: end < n)."""
    return [order[start:start + batch] for start in range(0, len(order), batch) if start + batch < len(order)]


# ------------------------------------------------------------------ the original's stage-K constructor

def _linear(n_in: int, n_out: int) -> torch.Tensor:
    """nn.Linear.reset_parameters' draws: kaiming_uniform_ weight [n_out, n_in], uniform_ bias [n_out]."""
    weight = torch.empty(n_out, n_in)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    torch.empty(n_out).uniform_(-1 / math.sqrt(n_in), 1 / math.sqrt(n_in))
    return weight


def _conv(channels: int, kernel: int) -> None:
    """nn.Conv2d(C, C, (1, k))'s draws: kaiming_uniform_ [C, C, 1, k], uniform_ bias [C]."""
    torch.nn.init.kaiming_uniform_(torch.empty(channels, channels, 1, kernel), a=math.sqrt(5))
    bound = 1 / math.sqrt(channels * kernel)
    torch.empty(channels).uniform_(-bound, bound)


def _stage_model_draws(n_items: int, n_tasks: int, channels: int, kernel: int, n_blocks: int,
                       row_shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """The draws both codes' stage-K constructors make before their heads: item embedding (normal_, then
    uniform_), then per block conv1, conv2, the task-embedding tables of `row_shapes` (all normal_, then all
    uniform_(0, 2)), K Linear(2K−1, 1) for mlp1 and for mlp2 and their normal_(0, 0.01) weights. Returns
    relation_weight [K, n_layers, 2K−1] (layer 2i = mlp1 of block i, 2i+1 = mlp2) and each block's tables."""
    torch.empty(n_items, channels).normal_().uniform_(-np.sqrt(1. / n_items), np.sqrt(1. / n_items))
    relation = torch.empty(n_tasks, 2 * n_blocks, 2 * n_tasks - 1)
    tables = []
    for block in range(n_blocks):
        _conv(channels, kernel)
        _conv(channels, kernel)
        task_rows = [torch.empty(shape).normal_() for shape in row_shapes]
        for rows in task_rows:
            rows.uniform_(0, 2)
        tables.append(task_rows)
        mlp1 = [_linear(2 * n_tasks - 1, 1) for _ in range(n_tasks)]
        mlp2 = [_linear(2 * n_tasks - 1, 1) for _ in range(n_tasks)]
        for task in range(n_tasks):
            relation[task, 2 * block] = mlp1[task].normal_(0.0, 0.01)[0]
            relation[task, 2 * block + 1] = mlp2[task].normal_(0.0, 0.01)[0]
    return relation, tables


def original_fresh(n_items: int, n_classes: int, n_tasks: int, channels: int, kernel: int,
                   n_blocks: int, slots: int = 6) -> dict[str, torch.Tensor]:
    """The fresh values of the original's teracon.NextItNet_Decoder(num_task=K) at stage K, drawn as it draws
    them from the current torch generator: the stage-K draws with ec1/ec2 = two Embedding(6, C) per block,
    then the new head final_layer (kaiming, then normal_(0, 0.01)). Returns our tensors: relation_weight
    [K, n_layers, 2K−1] and the new head's weight [n_classes, C]."""
    relation, _ = _stage_model_draws(n_items, n_tasks, channels, kernel, n_blocks, [(slots, channels)] * 2)
    head = _linear(channels, n_classes).normal_(0.0, 0.01)
    return {"relation_weight": relation, "head": head}


def revised_fresh(n_items: int, head_sizes: list[int], channels: int, kernel: int,
                  n_blocks: int) -> dict[str, torch.Tensor]:
    """The fresh values of the revised code's teracon.NextItNet_Decoder(num_task=K) at stage K, drawn as it
    draws them: the stage-K draws with K Embedding(2, C) per block, then K heads (every kaiming draw first,
    then every normal_(0, 0.01)). Returns relation_weight [K, n_layers, 2K−1], the new task's embedding row
    [n_layers, C] (ec.{K−1}: row 0 masks conv1, row 1 conv2) and head."""
    n_tasks = len(head_sizes)
    relation, tables = _stage_model_draws(n_items, n_tasks, channels, kernel, n_blocks, [(2, channels)] * n_tasks)
    heads = [_linear(channels, size) for size in head_sizes]
    for head in heads:
        head.normal_(0.0, 0.01)
    return {"relation_weight": relation, "head": heads[-1], "row": torch.cat([rows[-1] for rows in tables])}


def authors_fresh(variant: str, stage: int, paths: str, datapath_index: str, checkpoint: dict, index: ItemIndex,
                  n_classes: int) -> dict:
    """The new stage's fresh parameters as the authors' constructor draws them."""
    config, revised = checkpoint["model_config"], variant == "revised"
    if index.offset != (0 if revised else 1):
        raise DataError(f"{datapath_index}: --variant {variant} --streams authors replays the {variant} code, whose "
                        f"index {'has no' if revised else 'starts with'} <UNK>: give that code's index.csv and "
                        "checkpoint")
    shape = (config["channels"], config["kernel_size"], len(config["dilations"]))
    if revised:
        return revised_fresh(config["n_items"], config["task_classes"] + [n_classes], *shape)
    spare_rows = checkpoint.get("spare_task_rows")
    if spare_rows is None or len(spare_rows) == 0:
        raise DataError(f"{paths}: has no spare task-embedding rows of the original's stage 1; --streams "
                        "authors starts from a checkpoint of the authors' code or one written under it")
    return {**original_fresh(config["n_items"], n_classes, stage, *shape), "row": spare_rows[0]}


def apply_fresh(model: NextItNet, fresh: dict[str, torch.Tensor]) -> None:
    """Give the just-grown model (NextItNet.add_task) the authors' fresh values: its relation layers, its new
    head's weight (bias 0.1, as ours) and the new task's embedding row [n_layers, C]."""
    with torch.no_grad():
        model.relation_weight.copy_(fresh["relation_weight"])
        model.heads[-1].weight.copy_(fresh["head"])
        model.task_embedding[-1].copy_(fresh["row"])
