"""Use a trained checkpoint on new users: top-N items, predicted classes, user representations, a probe.

    python predict.py --paths CKPT --task K --input users.csv [--top 20] [--out predictions.csv]
    python predict.py --paths CKPT --task K --input users.csv --embed [--embed_task1] --out vectors.npy|.csv
    python predict.py --paths CKPT --task K --probe_task J [--embed_task1] [--out probe.json]
    python predict.py --paths CKPT --task K --probe_file TASK_FILE [--embed_task1] [--out probe.json]

Each non-blank line of --input is one user: comma-separated raw item ids, oldest first (a task-1 line, any
length). Task K's head reads the input length it was trained and scored on: task 1 the task-1 file's
width − 1 (it predicts the item after the whole line, as evaluate.py feeds sequence[:-1] to predict the last
item), task K ≥ 2 the width of its file's sources. Longer lines keep their last L items; shorter ones are
left-padded with the padding item "0", as the loader pads the task files. Masks at s = smax (from the
checkpoint). Items missing from the index become <UNK> (index 0), with one warning counting them.

Outputs (CSV without --out is printed; every file is written atomically, and only once all of it is made):
  rec task: line,rank,item,logit,prob     N rows per user (rank 1 first; every class ranked, as evaluate.py)
  cls task: line,label[,name],p_<UNK>,p_<label>...   the predicted class's raw label from the task file
            (and its name, when a tasks.json beside the task file maps it), softmax over the head
  --embed:  [n_users, C] (.npy) or line,h0..h{C-1} (.csv): the last position's hidden vector under task K's
            mask; --embed_task1 appends task 1's vector (2C columns: task K's, then task 1's)
  --probe_task J (a cls task): a logistic regression on the vectors (as --embed: --task K's mask) of task
            J's users, fitted on its training split and scored on its test split (the split its head was
            scored on), beside head J's accuracy and the training split's majority class on those test rows
  --probe_file F (a cls task file the checkpoint need not hold, e.g. the next stage's): the same probe, on the
            split a stage trained on F with the checkpoint's seed and split_percentage would use; no head

`line` is the 1-based line number in --input (blank lines are skipped). Task K ≥ 2's labels are its own
label space (the sorted distinct targets of its file), so predict.py reads the task file recorded in the
checkpoint (or --datapath) to turn class codes back into raw labels.
"""
from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
import torch

from continual import flags
from continual.evaluation.scoring import score
from continual.inference import (TaskView, Users, embed_rows, file_view, fit_width, load_trained, outputs, pad_item,
                                 read_users, row_batches, special_classes, task_view, user_inputs)
from continual.training.loop import autocast
from data_loader import ItemIndex, split_indices
from model import NextItNet
from utils import DataError, atomic_save_npy, atomic_write_text, cli, keep_freed_memory, resolve_device, write_json


# ---------------------------------------------------------------- predictions

def rec_lines(view: TaskView, lines: np.ndarray, logits: torch.Tensor, top: int, skip: np.ndarray) -> list[str]:
    """CSV rows `line,rank,item,logit,prob`, `top` per user, best first (torch.topk's order, as evaluate).

    `rank` is the class's 1-based place in the head's full ranking (evaluate's rank + 1); classes in `skip`
    are left out of the list, so their places are gaps."""
    k = min(top + skip.size, logits.shape[1])
    best = torch.topk(logits, k=k, sorted=True)                                   # [b, k]
    probs = torch.softmax(logits, dim=1).gather(1, best.indices).cpu().numpy()    # [b, k]
    indices, values = best.indices.cpu().numpy(), best.values.cpu().numpy()
    rows = []
    for i, line in enumerate(lines):
        for r in np.flatnonzero(~np.isin(indices[i], skip))[:top]:
            rows.append(f"{line},{r + 1},{view.labels[indices[i, r]]},{values[i, r]:.6g},{probs[i, r]:.6g}")
    return rows


def csv_cell(text: str) -> str:
    """`text` as one CSV cell: quoted when it holds a comma, a quote or a line break."""
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text


def cls_lines(view: TaskView, lines: np.ndarray, logits: torch.Tensor) -> list[str]:
    """CSV rows `line,label[,name],p_<UNK>,p_<label>...`: the argmax class (evaluate's accuracy) and all
    probabilities."""
    probs = torch.softmax(logits, dim=1).cpu().numpy()                           # [b, n_classes]
    labels = view.labels[probs.argmax(1)]
    rows = []
    for line, label, p in zip(lines, labels, probs):
        name = [csv_cell(view.names.get(label, ""))] if view.names else []
        rows.append(",".join([str(line), label, *name, *(f"{value:.6g}" for value in p)]))
    return rows


