"""Convert raw MovieLens ratings into TERACON's six-task files (task1.csv .. task6.csv, tasks.json).

Usage:
    python prepare_data.py --source SRC --out Data/<name> [--seq_len 50] [--window 10]
                           [--min_interactions 20] [--like_threshold 4] [--periods 6 [--first_share 0.5]]

SRC is a folder of raw files (ml-100k, ml-1m, ml-25m / ml-latest / ml-latest-small, or RecBole atomic
files) or the word `recbole` for the ml-100k copy shipped in the recbole 1.2.1 wheel. Each user's
interactions are sorted by timestamp (stable, so ties keep the raw file's order); the last `window`
interactions are held out and the up-to-`seq_len` interactions just before them form the task-1
sequence, left-padded with 0. Tasks 2..6 use that same sequence as the source of every line. Everything
is vectorised with numpy / pandas; the output text is encoded digit by digit with numpy in chunks.

--periods 6 (time passing between tasks, for `--protocol time`): the ratings' timeline is cut into six periods
(the first holding --first_share of the ratings, the others equal shares of the rest); stage K's task file is built
as above from the ratings up to the end of period K (users, their histories and so their items as they stood then),
and beside each earlier task U's file a re-test file `taskU.retestK.csv`: task U built from the same ratings, over
the users who rated after period U ended (its later users). Labels keep one code over all stages.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd

from continual import flags
from utils import DataError, atomic_file

AGE_BINS = np.array([18, 25, 35, 45, 50, 56])  # ml-1m's brackets; also maps ml-1m's own codes 1,18,..,56
AGE_NAMES = ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
GENDER_CODES = {"F": 1, "M": 2}
RATING_BAND_NAMES = ["<3", "3-<4", ">=4"]
NO_GENRE = "(no genres listed)"
RECBOLE_HINT = "recbole's wheel is not installed; run: pip install --no-deps recbole==1.2.1"
POW10 = 10 ** np.arange(19, dtype=np.int64)
CHUNK_TOKENS = 1 << 20
STAGES = 6                                   # the tasks of a file set, one per stage
SEP_COMMA, SEP_DOUBLE, SEP_NEWLINE = 0, 1, 2


class PrepError(Exception):
    """Bad input the user can fix; reported as one line `error: <file>: <what>`."""


@dataclass
class Raw:
    """Ratings in raw file order, plus demographics (user, age, gender, occupation) or genres (item, genre)."""

    format: str
    ratings: pd.DataFrame
    users: pd.DataFrame | None = None
    genres: pd.DataFrame | None = None


@dataclass
class Histories:
    """Kept users (ascending id), their padded task-1 sequences and their held-out windows."""

    users: np.ndarray       # [n_users] raw user ids
    counts: np.ndarray      # [n_users] total interactions per user
    t1: np.ndarray          # [n_users, seq_len] raw item ids, left-padded with 0
    window: pd.DataFrame    # columns row, item, rating; chronological within each row


@dataclass
class Task:
    """One output task: its metadata and (row, target) pairs, rows ascending, targets in line order."""

    name: str
    kind: str
    definition: str
    rows: np.ndarray
    targets: np.ndarray
    label_map: dict[str, int] | None = None


# ----------------------------------------------------------------------------------------- reading


def _one_line(error: Exception) -> str:
    """The last line of an exception's message (pandas messages can span several)."""
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


