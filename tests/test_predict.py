"""predict.py: predictions equal evaluate.py's, vectors equal the model's hidden state, and bad input is one line.

One tiny chain (task 1 → 2 rec → 3 cls, one epoch each, in-process) on conftest's synthetic data; predict.py
runs in-process through utils.cli (one run as a subprocess, as a user runs it).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

TOP_ALL = 10_000  # more than any head's classes: the full ranking


@pytest.fixture(scope="module")
def chain(tmp_path_factory, data_writer):
    """task1.t7 → task2.t7 (rec, 41 classes) → task3.t7 (cls, steps 1..3); a tasks.json names task 3's labels."""
    from continual.training import loop

    root = tmp_path_factory.mktemp("predict")
    data = data_writer(root / "data", n_users=300, seed=3)
    out = root / "out"
    common = ["--epochs", "1", "--channels", "16", "--device", "cpu", "--datapath_index", str(out / "index.csv")]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop.main(1, ["--datapath", str(data.task1), "--savepath", str(out / "task1"), "--batch", "32", *common])
        for k, path in ((2, data.task2), (3, data.task3)):
            loop.main(k, ["--datapath", str(path), "--paths", str(out / f"task{k - 1}.t7"),
                             "--savepath", str(out / f"task{k}"), "--batch", "64", *common])
    names = {"tasks": [{"file": "task3.csv", "name": "step"}], "label_maps": {"step": {"one": 1, "two": 2, "three": 3}}}
    (root / "data" / "tasks.json").write_text(json.dumps(names))
    return data, out


@pytest.fixture(scope="module")
def loaded(chain):
    """(model, index, smax) of the stage-3 checkpoint."""
    from continual.methods.checkpoints import load_checkpoint
    from data_loader import read_index
    from model import NextItNet

    _, out = chain
    checkpoint = load_checkpoint(str(out / "task3.t7"))
    return NextItNet.from_checkpoint(checkpoint).eval(), read_index(str(out / "index.csv")), checkpoint["run_config"]["smax"]


