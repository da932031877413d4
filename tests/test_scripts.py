"""End-to-end runs of the scripts as a user runs them (subprocess, cwd = the repository root).

Two chains on synthetic data (see conftest.py): a one-epoch smoke chain task 1 → 2 → 3, and a
short training chain on a larger file that must learn every task clearly above chance. The
evaluation CLI and the forgetting matrix are checked against the files that chain wrote.
"""
from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from continual import datasets

REC_METRICS = {"mrr@5", "hit@5", "ndcg@5", "mrr@20", "hit@20", "ndcg@20", "acc"}


def run_script(repo_root, env, script, *args, timeout=180):
    command = [sys.executable, str(repo_root / script), *map(str, args)]
    done = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (f"{script} exited {done.returncode}\n--- stdout ---\n{done.stdout[-3000:]}"
                                  f"\n--- stderr ---\n{done.stderr[-3000:]}")
    return done


def run_chain(repo_root, env, data, out, epochs, extra1=(), extra_k=()):
    """train_task1.py → train_teracon_t2.py → train_teracon_t3.py; returns {K: metrics.json}."""
    common = ["--epochs", epochs, "--channels", 16, "--device", "cpu", "--datapath_index", out / "index.csv"]
    run_script(repo_root, env, "train_task1.py", "--datapath", data.task1, "--savepath", out / "task1",
               "--batch", 32, *common, *extra1)
    run_script(repo_root, env, "train_teracon_t2.py", "--datapath", data.task2, "--paths", out / "task1.t7",
               "--savepath", out / "task2", "--batch", 64, *common, *extra_k)
    run_script(repo_root, env, "train_teracon_t3.py", "--datapath", data.task3, "--paths", out / "task2.t7",
               "--savepath", out / "task3", "--batch", 64, *common, *extra_k)
    return {k: json.loads((out / f"task{k}.metrics.json").read_text()) for k in (1, 2, 3)}


@pytest.fixture(scope="module")
def chains(tmp_path_factory, data_writer, subprocess_env, repo_root):
    """Both chains start at once, in two threads (each script is single-threaded; two cores)."""
    def smoke():
        root = tmp_path_factory.mktemp("smoke")
        data = data_writer(root / "data", n_users=300, seed=1)
        out = root / "out"
        return data, out, run_chain(repo_root, subprocess_env, data, out, epochs=1)

    def long():
        root = tmp_path_factory.mktemp("long")
        data = data_writer(root / "data", n_users=1000, seed=2)
        out = root / "out"
        return data, out, run_chain(repo_root, subprocess_env, data, out, epochs=5,
                                    extra1=("--lr", 3e-3), extra_k=("--lr", 3e-3))

    pool = ThreadPoolExecutor(max_workers=2)
    futures = {"smoke": pool.submit(smoke), "long": pool.submit(long)}
    yield futures
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def smoke_run(chains):
    """One epoch per stage on 300 users: (data, output folder, {K: metrics.json})."""
    return chains["smoke"].result()


@pytest.fixture(scope="module")
def long_run(chains):
    """Five epochs per stage on 1000 users, lr 3e-3: (data, output folder, {K: metrics.json})."""
    return chains["long"].result()


def _check_metrics_file(metrics, stage, expected_kinds):
    assert metrics["stage"] == stage
    assert set(metrics["tasks"]) == {str(k) for k in range(1, stage + 1)}
    for key, entry in metrics["tasks"].items():
        kind = expected_kinds[int(key)]
        assert entry["kind"] == kind, f"stage {stage} task {key}"
        assert set(entry["test"]) == (REC_METRICS if kind == "rec" else {"acc"}), f"stage {stage} task {key}"
        for name, value in entry["test"].items():
            assert math.isfinite(value) and 0.0 <= value <= 1.0, f"stage {stage} task {key} {name}={value}"
        test = entry["test"]
        if kind == "rec":  # internal consistency of the ranking metrics
            assert test["acc"] <= test["mrr@5"] + 1e-9 <= test["ndcg@5"] + 2e-9 <= test["hit@5"] + 3e-9
            assert test["hit@5"] <= test["hit@20"] + 1e-9 and test["mrr@5"] <= test["mrr@20"] + 1e-9


@pytest.mark.slow
def test_three_stages_one_epoch_each(smoke_run):
    from continual.methods.checkpoints import load_checkpoint
    from data_loader import read_index

    data, out, metrics = smoke_run
    sizes = _class_counts(data)
    kinds = {k: "rec" if n > 20 else "cls" for k, n in sizes.items()}  # rec: more than top_k + 15 classes
    assert kinds == {1: "rec", 2: "rec", 3: "cls"}
    for stage in (1, 2, 3):
        _check_metrics_file(metrics[stage], stage, kinds)
        checkpoint = load_checkpoint(str(out / f"task{stage}.t7"))
        assert checkpoint["stage"] == stage
        assert len(checkpoint["tasks"]) == stage
        assert checkpoint["model_config"]["task_classes"] == [sizes[k] for k in range(1, stage + 1)]
    index_text = (out / "index.csv").read_text().splitlines()
    assert index_text[:3] == ["item,index", "<UNK>,0", "0,1"]        # ragged task 1: padding "0" is item 1
    assert read_index(str(out / "index.csv")).size == sizes[1]


