"""Bad input ends in one clear line naming the file; nothing earlier is lost; runs are reproducible."""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from continual.training.history import read_history
from utils import DataError

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
@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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

@pytest.mark.slow
def test_kill_midway_keeps_earlier_and_partial_checkpoints(trained, tmp_path):
    """A kill during stage 2 leaves stage 1 intact and stage 2's best-so-far loadable; --resume continues."""
    from continual.methods.checkpoints import load_checkpoint
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
    assert process.returncode == 143 and "Traceback" not in stderr, stderr
    assert re.search(r"stopped: SIGTERM: stage 2 stopped after (step \d+ of )?epoch \d+", stderr), stderr
    assert digest(trained["folder"]) == before
    partial = load_checkpoint(save + ".t7")
    assert partial["stage"] == 2 and partial["finished"] is False        # the best so far, not the stage's
    NextItNet.from_checkpoint(partial)
    NextItNet.from_checkpoint(load_checkpoint(trained["task1"]))
    resumed = subprocess.run(base + ["--epochs", "3", "--resume"], capture_output=True, text=True, cwd=REPO, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resuming stage 2 (in|after) epoch", resumed.stdout)    # where SIGTERM stopped it
    metrics = json.load(open(save + ".metrics.json"))
    assert set(metrics["tasks"]) == {"1", "2"}
    assert not os.path.exists(save + ".resume.t7")


# ------------------------------------------------------------------ determinism

@pytest.mark.slow
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


@pytest.mark.slow
def test_stage_without_finite_loss_fails_and_saves_nothing(tmp_path):
    files = synthetic(str(tmp_path))
    result = stage1(files, "--L2", "1e300")  # finite, but L2 · mean mask overflows float32: every loss is inf
    assert_clean_error(result, "t1.csv", "no finite loss")
    assert not os.path.exists(tmp_path / "task1.t7")
    assert "skipped" in result.stdout


# ------------------------------------------------------------------ faults: a full disk, a rerun, an unfinished stage

class FullDisk:
    """A file whose writes fail with ENOSPC once `limit` bytes are written: a file system that fills up."""

    def __init__(self, stream, limit: int):
        self.stream, self.limit, self.written = stream, limit, 0

    def write(self, data) -> int:
        self.written += len(data)
        if self.written > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stream.close()


def fill_disk_for(monkeypatch, name: str, limit: int = 100) -> None:
    """The atomic write of every file called `name` fails with ENOSPC after `limit` bytes (utils.atomic_file writes
    to the temporary `.<name>.<random>.tmp` beside it, opened with os.fdopen)."""
    real = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        stream = real(fd, mode, *args, **kwargs)
        temporary = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        target = temporary[1:].rsplit(".", 2)[0] if temporary.endswith(".tmp") else None
        return FullDisk(stream, limit) if "w" in mode and target == name else stream
    monkeypatch.setattr(os, "fdopen", fdopen)


def cli_run(argv_main, capsys) -> tuple[int, str]:
    import utils
    with pytest.raises(SystemExit) as info:
        utils.cli(argv_main)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("suffix, stage", [("task2.t7", 2), ("task2.resume.t7", 2), ("task2.metrics.json", 2),
                                           ("index.csv", 1), ("task1.t7", 1)])
def test_a_full_disk_ends_in_one_line_and_replaces_nothing(trained, tmp_path, monkeypatch, capsys, suffix, stage):
    """No space left while a checkpoint, the resume file, metrics.json or the index is written: one line naming the
    file and the cause, a non-zero exit, no partial or temporary file, and every earlier file as it was."""
    from continual.training import loop
    folder = tmp_path / "run"
    folder.mkdir()
    index = str(folder / "index.csv") if stage == 1 else trained["index"]
    before = digest(trained["folder"])
    fill_disk_for(monkeypatch, suffix)
    if stage == 1:
        argv = ["--datapath", trained["t1"], "--savepath", str(folder / "task1"), "--datapath_index", index, *TINY]
    else:
        argv = ["--datapath", trained["t2"], "--paths", trained["task1"], "--savepath", str(folder / "task2"),
                "--datapath_index", index, "--batch", "16", *TINY]
    code, stderr = cli_run(lambda: loop.main(stage, argv), capsys)
    assert code != 0 and "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and suffix in lines[0] and "No space left on device" in lines[0], stderr
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp") or name.startswith(".")]
    assert not os.path.exists(folder / suffix)
    assert digest(trained["folder"]) == before


def test_overwrite_removes_the_earlier_runs_metrics_once_it_replaces_the_checkpoint(trained, tmp_path, monkeypatch,
                                                                                    capsys):
    """Stopped in its second epoch (after its first best model), an --overwrite run leaves its own unfinished
    checkpoint and no metrics of the model it replaced (compare.py would take them as this checkpoint's)."""
    import utils
    from continual.methods.checkpoints import load_checkpoint
    from continual.training import loop
    save = str(tmp_path / "task2")
    common = ["--datapath", trained["t2"], "--paths", trained["task1"], "--datapath_index", trained["index"],
              "--batch", "8", "--epochs", "2", "--channels", "8", "--device", "cpu", "--savepath", save]
    loop.main(2, common)
    assert os.path.isfile(save + ".metrics.json") and os.path.isfile(save + ".resources.json")
    original, calls = loop.train_step, [0]

    def noting(*args, **kwargs):
        calls[0] += 1
        utils._SIGTERM["received"] = calls[0] == 7                      # step 1 of epoch 1 (6 steps an epoch)
        return original(*args, **kwargs)
    monkeypatch.setattr(loop, "train_step", noting)
    code, stderr = cli_run(lambda: loop.main(2, [*common, "--overwrite", "--seed", "5"]), capsys)
    assert code == 143 and "stopped: SIGTERM" in stderr, stderr
    assert load_checkpoint(save + ".t7")["finished"] is False
    assert not os.path.exists(save + ".metrics.json") and not os.path.exists(save + ".resources.json")


def test_a_stage_stopped_while_it_scores_is_not_marked_finished(trained, tmp_path, monkeypatch, capsys):
    """The checkpoint is marked finished only after every task is scored: an interrupt while scoring leaves it
    unfinished (the next stage refuses it) and writes no metrics.json."""
    from continual.methods.checkpoints import load_checkpoint
    from continual.training import loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "evaluate_tasks", interrupted)
    save = str(tmp_path / "task2")
    code, stderr = cli_run(lambda: loop.main(2, ["--datapath", trained["t2"], "--paths", trained["task1"],
                                                 "--datapath_index", trained["index"], "--epochs", "1", "--channels",
                                                 "8", "--device", "cpu", "--savepath", save]), capsys)
    assert code == 130 and "marked unfinished" in stderr, stderr
    assert load_checkpoint(save + ".t7")["finished"] is False and not os.path.exists(save + ".metrics.json")


