"""Using a trained checkpoint from Python: user vectors, top-k items and class probabilities for new users.

    from continual.inference import Predictor
    predictor = Predictor.load("saved_models/demo/task6.t7")
    users = [[50, 172, 133], [1, 2, 3, 4]]                   # raw item ids, oldest first, one list per user
    vectors = predictor.embed(users, task=2)                  # [2, C] float32: the user under task 2's mask
    items = predictor.top_items(users, task=1, k=10)         # per user: (raw item id, probability), best first
    labels, probabilities = predictor.class_probabilities(users, task=5)   # [2, classes] softmax of task 5's head

predict.py is the command line over the same functions (TaskView, read_users, user_inputs, outputs, embed_rows).
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from continual.methods.checkpoints import load_checkpoint
from continual.training.loop import autocast
from data_loader import ItemIndex, TaskData, load_task, read_index, segments, tokenize
from model import NextItNet
from utils import DataError, resolve_device

UNK = "<UNK>"


@dataclass
class TaskView:
    """What using one task of a checkpoint needs: its head's input length and class labels."""

    number: int                    # 1-based task number; 0: a task file the checkpoint does not hold
    name: str
    kind: str                      # rec or cls
    length: int                    # input positions its head was trained and scored on
    labels: np.ndarray             # [n_classes] str: raw item id / raw label of each class, "<UNK>" for 0
    names: dict[str, str]          # raw label → name (tasks.json); empty when none
    data: TaskData | None = None   # the task file's examples (task K ≥ 2)


@dataclass
class Users:
    """The input's users as one stream of item indices."""

    items: np.ndarray       # [n_tokens] int64 item indices (0 = <UNK>)
    line_start: np.ndarray  # [n_users + 1]: user i is items[line_start[i]:line_start[i + 1]]
    file_line: np.ndarray   # [n_users] 1-based line number in the input file

    @property
    def size(self) -> int:
        return int(self.file_line.size)


# ---------------------------------------------------------------- tasks and inputs

def pad_item(index: ItemIndex) -> int:
    """The loader's left-padding token: the item "0" when the index has it, else <UNK> (0)."""
    return 1 if index.has_zero else 0


def label_names(datapath: str) -> dict[str, str]:
    """raw label → name from a tasks.json beside the task file (prepare_data.py's), else {}."""
    path = os.path.join(os.path.dirname(os.path.abspath(datapath)), "tasks.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not readable as JSON ({error})") from None
    entries = [entry for entry in meta.get("tasks", []) if entry.get("file") == os.path.basename(datapath)]
    codes = meta.get("label_maps", {}).get(entries[0].get("name"), {}) if entries else {}
    return {str(code): str(name) for name, code in codes.items()}


def task_view(checkpoint: dict, number: int, index: ItemIndex, datapath: str | None, source: str) -> TaskView:
    """Task `number` of the checkpoint, its input length and class labels read from its task file."""
    tasks = checkpoint["tasks"]
    if not 1 <= number <= len(tasks):
        raise DataError(f"{source}: holds tasks 1..{len(tasks)}, not task {number}")
    record = tasks[number - 1]
    path = datapath or record.get("datapath")
    if path is None:
        raise DataError(f"{source}: does not record task {number}'s data file; give --datapath")
    n_classes = checkpoint["model_config"]["task_classes"][number - 1]
    data = None
    if number == 1:
        tokens = tokenize(path, fields=1)
        width = int(np.diff(tokens.line_start).max())                   # the loader pads every line to this
        if width < 2:
            raise DataError(f"{path}: every line has a single item; task 1 reads at least 2")
        length, keys = width - 1, index.keys
    else:
        data = quiet_load_task(path, index)
        length, keys = data.sources.shape[1], data.target_keys
    labels = np.concatenate([[UNK], keys.astype(str)])
    if labels.size != n_classes:
        raise DataError(f"{path}: has {labels.size} classes with <UNK>, task {number}'s head in {source} "
                        f"{n_classes} (not the file it was trained on)")
    return TaskView(number, record.get("name") or f"task{number}", record["kind"], length, labels,
                    label_names(path) if number > 1 else {}, data)