def run_predict(capsys, *args) -> tuple[int, str, str]:
    """predict.py in-process through utils.cli → (exit code, stdout, stderr)."""
    import predict
    from utils import cli

    handler = signal.getsignal(signal.SIGTERM)
    argv, sys.argv = sys.argv, ["predict.py", *map(str, args)]
    try:
        cli(predict.main)
        code = 0
    except SystemExit as done:
        code = done.code
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, handler)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_users(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


def read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def task_split(chain, task: int) -> tuple[int, float]:
    """(seed, split_percentage) the stage-3 checkpoint records for `task`."""
    from continual.methods.checkpoints import load_checkpoint

    record = load_checkpoint(str(chain[1] / "task3.t7"))["tasks"][task - 1]
    return record["seed"], record["split_percentage"]


def evaluation_data(chain, loaded, task: int):
    """evaluate.py's view of a task: (TaskData, test rows, the raw source text of every example)."""
    from continual.evaluation.scoring import load_task_data
    from data_loader import split_indices

    data_files, _ = chain
    path = {1: data_files.task1, 2: data_files.task2, 3: data_files.task3}[task]
    data, _ = load_task_data(task, str(path), loaded[1])
    test = split_indices(len(data.targets), *task_split(chain, task))[2]
    lines = path.read_text().splitlines()
    sources = [line.rsplit(",", 1)[0] if task == 1 else line.split(",,")[0] for line in lines]
    return data, test, [sources[row] for row in data.rows(test)]


@torch.no_grad()
def reference_logits(loaded, task: int, inputs: np.ndarray) -> torch.Tensor:
    """What scoring.score computes: head `task` (0-based) on [n, L] inputs under its mask at smax."""
    model, _, smax = loaded
    return model(torch.from_numpy(np.ascontiguousarray(inputs)), task, smax)[0]


@pytest.mark.parametrize("task", [1, 2])
def test_rec_predictions_equal_evaluate(chain, loaded, capsys, tmp_path, task):
    from continual.evaluation.scoring import score

    model, index, smax = loaded
    data, test, sources = evaluation_data(chain, loaded, task)
    users = write_users(tmp_path / "users.csv", sources)
    out = tmp_path / "top.csv"
    code, _, err = run_predict(capsys, "--paths", chain[1] / "task3.t7", "--task", task, "--input", users,
                               "--top", TOP_ALL, "--out", out)
    assert code == 0, err
    rows = read_csv(out)
    n_classes = model.config.task_classes[task - 1]
    assert len(rows) == test.size * n_classes
    ranked = np.array([row["item"] for row in rows]).reshape(test.size, n_classes)           # [n, n_classes]
    assert [int(row["line"]) for row in rows[::n_classes]] == list(range(1, test.size + 1))   # input order
    assert all(row["rank"] == str(r % n_classes + 1) for r, row in enumerate(rows))

    logits = reference_logits(loaded, task - 1, data.sources[data.rows(test)])              # [n, n_classes]
    labels = (np.concatenate([["<UNK>"], index.keys.astype(str)]) if task == 1 else
              np.concatenate([["<UNK>"], data.target_keys.astype(str)]))
    expected = labels[torch.topk(logits, n_classes, sorted=True).indices.numpy()]
    assert (ranked == expected).all(), "the ranking differs from evaluate's (torch.topk of the same logits)"
    np.testing.assert_allclose([float(row["logit"]) for row in rows[::n_classes]], logits.max(1).values, rtol=1e-5)

    # the same ranks: the metrics computed from predict.py's lists are scoring.score's
    targets = labels[data.targets[test]]
    rank = np.array([list(ranked[i]).index(target) for i, target in enumerate(targets)])  # 0-based
    metrics = score(model, task - 1, data, test, "rec", smax, 256, torch.device("cpu"))
    assert np.mean(np.where(rank < 5, 1.0 / (rank + 1), 0.0)) == pytest.approx(metrics["mrr@5"], abs=1e-9)
    assert np.mean(rank < 20) == pytest.approx(metrics["hit@20"], abs=1e-9)
    assert np.mean(rank == 0) == pytest.approx(metrics["acc"], abs=1e-9)


def test_cls_predictions_equal_evaluate(chain, loaded, capsys, tmp_path):
    from continual.evaluation.scoring import score

    model, _, smax = loaded
    data, test, sources = evaluation_data(chain, loaded, 3)
    users = write_users(tmp_path / "users.csv", sources)
    out = tmp_path / "classes.csv"
    code, _, err = run_predict(capsys, "--paths", chain[1] / "task3.t7", "--task", 3, "--input", users, "--out", out)
    assert code == 0, err
    rows = read_csv(out)
    assert list(rows[0]) == ["line", "label", "name", "p_<UNK>", "p_1", "p_2", "p_3"]
    logits = reference_logits(loaded, 2, data.sources[data.rows(test)])                     # [n, 4]
    codes = logits.argmax(1).numpy()
    assert [row["label"] for row in rows] == [str(data.target_keys[c - 1]) for c in codes]   # raw labels
    assert [row["name"] for row in rows] == [{1: "one", 2: "two", 3: "three"}[int(row["label"])] for row in rows]
    probs = np.array([[float(row[f"p_{c}"]) for c in ("<UNK>", 1, 2, 3)] for row in rows])
    np.testing.assert_allclose(probs, torch.softmax(logits, 1).numpy(), atol=2e-6)
    accuracy = np.mean([row["label"] == str(data.target_keys[t - 1]) for row, t in zip(rows, data.targets[test])])
    assert accuracy == pytest.approx(score(model, 2, data, test, "cls", smax, 256, torch.device("cpu"))["acc"])


def test_embed_rows_equal_hidden_state_in_input_order(chain, loaded, capsys, tmp_path):
    model, index, smax = loaded
    _, _, sources = evaluation_data(chain, loaded, 3)
    order = np.random.default_rng(0).permutation(len(sources))[:40]
    lines = [sources[i] for i in order]
    users = write_users(tmp_path / "users.csv", lines[:20] + [""] + lines[20:])             # a blank line 21
    code, _, err = run_predict(capsys, "--paths", chain[1] / "task3.t7", "--task", 3, "--input", users, "--embed",
                               "--embed_task1", "--batch", 7, "--out", tmp_path / "v.npy")
    assert code == 0, err
    vectors = np.load(tmp_path / "v.npy")
    code, _, err = run_predict(capsys, "--paths", chain[1] / "task3.t7", "--task", 3, "--input", users, "--embed",
                               "--embed_task1", "--out", tmp_path / "v.csv")
    assert code == 0, err
    table = np.loadtxt(tmp_path / "v.csv", delimiter=",", skiprows=1, dtype=np.float64)
    assert table[:, 0].tolist() == list(range(1, 21)) + list(range(22, 42))               # file lines, in order
    np.testing.assert_array_equal(table[:, 1:].astype(np.float32), vectors)              # %.9g round-trips

    item = {int(raw): i + 1 for i, raw in enumerate(index.keys)}
    width = 11                                                    # task 3's sources and task 1's width − 1
    rows = np.array([[1] * (width - len(line.split(","))) + [item[int(t)] for t in line.split(",")] for line in lines])
    with torch.no_grad():
        expected = [model.hidden(torch.from_numpy(rows), model.task_masks(task, smax), last_only=True).numpy()
                    for task in (2, 0)]                                                   # task 3's, then task 1's
    assert vectors.shape == (40, 32)
    np.testing.assert_allclose(vectors, np.concatenate(expected, axis=1), atol=1e-5)


def test_longer_input_equals_its_last_items_and_short_input_is_padded(chain, capsys, tmp_path):
    rng = np.random.default_rng(1)
    long = [int(x) for x in rng.integers(1, 101, 30)]
    short = [int(x) for x in rng.integers(1, 101, 4)]
    lines = [long, long[-11:], short, [0] * 7 + short]                                   # task 1 reads 11 items
    users = write_users(tmp_path / "users.csv", [",".join(map(str, line)) for line in lines])
    code, _, err = run_predict(capsys, "--paths", chain[1] / "task3.t7", "--input", users, "--top", 15,
                               "--out", tmp_path / "top.csv")
    assert code == 0, err
    rows = read_csv(tmp_path / "top.csv")
    per_user = [[(row["item"], float(row["logit"])) for row in rows if row["line"] == str(k)] for k in range(1, 5)]
    for a, b in ((0, 1), (2, 3)):
        assert [item for item, _ in per_user[a]] == [item for item, _ in per_user[b]]
        np.testing.assert_allclose([v for _, v in per_user[a]], [v for _, v in per_user[b]], rtol=1e-5)
    code, _, err = run_predict(capsys, "--paths", chain[1] / "task3.t7", "--input", users, "--top", 15,
                               "--skip_padding", "--out", tmp_path / "skip.csv")
    skipped = read_csv(tmp_path / "skip.csv")
    assert code == 0 and len(skipped) == 60 and not {row["item"] for row in skipped} & {"0", "<UNK>"}


def test_unknown_items_one_warning_with_count(chain, capsys, tmp_path):
    users = write_users(tmp_path / "users.csv", ["1,2,5000,3", "4,5,6", "7000,8,9000"])
    code, out, err = run_predict(capsys, "--paths", chain[1] / "task3.t7", "--task", 2, "--input", users,
                                 "--batch", 1, "--top", 3)
    assert code == 0, err
    warnings_ = [line for line in err.splitlines() if "not in the index" in line]
    assert len(warnings_) == 1 and "users.csv: 3 item token(s)" in warnings_[0] and "<UNK>" in warnings_[0], err
    assert len(out.splitlines()) == 1 + 3 * 3                                              # printed CSV


@pytest.mark.parametrize("content, fragment", [
    ("1,2,3\n4,x,6\n7,8\n", "bad.csv:2: non-integer token 'x'"),
    ("1,2,3\n\n4,,6\n", "bad.csv:3: empty token"),
])
def test_malformed_line_one_error_nothing_written(chain, capsys, tmp_path, content, fragment):
    (tmp_path / "bad.csv").write_text(content)
    out = tmp_path / "predictions.csv"
    code, stdout, err = run_predict(capsys, "--paths", chain[1] / "task3.t7", "--input", tmp_path / "bad.csv",
                                    "--out", out)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / fragment}"), err
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "bad.csv"]            # no temporary left


