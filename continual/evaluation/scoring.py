"""Scoring a model: every task on its own split, beside its trivial baselines, their 95 % intervals and, where
the data's generator knows it, the task's ceiling (what a stage's metrics.json holds)."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from continual.evaluation.metrics import RETEST_PARTS, headline_name, metric_names, ranking_values
from continual.evaluation.stats import class_counts, evidence, kept_share, popularity_ranks, rank_values
from data_loader import (ItemIndex, Staging, TaskData, check_split, limit_users, load_retest, load_sequences_with_index,
                         load_task, retest_path, split_indices)
from model import NextItNet


def load_task_data(stage: int, datapath: str, index: ItemIndex,
                   n_items: int | None = None) -> tuple[TaskData, np.ndarray | None]:
    """Task 1: (last-item examples, full sequences), ranked among the first `n_items` items (default: all of the
    index; --protocol time: ModelConfig.items_at(1), the items task 1 knew); task k ≥ 2: (examples, None)."""
    if stage == 1:
        sequences = load_sequences_with_index(datapath, index)  # [n_users, L]
        return TaskData(sequences[:, :-1], sequences[:, -1], n_items or index.size), sequences
    return load_task(datapath, index), None


@torch.no_grad()
def score_values(model: NextItNet, task: int, data: TaskData, rows: np.ndarray, s: float, batch_size: int,
                 device: torch.device, top_k: int = 5, desc: str = "eval") -> np.ndarray:
    """Per-example metrics [n_rows, 7] (order of `metric_names`) of head `task` on data rows (task 1: among its
    first data.n_classes items, the items of its own stage for a grown model's original test users); masks at
    scale s."""
    model.eval()
    masks = model.task_masks(task, s)
    values = [torch.zeros((0, 7), dtype=torch.float64, device=device)]
    stage_sources = Staging(data.sources, device)
    stage_targets = Staging(data.targets, device)
    for start in tqdm(range(0, rows.size, batch_size), desc=desc, leave=False, disable=None):
        chunk = rows[start:start + batch_size]
        inputs, targets = stage_sources(data.rows(chunk)), stage_targets(chunk)   # [b, L], [b]
        logits, _ = model(inputs, task, s, last_only=True, masks=masks)                  # [b, classes]
        ranked = logits[:, :data.n_classes] if task == 0 else logits                    # task 1: its stage's items
        values.append(ranking_values(ranked.float(), targets, top_k))              # [b, 7], stays on the device
    return torch.cat(values).cpu().numpy()


def reported(values: np.ndarray, kind: str, top_k: int) -> dict[str, float]:
    """Means of per-example values [n, 7]: every metric for rec tasks, accuracy for cls tasks."""
    metrics = dict(zip(metric_names(top_k), (values.sum(0) / max(values.shape[0], 1)).tolist()))
    return metrics if kind == "rec" else {"acc": metrics["acc"]}


def score(model: NextItNet, task: int, data: TaskData, rows: np.ndarray, kind: str, s: float,
          batch_size: int, device: torch.device, top_k: int = 5, desc: str = "eval") -> dict[str, float]:
    """Metrics of head `task` on data rows (every row, no dropped partial batch); masks at scale s."""
    return reported(score_values(model, task, data, rows, s, batch_size, device, top_k, desc), kind, top_k)


def item_classes(data: TaskData, index: ItemIndex) -> np.ndarray | None:
    """[n_items] the class whose raw label is that item (−1: none); None when the classes are the items (task 1)."""
    if data.target_keys is None:
        return None
    items = index.positions(data.target_keys)                    # [n_classes − offset], −1 = not an item
    mapping = np.full(index.size, -1, dtype=np.int64)
    known = items >= 0
    mapping[items[known]] = np.arange(index.offset, data.n_classes)[known]
    return mapping


def baseline_values(data: TaskData, kind: str, train_rows: np.ndarray, test_rows: np.ndarray, index: ItemIndex,
                    top_k: int, test_data: TaskData | None = None) -> dict[str, np.ndarray]:
    """Per-example metrics [n_test, 7] of the trivial baselines, fitted on the training rows only, scored on the test
    rows of `test_data` (default: `data`; a re-test file: the task's later examples, among its test_data.n_classes).

    rec: `popularity` (classes by training frequency; task 1 counts every item of the training users'
    sequences, padding excluded) and `popularity_unseen` (the same, minus the user's own source items);
    cls: `majority` (the training split's most frequent class).
    """
    test_data = test_data or data
    n_classes = test_data.n_classes
    unknown = (0,) if index.offset else ()                       # <UNK>, a class no example has
    if data.target_keys is None:                                 # task 1: the classes are the items
        padding = (index.offset,) if index.has_zero else ()      # the item "0"
        seen = np.concatenate([data.sources[data.rows(train_rows)].reshape(-1), data.targets[train_rows]])
        counts = class_counts(seen, n_classes, exclude=unknown + padding)
    else:
        counts = class_counts(data.targets[train_rows], n_classes, exclude=unknown)
    targets = test_data.targets[test_rows]                       # [n_test]
    if kind != "rec":
        return {"majority": rank_values(popularity_ranks(counts, targets, None), top_k, n_classes)}
    mapping = item_classes(test_data, index)
    sources = test_data.sources[test_data.rows(test_rows)]       # [n_test, L] item indices
    source_classes = sources if mapping is None else mapping[sources]
    return {"popularity": rank_values(popularity_ranks(counts, targets, None), top_k, n_classes),
            "popularity_unseen": rank_values(popularity_ranks(counts, targets, source_classes), top_k, n_classes)}


def known_ceiling(datapath: str, name: str = "ceiling") -> dict[str, float] | None:
    """The best achievable score of a task whose generator knows it: `name` (ceiling; a re-test file's also
    ceiling_with_new, ceiling_without_new) of the entry for this file among the tasks and re-tests of the tasks.json
    beside it (synth.py writes one); None otherwise."""
    meta_path = os.path.join(os.path.dirname(os.path.abspath(datapath)), "tasks.json")
    try:
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
        entries = [*meta.get("tasks", []), *meta.get("retests", [])]
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    for entry in entries:
        if isinstance(entry, dict) and entry.get("file") == os.path.basename(datapath) and name in entry:
            return entry[name]
    return None


def evidence_report(kind: str, split: str, values: np.ndarray, baselines: dict[str, np.ndarray], users: np.ndarray,
                    top_k: int) -> dict:
    """A task's report from its per-example values [n, 7] and its baselines' on the same examples (users [n]: each
    example's user, the bootstrap's unit): metrics, 95 % intervals, baselines and the paired difference against the
    strongest (stats.evidence)."""
    metrics = reported(values, kind, top_k)
    names = list(metrics)
    columns = [metric_names(top_k).index(name) for name in names]
    report = {"kind": kind, split: metrics, f"n_{split}": int(values.shape[0]),
              f"n_{split}_users": int(np.unique(users).size)}
    report.update(evidence(values[:, columns], {b: v[:, columns] for b, v in baselines.items()}, names,
                           headline_name(kind, top_k), users))
    if split != "test":  # stats.evidence names the baselines' scores on the rows it was given "test"
        report["baseline"] = {name: {(split if key == "test" else key): value for key, value in entry.items()}
                              for name, entry in report["baseline"].items()}
    return report


def task_report(model: NextItNet, number: int, record: dict, data: TaskData, index: ItemIndex, s: float,
                batch_size: int, device: torch.device, top_k: int, split: str = "test",
                eval_users: int | None = None) -> dict:
    """One task on its test split: metrics, their 95 % bootstrap intervals over test users, the trivial
    baselines (with intervals), the paired difference against the strongest baseline, and the ceiling
    when the data's generator knows it → {"kind", "test", "ci95", "baseline", "vs_baseline", ...}.

    split="valid": the same on the validation split, the rows every stage selects its epoch on (the report's
    metrics under "valid", its baselines' under "valid" too); the only scores a rule may be chosen on. With
    eval_users, the rows of that many of the split's users (data_loader.limit_users, seeded by the task's seed)."""
    parts = split_indices(len(data.targets), record["seed"], record["split_percentage"])
    check_split(record["datapath"], len(data.targets), parts)
    train_rows, valid_rows, test_rows = parts
    rows = valid_rows if split == "valid" else test_rows
    rows = limit_users(rows, data.rows(rows), eval_users, record["seed"])
    kind = record["kind"]
    values = score_values(model, number - 1, data, rows, s, batch_size, device, top_k, desc=f"{split} task {number}")
    report = evidence_report(kind, split, values, baseline_values(data, kind, train_rows, rows, index, top_k),
                             data.rows(rows), top_k)
    ceiling = known_ceiling(record["datapath"]) if record.get("datapath") else None
    if ceiling is not None:
        report["ceiling"] = ceiling
    return report


def retest_report(model: NextItNet, number: int, record: dict, data: TaskData, index: ItemIndex, stage: int, s: float,
                  batch_size: int, device: torch.device, top_k: int, eval_users: int | None = None) -> dict | None:
    """--protocol time: earlier task `number` on its re-test file after stage `stage` (data_loader.retest_path; None
    when there is none), against every item of the grown index (task 1) or its own classes: the report of
    task_report over every user of the file, over the users whose input holds an item newer than the task's stage
    (`with_new`) and over the others (`without_new`), each with its ceiling where the generator knows it; the
    baselines are fitted on the task's own training split (`data`: what it knew). An input item the index lacks
    counts as new.
    → {"file", "left_out" (examples whose target the model does not know), "all", "with_new", "without_new"}."""
    path = retest_path(record["datapath"], stage)
    if not os.path.isfile(path):
        return None
    later, left_out, unknown = load_retest(path, index, data if number > 1 else None)
    rows = np.arange(len(later.targets))
    rows = limit_users(rows, later.rows(rows), eval_users, record["seed"])
    kind = record["kind"]
    values = score_values(model, number - 1, later, rows, s, batch_size, device, top_k, desc=f"re-test task {number}")
    train_rows = split_indices(len(data.targets), record["seed"], record["split_percentage"])[0]
    baselines = baseline_values(data, kind, train_rows, rows, index, top_k, test_data=later)
    users = later.rows(rows)                                                        # [n] each example's user
    newer = (later.sources[users] >= index.size_at(number)).any(1) | unknown[users]   # [n] holds a later item
    report: dict = {"file": path, "left_out": int(left_out)}
    for part, chosen in zip(RETEST_PARTS, (np.ones_like(newer), newer, ~newer)):
        if not chosen.any():
            continue
        report[part] = evidence_report(kind, "test", values[chosen], {name: value[chosen] for name, value in
                                                                      baselines.items()}, users[chosen], top_k)
        ceiling = known_ceiling(path, "ceiling" if part == "all" else f"ceiling_{part}")
        if ceiling is not None:
            report[part]["ceiling"] = ceiling
    return report


def kept_report(earlier: NextItNet, later: NextItNet, number: int, record: dict, data: TaskData,
                smax: tuple[float, float], batch_size: int, device: torch.device, top_k: int,
                split: str = "test", eval_users: int | None = None) -> dict:
    """The share of task `number`'s headline score that `later` keeps from `earlier` on the same split rows, with
    its paired 95 % bootstrap interval over those users (stats.kept_share); smax = (earlier's, later's)."""
    parts = split_indices(len(data.targets), record["seed"], record["split_percentage"])
    rows = parts[1] if split == "valid" else parts[2]
    rows = limit_users(rows, data.rows(rows), eval_users, record["seed"])
    name = headline_name(record["kind"], top_k)
    column = metric_names(top_k).index(name)
    values = [score_values(model, number - 1, data, rows, s, batch_size, device, top_k, desc=f"kept task {number}")
              for model, s in zip((earlier, later), smax)]                   # 2 × [n_rows, 7]
    users = data.rows(rows)                                                  # [n_rows] user of each example
    return {"metric": name, "split": split, **kept_share(values[0][:, column], values[1][:, column], users),
            f"n_{split}_users": int(np.unique(users).size)}


def evaluate_tasks(model: NextItNet, checkpoint_tasks: list[dict], index: ItemIndex, s: float,
                   batch_size: int, device: torch.device, top_k: int,
                   cache: dict[int, TaskData] | None = None, eval_users: int | None = None,
                   timings: list[dict] | None = None, retest_after: int | None = None) -> dict[str, dict]:
    """Every task of the model, each on its own test split (at most eval_users of its users) → {"1": task_report,
    ...}; `timings`, when given, gets each task's {task, users, seconds} of scoring (loading excluded). With
    `retest_after` K (--protocol time), every earlier task that has a re-test file after stage K is also scored on it
    (its report's "retest": retest_report)."""
    results = {}
    for number, record in enumerate(checkpoint_tasks, start=1):
        if record["datapath"] is None and not (cache and number in cache):
            print(f"task {number}: not scored (its data path is unknown: a checkpoint converted from the authors' code)")
            continue
        if cache is not None and number in cache:
            data = cache[number]
        else:
            data, _ = load_task_data(number, record["datapath"], index, model.config.items_at(1))
        started = time.perf_counter()
        results[str(number)] = task_report(model, number, record, data, index, s, batch_size, device, top_k,
                                           eval_users=eval_users)
        if timings is not None:
            timings.append({"task": number, "users": results[str(number)]["n_test_users"],
                            "seconds": round(time.perf_counter() - started, 2)})
        retest = (retest_report(model, number, record, data, index, retest_after, s, batch_size, device, top_k,
                                eval_users) if retest_after and number < retest_after else None)
        if retest is not None:
            results[str(number)]["retest"] = retest
        del data
    return results
