"""Tests for prepare_data.py on tiny fixtures written in every raw MovieLens format (no real data copied)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare_data  # noqa: E402

SEQ_LEN, WINDOW, MIN_INTER = 5, 3, 6
SMALL = ["--seq_len", str(SEQ_LEN), "--window", str(WINDOW), "--min_interactions", str(MIN_INTER)]
GENRES = ["Action", "Comedy", "Drama", "Film-Noir", "Sci-Fi"]
OCCUPATIONS = ["writer", "artist", "student", "artist", "engineer", "writer", "student", "doctor", "artist"]
AGES_100K = [17, 18, 24, 25, 44, 49, 50, 55, 56]
AGES_1M = [1, 18, 18, 25, 35, 45, 50, 50, 56]


def make_data(half_stars: bool = False) -> tuple[list[tuple[int, int, float, int]], dict[int, list[str]]]:
    """Interactions (user, item, rating, timestamp) in raw-file order, and item genres.

    Users 1..9 have 3..13 interactions over items 1..12: repeats, timestamp ties, short (padded) and dropped
    users, window items also in the task-1 input, and users with no liked item, on purpose."""
    rng = np.random.default_rng(3)
    rows = []
    for user in range(1, 10):
        for _ in range(int(rng.integers(MIN_INTER - 3, MIN_INTER + 8))):
            rating = float(rng.integers(1, 11)) / 2 if half_stars else float(rng.integers(1, 6))
            rows.append((user, int(rng.integers(1, 13)), rating, int(rng.integers(100, 112))))
    rows += [(9, 5, 5.0, 50), (9, 6, 4.0, 50), (9, 7, 3.0, 50)]  # ties: file order must decide
    order = rng.permutation(len(rows))
    genres = {item: sorted(rng.choice(GENRES, int(rng.integers(1, 3)), replace=False).tolist())
              for item in range(1, 13)}
    genres[12] = []
    return [rows[k] for k in order], genres


def write_ml100k(folder: Path, rows, genres) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{int(r)}\t{t}\n" for u, i, r, t in rows))
    (folder / "u.user").write_text("".join(
        f"{u}|{AGES_100K[u - 1]}|{'F' if u % 3 == 0 else 'M'}|{OCCUPATIONS[u - 1]}|0{u}123\n" for u in range(1, 10)))
    lines = [f"{i}|Film {i} é (1995)|01-Jan-1995||http://x|" + "|".join("0" * 19) + "\n" for i in range(1, 13)]
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))


def write_ml1m(folder: Path, rows, genres) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t in rows))
    (folder / "users.dat").write_text("".join(
        f"{u}::{'F' if u % 3 == 0 else 'M'}::{AGES_1M[u - 1]}::{(u * 7) % 21}::1234{u}-5678\n" for u in range(1, 10)))
    (folder / "movies.dat").write_bytes("".join(
        f"{i}::Film: {i} é (1995)::{'|'.join(g)}\n" for i, g in genres.items()).encode("latin-1"))


def write_ml_latest(folder: Path, rows, genres) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(
        f"{u},{i},{r:.1f},{t}\n" for u, i, r, t in rows))
    (folder / "movies.csv").write_text("movieId,title,genres\n" + "".join(
        f"{i},\"Film, The {i} (1995)\",{'|'.join(g) or '(no genres listed)'}\n" for i, g in genres.items()))


def write_recbole(folder: Path, rows, genres) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "toy.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{u}\t{i}\t{int(r)}\t{t}\n" for u, i, r, t in rows))
    (folder / "toy.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n" + "".join(
            f"{u}\t{AGES_100K[u - 1]}\t{'F' if u % 3 == 0 else 'M'}\t{OCCUPATIONS[u - 1]}\t0{u}123\n"
            for u in range(1, 10)))
    (folder / "toy.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n" +
                                     "".join(f"{i}\tFilm {i}\t1995\t{' '.join(g)}\n" for i, g in genres.items()))


WRITERS = {"ml-100k": write_ml100k, "ml-1m": write_ml1m, "ml-csv": write_ml_latest, "recbole-atomic": write_recbole}


def reference(rows, like: float = 4.0) -> dict[int, dict]:
    """Plain-Python split per kept user: T1 line, window interactions, T2 and T3 targets."""
    per_user: dict[int, list] = {}
    for user, item, rating, stamp in rows:
        per_user.setdefault(user, []).append((stamp, item, rating))
    out = {}
    for user in sorted(per_user):
        history = sorted(per_user[user], key=lambda row: row[0])  # sorted() is stable: file order breaks ties
        if len(history) < MIN_INTER:
            continue
        seq = [item for _, item, _ in history[:-WINDOW]][-SEQ_LEN:]
        seq = [0] * (SEQ_LEN - len(seq)) + seq
        window = history[-WINDOW:]
        watch = [item for _, item, _ in window if item not in seq]
        liked = [item for _, item, rating in window if rating >= like and item not in seq]
        out[user] = {"line": ",".join(map(str, seq)), "seq": seq, "window": window, "count": len(history),
                     "watch": list(dict.fromkeys(watch)), "like": list(dict.fromkeys(liked))}
    return out


def run(source: Path | str, out: Path, extra: list[str] | None = None) -> dict:
    code = prepare_data.main(["--source", str(source), "--out", str(out)] + SMALL + (extra or []))
    assert code == 0
    return json.loads((out / "tasks.json").read_text())


def read_task(out: Path, number: int) -> list[tuple[str, list[int]]]:
    """(source text, targets) per line of task `number` (task 1: targets empty)."""
    lines = (out / f"task{number}.csv").read_text().splitlines()
    if number == 1:
        return [(line, []) for line in lines]
    return [(source, [int(x) for x in targets.split(",")]) for source, targets in
            (line.split(",,") for line in lines)]


def sources_by_user(ref: dict[int, dict], tasks: list[tuple[str, list[int]]], users: list[int]) -> None:
    """Lines follow ascending user order and each source is that user's exact task-1 line."""
    assert [source for source, _ in tasks] == [ref[user]["line"] for user in users]