def prediction_csv(model: NextItNet, view: TaskView, users: Users, s: float, top: int, batch: int,
                   device: torch.device, amp: bool, pad: int, skip: np.ndarray) -> str:
    """The whole predictions CSV, made batch by batch."""
    probabilities = [f"p_{label}" for label in view.labels]
    header = (["line", "rank", "item", "logit", "prob"] if view.kind == "rec" else
              ["line", "label", *(["name"] if view.names else []), *probabilities])
    masks = model.task_masks(view.number - 1, s)                                 # [n_layers, C]
    out = [",".join(header)]
    for start in row_batches(users.size, batch, "predict"):
        chunk = np.arange(start, min(start + batch, users.size))
        _, logits = outputs(model, view.number - 1, user_inputs(users, chunk, view.length, pad), masks, device, amp)
        lines = users.file_line[chunk]
        out += rec_lines(view, lines, logits, top, skip) if view.kind == "rec" else cls_lines(view, lines, logits)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- outputs

def embedding_csv(vectors: np.ndarray, lines: np.ndarray) -> str:
    """`line,h0,...` rows; %.9g round-trips float32 exactly."""
    buffer = io.StringIO()
    header = "line," + ",".join(f"h{j}" for j in range(vectors.shape[1]))
    np.savetxt(buffer, np.column_stack([lines, vectors.astype(np.float64)]), fmt=["%d"] + ["%.9g"] * vectors.shape[1],
               delimiter=",", header=header, comments="")
    return buffer.getvalue()


def emit(text: str, out: str | None, what: str) -> None:
    """Write `text` to --out atomically, or print it."""
    if out is None:
        sys.stdout.write(text)
        return
    atomic_write_text(out, text)
    print(f"{what} written to {out}")


# ---------------------------------------------------------------- the probe