def _class_counts(data):
    """Class counts with <UNK>, from the files: task 1 = distinct tokens + padding "0" + <UNK>."""
    tokens1 = {int(t) for line in data.task1.read_text().split() for t in line.split(",")}
    counts = {1: len(tokens1 | {0}) + 1}
    for k, path in ((2, data.task2), (3, data.task3)):
        targets = {int(t) for line in path.read_text().split() for t in line.split(",,")[1].split(",")}
        counts[k] = len(targets) + 1
    return counts


def _test_rows(n, seed=10):
    """The SPEC split, written inline: test = perm[dv:]."""
    np.random.seed(seed)
    perm = np.random.permutation(n)
    dev = -int(0.2 * n)
    return perm[int(dev * 0.75):]


@pytest.mark.slow
def test_every_task_learns_above_chance(long_run):
    data, _, metrics = long_run
    sizes = _class_counts(data)
    n_items, n_rec, n_cls = sizes[1], sizes[2], sizes[3]
    task1 = metrics[1]["tasks"]["1"]["test"]
    task2 = metrics[2]["tasks"]["2"]["test"]
    task3 = metrics[3]["tasks"]["3"]["test"]
    # random ranking: hit@k = k / n
    assert task1["hit@5"] > 2.5 * 5 / n_items, f"task 1 did not learn: {task1}"
    assert task1["hit@20"] > 20 / n_items + 0.2, f"task 1 did not learn: {task1}"
    assert task2["hit@5"] > 2.5 * 5 / n_rec, f"task 2 did not learn: {task2}"
    assert task2["hit@20"] > 20 / n_rec + 0.1, f"task 2 did not learn: {task2}"
    # task 3 (one target per line): beat both 1.5/n_classes and the majority class of its test split
    labels = data.steps[_test_rows(data.n_users)]
    majority = np.bincount(labels).max() / labels.size
    assert task3["acc"] > max(1.5 / n_cls, majority + 0.15), f"task 3 did not learn: {task3} (majority {majority:.3f})"


def test_evaluate_cli_reproduces_metrics(long_run, repo_root, subprocess_env):
    data, out, metrics = long_run
    target = out / "eval_task1.json"
    run_script(repo_root, subprocess_env, "evaluate.py", "--paths", out / "task2.t7", "--task", 1,
               "--datapath", data.task1, "--datapath_index", out / "index.csv", "--device", "cpu",
               "--json", target)
    result = json.loads(target.read_text())
    expected = metrics[2]["tasks"]["1"]
    assert result["kind"] == expected["kind"] == "rec"
    assert set(result["test"]) == set(expected["test"])
    for name, value in expected["test"].items():
        assert result["test"][name] == pytest.approx(value, abs=1e-6), name


def test_evaluate_valid_split_is_what_training_selected_on(long_run, repo_root, subprocess_env):
    """--split valid rescores the validation rows: for a stage's own task it equals the validation scores the
    stage recorded at its best epoch (checkpoint["valid"]), and differs from the test split's."""
    data, out, metrics = long_run
    target = out / "eval_valid_task2.json"
    run_script(repo_root, subprocess_env, "evaluate.py", "--paths", out / "task2.t7", "--task", 2,
               "--datapath", data.task2, "--datapath_index", out / "index.csv", "--device", "cpu",
               "--split", "valid", "--json", target)
    from continual.methods.checkpoints import load_checkpoint

    result = json.loads(target.read_text())
    stored = load_checkpoint(str(out / "task2.t7"))["valid"]
    assert "test" not in result and set(result["valid"]) == set(stored)
    for name, value in stored.items():
        assert result["valid"][name] == pytest.approx(value, abs=1e-6), name
    assert result["n_valid"] < metrics[2]["tasks"]["2"]["n_test"]
    assert all("valid" in entry for entry in result["baseline"].values())


def test_evaluate_kept_from_is_the_share_of_the_stages_scores(long_run, repo_root, subprocess_env):
    """--kept_from: task 2's MRR@5 under its own stage's checkpoint and under stage 3's, on the same test users, as
    the two stages' metrics.json recorded them; the share is their ratio and lies inside its interval."""
    data, out, metrics = long_run
    target = out / "kept_task2.json"
    run_script(repo_root, subprocess_env, "evaluate.py", "--paths", out / "task3.t7", "--task", 2,
               "--kept_from", out / "task2.t7", "--datapath", data.task2, "--datapath_index", out / "index.csv",
               "--device", "cpu", "--json", target)
    kept = json.loads(target.read_text())["kept"]
    earlier, later = (metrics[stage]["tasks"]["2"]["test"]["mrr@5"] for stage in (2, 3))
    assert kept["metric"] == "mrr@5" and kept["n_test_users"] == metrics[3]["tasks"]["2"]["n_test_users"]
    assert kept["earlier"] == pytest.approx(earlier, abs=1e-6) and kept["later"] == pytest.approx(later, abs=1e-6)
    assert kept["share"] == pytest.approx(later / earlier, rel=1e-5)
    assert kept["ci95"][0] < kept["share"] < kept["ci95"][1]


