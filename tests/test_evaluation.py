"""continual/evaluation (metrics, scoring, stats): the ranking metrics and scoring by hand, baselines, bootstrap
intervals and the synthetic benchmark, against hand computations."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import data_loader
from continual.evaluation import metrics, reports, scoring, stats
from continual.generators import synth
from continual.training import loop
from data_loader import ItemIndex, TaskData


def test_rank_values_equal_ranking_values_from_logits():
    rng = np.random.default_rng(0)
    n_classes = 30
    logits = torch.from_numpy(rng.permutation(n_classes * 8).reshape(8, n_classes).astype(np.float32))
    targets = torch.from_numpy(rng.integers(0, n_classes, 8))
    ranks = (logits > logits[torch.arange(8), targets][:, None]).sum(1).numpy()    # [8] 0-based rank
    expected = metrics.ranking_values(logits, targets, 5).numpy()
    np.testing.assert_allclose(stats.rank_values(ranks, 5, n_classes), expected, atol=1e-12)
    assert stats.rank_values(np.array([np.inf]), 5, n_classes).sum() == 0.0


def test_rank_values_by_hand():
    values = stats.rank_values(np.array([0, 2, 7]), 5, 100)
    assert values[0].tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert values[1].tolist() == pytest.approx([1 / 3, 1, 1 / math.log2(4), 1 / 3, 1, 1 / math.log2(4), 0])
    assert values[2].tolist() == pytest.approx([0, 0, 0, 1 / 8, 1, 1 / math.log2(9), 0])


def test_popularity_ranks_by_hand():
    counts = np.array([-1.0, 5.0, 3.0, 3.0, 1.0])                 # ranking: 1, 2, 3 (tie → lower class), 4, 0
    targets = np.array([1, 3, 4, 3])
    np.testing.assert_array_equal(stats.popularity_ranks(counts, targets, None), [0, 2, 3, 2])
    sources = np.array([[-1, -1], [1, 1], [4, 2], [4, 0]])         # user 2 owns its target; user 3 items after it
    np.testing.assert_array_equal(stats.popularity_ranks(counts, targets, sources), [0, 1, np.inf, 2])


def test_popularity_unseen_equals_masked_logits():
    """The rank shortcut equals ranking_values on logits with the user's own items set to −inf."""
    rng = np.random.default_rng(1)
    n, n_classes = 50, 40
    counts = rng.integers(0, 9, n_classes).astype(float)
    targets = rng.integers(0, n_classes, n)
    sources = rng.integers(-1, n_classes, (n, 6))
    logits = torch.from_numpy(-np.argsort(np.argsort(-counts, kind="stable")).astype(np.float64)).repeat(n, 1)
    for row, items in enumerate(sources):
        logits[row, items[items >= 0]] = -torch.inf
    expected = metrics.ranking_values(logits, torch.from_numpy(targets), 5).numpy()
    own = (sources == targets[:, None]).any(1)
    expected[own] = 0.0                                            # an excluded target is never ranked
    got = stats.rank_values(stats.popularity_ranks(counts, targets, sources), 5, n_classes)
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_cluster_bootstrap_by_hand():
    values = np.array([[1.0], [0.0], [0.0], [1.0]])
    groups = np.array([7, 7, 3, 9])                                # users 3, 7 (two examples), 9
    draws = stats.bootstrap(values, groups, resamples=5, seed=4)
    rng = np.random.default_rng(4)
    sums, sizes = np.array([0.0, 1.0, 1.0]), np.array([1.0, 2.0, 1.0])   # users in sorted order 3, 7, 9
    for r in range(5):
        chosen = rng.integers(0, 3, 3)
        assert draws[r, 0] == pytest.approx(sums[chosen].sum() / sizes[chosen].sum())
    constant = stats.bootstrap(np.full((6, 2), 0.25), None, resamples=20)
    np.testing.assert_allclose(constant, 0.25)
    np.testing.assert_allclose(stats.interval(np.arange(101.0)[:, None]), [[2.5, 97.5]])