def probe(model: NextItNet, views: list[TaskView], target: TaskView, record: dict, s: float, batch: int,
          device: torch.device, amp: bool, pad: int) -> dict:
    """Logistic regression on the users' vectors (views' masks) for cls task `target`: train split → test split,
    beside head `target`'s accuracy and the training split's majority class on the same test rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = target.data
    train, _, test = split_indices(len(data.targets), record["seed"], record["split_percentage"])
    if train.size == 0 or test.size == 0:
        raise DataError(f"{record['datapath']}: too few examples for a train and a test split")
    vectors = embed_rows(model, views, lambda chunk, length: fit_width(data.sources[chunk], length, pad),
                         data.sources.shape[0], s, batch, device, amp)          # [n_lines, D]
    features, labels = vectors[data.rows(np.arange(len(data.targets)))], data.targets   # [n, D], [n]
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    classifier.fit(features[train], labels[train])
    head = None
    if target.number:                                                   # a task of the checkpoint: its head too
        with autocast(device, amp):
            head = float(score(model, target.number - 1, data, test, "cls", s, batch, device)["acc"])
    majority = int(np.bincount(labels[train]).argmax())
    label = str(target.labels[majority])
    return {"task": target.number, "name": target.name, "features": [view.number for view in views],
            "dims": int(vectors.shape[1]), "train": int(train.size), "test": int(test.size),
            "logistic_regression": float(classifier.score(features[test], labels[test])),
            "head": head, "majority": float(np.mean(labels[test] == majority)),
            "majority_label": label, "majority_name": target.names.get(label, "")}


def print_probe(result: dict) -> None:
    masks = " + ".join(f"task {k}'s mask" for k in result["features"])
    name = f" {result['majority_name']}" if result["majority_name"] else ""
    majority = f"majority class ({result['majority_label']}{name})"
    what = f"task {result['task']} ({result['name']})" if result["task"] else result["name"]
    print(f"probe of {what}: {result['dims']}-dim vectors ({masks}), "
          f"logistic regression fitted on {result['train']} train rows, scored on {result['test']} test rows")
    for what, key in (("logistic regression on the vectors", "logistic_regression"),
                      (f"task {result['task']}'s head", "head"), (majority, "majority")):
        if result[key] is not None:
            print(f"  {what:<36} acc {result[key]:.4f}")


def probe_target(args: argparse.Namespace, checkpoint: dict, index: ItemIndex, view: TaskView) -> tuple[TaskView, dict]:
    """(the probed cls task, the record whose seed and split_percentage give its split) of --probe_task J (the
    checkpoint's task J) or --probe_file F (a file the checkpoint need not hold: the checkpoint's own seed)."""
    if args.probe_task is not None:
        target = (view if args.probe_task == args.task else
                  task_view(checkpoint, args.probe_task, index, None, args.paths))
        if target.kind != "cls" or target.data is None:
            raise DataError(f"--probe_task {args.probe_task}: is a {target.kind} task; the probe fits a classifier "
                            "to a cls task's labels")
        return target, checkpoint["tasks"][args.probe_task - 1]
    recorded = checkpoint.get("run_config", {})
    if recorded.get("seed") is None or recorded.get("split_percentage") is None:
        raise DataError(f"{args.paths}: does not record its seed and split_percentage, which --probe_file's "
                        "split needs")
    target = file_view(args.probe_file, index, int(recorded.get("top_k", 5)) + 15)
    return target, {"seed": recorded["seed"], "split_percentage": recorded["split_percentage"],
                    "datapath": args.probe_file}


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--paths", required=True, type=flags.existing_file, help="checkpoint (.t7), any stage")
    add("--task", type=flags.positive_int, default=1, help="task whose head and mask are used (1-based; default 1)")
    add("--input", type=flags.existing_file, help="users: one comma-separated line of raw item ids each")
    add("--out", type=flags.output_file, help="predictions or --embed .csv, --embed .npy, --probe_task .json (default: print the CSV)")
    add("--top", type=flags.positive_int, default=20, help="rec tasks: items per user (default 20)")
    add("--skip_padding", action="store_true", help="rec tasks: leave <UNK> and task 1's padding item \"0\" out "
        "of the list (evaluate.py ranks them; `rank` stays the place in the full ranking)")
    add("--embed", action="store_true", help="write user vectors instead of predictions")
    add("--embed_task1", action="store_true", help="with --embed / --probe_task: append task 1's vector")
    add("--probe_task", type=flags.positive_int, help="a cls task: logistic regression on its users' vectors vs its head")
    add("--probe_file", type=flags.existing_file, help="a cls task file the checkpoint need not hold (e.g. the next "
        "stage's): the same probe on the split a stage trained on it would use (the checkpoint's seed), no head")
    add("--datapath", type=flags.existing_file, help="task K's data file, for its input length and labels (default: as recorded in the "
        "checkpoint; task K >= 2's class codes are mapped back to raw labels through it)")
    add("--datapath_index", type=flags.existing_file, help="item index (default: as recorded in the checkpoint)")
    add("--batch", type=flags.positive_int, default=256, help="users per forward pass (no effect on results)")
    add("--device", type=flags.device, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    add("--amp", action="store_true", help="bf16 autocast")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag combinations and the --out extension, before anything is loaded."""
    probing = args.probe_task is not None or args.probe_file is not None
    if args.probe_task is not None and args.probe_file is not None:
        parser.error("--probe_task and --probe_file: give one of them")
    if not probing and not args.input:
        parser.error("--input is required (or --probe_task / --probe_file)")
    if args.embed_task1 and not (args.embed or probing):
        parser.error("--embed_task1 needs --embed, --probe_task or --probe_file")
    if args.embed_task1 and args.task == 1:
        parser.error("--embed_task1 appends task 1's vector to task K's; with --task 1 leave it out")
    extension = os.path.splitext(args.out or "")[1].lower()
    allowed = [".json"] if probing else [".csv", ".npy"] if args.embed else [".csv"]
    if args.out and extension not in allowed:
        parser.error(f"--out {args.out}: expected {' or '.join(allowed)}")


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    check_args(parser, args)
    keep_freed_memory()
    device = resolve_device(args.device, None)
    checkpoint, index, model = load_trained(args.paths, args.datapath_index, device)
    for flag, number in (("--task", args.task), ("--probe_task", args.probe_task)):
        if number is not None and number > len(checkpoint["tasks"]):
            raise DataError(f"{flag} {number}: {args.paths} holds tasks 1..{len(checkpoint['tasks'])}")
    s, pad = float(checkpoint["run_config"]["smax"]), pad_item(index)
    view = task_view(checkpoint, args.task, index, args.datapath, args.paths)
    views = [view] + ([task_view(checkpoint, 1, index, None, args.paths)] if args.embed_task1 else [])

    if args.probe_task is not None or args.probe_file is not None:
        target, record = probe_target(args, checkpoint, index, view)
        result = probe(model, views, target, record, s, args.batch, device, args.amp, pad)
        print_probe(result)
        if args.out:
            write_json(args.out, result)
        return

    users = read_users(args.input, index)
    if args.embed:
        vectors = embed_rows(model, views, lambda chunk, length: user_inputs(users, chunk, length, pad),
                             users.size, s, args.batch, device, args.amp)       # [n_users, D]
        if args.out and args.out.lower().endswith(".npy"):
            atomic_save_npy(args.out, vectors)
            print(f"{vectors.shape[0]} user vectors of {vectors.shape[1]} dims written to {args.out}")
        else:
            emit(embedding_csv(vectors, users.file_line), args.out, f"{vectors.shape[0]} user vectors")
        return
    skip = special_classes(view, index) if args.skip_padding else np.zeros(0, dtype=np.int64)
    text = prediction_csv(model, view, users, s, args.top, args.batch, device, args.amp, pad, skip)
    emit(text, args.out, f"task {view.number} ({view.kind}) predictions for {users.size} users")


if __name__ == "__main__":
    cli(main)