def test_forgetting_matrix_csv(long_run, repo_root, subprocess_env):
    _, out, metrics = long_run
    target = out / "m.csv"
    files = [out / "task3.metrics.json", out / "task1.metrics.json", out / "task2.metrics.json"]  # any order
    done = run_script(repo_root, subprocess_env, "evaluate.py", "--matrix", *files, "--csv", target)
    rows = list(csv.reader(target.read_text().splitlines()))
    assert rows[0][:4] == ["stage", "task1", "task2", "task3"]
    assert rows[0][4:10] == ["task1_lo", "task1_hi", "task1_baseline", "task1_baseline_name", "task1_above_baseline",
                             "task1_ceiling"]
    assert [row[0] for row in rows[1:]] == ["1", "2", "3"]
    for stage, row in zip((1, 2, 3), rows[1:]):
        assert len(row) == 4 + 3 * 6
        for task in range(1, stage + 1):
            entry = metrics[stage]["tasks"][str(task)]
            evidence = dict(zip(rows[0], row))
            name = entry["vs_baseline"]["metric"]
            assert float(evidence[f"task{task}_lo"]) == pytest.approx(entry["ci95"][name][0], abs=6e-5)
            assert evidence[f"task{task}_baseline_name"] == entry["vs_baseline"]["baseline"]
            assert evidence[f"task{task}_above_baseline"] == str(int(entry["vs_baseline"]["above"]))
        for task in (1, 2, 3):
            cell = row[task]
            if task > stage:
                assert cell == "", f"stage {stage} has no task {task}"
                continue
            entry = metrics[stage]["tasks"][str(task)]
            headline = entry["test"]["mrr@5"] if entry["kind"] == "rec" else entry["test"]["acc"]
            name = "mrr@5" if entry["kind"] == "rec" else "acc"
            others = {k: round(v, 4) for k, v in entry["test"].items()}
            assert float(cell) == pytest.approx(headline, abs=6e-5), (
                f"stage {stage} task {task}: matrix cell {cell} is not the task's {name} {headline:.4f} "
                f"(the matrix title says MRR@5 for rec tasks; all metrics: {others})")
    assert "task3" in done.stdout


def test_run_all_installs_unless_every_pin_is_met(tmp_path, repo_root, subprocess_env):
    """run_all.sh's check (its heredoc PINS) passes with requirements.txt as installed here and fails when a
    pin differs or a package is missing, so a fresh machine gets the versions the README was measured with."""
    script = (repo_root / "run_all.sh").read_text()
    check = script.split("<<'PINS'\n", 1)[1].split("\nPINS\n", 1)[0]
    pins = (repo_root / "requirements.txt").read_text()
    cases = {"as pinned": (pins, 0), "other numpy": (re.sub(r"numpy==\S+", "numpy==0.0.1", pins), 1),
             "missing package": (pins + "no-such-package-teracon==1.0\n", 1)}
    for name, (text, expected) in cases.items():
        (tmp_path / "requirements.txt").write_text(text)
        done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=subprocess_env,
                              capture_output=True, text=True)
        assert done.returncode == expected, (name, done.stderr[-500:])


@pytest.mark.slow
@pytest.mark.parametrize("dataset, lookup_fails", [("synth", False), ("ttl", False), ("synth", True)])
def test_run_all_gives_each_stage_the_datasets_flags_or_stops(tmp_path, repo_root, subprocess_env, dataset,
                                                              lookup_fails):
    """run_all.sh under a stand-in python that only records its commands (the flag lookup runs for real): every stage
    gets `python -m continual.datasets DATASET STAGE`'s flags (none for ttl), and a failed lookup stops the run
    before any stage rather than training with no flags."""
    log = tmp_path / "commands.log"
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/usr/bin/env bash\necho "$*" >> "$COMMANDS"\n'
                        'if [ "$1" = -m ]; then [ "$FAIL_LOOKUP" = 1 ] && exit 3; exec "$REAL_PYTHON" "$@"; fi\n')
    stand_in.chmod(0o755)
    env = {**subprocess_env, "PYTHON": str(stand_in), "COMMANDS": str(log), "REAL_PYTHON": sys.executable,
           "FAIL_LOOKUP": "1" if lookup_fails else "0"}
    done = subprocess.run(["bash", str(repo_root / "run_all.sh"), dataset, "--seed", "3"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    commands = log.read_text().splitlines()
    stages = [line for line in commands if line.startswith(("train_task1.py", "train_teracon_t"))]
    if lookup_fails:
        assert done.returncode != 0 and stages == []
        return
    assert done.returncode == 0, done.stderr[-1000:]
    assert len(stages) == 6
    for stage, line in enumerate(stages, 1):
        expected = datasets.stage_flags(dataset, stage)
        assert line.split() == [line.split()[0], "--dataset", dataset, "--overwrite", *expected, "--seed", "3"], line