@pytest.mark.slow
def test_cli_subprocess_error_and_probe(chain, loaded, repo_root, subprocess_env, tmp_path):
    """As a user runs it: a malformed line is one `error:` line, exit 2, nothing written; then the probe."""
    from continual.evaluation.scoring import score
    from data_loader import split_indices

    (tmp_path / "bad.csv").write_text("1,2\n3,-4\n")
    command = [sys.executable, str(repo_root / "predict.py"), "--paths", str(chain[1] / "task3.t7"),
               "--input", str(tmp_path / "bad.csv"), "--embed", "--out", str(tmp_path / "v.npy")]
    done = subprocess.run(command, cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [f"error: {tmp_path / 'bad.csv'}:2: non-integer token '-4'"]
    assert not (tmp_path / "v.npy").exists()

    model, _, smax = loaded
    data, test, _ = evaluation_data(chain, loaded, 3)
    command[4:] = ["--task", "3", "--probe_task", "3", "--out", str(tmp_path / "probe.json")]
    done = subprocess.run(command, cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["test"] == test.size and result["dims"] == 16 and 0.0 <= result["logistic_regression"] <= 1.0
    assert result["head"] == pytest.approx(score(model, 2, data, test, "cls", smax, 256, torch.device("cpu"))["acc"])
    labels, train = data.targets, split_indices(len(data.targets), *task_split(chain, 3))[0]
    majority = np.bincount(labels[train]).argmax()
    assert result["majority"] == pytest.approx(np.mean(labels[test] == majority))
    assert "logistic regression on the vectors" in done.stdout


def test_probe_file_is_the_probe_of_a_task_the_checkpoint_need_not_hold(chain, capsys, tmp_path):
    """--probe_file F on the checkpoint that holds F as task 3 gives --probe_task 3's probe (same split, same
    vectors), without the head; the stage-2 checkpoint, which has never seen F, probes it too; a rec task's
    file and both flags at once are one-line errors."""
    data_files, out = chain
    results = {}
    for name, extra in (("task", ["--probe_task", 3]), ("file", ["--probe_file", data_files.task3])):
        code, stdout, err = run_predict(capsys, "--paths", out / "task3.t7", "--task", 3, *extra,
                                        "--out", tmp_path / f"{name}.json")
        assert code == 0, err
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    by_task, by_file = results["task"], results["file"]
    assert by_file["head"] is None and by_task["head"] is not None and by_file["task"] == 0
    for key in ("logistic_regression", "majority", "majority_label", "train", "test", "dims", "features"):
        assert by_file[key] == by_task[key], key
    assert "head" not in stdout and "logistic regression on the vectors" in stdout

    code, stdout, err = run_predict(capsys, "--paths", out / "task2.t7", "--task", 2, "--probe_file", data_files.task3)
    assert code == 0 and "probe of task3.csv" in stdout and "logistic regression on the vectors" in stdout, err
    code, _, err = run_predict(capsys, "--paths", out / "task2.t7", "--probe_file", data_files.task2)
    assert code == 2 and err.splitlines() == [f"error: {data_files.task2}: has 40 classes, a rec task's; the probe "
                                              "fits a classifier to a cls task's labels (at most 20)"], err
    code, _, err = run_predict(capsys, "--paths", out / "task3.t7", "--probe_task", 3, "--probe_file", data_files.task3)
    assert code == 2 and len(err.splitlines()) == 1 and "give one of them" in err, err


def test_amp_vectors_close_to_fp32(chain, capsys, tmp_path):
    users = write_users(tmp_path / "users.csv", ["1,2,3,4,5,6", "7,8,9", "10,20,30,40,50,60,70,80,90,11,12,13"])
    vectors = []
    for extra in ([], ["--amp"]):
        code, _, err = run_predict(capsys, "--paths", chain[1] / "task3.t7", "--task", 2, "--input", users, "--embed",
                                   "--out", tmp_path / f"v{len(extra)}.npy", *extra)
        assert code == 0, err
        vectors.append(np.load(tmp_path / f"v{len(extra)}.npy"))
    assert vectors[1].dtype == np.float32 and vectors[1].shape == (3, 16)
    error = np.linalg.norm(vectors[1] - vectors[0], axis=1) / np.linalg.norm(vectors[0], axis=1)
    assert error.max() < 0.05, error                                                     # bf16 branch, fp32 stream


def test_the_python_snippet_gives_what_predict_py_writes(chain, capsys, tmp_path, repo_root):
    """README.md's "From Python" block, run on this chain's stage-3 checkpoint (its task 3 for the README's task
    5), equals predict.py's outputs for the same users: vectors, top items and class probabilities."""
    page = (repo_root / "README.md").read_text(encoding="utf-8")
    block = page.split("## From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    _, out = chain
    code = block.replace('"saved_models/demo/task6.t7"', repr(str(out / "task3.t7"))).replace("task=5", "task=3")
    names: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "README.md", "exec"), names)
    users = write_users(tmp_path / "users.csv", [",".join(map(str, user)) for user in names["users"]])
    assert run_predict(capsys, "--paths", out / "task3.t7", "--task", 2, "--input", users, "--embed", "--out",
                       tmp_path / "v.npy", "--device", "cpu")[0] == 0
    np.testing.assert_allclose(names["vectors"], np.load(tmp_path / "v.npy"), rtol=0, atol=1e-6)
    assert run_predict(capsys, "--paths", out / "task3.t7", "--task", 1, "--input", users, "--top", 10,
                       "--skip_padding", "--out", tmp_path / "top.csv", "--device", "cpu")[0] == 0
    rows = read_csv(tmp_path / "top.csv")
    for line, items in enumerate(names["items"], start=1):
        expected = [(row["item"], float(row["prob"])) for row in rows if row["line"] == str(line)]
        assert [item for item, _ in items] == [item for item, _ in expected]
        np.testing.assert_allclose([p for _, p in items], [p for _, p in expected], rtol=1e-5)
    assert run_predict(capsys, "--paths", out / "task3.t7", "--task", 3, "--input", users, "--out",
                       tmp_path / "cls.csv", "--device", "cpu")[0] == 0
    rows = read_csv(tmp_path / "cls.csv")
    assert [f"p_{label}" for label in names["labels"]] == [key for key in rows[0] if key.startswith("p_")]
    np.testing.assert_allclose(names["probabilities"], [[float(row[f"p_{label}"]) for label in names["labels"]]
                                                        for row in rows], rtol=1e-5)