def read_table(path: str, what: str, **kwargs: Any) -> pd.DataFrame:
    """pandas.read_csv with the C engine; any parse failure becomes PrepError naming the file."""
    if not os.path.isfile(path):
        raise PrepError(f"{path}: file not found")
    try:
        return pd.read_csv(path, engine="c", **kwargs)
    except (ValueError, OverflowError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise PrepError(f"{path}: cannot parse as {what} ({_one_line(error)})") from None


def check_ratings(ratings: pd.DataFrame, path: str) -> pd.DataFrame:
    """Ratings must be non-empty, with item ids >= 1 (0 is the padding token) and no missing values."""
    if ratings.empty:
        raise PrepError(f"{path}: no ratings")
    if ratings.isna().to_numpy().any():
        raise PrepError(f"{path}: missing values")
    if int(ratings["item"].min()) < 1:
        raise PrepError(f"{path}: item ids must be >= 1 (0 is the padding token)")
    return ratings.reset_index(drop=True)


def check_users(users: pd.DataFrame, path: str) -> pd.DataFrame:
    """Demographics: no missing values, unique user ids, gender F or M."""
    if users.isna().to_numpy().any():
        raise PrepError(f"{path}: missing values")
    if users["user"].duplicated().any():
        raise PrepError(f"{path}: duplicate user id {int(users['user'][users['user'].duplicated()].iloc[0])}")
    bad = ~users["gender"].isin(list(GENDER_CODES))
    if bad.any():
        raise PrepError(f"{path}: gender must be F or M, got {users['gender'][bad].iloc[0]!r}")
    return users


def read_ml100k(folder: str) -> Raw:
    """u.data (tab-separated) and u.user (`|`-separated, age in years, occupation a word)."""
    path = os.path.join(folder, "u.data")
    ratings = read_table(path, "user item rating timestamp", sep="\t", header=None, usecols=[0, 1, 2, 3],
                         names=["user", "item", "rating", "timestamp"],
                         dtype={"user": np.int32, "item": np.int32, "rating": np.float32, "timestamp": np.int64})
    users_path = os.path.join(folder, "u.user")
    users = read_table(users_path, "user|age|gender|occupation|zip", sep="|", header=None, usecols=[0, 1, 2, 3],
                       names=["user", "age", "gender", "occupation"], encoding="latin-1",
                       dtype={"user": np.int32, "age": np.int32, "gender": str, "occupation": str})
    return Raw("ml-100k", check_ratings(ratings, path), check_users(users, users_path))


def read_ml1m(folder: str) -> Raw:
    """ratings.dat and users.dat, `::`-separated: read with sep ':' (C engine), keeping every other column."""
    path = os.path.join(folder, "ratings.dat")
    ratings = read_table(path, "UserID::MovieID::Rating::Timestamp", sep=":", header=None, usecols=[0, 2, 4, 6],
                         names=["user", "_1", "item", "_3", "rating", "_5", "timestamp"],
                         dtype={"user": np.int32, "item": np.int32, "rating": np.float32, "timestamp": np.int64})
    users_path = os.path.join(folder, "users.dat")
    users = read_table(users_path, "UserID::Gender::Age::Occupation::Zip-code", sep=":", header=None,
                       usecols=[0, 2, 4, 6],
                       names=["user", "_1", "gender", "_3", "age", "_5", "occupation", "_7", "zip"],
                       encoding="latin-1",
                       dtype={"user": np.int32, "gender": str, "age": np.int32, "occupation": np.int32})
    return Raw("ml-1m", check_ratings(ratings, path), check_users(users, users_path))


def read_genres(items: pd.Series, genres: pd.Series, separator: str) -> pd.DataFrame:
    """Long (item, genre) table; empty names and '(no genres listed)' are dropped."""
    long = pd.DataFrame({"item": items.to_numpy(), "genre": genres.fillna("").str.split(separator, regex=False)})
    long = long.explode("genre")
    long["genre"] = long["genre"].astype(str).str.strip()
    long = long[(long["genre"] != "") & (long["genre"] != NO_GENRE) & (long["genre"] != "nan")]
    return long.drop_duplicates().reset_index(drop=True)


def read_ml_csv(folder: str) -> Raw:
    """ratings.csv and movies.csv with headers (ml-25m, ml-latest, ml-latest-small); no demographics."""
    path = os.path.join(folder, "ratings.csv")
    ratings = read_table(path, "userId,movieId,rating,timestamp", header=0,
                         usecols=["userId", "movieId", "rating", "timestamp"],
                         dtype={"userId": np.int32, "movieId": np.int32, "rating": np.float32, "timestamp": np.int64})
    ratings = ratings[["userId", "movieId", "rating", "timestamp"]]
    ratings.columns = ["user", "item", "rating", "timestamp"]
    movies_path = os.path.join(folder, "movies.csv")
    movies = read_table(movies_path, "movieId,title,genres", header=0, usecols=["movieId", "genres"],
                        dtype={"movieId": np.int32, "genres": str}, encoding_errors="replace")
    genres = read_genres(movies["movieId"], movies["genres"], "|")
    return Raw("ml-csv", check_ratings(ratings, path), genres=genres)


def read_recbole(folder: str, inter: str) -> Raw:
    """RecBole atomic files `<name>.inter` and `<name>.user` (typed headers such as `user_id:token`)."""
    path = os.path.join(folder, inter)
    columns = {"user_id:token": "user", "item_id:token": "item", "rating:float": "rating",
               "timestamp:float": "timestamp"}
    ratings = read_table(path, "RecBole .inter (user_id item_id rating timestamp)", sep="\t", header=0,
                         usecols=list(columns),
                         dtype={"user_id:token": np.int32, "item_id:token": np.int32, "rating:float": np.float32,
                                "timestamp:float": np.float64})
    ratings = ratings[list(columns)].rename(columns=columns)
    users_path = os.path.join(folder, inter[: -len(".inter")] + ".user")
    user_columns = {"user_id:token": "user", "age:token": "age", "gender:token": "gender",
                    "occupation:token": "occupation"}
    users = read_table(users_path, "RecBole .user (user_id age gender occupation)", sep="\t", header=0,
                       usecols=list(user_columns),
                       dtype={"user_id:token": np.int32, "age:token": np.int32, "gender:token": str,
                              "occupation:token": str})
    users = users[list(user_columns)].rename(columns=user_columns)
    return Raw("recbole-atomic", check_ratings(ratings, path), check_users(users, users_path))


def recbole_folder() -> str:
    """The ml-100k atomic files inside the installed recbole wheel, found without importing recbole."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise PrepError(RECBOLE_HINT)
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, "dataset_example", "ml-100k")
        if os.path.isdir(candidate):
            return candidate
    raise PrepError(f"{os.path.join(location, 'dataset_example', 'ml-100k')}: not found; {RECBOLE_HINT}")


def read_source(source: str) -> Raw:
    """Detect the raw format from the files present and read it."""
    folder = recbole_folder() if source == "recbole" else source
    if not os.path.isdir(folder):
        raise PrepError(f"{folder}: source folder not found")
    names = sorted(os.listdir(folder))
    inters = [name for name in names if name.endswith(".inter")]
    if len(inters) == 1:
        return read_recbole(folder, inters[0])
    if "u.data" in names:
        return read_ml100k(folder)
    if "ratings.dat" in names:
        return read_ml1m(folder)
    if "ratings.csv" in names:
        return read_ml_csv(folder)
    raise PrepError(f"{folder}: no MovieLens ratings file found "
                    "(expected u.data, ratings.dat, ratings.csv or exactly one RecBole .inter file)")


# -------------------------------------------------------------------------------------- histories


def chronological_order(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Row order by (user, timestamp); two stable sorts keep the raw file's order for ties."""
    order = np.argsort(timestamp, kind="stable")
    return order[np.argsort(user[order], kind="stable")]


def split_histories(ratings: pd.DataFrame, seq_len: int, window: int, min_interactions: int) -> Histories:
    """Drop short histories; split each kept one into the padded task-1 sequence and the held-out window."""
    user_raw = ratings["user"].to_numpy()
    order = chronological_order(user_raw, ratings["timestamp"].to_numpy())
    user = user_raw[order]
    item = ratings["item"].to_numpy()[order]
    rating = ratings["rating"].to_numpy()[order]
    users, start, counts = np.unique(user, return_index=True, return_counts=True)
    keep = counts >= min_interactions
    row_of_user = (np.cumsum(keep) - 1).astype(np.int32)
    from_end = np.repeat((start + counts).astype(np.int32), counts) - np.arange(user.size, dtype=np.int32)
    row = np.repeat(np.where(keep, row_of_user, -1), counts)  # -1 marks dropped users
    in_t1 = (row >= 0) & (from_end > window) & (from_end <= window + seq_len)
    t1 = np.zeros((int(keep.sum()), seq_len), dtype=np.int64)
    t1[row[in_t1], seq_len - (from_end[in_t1] - window)] = item[in_t1]
    in_window = (row >= 0) & (from_end <= window)
    window_rows = pd.DataFrame({"row": row[in_window], "item": item[in_window], "rating": rating[in_window]})
    return Histories(users[keep], counts[keep], t1, window_rows)


# ------------------------------------------------------------------------------------------ tasks


def rec_targets(hist: Histories, window: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Distinct window items per row (first occurrence, chronological), minus items of that row's T1 input."""
    window = window.drop_duplicates(["row", "item"], keep="first")
    base = np.int64(max(int(hist.t1.max()), int(window["item"].max()) if len(window) else 0) + 1)
    t1_rows, t1_cols = np.nonzero(hist.t1)
    t1_keys = np.unique(t1_rows.astype(np.int64) * base + hist.t1[t1_rows, t1_cols])
    rows = window["row"].to_numpy().astype(np.int64)
    items = window["item"].to_numpy().astype(np.int64)
    fresh = ~np.isin(rows * base + items, t1_keys)
    return rows[fresh], items[fresh]


def code_labels(values: pd.Series, universe: pd.Series | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """Codes 1..K in sorted order of the raw values (of `universe` when given: every stage's file codes a value
    alike), and the map raw value (as text) → code."""
    if universe is None:
        codes, uniques = pd.factorize(values, sort=True)
    else:
        uniques = pd.Index(np.sort(pd.unique(universe)))
        codes = uniques.get_indexer(values)
    return codes.astype(np.int64) + 1, {str(value): index + 1 for index, value in enumerate(uniques)}


def demographic_tasks(hist: Histories, users: pd.DataFrame, every_user: pd.DataFrame | None = None) -> list[Task]:
    """T4 age bracket, T5 gender, T6 occupation, for kept users present in the users file (occupations coded over
    `every_user`'s when given)."""
    table = pd.DataFrame({"user": hist.users, "row": np.arange(hist.users.size)})
    table = table.merge(users, on="user", how="inner", sort=True)
    rows = table["row"].to_numpy().astype(np.int64)
    age = np.digitize(table["age"].to_numpy(), AGE_BINS).astype(np.int64) + 1
    gender = table["gender"].map(GENDER_CODES).to_numpy().astype(np.int64)
    occupation, occupation_map = code_labels(table["occupation"],
                                             None if every_user is None else every_user["occupation"])
    return [
        Task("age", "cls", "age bracket of the user (ml-1m brackets <18,18-24,25-34,35-44,45-49,50-55,56+ -> 1..7)",
             rows, age, {name: code + 1 for code, name in enumerate(AGE_NAMES)}),
        Task("gender", "cls", "gender of the user (F=1, M=2)", rows, gender, dict(GENDER_CODES)),
        Task("occupation", "cls", "occupation of the user (codes 1..K in sorted order of the raw value)",
             rows, occupation, occupation_map),
    ]


def favourite_genre(hist: Histories, genres: pd.DataFrame, coded_alike: bool = False) -> Task:
    """Most frequent genre over the window's interactions; ties go to the alphabetically first genre (coded over
    every genre of the file when `coded_alike`)."""
    pairs = hist.window[["row", "item"]].merge(genres, on="item", how="inner")
    counts = pairs.groupby(["row", "genre"], sort=True).size().reset_index(name="count")
    counts = counts.sort_values(["row", "count", "genre"], ascending=[True, False, True], kind="stable")
    best = counts.drop_duplicates("row", keep="first")
    codes, genre_map = code_labels(best["genre"], genres["genre"] if coded_alike else None)
    return Task("favourite_genre", "cls",
                "most frequent genre among the held-out window's interactions (ties: alphabetically first; "
                "codes in sorted genre order)", best["row"].to_numpy().astype(np.int64), codes, genre_map)


def rating_band(hist: Histories) -> Task:
    """Mean rating of the window: <3 → 1, 3..<4 → 2, >=4 → 3."""
    mean = hist.window.groupby("row", sort=True)["rating"].mean()
    band = np.digitize(mean.to_numpy().astype(np.float64), [3.0, 4.0]).astype(np.int64) + 1
    return Task("rating_band", "cls", "mean rating of the held-out window (<3 -> 1, 3..<4 -> 2, >=4 -> 3)",
                mean.index.to_numpy().astype(np.int64), band,
                {name: code + 1 for code, name in enumerate(RATING_BAND_NAMES)})


def activity_band(hist: Histories) -> Task:
    """Total interaction count in terciles over kept users (np.quantile, linear): 1 low, 2 middle, 3 high."""
    low, high = (int(np.floor(q)) for q in np.quantile(hist.counts.astype(np.float64), [1 / 3, 2 / 3]))
    band = 1 + (hist.counts > low).astype(np.int64) + (hist.counts > high).astype(np.int64)
    label_map = {f"<={low}": 1, f"{low + 1}-{high}": 2, f">={high + 1}": 3}
    return Task("activity_band", "cls",
                "user's total interaction count, terciles over kept users (<=q1 -> 1, <=q2 -> 2, else 3)",
                np.arange(hist.users.size, dtype=np.int64), band, label_map)


def build_tasks(raw: Raw, hist: Histories, like_threshold: float, coded_alike: bool = False) -> list[Task]:
    """Tasks 2..6 for the raw format (demographics where present, window-derived substitutes otherwise); with
    `coded_alike` (--periods), every label coded over the whole file's values."""
    watch_rows, watch_items = rec_targets(hist, hist.window)
    liked = hist.window[hist.window["rating"] >= like_threshold]
    like_rows, like_items = rec_targets(hist, liked)
    tasks = [
        Task("watch", "rec", "distinct held-out window items, chronological, minus items in the user's task-1 input",
             watch_rows, watch_items),
        Task("like", "rec", f"as watch, only window items rated >= {like_threshold:g}", like_rows, like_items),
    ]
    if raw.users is not None:
        return tasks + demographic_tasks(hist, raw.users, raw.users if coded_alike else None)
    return tasks + [favourite_genre(hist, raw.genres, coded_alike), rating_band(hist), activity_band(hist)]


# ----------------------------------------------------------------------------------------- writing


def encode_tokens(values: np.ndarray, seps: np.ndarray) -> bytes:
    """Non-negative integers in decimal, each followed by ',' / ',,' / '\\n' as `seps` says."""
    values = values.astype(np.int64)
    digits = np.maximum(np.searchsorted(POW10, values, side="right"), 1)
    sep_len = np.where(seps == SEP_DOUBLE, 2, 1)
    width = digits + sep_len
    starts = np.cumsum(width) - width
    out = np.empty(int(width.sum()), dtype=np.uint8)
    token = np.repeat(np.arange(values.size), digits)
    offset = np.arange(token.size) - np.repeat(np.cumsum(digits) - digits, digits)
    place = POW10[digits[token] - 1 - offset]
    out[starts[token] + offset] = (values[token] // place % 10 + 48).astype(np.uint8)
    out[starts + digits] = np.where(seps == SEP_NEWLINE, 10, 44).astype(np.uint8)
    double = seps == SEP_DOUBLE
    out[starts[double] + digits[double] + 1] = 44
    return out.tobytes()


def write_atomic(path: str, chunks: Iterable[bytes]) -> None:
    """Write byte chunks to `path` atomically (utils.atomic_file)."""
    with atomic_file(path) as stream:
        for chunk in chunks:
            stream.write(chunk)


def write_tokens(path: str, values: np.ndarray, seps: np.ndarray) -> None:
    """Encode in chunks of CHUNK_TOKENS tokens (bounded memory) and write atomically."""
    chunks = (encode_tokens(values[start:start + CHUNK_TOKENS], seps[start:start + CHUNK_TOKENS])
              for start in range(0, values.size, CHUNK_TOKENS))
    write_atomic(path, chunks)


def task1_tokens(t1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flattened padded sequences; the last token of each line ends with a newline."""
    seps = np.full(t1.shape, SEP_COMMA, dtype=np.int8)
    seps[:, -1] = SEP_NEWLINE
    return t1.ravel(), seps.ravel()


def task_tokens(t1: np.ndarray, rows: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`source,,targets` lines: one line per distinct row, targets in the given order (rows ascending)."""
    seq_len = t1.shape[1]
    lines, per_line = np.unique(rows, return_counts=True)
    length = seq_len + per_line
    line_start = np.cumsum(length) - length
    values = np.empty(int(length.sum()), dtype=np.int64)
    seps = np.full(values.size, SEP_COMMA, dtype=np.int8)
    source_pos = (line_start[:, None] + np.arange(seq_len)).ravel()
    values[source_pos] = t1[lines].ravel()
    seps[line_start + seq_len - 1] = SEP_DOUBLE
    line_of_target = np.repeat(np.arange(lines.size), per_line)
    rank = np.arange(rows.size) - np.repeat(np.cumsum(per_line) - per_line, per_line)
    values[line_start[line_of_target] + seq_len + rank] = targets
    seps[line_start + length - 1] = SEP_NEWLINE
    return values, seps


def sort_task(task: Task) -> Task:
    """Rows ascending, keeping the given order of targets within a row."""
    order = np.argsort(task.rows, kind="stable")
    task.rows, task.targets = task.rows[order], task.targets[order]
    return task


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = flags.Parser(description="Convert raw MovieLens into TERACON's six-task files.")
    parser.add_argument("--source", required=True, type=source,
                        help="raw MovieLens folder, or 'recbole' for the wheel's ml-100k")
    parser.add_argument("--out", required=True, type=flags.output_dir, help="output folder, e.g. Data/ml100k")
    parser.add_argument("--seq_len", type=flags.positive_int, default=50, help="task-1 sequence length (left-padded with 0)")
    parser.add_argument("--window", type=flags.positive_int, default=10, help="held-out interactions per user for tasks 2..6")
    parser.add_argument("--min_interactions", type=flags.positive_int, default=20,
                        help="drop users with fewer interactions; must exceed --window")
    parser.add_argument("--like_threshold", type=flags.finite_float, default=4.0, help="task-3 'like': rating >= this")
    parser.add_argument("--periods", type=int, choices=[1, STAGES], default=1,
                        help=f"1 (default): every task from the whole timeline; {STAGES}: time passes between tasks, "
                             "stage K's task from the ratings up to the end of period K, with re-test files of the "
                             "earlier tasks (for --protocol time)")
    parser.add_argument("--first_share", type=flags.fraction, default=None,
                        help=f"with --periods {STAGES}: the share of the ratings in the first period, in (0, 1) "
                             f"(default 1/{STAGES}); the later periods split the rest equally")
    return parser.parse_args(argv)


def source(text: str) -> str:
    """--source: `recbole`, or a folder (a missing one is reported by read_source, naming the path)."""
    if text != "recbole" and os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return text


def check_args(args: argparse.Namespace) -> None:
    """Settings that would leave a kept user without a task-1 sequence (each flag's own domain: parse_args)."""
    if args.min_interactions <= args.window:
        raise PrepError("--min_interactions must exceed --window so every kept user has a task-1 sequence")
    if args.first_share is not None and args.periods == 1:
        raise PrepError(f"--first_share applies to --periods {STAGES} only")


def task_stats(task: Task) -> dict[str, int]:
    """Lines (distinct rows), examples (one per target) and distinct targets."""
    lines = int(np.unique(task.rows).size)
    return {"lines": lines, "examples": int(task.rows.size), "targets": int(np.unique(task.targets).size)}


def describe(args: argparse.Namespace, raw: Raw, hist: Histories, tasks: list[Task]) -> dict[str, Any]:
    """The tasks.json content."""
    return {"source": args.source, "format": raw.format, "seq_len": args.seq_len, "window": args.window,
            "min_interactions": args.min_interactions, "like_threshold": args.like_threshold,
            "users": int(hist.users.size),
            "tasks": [task_entry(number, args, hist, tasks) for number in range(1, len(tasks) + 2)],
            "label_maps": {task.name: task.label_map for task in tasks if task.label_map is not None}}


def print_table(meta: dict[str, Any]) -> None:
    """Per-task lines, examples and distinct targets."""
    header = f"{'file':<10} {'name':<16} {'kind':<4} {'lines':>8} {'examples':>9} {'targets':>8}"
    print(header)
    for entry in meta["tasks"]:
        print(f"{entry['file']:<10} {entry['name']:<16} {entry['kind']:<4} {entry['lines']:>8} "
              f"{entry['examples']:>9} {entry['targets']:>8}")


def histories_of(ratings: pd.DataFrame, args: argparse.Namespace, what: str) -> Histories:
    """The kept users' histories of `ratings`; one line if none is kept or no held-out rating makes a 'like'."""
    hist = split_histories(ratings, args.seq_len, args.window, args.min_interactions)
    if hist.users.size == 0:
        raise PrepError(f"{args.source}: no user has >= {args.min_interactions} interactions{what}")
    held_out = hist.window["rating"]
    if not (held_out >= args.like_threshold).any():
        raise PrepError(f"--like_threshold {args.like_threshold:g}: no held-out rating reaches it{what} (they range "
                        f"{held_out.min():g}..{held_out.max():g}), so task 3 'like' would be empty")
    return hist


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Read, split, build and write all six tasks plus tasks.json; return the metadata."""
    check_args(args)
    raw = read_source(args.source)
    if args.periods > 1:
        return prepare_periods(args, raw)
    hist = histories_of(raw.ratings, args, "")
    tasks = [sort_task(task) for task in build_tasks(raw, hist, args.like_threshold)]
    os.makedirs(args.out, exist_ok=True)
    remove_retests(args.out)                # an earlier --periods run's: --protocol time would score them
    write_tokens(os.path.join(args.out, "task1.csv"), *task1_tokens(hist.t1))
    for number, task in enumerate(tasks, start=2):
        write_tokens(os.path.join(args.out, f"task{number}.csv"), *task_tokens(hist.t1, task.rows, task.targets))
    meta = describe(args, raw, hist, tasks)
    write_atomic(os.path.join(args.out, "tasks.json"), [(json.dumps(meta, indent=2) + "\n").encode("utf-8")])
    return meta


# ------------------------------------------------------------------------------------ time passing


def remove_retests(folder: str) -> None:
    """Delete the re-test files (taskU.retestK.csv) an earlier run left in `folder`."""
    for name in os.listdir(folder):
        if re.fullmatch(r"task\d+\.retest\d+\.csv", name):
            os.remove(os.path.join(folder, name))


def period_ends(timestamps: np.ndarray, periods: int, first_share: float) -> np.ndarray:
    """The last timestamp of each period [periods]: the first ends once `first_share` of the ratings (in time order)
    are made, the others split the rest into equal shares; the last ends with the last rating."""
    ordered = np.sort(timestamps, kind="stable")
    shares = first_share + (1.0 - first_share) * np.arange(periods) / (periods - 1)
    return ordered[np.ceil(shares * ordered.size).astype(np.int64) - 1]


def stage_lines(number: int, hist: Histories, tasks: list[Task],
                rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Task `number`'s file from one stage's histories (only the histories `rows` when given): its tokens (values,
    separators) and its source sequences [lines, seq_len]."""
    if number == 1:
        t1 = hist.t1 if rows is None else hist.t1[rows]
        return *task1_tokens(t1), t1
    task = tasks[number - 2]
    keep = np.ones(task.rows.size, dtype=bool) if rows is None else np.isin(task.rows, rows)
    if not keep.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int8), hist.t1[:0]
    return *task_tokens(hist.t1, task.rows[keep], task.targets[keep]), hist.t1[np.unique(task.rows[keep])]


def last_ratings(ratings: pd.DataFrame, hist: Histories) -> np.ndarray:
    """[n_users of hist] the timestamp of each kept user's last rating in `ratings`."""
    return ratings.groupby("user")["timestamp"].max().reindex(hist.users).to_numpy()


def day(moment: float) -> str:
    """A timestamp (seconds since 1970, UTC) as its date."""
    return pd.Timestamp(moment, unit="s").strftime("%Y-%m-%d")


def prepare_periods(args: argparse.Namespace, raw: Raw) -> dict[str, Any]:
    """--periods: stage K's task from the ratings up to the end of period K; each earlier task U's re-test file
    beside its own (task U from the same ratings, over the users who rated after period U); tasks.json with each
    stage's period, new items and re-tests. → the metadata."""
    first_share = args.first_share if args.first_share is not None else 1.0 / STAGES
    ends = period_ends(raw.ratings["timestamp"].to_numpy(), STAGES, first_share)
    os.makedirs(args.out, exist_ok=True)
    known = [np.zeros(0, dtype=np.int64)]   # known[K]: the source items of the files of stages 1..K, ascending
    entries, retests = [], []
    remove_retests(args.out)
    for stage, end in enumerate(ends, start=1):
        ratings = raw.ratings[raw.ratings["timestamp"] <= end]
        hist = histories_of(ratings, args, f" by the end of period {stage} ({day(end)})")
        tasks = [sort_task(task) for task in build_tasks(raw, hist, args.like_threshold, coded_alike=True)]
        last = last_ratings(ratings, hist)                         # [users]
        for task in range(1, stage):                               # the earlier tasks' later users (tasks 1..5)
            values, seps, sources = stage_lines(task, hist, tasks, np.flatnonzero(last > ends[task - 1]))
            if sources.shape[0] == 0:
                continue
            name = f"task{task}.retest{stage}.csv"
            write_tokens(os.path.join(args.out, name), values, seps)
            inputs = sources[:, :-1] if task == 1 else sources              # task 1's last item is its target
            with_new = int(((inputs > 0) & ~np.isin(inputs, known[task])).any(1).sum())
            retests.append({"file": name, "task": task, "stage": stage, "kind": "rec" if task <= 3 else "cls",
                            "lines": int(sources.shape[0]), "users_with_new": with_new})
        values, seps, sources = stage_lines(stage, hist, tasks)
        if sources.shape[0] == 0:
            raise PrepError(f"{args.source}: task {stage} has no example by the end of period {stage} ({day(end)})")
        write_tokens(os.path.join(args.out, f"task{stage}.csv"), values, seps)
        items = np.unique(sources[sources > 0])
        entries.append({"stage": stage, "period_end": day(end), "ratings": int(len(ratings)),
                        "users": int(hist.users.size), "new_items": int(np.setdiff1d(items, known[-1]).size),
                        **task_entry(stage, args, hist, tasks)})
        known.append(np.union1d(known[-1], items))
    meta = {"source": args.source, "format": raw.format, "seq_len": args.seq_len, "window": args.window,
            "min_interactions": args.min_interactions, "like_threshold": args.like_threshold,
            "users": entries[-1]["users"], "periods": STAGES, "first_share": first_share,
            "time_note": "stage K's task is built from the ratings up to the end of period K; taskU.retestK.csv is "
                         "task U built from the same ratings over the users who rated after period U; new_items: "
                         "source items no earlier stage's file holds; users_with_new: re-test lines holding one",
            "tasks": entries, "retests": retests,
            "label_maps": {task.name: task.label_map for task in tasks if task.label_map is not None}}
    write_atomic(os.path.join(args.out, "tasks.json"), [(json.dumps(meta, indent=2) + "\n").encode("utf-8")])
    return meta


def task_entry(stage: int, args: argparse.Namespace, hist: Histories, tasks: list[Task]) -> dict[str, Any]:
    """A task's tasks.json entry (file, name, kind, definition, lines, examples, targets)."""
    if stage == 1:
        return {"file": "task1.csv", "name": "next_item", "kind": "rec",
                "definition": f"up to {args.seq_len} interactions just before the held-out window, "
                              "chronological, left-padded with 0",
                "lines": int(hist.users.size), "examples": int(hist.users.size),
                "targets": int(np.unique(hist.t1[hist.t1 > 0]).size)}
    task = tasks[stage - 2]
    return {"file": f"task{stage}.csv", "name": task.name, "kind": task.kind, "definition": task.definition,
            **task_stats(task)}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; bad input → one line on stderr and exit code 2."""
    args = parse_args(argv)
    try:
        meta = prepare(args)
    except (PrepError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: {error.filename or args.out}: {error.strerror or _one_line(error)}", file=sys.stderr)
        return 2
    print_table(meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
