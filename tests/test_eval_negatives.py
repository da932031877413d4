"""--eval_negatives (DITTO's evaluation, issue 52): each rec target ranked among N sampled items, the baselines among
the same, against hand computations; the flag end to end on a stage and evaluate.py."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from continual.evaluation import metrics, scoring
from data_loader import ItemIndex, TaskData


def test_candidate_rank_by_hand():
    scores = torch.tensor([[5.0, 6.0, 5.0, 4.0, 5.0]])     # column 0: the target (class 3)
    candidates = torch.tensor([[3, 7, 2, 9, 4]])
    # ahead: class 7 (higher), class 2 (equal, lower class); not class 9 (lower), nor class 4 (equal, higher class)
    assert metrics.candidate_rank(scores, candidates).tolist() == [2.0]
    removed = torch.tensor([[False, True, False, False, False]])
    assert metrics.candidate_rank(scores, candidates, removed).tolist() == [1.0]
    assert metrics.candidate_rank(scores, candidates, torch.tensor([[True] + [False] * 4])).tolist() == [float("inf")]


def test_sampled_ranking_values_count_the_negatives_above_the_target():
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.permutation(6 * 50).reshape(6, 50).astype(np.float32))   # no ties
    targets = torch.from_numpy(rng.integers(0, 50, 6))
    negatives = torch.from_numpy(rng.integers(0, 50, (6, 30)))
    values = metrics.sampled_ranking_values(logits, targets, negatives, 5).numpy()
    for row in range(6):
        rank = int((logits[row, negatives[row]] > logits[row, targets[row]]).sum())
        expected = metrics.rank_metrics(torch.tensor([float(rank)], dtype=torch.float64), 5, 31).numpy()[0]
        np.testing.assert_allclose(values[row], expected)
        assert values[row, 6] == float(rank == 0)


def test_sampled_negatives_never_draw_the_target_padding_or_unknown():
    index = ItemIndex(np.arange(0, 40))                       # raw 0 (padding) → class 1, raw k → k + 1; <UNK>: 0
    sources = np.ones((300, 4), dtype=np.int64)
    targets = np.random.default_rng(0).integers(2, index.size, 300)
    data = TaskData(sources, targets, index.size)              # task 1: the classes are the items
    rows = np.arange(300)
    drawn = scoring.sampled_negatives(data, index, rows, "rec", 99, seed=4, number=1)
    assert drawn.shape == (300, 99)
    assert not (drawn == targets[:, None]).any()
    assert not np.isin(drawn, [0, 1]).any()                    # neither <UNK> nor the padding item
    assert set(np.unique(drawn)) == set(range(2, index.size))  # every other item is drawn
    np.testing.assert_array_equal(drawn, scoring.sampled_negatives(data, index, rows, "rec", 99, 4, 1))
    assert not np.array_equal(drawn, scoring.sampled_negatives(data, index, rows, "rec", 99, 5, 1))
    assert scoring.sampled_negatives(data, index, rows, "cls", 99, 4, 1) is None
    assert scoring.sampled_negatives(data, index, rows, "rec", 0, 4, 1) is None


def test_sampled_popularity_baselines_by_hand():
    counts = np.array([-1.0, 9.0, 5.0, 5.0, 1.0])             # class 0 (<UNK>) last
    targets = np.array([3, 4])
    negatives = np.array([[1, 2, 4], [2, 3, 3]])
    sources = np.array([[1, -1], [3, -1]])                     # user 0 holds class 1, user 1 class 3
    result = scoring.sampled_popularity_values(counts, targets, negatives, sources, top_k=1)
    # user 0: class 3 (5) behind class 1 (9) and class 2 (5, lower class) → rank 2; without its own class 1 → rank 1
    # user 1: class 4 (1) behind 2, 3, 3 → rank 3; without its own class 3 → rank 1
    assert result["popularity"][:, 0].tolist() == pytest.approx([0.0, 0.0])
    assert result["popularity"][:, 3].tolist() == pytest.approx([1 / 3, 1 / 4])
    assert result["popularity_unseen"][:, 3].tolist() == pytest.approx([1 / 2, 1 / 2])


@pytest.fixture(scope="module")
def sampled_stages(tmp_path_factory, two_stages):
    """Stages 1 and 2 for one epoch with --eval_negatives 99 on 400 users of 100 items."""
    return two_stages(tmp_path_factory.mktemp("sampled"), "--epochs", "1", "--eval_negatives", "99")


def test_a_stage_records_and_prints_its_sampled_ranking(sampled_stages):
    folder, outputs = sampled_stages
    for stage, output in zip((1, 2), outputs):
        metrics_json = json.loads((folder / f"task{stage}.metrics.json").read_text())
        assert metrics_json["limits"]["eval_negatives"] == 99
        assert "SAMPLED RANKING (--eval_negatives 99)" in output
    first, second = (json.loads((folder / f"task{k}.metrics.json").read_text())["tasks"] for k in (1, 2))
    assert first["1"]["baseline"] == second["1"]["baseline"]   # the same users and candidates at every stage


def test_evaluate_py_rescores_with_the_checkpoints_candidates(sampled_stages, subprocess_env, repo_root):
    folder, _ = sampled_stages
    printed = json.loads((folder / "task2.metrics.json").read_text())["tasks"]
    for task in (1, 2):
        done = subprocess.run([sys.executable, "evaluate.py", "--paths", str(folder / "task2.t7"), "--task", str(task),
                               "--device", "cpu"], cwd=repo_root, env=subprocess_env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout[:done.stdout.rindex("}") + 1])
        assert result["test"] == printed[str(task)]["test"]
    full = subprocess.run([sys.executable, "evaluate.py", "--paths", str(folder / "task2.t7"), "--task", "1",
                           "--device", "cpu", "--eval_negatives", "0"], cwd=repo_root, env=subprocess_env,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0
    assert json.loads(full.stdout[:full.stdout.rindex("}") + 1])["test"] != printed["1"]["test"]


@pytest.mark.parametrize("value", ["5", "-1", "x"])
def test_eval_negatives_domain_is_checked_at_parse_time(value, subprocess_env, repo_root, tmp_path):
    done = subprocess.run([sys.executable, "train_task1.py", "--datapath", "nowhere.csv", "--datapath_index",
                           str(tmp_path / "i.csv"), "--savepath", str(tmp_path / "t"), "--eval_negatives", value],
                          cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--eval_negatives" in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())


def test_a_stage_refuses_another_eval_negatives_than_its_chains(sampled_stages, subprocess_env, repo_root, tmp_path):
    folder, _ = sampled_stages
    done = subprocess.run([sys.executable, "train_teracon_t3.py", "--datapath", str(folder / "data" / "task3.csv"),
                           "--paths", str(folder / "task2.t7"), "--datapath_index", str(folder / "index.csv"),
                           "--savepath", str(tmp_path / "task3"), "--device", "cpu", "--epochs", "1"],
                          cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "--eval_negatives 99, this one with 0" in done.stderr and not list(tmp_path.iterdir())
