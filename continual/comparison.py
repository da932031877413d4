"""What a comparison (compare.py) is made of: the names its --methods takes and the records of its results.csv,
which tools/paper_table.py pools over draws."""
from __future__ import annotations

import csv
import io
import re

from continual.methods import METHODS, method_class
from utils import DataError

RERUN = re.compile(r"(.+)_rerun([1-9][0-9]*)")  # NAME_rerunN: NAME's chain again with --rerun N (run-to-run spread)
OVERRIDE = re.compile(r"[a-z][a-z0-9_]*(=[A-Za-z0-9._-]+)?")  # NAME+flag=value: one flag of that chain's stages


def method_names() -> dict[str, tuple[str, str | None]]:
    """The names --methods takes: every registered method (continual/methods/), and every preset of one (e.g.
    TERACON's no_relation or recommended) → (method, preset or None)."""
    names: dict[str, tuple[str, str | None]] = {name: (name, None) for name in METHODS}
    for name in METHODS:
        for preset in method_class(name).presets:
            names.setdefault(preset, (name, preset))
    return names


def split_overrides(name: str) -> tuple[str, list[str]]:
    """NAME+flag=value+flag… → (NAME, ["--flag", "value", "--flag"]): a method with flags of its own in the
    comparison (e.g. `recommended+alpha=0`, `finetune+lr=1e-4`), its chain in a folder of that name."""
    base, *parts = name.split("+")
    flags_of_name: list[str] = []
    for part in parts:
        flag, _, value = part.partition("=")
        flags_of_name += [f"--{flag}", value] if value else [f"--{flag}"]
    return base, flags_of_name


def resolve(name: str) -> tuple[str, str | None, int]:
    """A --methods name → (method, preset or None, rerun)."""
    name = split_overrides(name)[0]
    match = RERUN.fullmatch(name)
    base, rerun = (match.group(1), int(match.group(2))) if match and match.group(1) in method_names() else (name, 0)
    method, preset = method_names()[base]
    return method, preset, rerun


def known_name(text: str) -> bool:
    base, *parts = text.split("+")
    if not all(OVERRIDE.fullmatch(part) for part in parts):
        return False
    match = RERUN.fullmatch(base)
    return base in method_names() or bool(match and match.group(1) in method_names())


def chains_first(name: str) -> dict[str, str]:
    """{flag: chain}: the flags whose value is another chain's checkpoint of the same seed and stage (e.g. the
    recommended rule's --expert, fine-tuning's), which chain must run first."""
    method, preset, _ = resolve(name)
    return method_class(method).chains_needed(preset)


RESULT_COLUMNS = ["seed", "method", "stage", "task", "kind", "metric", "value", "baseline", "ceiling", "parameters",
                  "stage1_parameters", "seconds_per_epoch"]


def records_csv(records: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def read_records(paths: list[str]) -> list[dict]:
    """The records of every results.csv, each tagged with its file's position ("draw")."""
    records = []
    for draw, path in enumerate(paths):
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in RESULT_COLUMNS if column not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: not a compare.py results.csv (no column {missing[0]})")
            for line, row in enumerate(reader, 2):
                try:
                    records.append({**row, "draw": draw, "seed": int(row["seed"]), "stage": int(row["stage"]),
                                    "task": int(row["task"]), **{name: float(row[name]) for name in
                                    ("value", "baseline", "ceiling", "parameters", "stage1_parameters",
                                     "seconds_per_epoch")}})
                except ValueError as error:
                    raise DataError(f"{path}, line {line}: {error}") from None
    return records
