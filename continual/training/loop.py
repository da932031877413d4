"""The one training loop behind every stage script: train_task1.py, then one script per later stage (any K).

Stage 1 trains a new NextItNet on task 1 (next item); stage K ≥ 2 reloads stage K−1, lets the method add
task K and trains it. The loop owns the step (batching, the annealing of s, AMP, torchrun, the skip of
non-finite steps, resume, checkpoints, evaluation); the method (continual/methods/, chosen by --method)
says only what it minimises and where it differs, through the hooks of methods.base.Method. After each
stage every task 1..K is scored on its own test split (metrics.json, printed as a table).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from continual import distributed, flags
from continual.datasets import preset_kind, preset_paths, stage_script, task_name
from continual.evaluation.reports import format_evidence, format_limits, format_table
from continual.evaluation.scoring import evaluate_tasks, load_task_data, sampled_negatives, score
from continual.distributed import Shard
from continual.methods import method_class
from continual.methods.base import Method, Stage, Step
from continual.methods.checkpoints import is_finished, load_checkpoint, require_finished
from continual.training.config import RunConfig, parse_args
from continual.training.history import History
from continual.training.resources import Resources, SavedForBackward
from continual.training.samplers import AuthorsSampler, OurSampler, make_sampler
from data_loader import (ItemIndex, Staging, TaskData, check_split, limit_users, load_sequences, load_task,
                         load_task_growing, read_index, split_indices, write_index)
from model import CHECKPOINT_FORMAT, ModelConfig, NextItNet
from utils import (DataError, Preempted, atomic_torch_save, keep_freed_memory, resolve_device, set_seed,
                   sigterm_received, stop_at_a_step, write_json)

RERUN_SEED_STEP = 1000  # --rerun N trains from seed + 1000·N


def anneal(batch_index: int, batches_per_epoch: float, smax: float) -> float:
    """Eq. 19: s = 1/smax + (smax − 1/smax) · b / B within each epoch."""
    return 1.0 / smax + (smax - 1.0 / smax) * batch_index / batches_per_epoch


def training_seed(run: RunConfig) -> int:
    """The seed of the training draws: --seed, or seed + 1000·N for --rerun N (the split always uses --seed)."""
    return run.seed + RERUN_SEED_STEP * run.rerun


def frozen_model(checkpoint: dict, device: torch.device, compiled: bool = False) -> NextItNet:
    """A checkpoint's model on `device` in eval mode with no gradients (torch.compile'd with `compiled`). On the CPU
    it reads the checkpoint's own tensors (no copy: at TTL's size a model is 1.3 GB)."""
    model = NextItNet.from_checkpoint(checkpoint, share=True).to(device).eval().requires_grad_(False)
    return compile_backbone(model) if compiled else model


def compile_backbone(model: NextItNet) -> NextItNet:
    """--compile: torch.compile model.hidden (embedding + residual blocks), where the many small ops are;
    masks, heads and losses stay eager. The batch dimension is dynamic (retention samples and the last
    batch vary); sequence lengths stay static, so a stage compiles a few graphs (train/eval, L and L−1)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.automatic_dynamic_shapes = False
    compiled = torch.compile(model.hidden)

    def hidden(items: torch.Tensor, masks: torch.Tensor, last_only: bool, task: int = 0) -> torch.Tensor:
        torch._dynamo.maybe_mark_dynamic(items, 0)
        # dynamo specialises on the int: tasks that read only the shared blocks share task 0's graph
        return compiled(items, masks, last_only, task if str(task) in model.task_blocks else 0)
    model.hidden = hidden
    return model


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast for --amp (CPU and GPU); a no-op otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


# ---------------------------------------------------------------------- the step