def test_kept_share_by_hand():
    earlier, later = np.array([1.0, 0.0, 0.5, 0.0, 0.5]), np.array([0.5, 0.0, 0.5, 1.0, 0.0])
    groups = np.array([4, 4, 2, 9, 2])                             # users 2 (rows 2, 4), 4 (rows 0, 1), 9
    kept = stats.kept_share(earlier, later, groups, resamples=200, seed=3)
    assert kept["earlier"] == pytest.approx(0.4) and kept["later"] == pytest.approx(0.4)
    assert kept["share"] == pytest.approx(1.0)
    draws = stats.bootstrap(np.stack([earlier, later], 1), groups, resamples=200, seed=3)    # the same resamples
    usable = draws[:, 0] > 0
    assert kept["resamples_dropped"] == int((~usable).sum()) > 0    # user 9 alone has an earlier mean of 0
    ratios = draws[usable, 1] / draws[usable, 0]
    np.testing.assert_allclose(kept["ci95"], np.percentile(ratios, [2.5, 97.5]))
    assert kept["ci95"][0] < 1.0 < kept["ci95"][1]
    same = stats.kept_share(earlier, earlier, None, resamples=50)
    assert same["share"] == 1.0 and same["ci95"] == pytest.approx([1.0, 1.0])
    halved = stats.kept_share(earlier, earlier / 2, groups, resamples=50)
    assert halved["share"] == pytest.approx(0.5) and halved["ci95"] == pytest.approx([0.5, 0.5])
    assert stats.kept_share(np.zeros(3), np.ones(3), None, resamples=10)["share"] is None


def test_evidence_marks_above_only_when_the_paired_interval_excludes_zero():
    rng = np.random.default_rng(2)
    better = (rng.random((400, 1)) < 0.6) * 1.0
    weak = (rng.random((400, 1)) < 0.3) * 1.0
    strong = better.copy()
    result = stats.evidence(better, {"weak": weak, "strong": strong}, ["acc"], "acc", None)
    assert result["vs_baseline"]["baseline"] == "strong"           # the strongest on the test set
    assert result["vs_baseline"]["difference"] == 0.0 and result["vs_baseline"]["above"] is False
    result = stats.evidence(better, {"weak": weak}, ["acc"], "acc", None)
    low, high = result["vs_baseline"]["ci95"]
    assert 0 < low < result["vs_baseline"]["difference"] < high and result["vs_baseline"]["above"] is True
    assert result["vs_baseline"]["all"]["acc"]["ci95"] == [low, high]
    two = stats.evidence(np.hstack([better, weak]), {"weak": np.hstack([weak, better])}, ["a", "b"], "a", None)
    assert two["vs_baseline"]["all"]["a"]["above"] and not two["vs_baseline"]["all"]["b"]["above"]
    low, high = result["ci95"]["acc"]
    assert low < better.mean() < high
    assert result["baseline"]["weak"]["test"]["acc"] == pytest.approx(weak.mean())


def test_baselines_of_a_task_file_by_hand():
    """Task k ≥ 2 rec: popularity of training targets; unseen maps each class's raw label to its item."""
    index = ItemIndex(np.array([10, 20, 30, 40]))                 # raw 10 → 1, 20 → 2, 30 → 3, 40 → 4
    sources = np.array([[1, 2], [3, 4], [1, 3]])                   # item indices of three users
    target_keys = np.array([20, 30, 99])                           # classes 1, 2, 3 (99 is no item)
    targets = np.array([2, 2, 1, 3, 2])                            # class indices
    data = TaskData(sources, targets, 4, np.array([0, 1, 1, 2, 2]), target_keys)
    train, test = np.array([0, 1, 2]), np.array([3, 4])            # training targets: 2, 2, 1
    result = scoring.baseline_values(data, "rec", train, test, index, 5)
    # popularity ranking: class 2, class 1, class 3, class 0 (excluded). Test: user 2's class 3 (rank 2), class 2 (rank 0)
    assert result["popularity"][:, 0].tolist() == pytest.approx([1 / 3, 1.0])
    # user 2 owns items 1 (raw 10: no class) and 3 (raw 30 = class 2): class 2 leaves its ranking
    assert result["popularity_unseen"][:, 0].tolist() == pytest.approx([1 / 2, 0.0])
    majority = scoring.baseline_values(data, "cls", train, test, index, 5)["majority"]
    assert majority[:, 6].tolist() == [0.0, 1.0]