@pytest.mark.slow
def test_a_finished_stage_is_not_trained_again_without_overwrite(trained, tmp_path):
    save = str(tmp_path / "task2")
    assert stage2({**trained, "folder": str(tmp_path)}, trained["task1"]).returncode == 0
    before = digest(str(tmp_path))
    again = stage2({**trained, "folder": str(tmp_path)}, trained["task1"])
    assert_clean_error(again, "task2.t7", "finished there already", "--overwrite")
    assert digest(str(tmp_path)) == before
    replaced = stage2({**trained, "folder": str(tmp_path)}, trained["task1"], "--overwrite", "--seed", "5")
    assert replaced.returncode == 0, replaced.stderr
    assert open(save + ".t7", "rb").read() != before["task2.t7"]


@pytest.mark.slow
def test_the_next_stage_refuses_an_unfinished_stage_naming_resume(trained, tmp_path):
    """The best model so far, written while a stage trains, is marked unfinished: the next stage (and --expert)
    refuse it in one line naming --resume; evaluate.py still reads it."""
    from continual.methods.checkpoints import load_checkpoint
    from utils import atomic_torch_save
    checkpoint = load_checkpoint(trained["task1"])
    checkpoint["finished"] = False
    partial = str(tmp_path / "partial1.t7")
    atomic_torch_save(checkpoint, partial)
    result = stage2({**trained, "folder": str(tmp_path)}, partial)
    assert_clean_error(result, "partial1.t7", "did not finish", "--resume")
    assert not os.path.exists(tmp_path / "task2.t7")
    scored = run("evaluate.py", "--paths", partial, "--task", "1", "--datapath_index", trained["index"])
    assert scored.returncode == 0, scored.stderr
    from continual.methods.teracon import load_expert
    with pytest.raises(DataError, match=r"partial1\.t7: --expert: stage 1 did not finish there .* --resume"):
        load_expert(partial, None)                                      # refused before the stage is looked at


def test_a_stage_checkpoint_is_final_only_when_the_stage_is(trained, tmp_path):
    from continual.methods.checkpoints import is_finished, load_checkpoint
    assert is_finished(load_checkpoint(trained["task1"]))
    legacy = load_checkpoint(trained["task1"])
    legacy.pop("finished")
    assert is_finished(legacy) and is_finished(legacy, trained["task1"][:-3])
    assert not is_finished(legacy, str(tmp_path / "no_metrics"))