def train_step(model: NextItNet, method: Method, optimizer: torch.optim.Optimizer, step: Step,
               amp: bool = False, saved: SavedForBackward | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimiser step on the method's loss terms → (loss, its retention part: every term after the first,
    stepped).

    Each term is back-propagated as soon as it is computed, so only one pass's activations are alive at a
    time (with a term per earlier task, at task 6 one instead of six); the gradients add up to the gradient
    of the sum. The step is skipped if the total is non-finite (on any rank under torchrun). `saved`, when given,
    measures each term's activations."""
    optimizer.zero_grad(set_to_none=True)
    terms = method.terms(model, step)
    values = []
    while True:
        with autocast(step.x.device, amp), (saved.term() if saved else contextlib.nullcontext()):
            term = next(terms, None)
        if term is None:
            break
        term.backward()
        values.append(term.detach())
    method.after_backward(model)
    loss = torch.stack(values).sum()
    retention = torch.stack(values[1:]).sum() if len(values) > 1 else values[0] * 0
    stepped = distributed.all_finite(loss, step.shard.share)
    if stepped:
        distributed.average_gradients(model, step.shard.share)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.after_step(model)
    return loss, retention, stepped


# ---------------------------------------------------------------------- what a stage trains on

@dataclass
class StageInputs:
    """The new task's data and splits, every task's record, and how a batch of training rows reaches the device."""
    record: dict
    tasks: list[dict]                                   # the records of tasks 1..K
    data: TaskData                                      # the new task's examples (task 1: last-item examples)
    parts: tuple[np.ndarray, np.ndarray, np.ndarray]    # train, valid, test rows of `data`
    index: ItemIndex
    batch: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor | None]]  # training rows → (x, y)
    checkpoint: dict | None = None                      # the previous stage's (stage ≥ 2)


def task_record(run: RunConfig, n_classes: int) -> dict:
    kind = (run.task_kind or preset_kind(run.dataset, run.stage)
            or ("rec" if run.stage == 1 or n_classes > run.top_k + 15 else "cls"))  # task 1: next item, always rec
    return {"name": task_name(run.dataset, run.stage), "datapath": run.datapath, "kind": kind,
            "n_classes": n_classes, "seed": run.seed, "split_percentage": run.split_percentage}


def task1_inputs(run: RunConfig, sampler: OurSampler, device: torch.device) -> StageInputs:
    """Stage 1: the task-1 sequences, their split, and the item index built from them (written by rank 0)."""
    sequences, index = load_sequences(run.datapath)  # [n_users, L]
    parts = sampler.split(len(sequences), run.seed, run.split_percentage)
    check_split(run.datapath, len(sequences), parts, run.split_percentage)
    print(f"task 1: {len(sequences)} users, length {sequences.shape[1]}, {index.size} items "
          f"(train/valid/test {parts[0].size}/{parts[1].size}/{parts[2].size})")
    record = task_record(run, index.size)
    flags.check_top_k(run.top_k, record["kind"], index.size, "task 1")
    if distributed.is_main():
        prepare_index(run, index)
    stage_sequences = Staging(sequences, device)
    return StageInputs(record, [record], TaskData(sequences[:, :-1], sequences[:, -1], index.size), parts, index,
                       lambda rows: (stage_sequences(rows), None))                       # [B, L]


def later_inputs(run: RunConfig, sampler: OurSampler | AuthorsSampler, device: torch.device) -> StageInputs:
    """Stage K ≥ 2: the previous checkpoint and the index, checked against each other; task K's data and split."""
    checkpoint, index = load_previous(run)
    run.channels = checkpoint["model_config"]["channels"]  # the model's shape comes from the checkpoint
    if run.protocol == "time":                              # this task's new source items join the index (and its
        joins = method_class(run.method).item_targets      # target items, for a method that scores them by rows)
        data, index = load_task_growing(run.datapath, index, run.stage,
                                        (lambda n: task_record(run, n)["kind"] == "rec") if joins else None)
        print(f"task {run.stage}: {index.size - checkpoint['model_config']['n_items']} new items "
              f"({index.size} in all)")
    else:
        data = load_task(run.datapath, index)
    sampler.start(checkpoint, index, data.n_classes)  # before anything else draws from torch
    parts = sampler.split(len(data.targets), run.seed, run.split_percentage)
    check_split(run.datapath, len(data.targets), parts, run.split_percentage)
    record = task_record(run, data.n_classes)
    kinds = [entry["kind"] for entry in checkpoint["tasks"]] + [record["kind"]]
    classes = checkpoint["model_config"]["task_classes"] + [data.n_classes]
    for number, (kind, n_classes) in enumerate(zip(kinds, classes), 1):
        flags.check_top_k(run.top_k, kind, n_classes, f"task {number}")  # every task is scored at --top_k
    print(f"task {run.stage}: {len(data.targets)} examples, {data.n_classes} classes ({record['kind']}), "
          f"train/valid/test {parts[0].size}/{parts[1].size}/{parts[2].size}")
    tasks = [fill_datapath(run, number, earlier) for number, earlier in enumerate(checkpoint["tasks"], 1)] + [record]
    stage_sources, stage_targets = Staging(data.sources, device), Staging(data.targets, device)
    return StageInputs(record, tasks, data, parts, index,
                       lambda rows: (stage_sources(data.rows(rows)), stage_targets(rows)),  # [B, L], [B]
                       checkpoint)


