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
import sys
import time

import torch

from continual import flags
from continual.methods.checkpoints import load_checkpoint
from continual.evaluation.reports import forgetting_matrix, matrix_lines, retest_matrix
from continual.evaluation.scoring import kept_report, load_task_data, task_report
from continual.training.resources import peak_memory_mib
from data_loader import check_split, read_index, split_indices
from model import NextItNet
from utils import DataError, atomic_write_text, cli, keep_freed_memory, write_json


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


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    """A table as CSV text."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header] + rows)
    return buffer.getvalue()


def main() -> None:
    parser = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", type=flags.existing_file, help="checkpoint to score (required unless --matrix)")
    parser.add_argument("--task", type=flags.positive_int, help="task number (1-based; required with --paths)")
    parser.add_argument("--datapath", type=flags.existing_file,
                        help="the task's data file (default: as stored in the checkpoint)")
    parser.add_argument("--datapath_index", type=flags.existing_file,
                        help="item index (default: as stored in the checkpoint)")
    parser.add_argument("--seed", type=flags.seed, help="split seed (default: as stored in the checkpoint)")
    parser.add_argument("--split_percentage", type=flags.fraction, default=None,
                        help="valid+test share, in (0, 1) (default: as stored in the checkpoint)")
    parser.add_argument("--batch", type=flags.positive_int, default=256, help="users a forward pass (no effect on "
                        "results)")
    parser.add_argument("--smax", type=flags.smax, default=None,
                        help="the mask scale s the task is scored at (default: the checkpoint's smax)")
    parser.add_argument("--top_k", type=flags.positive_int, default=5, help="the ranking metrics' cut-offs: @top_k "
                        "and @top_k+15")
    parser.add_argument("--device", type=flags.device, default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--split", choices=["test", "valid"], default="test",
                        help="the split scored: test, or valid (the rows each stage selects its epoch on)")
    parser.add_argument("--kept_from", type=flags.existing_file,
                        help="an earlier checkpoint holding the task: also report the share of its headline score "
                             "that --paths keeps on the same rows, with a paired bootstrap interval over users")
    parser.add_argument("--eval_users", type=flags.positive_int, default=None,
                        help="score at most N of the split's users, the draw the stage scripts' --eval_users makes "
                             "(default: every user)")
    parser.add_argument("--eval_negatives", type=flags.nonnegative_int, default=None,
                        help="rank each rec target among N sampled items and itself, as the stage scripts' "
                             "--eval_negatives (DITTO's evaluation); 0: every item (default: the checkpoint's)")
    parser.add_argument("--json", type=flags.output_file, help="write {'kind': ..., 'test': {...}} here")
    parser.add_argument("--matrix", nargs="+", type=flags.existing_file,
                        help="metrics.json files of a run: print the forgetting matrix")
    parser.add_argument("--csv", type=flags.output_file,
                        help="with --matrix: also write it as CSV (and, where stages scored re-test files under "
                             "--protocol time, their rows as <csv without .csv>.retest.csv)")
    args = parser.parse_args()
    if args.eval_negatives is not None:   # given: its domain at parse time; else the checkpoint's, once it is read
        flags.check_eval_negatives(parser, args.eval_negatives, args.top_k)

    if args.matrix:
        header, rows = forgetting_matrix(args.matrix)
        if args.csv:
            atomic_write_text(args.csv, csv_text(header, rows))
        print("\n".join(matrix_lines(args.matrix)))
        header, rows = retest_matrix(args.matrix)
        if rows:
            print("re-tests (--protocol time): each earlier task on its later users, beside its original test users")
            print(csv_text(header, rows), end="")
            if args.csv:
                atomic_write_text(os.path.splitext(args.csv)[0] + ".retest.csv", csv_text(header, rows))
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
    data, _ = load_task_data(args.task, record["datapath"], index, model.config.items_at(1))
    head_classes = model.config.task_classes[args.task - 1]
    if args.task > 1 and data.n_classes != head_classes:
        raise DataError(f"{record['datapath']}: has {data.n_classes} classes; task {args.task} of {args.paths} was "
                        f"trained on {head_classes} (made from another file)")
    flags.check_top_k(args.top_k, record["kind"], data.n_classes, f"task {args.task}")
    if args.split_percentage is not None:  # a split too small for this data names the flag
        check_split(record["datapath"], len(data.targets),
                    split_indices(len(data.targets), record["seed"], args.split_percentage), args.split_percentage)
    smax = args.smax if args.smax is not None else checkpoint["run_config"]["smax"]
    negatives = (args.eval_negatives if args.eval_negatives is not None
                 else checkpoint["run_config"].get("eval_negatives", 0))
    flags.check_eval_negatives(parser, negatives, args.top_k)
    if args.kept_from:  # checked before anything is scored
        earlier_checkpoint = load_checkpoint(args.kept_from)
        check_kept_from(args.kept_from, earlier_checkpoint, args.task, record, index.size)
    started = time.perf_counter()
    result = task_report(model, args.task, record, data, index, smax, args.batch, device, args.top_k, args.split,
                         args.eval_users, negatives)
    seconds, users = time.perf_counter() - started, result[f"n_{args.split}_users"]
    if args.kept_from:
        earlier = NextItNet.from_checkpoint(earlier_checkpoint).to(device)
        earlier_smax = args.smax if args.smax is not None else earlier_checkpoint["run_config"]["smax"]
        result["kept"] = kept_report(earlier, model, args.task, record, data, index, (earlier_smax, smax), args.batch,
                                     device, args.top_k, args.split, args.eval_users, negatives)
    print(json.dumps(result, indent=2))
    print(f"scored {users} users of task {args.task} in {seconds:.1f} s ({seconds / max(users, 1) * 10_000:.1f} s per "
          f"10,000 users, baselines and intervals included; peak memory {peak_memory_mib(device):.0f} MiB)",
          file=sys.stderr)
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    cli(main)