@pytest.fixture(params=list(WRITERS))
def prepared(request, tmp_path):
    fmt = request.param
    rows, genres = make_data(half_stars=fmt == "ml-csv")
    WRITERS[fmt](tmp_path / "raw", rows, genres)
    meta = run(tmp_path / "raw", tmp_path / "out")
    return fmt, rows, genres, tmp_path, meta


def test_counts_and_rec_tasks_match_reference(prepared):
    fmt, rows, genres, tmp_path, meta = prepared
    out = tmp_path / "out"
    ref = reference(rows)
    assert meta["format"] == fmt
    assert 0 < len(ref) < 9  # some users are dropped by min_interactions
    task1 = read_task(out, 1)
    assert [line for line, _ in task1] == [ref[u]["line"] for u in ref]
    assert all(len(line.split(",")) == SEQ_LEN for line, _ in task1)
    for number, key in ((2, "watch"), (3, "like")):
        users = [u for u in ref if ref[u][key]]
        lines = read_task(out, number)
        sources_by_user(ref, lines, users)
        assert [targets for _, targets in lines] == [ref[u][key] for u in users]
    for number, entry in enumerate(meta["tasks"], start=1):
        lines = read_task(out, number)
        assert entry["file"] == f"task{number}.csv"
        assert entry["lines"] == len(lines)
        if number > 1:
            assert entry["examples"] == sum(len(t) for _, t in lines)
            assert entry["targets"] == len({x for _, t in lines for x in t})


def test_no_overlap_and_like_threshold(prepared):
    fmt, rows, genres, tmp_path, meta = prepared
    ref = reference(rows)
    line_to_user = {ref[u]["line"]: u for u in ref}
    assert any(item in info["seq"] for info in ref.values() for _, item, _ in info["window"]), "fixture lacks overlap"
    checked = 0
    for number in (2, 3):
        for source, targets in read_task(tmp_path / "out", number):
            user = line_to_user[source]
            assert not set(targets) & set(ref[user]["seq"]), "T1 input leaks into targets"
            assert len(targets) == len(set(targets))
            best_rating: dict[int, float] = {}
            for _, item, rating in ref[user]["window"]:
                best_rating[item] = max(rating, best_rating.get(item, 0.0))
            assert all(item in best_rating for item in targets)
            if number == 3:
                assert all(best_rating[item] >= 4.0 for item in targets)
            checked += len(targets)
    assert checked > 0