def load_previous(run: RunConfig) -> tuple[dict, ItemIndex]:
    """The stage-(K−1) checkpoint and the index, checked against each other and this script."""
    checkpoint = load_checkpoint(run.paths)
    previous = checkpoint.get("stage")
    require_finished(checkpoint, run.paths, "--paths")
    sampled = (checkpoint.get("run_config") or {}).get("eval_negatives", 0)
    if sampled != run.eval_negatives:
        raise DataError(f"{run.paths}: its stage ranked with --eval_negatives {sampled}, this one with "
                        f"{run.eval_negatives}; give every stage of a chain the same, so its scores compare")
    if previous != run.stage - 1:
        maker = stage_script(run.stage - 1)
        raise DataError(f"{run.paths}: is stage {previous}'s checkpoint; stage {run.stage} needs task "
                        f"{run.stage - 1}'s checkpoint, made by {maker}")
    index_path = previous_index_path(run)
    index = read_index(index_path)
    n_items = checkpoint["model_config"]["n_items"]
    if index.size != n_items:
        raise DataError(f"{index_path}: index has {index.size} items but {run.paths} was trained on "
                        f"{n_items} (made from other data)")
    return checkpoint, index


def previous_index_path(run: RunConfig) -> str:
    """The index the previous stage trained with: --protocol time reads the one written beside its checkpoint
    (<paths without .t7>.index.csv; stage 1's is --datapath_index), else --datapath_index."""
    beside = os.path.splitext(run.paths)[0] + ".index.csv"
    return beside if run.protocol == "time" and os.path.isfile(beside) else run.datapath_index


def grown_index_path(run: RunConfig) -> str:
    """Where --protocol time writes the index a stage trained with, beside its checkpoint."""
    return run.savepath + ".index.csv"


def fill_datapath(run: RunConfig, number: int, record: dict) -> dict:
    """An earlier task's record; one converted from the authors' code gets its data path from --dataset."""
    if record["datapath"] is None and run.dataset:
        record = {**record, "datapath": preset_paths(run.dataset, number)["datapath"],
                  "name": task_name(run.dataset, number)}
    return record


def prepare_index(run: RunConfig, index: ItemIndex) -> None:
    """Write the index task 1 built; an existing index from other data is never overwritten."""
    if os.path.isfile(run.datapath_index):
        existing = read_index(run.datapath_index)
        if np.array_equal(existing.keys, index.keys):
            return
        raise DataError(f"{run.datapath_index}: an index made from other data exists; "
                        "remove it or give another --datapath_index")
    write_index(index, run.datapath_index)
    print(f"index of {index.size} items written to {run.datapath_index}")


