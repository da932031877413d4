"""Command-line flag domains: argparse `type=` validators, and a parser whose errors are one line.

Every entry point builds its parser with `Parser` and states each flag's domain once, next to the flag's
definition, with one of the validators below. A value outside its domain ends the run while the
arguments are parsed, before any file is read or written: one line on stderr that names the flag,
exit status 2, no usage block and no traceback:

    error: --batch must be a positive integer (got 0)
    error: --datapath: runs/ is a directory, not a file

Domains that depend on the data (e.g. --top_k against a task's class count) are checked right after
the data is read, before anything is written, and name the flag too (`check_top_k`).
"""
from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import field, fields
from typing import Any, Callable

SEED_MAX = 2**32 - 1  # numpy's np.random.seed / RandomState accept [0, 2**32 - 1]
LONG_K = 15           # the metrics report top_k and top_k + 15 (metrics.metric_names)
METRIC_PATTERN = re.compile(r"(mrr|hit|ndcg)@([1-9][0-9]*)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's own line breaks and shows each flag's default where its help does not say it
    already: its value, or "none" (not given: not done); a flag whose default depends on something says so in its
    help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (not action.option_strings or action.required or action.default is False
                or action.default == argparse.SUPPRESS or action.nargs == 0 or "default" in text.lower()):
            return text
        return text + (" (default: none)" if action.default is None else " (default: %(default)s)")


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are ONE line `error: --flag ...` on stderr, exit 2, and whose --help shows
    every default (HelpFormatter).

    `explain_unknown`, when set, turns argparse's "unrecognized arguments: ..." into a better line (e.g. that
    the flag belongs to another --method)."""
    explain_unknown: Callable[[list[str]], str] | None = None

    def __init__(self, *args, **kwargs) -> None:
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        prefix = "unrecognized arguments: "
        if self.explain_unknown is not None and message.startswith(prefix):
            message = self.explain_unknown(message[len(prefix):].split())
        self.exit(2, f"error: {one_line(message)}\n")


def one_line(message: str) -> str:
    """argparse's `argument --batch: must be ...` → `--batch must be ...`; any other text on one line."""
    message = " ".join(message.split())
    match = re.match(r"argument ([^:]+): (.*)", message)
    if not match:
        return message
    name, rest = match.groups()
    return f"{name} {rest}" if rest.startswith("must ") else f"{name}: {rest}"


def _validator(name: str, check: Callable[[str], object]) -> Callable[[str], object]:
    check.__name__ = name  # argparse names the type in some of its own messages
    return check


def _fail(message: str) -> None:
    raise argparse.ArgumentTypeError(message)


# ------------------------------------------------------------------------------------------ numbers

def integer(low: int | None = None, high: int | None = None, what: str | None = None) -> Callable[[str], int]:
    """An int in [low, high] (either end open when None)."""
    if what is None:
        what = (f"an integer in [{low}, {high}]" if low is not None and high is not None
                else f"an integer >= {low}" if low is not None else f"an integer <= {high}" if high is not None
                else "an integer")

    def check(text: str) -> int:
        try:
            value = int(text, 10)
        except (TypeError, ValueError):
            _fail(f"must be {what} (got {text!r})")
        if (low is not None and value < low) or (high is not None and value > high):
            _fail(f"must be {what} (got {text})")
        return value
    return _validator("integer", check)