def test_task1_popularity_ignores_padding_and_unknown():
    index = ItemIndex(np.array([0, 5, 6]))                         # raw 0 (padding) → 1, 5 → 2, 6 → 3
    sequences = np.array([[1, 1, 1, 3], [1, 1, 1, 3], [0, 2, 3, 2]])
    data = TaskData(sequences[:, :-1], sequences[:, -1], index.size)
    result = scoring.baseline_values(data, "rec", np.array([0, 1]), np.array([2]), index, 5)
    assert result["popularity"][0, 6] == 0.0 and result["popularity"][0, 0] == 0.5   # item 3 first, item 2 second
    assert result["popularity_unseen"][0].sum() == 0.0             # item 2 is in the user's source


def test_synth_is_deterministic_and_sized(tmp_path):
    flags = ["--users", "60", "--items", "40", "--length", "8", "--clusters", "4"]
    synth.main(["--out", str(tmp_path / "a"), "--seed", "3", *flags])
    synth.main(["--out", str(tmp_path / "b"), "--seed", "3", *flags])
    synth.main(["--out", str(tmp_path / "c"), "--seed", "4", *flags])
    names = [f"task{k}.csv" for k in range(1, 7)] + ["tasks.json", "latents.csv"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "task1.csv").read_bytes() != (tmp_path / "c" / "task1.csv").read_bytes()
    task1 = (tmp_path / "a" / "task1.csv").read_text().splitlines()
    assert len(task1) == 60 and all(len(line.split(",")) == 8 for line in task1)
    meta = json.loads((tmp_path / "a" / "tasks.json").read_text())
    assert [entry["kind"] for entry in meta["tasks"]] == ["rec"] * 3 + ["cls"] * 3
    assert scoring.known_ceiling(str(tmp_path / "a" / "task5.csv")) == meta["tasks"][4]["ceiling"]


def test_synth_time_variant_brings_items_stage_by_stage_and_retests_every_earlier_task(tmp_path, source_items):
    """--new_items N: task K holds only the items that arrived by stage K, N of them at each later stage (ids after the
    earlier ones), some of its own stage's; taskU.retestK.csv holds items up to stage K, and the users it counts as
    with new items are those whose input holds an item newer than stage U; the ceiling over all users is the
    users-weighted mean of its two parts. Without --new_items nothing of this is written."""
    items, new = 40, 6
    shape = ["--users", "200", "--items", str(items), "--length", "10", "--clusters", "4"]
    meta = synth.main(["--out", str(tmp_path / "time"), "--new_items", str(new), *shape])
    for stage in range(1, 7):
        seen = {item for line in source_items(tmp_path / "time" / f"task{stage}.csv") for item in line}
        assert max(seen) <= items + (stage - 1) * new
        assert stage == 1 or seen & set(range(items + (stage - 2) * new + 1, items + (stage - 1) * new + 1))
    assert len(meta["retests"]) == 15
    for entry in meta["retests"]:
        task, stage = entry["task"], entry["stage"]
        lines = source_items(tmp_path / "time" / entry["file"])
        inputs = [line[:-1] if task == 1 else line for line in lines]
        assert max(max(line) for line in lines) <= items + (stage - 1) * new
        assert entry["users_with_new"] == sum(max(line) > items + (task - 1) * new for line in inputs) > 0
        parts = [(entry["users_with_new"], entry.get("ceiling_with_new")),
                 (entry["lines"] - entry["users_with_new"], entry.get("ceiling_without_new"))]
        for metric, value in entry["ceiling"].items():
            weighted = sum(count * part[metric] for count, part in parts if count)
            assert weighted / entry["lines"] == pytest.approx(value)
        assert scoring.known_ceiling(str(tmp_path / "time" / entry["file"]), "ceiling_with_new") == parts[0][1]
    static = synth.main(["--out", str(tmp_path / "static"), *shape])
    assert "retests" not in static and not list((tmp_path / "static").glob("*.retest*"))
    for given in (["--drift", "0.5"], ["--drift=0.5"], ["--retest_users", "30"]):
        with pytest.raises(SystemExit):
            synth.main(["--out", str(tmp_path / "refused"), *given, *shape])


@pytest.fixture(scope="module")
def world_and_users():
    return synth.generate(seed=5, n_users=3000, n_items=120, length=20, n_clusters=6)


