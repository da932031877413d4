"""A stage's learning curve: one row per epoch in `<savepath>.history.csv`, kept across `--resume`, and the same
values as TensorBoard scalars under `--tensorboard DIR` when the optional `tensorboard` package is installed."""
from __future__ import annotations

import csv
import importlib.util
import io
import os
from typing import Any

from utils import DataError, atomic_write_text

FIRST_COLUMNS = ["phase", "epoch", "loss", "retention", "skipped", "steps", "best", "train_seconds", "seconds"]
TENSORBOARD_HINT = "--tensorboard needs the optional tensorboard package: pip install tensorboard"


def check_tensorboard(directory: str | None) -> None:
    """--tensorboard DIR: one line when the package is missing (checked at parse time, before anything runs)."""
    if directory and importlib.util.find_spec("tensorboard") is None:
        raise DataError(TENSORBOARD_HINT)


def history_path(savepath: str) -> str:
    return savepath + ".history.csv"


def read_history(path: str) -> list[dict[str, str]]:
    """The rows of a history CSV ([] when there is none); one line naming the file if it is not one."""
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
        missing = [name for name in ("phase", "epoch") if name not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"no {missing[0]} column")
        for row in rows:
            int(row["phase"]), int(row["epoch"])
    except (OSError, csv.Error, KeyError, TypeError, ValueError) as error:
        raise DataError(f"{path}: not a stage's history ({error})") from None
    return rows


class History:
    """The epochs of one stage (every phase of it), rewritten atomically after each epoch. A fresh run starts it
    empty; `--resume` keeps the rows of the epochs that its resume file says were finished (`begin`)."""

    def __init__(self, savepath: str, resume: bool, tensorboard: str | None = None):
        self.path = history_path(savepath)
        self.rows: list[dict[str, Any]] = read_history(self.path) if resume else []
        self.writer = None
        if tensorboard:
            check_tensorboard(tensorboard)
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(tensorboard, os.path.basename(savepath)))

    def begin(self, phase: int, epoch: int) -> None:
        """Phase `phase` trains from epoch `epoch` on: rows of that epoch or later, and of later phases, go."""
        self.rows = [row for row in self.rows
                     if int(row["phase"]) < phase or (int(row["phase"]) == phase and int(row["epoch"]) < epoch)]

    def add(self, phase: int, epoch: int, stats: dict, valid: dict[str, float], best: bool, train_seconds: float,
            seconds: float) -> None:
        """One finished epoch: the loop's mean loss and retention part, skipped and finite steps, the validation
        metrics (`valid_<name>`), whether it was a new best, and its seconds (training; with validation)."""
        row = {"phase": phase, "epoch": epoch, "loss": stats["loss"], "retention": stats["retention"],
               "skipped": stats["skipped"], "steps": stats["finite_steps"], "best": int(best),
               "train_seconds": round(train_seconds, 3), "seconds": round(seconds, 3),
               **{f"valid_{name}": value for name, value in valid.items()}}
        self.rows.append(row)
        self.write()
        if self.writer is not None:
            step = epoch if not phase else 10_000 * phase + epoch
            for name, value in row.items():
                if name not in ("phase", "epoch"):
                    self.writer.add_scalar(name, float(value), step)
            self.writer.flush()

    def write(self) -> None:
        columns = FIRST_COLUMNS + sorted({name for row in self.rows for name in row} - set(FIRST_COLUMNS))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
