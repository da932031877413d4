"""Score tasks of a checkpoint on their test splits, and print the forgetting matrix of a run.

    python evaluate.py --paths CKPT --task J --datapath F --datapath_index I [--seed S] [--json OUT]
    python evaluate.py --matrix saved_models/demo/task*.metrics.json [--csv OUT]
"""
from __future__ import annotations

import argparse
import csv
import io
import json

import numpy as np
import torch
from tqdm import tqdm

from data_loader import ItemIndex, Staging, TaskData, check_split, load_sequences_with_index, load_task, read_index, split_indices
from model import NextItNet
from utils import DataError, atomic_write_text, cli, keep_freed_memory, load_checkpoint, metric_names, ranking_sums, write_json


def load_task_data(stage: int, datapath: str, index: ItemIndex) -> tuple[TaskData, np.ndarray | None]:
    """Task 1: (last-item examples, full sequences); task k ≥ 2: (examples, None)."""
    if stage == 1:
        sequences = load_sequences_with_index(datapath, index)  # [n_users, L]
        return TaskData(sequences[:, :-1], sequences[:, -1], index.size), sequences
    return load_task(datapath, index), None


@torch.no_grad()
def score(model: NextItNet, task: int, data: TaskData, rows: np.ndarray, kind: str, s: float,
          batch_size: int, device: torch.device, top_k: int = 5, desc: str = "eval") -> dict[str, float]:
    """Metrics of head `task` on data rows (every row, no dropped partial batch); masks at scale s."""
    model.eval()
    masks = model.task_masks(task, s)
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    stage_sources = Staging(data.sources, device)
    stage_targets = Staging(data.targets, device)
    for start in tqdm(range(0, rows.size, batch_size), desc=desc, leave=False, disable=None):
        chunk = rows[start:start + batch_size]
        inputs, targets = stage_sources(data.rows(chunk)), stage_targets(chunk)   # [b, L], [b]
        logits, _ = model(inputs, task, s, last_only=True, masks=masks)
        sums += ranking_sums(logits.float(), targets, top_k)
    values = (sums / max(rows.size, 1)).tolist()
    metrics = dict(zip(metric_names(top_k), values))
    return metrics if kind == "rec" else {"acc": metrics["acc"]}


def evaluate_tasks(model: NextItNet, checkpoint_tasks: list[dict], index: ItemIndex, s: float,
                   batch_size: int, device: torch.device, top_k: int,
                   cache: dict[int, TaskData] | None = None) -> dict[str, dict]:
    """Every task of the model, each on its own test split → {"1": {"kind", "test"}, ...}."""
    results = {}
    for number, record in enumerate(checkpoint_tasks, start=1):
        if record["datapath"] is None and not (cache and number in cache):
            print(f"task {number}: not scored (its data path is unknown: a checkpoint converted from the authors' code)")
            continue
        if cache is not None and number in cache:
            data = cache[number]
        else:
            data, _ = load_task_data(number, record["datapath"], index)
        parts = split_indices(len(data.targets), record["seed"], record["split_percentage"])
        check_split(record["datapath"], len(data.targets), parts)
        metrics = score(model, number - 1, data, parts[2], record["kind"], s, batch_size, device, top_k,
                        desc=f"test task {number}")
        results[str(number)] = {"kind": record["kind"], "test": metrics}
    return results


def forgetting_matrix(metric_files: list[str]) -> tuple[list[str], list[list[str]]]:
    """Rows: stages; columns: tasks; each cell the task's headline metric (MRR@5 for rec, acc for cls)."""
    stages = []
    for path in metric_files:
        try:
            with open(path, encoding="utf-8") as handle:
                stages.append(json.load(handle))
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: not a metrics file ({error})") from None
    stages.sort(key=lambda entry: entry["stage"])
    n_tasks = max(len(entry["tasks"]) for entry in stages)
    header = ["stage"] + [f"task{k}" for k in range(1, n_tasks + 1)]
    rows = []
    for entry in stages:
        row = [str(entry["stage"])]
        for k in range(1, n_tasks + 1):
            task = entry["tasks"].get(str(k))
            if task is None:
                row.append("")
                continue
            name = min((m for m in task["test"] if m.startswith("mrr@")), key=lambda m: int(m[4:]), default="acc")
            name = name if task["kind"] == "rec" else "acc"  # MRR at the smaller cut-off (MRR@5 by default)
            row.append(f"{task['test'][name]:.4f}")
        rows.append(row)
    return header, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", help="checkpoint to score")
    parser.add_argument("--task", type=int, help="task number (1-based)")
    parser.add_argument("--datapath", help="the task's data file (default: as stored in the checkpoint)")
    parser.add_argument("--datapath_index", help="item index (default: as stored in the checkpoint)")
    parser.add_argument("--seed", type=int, help="split seed (default: as stored in the checkpoint)")
    parser.add_argument("--split_percentage", type=float, default=None)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--smax", type=float, default=None)
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", help="write {'kind': ..., 'test': {...}} here")
    parser.add_argument("--matrix", nargs="+", help="metrics.json files of a run: print the forgetting matrix")
    parser.add_argument("--csv", help="with --matrix: also write it as CSV")
    args = parser.parse_args()

    if args.matrix:
        header, rows = forgetting_matrix(args.matrix)
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([header] + rows)
        if args.csv:
            atomic_write_text(args.csv, buffer.getvalue())
        widths = [max(len(r[i]) for r in [header] + rows) + 2 for i in range(len(header))]
        print("forgetting matrix (rows: after stage; MRR@5 for rec tasks, accuracy for cls tasks)")
        for row in [header] + rows:
            print("".join(cell.rjust(width) for cell, width in zip(row, widths)))
        return
    keep_freed_memory()
    if not args.paths or not args.task:
        parser.error("--paths and --task are required (or --matrix)")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoint = load_checkpoint(args.paths)
    model = NextItNet.from_checkpoint(checkpoint).to(device)
    tasks = checkpoint["tasks"]
    if not 1 <= args.task <= len(tasks):
        raise DataError(f"{args.paths}: holds tasks 1..{len(tasks)}, not task {args.task}")
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
    parts = split_indices(len(data.targets), record["seed"], record["split_percentage"])
    check_split(record["datapath"], len(data.targets), parts)
    smax = args.smax if args.smax is not None else checkpoint["args"]["smax"]
    metrics = score(model, args.task - 1, data, parts[2], record["kind"], smax, args.batch, device, args.top_k)
    result = {"kind": record["kind"], "test": metrics}
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    cli(main)