def test_synth_ceilings_hold(world_and_users):
    """The Bayes-optimal predictor's realised scores match the ceilings (within 4 standard errors), and a
    predictor given the latent variables themselves does at least as well."""
    world, users = world_and_users
    ceilings = synth.ceilings(world, users)
    full = synth.posterior(world, users.sequences)
    grid = synth.latent_grid(world)
    truth = np.stack([users.age, users.gender, users.status, users.favourite], axis=1)
    oracle = (grid[None, :, :] == truth[:, None, :]).all(2) * 1.0                   # [N, Z] posterior = the truth
    for task, labels in ((4, users.age), (5, users.gender), (6, users.status)):
        bayes = synth.predictive(world, full, task).argmax(1) == labels
        assert abs(bayes.mean() - ceilings[task - 1]["acc"]) < 4 * bayes.std() / math.sqrt(bayes.size) + 1e-9
        assert (synth.predictive(world, oracle, task).argmax(1) == labels).mean() == 1.0
    for task, targets in ((2, users.clicks), (3, users.likes)):
        labels = np.unique(targets)
        ranking = np.argsort(-synth.predictive(world, full, task, labels=labels), axis=1, kind="stable")
        position = np.searchsorted(labels, targets)                                 # [N, n] class of each target
        ranks = np.stack([(ranking == position[:, [j]]).argmax(1) for j in range(targets.shape[1])], axis=1)
        realised = stats.rank_values(ranks.reshape(-1), 5, labels.size)[:, 0]
        error = realised.std() / math.sqrt(users.age.size)                          # users, not examples
        assert abs(realised.mean() - ceilings[task - 1]["mrr@5"]) < 4 * error
        oracle_ranking = np.argsort(-synth.predictive(world, oracle, task, labels=labels), axis=1, kind="stable")
        oracle_ranks = np.stack([(oracle_ranking == position[:, [j]]).argmax(1) for j in range(targets.shape[1])], 1)
        assert stats.rank_values(oracle_ranks.reshape(-1), 5, labels.size)[:, 0].mean() >= realised.mean() - 2 * error
    previous, target = users.sequences[:, -2], users.sequences[:, -1]
    inputs = synth.posterior(world, users.sequences[:, :-1])
    scores = synth.predictive(world, inputs, 1, previous=previous)
    ranks = (scores > scores[np.arange(target.size), target][:, None]).sum(1)
    realised = stats.rank_values(ranks, 5, scores.shape[1])[:, 0]
    assert abs(realised.mean() - ceilings[0]["mrr@5"]) < 4 * realised.std() / math.sqrt(realised.size)


def test_synth_ceilings_beat_the_majority_class(world_and_users):
    world, users = world_and_users
    ceilings = synth.ceilings(world, users)
    for task, labels in ((4, users.age), (5, users.gender), (6, users.status)):
        assert ceilings[task - 1]["acc"] > np.bincount(labels).max() / labels.size + 0.1


def test_one_epoch_synth_run_reports_baselines_intervals_and_ceilings(tmp_path):
    data = tmp_path / "synth"
    synth.main(["--out", str(data), "--users", "200", "--items", "40", "--length", "10", "--clusters", "4"])
    out = tmp_path / "run"
    common = ["--datapath_index", str(out / "index.csv"), "--epochs", "1", "--device", "cpu", "--batch", "64"]
    loop.main(1, ["--datapath", str(data / "task1.csv"), "--savepath", str(out / "task1"), "--channels", "8",
                     *common])
    for k in range(2, 7):
        loop.main(k, ["--datapath", str(data / f"task{k}.csv"), "--savepath", str(out / f"task{k}"),
                         "--paths", str(out / f"task{k - 1}.t7"), *common])
    metrics = json.loads((out / "task6.metrics.json").read_text())
    meta = json.loads((data / "tasks.json").read_text())
    for k in range(1, 7):
        entry = metrics["tasks"][str(k)]
        names = ["popularity", "popularity_unseen"] if k <= 3 else ["majority"]
        assert sorted(entry["baseline"]) == names
        for name in entry["test"]:
            low, high = entry["ci95"][name]
            assert low <= entry["test"][name] <= high
        assert entry["ceiling"] == meta["tasks"][k - 1]["ceiling"]
        assert entry["vs_baseline"]["metric"] == ("mrr@5" if k <= 3 else "acc")
    header, rows = reports.forgetting_matrix([str(out / f"task{k}.metrics.json") for k in range(1, 7)])
    assert header[:7] == ["stage"] + [f"task{k}" for k in range(1, 7)] and len(rows) == 6
    assert rows[5][header.index("task5_baseline_name")] == "majority"
    assert rows[5][header.index("task5_ceiling")] == f"{meta['tasks'][4]['ceiling']['acc']:.4f}"


