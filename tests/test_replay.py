"""--streams authors (continual/training/samplers.py): the authors' draws rebuilt by hand here from their
documented order (numpy's global RandomState, Python's random, torch's constructor calls), and a stage-2 run
from an authors'-layout stage-1 checkpoint. The step-for-step check against their code itself is
tools/replay_check.py (needs a checkout)."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from continual.original_checkpoints import convert_original
from continual.training import config, loop
from continual.training.samplers import AuthorsSampler, full_batches, original_fresh, revised_fresh
from data_loader import load_task, read_index
from test_original_checkpoints import original_state, save_and_load
from utils import DataError


def get_batch(data: np.ndarray, batch: int) -> list[np.ndarray]:
    """The authors' utils.getBatch, as its documentation describes it: permute, then slices while end < n."""
    data = data[np.random.permutation(np.arange(len(data)))]
    out, start, end = [], 0, batch
    while end < len(data):
        out.append(data[start:end])
        start, end = end, end + batch
    return out


@pytest.mark.parametrize("n, batch, expected", [(10, 3, 3), (9, 3, 2), (3, 3, 0), (7, 10, 0)])
def test_full_batches_drop_the_partial_and_the_last_full_batch(n, batch, expected):
    batches = full_batches(np.arange(n), batch)
    assert len(batches) == expected == max((n - 1) // batch, 0)
    assert all(len(b) == batch for b in batches)


@pytest.mark.parametrize("variant", ["original", "revised"])
def test_epoch_batches_follow_the_global_numpy_stream(variant):
    n, batch = 23, 4
    np.random.seed(7)
    streams = AuthorsSampler(variant, 2, "p.t7", "i.csv")
    shards = [streams.epoch_batches(n, batch) for _ in range(3)]
    assert all(weight == 1.0 and size == rows.size for epoch in shards for rows, weight, size in epoch)
    got = [[rows for rows, _, _ in epoch] for epoch in shards]
    np.random.seed(7)
    train = np.arange(n)
    for epoch in range(3):
        if variant == "original":                    # train_set = train_set[perm], kept across epochs
            train = train[np.random.permutation(np.arange(n))]
        expected = get_batch(train, batch)
        assert len(got[epoch]) == len(expected) == 5
        for mine, theirs in zip(got[epoch], expected):
            np.testing.assert_array_equal(mine, theirs)
    assert not np.array_equal(got[0][0], got[1][0])


def test_split_and_scored_rows_follow_the_global_numpy_stream():
    np.random.seed(3)
    streams = AuthorsSampler("original", 2, "p.t7", "i.csv")
    train, valid, test = streams.split(100, 3, 0.2)
    scored = streams.scored_rows(valid, 2)
    np.random.seed(3)
    perm = np.random.permutation(np.arange(100))
    np.testing.assert_array_equal(np.concatenate([train, valid, test]), perm)
    assert (train.size, valid.size, test.size) == (80, 5, 15)
    np.testing.assert_array_equal(scored, np.concatenate(get_batch(perm[80:85], 2)))   # 2 batches of 2: 4 of 5 rows


@pytest.mark.parametrize("nested", [True, False])
def test_retention_rows_come_from_python_random(nested):
    counts, size = [5, 2, 0], 12
    random.seed(11)
    got = AuthorsSampler("original", 2, "p.t7", "i.csv").retention_rows(counts, size, nested)
    random.seed(11)
    if nested:                                       # one shuffle, prefixes
        buffer = list(range(size))
        random.shuffle(buffer)
        expected = [buffer[:count] for count in counts]
    else:                                            # a shuffle per task, in task order
        buffers = [list(range(size)) for _ in counts]
        for buffer in buffers:
            random.shuffle(buffer)
        expected = [buffer[:count] for buffer, count in zip(buffers, counts)]
    assert [list(rows) for rows in got] == expected
    assert [rows.dtype for rows in got] == [np.int64] * 3


@pytest.mark.parametrize("n_tasks", [2, 3])
def test_original_fresh_takes_the_constructors_draws(n_tasks):
    """The same values as torch.nn modules built in the order the original's stage-K model builds them."""
    n_items, n_classes, channels, kernel, blocks = 23, 31, 8, 3, 8
    torch.manual_seed(10)
    fresh = original_fresh(n_items, n_classes, n_tasks, channels, kernel, blocks)
    torch.manual_seed(10)
    nn.Embedding(n_items, channels).weight.data.uniform_(-math.sqrt(1 / n_items), math.sqrt(1 / n_items))
    relation = torch.empty(n_tasks, 2 * blocks, 2 * n_tasks - 1)
    for block in range(blocks):
        nn.Conv2d(channels, channels, (1, kernel))
        nn.Conv2d(channels, channels, (1, kernel))
        task_rows = [nn.Embedding(6, channels), nn.Embedding(6, channels)]
        for rows in task_rows:
            rows.weight.data.uniform_(0, 2)
        mlp1 = [nn.Linear(2 * n_tasks - 1, 1) for _ in range(n_tasks)]
        mlp2 = [nn.Linear(2 * n_tasks - 1, 1) for _ in range(n_tasks)]
        for task in range(n_tasks):
            relation[task, 2 * block] = mlp1[task].weight.data.normal_(0.0, 0.01)[0]
            relation[task, 2 * block + 1] = mlp2[task].weight.data.normal_(0.0, 0.01)[0]
    head = nn.Linear(channels, n_classes)
    head.weight.data.normal_(0.0, 0.01)
    assert torch.equal(fresh["relation_weight"], relation)
    assert torch.equal(fresh["head"], head.weight.data)


def test_revised_fresh_takes_the_constructors_draws():
    """The same values as torch.nn modules built in the order the revision's stage-K model builds them."""
    n_items, sizes, channels, kernel, blocks = 23, [23, 31, 4], 8, 3, 8
    n_tasks = len(sizes)
    torch.manual_seed(0)
    fresh = revised_fresh(n_items, sizes, channels, kernel, blocks)
    torch.manual_seed(0)
    nn.Embedding(n_items, channels).weight.data.uniform_(-math.sqrt(1 / n_items), math.sqrt(1 / n_items))
    relation, row = torch.empty(n_tasks, 2 * blocks, 2 * n_tasks - 1), torch.empty(2 * blocks, channels)
    for block in range(blocks):
        nn.Conv2d(channels, channels, (1, kernel))
        nn.Conv2d(channels, channels, (1, kernel))
        task_rows = nn.ModuleList([nn.Embedding(2, channels) for _ in range(n_tasks)])
        for rows in task_rows:
            rows.weight.data.uniform_(0, 2)
        row[2 * block:2 * block + 2] = task_rows[-1].weight.data
        mlp1 = [nn.Linear(2 * n_tasks - 1, 1) for _ in range(n_tasks)]
        mlp2 = [nn.Linear(2 * n_tasks - 1, 1) for _ in range(n_tasks)]
        for task in range(n_tasks):
            relation[task, 2 * block] = mlp1[task].weight.data.normal_(0.0, 0.01)[0]
            relation[task, 2 * block + 1] = mlp2[task].weight.data.normal_(0.0, 0.01)[0]
    heads = nn.ModuleList([nn.Linear(channels, size) for size in sizes])
    for head in heads:
        head.weight.data.normal_(0.0, 0.01)
    assert torch.equal(fresh["relation_weight"], relation)
    assert torch.equal(fresh["row"], row)
    assert torch.equal(fresh["head"], heads[-1].weight.data)


def revised_state(n_items: int, classes: list[int], channels: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict named and shaped as the revised code's model saved at stage len(classes)."""
    g = torch.Generator().manual_seed(seed)
    n_tasks = len(classes)
    sd = {"embeding.weight": torch.randn(n_items, channels, generator=g)}
    for i in range(8):
        block = f"residual_blocks.{i}"
        for c in (1, 2):
            sd[f"{block}.conv{c}.weight"] = torch.randn(channels, channels, 1, 3, generator=g) * 0.3
            sd[f"{block}.conv{c}.bias"] = torch.randn(channels, generator=g) * 0.1
            sd[f"{block}.ln{c}.weight"] = 1 + 0.1 * torch.randn(channels, generator=g)
            sd[f"{block}.ln{c}.bias"] = 0.1 * torch.randn(channels, generator=g)
            for t in range(n_tasks if n_tasks > 1 else 0):
                sd[f"{block}.mlp{c}.{t}.weight"] = torch.randn(1, 2 * n_tasks - 1, generator=g) * 0.05
                sd[f"{block}.mlp{c}.{t}.bias"] = torch.randn(1, generator=g) * 0.05
        for k in range(n_tasks):
            sd[f"{block}.ec.{k}.weight"] = torch.rand(2, channels, generator=g) * 0.2 - 0.1
    for k, size in enumerate(classes):
        sd[f"task_classifier.{k}.weight"] = torch.randn(size, channels, generator=g) * 0.3
        sd[f"task_classifier.{k}.bias"] = torch.randn(size, generator=g) * 0.3
    return sd


@pytest.mark.parametrize("classes", [[23], [23, 31, 4]])
def test_converter_reads_the_revised_layout(tmp_path, classes):
    state = revised_state(23, classes)
    loaded, path = save_and_load(tmp_path, state, "rev.t7")
    ours = convert_original(loaded, path)
    config, converted = ours["model_config"], ours["model_state"]
    assert ours["stage"] == len(classes) and config["task_classes"] == classes and config["n_items"] == 23
    assert config["relation"] == (len(classes) > 1) and "spare_task_rows" not in ours
    for i in range(8):
        for k in range(len(classes)):
            assert torch.equal(converted["task_embedding"][k, 2 * i:2 * i + 2], state[f"residual_blocks.{i}.ec.{k}.weight"])
            if len(classes) > 1:
                assert torch.equal(converted["relation_weight"][k, 2 * i + 1], state[f"residual_blocks.{i}.mlp2.{k}.weight"][0])
                assert converted["relation_bias"][k, 2 * i] == state[f"residual_blocks.{i}.mlp1.{k}.bias"][0]
        assert torch.equal(converted[f"blocks.{i}.conv2.weight"], state[f"residual_blocks.{i}.conv2.weight"].squeeze(2))
    assert torch.equal(converted[f"heads.{len(classes) - 1}.bias"], state[f"task_classifier.{len(classes) - 1}.bias"])


def test_the_revised_index_numbers_from_zero(tmp_path):
    index_path = tmp_path / "index.csv"
    index_path.write_text(str({"0": 0, "5": 1, "7": 2}))             # the revised code's str(dict)
    index = read_index(str(index_path))
    assert (index.offset, index.size) == (0, 3)
    np.testing.assert_array_equal(index.lookup(np.array([7, 0, 5]), "x"), [2, 0, 1])
    with pytest.raises(DataError, match="data.csv: 1 item token"):
        index.lookup(np.array([5, 6]), "data.csv")
    task = tmp_path / "task2.csv"
    task.write_text("0,5,7,,30\n5,7,,10,20\n")
    data = load_task(str(task), index)
    assert data.n_classes == 3 and list(data.targets) == [2, 0, 1]   # classes 10, 20, 30 → 0, 1, 2: no <UNK>


@pytest.mark.parametrize("stage", [1, 2])
def test_converter_keeps_the_spare_task_rows(tmp_path, stage):
    state = original_state(stage)
    loaded, path = save_and_load(tmp_path, state, f"s{stage}.t7")
    spare = convert_original(loaded, path)["spare_task_rows"]           # [6 − K, n_layers, C]
    assert spare.shape == (6 - stage, 16, 8)
    for i in range(8):
        assert torch.equal(spare[:, 2 * i], state[f"residual_blocks.{i}.ec1.weight"][stage:])
        assert torch.equal(spare[:, 2 * i + 1], state[f"residual_blocks.{i}.ec2.weight"][stage:])


@pytest.fixture
def authors_stage1(tmp_path, synthetic_data, monkeypatch):
    """Synthetic data, our stage 1 (for the index), and an authors'-layout stage-1 file of its vocabulary."""
    data = synthetic_data(n_users=240, seed=4)
    loop.main(1, ["--datapath", str(data.task1), "--datapath_index", str(tmp_path / "index.csv"), "--savepath",
                     str(tmp_path / "ours1"), "--epochs", "1", "--channels", "8", "--device", "cpu"])
    n_items = torch.load(tmp_path / "ours1.t7", weights_only=True)["model_config"]["n_items"]
    import test_original_checkpoints as toc
    monkeypatch.setattr(toc, "V", n_items)
    state = toc.original_state(1, seed=2)
    torch.save({"net": state, "acc(hit@1)": 1.0}, tmp_path / "authors1.t7")
    return data, state


def run_stage2(tmp_path, data, name, *extra):
    steps = []
    original = loop.train_step

    def counting(model, *args, **kwargs):
        steps.append(model.task_embedding.detach().clone())
        return original(model, *args, **kwargs)

    loop.train_step = counting
    try:
        loop.main(2, ["--datapath", str(data.task2), "--datapath_index", str(tmp_path / "index.csv"), "--paths",
                         str(tmp_path / "authors1.t7"), "--savepath", str(tmp_path / name), "--epochs", "2",
                         "--batch", "16", "--device", "cpu", "--variant", "original", "--streams", "authors", *extra])
    finally:
        loop.train_step = original
    return steps, torch.load(tmp_path / f"{name}.t7", weights_only=True)


def test_stage2_under_authors_streams(tmp_path, authors_stage1):
    data, state = authors_stage1
    steps, checkpoint = run_stage2(tmp_path, data, "a")
    n_train = data.lines2 - int(0.2 * data.lines2)
    assert len(steps) == 2 * ((n_train - 1) // 16)                     # partial (and last full) batches dropped
    first = steps[0]                                                    # before the first step
    for i in range(8):                                                  # task 2's row: stage 1's spare row 1
        assert torch.equal(first[1, 2 * i], state[f"residual_blocks.{i}.ec1.weight"][1])
        assert torch.equal(first[1, 2 * i + 1], state[f"residual_blocks.{i}.ec2.weight"][1])
    assert checkpoint["spare_task_rows"].shape == (4, 16, 8)            # rows of tasks 3..6, carried on
    assert torch.equal(checkpoint["spare_task_rows"][:, 0], state["residual_blocks.0.ec1.weight"][2:])
    _, again = run_stage2(tmp_path, data, "b")
    for key, value in checkpoint["model_state"].items():
        assert torch.equal(value, again["model_state"][key]), key


@pytest.fixture
def revised_stage1(tmp_path, synthetic_data):
    """Synthetic data (left-padded with item 0), its index as the revised code writes it, a stage-1 file."""
    data = synthetic_data(n_users=240, seed=5)
    lines = data.task1.read_text().splitlines()
    raw = sorted({int(token) for line in lines for token in line.split(",")} | {0})
    (tmp_path / "index.csv").write_text(str({str(item): position for position, item in enumerate(raw)}))
    state = revised_state(len(raw), [len(raw)], seed=3)
    torch.save({"net": state, "acc(hit@1)": 1.0}, tmp_path / "authors1.t7")
    return data, state


def test_stage2_under_the_revised_streams(tmp_path, revised_stage1):
    data, _ = revised_stage1
    steps, checkpoint = run_stage2(tmp_path, data, "r", "--variant", "revised")
    n_train = data.lines2 - int(0.2 * data.lines2)
    assert len(steps) == 2 * ((n_train - 1) // 16)
    labels = {token for line in data.task2.read_text().splitlines() for token in line.split(",,")[1].split(",")}
    assert checkpoint["model_config"]["task_classes"][1] == len(labels)   # no <UNK> class
    assert "spare_task_rows" not in checkpoint
    assert '"2"' in (tmp_path / "r.metrics.json").read_text()          # scored at the end with this numbering
    _, again = run_stage2(tmp_path, data, "r2", "--variant", "revised")
    for key, value in checkpoint["model_state"].items():
        assert torch.equal(value, again["model_state"][key]), key
    with pytest.raises(DataError, match="index.csv: --variant original --streams authors replays the original"):
        run_stage2(tmp_path, data, "x", "--variant", "original")


@pytest.mark.parametrize("extra, message", [
    (["--rows", "all"], "an option beyond the paper's rule"),
    (["--no_relation"], "an ablation"),
    (["--preset", "uniform_sampling", "--own_blocks", "1"], "an ablation or an option beyond"),
    (["--method", "finetune"], "not with --method finetune"),
    (["--resume"], "--resume"),
    (["--negatives", "5"], "--negatives"),
])
def test_authors_streams_refuse_what_they_do_not_replay(extra, message):
    argv = ["--datapath", "d.csv", "--datapath_index", "i.csv", "--savepath", "o", "--paths", "p.t7",
            "--streams", "authors", "--variant", "original", *extra]
    with pytest.raises(DataError, match=message):
        config.parse_args(2, argv)


def test_authors_streams_need_the_spare_rows(tmp_path, authors_stage1):
    data, _ = authors_stage1
    with pytest.raises(DataError, match="ours1.t7: has no spare task-embedding rows"):
        loop.main(2, ["--datapath", str(data.task2), "--datapath_index", str(tmp_path / "index.csv"), "--paths",
                         str(tmp_path / "ours1.t7"), "--savepath", str(tmp_path / "x"), "--epochs", "1",
                         "--device", "cpu", "--variant", "original", "--streams", "authors"])


def test_a_diverged_revised_checkpoint_is_refused(tmp_path):
    state = revised_state(23, [23, 31])
    state["residual_blocks.3.mlp2.1.weight"][0, 0] = float("nan")
    loaded, path = save_and_load(tmp_path, state, "nan.t7")
    with pytest.raises(DataError, match="nan.t7: residual_blocks.3.mlp2.1.weight holds NaN"):
        convert_original(loaded, path)