def test_chronology_and_stable_ties(tmp_path):
    rows = [(1, 10 + k, 5.0, 1000 - k) for k in range(6)]  # reverse chronological in the file
    rows += [(1, 30, 5.0, 2000), (1, 31, 1.0, 500), (1, 32, 5.0, 2000), (1, 33, 5.0, 2000)]  # ties at 2000
    write_ml100k(tmp_path / "raw", rows, {})
    run(tmp_path / "raw", tmp_path / "out", ["--seq_len", "8"])
    assert (tmp_path / "out" / "task1.csv").read_text() == "0,31,15,14,13,12,11,10\n"
    assert (tmp_path / "out" / "task2.csv").read_text() == "0,31,15,14,13,12,11,10,,30,32,33\n"


def test_demographic_labels(tmp_path):
    rows, genres = make_data()
    rows = [(u, i, r, t) for u, i, r, t in rows] + [(u, 1, 3.0, k) for u in range(1, 10) for k in range(MIN_INTER)]
    for fmt in ("ml-100k", "ml-1m", "recbole-atomic"):
        WRITERS[fmt](tmp_path / fmt, rows, genres)
        meta = run(tmp_path / fmt, tmp_path / f"out-{fmt}")
        out = tmp_path / f"out-{fmt}"
        ref = reference(rows)
        assert list(ref) == list(range(1, 10))
        labels = {}
        for number in (4, 5, 6):
            lines = read_task(out, number)
            sources_by_user(ref, lines, list(ref))
            labels[number] = [t[0] for _, t in lines]
        assert labels[4] == [1, 2, 2, 3, 4, 5, 6, 6, 7]
        assert labels[5] == [2, 2, 1, 2, 2, 1, 2, 2, 1]
        assert meta["label_maps"]["gender"] == {"F": 1, "M": 2}
        raw_occupations = OCCUPATIONS if fmt != "ml-1m" else [(u * 7) % 21 for u in range(1, 10)]
        order = sorted(set(raw_occupations))
        assert labels[6] == [order.index(value) + 1 for value in raw_occupations]
        assert meta["label_maps"]["occupation"] == {str(value): k + 1 for k, value in enumerate(order)}


def test_substitute_labels_without_demographics(tmp_path):
    rows, genres = make_data(half_stars=True)
    write_ml_latest(tmp_path / "raw", rows, genres)
    meta = run(tmp_path / "raw", tmp_path / "out")
    ref = reference(rows)
    names = [entry["name"] for entry in meta["tasks"]]
    assert names == ["next_item", "watch", "like", "favourite_genre", "rating_band", "activity_band"]
    genre_codes = meta["label_maps"]["favourite_genre"]
    expected_genre = {}
    for user, info in ref.items():
        counts = Counter(g for _, item, _ in info["window"] for g in genres[item])
        if counts:
            best = max(counts.values())
            expected_genre[user] = genre_codes[min(g for g, c in counts.items() if c == best)]
    assert sorted(genre_codes) == list(genre_codes)
    assert list(genre_codes.values()) == list(range(1, len(genre_codes) + 1))
    lines = read_task(tmp_path / "out", 4)
    sources_by_user(ref, lines, list(expected_genre))
    assert [t[0] for _, t in lines] == list(expected_genre.values())
    means = [np.mean([r for _, _, r in info["window"]]) for info in ref.values()]
    assert [t[0] for _, t in read_task(tmp_path / "out", 5)] == [1 if m < 3 else 2 if m < 4 else 3 for m in means]
    counts = np.array([info["count"] for info in ref.values()])
    low, high = np.floor(np.quantile(counts, [1 / 3, 2 / 3]))
    expected_band = [1 if c <= low else 2 if c <= high else 3 for c in counts]
    assert [t[0] for _, t in read_task(tmp_path / "out", 6)] == expected_band


def test_rerun_is_byte_identical(prepared):
    fmt, rows, genres, tmp_path, meta = prepared
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    run(tmp_path / "raw", tmp_path / "out")
    second = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert first == second
    assert sorted(first) == [f"task{k}.csv" for k in range(1, 7)] + ["tasks.json"]


def error_line(capsys, argv: list[str]) -> str:
    assert prepare_data.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


@pytest.mark.parametrize("name,content", [
    ("u.data", "1\t2\tthree\t100\n"),
    ("u.data", "1\t2\t3\n"),
    ("u.data", "1\t0\t3\t100\n"),
    ("u.user", "1|24|X|writer|12345\n"),
])
def test_malformed_ml100k(tmp_path, capsys, name, content):
    rows, genres = make_data()
    write_ml100k(tmp_path / "raw", rows, genres)
    (tmp_path / "raw" / name).write_text(content)
    err = error_line(capsys, ["--source", str(tmp_path / "raw"), "--out", str(tmp_path / "out")])
    assert str(tmp_path / "raw" / name) in err
    assert not (tmp_path / "out").exists()


