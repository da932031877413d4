"""Scoring a model: every task on its own split, beside its trivial baselines, their 95 % intervals and, where
the data's generator knows it, the task's ceiling (what a stage's metrics.json holds)."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from continual.evaluation.metrics import (RETEST_PARTS, candidate_rank, headline_name, metric_names, rank_metrics,
                                          ranking_values, sampled_ranking_values)
from continual.evaluation.stats import class_counts, evidence, kept_share, popularity_ranks, rank_values
from data_loader import (ItemIndex, Staging, TaskData, check_split, limit_users, load_retest, load_sequences_with_index,
                         load_task, retest_path, split_indices)
from model import NextItNet
from utils import DataError


def load_task_data(stage: int, datapath: str, index: ItemIndex,
                   n_items: int | None = None) -> tuple[TaskData, np.ndarray | None]:
    """Task 1: (last-item examples, full sequences), ranked among the first `n_items` items (default: all of the
    index; --protocol time: ModelConfig.items_at(1), the items task 1 knew); task k ≥ 2: (examples, None)."""
    if stage == 1:
        sequences = load_sequences_with_index(datapath, index)  # [n_users, L]
        return TaskData(sequences[:, :-1], sequences[:, -1], n_items or index.size), sequences
    return load_task(datapath, index), None


def sampled_negatives(data: TaskData, index: ItemIndex, rows: np.ndarray, kind: str, count: int, seed: int,
                      number: int) -> np.ndarray | None:
    """--eval_negatives N (DITTO's evaluation): for each example of `rows`, N classes of task `number` drawn uniformly
    with replacement among its rankable classes other than its target (never <UNK>, nor task 1's padding item "0")
    → [n_rows, N]; a draw seeded by (the task's seed, its number), so every stage, model and baseline ranks the same
    candidates for the same rows. None for cls tasks or N = 0 (every class is ranked)."""
    if not count or kind != "rec":
        return None
    excluded = [0] if index.offset else []                                          # <UNK>
    if data.target_keys is None and index.has_zero:                                 # task 1: the padding item "0"
        excluded.append(index.offset)
    allowed = np.setdiff1d(np.arange(data.n_classes), excluded)                     # [m] ascending
    if allowed.size < 2:
        raise DataError(f"task {number} has {allowed.size} rankable class(es): --eval_negatives needs two or more")
    targets = data.targets[rows]                                                    # [n]
    where = np.searchsorted(allowed, targets)                                       # [n]
    inside = (where < allowed.size) & (allowed[np.minimum(where, allowed.size - 1)] == targets)
    rng = np.random.default_rng([seed, 99, number])
    drawn = rng.integers(0, allowed.size - inside[:, None], size=(rows.size, count))  # [n, N], the target skipped:
    drawn += (drawn >= where[:, None]) & inside[:, None]                              # positions above it shift up
    return allowed[drawn]


@torch.no_grad()
def score_values(model: NextItNet, task: int, data: TaskData, rows: np.ndarray, s: float, batch_size: int,
                 device: torch.device, top_k: int = 5, desc: str = "eval",
                 negatives: np.ndarray | None = None) -> np.ndarray:
    """Per-example metrics [n_rows, 7] (order of `metric_names`) of head `task` on data rows (task 1: among its
    first data.n_classes items, the items of its own stage for a grown model's original test users); masks at
    scale s. With `negatives` [n_rows, N] (sampled_negatives), each target is ranked among its own N instead."""
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
        if negatives is None:
            values.append(ranking_values(ranked.float(), targets, top_k))          # [b, 7], stays on the device
        else:
            drawn = torch.from_numpy(negatives[start:start + batch_size]).to(device)   # [b, N]
            values.append(sampled_ranking_values(ranked.float(), targets, drawn, top_k))
    return torch.cat(values).cpu().numpy()


def reported(values: np.ndarray, kind: str, top_k: int) -> dict[str, float]:
    """Means of per-example values [n, 7]: every metric for rec tasks, accuracy for cls tasks."""
    metrics = dict(zip(metric_names(top_k), (values.sum(0) / max(values.shape[0], 1)).tolist()))
    return metrics if kind == "rec" else {"acc": metrics["acc"]}


def score(model: NextItNet, task: int, data: TaskData, rows: np.ndarray, kind: str, s: float,
          batch_size: int, device: torch.device, top_k: int = 5, desc: str = "eval",
          negatives: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of head `task` on data rows (every row, no dropped partial batch); masks at scale s; with
    `negatives` (sampled_negatives) each target ranked among its own."""
    values = score_values(model, task, data, rows, s, batch_size, device, top_k, desc, negatives)
    return reported(values, kind, top_k)


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
                    top_k: int, test_data: TaskData | None = None,
                    negatives: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-example metrics [n_test, 7] of the trivial baselines, fitted on the training rows only, scored on the test
    rows of `test_data` (default: `data`; a re-test file: the task's later examples, among its test_data.n_classes);
    with `negatives` [n_test, N] (sampled_negatives), each target among its own N, as the model's.

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
    if negatives is not None:
        return sampled_popularity_values(counts, targets, negatives, source_classes, top_k)
    return {"popularity": rank_values(popularity_ranks(counts, targets, None), top_k, n_classes),
            "popularity_unseen": rank_values(popularity_ranks(counts, targets, source_classes), top_k, n_classes)}


def sampled_popularity_values(counts: np.ndarray, targets: np.ndarray, negatives: np.ndarray,
                              source_classes: np.ndarray, top_k: int, chunk: int = 4096) -> dict[str, np.ndarray]:
    """The popularity baselines among sampled candidates (--eval_negatives): counts [n_classes], targets [n],
    negatives [n, N], source_classes [n, L] (−1: none) → {"popularity", "popularity_unseen"}: [n, 7] each; the
    unseen ranking drops the user's own source items from its candidates (a target among them is not ranked)."""
    candidates = torch.from_numpy(np.concatenate([targets[:, None], negatives], axis=1))   # [n, 1 + N]
    scores = torch.from_numpy(counts)[candidates]                                           # [n, 1 + N]
    sources = torch.from_numpy(np.ascontiguousarray(source_classes))                        # [n, L]
    width = candidates.shape[1]
    removed = [(candidates[start:start + chunk, :, None] == sources[start:start + chunk, None, :]).any(2)
               for start in range(0, candidates.shape[0], chunk)]                         # [n, 1 + N] in chunks
    removed = torch.cat(removed) if removed else torch.zeros((0, width), dtype=torch.bool)
    return {"popularity": rank_metrics(candidate_rank(scores, candidates), top_k, width).numpy(),
            "popularity_unseen": rank_metrics(candidate_rank(scores, candidates, removed), top_k, width).numpy()}


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
                eval_users: int | None = None, eval_negatives: int = 0) -> dict:
    """One task on its test split: metrics, their 95 % bootstrap intervals over test users, the trivial
    baselines (with intervals), the paired difference against the strongest baseline, and the ceiling
    when the data's generator knows it → {"kind", "test", "ci95", "baseline", "vs_baseline", ...}.

    split="valid": the same on the validation split, the rows every stage selects its epoch on (the report's
    metrics under "valid", its baselines' under "valid" too); the only scores a rule may be chosen on. With
    eval_users, the rows of that many of the split's users (data_loader.limit_users, seeded by the task's seed). With
    eval_negatives N, each rec target is ranked among N sampled items (sampled_negatives), the baselines' too."""
    parts = split_indices(len(data.targets), record["seed"], record["split_percentage"])
    check_split(record["datapath"], len(data.targets), parts)
    train_rows, valid_rows, test_rows = parts
    rows = valid_rows if split == "valid" else test_rows
    rows = limit_users(rows, data.rows(rows), eval_users, record["seed"])
    kind = record["kind"]
    negatives = sampled_negatives(data, index, rows, kind, eval_negatives, record["seed"], number)
    values = score_values(model, number - 1, data, rows, s, batch_size, device, top_k, f"{split} task {number}",
                          negatives)
    baselines = baseline_values(data, kind, train_rows, rows, index, top_k, negatives=negatives)
    report = evidence_report(kind, split, values, baselines, data.rows(rows), top_k)
    ceiling = known_ceiling(record["datapath"]) if record.get("datapath") else None
    if ceiling is not None:
        report["ceiling"] = ceiling
    return report


def retest_report(model: NextItNet, number: int, record: dict, data: TaskData, index: ItemIndex, stage: int, s: float,
                  batch_size: int, device: torch.device, top_k: int, eval_users: int | None = None,
                  eval_negatives: int = 0) -> dict | None:
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
    negatives = sampled_negatives(later, index, rows, kind, eval_negatives, record["seed"], number)
    values = score_values(model, number - 1, later, rows, s, batch_size, device, top_k, f"re-test task {number}",
                          negatives)
    train_rows = split_indices(len(data.targets), record["seed"], record["split_percentage"])[0]
    baselines = baseline_values(data, kind, train_rows, rows, index, top_k, test_data=later, negatives=negatives)
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


def kept_report(earlier: NextItNet, later: NextItNet, number: int, record: dict, data: TaskData, index: ItemIndex,
                smax: tuple[float, float], batch_size: int, device: torch.device, top_k: int,
                split: str = "test", eval_users: int | None = None, eval_negatives: int = 0) -> dict:
    """The share of task `number`'s headline score that `later` keeps from `earlier` on the same split rows (and,
    with eval_negatives, the same sampled candidates), with its paired 95 % bootstrap interval over those users
    (stats.kept_share); smax = (earlier's, later's)."""
    parts = split_indices(len(data.targets), record["seed"], record["split_percentage"])
    rows = parts[1] if split == "valid" else parts[2]
    rows = limit_users(rows, data.rows(rows), eval_users, record["seed"])
    name = headline_name(record["kind"], top_k)
    column = metric_names(top_k).index(name)
    negatives = sampled_negatives(data, index, rows, record["kind"], eval_negatives, record["seed"], number)
    values = [score_values(model, number - 1, data, rows, s, batch_size, device, top_k, f"kept task {number}",
                           negatives) for model, s in zip((earlier, later), smax)]      # 2 × [n_rows, 7]
    users = data.rows(rows)                                                  # [n_rows] user of each example
    return {"metric": name, "split": split, **kept_share(values[0][:, column], values[1][:, column], users),
            f"n_{split}_users": int(np.unique(users).size)}


def evaluate_tasks(model: NextItNet, checkpoint_tasks: list[dict], index: ItemIndex, s: float,
                   batch_size: int, device: torch.device, top_k: int,
                   cache: dict[int, TaskData] | None = None, eval_users: int | None = None,
                   timings: list[dict] | None = None, retest_after: int | None = None,
                   eval_negatives: int = 0) -> dict[str, dict]:
    """Every task of the model, each on its own test split (at most eval_users of its users) → {"1": task_report,
    ...}; `timings`, when given, gets each task's {task, users, seconds} of scoring (loading excluded). With
    `retest_after` K (--protocol time), every earlier task that has a re-test file after stage K is also scored on it
    (its report's "retest": retest_report). eval_negatives: task_report's."""
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
                                           eval_users=eval_users, eval_negatives=eval_negatives)
        if timings is not None:
            timings.append({"task": number, "users": results[str(number)]["n_test_users"],
                            "seconds": round(time.perf_counter() - started, 2)})
        retest = (retest_report(model, number, record, data, index, retest_after, s, batch_size, device, top_k,
                                eval_users, eval_negatives) if retest_after and number < retest_after else None)
        if retest is not None:
            results[str(number)]["retest"] = retest
        del data
    return results
