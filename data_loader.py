"""Reading TERACON's data files: task-1 sequences, task-k `source,,targets` files and the item index.

Numbering follows the authors' code so that their checkpoints stay meaningful: `<UNK>` is 0, then
every distinct token in ascending integer order from 1 (the padding token "0" is item 1 when present).
Files are parsed as bytes with numpy, not line by line.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass

import numpy as np

from utils import DataError, atomic_write_text

NEWLINE, COMMA = 10, 44
_MAX_DIGITS = 18  # int64 holds every 18-digit decimal


@dataclass
class Tokens:
    """Every integer token of a file: its value, 0-based line (among non-blank lines), field and source line."""

    values: np.ndarray   # [n_tokens] int64
    line: np.ndarray     # [n_tokens] int64, index among kept (non-blank) lines
    field: np.ndarray    # [n_tokens] int64, 0 before ',,' and 1 after it
    n_lines: int
    file_line: np.ndarray  # [n_lines] int64, 1-based line number in the file


def _read_bytes(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as handle:
        raw = handle.read()
    data = np.frombuffer(raw, dtype=np.uint8)
    data = data[data != 13]  # Windows line ends
    if data.size == 0:
        raise DataError(f"{path}: file is empty")
    if data[-1] != NEWLINE:
        data = np.append(data, np.uint8(NEWLINE))
    return data


def _bad_character(path: str, data: np.ndarray, position: int) -> DataError:
    line_no = int(np.count_nonzero(data[:position] == NEWLINE)) + 1
    start, stop = position, position
    while start > 0 and data[start - 1] not in (NEWLINE, COMMA):
        start -= 1
    while data[stop] not in (NEWLINE, COMMA):
        stop += 1
    token = bytes(data[start:stop]).decode("latin-1")
    return DataError(f"{path}:{line_no}: non-integer token {token!r}")


def tokenize(path: str, fields: int) -> Tokens:
    """Parse comma-separated integers; with fields=2 each line must be `source,,targets`.

    Positions of separators are found with numpy and the digits parsed in one np.fromstring call.
    """
    data = _read_bytes(path)
    bad = np.flatnonzero((data != NEWLINE) & (data != COMMA) & ((data < 48) | (data > 57)))
    if bad.size:
        raise _bad_character(path, data, int(bad[0]))

    newline_at = np.flatnonzero(data == NEWLINE)                        # [raw lines]
    line_start = np.concatenate(([0], newline_at[:-1] + 1))
    blank = line_start == newline_at
    file_line = np.flatnonzero(~blank) + 1                              # 1-based number of each kept line
    if blank.any():
        data = np.delete(data, newline_at[blank])
    if file_line.size == 0:
        raise DataError(f"{path}: file is empty (only blank lines)")
    newline_at = np.flatnonzero(data == NEWLINE)                        # [n_lines]
    n_lines = int(newline_at.size)

    comma_at = np.flatnonzero(data == COMMA)
    pair = comma_at[:-1][np.diff(comma_at) == 1]                       # first comma of each ',,'
    pairs_per_line = np.bincount(np.searchsorted(newline_at, pair), minlength=n_lines)
    if fields == 2 and np.any(pairs_per_line != 1):
        wrong = int(np.flatnonzero(pairs_per_line != 1)[0])
        what = "no ',,' separator between source and targets" if pairs_per_line[wrong] == 0 else "more than one ',,'"
        raise DataError(f"{path}:{file_line[wrong]}: {what}")
    if fields == 1 and pair.size:
        raise DataError(f"{path}:{file_line[np.searchsorted(newline_at, pair[0])]}: empty token (',,')")
    if pair.size:  # drop the second comma of each pair; the first closes the last source token
        data = np.delete(data, pair + 1)
        boundary = pair - np.arange(pair.size)
        newline_at = np.flatnonzero(data == NEWLINE)
    else:
        boundary = pair

    is_separator = (data == COMMA) | (data == NEWLINE)
    closer = np.flatnonzero(is_separator)                               # [n_tokens] byte closing each token
    opener = np.concatenate(([0], closer[:-1] + 1))
    digits = closer - opener
    token_line = np.searchsorted(newline_at, closer)                    # [n_tokens]
    boundary_token = np.searchsorted(closer, boundary)                  # [n_lines or 0] token closed by ',,'
    empty = np.flatnonzero(digits == 0)
    if empty.size:
        first = int(empty[0])
        line = int(token_line[first])
        if fields == 2 and boundary_token[line] == first:
            what = "a line with no source items before ',,'"
        elif fields == 2 and boundary_token[line] == first - 1 and data[closer[first]] == NEWLINE:
            what = "a line with no target after ',,'"
        else:
            what = "empty token"
        raise DataError(f"{path}:{file_line[line]}: {what}")
    too_long = np.flatnonzero(digits > _MAX_DIGITS)
    if too_long.size:
        line = int(token_line[too_long[0]])
        raise DataError(f"{path}:{file_line[line]}: integer token longer than {_MAX_DIGITS} digits")

    text = data.copy()
    text[is_separator] = 32
    values = np.fromstring(text.tobytes(), dtype=np.int64, sep=" ")    # [n_tokens]
    if values.size != closer.size:
        raise DataError(f"{path}: could not parse every token")
    if fields == 2:
        field = (np.arange(closer.size) > boundary_token[token_line]).astype(np.int64)
    else:
        field = np.zeros(closer.size, dtype=np.int64)
    return Tokens(values, token_line, field, n_lines, file_line)


def left_pad(values: np.ndarray, line: np.ndarray, n_lines: int, pad_value: int = 0) -> np.ndarray:
    """Ragged rows of `values` grouped by `line` → [n_lines, max_len], left-padded with `pad_value`."""
    lengths = np.bincount(line, minlength=n_lines)  # [n_lines]
    width = int(lengths.max()) if n_lines else 0
    out = np.full((n_lines, width), pad_value, dtype=np.int64)
    if values.size:
        offset_in_line = np.arange(values.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        column = width - lengths[line] + offset_in_line
        out[line, column] = values
    return out


@dataclass
class ItemIndex:
    """Sorted raw item ids; raw id `keys[i]` has index i + 1, and 0 is `<UNK>`."""

    keys: np.ndarray  # [n_items - 1] int64, ascending

    @property
    def size(self) -> int:
        return int(self.keys.size) + 1

    def lookup(self, raw: np.ndarray, path: str) -> np.ndarray:
        """Map raw ids to indices; unknown ids become `<UNK>` (0) with one warning that counts them."""
        position = np.searchsorted(self.keys, raw)
        position_clipped = np.minimum(position, max(self.keys.size - 1, 0))
        known = (self.keys.size > 0) & (self.keys[position_clipped] == raw) if self.keys.size else np.zeros(raw.shape, bool)
        unknown = int(raw.size - np.count_nonzero(known))
        if unknown:
            warnings.warn(f"{path}: {unknown} item token(s) not in the index, mapped to <UNK>", stacklevel=2)
        return np.where(known, position_clipped + 1, 0).astype(np.int64)


def build_index(raw: np.ndarray) -> ItemIndex:
    return ItemIndex(np.unique(raw))


def write_index(index: ItemIndex, path: str) -> None:
    """Write `item,index` rows (`<UNK>,0` first) atomically."""
    ids = np.arange(1, index.size)
    body = "\n".join(np.char.add(np.char.add(index.keys.astype(str), ","), ids.astype(str)))
    atomic_write_text(path, "item,index\n<UNK>,0\n" + body + ("\n" if body else ""))


_ORIGINAL_ENTRY = re.compile(r"'((?:[^'\\]|\\.)*)'\s*:\s*(-?\d+)")


def read_index(path: str) -> ItemIndex:
    """Read our `item,index` CSV or the authors' `str(dict)` index.csv, without evaluating anything."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: index file not found (train_task1.py writes it)")
    with open(path, "r", encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    stripped = text.lstrip()
    if stripped.startswith("{"):
        pairs = _ORIGINAL_ENTRY.findall(stripped)
    elif stripped.startswith("item,index"):
        rows = stripped.splitlines()[1:]
        pairs = [row.rsplit(",", 1) for row in rows if row]
    else:
        raise DataError(f"{path}: not an item index (expected 'item,index' rows or the authors' dict literal)")
    if not pairs or pairs[0][0] != "<UNK>" or any(len(pair) != 2 for pair in pairs):
        raise DataError(f"{path}: not an item index (it must start with <UNK> = 0)")
    try:
        keys = np.array([int(key) for key, _ in pairs[1:]], dtype=np.int64)
        ids = np.array([int(value) for _, value in pairs], dtype=np.int64)
    except ValueError:
        raise DataError(f"{path}: not an item index (non-integer item or index)") from None
    if not np.array_equal(ids, np.arange(ids.size)) or np.any(np.diff(keys) <= 0):
        raise DataError(f"{path}: not an item index (indices must run 0, 1, 2, ... over ascending item ids)")
    return ItemIndex(keys)


@dataclass
class TaskData:
    """One task's examples: inputs [n, L] item indices, targets [n] class indices, class count."""

    inputs: np.ndarray
    targets: np.ndarray
    n_classes: int


def load_sequences(path: str) -> tuple[np.ndarray, ItemIndex]:
    """Task 1: one user per line → ([n_users, L] item indices, index built from the file)."""
    tokens = tokenize(path, fields=1)
    raw = left_pad(tokens.values, tokens.line, tokens.n_lines, pad_value=0)  # [n_users, L]
    if raw.shape[1] < 2:
        raise DataError(f"{path}: every line has a single item; next-item prediction needs at least 2")
    index = build_index(raw)
    return index.lookup(raw, path), index


def load_sequences_with_index(path: str, index: ItemIndex) -> np.ndarray:
    """Task 1 mapped through an existing index (for evaluation of a trained model)."""
    tokens = tokenize(path, fields=1)
    raw = left_pad(tokens.values, tokens.line, tokens.n_lines, pad_value=0)
    return index.lookup(raw, path)


def load_task(path: str, index: ItemIndex) -> TaskData:
    """Task k ≥ 2: `source,,targets` lines; a line with m targets becomes m examples (line order kept)."""
    tokens = tokenize(path, fields=2)
    is_source = tokens.field == 0
    source_ids = index.lookup(tokens.values[is_source], path)
    pad = int(index.lookup(np.zeros(1, np.int64), path)[0]) if np.isin(0, index.keys) else 0  # the item "0"
    sources = left_pad(source_ids, tokens.line[is_source], tokens.n_lines, pad_value=pad)  # [n_lines, L]
    target_raw = tokens.values[~is_source]
    target_line = tokens.line[~is_source]
    target_keys, target_ids = np.unique(target_raw, return_inverse=True)
    return TaskData(inputs=sources[target_line], targets=target_ids.astype(np.int64) + 1, n_classes=int(target_keys.size) + 1)


def split_indices(n: int, seed: int, split_percentage: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The authors' split: permutation under np.random.seed(seed), then 80/5/15 (train/valid/test)."""
    rng = np.random.RandomState(seed)  # identical stream to np.random.seed(seed); np.random.permutation
    perm = rng.permutation(np.arange(n))
    dev = -int(split_percentage * float(n))
    dev_valid = int(dev * 0.75)
    if dev == 0:
        return perm, perm[:0], perm[:0]
    return perm[:dev], perm[dev:dev_valid], perm[dev_valid:]


def check_split(path: str, n: int, parts: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    if any(part.size == 0 for part in parts):
        sizes = "/".join(str(part.size) for part in parts)
        raise DataError(f"{path}: {n} examples are too few to make train/validation/test (got {sizes})")


def batches(n: int, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Row indices per batch; shuffled when `rng` is given. Unlike the original, the last partial batch is kept."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[start:start + batch_size] for start in range(0, n, batch_size)]