def quiet_load_task(path: str, index: ItemIndex) -> TaskData:
    """A task file's examples; the loader's warnings about it are the training run's business, not ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_task(path, index)


def file_view(path: str, index: ItemIndex, max_classes: int) -> TaskView:
    """A cls task file the checkpoint does not hold (--probe_file): its examples and labels, number 0."""
    data = quiet_load_task(path, index)
    if data.target_keys.size > max_classes:
        raise DataError(f"{path}: has {data.target_keys.size} classes, a rec task's; the probe fits a classifier "
                        f"to a cls task's labels (at most {max_classes})")
    labels = np.concatenate([[UNK], data.target_keys.astype(str)])
    return TaskView(0, os.path.basename(path), "cls", data.sources.shape[1], labels, label_names(path), data)


def read_users(path: str, index: ItemIndex) -> Users:
    """Parse --input (task-1 lines; a malformed line is one error naming path:line) and map it to indices,
    with ONE warning line counting the items missing from the index."""
    tokens = tokenize(path, fields=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                 # counted below, in one line
        items = index.lookup(tokens.values, path)                       # [n_tokens]
    unknown = int(items.size - np.count_nonzero(items))
    if unknown:
        print(f"warning: {path}: {unknown} item token(s) not in the index, mapped to {UNK} (index 0)",
              file=sys.stderr)
    return Users(items, tokens.line_start, tokens.file_line)


def fit_width(rows: np.ndarray, length: int, pad: int) -> np.ndarray:
    """[n, w] left-padded rows → [n, length]: the last `length` columns, or left-padded with `pad`."""
    if rows.shape[1] >= length:
        return np.array(rows[:, rows.shape[1] - length:], dtype=np.int64)    # a copy: torch wants it writable
    out = np.full((rows.shape[0], length), pad, dtype=np.int64)
    out[:, length - rows.shape[1]:] = rows
    return out


def user_inputs(users: Users, rows: np.ndarray, length: int, pad: int) -> np.ndarray:
    """Users `rows` → [b, length]: each user's last `length` items, left-padded with `pad`."""
    stops = users.line_start[rows + 1]
    starts = np.maximum(users.line_start[rows], stops - length)
    return fit_width(segments(users.items, starts, stops, pad_value=pad), length, pad)


# ---------------------------------------------------------------- the model

