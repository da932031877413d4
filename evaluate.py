"""Score tasks of a checkpoint on their test splits, and print the forgetting matrix of a run.

    python evaluate.py --paths CKPT --task J --datapath F --datapath_index I [--seed S] [--split valid] [--json OUT]
    python evaluate.py --paths LATER --task J --kept_from EARLIER    (+ the share of J's score LATER keeps)
    python evaluate.py --matrix saved_models/demo/task*.metrics.json [--csv OUT]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os

import numpy as np
import torch
from tqdm import tqdm

import flags
from data_loader import ItemIndex, Staging, TaskData, check_split, load_sequences_with_index, load_task, read_index, split_indices
from model import NextItNet
from stats import class_counts, evidence, kept_share, popularity_ranks, rank_values
from checkpoints import load_checkpoint
from utils import (DataError, atomic_write_text, cli, headline_metric, keep_freed_memory, metric_names,
                   ranking_values, write_json)


def load_task_data(stage: int, datapath: str, index: ItemIndex) -> tuple[TaskData, np.ndarray | None]:
    """Task 1: (last-item examples, full sequences); task k ≥ 2: (examples, None)."""
    if stage == 1:
        sequences = load_sequences_with_index(datapath, index)  # [n_users, L]
        return TaskData(sequences[:, :-1], sequences[:, -1], index.size), sequences
    return load_task(datapath, index), None


@torch.no_grad()
def score_values(model: NextItNet, task: int, data: TaskData, rows: np.ndarray, s: float, batch_size: int,
                 device: torch.device, top_k: int = 5, desc: str = "eval") -> np.ndarray:
    """Per-example metrics [n_rows, 7] (order of `metric_names`) of head `task` on data rows; masks at scale s."""
    model.eval()
    masks = model.task_masks(task, s)
    values = [torch.zeros((0, 7), dtype=torch.float64, device=device)]
    stage_sources = Staging(data.sources, device)
    stage_targets = Staging(data.targets, device)
    for start in tqdm(range(0, rows.size, batch_size), desc=desc, leave=False, disable=None):
        chunk = rows[start:start + batch_size]
        inputs, targets = stage_sources(data.rows(chunk)), stage_targets(chunk)   # [b, L], [b]
        logits, _ = model(inputs, task, s, last_only=True, masks=masks)
        values.append(ranking_values(logits.float(), targets, top_k))              # [b, 7], stays on the device
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
                    top_k: int) -> dict[str, np.ndarray]:
    """Per-example metrics [n_test, 7] of the trivial baselines, fitted on the training rows only.

    rec: `popularity` (classes by training frequency; task 1 counts every item of the training users'
    sequences, padding excluded) and `popularity_unseen` (the same, minus the user's own source items);
    cls: `majority` (the training split's most frequent class).
    """
    unknown = (0,) if index.offset else ()                       # <UNK>, a class no example has
    if data.target_keys is None:                                 # task 1: the classes are the items
        padding = (index.offset,) if index.has_zero else ()      # the item "0"
        seen = np.concatenate([data.sources[data.rows(train_rows)].reshape(-1), data.targets[train_rows]])
        counts = class_counts(seen, data.n_classes, exclude=unknown + padding)
    else:
        counts = class_counts(data.targets[train_rows], data.n_classes, exclude=unknown)
    targets = data.targets[test_rows]                            # [n_test]
    if kind != "rec":
        return {"majority": rank_values(popularity_ranks(counts, targets, None), top_k, data.n_classes)}
    mapping = item_classes(data, index)
    sources = data.sources[data.rows(test_rows)]                 # [n_test, L] item indices
    source_classes = sources if mapping is None else mapping[sources]
    return {"popularity": rank_values(popularity_ranks(counts, targets, None), top_k, data.n_classes),
            "popularity_unseen": rank_values(popularity_ranks(counts, targets, source_classes), top_k,
                                             data.n_classes)}


def known_ceiling(datapath: str) -> dict[str, float] | None:
    """The best achievable score of a task whose generator knows it: `ceiling` of the entry for this file
    in the tasks.json beside it (synth.py writes one); None otherwise."""
    meta_path = os.path.join(os.path.dirname(os.path.abspath(datapath)), "tasks.json")
    try:
        with open(meta_path, encoding="utf-8") as handle:
            entries = json.load(handle).get("tasks", [])
    except (OSError, ValueError, AttributeError):
        return None
    for entry in entries:
        if isinstance(entry, dict) and entry.get("file") == os.path.basename(datapath) and "ceiling" in entry:
            return entry["ceiling"]
    return None


def task_report(model: NextItNet, number: int, record: dict, data: TaskData, index: ItemIndex, s: float,
                batch_size: int, device: torch.device, top_k: int, split: str = "test") -> dict:
    """One task on its test split: metrics, their 95 % bootstrap intervals over test users, the trivial
    baselines (with intervals), the paired difference against the strongest baseline, and the ceiling
    when the data's generator knows it → {"kind", "test", "ci95", "baseline", "vs_baseline", ...}.

    split="valid": the same on the validation split, the rows every stage selects its epoch on (the report's
    metrics under "valid", its baselines' under "valid" too); the only scores a rule may be chosen on."""
    parts = split_indices(len(data.targets), record["seed"], record["split_percentage"])
    check_split(record["datapath"], len(data.targets), parts)
    train_rows, valid_rows, test_rows = parts
    rows = valid_rows if split == "valid" else test_rows
    kind = record["kind"]
    values = score_values(model, number - 1, data, rows, s, batch_size, device, top_k, desc=f"{split} task {number}")
    metrics = reported(values, kind, top_k)
    names = list(metrics)
    columns = [metric_names(top_k).index(name) for name in names]
    baselines = baseline_values(data, kind, train_rows, rows, index, top_k)
    groups = data.rows(rows)
    report = {"kind": kind, split: metrics, f"n_{split}": int(rows.size),
              f"n_{split}_users": int(np.unique(groups).size)}
    report.update(evidence(values[:, columns], {b: v[:, columns] for b, v in baselines.items()}, names,
                           headline_name(kind, top_k), groups))
    if split != "test":  # stats.evidence names the baselines' scores on the rows it was given "test"
        report["baseline"] = {name: {(split if key == "test" else key): value for key, value in entry.items()}
                              for name, entry in report["baseline"].items()}
    ceiling = known_ceiling(record["datapath"]) if record.get("datapath") else None
    if ceiling is not None:
        report["ceiling"] = ceiling
    return report


def kept_report(earlier: NextItNet, later: NextItNet, number: int, record: dict, data: TaskData,
                smax: tuple[float, float], batch_size: int, device: torch.device, top_k: int,
                split: str = "test") -> dict:
    """The share of task `number`'s headline score that `later` keeps from `earlier` on the same split rows, with
    its paired 95 % bootstrap interval over those users (stats.kept_share); smax = (earlier's, later's)."""
    parts = split_indices(len(data.targets), record["seed"], record["split_percentage"])
    rows = parts[1] if split == "valid" else parts[2]
    name = headline_name(record["kind"], top_k)
    column = metric_names(top_k).index(name)
    values = [score_values(model, number - 1, data, rows, s, batch_size, device, top_k, desc=f"kept task {number}")
              for model, s in zip((earlier, later), smax)]                   # 2 × [n_rows, 7]
    users = data.rows(rows)                                                  # [n_rows] user of each example
    return {"metric": name, "split": split, **kept_share(values[0][:, column], values[1][:, column], users),
            f"n_{split}_users": int(np.unique(users).size)}


def headline_name(kind: str, top_k: int = 5) -> str:
    """The metric a task is judged on: MRR at top_k for rec tasks, accuracy for cls tasks."""
    return f"mrr@{top_k}" if kind == "rec" else "acc"


def evaluate_tasks(model: NextItNet, checkpoint_tasks: list[dict], index: ItemIndex, s: float,
                   batch_size: int, device: torch.device, top_k: int,
                   cache: dict[int, TaskData] | None = None) -> dict[str, dict]:
    """Every task of the model, each on its own test split → {"1": task_report, ...}."""
    results = {}
    for number, record in enumerate(checkpoint_tasks, start=1):
        if record["datapath"] is None and not (cache and number in cache):
            print(f"task {number}: not scored (its data path is unknown: a checkpoint converted from the authors' code)")
            continue
        if cache is not None and number in cache:
            data = cache[number]
        else:
            data, _ = load_task_data(number, record["datapath"], index)
        results[str(number)] = task_report(model, number, record, data, index, s, batch_size, device, top_k)
    return results


def load_stages(metric_files: list[str]) -> list[dict]:
    """The metrics.json files of a run, sorted by stage."""
    stages = []
    for path in metric_files:
        try:
            with open(path, encoding="utf-8") as handle:
                stages.append(json.load(handle))
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: not a metrics file ({error})") from None
    return sorted(stages, key=lambda entry: entry["stage"])


def matrix_cell(task: dict) -> dict:
    """A task's headline metric (MRR at the smallest cut-off for rec, acc for cls) with its interval, the
    strongest baseline, whether the model is above it (None when the file has no evidence) and the ceiling."""
    metric = headline_metric(task)
    versus = task.get("vs_baseline") or {}
    baseline = task.get("baseline", {}).get(versus.get("baseline"), {})
    return {"metric": metric, "value": task["test"][metric], "ci95": task.get("ci95", {}).get(metric),
            "baseline": versus.get("baseline"), "baseline_value": baseline.get("test", {}).get(metric),
            "above": versus.get("above"), "ceiling": task.get("ceiling", {}).get(metric)}


def matrix_cells(metric_files: list[str]) -> tuple[list[int], int, dict[tuple[int, int], dict]]:
    """(stages, number of tasks, {(stage, task): matrix_cell}) of a run."""
    stages = load_stages(metric_files)
    n_tasks = max(len(entry["tasks"]) for entry in stages)
    cells = {(entry["stage"], int(k)): matrix_cell(task) for entry in stages for k, task in entry["tasks"].items()}
    return [entry["stage"] for entry in stages], n_tasks, cells


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def forgetting_matrix(metric_files: list[str]) -> tuple[list[str], list[list[str]]]:
    """The CSV table. Rows: stages; columns `task1..N`: each task's headline metric (MRR@5 for rec, acc for
    cls); then per task its 95 % interval, strongest baseline (name, value), above-baseline flag and ceiling."""
    stages, n_tasks, cells = matrix_cells(metric_files)
    tasks = range(1, n_tasks + 1)
    extra = ["lo", "hi", "baseline", "baseline_name", "above_baseline", "ceiling"]
    header = ["stage"] + [f"task{k}" for k in tasks] + [f"task{k}_{name}" for k in tasks for name in extra]
    rows = []
    for stage in stages:
        row, evidence_row = [str(stage)], []
        for k in tasks:
            cell = cells.get((stage, k))
            row.append(_number(cell["value"]) if cell else "")
            if cell is None:
                evidence_row += [""] * len(extra)
                continue
            low, high = cell["ci95"] or (None, None)
            above = "" if cell["above"] is None else str(int(cell["above"]))
            evidence_row += [_number(low), _number(high), _number(cell["baseline_value"]), cell["baseline"] or "",
                             above, _number(cell["ceiling"])]
        rows.append(row + evidence_row)
    return header, rows


def matrix_lines(metric_files: list[str]) -> list[str]:
    """The printed matrix: per stage a line of values (`!` = not above the strongest baseline), a line of
    95 % intervals and a line of baselines (and ceilings, where known)."""
    stages, n_tasks, cells = matrix_cells(metric_files)
    width = 19
    lines = ["forgetting matrix (rows: after stage; MRR@5 for rec tasks, accuracy for cls tasks). Under each value:",
             "its 95 % bootstrap interval over test users, then b = the strongest trivial baseline on the same test",
             "users (and c = the ceiling the data's generator knows). ! = not above the baseline (paired interval",
             "of the difference not above 0).",
             "stage".rjust(6) + "".join(f"task{k}".rjust(width) for k in range(1, n_tasks + 1))]
    for stage in stages:
        value_line, interval_line, baseline_line = str(stage).rjust(6), " " * 6, " " * 6
        for k in range(1, n_tasks + 1):
            cell = cells.get((stage, k))
            if cell is None:
                value_line, interval_line, baseline_line = (line + " " * width for line in
                                                            (value_line, interval_line, baseline_line))
                continue
            value_line += (f"{cell['value']:.4f}" + ("!" if cell["above"] is False else " ")).rjust(width)
            interval_line += (f"[{cell['ci95'][0]:.3f},{cell['ci95'][1]:.3f}] " if cell["ci95"] else "").rjust(width)
            reference = f"b {cell['baseline_value']:.3f}" if cell["baseline_value"] is not None else ""
            reference += f" c {cell['ceiling']:.3f}" if cell["ceiling"] is not None else ""
            baseline_line += (reference + " ").rjust(width)
        lines += [value_line, interval_line, baseline_line]
    return lines


def check_kept_from(path: str, checkpoint: dict, task: int, record: dict, n_items: int) -> None:
    """--kept_from must hold the task, split it the same way and index the same items, or the share compares
    different users."""
    tasks = checkpoint["tasks"]
    if len(tasks) < task:
        raise DataError(f"{path}: holds tasks 1..{len(tasks)}, not task {task} (--kept_from)")
    earlier = tasks[task - 1]
    if (earlier["seed"], earlier["split_percentage"]) != (record["seed"], record["split_percentage"]):
        raise DataError(f"{path}: splits task {task} with seed {earlier['seed']} and {earlier['split_percentage']}, "
                        f"--paths with seed {record['seed']} and {record['split_percentage']} (other test users)")
    if checkpoint["model_config"]["n_items"] != n_items:
        raise DataError(f"{path}: has {checkpoint['model_config']['n_items']} items, the index {n_items} "
                        "(made from other data)")


def main() -> None:
    parser = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", type=flags.existing_file, help="checkpoint to score")
    parser.add_argument("--task", type=flags.positive_int, help="task number (1-based)")
    parser.add_argument("--datapath", type=flags.existing_file,
                        help="the task's data file (default: as stored in the checkpoint)")
    parser.add_argument("--datapath_index", type=flags.existing_file,
                        help="item index (default: as stored in the checkpoint)")
    parser.add_argument("--seed", type=flags.seed, help="split seed (default: as stored in the checkpoint)")
    parser.add_argument("--split_percentage", type=flags.fraction, default=None, help="in (0, 1)")
    parser.add_argument("--batch", type=flags.positive_int, default=256)
    parser.add_argument("--smax", type=flags.smax, default=None)
    parser.add_argument("--top_k", type=flags.positive_int, default=5)
    parser.add_argument("--device", type=flags.device, default=None)
    parser.add_argument("--split", choices=["test", "valid"], default="test",
                        help="the split scored: test, or valid (the rows each stage selects its epoch on)")
    parser.add_argument("--kept_from", type=flags.existing_file,
                        help="an earlier checkpoint holding the task: also report the share of its headline score "
                             "that --paths keeps on the same rows, with a paired bootstrap interval over users")
    parser.add_argument("--json", type=flags.output_file, help="write {'kind': ..., 'test': {...}} here")
    parser.add_argument("--matrix", nargs="+", type=flags.existing_file,
                        help="metrics.json files of a run: print the forgetting matrix")
    parser.add_argument("--csv", type=flags.output_file, help="with --matrix: also write it as CSV")
    args = parser.parse_args()

    if args.matrix:
        header, rows = forgetting_matrix(args.matrix)
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([header] + rows)
        if args.csv:
            atomic_write_text(args.csv, buffer.getvalue())
        print("\n".join(matrix_lines(args.matrix)))
        return
    keep_freed_memory()
    if not args.paths or not args.task:
        parser.error("--paths and --task are required (or --matrix)")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoint = load_checkpoint(args.paths)
    model = NextItNet.from_checkpoint(checkpoint).to(device)
    tasks = checkpoint["tasks"]
    if not 1 <= args.task <= len(tasks):
        raise DataError(f"--task {args.task}: {args.paths} holds tasks 1..{len(tasks)}")
    record = dict(tasks[args.task - 1])
    record["datapath"] = args.datapath or record["datapath"]
    if record["datapath"] is None:
        raise DataError(f"{args.paths}: does not record task {args.task}'s data file; give --datapath")
    if not (args.datapath_index or checkpoint["index_path"]):
        raise DataError(f"{args.paths}: does not record the item index; give --datapath_index")
    record["seed"] = record["seed"] if args.seed is None else args.seed
    if args.split_percentage is not None:
        record["split_percentage"] = args.split_percentage
    index = read_index(args.datapath_index or checkpoint["index_path"])
    if index.size != model.config.n_items:
        raise DataError(f"{args.datapath_index or checkpoint['index_path']}: index has {index.size} items, "
                        f"the checkpoint {model.config.n_items} (made from other data)")
    data, _ = load_task_data(args.task, record["datapath"], index)
    flags.check_top_k(args.top_k, record["kind"], data.n_classes, f"task {args.task}")
    if args.split_percentage is not None:  # a split too small for this data names the flag
        check_split(record["datapath"], len(data.targets),
                    split_indices(len(data.targets), record["seed"], args.split_percentage), args.split_percentage)
    smax = args.smax if args.smax is not None else checkpoint["run_config"]["smax"]
    if args.kept_from:  # checked before anything is scored
        earlier_checkpoint = load_checkpoint(args.kept_from)
        check_kept_from(args.kept_from, earlier_checkpoint, args.task, record, index.size)
    result = task_report(model, args.task, record, data, index, smax, args.batch, device, args.top_k, args.split)
    if args.kept_from:
        earlier = NextItNet.from_checkpoint(earlier_checkpoint).to(device)
        earlier_smax = args.smax if args.smax is not None else earlier_checkpoint["run_config"]["smax"]
        result["kept"] = kept_report(earlier, model, args.task, record, data, (earlier_smax, smax), args.batch,
                                     device, args.top_k, args.split)
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    cli(main)