@pytest.mark.parametrize("method", ["sinmo", "fineall", "peterrec", "piggyback"])
def test_isolation_refuses_a_stage1_with_masks(trained, tmp_path, method):
    """The default stage 1 has TERACON's masks, which these methods would read away: refused, naming the stage 1
    they need."""
    result = stage2({**trained, "folder": str(tmp_path)}, trained["task1"], "--method", method)
    assert_clean_error(result, "task1.t7", "stage 1 with task masks", "train_task1.py --method finetune")
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------ preemption: SIGTERM stops at a step, resumably

def preempted_then_resumed(tmp_path, trained, monkeypatch, capsys, method: list[str], stop_after: int) -> tuple:
    """Stage 2 run through the scripts' entry point: once uninterrupted, once stopped by a SIGTERM noted after step
    `stop_after` and resumed → (the two metrics.json as bytes, the stop's stderr)."""
    import utils
    from continual.training import loop
    common = ["--datapath", trained["t2"], "--paths", trained["task1"], "--datapath_index", trained["index"],
              "--batch", "8", "--epochs", "3", "--patience", "9", "--channels", "8", "--device", "cpu", *method]
    loop.main(2, [*common, "--savepath", str(tmp_path / "whole")])
    original, calls = loop.train_step, [0]

    def noting(*args, **kwargs):
        calls[0] += 1
        if calls[0] == stop_after:
            utils._SIGTERM["received"] = True                       # what the handler does on SIGTERM
        return original(*args, **kwargs)
    monkeypatch.setattr(loop, "train_step", noting)
    code, stderr = cli_run(lambda: loop.main(2, [*common, "--savepath", str(tmp_path / "cut")]), capsys)
    monkeypatch.setattr(loop, "train_step", original)
    assert code == 143 and os.path.isfile(tmp_path / "cut.resume.t7"), stderr
    loop.main(2, [*common, "--savepath", str(tmp_path / "cut"), "--resume"])
    return (tmp_path / "whole.metrics.json").read_bytes(), (tmp_path / "cut.metrics.json").read_bytes(), stderr


@pytest.mark.parametrize("method", [["--method", "finetune"], []])
def test_sigterm_stops_at_a_step_and_resume_reaches_the_uninterrupted_metrics(trained, tmp_path, monkeypatch, capsys,
                                                                             method):
    """Fine-tuning and TERACON's paper rule, stopped after step 11 (in epoch 1 of 3, 48 training rows in batches of
    8): the resumed stage's metrics.json is the uninterrupted one, byte for byte."""
    whole, resumed, stderr = preempted_then_resumed(tmp_path, trained, monkeypatch, capsys, method, 11)
    assert "stopped: SIGTERM: stage 2 stopped after step 5 of epoch 1" in stderr and "--resume" in stderr
    assert resumed == whole
    histories = [[{k: v for k, v in row.items() if not k.endswith("seconds")}
                  for row in read_history(str(tmp_path / f"{name}.history.csv"))] for name in ("whole", "cut")]
    assert histories[0] == histories[1] and [row["epoch"] for row in histories[0]] == ["0", "1", "2"]


def test_the_history_holds_the_printed_epochs(trained, tmp_path, capsys):
    """<savepath>.history.csv: a row per epoch with the loss, retention, skipped steps, validation metrics and new
    bests the stage printed."""
    from continual.training import loop
    loop.main(2, ["--datapath", trained["t2"], "--paths", trained["task1"], "--datapath_index", trained["index"],
                  "--batch", "8", "--epochs", "3", "--patience", "9", "--channels", "8", "--device", "cpu",
                  "--savepath", str(tmp_path / "t2")])
    pattern = r"epoch (\d+): loss (\S+) retention (\S+) skipped (\d+) \| valid (.*?) \| train .*?s, all .*?s( \*)?$"
    printed = [re.match(pattern, line) for line in capsys.readouterr().out.splitlines()
               if line.startswith("epoch ") and ": loss" in line]
    rows = read_history(str(tmp_path / "t2.history.csv"))
    assert len(rows) == len(printed) == 3 and all(printed)
    for row, match in zip(rows, printed):
        epoch, loss, retention, skipped, valid, best = match.groups()
        assert (row["epoch"], f"{float(row['loss']):.4f}", f"{float(row['retention']):.3g}", row["skipped"]) == (
            epoch, loss, retention, skipped)
        assert row["best"] == ("1" if best else "0")
        for name, value in (pair.split("=") for pair in valid.split()):
            assert f"{float(row['valid_' + name]):.4f}" == value
        assert float(row["seconds"]) >= float(row["train_seconds"]) > 0


