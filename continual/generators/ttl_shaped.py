"""TTL-shaped data at full size: the paper's six task files in TTL's shapes, with random contents.

    python tools/ttl_shaped.py --out Data/ttl_shaped [--users 1000000] [--items 645974] [--length 100]
                               [--classes 17880,7540,9,3,7] [--seed 0]

The shapes are TTL's (../shared/SPEC.md; CONURE's data): task 1 is next-item prediction over 645,974 index
entries (`<UNK>`, the padding item "0" and 645,972 items), one line of 100 items a user, left-padded with 0;
task 2 (click) has 17,880 item classes and task 3 (like) 7,540, one to three target items a line; tasks 4–6 are
age (9 classes), gender (3) and life status (7), one label a line. Every count is a head size with `<UNK>`, as the
stage scripts print it, so --items and --classes are what a stage sees. The files carry TTL's names, so a stage
reads them as it reads TTL (`--dataset ttl_shaped`).

Nothing is planted: items are drawn from a Zipf-like popularity (exponent 0.8 over a random order), each line's
length is uniform in [length/5, length], targets are random items of the task's class items, and labels are
uniform. That is enough for finite losses and for the popularity baselines to mean something; the tasks have no
known ceiling. The first lines hold every item and every class once, so the index and the heads have exactly the
sizes asked for. Line i of tasks 2–6 has line i of task 1 as its source, as in TTL.

Memory stays bounded whatever --users: the users are drawn and formatted BLOCK lines at a time (digits as bytes,
no per-token Python) and appended to the six files at once; each file is written under a temporary name and
renamed when complete, so an interrupted run leaves no partial file. The output depends on --seed and the
sizes only. tasks.json beside the files records the settings.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import numpy as np

from continual import flags
from continual.datasets import DATASETS
from utils import atomic_file, atomic_write_text

FILES = DATASETS["ttl"]["files"]
NAMES = DATASETS["ttl"]["names"]
KINDS = DATASETS["ttl"]["kinds"]
TTL_ITEMS = 645_974
TTL_CLASSES = (17_880, 7_540, 9, 3, 7)     # click, like, age, gender, life status (head sizes with <UNK>)
TARGETS_PER_LINE = {2: 3, 3: 3}            # tasks 2 and 3: one to three targets a line; tasks 4–6: one
BLOCK = 10_000                             # lines drawn and written at a time
ZIPF = 0.8
FILL = 0xFF                                # a byte that marks what formatting drops (leading zeros, absent targets)
COMMA, NEWLINE = ord(","), ord("\n")


def token_bytes(values: np.ndarray, width: int) -> np.ndarray:
    """Non-negative integers [n, m] → their decimal text, each followed by a comma: [n, m · (width + 1)] bytes,
    leading zeros as FILL (the value 0 keeps one '0')."""
    out = np.empty((*values.shape, width + 1), dtype=np.uint8)                  # [n, m, width + 1]
    out[..., width] = COMMA
    for k in range(width):
        power = 10 ** (width - 1 - k)
        digit = (values // power) % 10
        out[..., k] = np.where((values < power) & (k < width - 1), FILL, 48 + digit)
    return out.reshape(values.shape[0], -1)


def compact(rows: np.ndarray) -> bytes:
    """Byte rows [n, w] → the bytes without FILL."""
    flat = rows.reshape(-1)
    return flat[flat != FILL].tobytes()


class Shapes:
    """The sizes asked for, as raw ids: items 1..n_real (0 pads), and each later task's class values."""

    def __init__(self, items: int, length: int, classes: list[int], seed: int):
        self.length, self.seed = length, seed
        self.n_real = items - 2                                     # the index adds <UNK> and the padding "0"
        self.min_length = max(2, length // 5)
        rng = np.random.default_rng([seed, 0])
        order = rng.permutation(self.n_real) + 1                    # popularity rank → raw item id
        weights = 1.0 / np.arange(1, self.n_real + 1) ** ZIPF
        self.cdf = np.cumsum(weights) / weights.sum()
        self.by_rank = order
        self.coverage = rng.permutation(self.n_real) + 1            # every item once, in the first lines
        self.targets = {2: rng.choice(self.n_real, classes[0] - 1, replace=False) + 1,   # raw item ids
                        3: rng.choice(self.n_real, classes[1] - 1, replace=False) + 1,
                        4: np.arange(1, classes[2]), 5: np.arange(1, classes[3]), 6: np.arange(1, classes[4])}
        self.width = len(str(self.n_real))

    def items(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Raw item ids drawn from the popularity."""
        return self.by_rank[np.minimum(np.searchsorted(self.cdf, rng.random(shape)), self.n_real - 1)]

    def sequences(self, rng: np.random.Generator, first: int, n: int) -> np.ndarray:
        """Lines first .. first + n − 1 of task 1 → [n, length] raw ids, left-padded with 0. The last min_length
        positions of the first lines hold the coverage permutation, so every item occurs."""
        lengths = rng.integers(self.min_length, self.length + 1, n)                          # [n]
        items = self.items(rng, (n, self.length))
        slot = ((np.arange(first, first + n)[:, None]) * self.min_length
                + np.arange(self.min_length)[None, :])                                       # [n, min_length]
        tail = items[:, self.length - self.min_length:]
        covered = slot < self.n_real
        tail[covered] = self.coverage[slot[covered]]
        padded = np.arange(self.length)[None, :] < (self.length - lengths)[:, None]
        items[padded] = 0
        return items

    def labels(self, rng: np.random.Generator, task: int, first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Task `task`'s targets of lines first .. first + n − 1 → ([n, most] raw labels, [n] count per line); the
        first target of the first lines runs through every class once."""
        values = self.targets[task]
        most = TARGETS_PER_LINE.get(task, 1)
        counts = rng.integers(1, most + 1, n) if most > 1 else np.ones(n, dtype=np.int64)
        chosen = values[rng.integers(0, values.size, (n, most))]
        lines = np.arange(first, first + n)
        covered = lines < values.size
        chosen[covered, 0] = values[lines[covered]]
        return chosen, counts


def block_lines(shapes: Shapes, first: int, n: int) -> list[bytes]:
    """The six files' text for lines first .. first + n − 1 (its own generator: the output is blocked only by
    BLOCK, never by memory)."""
    rng = np.random.default_rng([shapes.seed, 1, first])
    source = token_bytes(shapes.sequences(rng, first, n), shapes.width)                  # [n, length · (w + 1)]
    task1 = source.copy()
    task1[:, -1] = NEWLINE                                                                # the last token is an item
    texts = [compact(task1)]
    separator = np.full((n, 1), COMMA, dtype=np.uint8)                                     # source's ',' + ',' = ',,'
    for task in range(2, 7):
        labels, counts = shapes.labels(rng, task, first, n)
        width = len(str(int(shapes.targets[task].max())))
        targets = token_bytes(labels, width).reshape(n, labels.shape[1], width + 1)       # [n, most, w + 1]
        targets[np.arange(labels.shape[1])[None, :] >= counts[:, None]] = FILL            # absent targets
        targets[np.arange(n), counts - 1, width] = NEWLINE
        texts.append(compact(np.concatenate([source, separator, targets.reshape(n, -1)], axis=1)))
    return texts


def check(args: argparse.Namespace, parser: flags.Parser) -> None:
    """Sizes that cannot be met: one line naming the flag."""
    n_real, min_length = args.items - 2, max(2, args.length // 5)
    if args.users * min_length < n_real:
        parser.error(f"--users {args.users} lines hold at most {args.users * min_length} distinct items at "
                     f"--length {args.length}; --items {args.items} needs --users >= {-(-n_real // min_length)}")
    for name, size in zip(NAMES[1:3], args.classes[:2]):
        if size - 1 > n_real:
            parser.error(f"--classes: {name} has {size} classes, more than the {n_real} items (+1) of --items")
    if max(args.classes) - 1 > args.users:
        parser.error(f"--classes: {max(args.classes)} classes need --users >= {max(args.classes) - 1} (each class "
                     "occurs at least once)")


def write(args: argparse.Namespace) -> dict:
    """The six files (each written under a temporary name, renamed when complete) and tasks.json → its content."""
    shapes = Shapes(args.items, args.length, args.classes, args.seed)
    started = time.time()
    with contextlib.ExitStack() as files:
        handles = [files.enter_context(atomic_file(os.path.join(args.out, name))) for name in FILES]
        for first in range(0, args.users, BLOCK):
            for handle, text in zip(handles, block_lines(shapes, first, min(BLOCK, args.users - first))):
                handle.write(text)
    classes = [args.items, *args.classes]
    meta = {"source": "ttl_shaped", "synthetic": True, "seed": args.seed, "users": args.users, "items": args.items,
            "length": args.length, "classes": args.classes,
            "note": "random contents in TTL's shapes (tools/ttl_shaped.py): no planted structure, no known ceiling",
            "tasks": [{"file": name, "name": task, "kind": kind, "lines": args.users, "n_classes": n}
                      for name, task, kind, n in zip(FILES, NAMES, KINDS, classes)],
            "seconds": round(time.time() - started, 1)}
    atomic_write_text(os.path.join(args.out, "tasks.json"), json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> dict:
    parser = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--out", type=flags.output_dir, default="Data/ttl_shaped", help="folder for the six files and tasks.json")
    add("--users", type=flags.positive_int, default=1_000_000, help="lines of every task file (default 1,000,000)")
    add("--items", type=flags.integer(4), default=TTL_ITEMS,
        help="task 1's classes with <UNK> and the padding item (TTL: 645,974), >= 4")
    add("--length", type=flags.integer(2), default=100, help="items a task-1 line, left-padded with 0 (TTL: 100)")
    add("--classes", type=flags.int_list(5, low=2), default=list(TTL_CLASSES),
        help="head sizes with <UNK> of tasks 2-6, comma-separated (TTL: 17880,7540,9,3,7)")
    add("--seed", type=flags.seed, default=0, help="the generator's seed")
    args = parser.parse_args(argv)
    check(args, parser)
    meta = write(args)
    print(f"wrote {len(FILES)} files of {args.users} lines to {args.out} in {meta['seconds']} s: items {args.items}, "
          f"length {args.length}, classes {','.join(map(str, args.classes))}")
    return meta

