"""Bad input ends in one clear line naming the file; nothing earlier is lost; runs are reproducible."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--epochs", "1", "--channels", "8", "--device", "cpu"]


def write_lines(path: str, lines: list[str]) -> str:
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def synthetic(folder: str, users: int = 60, length: int = 8, seed: int = 0) -> dict[str, str]:
    """A task-1 file and a task-2 file over the same users."""
    rng = np.random.default_rng(seed)
    sequences = rng.integers(1, 30, size=(users, length))
    task1 = write_lines(os.path.join(folder, "t1.csv"), [",".join(map(str, row)) for row in sequences])
    task2 = write_lines(os.path.join(folder, "t2.csv"),
                        [",".join(map(str, row)) + ",," + str(int(row[-1]) % 3 + 1) for row in sequences])
    return {"t1": task1, "t2": task2, "index": os.path.join(folder, "index.csv"), "folder": folder}


def run(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def stage1(files: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    return run("train_task1.py", "--datapath", files["t1"], "--datapath_index", files["index"],
               "--savepath", os.path.join(files["folder"], "task1"), *TINY, *extra)


def stage2(files: dict[str, str], paths: str, *extra: str) -> subprocess.CompletedProcess:
    return run("train_teracon_t2.py", "--datapath", files["t2"], "--datapath_index", files["index"],
               "--paths", paths, "--savepath", os.path.join(files["folder"], "task2"), "--batch", "16", *TINY, *extra)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Non-zero exit, no traceback, one `error:` line that names what it must name."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, str]:
    files = synthetic(str(tmp_path_factory.mktemp("trained")))
    result = stage1(files)
    assert result.returncode == 0, result.stderr
    files["task1"] = os.path.join(files["folder"], "task1.t7")
    return files


def digest(folder: str) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


# ------------------------------------------------------------------ task-1 data

@pytest.mark.parametrize("content, fragments", [
    (None, ["missing.csv", "not found"]),
    ([""], ["empty"]),
    (["1,2,3", "4,x5,6"], ["bad.csv:2", "non-integer token 'x5'"]),
    (["1,2,3", "4,,6"], ["bad.csv:2", "empty token"]),
    (["1,2,3", "4,5,6"], ["bad.csv", "too few"]),
])
def test_bad_task1_file(tmp_path, content, fragments):
    path = str(tmp_path / ("missing.csv" if content is None else "bad.csv"))
    if content is not None:
        write_lines(path, content)
    result = run("train_task1.py", "--datapath", path, "--datapath_index", str(tmp_path / "index.csv"),
                 "--savepath", str(tmp_path / "task1"), *TINY)
    assert_clean_error(result, *fragments)
    assert not os.path.exists(tmp_path / "task1.t7")


# ------------------------------------------------------------------ task-k data

@pytest.mark.parametrize("lines, fragments", [
    (["1,2,3,,4", "1,2,3;4"], ["bad.csv:2", "non-integer"]),
    (["1,2,3,,4", "1,2,3,4"], ["bad.csv:2", "no ',,' separator"]),
    (["1,2,3,,4", "1,2,3,,"], ["bad.csv:2", "no target"]),
    (["1,2,3,,4", ",,4"], ["bad.csv:2", "no source"]),
])
def test_bad_task_file(trained, tmp_path, lines, fragments):
    bad = write_lines(str(tmp_path / "bad.csv"), lines * 1)
    before = digest(trained["folder"])
    result = run("train_teracon_t2.py", "--datapath", bad, "--datapath_index", trained["index"],
                 "--paths", trained["task1"], "--savepath", str(tmp_path / "task2"), *TINY)
    assert_clean_error(result, *fragments)
    assert digest(trained["folder"]) == before


def test_task_file_too_small_to_split(trained, tmp_path):
    small = write_lines(str(tmp_path / "small.csv"), ["1,2,3,,4", "1,2,3,,5", "2,3,4,,4"])
    result = run("train_teracon_t2.py", "--datapath", small, "--datapath_index", trained["index"],
                 "--paths", trained["task1"], "--savepath", str(tmp_path / "task2"), *TINY)
    assert_clean_error(result, "small.csv", "too few")


def test_unknown_items_warn_once_and_run(trained, tmp_path):
    rows = open(trained["t2"]).read().splitlines()
    rows[0] = "999," + rows[0]
    rows[1] = "998," + rows[1]
    path = write_lines(str(tmp_path / "unknown.csv"), rows)
    result = run("train_teracon_t2.py", "--datapath", path, "--datapath_index", trained["index"],
                 "--paths", trained["task1"], "--savepath", str(tmp_path / "task2"), "--batch", "16", *TINY)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "not in the index" in line]
    assert len(warnings) == 1 and "unknown.csv" in warnings[0], result.stderr
    # both rows were left-padded, so the short rows' pads (item "0") are unknown too; two extra ids at least
    count = int(warnings[0].split(": ")[-1].split()[0])
    assert count >= 2


# ------------------------------------------------------------------ checkpoints and index

def test_missing_checkpoint(trained, tmp_path):
    result = stage2(trained, str(tmp_path / "nope.t7"))
    assert_clean_error(result, "nope.t7", "not found")


def test_truncated_checkpoint(trained, tmp_path):
    data = open(trained["task1"], "rb").read()
    broken = tmp_path / "broken.t7"
    broken.write_bytes(data[: len(data) // 2])
    result = stage2(trained, str(broken))
    assert_clean_error(result, "broken.t7", "not a readable checkpoint")


def test_wrong_stage_checkpoint(trained, tmp_path):
    result = run("train_teracon_t3.py", "--datapath", trained["t2"], "--datapath_index", trained["index"],
                 "--paths", trained["task1"], "--savepath", str(tmp_path / "task3"), *TINY)
    assert_clean_error(result, "task1.t7", "task 2's checkpoint", "train_teracon_t2.py")


def test_checkpoint_from_other_data(trained, tmp_path):
    other = synthetic(str(tmp_path), users=40, seed=5)
    write_lines(other["t1"], [",".join(str(v) for v in range(100 + u, 110 + u)) for u in range(40)])
    assert stage1(other).returncode == 0
    result = stage2(trained, os.path.join(str(tmp_path), "task1.t7"))
    assert_clean_error(result, "index.csv", "other data")


def test_index_that_is_not_an_index(trained, tmp_path):
    fake = write_lines(str(tmp_path / "index.csv"), ["hello,world"])
    result = run("train_teracon_t2.py", "--datapath", trained["t2"], "--datapath_index", fake,
                 "--paths", trained["task1"], "--savepath", str(tmp_path / "task2"), *TINY)
    assert_clean_error(result, "index.csv", "not an item index")


def test_stage_never_overwrites_earlier_checkpoint(trained, tmp_path):
    before = digest(trained["folder"])
    result = run("train_teracon_t2.py", "--datapath", trained["t2"], "--datapath_index", trained["index"],
                 "--paths", trained["task1"], "--savepath", os.path.join(trained["folder"], "task1"), *TINY)
    assert_clean_error(result, "task1.t7")
    assert digest(trained["folder"]) == before


def test_index_from_other_data_is_not_overwritten(trained, tmp_path):
    other = synthetic(str(tmp_path), seed=7)
    write_lines(other["t1"], [",".join(str(v) for v in range(200 + u, 210 + u)) for u in range(60)])
    before = open(trained["index"], "rb").read()
    result = run("train_task1.py", "--datapath", other["t1"], "--datapath_index", trained["index"],
                 "--savepath", str(tmp_path / "task1"), *TINY)
    assert_clean_error(result, "index.csv", "other data")
    assert open(trained["index"], "rb").read() == before


def test_checkpoints_load_weights_only(trained):
    checkpoint = torch.load(trained["task1"], map_location="cpu", weights_only=True)
    assert checkpoint["stage"] == 1 and checkpoint["run_config"]["seed"] == 0  # the revised variant's default
    assert checkpoint["tasks"][0]["datapath"] == trained["t1"]


# ------------------------------------------------------------------ interruption and resume

def test_kill_midway_keeps_earlier_and_partial_checkpoints(trained, tmp_path):
    """A kill during stage 2 leaves stage 1 intact and stage 2's best-so-far loadable; --resume continues."""
    from continual.checkpoints import load_checkpoint
    from model import NextItNet

    big = synthetic(str(tmp_path), users=1500, length=8, seed=1)
    # reuse the trained stage-1 model and its index: the task-2 file must use the same items
    rows = open(trained["t2"]).read().splitlines()
    write_lines(big["t2"], rows * 25)
    before = digest(trained["folder"])
    save = str(tmp_path / "task2")
    base = [sys.executable, os.path.join(REPO, "train_teracon_t2.py"), "--datapath", big["t2"],
            "--datapath_index", trained["index"], "--paths", trained["task1"], "--savepath", save,
            "--patience", "50", "--device", "cpu", "--batch", "32"]
    process = subprocess.Popen(base + ["--epochs", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 120
    while not os.path.exists(save + ".resume.t7") and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and "Traceback" not in stderr, stderr
    assert digest(trained["folder"]) == before
    partial = load_checkpoint(save + ".t7")
    assert partial["stage"] == 2
    NextItNet.from_checkpoint(partial)
    NextItNet.from_checkpoint(load_checkpoint(trained["task1"]))
    resumed = subprocess.run(base + ["--epochs", "3", "--resume"], capture_output=True, text=True, cwd=REPO, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming stage 2 after epoch" in resumed.stdout
    metrics = json.load(open(save + ".metrics.json"))
    assert set(metrics["tasks"]) == {"1", "2"}
    assert not os.path.exists(save + ".resume.t7")


# ------------------------------------------------------------------ determinism

def test_same_seed_gives_identical_metrics(tmp_path):
    outputs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        files = synthetic(str(folder))
        assert stage1(files, "--seed", "3").returncode == 0
        result = stage2(files, os.path.join(str(folder), "task1.t7"), "--seed", "3")
        assert result.returncode == 0, result.stderr
        outputs.append([(folder / f"task{k}.metrics.json").read_bytes() for k in (1, 2)])
    assert outputs[0] == outputs[1]


def test_stage_without_finite_loss_fails_and_saves_nothing(tmp_path):
    files = synthetic(str(tmp_path))
    result = stage1(files, "--L2", "1e300")  # finite, but L2 · mean mask overflows float32: every loss is inf
    assert_clean_error(result, "t1.csv", "no finite loss")
    assert not os.path.exists(tmp_path / "task1.t7")
    assert "skipped" in result.stdout