def test_stage_table_marks_tasks_not_above_their_baseline():
    rng = np.random.default_rng(3)
    good = rng.random((300, 7)) * 0.5 + 0.5
    weak = rng.random((300, 7)) * 0.5
    names = metrics.metric_names(5)
    above = stats.evidence(good, {"popularity": weak}, names, "mrr@5", None)
    level = stats.evidence(good, {"popularity": good}, names, "mrr@5", None)
    tasks = {str(k): {"kind": "rec", "test": dict(zip(names, good.mean(0))), "n_test_users": 300, **entry}
             for k, entry in ((1, above), (2, level))}
    tasks["2"]["ceiling"] = {"mrr@5": 0.9}
    lines = reports.format_evidence(4, tasks).splitlines()
    assert lines[0].startswith("stage 4:") and len(lines) == 4
    assert "NOT above" not in lines[2] and "(above on hit@5, ndcg@5, mrr@20, hit@20, ndcg@20, acc)" in lines[2]
    assert lines[3].rstrip().endswith("0.9000  NOT above baseline")


def _hand_metrics(rank):
    """SPEC: rank r from 0, MRR = 1/(r+1), NDCG = 1/log2(r+2), HR = 1, 0 outside the top k."""
    out = []
    for k in (5, 20):
        inside = rank < k
        out += [1.0 / (rank + 1) if inside else 0.0, 1.0 if inside else 0.0,
                1.0 / math.log2(rank + 2) if inside else 0.0]
    return out + [1.0 if rank == 0 else 0.0]


def test_ranking_sums_against_hand_computation():
    assert metrics.metric_names(5) == ["mrr@5", "hit@5", "ndcg@5", "mrr@20", "hit@20", "ndcg@20", "acc"]
    n_classes = 40
    gen = torch.Generator().manual_seed(5)
    ranks = [0, 3, 10, 25, 4, 5, 19, 20]
    logits = torch.zeros(len(ranks), n_classes)
    targets = torch.zeros(len(ranks), dtype=torch.long)
    for row, rank in enumerate(ranks):
        order = torch.randperm(n_classes, generator=gen)              # order[i] = class ranked i
        logits[row, order] = torch.linspace(10.0, -10.0, n_classes)   # distinct scores, descending
        targets[row] = order[rank]
    expected_rows = np.array([_hand_metrics(r) for r in ranks])
    for row in range(len(ranks)):
        got = metrics.ranking_sums(logits[row:row + 1], targets[row:row + 1], 5).numpy()
        np.testing.assert_allclose(got, expected_rows[row], rtol=1e-9, atol=1e-12,
                                   err_msg=f"target ranked {ranks[row]}")
    total = metrics.ranking_sums(logits, targets, 5).numpy()
    np.testing.assert_allclose(total, expected_rows.sum(0), rtol=1e-9)


def test_score_averages_every_row_including_partial_batch(tiny_model):
    model = tiny_model(task_classes=[30], seed=6)
    gen = torch.Generator().manual_seed(2)
    data = data_loader.TaskData(torch.randint(0, 30, (23, 9), generator=gen).numpy(),
                                torch.randint(0, 30, (23,), generator=gen).numpy(), 30)
    rows = np.arange(3, 20)                                           # 17 rows, batches of 5 → partial last
    got = scoring.score(model, 0, data, rows, "rec", 50.0, 5, torch.device("cpu"), 5)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(data.inputs[rows]), 0, 50.0)
    expected = metrics.ranking_sums(logits, torch.from_numpy(data.targets[rows]), 5) / rows.size
    assert list(got) == metrics.metric_names(5)
    np.testing.assert_allclose([got[k] for k in metrics.metric_names(5)], expected.numpy(), rtol=1e-6, atol=1e-9)
    cls = scoring.score(model, 0, data, rows, "cls", 50.0, 5, torch.device("cpu"), 5)
    assert list(cls) == ["acc"] and cls["acc"] == pytest.approx(got["acc"])