@torch.no_grad()
def outputs(model: NextItNet, task: int, inputs: np.ndarray, masks: torch.Tensor, device: torch.device,
            amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs [b, L] item indices → (hidden [b, C], logits [b, n_classes]) of head `task`, float32."""
    items = torch.from_numpy(inputs).to(device)                        # [b, L]
    with autocast(device, amp):
        hidden = model.hidden(items, masks, last_only=True, task=task)  # [b, C]
        logits = model.logits(task, hidden)                             # [b, n_classes]
    return hidden.float(), logits.float()


def row_batches(n: int, batch: int, desc: str) -> tqdm:
    return tqdm(range(0, n, batch), desc=desc, leave=False, disable=None)


def embed_rows(model: NextItNet, views: list[TaskView], rows_of, n: int, s: float, batch: int,
               device: torch.device, amp: bool) -> np.ndarray:
    """[n, C · len(views)] float32: row i's hidden vector under each view's mask, in the views' order.

    rows_of(chunk, length) → [b, length] item indices of rows chunk."""
    masks = [model.task_masks(view.number - 1, s) for view in views]  # each [n_layers, C]
    channels = model.config.channels
    vectors = np.empty((n, channels * len(views)), dtype=np.float32)
    for start in row_batches(n, batch, "embed"):
        chunk = np.arange(start, min(start + batch, n))
        for j, view in enumerate(views):
            hidden, _ = outputs(model, view.number - 1, rows_of(chunk, view.length), masks[j], device, amp)
            vectors[chunk, j * channels:(j + 1) * channels] = hidden.cpu().numpy()
    return vectors


def special_classes(view: TaskView, index: ItemIndex) -> np.ndarray:
    """Classes --skip_padding leaves out: <UNK> (0) and, for task 1, the padding item "0"."""
    return np.array([0, 1] if view.number == 1 and index.has_zero else [0], dtype=np.int64)




# ---------------------------------------------------------------- a checkpoint as a Python object

def load_trained(path: str, index_path: str | None = None,
                 device: torch.device | None = None) -> tuple[dict, ItemIndex, NextItNet]:
    """(checkpoint, its item index, its model in eval mode on `device`) of a stage's .t7; the index is the one the
    checkpoint records unless `index_path` is given, and must be the model's size (one line naming it if not)."""
    checkpoint = load_checkpoint(path)
    index_path = index_path or checkpoint.get("index_path")
    if not index_path:
        raise DataError(f"{path}: does not record the item index; give --datapath_index")
    index = read_index(index_path)
    if index.size != checkpoint["model_config"]["n_items"]:
        raise DataError(f"{index_path}: index has {index.size} items, {path} "
                        f"{checkpoint['model_config']['n_items']} (made from other data)")
    model = NextItNet.from_checkpoint(checkpoint).to(device or torch.device("cpu")).eval()
    return checkpoint, index, model


def users_from_lists(sequences: Iterable[Sequence[int | str]], index: ItemIndex) -> Users:
    """Users given as lists of raw item ids (oldest first) → Users; ids missing from the index become <UNK> (0)."""
    lists = [[int(item) for item in sequence] for sequence in sequences]
    lengths = np.array([len(sequence) for sequence in lists], dtype=np.int64)
    if lengths.size == 0 or (lengths == 0).any():
        raise DataError("every user needs at least one item")
    raw = np.fromiter((item for sequence in lists for item in sequence), dtype=np.int64, count=int(lengths.sum()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                  # unknown ids: <UNK>, as predict.py maps them
        items = index.lookup(raw, "the users given")
    return Users(items, np.concatenate([[0], np.cumsum(lengths)]), np.arange(1, lengths.size + 1))


@dataclass
class Predictor:
    """A trained checkpoint ready for new users: its model, index and masks at s = smax (its own), each task's input
    length and labels read from the task file its checkpoint records. `users` are lists of raw item ids, oldest
    first (each user's last items as its task's input, left-padded as the loader pads), or a file of such lines."""

    model: NextItNet
    index: ItemIndex
    checkpoint: dict
    source: str
    device: torch.device
    batch: int = 256
    views: dict[int, TaskView] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str, index_path: str | None = None, device: str | None = None,
             batch: int = 256) -> "Predictor":
        """The checkpoint at `path` (any stage), on `device` (default: cuda when available)."""
        target = resolve_device(device, None)
        checkpoint, index, model = load_trained(path, index_path, target)
        return cls(model, index, checkpoint, path, target, batch)

    @property
    def s(self) -> float:
        """The mask scale the checkpoint was scored at (its smax)."""
        return float(self.checkpoint["run_config"]["smax"])

    def task(self, number: int) -> TaskView:
        """Task `number` (1-based) of the checkpoint: its kind, input length and class labels."""
        if number not in self.views:
            self.views[number] = task_view(self.checkpoint, number, self.index, None, self.source)
        return self.views[number]

    def users(self, users: Iterable[Sequence[int | str]] | str) -> Users:
        return read_users(users, self.index) if isinstance(users, str) else users_from_lists(users, self.index)

    def batches(self, users: Users, number: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(hidden [b, C], logits [b, n_classes]) of task `number`'s mask and head, a batch of users at a time (a
        head of TTL's 645,974 items never holds every user's logits at once)."""
        view, pad = self.task(number), pad_item(self.index)
        masks = self.model.task_masks(number - 1, self.s)                     # [n_layers, C]
        for start in row_batches(users.size, self.batch, "predict"):
            chunk = np.arange(start, min(start + self.batch, users.size))
            yield outputs(self.model, number - 1, user_inputs(users, chunk, view.length, pad), masks, self.device,
                          False)

    def embed(self, users: Iterable[Sequence[int | str]] | str, task: int = 1) -> np.ndarray:
        """[n_users, C] float32: each user's last-position hidden vector under task `task`'s mask (predict.py
        --embed)."""
        return np.concatenate([hidden.cpu().numpy() for hidden, _ in self.batches(self.users(users), task)])

    def top_items(self, users: Iterable[Sequence[int | str]] | str, task: int = 1,
                  k: int = 10) -> list[list[tuple[str, float]]]:
        """Per user, the k best classes of rec task `task` as (raw item id, its probability: the softmax over every
        class of the head), best first; <UNK> and task 1's padding item "0" left out (predict.py --skip_padding)."""
        view = self.task(task)
        if view.kind != "rec":
            raise DataError(f"task {task} is a {view.kind} task; top_items ranks a rec task's items")
        skipped = torch.from_numpy(special_classes(view, self.index))
        found = []
        for _, logits in self.batches(self.users(users), task):                         # [b, n_classes]
            probabilities = torch.softmax(logits, dim=1)                                # over every class of the head
            logits[:, skipped.to(logits.device)] = -torch.inf
            best = torch.topk(logits, k=min(k, logits.shape[1] - skipped.numel()), dim=1)   # [b, k]
            chosen = probabilities.gather(1, best.indices).cpu().numpy()
            found += [[(str(view.labels[c]), float(p)) for c, p in zip(row, probs)]
                      for row, probs in zip(best.indices.cpu().numpy(), chosen)]
        return found

    def class_probabilities(self, users: Iterable[Sequence[int | str]] | str,
                            task: int) -> tuple[list[str], np.ndarray]:
        """(the classes' raw labels with <UNK> first, [n_users, n_classes] softmax of cls task `task`'s head), as
        predict.py's p_<label> columns."""
        view = self.task(task)
        probabilities = [torch.softmax(logits, dim=1).cpu().numpy() for _, logits in
                         self.batches(self.users(users), task)]
        return [str(label) for label in view.labels], np.concatenate(probabilities)
