"""TTL at full scale (issue 49): the TTL-shaped generator's shapes, --max_steps and --eval_users (what they count,
which users, what the report says), what a stage writes to resources.json, and tools/scale_report.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from continual.datasets import DATASETS
from data_loader import limit_users, load_sequences, load_task
from continual.generators import ttl_shaped
from tools import scale_report

SMALL = ["--users", "300", "--items", "500", "--length", "12", "--classes", "40,30,9,3,7"]


@pytest.fixture(scope="module")
def small_ttl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ttl_shaped")
    ttl_shaped.main(["--out", str(folder), *SMALL])
    return folder


def test_the_generator_writes_ttls_six_files_in_the_shapes_asked_for(small_ttl):
    files = DATASETS["ttl"]["files"]
    assert sorted(os.listdir(small_ttl)) == sorted([*files, "tasks.json"])   # no temporary file left behind
    sequences, index = load_sequences(str(small_ttl / files[0]))
    assert sequences.shape == (300, 12) and index.size == 500                # <UNK>, "0" and 498 items
    raw = np.loadtxt(small_ttl / files[0], delimiter=",", dtype=np.int64)
    assert (raw[:, -1] > 0).all()                                            # padding only on the left
    padded = raw == 0
    assert (np.diff(padded.astype(int), axis=1) <= 0).all() and padded.any()
    first_line = (small_ttl / files[0]).read_text().splitlines()[0]
    for number, classes in zip(range(2, 7), [40, 30, 9, 3, 7]):
        lines = (small_ttl / files[number - 1]).read_text().splitlines()
        assert lines[0].split(",,")[0] == first_line                          # line i's source is task 1's line i
        data = load_task(str(small_ttl / files[number - 1]), index)
        assert data.n_classes == classes and data.sources.shape == (300, 12)
        targets = [len(line.split(",,")[1].split(",")) for line in lines]
        assert set(targets) == ({1, 2, 3} if number <= 3 else {1})           # one to three targets on tasks 2-3
    meta = json.loads((small_ttl / "tasks.json").read_text())
    assert meta["synthetic"] and [t["n_classes"] for t in meta["tasks"]] == [500, 40, 30, 9, 3, 7]


def test_the_generator_is_a_function_of_its_seed(tmp_path, small_ttl):
    ttl_shaped.main(["--out", str(tmp_path / "again"), *SMALL])
    ttl_shaped.main(["--out", str(tmp_path / "other"), *SMALL, "--seed", "1"])
    name = DATASETS["ttl"]["files"][1]
    assert (tmp_path / "again" / name).read_bytes() == (small_ttl / name).read_bytes()
    assert (tmp_path / "other" / name).read_bytes() != (small_ttl / name).read_bytes()


def test_the_defaults_are_ttls_shapes():
    assert ttl_shaped.TTL_ITEMS == 645_974 and ttl_shaped.TTL_CLASSES == (17_880, 7_540, 9, 3, 7)


@pytest.mark.parametrize("arguments, message", [
    (["--users", "10", "--items", "500", "--length", "12"], "--users 10 lines hold at most 20 distinct items"),
    (["--users", "300", "--items", "50", "--classes", "60,30,9,3,7"], "--classes: click has 60 classes"),
    (["--classes", "9,3"], "--classes must be 5 comma-separated integers >= 2"),
])
def test_sizes_that_cannot_be_met_end_in_one_line(repo_root, subprocess_env, tmp_path, arguments, message):
    done = subprocess.run([sys.executable, "tools/ttl_shaped.py", "--out", str(tmp_path / "x"), *arguments],
                          cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "x").exists()


def test_limit_users_keeps_every_row_of_a_seeded_draw_of_users():
    rows = np.arange(100, 130)
    users = np.repeat(np.arange(10), 3)                                       # three examples a user
    chosen = limit_users(rows, users, 4, seed=7)
    picked = np.unique(users[np.isin(rows, chosen)])
    assert picked.size == 4 and chosen.size == 12                             # every example of 4 users
    assert np.array_equal(chosen, limit_users(rows, users, 4, seed=7))        # the same draw for the same seed
    assert not np.array_equal(chosen, limit_users(rows, users, 4, seed=8))
    assert np.array_equal(limit_users(rows, users, None, 7), rows) and np.array_equal(limit_users(rows, users, 10, 7),
                                                                                      rows)


@pytest.fixture(scope="module")
def limited_stages(tmp_path_factory, two_stages):
    """Stage 1 and stage 2 with --max_steps 3 --eval_users 20 on 400 users (batch 16: 20 batches an epoch)."""
    return two_stages(tmp_path_factory.mktemp("limited"), "--batch", "16", "--max_steps", "3", "--eval_users", "20",
                      "--epochs", "4")


@pytest.mark.slow
def test_max_steps_trains_that_many_steps_then_selects_scores_and_saves(limited_stages):
    folder, outputs = limited_stages
    for stage, output in zip((1, 2), outputs):
        metrics = json.loads((folder / f"task{stage}.metrics.json").read_text())
        resources = json.loads((folder / f"task{stage}.resources.json").read_text())
        assert metrics["limits"] == {"max_steps": 3, "steps": 3, "eval_users": 20}
        assert resources["steps"] == 3 and output.count("epoch 0:") == 1 and "epoch 1:" not in output
        assert "stop: --max_steps 3 optimiser steps done" in output
        assert "LIMITED RUN, not comparable with a full one: --max_steps 3: 3 optimiser step(s) trained; " \
               "--eval_users 20: every task scored on at most 20 of its users" in output
        assert (folder / f"task{stage}.t7").is_file()
        assert not (folder / f"task{stage}.resume.t7").exists()


def test_eval_users_scores_the_same_users_of_a_task_at_every_stage(limited_stages):
    folder, _ = limited_stages
    first, second = (json.loads((folder / f"task{k}.metrics.json").read_text())["tasks"] for k in (1, 2))
    assert first["1"]["n_test_users"] == second["1"]["n_test_users"] == 20
    assert second["2"]["n_test_users"] == 20 and second["2"]["n_test"] >= 20    # a line with two targets: two rows
    assert first["1"]["baseline"] == second["1"]["baseline"]                  # the same users: the same baseline


def test_resources_json_holds_what_the_stage_cost(limited_stages):
    folder, _ = limited_stages
    resources = json.loads((folder / "task2.resources.json").read_text())
    assert resources["peak_rss_mib"] > 100 and resources["load_seconds"] >= 0 and resources["first_step_seconds"] > 0
    assert [entry["task"] for entry in resources["evaluation"]] == [1, 2]
    assert all(entry["users"] == 20 for entry in resources["evaluation"])
    assert resources["checkpoint_mib"] == pytest.approx(os.path.getsize(folder / "task2.t7") / 2**20, abs=0.05)
    accounted = resources["accounted_mib"]
    assert accounted["batch"] == 16 and "previous model" in accounted and accounted["activations"] > 0
    assert accounted["model_grad_adam"] == pytest.approx(16 * json.loads(
        (folder / "task2.metrics.json").read_text())["parameters"] / 2**20, abs=0.1)
    assert resources["shapes"]["classes"][0] == resources["shapes"]["items"] and resources["shapes"]["train_rows"] > 0


def test_the_scale_report_reads_a_run_and_writes_between_its_markers(limited_stages, tmp_path):
    folder, _ = limited_stages
    text = scale_report.report(str(folder))
    assert "| shared stage 1 | 1 |" in text and "largest batch, 80 GB" in text
    page = tmp_path / "page.md"
    page.write_text(f"before\n{scale_report.BEGIN}\nSTALE\n{scale_report.END}\nafter\n")
    scale_report.write_between_markers(str(page), text)
    written = page.read_text()
    assert written.startswith("before\n") and written.endswith("after\n") and "STALE" not in written and text in written
    record = scale_report.stage_records(str(folder))[1]
    sizes = [scale_report.accounted_bytes(record, batch, on_gpu=True) for batch in (1, 64, 4096)]
    assert sizes == sorted(sizes) and scale_report.largest_batch(record, sizes[1]) == 64