def test_tensorboard_without_its_package_is_refused_in_one_line(trained, tmp_path, monkeypatch):
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    result = stage2({**trained, "folder": str(tmp_path)}, trained["task1"], "--tensorboard", str(tmp_path / "tb"))
    assert_clean_error(result, "--tensorboard", "pip install tensorboard")
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_sigterm_resume_with_kept_frozen_outputs_is_the_run_to_float_rounding(trained, tmp_path, monkeypatch,
                                                                             capsys):
    """The recommended rule's frozen outputs (--frozen_cache_mib) are rebuilt after a resume, from other batches:
    the same metrics to float rounding."""
    expert = str(tmp_path / "expert")
    assert stage2({**trained, "folder": str(tmp_path)}, trained["task1"], "--method", "finetune", "--batch", "8",
                  "--epochs", "3", "--patience", "9").returncode == 0
    os.replace(tmp_path / "task2.t7", expert + ".t7")
    whole, resumed, _ = preempted_then_resumed(
        tmp_path, trained, monkeypatch, capsys, ["--preset", "recommended", "--expert", expert + ".t7"], 11)
    first, second = json.loads(whole), json.loads(resumed)
    for task, entry in first["tasks"].items():
        for metric, value in entry["test"].items():
            assert second["tasks"][task]["test"][metric] == pytest.approx(value, abs=1e-6), (task, metric)


def test_sigterm_within_a_max_steps_budget_resumes_to_the_same_steps_and_metrics(trained, tmp_path, monkeypatch,
                                                                                 capsys):
    """--max_steps 9, stopped after step 7 (epoch 1): the resumed stage takes the 2 steps left, not 9 more, and
    records 9 steps, as the uninterrupted run does."""
    whole, resumed, _ = preempted_then_resumed(tmp_path, trained, monkeypatch, capsys, ["--max_steps", "9"], 7)
    assert resumed == whole and json.loads(resumed)["limits"]["steps"] == 9


def resume_for(tmp_path, max_steps: int = 0):
    from continual.training import loop
    from model import ModelConfig, NextItNet
    run = SimpleNamespace(savepath=str(tmp_path / "stage"), stage=2, resume=True, patience=3, epochs=4,
                          max_steps=max_steps)
    model = NextItNet(ModelConfig(n_items=10, task_classes=[10], channels=8))
    optimizer = torch.optim.Adam(model.parameters())
    return loop.Resume(run, model, optimizer, np.random.default_rng(0), None, 0, [0])


def test_a_resume_within_an_epoch_gives_each_rank_its_own_rows(tmp_path, monkeypatch):
    """Under torchrun each rank's rows of the stopped epoch are saved, and each rank resumes with its own; on another
    number of processes the file is refused in one line."""
    from continual import distributed
    parts = [{"batch": 3, "shards": [(np.array([rank, rank + 2]), 0.5, 4)], "stats": {"loss": float(rank)}}
             for rank in (0, 1)]
    resume_for(tmp_path).save(1, 0.5, 0, parts)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    best, misses, epoch, within = resume_for(tmp_path).restore()
    assert (best, misses, epoch, within["batch"], within["stats"]) == (0.5, 0, 1, 3, {"loss": 1.0})
    assert within["shards"][0][0].tolist() == [1, 3]
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    with pytest.raises(DataError, match=r"stage.resume.t7: stopped within an epoch on 2 process\(es\)"):
        resume_for(tmp_path).restore()


def test_a_resume_after_the_budget_ran_out_finishes_without_training(tmp_path):
    resume = resume_for(tmp_path, max_steps=5)
    resume.steps[0] = 5
    resume.save(2, 0.25, 1)
    restored = resume_for(tmp_path, max_steps=5)
    assert restored.restore() == (0.25, 3, 4, None) and restored.steps == [5]   # misses = patience, start = epochs


def test_a_sigterm_noted_after_the_loops_last_look_is_not_dropped():
    import utils
    with pytest.raises(KeyboardInterrupt):
        with utils.stop_at_a_step():
            utils._SIGTERM["received"] = True
    with utils.stop_at_a_step():
        pass


def test_compare_names_its_log_when_the_disk_is_full(tmp_path, monkeypatch):
    import compare

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(compare, "open", full, raising=False)
    with pytest.raises(DataError, match=r"s/task2\.log: could not be written: No space left on device"):
        compare.run_stage([sys.executable, "-c", "pass"], str(tmp_path / "s" / "task2"), "seed 0 stage 2")


def test_tensorboard_writes_the_history_as_scalars(trained, tmp_path):
    """With the optional package: the stage's history rows as TensorBoard scalars under DIR/<savepath's name>."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    result = stage2({**trained, "folder": str(tmp_path)}, trained["task1"], "--tensorboard", str(tmp_path / "tb"),
                    "--epochs", "2")
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(tmp_path / "tb" / "task2"))
    events.Reload()
    rows = read_history(str(tmp_path / "task2.history.csv"))
    loss = events.Scalars("loss")
    assert [event.step for event in loss] == [0, 1] and len(rows) == 2
    assert [round(event.value, 5) for event in loss] == [round(float(row["loss"]), 5) for row in rows]
    assert "valid_acc" in events.Tags()["scalars"]