def test_malformed_other_formats(tmp_path, capsys):
    rows, genres = make_data()
    write_ml1m(tmp_path / "m1", rows, genres)
    (tmp_path / "m1" / "ratings.dat").write_text("1::2::3::4::5\n")
    assert "ratings.dat:" in error_line(capsys, ["--source", str(tmp_path / "m1"), "--out", str(tmp_path / "o")])
    write_ml_latest(tmp_path / "csv", rows, genres)
    (tmp_path / "csv" / "ratings.csv").write_text("user,movie,rating,timestamp\n1,2,3,4\n")
    assert "ratings.csv:" in error_line(capsys, ["--source", str(tmp_path / "csv"), "--out", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    assert "empty:" in error_line(capsys, ["--source", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])


def test_missing_source_subprocess(tmp_path):
    missing = tmp_path / "nowhere"
    result = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--source", str(missing),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == f"error: {missing}: source folder not found\n"
    assert "Traceback" not in result.stderr


def test_recbole_not_installed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prepare_data.importlib.util, "find_spec", lambda name: None)
    err = error_line(capsys, ["--source", "recbole", "--out", str(tmp_path / "out")])
    assert err == "error: recbole's wheel is not installed; run: pip install --no-deps recbole==1.2.1\n"


def test_recbole_demo(tmp_path):
    if importlib.util.find_spec("recbole") is None:
        pytest.skip("recbole's wheel is not installed (pip install --no-deps recbole==1.2.1)")
    out = tmp_path / "demo"
    assert prepare_data.main(["--source", "recbole", "--out", str(out)]) == 0
    meta = json.loads((out / "tasks.json").read_text())
    assert meta["format"] == "recbole-atomic" and meta["users"] == 943
    assert [entry["lines"] for entry in meta["tasks"]][:2] == [943, 943]
    assert [entry["lines"] for entry in meta["tasks"]][3:] == [943, 943, 943]
    task1 = (out / "task1.csv").read_text().splitlines()
    assert len(task1) == 943 and all(len(line.split(",")) == 50 for line in task1)
    assert meta["label_maps"]["occupation"]["administrator"] == 1 and len(meta["label_maps"]["occupation"]) == 21
    for number in range(2, 7):
        sources = [line.split(",,")[0] for line in (out / f"task{number}.csv").read_text().splitlines()]
        assert set(sources) <= set(task1)


def timeline_rows() -> list[tuple[int, int, float, int]]:
    """Twelve users rating over 1,200 seconds, each item from a pool that grows with time (so later periods bring
    new items); users 10–12 start late. Every timestamp distinct."""
    rng = np.random.default_rng(11)
    rows, stamps = [], rng.permutation(np.arange(1, 1201))
    used = 0
    for user in range(1, 13):
        count = int(rng.integers(MIN_INTER + 1, MIN_INTER + 12))
        times = np.sort(stamps[used:used + count]) + (600 if user >= 10 else 0)
        used += count
        for stamp in times:
            rows.append((user, int(rng.integers(1, 5 + int(stamp) // 60)), float(rng.integers(1, 6)), int(stamp)))
    return rows


def test_periods_build_each_stage_and_its_retests_from_their_own_time(tmp_path):
    rows = timeline_rows()
    users_file = [(u, AGES_100K[(u - 1) % 9], OCCUPATIONS[(u - 1) % 9]) for u in range(1, 13)]
    folder = tmp_path / "raw"
    write_ml100k(folder, rows, {})
    (folder / "u.user").write_text("".join(f"{u}|{a}|{'F' if u % 3 == 0 else 'M'}|{o}|0{u}123\n"
                                           for u, a, o in users_file))
    meta = run(folder, tmp_path / "out", ["--periods", "6", "--first_share", "0.5"])
    out = tmp_path / "out"
    stamps = np.sort([t for *_, t in rows])
    ends = [stamps[int(np.ceil((0.5 + 0.1 * k) * stamps.size)) - 1] for k in range(6)]
    assert [entry["period_end"] for entry in meta["tasks"]] == [prepare_data.day(end) for end in ends]
    known: set[int] = set()
    for stage, end in enumerate(ends, start=1):
        cut = [row for row in rows if row[3] <= end]
        ref = reference(cut)
        lines = read_task(out, stage)
        if stage == 1:
            assert [source for source, _ in lines] == [ref[u]["line"] for u in ref]
        elif stage == 2:
            watchers = [u for u in ref if ref[u]["watch"]]
            sources_by_user(ref, lines, watchers)
            assert [targets for _, targets in lines] == [ref[u]["watch"] for u in watchers]
        elif stage == 5:
            sources_by_user(ref, lines, list(ref))
            assert [t[0] for _, t in lines] == [2 if u % 3 else 1 for u in ref]
        items = {int(x) for source, _ in lines for x in source.split(",") if x != "0"}
        assert meta["tasks"][stage - 1]["new_items"] == len(items - known)
        assert meta["tasks"][stage - 1]["users"] == len(ref)
        for task in range(1, stage):                      # re-tests: task U over the users who rated after period U
            later = [u for u in ref if max(t for user, *_, t in cut if user == u) > ends[task - 1]]
            path = out / f"task{task}.retest{stage}.csv"
            if task == 1:
                assert path.read_text().splitlines() == [ref[u]["line"] for u in later]
            if task == 5:
                assert [t for _, t in read_task_file(path)] == [[2 if u % 3 else 1] for u in later]
        known |= items
    assert any(entry["users_with_new"] > 0 for entry in meta["retests"])
    retest = next(entry for entry in meta["retests"] if entry["task"] == 1 and entry["stage"] == 6)
    stage1_items = {int(x) for x in (out / "task1.csv").read_text().replace("\n", ",").split(",") if x not in ("", "0")}
    with_new = sum(bool({int(x) for x in line.split(",")[:-1]} - stage1_items - {0})   # the input, not the target
                   for line in (out / "task1.retest6.csv").read_text().splitlines())
    assert retest["users_with_new"] == with_new > 0
    order = sorted(set(OCCUPATIONS))                      # coded over every user's occupation at every stage
    assert meta["label_maps"]["occupation"] == {value: k + 1 for k, value in enumerate(order)}
    again = {p.name: p.read_bytes() for p in out.iterdir()}
    run(folder, out, ["--periods", "6", "--first_share", "0.5"])
    assert again == {p.name: p.read_bytes() for p in out.iterdir()}
    run(folder, out)                                      # the static files: no re-test file is left behind
    assert sorted(p.name for p in out.iterdir()) == [f"task{k}.csv" for k in range(1, 7)] + ["tasks.json"]


def read_task_file(path: Path) -> list[tuple[str, list[int]]]:
    """(source text, targets) per line of a task file of tasks 2..6."""
    return [(source, [int(x) for x in targets.split(",")]) for source, targets in
            (line.split(",,") for line in path.read_text().splitlines())]


@pytest.mark.parametrize("extra,expected", [
    (["--first_share", "0.5"], "error: --first_share applies to --periods 6 only\n"),
    (["--periods", "6", "--first_share", "1.5"], "--first_share"),
    (["--periods", "3"], "--periods"),
])
def test_periods_flags_are_checked(tmp_path, extra, expected):
    rows, genres = make_data()
    write_ml100k(tmp_path / "raw", rows, genres)
    done = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--source", str(tmp_path / "raw"), "--out",
                           str(tmp_path / "out"), *SMALL, *extra], capture_output=True, text=True)
    assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.count("\n") <= 2 and not (tmp_path / "out").exists()


def test_recbole_demo_time_with_its_preset_flags(tmp_path):
    """--dataset demo_time's data: MovieLens-100K in six periods (its preset's flags), items arriving at every stage
    and a re-test file for every earlier task at every later stage."""
    if importlib.util.find_spec("recbole") is None:
        pytest.skip("recbole's wheel is not installed (pip install --no-deps recbole==1.2.1)")
    from continual.datasets import DATASETS
    out = tmp_path / "demo_time"
    assert prepare_data.main(["--source", "recbole", "--out", str(out), *DATASETS["demo_time"]["generator"]]) == 0
    meta = json.loads((out / "tasks.json").read_text())
    users = [entry["users"] for entry in meta["tasks"]]
    assert users == sorted(users) and users[-1] == 943 and users[0] < 943
    assert all(entry["new_items"] > 0 for entry in meta["tasks"])
    assert sorted((entry["task"], entry["stage"]) for entry in meta["retests"]) == [
        (task, stage) for task in range(1, 6) for stage in range(task + 1, 7)]
    assert all(entry["users_with_new"] > 0 for entry in meta["retests"])