def real(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
         what: str | None = None) -> Callable[[str], float]:
    """A finite float within the bounds (NaN and ±inf are never accepted)."""
    if what is None:
        parts = ([f"{'>' if low_open else '>='} {low:g}"] if low is not None else []) + \
                ([f"{'<' if high_open else '<='} {high:g}"] if high is not None else [])
        what = "a finite number" + (" " + " and ".join(parts) if parts else "")

    def check(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            _fail(f"must be {what} (got {text!r})")
        if (not math.isfinite(value)
                or (low is not None and (value <= low if low_open else value < low))
                or (high is not None and (value >= high if high_open else value > high))):
            _fail(f"must be {what} (got {text})")
        return value
    return _validator("real", check)


positive_int = integer(1, what="a positive integer")
nonnegative_int = integer(0, what="a non-negative integer")
seed = integer(0, SEED_MAX, what=f"an integer in [0, {SEED_MAX}] (numpy's seed range)")
finite_float = real(what="a finite number")
positive_float = real(0.0, low_open=True, what="a finite number > 0")
nonnegative_float = real(0.0, what="a finite number >= 0")
fraction = real(0.0, 1.0, low_open=True, high_open=True, what="a number strictly between 0 and 1")
smax = real(1.0, what="a finite number >= 1 (s is annealed from 1/smax up to smax)")


def on_off(text: str) -> str:
    if text not in ("on", "off"):
        _fail(f"must be on or off (got {text!r})")
    return text


def on_off_bool(text: str) -> bool:
    """on → True, off → False (a boolean option given as on/off)."""
    return on_off(text) == "on"


# ---------------------------------------------------------------- a method's options: field and flag, one declaration

NOT_ARGPARSE = ("rule", "aliases", "recorded", "stages")  # option() metadata that is not argparse's


def option(value: Any, help: str, **flag: Any) -> Any:
    """A method's option and its flag --NAME in one declaration: a dataclass field whose metadata is the flag's
    argparse keywords (type, choices, action, ...; `default` when the flag's differs from the field's `value`), plus
    `rule=True` for an option of a retention rule (the rule is the authors' when every such option is at its
    default), `aliases`, [(flag, argparse keywords)] of further flags setting it, `recorded=True` for an option
    whose recorded value may lie outside its flag's choices (a checkpoint's label), and `stages` "first" (stage 1
    only) or "later" (stages >= 2 only) for an option the other stages do not read (default: every stage)."""
    return field(default=value, metadata={"help": help, **flag})


def used_at(stages: str | None, stage: int | None) -> bool:
    """Whether a flag of `stages` ("first", "later" or None: every stage) is read at `stage` (None: any stage >= 2,
    train_teracon.py's)."""
    return stages is None or (stages == "first") == (stage == 1)


def add_options(parser: argparse.ArgumentParser, options_class: type, unset: bool = False,
                stage: int | None = None) -> None:
    """--NAME for every option() field of `options_class`; its default the field's, or None with `unset` (a preset
    fills what no flag gave: Method.options_from). An option `stage` does not read is accepted (run_all.sh passes
    the same flags to every stage) but left out of --help."""
    for declared in fields(options_class):
        if "help" not in declared.metadata:
            continue
        keywords = {key: value for key, value in declared.metadata.items() if key not in NOT_ARGPARSE}
        if not used_at(declared.metadata.get("stages"), stage):
            keywords["help"] = argparse.SUPPRESS
        keywords.setdefault("default", None if unset else declared.default)
        if unset and keywords["help"] != argparse.SUPPRESS and "default" not in keywords["help"].lower():
            keywords["help"] += (f" (default: {declared.default}, unless --preset or --variant sets another: "
                                 "docs/methods.md)").replace("%", "%%")
        parser.add_argument(f"--{declared.name}", **keywords)
        for alias, alias_keywords in declared.metadata.get("aliases", []):
            hidden = {"help": argparse.SUPPRESS} if keywords["help"] == argparse.SUPPRESS else {}
            parser.add_argument(alias, dest=declared.name, **{**alias_keywords, **hidden})


def check_choices(options: Any) -> None:
    """Every option() field with choices holds one of them (ValueError naming it otherwise)."""
    for declared in fields(options):
        allowed = None if declared.metadata.get("recorded") else declared.metadata.get("choices")
        if allowed and getattr(options, declared.name) not in allowed:
            raise ValueError(f"option {declared.name} must be one of {', '.join(map(str, allowed))} "
                             f"(got {getattr(options, declared.name)!r})")


def metric(text: str) -> str:
    """acc, or mrr@K / hit@K / ndcg@K (K ≥ 1); whether K is reported depends on --top_k (check_select_on)."""
    if text != "acc" and not METRIC_PATTERN.fullmatch(text):
        _fail(f"must be acc or one of mrr@K, hit@K, ndcg@K (got {text!r})")
    return text


def check_select_on(parser: argparse.ArgumentParser, select_on: str, top_k: int) -> None:
    """--select_on must be a metric the scores report at this --top_k: acc, or @top_k / @top_k+15."""
    match = METRIC_PATTERN.fullmatch(select_on)
    if match and int(match.group(2)) not in (top_k, top_k + LONG_K):
        name = match.group(1)
        parser.error(f"--select_on {select_on} is not reported with --top_k {top_k}; choose acc, "
                     f"{name}@{top_k} or {name}@{top_k + LONG_K}")


def check_eval_negatives(parser: argparse.ArgumentParser, eval_negatives: int, top_k: int) -> None:
    """--eval_negatives N: 0, or enough candidates (N + 1 with the target) for both cut-offs, top_k and top_k + 15,
    to rank inside them (a larger cut-off would count every candidate as a hit)."""
    if 0 < eval_negatives < top_k + LONG_K - 1:
        parser.error(f"--eval_negatives {eval_negatives}: give 0 (every item) or at least {top_k + LONG_K - 1}, "
                     f"so that the cut-offs @{top_k} and @{top_k + LONG_K} fall among its candidates")


def check_top_k(top_k: int, kind: str, n_classes: int, what: str) -> None:
    """After the data is read: a rec task's metrics at top_k and top_k+15 need top_k + 15 ≤ its class count
    (a larger cut-off would be clipped to the class count under the wrong name). cls tasks report acc only."""
    from utils import DataError
    if kind != "rec" or top_k + LONG_K <= n_classes:
        return
    if n_classes - LONG_K >= 1:
        raise DataError(f"--top_k {top_k}: {what} has {n_classes} classes, so at most --top_k {n_classes - LONG_K} "
                        f"fits (the metrics report top_k and top_k+{LONG_K})")
    raise DataError(f"--top_k {top_k}: {what} has only {n_classes} classes, too few for the rec metrics at "
                    f"top_k and top_k+{LONG_K} (at least {LONG_K + 1} are needed; use --task_kind cls)")


# ------------------------------------------------------------------------------------------ devices

def device(text: str) -> str:
    """cpu, cuda, cuda:N or another torch device type, present on this machine."""
    import torch
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        _fail(f"must be cpu, cuda or cuda:N (got {text!r})")
    if parsed.type == "cpu":
        return text
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            _fail(f"{text}: CUDA is not available on this machine (use --device cpu)")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            _fail(f"{text}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        return text
    module = getattr(torch.backends, parsed.type, None) if parsed.type == "mps" else getattr(torch, parsed.type, None)
    available = getattr(module, "is_available", None)
    if available is None or not available():
        _fail(f"{text}: not available on this machine (use --device cpu)")
    return text


def gpu_num(text: str) -> str:
    """The original scripts' device flag: cpu, or N for cuda:N (a GPU that exists)."""
    if text == "cpu":
        return text
    try:
        number = int(text, 10)
    except ValueError:
        number = -1
    if number < 0:
        _fail(f"must be a GPU number or cpu (got {text!r})")
    try:
        device(f"cuda:{number}")
    except argparse.ArgumentTypeError as error:
        _fail(str(error).replace("--device cpu", "--gpu_num cpu"))
    return text


# ------------------------------------------------------------------------------------------ paths

def _not_empty(text: str) -> None:
    if not text:
        _fail("must be a path (got an empty string)")


def _creatable(path: str) -> None:
    """The nearest existing folder above `path` is a folder this process can write in."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        _fail(f"{path}: cannot be written, {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        _fail(f"{path}: cannot be written, no permission to write in {folder}")


def input_file(text: str) -> str:
    """A file to read, not a folder; whether it exists is checked by `require_files` (or the loader)."""
    _not_empty(text)
    if os.path.isdir(text):
        _fail(f"{text} is a directory, not a file")
    return text


def existing_file(text: str) -> str:
    """A file that exists."""
    input_file(text)
    if not os.path.isfile(text):
        _fail(f"{text}: file not found")
    return text


def existing_dir(text: str) -> str:
    """A folder that exists."""
    _not_empty(text)
    if not os.path.isdir(text):
        _fail(f"{text} is a file, not a folder" if os.path.exists(text) else f"{text}: folder not found")
    return text


def output_file(text: str) -> str:
    """A file to write: not a folder, and its folder can be made."""
    input_file(text)
    _creatable(text)
    return text


def output_prefix(text: str) -> str:
    """A path prefix (<prefix>.t7, <prefix>.metrics.json): not ending in a separator, its folder can be made."""
    _not_empty(text)
    if text.endswith(("/", os.sep)):
        _fail(f"{text}: a path prefix like runs/task1, not a folder")
    _creatable(text)
    return text


def output_dir(text: str) -> str:
    """A folder to write in: not an existing file, and it can be made."""
    _not_empty(text)
    if os.path.exists(text) and not os.path.isdir(text):
        _fail(f"{text} is a file, not a folder")
    _creatable(os.path.join(text, "x"))
    return text


def require_files(args: argparse.Namespace, names: list[str], hints: dict[str, str] | None = None) -> None:
    """After parsing (presets filled in): each named input flag's file exists; else a DataError naming the flag."""
    from utils import DataError
    for name in names:
        path = getattr(args, name)
        if path is not None and not os.path.isfile(path):
            hint = (hints or {}).get(name, "")
            raise DataError(f"--{name}: {path}: file not found{hint}")


def int_list(count: int, low: int) -> Callable[[str], list[int]]:
    """Exactly `count` comma-separated integers, each >= low."""
    what = f"{count} comma-separated integers >= {low}"

    def check(text: str) -> list[int]:
        try:
            values = [int(part, 10) for part in text.split(",")]
        except ValueError:
            _fail(f"must be {what} (got {text!r})")
        if len(values) != count or min(values) < low:
            _fail(f"must be {what} (got {text})")
        return values
    return _validator("int_list", check)


def comma_list(choices: list[str], known: Callable[[str], bool] | None = None) -> Callable[[str], list[str]]:
    """A non-empty comma-separated list of names, each one of `choices` (or one that `known` accepts)."""
    def check(text: str) -> list[str]:
        names = [name for name in text.split(",") if name]
        unknown = [name for name in names if not (known(name) if known else name in choices)]
        if unknown or not names:
            _fail(f"unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(choices)}")
        return names
    return _validator("comma_list", check)


def name_pair(text: str) -> list[str]:
    """Two comma-separated names, neither empty: "static,time"."""
    names = [name.strip() for name in text.split(",")]
    if len(names) != 2 or not all(names):
        _fail(f"must be two comma-separated names (got {text!r})")
    return names