def guard_outputs(run: RunConfig) -> str:
    """The checkpoint path; never an earlier stage's checkpoint, nor this stage's finished one unless --overwrite
    (or --resume, which finishes what is there): a later stage may have been built from it."""
    target = run.savepath + ".t7"
    if run.paths and os.path.abspath(target) == os.path.abspath(run.paths):
        raise DataError(f"{target}: --savepath would overwrite the checkpoint this stage starts from")
    if os.path.isfile(target):
        try:   # mmap: the tensors are not read
            existing = torch.load(target, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            existing = {}
        stage = existing.get("stage") if isinstance(existing, dict) else None
        if stage is not None and stage != run.stage:
            raise DataError(f"{target}: holds stage {stage}'s checkpoint; choose another --savepath")
        if stage == run.stage and is_finished(existing, run.savepath) and not (run.overwrite or run.resume):
            raise DataError(f"{target}: stage {run.stage} finished there already (a later stage may be built from "
                            "it); give --overwrite to train it again, or another --savepath")
    return target


def examples_of(inputs: StageInputs, run: RunConfig) -> Callable[[int], tuple[TaskData, np.ndarray]]:
    """Stage.examples: task number → (its data, its training rows); earlier tasks are read from their files."""
    cache: dict[int, tuple[TaskData, np.ndarray]] = {run.stage: (inputs.data, inputs.parts[0])}

    def examples(number: int) -> tuple[TaskData, np.ndarray]:
        if number not in cache:
            record = inputs.tasks[number - 1]
            if record["datapath"] is None:
                raise DataError(f"{run.paths}: does not record task {number}'s data file (give --dataset)")
            data, _ = load_task_data(number, record["datapath"], inputs.index)
            cache[number] = (data, split_indices(len(data.targets), record["seed"], record["split_percentage"])[0])
        return cache[number]
    return examples


# ---------------------------------------------------------------------- checkpoints, resume, early stopping

def checkpoint_dict(run: RunConfig, model: NextItNet, method_state: dict, tasks: list[dict], epoch: int,
                    valid: dict[str, float], extra: dict | None = None, *, finished: bool) -> dict:
    """A stage's checkpoint: the model with its config, the run config, the method's state, the tasks' records, and
    whether it is the stage's final model (`finished`: the best so far, written while the stage trains, is not)."""
    return {"format_version": CHECKPOINT_FORMAT, "stage": run.stage, "model_config": model.config_dict(),
            "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "tasks": tasks, "index_path": run.datapath_index, "run_config": run.to_dict(),
            "method_state": method_state, "epoch": epoch, "valid": valid, "finished": finished, **(extra or {})}


def continuing(run: RunConfig) -> str:
    """How a stopped stage goes on: --resume, which --streams authors refuses (its global generators are not saved)."""
    if run.streams == "authors":
        return "--streams authors cannot resume: the same command with --overwrite trains the stage again"
    return "the same command with --resume continues it"


class StopAtStep(Exception):
    """Raised by an epoch after the step at which a SIGTERM was noted: `within` is where to continue."""

    def __init__(self, within: dict):
        super().__init__()
        self.within = within


def fit(run: RunConfig, train_epoch: Callable[[int, dict | None], dict], validate: Callable[[], dict],
        on_best: Callable[[int, dict], None], resume: Resume, history: History | None = None) -> None:
    """Early stopping: validate after each epoch, `on_best` at each new best, stop after `patience` misses, or after
    the epoch in which train_epoch reported that --max_steps ran out ("budget_spent").

    After every epoch the training state is saved so that `--resume` continues from the next epoch; after a SIGTERM
    (utils.stop_at_a_step), at the step where the epoch stopped (its batches, the generators and the epoch's sums so
    far included), and the run ends with Preempted. `history` (rank 0's) gets a row per finished epoch.
    """
    best, misses, start, within = resume.restore()
    if start >= run.epochs or misses >= run.patience:
        print(f"resume: stage already finished at epoch {start - 1}")
        return
    if history is not None:
        history.begin(resume.phase, start)
    for epoch in range(start, run.epochs):
        started = time.time()
        try:
            stats = distributed.average_stats(train_epoch(epoch, within if epoch == start else None))
        except StopAtStep as stop:
            every_rank = distributed.gather_to_main(stop.within)        # each rank's rows and sums of the epoch
            if distributed.is_main():
                resume.save(epoch, best, misses, every_rank)
            distributed.barrier()                                       # no rank exits before the file is written
            raise Preempted(f"SIGTERM: stage {run.stage} stopped after step {stop.within['batch']} of epoch {epoch}, "
                            f"its state written to {resume.path}; {continuing(run)} there") from None
        trained = time.time()
        valid = distributed.from_main(validate)  # rank 0's scores: every rank takes the same decisions
        value = valid[run.select_on if run.select_on in valid else "acc"]  # cls tasks only report acc
        improved = best is None or value > best or (run.ties == "on" and value == best)
        summary = " ".join(f"{k}={v:.4f}" for k, v in valid.items())
        print(f"epoch {epoch}: loss {stats['loss']:.4f} retention {stats['retention']:.3g} skipped {stats['skipped']} "
              f"| valid {summary} | train {trained - started:.1f}s, all {time.time() - started:.1f}s"
              f"{' *' if improved else ''}", flush=True)
        if stats["finite_steps"] == 0:
            raise DataError(f"{run.datapath}: no finite loss in epoch {epoch}; nothing saved (try a lower --lr)")
        if history is not None:
            history.add(resume.phase, epoch, stats, valid, improved, trained - started, time.time() - started)
        if improved:
            best, misses = value, 0
            if distributed.is_main():
                on_best(epoch, valid)
        else:
            misses += 1
        stopping = distributed.any_rank(sigterm_received())           # noted while validating
        if distributed.is_main() and (stopping or not stats.get("budget_spent")):  # spent: only when stopped here
            resume.save(epoch, best, misses)
        if stopping:
            distributed.barrier()
            raise Preempted(f"SIGTERM: stage {run.stage} stopped after epoch {epoch}, its state written to "
                            f"{resume.path}; {continuing(run)}")
        if misses >= run.patience:
            print(f"early stop: no better validation {run.select_on} for {run.patience} epochs")
            break
        if stats.get("budget_spent"):
            print(f"stop: --max_steps {run.max_steps} optimiser steps done")
            break


class Resume:
    """The state `--resume` needs, saved atomically after each epoch (and at the step where a SIGTERM stopped the
    run) to `<savepath>.resume.t7`. `steps` is the stage's count of optimiser steps per phase (--max_steps), saved
    and restored with it."""

    def __init__(self, run: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 rng: np.random.Generator, method: Method | None = None, phase: int = 0,
                 steps: list[int] | None = None):
        self.path = run.savepath + ".resume.t7"
        self.run, self.model, self.optimizer, self.rng, self.method = run, model, optimizer, rng, method
        self.phase, self.steps = phase, steps if steps is not None else [0]

    def save(self, epoch: int, best: float, misses: int, within: list[dict] | None = None) -> None:
        """After epoch `epoch`, or within it (`within`: each rank's next batch, its rows of the epoch's batches and
        its sums so far, in rank order)."""
        if within is not None:
            within = [{**part, "shards": [[torch.from_numpy(np.ascontiguousarray(rows)), share, size]
                                          for rows, share, size in part["shards"]]} for part in within]
        atomic_torch_save({"stage": self.run.stage, "phase": self.phase, "epoch": epoch, "best": best, "misses": misses,
                           "model_state": self.model.state_dict(), "optimizer_state": self.optimizer.state_dict(),
                           "numpy_rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                           "method_state": self.method.state_dict() if self.method else {}, "within": within,
                           "steps": list(self.steps)}, self.path)

    def restore(self) -> tuple[float | None, int, int, dict | None]:
        """(best, misses, first epoch to run, where within it to continue or None); a fresh start unless --resume."""
        if not self.run.resume:
            return None, 0, 0, None
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: nothing to resume (no interrupted run of stage {self.run.stage} there)")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise DataError(f"{self.path}: cannot resume from it ({str(error).splitlines()[0][:120]})") from None
        if state.get("stage") != self.run.stage:
            raise DataError(f"{self.path}: belongs to stage {state.get('stage')}, not {self.run.stage}")
        saved_phase = state.get("phase", 0)
        if saved_phase != self.phase:  # a later phase was under way: this one finished; an earlier: this one starts
            return (None, self.run.patience, self.run.epochs, None) if saved_phase > self.phase else (None, 0, 0, None)
        try:
            self.model.load_state_dict(state["model_state"], strict=True)
            self.optimizer.load_state_dict(state["optimizer_state"])
        except Exception as error:
            raise DataError(f"{self.path}: cannot resume from it ({str(error).splitlines()[0][:120]})") from None
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        if self.method:
            self.method.load_state_dict(state.get("method_state", state.get("extra", {})))
        self.steps[:] = state.get("steps", self.steps)
        if self.run.max_steps and self.steps[self.phase] >= self.run.max_steps:   # stopped after the budget ran out
            print(f"resume: --max_steps {self.run.max_steps} already done in phase {self.phase}")
            return state["best"], self.run.patience, self.run.epochs, None
        within = state.get("within")
        if isinstance(within, dict):        # written before 2026-12-07's per-rank list: one process's
            within = [within]
        if within is not None:
            if len(within) != distributed.world_size():
                raise DataError(f"{self.path}: stopped within an epoch on {len(within)} process(es); resume it on "
                                f"as many, not {distributed.world_size()}")
            within = within[distributed.rank()]
            within["shards"] = [(rows.numpy(), share, size) for rows, share, size in within["shards"]]
            print(f"resuming stage {self.run.stage} in epoch {state['epoch']} at step {within['batch']}")
            return state["best"], state["misses"], state["epoch"], within
        print(f"resuming stage {self.run.stage} after epoch {state['epoch']}")
        return state["best"], state["misses"], state["epoch"] + 1, None


def finish(run: RunConfig, model: NextItNet, method: Method, stage: Stage, checkpoint_path: str,
           inputs: StageInputs, device: torch.device, extra: dict, resources: Resources, steps: list[int]) -> dict:
    """Reload the best checkpoint, let the method end its stage on it (saved again), and score every task 1..K
    on its own test split (rank 0 only), then mark the checkpoint finished; metrics.json records --max_steps (and
    the optimiser steps taken, `steps` summed over phases), --eval_users and --eval_negatives when given,
    resources.json what the stage cost."""
    if not distributed.is_main():
        return {}
    checkpoint = load_checkpoint(checkpoint_path, "this stage's checkpoint")
    model.load_state_dict(checkpoint["model_state"], strict=True)
    method.end_stage(model, stage)
    saved = checkpoint_dict(run, model, method.state_dict(), checkpoint["tasks"], checkpoint["epoch"],
                            checkpoint["valid"], extra, finished=True)
    del checkpoint
    tasks = evaluate_tasks(model, saved["tasks"], inputs.index, run.smax, run.eval_batch, device, run.top_k,
                           {run.stage: inputs.data}, run.eval_users, resources.evaluation,
                           run.stage if run.protocol == "time" else None, run.eval_negatives)
    started = time.perf_counter()               # marked finished only once every task is scored
    atomic_torch_save(saved, checkpoint_path)
    resources.checkpoint_write_seconds = time.perf_counter() - started
    resources.checkpoint_mib = os.path.getsize(checkpoint_path) / 2**20
    metrics = {"stage": run.stage, "method": run.method, "parameters": parameter_count(model), "tasks": tasks}
    if run.max_steps or run.eval_users or run.eval_negatives:
        metrics["limits"] = {"max_steps": run.max_steps, "steps": sum(steps), "eval_users": run.eval_users,
                             **({"eval_negatives": run.eval_negatives} if run.eval_negatives else {})}
    write_json(run.savepath + ".metrics.json", metrics)
    write_json(run.savepath + ".resources.json", resources.summary())
    print(format_table(run.stage, tasks))
    print(format_evidence(run.stage, tasks))
    if metrics.get("limits"):
        print(format_limits(metrics["limits"]))
    print(f"saved {checkpoint_path} and {run.savepath}.metrics.json (what it cost: {run.savepath}.resources.json)")
    if os.path.exists(run.savepath + ".resume.t7"):
        os.remove(run.savepath + ".resume.t7")
    return metrics


def parameter_count(model: NextItNet) -> int:
    """Every number the stage's model holds as a parameter (shared, own copies, heads, task embeddings)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------- a stage

def run_stage(run: RunConfig) -> dict:
    """Train stage run.stage with run.method: build the model, fit with early stopping, score every task."""
    device = resolve_device(run.device, run.gpu_num)
    rng = set_seed(training_seed(run))
    checkpoint_path = guard_outputs(run)
    resources = Resources(device)
    sampler = make_sampler(run.streams, rng, run.variant, run.stage, run.paths, run.datapath_index)
    inputs = task1_inputs(run, sampler, device) if run.stage == 1 else later_inputs(run, sampler, device)
    resources.load_seconds = time.perf_counter() - resources.started
    print("arguments: " + " ".join(f"{k}={v}" for k, v in sorted(run.to_dict().items())), flush=True)
    method = method_class(run.method)(run.options, run)
    previous = frozen_model(inputs.checkpoint, device, run.compile) if inputs.checkpoint else None
    stage = Stage(run.stage, run, device, previous, inputs.checkpoint, inputs.record, sampler,
                  examples_of(inputs, run), lambda checkpoint: frozen_model(checkpoint, device, run.compile),
                  inputs.parts[0].size, inputs.index)
    method.begin_stage(stage)
    if inputs.checkpoint is None:
        model = NextItNet(ModelConfig(n_items=inputs.index.size, task_classes=[inputs.index.size],
                                      channels=run.channels, **method.model_config()))
    else:
        model = NextItNet.from_checkpoint(inputs.checkpoint)
        if run.protocol == "time":                          # the new items' rows, before the new task's
            model.add_items(inputs.index.size - model.config.n_items)
        method.grow(model, inputs.data.n_classes)
        sampler.after_grow(model)
    model = model.to(device)
    if run.protocol == "time" and previous is not None:     # the frozen previous model reads the new items through
        previous.add_items(model.config.n_items - previous.config.n_items, rows_from=model)  # the student's rows
        if distributed.is_main():
            write_index(inputs.index, grown_index_path(run))
        run.datapath_index = grown_index_path(run)          # what the checkpoint records it was trained with
    if run.compile:
        compile_backbone(model)
    resources.build_seconds = time.perf_counter() - resources.started - resources.load_seconds
    resources.batch, resources.parameters = run.batch, parameter_count(model)
    resources.shapes = {"items": inputs.index.size, "length": int(inputs.data.sources.shape[1]) + (run.stage == 1),
                        "channels": model.config.channels, "classes": model.config.task_classes,
                        "train_rows": int(inputs.parts[0].size)}
    resources.options = run.to_dict()["options"]
    resources.data_bytes = sum(array.nbytes for array in (inputs.data.sources, inputs.data.targets,
                                                          inputs.data.source_row) if array is not None)
    optimizer = sampler.optimizer(method.param_groups(model, run.lr), run.lr)
    train_rows, valid_rows, test_rows = inputs.parts
    batches_per_epoch = train_rows.size / run.batch
    task, kind, extra = run.stage - 1, inputs.record["kind"], sampler.checkpoint_extra()

    steps = [0] * method.phases             # optimiser steps of each phase: --max_steps bounds each

    def train_epoch(epoch: int, within: dict | None = None) -> dict:
        """One epoch (from `within`'s step on, when resumed there); a SIGTERM noted on any rank ends it after the
        step under way with StopAtStep."""
        model.train()
        stats = {"loss": 0.0, "retention": 0.0, "skipped": 0, "finite_steps": 0}
        shards = sampler.epoch_batches(train_rows.size, run.batch) if within is None else within["shards"]
        first = 0 if within is None else within["batch"]             # shards: (this rank's rows, share, batch rows)
        if within is not None:
            stats = dict(within["stats"])
        for b in tqdm(range(first, len(shards)), desc=f"task {run.stage} epoch {epoch}", leave=False, disable=None):
            rows, _, size = shards[b]
            if run.max_steps and steps[phase[0]] >= run.max_steps:
                stats["budget_spent"] = True
                break
            started = time.perf_counter()
            x, y = inputs.batch(train_rows[rows])
            step = Step(x, y, anneal(b, batches_per_epoch, run.smax),
                        Shard(size, distributed.rank(), distributed.world_size()), epoch + b / batches_per_epoch, rows)
            saved = None if resources.step_seconds else SavedForBackward(list(model.parameters()))
            loss, kept, stepped = train_step(model, method, optimizer, step, run.amp, saved)
            stats["retention"] += float(kept)
            account(stats, loss, stepped)
            steps[phase[0]] += 1
            resources.step_done(started)
            if saved:
                resources.saved_bytes, resources.held = saved.largest, method.held_bytes()
            if distributed.any_rank(sigterm_received()):
                raise StopAtStep({"batch": b + 1, "shards": shards, "stats": stats})
        if run.max_steps and steps[phase[0]] >= run.max_steps:
            stats["budget_spent"] = True
        stats["loss"] /= max(stats["finite_steps"], 1)
        stats["retention"] /= max(stats["finite_steps"] + stats["skipped"], 1)
        return stats

    def scored(rows: np.ndarray) -> dict:
        rows = sampler.scored_rows(rows, run.batch)
        rows = limit_users(rows, inputs.data.rows(rows), run.eval_users, run.seed)
        negatives = sampled_negatives(inputs.data, inputs.index, rows, kind, run.eval_negatives, run.seed, run.stage)
        return score(model, task, inputs.data, rows, kind, run.smax, run.eval_batch, device, run.top_k,
                     negatives=negatives)

    phase = [0]                             # the phase under way

    def on_best(epoch: int, valid: dict) -> None:
        test = scored(test_rows)
        print("  test at best validation: " + " ".join(f"{k}={v:.4f}" for k, v in test.items()))
        atomic_torch_save(checkpoint_dict(run, model, method.state_dict(), inputs.tasks, epoch, valid, extra,
                                          finished=False), checkpoint_path)
        for stale in (".metrics.json", ".resources.json"):   # an earlier run's (--overwrite): of another model
            if os.path.exists(run.savepath + stale):
                os.remove(run.savepath + stale)

    history = History(run.savepath, run.resume, run.tensorboard) if distributed.is_main() else None
    with stop_at_a_step():                  # a SIGTERM while training: stop after the step, resumably
        for phase[0] in range(method.phases):
            if phase[0]:                       # the next phase starts from the best model so far (e.g. after a pruning)
                best = distributed.from_main(lambda: load_checkpoint(checkpoint_path, "this stage's checkpoint"))
                model.load_state_dict(best["model_state"], strict=True)
                method.load_state_dict(best.get("method_state") or {})
                method.begin_phase(model, phase[0])
                optimizer = sampler.optimizer(method.param_groups(model, run.lr), run.lr)
                print(f"phase {phase[0]} of {method.phases}: from the best model of the phase before", flush=True)
            fit(run, train_epoch, lambda: scored(valid_rows), on_best,
                Resume(run, model, optimizer, rng, method, phase[0], steps), history)
    if history is not None:
        history.close()
    optimizer = None                        # its state (two copies of the model) is not needed to score
    return finish(run, model, method, stage, checkpoint_path, inputs, device, extra, resources, steps)


def method_for(name: str, options, number: int, previous: NextItNet | None, rng: np.random.Generator,
               smax: float = 50.0, device: torch.device | None = None, record: dict | None = None,
               ce_chunk: int | None = None, n_train: int = 0, negatives: int = 0) -> Method:
    """A method begun on stage `number` outside a run (bench.py, tests): `previous` is the frozen stage-(K−1)
    model, the sampler ours with `rng`; nothing is read from or written to disk. Steps whose `ids` lie in
    0 .. n_train − 1 may let the method keep per-row outputs of its frozen models."""
    run = RunConfig(stage=number, datapath="", datapath_index="", savepath="", method=name, options=options,
                    smax=smax, ce_chunk=ce_chunk, negatives=negatives)
    device = device or torch.device("cpu")
    checkpoint = ({"model_config": previous.config_dict(), "run_config": {"method": name}}  # the method's own chain
                  if previous is not None else None)

    def no_files(task: int) -> tuple[TaskData, np.ndarray]:
        raise DataError(f"task {task}: no data outside a run")
    stage = Stage(number, run, device, previous, checkpoint, record or {}, OurSampler(rng), no_files,
                  lambda saved: frozen_model(saved, device), n_train)
    method = method_class(name)(options, run)
    method.begin_stage(stage)
    return method


def account(stats: dict, loss: torch.Tensor, finite: bool) -> None:
    if finite:
        stats["loss"] += float(loss.detach())
        stats["finite_steps"] += 1
    else:
        stats["skipped"] += 1


def main(stage: int | None = None, argv: list[str] | None = None) -> dict:
    run = parse_args(stage, argv, stage_of=lambda path: int(load_checkpoint(path)["stage"]))
    flags.require_files(run, ["datapath"] if run.stage == 1 else ["datapath", "datapath_index", "paths"],
                        {"datapath_index": " (train_task1.py writes it)"})
    keep_freed_memory()
    with distributed.session(run):  # torchrun: join the process group (a no-op in a single process)
        return run_stage(run)
