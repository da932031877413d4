"""Reading TERACON's data files: task-1 sequences, task-k `source,,targets` files and the item index.

Numbering follows the authors' code so that their checkpoints stay meaningful: `<UNK>` is 0, then
every distinct token in ascending integer order from 1 (the padding token "0" is item 1 when present).
Files are parsed as bytes with numpy, not line by line.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from utils import DataError, atomic_write_text

NEWLINE, COMMA = 10, 44
_MAX_DIGITS = 18  # int64 holds every 18-digit decimal


@dataclass
class Tokens:
    """Every integer token of a file's non-blank lines, in order, and where each line's tokens lie."""

    values: np.ndarray      # [n_tokens] int64; with fields=2 each line's ',,' is a placeholder token (0)
    line_start: np.ndarray  # [n_lines + 1] int64: line i is values[line_start[i]:line_start[i + 1]]
    split: np.ndarray       # [n_lines] int64: index of line i's ',,' placeholder (fields=2; empty otherwise)
    file_line: np.ndarray   # [n_lines] int64, 1-based line number in the file

    @property
    def n_lines(self) -> int:
        return int(self.file_line.size)


def _read_bytes(path: str) -> bytes:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as handle:
        raw = handle.read()
    if b"\r" in raw:
        raw = raw.replace(b"\r", b"")  # Windows line ends
    if not raw:
        raise DataError(f"{path}: file is empty")
    return raw if raw.endswith(b"\n") else raw + b"\n"


def _bad_character(path: str, data: np.ndarray) -> DataError:
    position = int(np.flatnonzero((data != NEWLINE) & (data != COMMA) & ((data < 48) | (data > 57)))[0])
    line_no = int(np.count_nonzero(data[:position] == NEWLINE)) + 1
    start, stop = position, position
    while start > 0 and data[start - 1] not in (NEWLINE, COMMA):
        start -= 1
    while data[stop] not in (NEWLINE, COMMA):
        stop += 1
    token = bytes(data[start:stop]).decode("latin-1")
    return DataError(f"{path}:{line_no}: non-integer token {token!r}")


# SWAR: 8 ASCII digits in one little-endian uint64 (first digit in the lowest byte) → their value.
# _DIGITS_OF[n] keeps the low nibble of the last n bytes (a digit's value) and zeroes the bytes before.
_DIGITS_OF = np.array([0] + [0x0F0F0F0F0F0F0F0F & ((2**64 - 1) << (8 * (8 - n))) & (2**64 - 1) for n in range(1, 9)],
                      dtype=np.uint64)


def _eight_digits(window: np.ndarray, length: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """window [n] uint64: the 8 bytes ending at each token's end; length [n] (0..8, more reads 8) → values
    [n] int64 (into `out` when given). Bytes before the token become leading zeros; pairs, quads, then
    octets of digits combine."""
    digits = np.bitwise_and(window, np.take(_DIGITS_OF, length, mode="clip"),
                            out=None if out is None else out.view(np.uint64))  # each byte 0..9
    for factor, shift, mask in ((2561, 8, 0x00FF00FF00FF00FF), (6553601, 16, 0x0000FFFF0000FFFF)):
        np.multiply(digits, np.uint64(factor), out=digits)                    # byte pairs → 10·a + b, ...
        np.right_shift(digits, np.uint64(shift), out=digits)
        np.bitwise_and(digits, np.uint64(mask), out=digits)
    np.multiply(digits, np.uint64(42949672960001), out=digits)
    np.right_shift(digits, np.uint64(32), out=digits)
    return digits.view(np.int64)


_CHUNK = 1 << 21  # bytes scanned at a time: every temporary stays small and in cache


@dataclass
class _Scan:
    """What one pass over a file's bytes finds: every token's value, and the few tokens checks need."""

    values: np.ndarray       # [n_tokens] int64
    line_end: np.ndarray     # token closing each raw line
    end_length: np.ndarray   # its digit count (0 for a blank line)
    empty: np.ndarray        # tokens with no digit: the ',,' placeholders and malformed tokens
    empty_ends_line: np.ndarray
    first_long: int          # first token longer than _MAX_DIGITS, or -1


class _Windows:
    """windows[i] = the 8 bytes i..i+7 of the file as one little-endian uint64 (i may be negative: '0's)."""

    def __init__(self, raw: bytes):
        body = raw if len(raw) >= 64 else raw + b"\0" * 64
        self.body = np.ndarray((len(body) - 7,), dtype="<u8", buffer=body, strides=(1,))
        head = b"0" * 16 + body[:32]
        self.head = np.ndarray((len(head) - 7,), dtype="<u8", buffer=head, strides=(1,))

    def __getitem__(self, position: np.ndarray) -> np.ndarray:
        if not position.size or position[0] >= 0:                             # positions ascend
            return self.body[position]
        out = self.body[np.maximum(position, 0)]
        before = position < 0
        out[before] = self.head[position[before] + 16]
        return out


def _scan(raw: bytes) -> _Scan:
    """Every ',' or newline closes a token; its digits are read 8 bytes at a time (SWAR) from unaligned
    uint64 windows of the file, chunk by chunk (chunks end at a newline), one chunk per CPU at a time
    (numpy releases the GIL)."""
    data = np.frombuffer(raw, dtype=np.uint8)
    bounds = [0]
    while bounds[-1] < data.size:
        bounds.append(raw.find(b"\n", min(bounds[-1] + _CHUNK, data.size - 1)) + 1)
    chunks = list(zip(bounds, bounds[1:]))
    with ThreadPoolExecutor(max(1, min(len(chunks), os.cpu_count() or 1, 8))) as pool:
        counts = list(pool.map(lambda chunk: int(np.count_nonzero(data[chunk[0]:chunk[1]] < 48)), chunks))
        firsts = np.concatenate(([0], np.cumsum(counts)))                      # first token of each chunk
        values = np.empty(int(firsts[-1]), dtype=np.int64)
        windows = _Windows(raw)
        parts = list(pool.map(lambda i: _scan_chunk(raw, data, windows, *chunks[i], int(firsts[i]),
                                                    values[firsts[i]:firsts[i + 1]]), range(len(chunks))))
    joined = {key: np.concatenate([part[key] for part in parts]) for key in parts[0] if key != "first_long"}
    longs = [part["first_long"] for part in parts if part["first_long"] >= 0]
    return _Scan(values, first_long=longs[0] if longs else -1, **joined)


def _scan_chunk(raw: bytes, data: np.ndarray, windows: _Windows, start: int, stop: int, token: int,
                out: np.ndarray) -> dict:
    """Tokens closed in bytes [start, stop) (token numbers from `token`): values into `out`; line ends,
    empty tokens and the first over-long token for the checks."""
    closer = np.flatnonzero(data[start:stop] < 48)                            # [count] bytes closing tokens
    closer += start
    length = np.empty_like(closer)
    length[0] = closer[0] - start
    np.subtract(closer[1:], closer[:-1], out=length[1:])
    length[1:] -= 1
    ends_line = data[closer] == NEWLINE
    line_end = np.flatnonzero(ends_line)
    empty = np.flatnonzero(length == 0)
    _eight_digits(windows[closer - 8], length, out=out)
    first_long = -1
    long = np.flatnonzero(length > 8)
    if long.size:                                                             # 9..16 digits: the 8 before as well
        out[long] += _eight_digits(windows[closer[long] - 16], length[long] - 8) * 10**8
        for i in long[length[long] > 16]:                                     # rare: exact, one by one
            if length[i] > _MAX_DIGITS:
                first_long = token + int(i) if first_long < 0 else first_long
            else:
                out[i] = int(raw[closer[i] - length[i]:closer[i]])
    return {"line_end": line_end + token, "end_length": length[line_end], "empty": empty + token,
            "empty_ends_line": ends_line[empty], "first_long": first_long}


def tokenize(path: str, fields: int) -> Tokens:
    """Parse comma-separated integers; with fields=2 each line must be `source,,targets`.

    One vectorised pass over the bytes (see _scan); the checks then look only at line ends and at
    the few empty tokens, so a well-formed file costs no per-line or per-token Python.
    """
    raw = _read_bytes(path)
    if raw.translate(None, b"0123456789,\n"):
        raise _bad_character(path, np.frombuffer(raw, dtype=np.uint8))
    scan = _scan(raw)
    line_end, values = scan.line_end, scan.values
    blank = (scan.end_length == 0) & (np.diff(line_end, prepend=-1) == 1)
    if blank.all():
        raise DataError(f"{path}: file is empty (only blank lines)")
    file_line = np.flatnonzero(~blank) + 1
    empty, empty_ends_line = scan.empty, scan.empty_ends_line
    if blank.any():                                                     # drop the blank lines' empty tokens
        values = np.delete(values, line_end[blank])
        not_blank = ~np.isin(empty, line_end[blank])
        empty, empty_ends_line = empty[not_blank], empty_ends_line[not_blank]
        empty = empty - np.searchsorted(line_end[blank], empty)
        line_end = line_end[~blank] - np.cumsum(blank)[~blank]
    line_start = np.concatenate(([0], line_end + 1))
    empty_line = np.searchsorted(line_end, empty)
    after_comma = (empty > line_start[empty_line])                      # the token before is on this line
    pair = ~empty_ends_line & after_comma                               # the second comma of a ',,'
    if fields == 1 and pair.any():
        raise DataError(f"{path}:{file_line[empty_line[np.argmax(pair)]]}: empty token (',,')")
    if fields == 2:
        pairs_per_line = np.bincount(empty_line[pair], minlength=file_line.size)
        if np.any(pairs_per_line != 1):
            wrong = int(np.flatnonzero(pairs_per_line != 1)[0])
            what = "no ',,' separator between source and targets" if pairs_per_line[wrong] == 0 else "more than one ',,'"
            raise DataError(f"{path}:{file_line[wrong]}: {what}")
    if not pair.all():
        first = int(np.flatnonzero(~pair)[0])
        token, line = int(empty[first]), int(empty_line[first])
        split = empty[pair][line] if fields == 2 else -2
        what = ("a line with no source items before ',,'" if token + 1 == split else
                "a line with no target after ',,'" if token - 1 == split and empty_ends_line[first] else "empty token")
        raise DataError(f"{path}:{file_line[line]}: {what}")
    if scan.first_long >= 0:
        line = int(np.searchsorted(scan.line_end, scan.first_long))
        raise DataError(f"{path}:{line + 1}: integer token longer than {_MAX_DIGITS} digits")
    return Tokens(values, line_start, empty[pair] if fields == 2 else np.zeros(0, np.int64), file_line)


_BLOCK_TOKENS = 1 << 22  # tokens gathered or mapped at a time: temporaries stay at tens of MiB whatever the file


def segments(values: np.ndarray, starts: np.ndarray, stops: np.ndarray, pad_value: int = 0) -> np.ndarray:
    """Rows values[starts[i]:stops[i]] → [n, max_len], left-padded with `pad_value`.

    Equal-length rows at a fixed stride (the usual, padded file) are a reshape, not a copy per token; other rows
    are gathered a block of rows at a time, so the index arithmetic never spans the whole file."""
    lengths = stops - starts                                            # [n]
    n = lengths.size
    width = int(lengths.max()) if n else 0
    if n and np.all(lengths == width) and (n == 1 or np.all(np.diff(starts) == starts[1] - starts[0])):
        stride = int(starts[1] - starts[0]) if n > 1 else width
        return np.lib.stride_tricks.as_strided(values[starts[0]:], (n, width), (stride * values.itemsize,
                                               values.itemsize), writeable=False)
    out = np.full((n, width), pad_value, dtype=values.dtype)
    if not values.size or not n:
        return out
    block = max(1, _BLOCK_TOKENS // max(width, 1))
    for first in range(0, n, block):
        last = min(n, first + block)
        counts = lengths[first:last]                                    # [b]
        before = np.cumsum(counts) - counts                             # tokens of the block's rows before each
        row = np.repeat(np.arange(last - first), counts)                # [tokens]
        position = np.arange(row.size) - before[row]                    # each token's place in its row
        out[first + row, (width - counts)[row] + position] = values[starts[first:last][row] + position]
    return out


_DENSE_LIMIT = 1 << 25  # ids below this are looked up in a table (≤ 256 MiB), above by binary search


@dataclass
class ItemIndex:
    """Raw item ids in index order; raw id `keys[i]` has index i + offset. offset 1 (ours and the original's): 0 is
    `<UNK>`, and a task's classes count from 1 too; offset 0 (the revised code's index, read for
    `--streams authors`): no `<UNK>`, items and classes count from 0.

    An index that grew over stages (--protocol time) holds each stage's new ids after the earlier ones, ascending
    within the stage's block: `stages[i]` is the stage that added keys[i] (None: one stage, every key ascending),
    so the indices of earlier stages never change."""

    keys: np.ndarray  # [n_items - offset] int64: ascending, or ascending within each stage's block
    offset: int = 1
    stages: np.ndarray | None = None  # [n_items - offset] int64, non-decreasing: the stage that added each key

    @property
    def size(self) -> int:
        return int(self.keys.size) + self.offset

    @property
    def has_zero(self) -> bool:
        return bool(self.keys.size) and bool(np.any(self.keys == 0))

    def size_at(self, stage: int) -> int:
        """The index's size as stage `stage` left it (every item added by then, <UNK> included)."""
        if self.stages is None:
            return self.size
        return int(np.searchsorted(self.stages, stage, side="right")) + self.offset

    def grow(self, raw: np.ndarray, stage: int) -> "ItemIndex":
        """This index with the ids of `raw` (any shape; negative values are no token) that it lacks appended, in
        ascending order, as added by `stage` (> every stage so far); the indices it had are unchanged."""
        stages = np.ones(self.keys.size, dtype=np.int64) if self.stages is None else self.stages
        if stages.size and stage <= int(stages[-1]):
            raise ValueError(f"stage {stage} cannot add items after stage {int(stages[-1])} did")
        ids = dense_unique(raw[raw >= 0].reshape(-1))[0] if raw.size else np.zeros(0, np.int64)
        new = ids[self.positions(ids) < 0]
        return ItemIndex(np.concatenate([self.keys, new]), self.offset,
                         np.concatenate([stages, np.full(new.size, stage, dtype=np.int64)]))

    def positions(self, raw: np.ndarray) -> np.ndarray:
        """Indices of raw ids; −1 for ids not in the index."""
        if self.keys.size and 0 <= self.keys.min() and self.keys.max() < _DENSE_LIMIT and raw.size:
            return np.take(self._table(), raw, mode="clip")                    # ids beyond the last item → −1
        order = np.arange(self.keys.size) if self.stages is None else np.argsort(self.keys, kind="stable")
        ordered = self.keys[order]
        position = np.searchsorted(ordered, raw)
        clipped = np.minimum(position, max(self.keys.size - 1, 0))
        known = ordered[clipped] == raw if self.keys.size else np.zeros(raw.shape, bool)
        return np.where(known, order[clipped] + self.offset, -1).astype(np.int64)

    def _table(self) -> np.ndarray:
        """raw id → index (−1 unless an item) for ids below _DENSE_LIMIT, built once."""
        table = getattr(self, "_dense", None)
        if table is None:
            table = np.full(int(self.keys.max()) + 2, -1, dtype=np.int64)
            table[self.keys] = np.arange(self.offset, self.size)
            self._dense = table
        return table

    def lookup(self, raw: np.ndarray, path: str, pad: int | None = None) -> np.ndarray:
        """Map raw ids (any shape) to indices, a block of rows at a time into one new array; unknown ids become
        `<UNK>` (0) with one warning that counts them (an error without `<UNK>`). With `pad`, the raw value −1 (no
        token: a short line's left padding) becomes `pad`."""
        mapped = np.empty(raw.shape, dtype=np.int64)
        rows_in, rows_out = (raw.reshape(-1), mapped.reshape(-1)) if raw.ndim < 2 else (raw, mapped)
        block = max(1, _BLOCK_TOKENS // max(int(np.prod(rows_in.shape[1:])), 1))
        unknown = 0
        for first in range(0, rows_in.shape[0], block):
            part = rows_in[first:first + block]
            out = self.positions(np.maximum(part, 0) if pad is not None else part)
            if pad is not None:
                out[part < 0] = pad
            missing = out < 0
            unknown += int(missing.sum())
            out[missing] = 0
            rows_out[first:first + block] = out
        if unknown:
            if not self.offset:
                raise DataError(f"{path}: {unknown} item token(s) not in the index, which (numbered as "
                                f"the revised code) has no <UNK>")
            warnings.warn(f"{path}: {unknown} item token(s) not in the index, mapped to <UNK>", stacklevel=2)
        return mapped


def dense_unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(values, return_inverse=True) for non-negative ids, by a presence table when ids are small."""
    if values.size and values.min() >= 0 and values.max() < _DENSE_LIMIT:
        present = np.zeros(int(values.max()) + 1, dtype=bool)
        present[values] = True
        rank = np.cumsum(present) - 1                                         # [max + 1]
        return np.flatnonzero(present), rank[values]
    keys, inverse = np.unique(values, return_inverse=True)
    return keys, inverse.reshape(-1)


def build_index(raw: np.ndarray) -> ItemIndex:
    return ItemIndex(dense_unique(raw.reshape(-1))[0])


def write_index(index: ItemIndex, path: str) -> None:
    """Write `item,index` rows (`<UNK>,0` first) atomically; a grown index as `item,index,stage` rows, each item with
    the stage that added it (<UNK>: stage 1)."""
    ids = np.arange(1, index.size)
    rows = np.char.add(np.char.add(index.keys.astype(str), ","), ids.astype(str))
    header, first = "item,index\n", "<UNK>,0\n"
    if index.stages is not None:
        rows = np.char.add(np.char.add(rows, ","), index.stages.astype(str))
        header, first = "item,index,stage\n", "<UNK>,0,1\n"
    body = "\n".join(rows)
    atomic_write_text(path, header + first + body + ("\n" if body else ""))


_ORIGINAL_ENTRY = re.compile(r"'((?:[^'\\]|\\.)*)'\s*:\s*(-?\d+)")


def read_index(path: str) -> ItemIndex:
    """Read our `item,index` CSV or the authors' `str(dict)` index.csv, without evaluating anything."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: index file not found (train_task1.py writes it)")
    with open(path, "r", encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    stripped = text.lstrip()
    if stripped.startswith("item,index,stage"):
        return _read_grown_index(path, stripped)
    if stripped.startswith("{"):
        pairs = _ORIGINAL_ENTRY.findall(stripped)
    elif stripped.startswith("item,index"):
        rows = stripped.splitlines()[1:]
        pairs = [row.rsplit(",", 1) for row in rows if row]
    else:
        raise DataError(f"{path}: not an item index (expected 'item,index' rows or the authors' dict literal)")
    revised = bool(pairs) and stripped.startswith("{") and tuple(pairs[0]) == ("0", "0")  # no <UNK>: '0' = 0
    if not pairs or (pairs[0][0] != "<UNK>" and not revised) or any(len(pair) != 2 for pair in pairs):
        raise DataError(f"{path}: not an item index (it must start with <UNK> = 0, or '0': 0 as the revised code's)")
    offset = 0 if revised else 1
    try:
        keys = np.array([int(key) for key, _ in pairs[offset:]], dtype=np.int64)
        ids = np.array([int(value) for _, value in pairs], dtype=np.int64)
    except ValueError:
        raise DataError(f"{path}: not an item index (non-integer item or index)") from None
    if not np.array_equal(ids, np.arange(ids.size)) or np.any(np.diff(keys) <= 0):
        raise DataError(f"{path}: not an item index (indices must run 0, 1, 2, ... over ascending item ids)")
    return ItemIndex(keys, offset)


def _read_grown_index(path: str, text: str) -> ItemIndex:
    """`item,index,stage` rows (write_index of a grown index): <UNK> first, indices 0, 1, 2, ..., stages
    non-decreasing, ids distinct and ascending within each stage's block."""
    rows = [row.split(",") for row in text.splitlines()[1:] if row]
    if not rows or rows[0][:2] != ["<UNK>", "0"] or any(len(row) != 3 for row in rows):
        raise DataError(f"{path}: not an item index (item,index,stage rows, <UNK>,0,1 first)")
    try:
        keys, ids, stages = (np.array([int(row[column]) for row in rows[1:]], dtype=np.int64) for column in range(3))
    except ValueError:
        raise DataError(f"{path}: not an item index (non-integer item, index or stage)") from None
    same_stage = np.diff(stages) == 0
    if (not np.array_equal(ids, np.arange(1, ids.size + 1)) or np.any(np.diff(stages) < 0) or stages.size and
            stages[0] < 1 or np.any(np.diff(keys)[same_stage] <= 0) or np.unique(keys).size != keys.size):
        raise DataError(f"{path}: not an item index (indices must run 0, 1, 2, ...; stages never decrease; each "
                        "stage's items distinct and ascending)")
    return ItemIndex(keys, 1, stages)


@dataclass
class TaskData:
    """One task's examples: sources [n_lines, L] item indices, targets [n] class indices, class count.

    Example i reads sources[source_row[i]] (a line with m targets is m examples sharing one row); with
    source_row None, example i is row i. `inputs` materialises the [n, L] matrix. `target_keys[c − offset]`
    is the raw label of class c, offset being the index's (task k ≥ 2; None for task 1, whose classes are the
    item index)."""

    sources: np.ndarray
    targets: np.ndarray
    n_classes: int
    source_row: np.ndarray | None = None
    target_keys: np.ndarray | None = None

    def rows(self, examples: np.ndarray) -> np.ndarray:
        return examples if self.source_row is None else self.source_row[examples]

    @property
    def inputs(self) -> np.ndarray:
        return self.sources if self.source_row is None else self.sources[self.source_row]


def load_sequences(path: str) -> tuple[np.ndarray, ItemIndex]:
    """Task 1: one user per line → ([n_users, L] item indices, index built from the file)."""
    raw = _task1_rows(path)
    index = build_index(raw)
    return index.lookup(raw, path), index


def load_sequences_with_index(path: str, index: ItemIndex) -> np.ndarray:
    """Task 1 mapped through an existing index (for evaluation of a trained model)."""
    return index.lookup(_task1_rows(path), path)


def _task1_rows(path: str) -> np.ndarray:
    """Raw task-1 sequences [n_users, L], left-padded with the raw item 0."""
    tokens = tokenize(path, fields=1)
    raw = segments(tokens.values, tokens.line_start[:-1], tokens.line_start[1:])
    if raw.shape[1] < 2:
        raise DataError(f"{path}: every line has a single item; next-item prediction needs at least 2")
    return raw


def load_task(path: str, index: ItemIndex) -> TaskData:
    """Task k ≥ 2: `source,,targets` lines; a line with m targets becomes m examples (line order kept)."""
    tokens, raw = _task_sources(path)
    return _task_data(path, tokens, raw, index)


def load_task_growing(path: str, index: ItemIndex, stage: int,
                      targets_join: Callable[[int], bool] | None = None) -> tuple[TaskData, ItemIndex]:
    """load_task for --protocol time: the file read once, its sources' items that `index` lacks added as `stage`'s
    (ItemIndex.grow; the raw 0 left-pads short sources and is no item it brings), and its targets' too where
    `targets_join(the task's class count)` says they are items a method scores through their rows (DITTO's item
    tasks) → (the task, the grown index)."""
    tokens, raw = _task_sources(path)
    brought = raw[raw > 0]
    if targets_join is not None:
        keys = dense_unique(_target_raw(tokens))[0]
        if targets_join(int(keys.size) + index.offset):
            brought = np.concatenate([brought, keys[keys > 0]])
    grown = index.grow(brought, stage)
    return _task_data(path, tokens, raw, grown), grown


def retest_path(task_path: str, stage: int) -> str:
    """--protocol time: where an earlier task's re-test file after stage `stage` lies: beside the task's file,
    `<its name without .csv>.retest<stage>.csv` (task2.csv → task2.retest4.csv)."""
    stem, _ = os.path.splitext(task_path)
    return f"{stem}.retest{stage}.csv"


def load_retest(path: str, index: ItemIndex, task: TaskData | None) -> tuple[TaskData, int, np.ndarray]:
    """An earlier task's re-test file (its format) mapped through the grown `index`: task 1's (`task` None) ranked
    among every item, a line whose last item the index lacks left out; task k ≥ 2's with its targets numbered as the
    task's own classes (task.target_keys: the head's), an example whose target the head does not know left out →
    (the examples, how many were left out, [n_lines] whether a line's input holds an item the index lacks: newer
    than every stage, read as <UNK>)."""
    if task is None:
        raw = _task1_rows(path)                                                       # [n, L]
        known = index.positions(raw) >= 0
        kept = np.flatnonzero(known[:, -1])
        sequences = index.lookup(raw[kept], path)
        unknown = (~known[kept, :-1] & (raw[kept, :-1] > 0)).any(1)
        return (TaskData(sequences[:, :-1], sequences[:, -1], index.size), int(raw.shape[0] - kept.size),
                unknown)
    tokens, raw = _task_sources(path)
    unknown = ((index.positions(np.maximum(raw, 0)) < 0) & (raw > 0)).any(1)          # [n_lines]
    data = _task_data(path, tokens, raw, index)
    labels = data.target_keys[data.targets - index.offset]                            # [n] raw label per example
    position = np.minimum(np.searchsorted(task.target_keys, labels), task.target_keys.size - 1)
    known = task.target_keys[position] == labels                                      # [n]
    kept = np.flatnonzero(known)
    rows = data.source_row if data.source_row is not None else np.arange(labels.size)
    source_row = None if kept.size == labels.size and data.source_row is None else rows[kept]
    return (TaskData(data.sources, position[kept] + index.offset, task.n_classes, source_row, task.target_keys),
            int(labels.size - kept.size), unknown)


def _task_sources(path: str) -> tuple[Tokens, np.ndarray]:
    """A task file's tokens and its raw sources [n_lines, L] (-1: no token)."""
    tokens = tokenize(path, fields=2)
    return tokens, segments(tokens.values, tokens.line_start[:-1], tokens.split, pad_value=-1)


def _target_raw(tokens: Tokens) -> np.ndarray:
    """Every example's raw target, in line order (a line with m targets gives m)."""
    target_raw = segments(tokens.values, tokens.split + 1, tokens.line_start[1:], pad_value=-1)
    return target_raw[target_raw >= 0] if target_raw.min() < 0 else target_raw.reshape(-1)


def _task_data(path: str, tokens: Tokens, raw: np.ndarray, index: ItemIndex) -> TaskData:
    """The task's examples from its tokens and raw sources, mapped through `index`."""
    # short sources are left-padded with the item "0" (index 0, <UNK>, when "0" is not an item)
    sources = index.lookup(raw, path, pad=index.lookup(np.zeros(1, np.int64), path)[0] if index.has_zero else 0)
    targets_per_line = tokens.line_start[1:] - tokens.split - 1         # [n_lines]
    target_keys, target_ids = dense_unique(_target_raw(tokens))
    source_row = None if np.all(targets_per_line == 1) else np.repeat(np.arange(tokens.n_lines), targets_per_line)
    return TaskData(sources, target_ids + index.offset, int(target_keys.size) + index.offset, source_row, target_keys)


def split_indices(n: int, seed: int, split_percentage: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The authors' split: permutation under np.random.seed(seed), then 80/5/15 (train/valid/test)."""
    rng = np.random.RandomState(seed)  # identical stream to np.random.seed(seed); np.random.permutation
    return split_permutation(rng.permutation(np.arange(n)), split_percentage)


def split_permutation(perm: np.ndarray, split_percentage: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The authors' 80/5/15 cut of a permutation: train, valid, test (all in train when the cut is empty)."""
    n = perm.size
    dev = -int(split_percentage * float(n))
    dev_valid = int(dev * 0.75)
    if dev == 0:
        return perm, perm[:0], perm[:0]
    return perm[:dev], perm[dev:dev_valid], perm[dev_valid:]


def limit_users(rows: np.ndarray, users: np.ndarray, n_users: int | None, seed: int) -> np.ndarray:
    """--eval_users: the rows (example positions, in their order) of at most n_users of their users, a draw seeded by
    `seed` (a task's split seed: the same users at every stage); users [n] is each row's user (its source line).
    None: every row."""
    if not n_users:
        return rows
    distinct = np.unique(users)
    if distinct.size <= n_users:
        return rows
    chosen = np.random.default_rng([seed, 49]).choice(distinct, n_users, replace=False)
    return rows[np.isin(users, chosen)]


def check_split(path: str, n: int, parts: tuple[np.ndarray, np.ndarray, np.ndarray],
                split_percentage: float | None = None) -> None:
    """Every part non-empty; else one line naming the file and, when a larger --split_percentage would do, it."""
    if any(part.size == 0 for part in parts):
        sizes = "/".join(str(part.size) for part in parts)
        message = f"{path}: {n} examples are too few to make train/validation/test"
        fits = smallest_split(n) if split_percentage is not None else None
        if fits is not None:
            raise DataError(f"{message} at --split_percentage {split_percentage:g} (got {sizes}); "
                            f"--split_percentage {fits:g} or more would make all three")
        raise DataError(f"{message} (got {sizes})")


def smallest_split(n: int) -> float | None:
    """The smallest split_percentage (3 decimals) leaving train, validation and test non-empty for n examples:
    split_indices needs 2 <= int(split_percentage * n) <= n - 1; None when no value < 1 does."""
    value = math.ceil(2000 / max(n, 1)) / 1000
    while value < 1 and int(value * float(n)) < 2:
        value = round(value + 0.001, 3)
    return value if value < 1 and 2 <= int(value * float(n)) <= n - 1 else None


def batches(n: int, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Row indices per batch; shuffled when `rng` is given. Unlike the original, the last partial batch is kept."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[start:start + batch_size] for start in range(0, n, batch_size)]


class Staging:
    """Gathers rows of a host array (numpy, any strides) and moves them to the device as a tensor. On CUDA
    the rows are gathered into one of two page-locked buffers and copied asynchronously; before a buffer
    is refilled, the host waits for the copy out of it (a CUDA event), so the host may run one batch
    ahead of the device."""

    def __init__(self, data: np.ndarray, device: torch.device):
        self.data, self.device = data, device
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.copied: list = [None, None]
        self.turn = 0

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        rows = np.asarray(rows, dtype=np.int64)
        if self.device.type != "cuda":
            return torch.from_numpy(self.data[rows]).to(self.device)
        turn, self.turn = self.turn, 1 - self.turn
        if self.copied[turn] is not None:
            self.copied[turn].synchronize()                          # the last copy out of this buffer is done
        buffer = self.buffers[turn]
        if buffer is None or buffer.shape[0] < rows.size:
            buffer = self.buffers[turn] = torch.from_numpy(
                np.empty((rows.size, *self.data.shape[1:]), dtype=self.data.dtype)).pin_memory()
        staged = buffer[:rows.size]
        np.take(self.data, rows, axis=0, out=staged.numpy())
        on_device = staged.to(self.device, non_blocking=True)
        self.copied[turn] = torch.cuda.Event()
        self.copied[turn].record()
        return on_device
