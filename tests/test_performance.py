"""The fast paths of issue 6 compute exactly what the plain ones do.

The byte-level tokenizer against a per-line Python parse, the table look-ups against binary search,
the streaming backward of a TERACON step against one backward of the summed loss, the fused Adam
against torch's reference loop, --compile against eager, and the allocator setting against page faults.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import data_loader
from continual.methods.base import Step
from continual.training import loop, samplers
from continual.training.distributed import Shard
from model import ModelConfig, NextItNet
from teracon_helpers import stage4_models, task1_loss, teracon_loss, teracon_method, teracon_options


def python_parse(text: str, fields: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Reference: split lines and commas in Python (values with a 0 placeholder for ',,')."""
    values, starts, splits, file_lines = [], [0], [], []
    for number, line in enumerate(text.replace("\r", "").split("\n"), 1):
        if not line:
            continue
        if fields == 2:
            source, targets = line.split(",,")
            splits.append(len(values) + len(source.split(",")))
            values += [int(v) for v in source.split(",")] + [0] + [int(v) for v in targets.split(",")]
        else:
            values += [int(v) for v in line.split(",")]
        starts.append(len(values))
        file_lines.append(number)
    return values, starts, splits, file_lines


@pytest.mark.parametrize("fields", [1, 2])
def test_tokenize_matches_python_parse(tmp_path, monkeypatch, fields):
    monkeypatch.setattr(data_loader, "_CHUNK", 64)  # many chunks, tokens near every chunk edge
    rng = np.random.default_rng(fields)
    for trial in range(60):
        lines = []
        for _ in range(rng.integers(1, 25)):
            if rng.random() < 0.1:
                lines.append("")
                continue
            number = lambda: str(int(rng.integers(0, 10 ** int(rng.choice([1, 2, 4, 8, 9, 12, 16, 17, 18])))))
            source = ",".join(number() for _ in range(rng.integers(1, 12)))
            lines.append(source if fields == 1 else source + ",," + ",".join(number() for _ in range(rng.integers(1, 4))))
        lines.append("7" if fields == 1 else "7,,8")
        text = ("\r\n" if trial % 5 == 0 else "\n").join(lines) + ("\n" if trial % 2 else "")
        path = tmp_path / f"t{trial}.csv"
        path.write_bytes(text.encode())
        tokens = data_loader.tokenize(str(path), fields)
        values, starts, splits, file_lines = python_parse(text, fields)
        assert tokens.values.tolist() == values, text
        assert tokens.line_start.tolist() == starts
        assert tokens.file_line.tolist() == file_lines
        assert tokens.split.tolist() == (splits if fields == 2 else [])


def test_segments_regular_view_equals_general_copy():
    values = np.arange(40)
    starts, stops = np.array([0, 10, 20, 30]), np.array([6, 16, 26, 36])      # stride 10, width 6
    fast = data_loader.segments(values, starts, stops)
    assert not fast.flags.owndata                                              # a view, no copy
    np.testing.assert_array_equal(fast, [values[a:b] for a, b in zip(starts, stops)])
    ragged = data_loader.segments(values, np.array([0, 10, 21]), np.array([6, 13, 22]), pad_value=-1)
    np.testing.assert_array_equal(ragged, [[0, 1, 2, 3, 4, 5], [-1, -1, -1, 10, 11, 12], [-1, -1, -1, -1, -1, 21]])


@pytest.mark.parametrize("largest", [1000, 2**40])  # a table, and binary search beyond _DENSE_LIMIT
def test_lookup_and_unique_match_searchsorted(largest):
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(0, largest, 300))
    index = data_loader.ItemIndex(keys)
    raw = np.concatenate([rng.choice(keys, 500), [largest + 5, 1 if 1 not in keys else largest + 7]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapped = index.lookup(raw.reshape(2, -1), "f.csv")
    position = np.searchsorted(keys, raw)
    known = (position < keys.size) & (keys[np.minimum(position, keys.size - 1)] == raw)
    np.testing.assert_array_equal(mapped.reshape(-1), np.where(known, position + 1, 0))
    assert len(caught) == 1 and "2 item token(s) not in the index" in str(caught[0].message)
    unique_keys, inverse = data_loader.dense_unique(raw)
    expected_keys, expected_inverse = np.unique(raw, return_inverse=True)
    np.testing.assert_array_equal(unique_keys, expected_keys)
    np.testing.assert_array_equal(inverse, expected_inverse)


def test_multi_target_lines_share_one_source_row(tmp_path):
    path = tmp_path / "task2.csv"
    path.write_text("1,2,3,,7,8\n2,3,4,,9\n")
    index = data_loader.ItemIndex(np.array([1, 2, 3, 4]))
    data = data_loader.load_task(str(path), index)
    assert data.sources.shape == (2, 3) and data.targets.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(data.rows(np.array([0, 1, 2])), [0, 0, 1])
    np.testing.assert_array_equal(data.inputs, [[1, 2, 3], [1, 2, 3], [2, 3, 4]])


def test_streaming_backward_equals_one_backward_of_the_sum():
    """train_step back-propagates each term as it comes; the gradient must be that of the whole loss."""
    model, teacher = stage4_models()
    x, y = torch.randint(1, 40, (24, 9)), torch.randint(0, 6, (24,))
    options = teracon_options("paper", alpha=0.7, embedding_clamp="off")
    reference = copy.deepcopy(model)
    loss, kept, ratios = teracon_loss(reference, teacher, x, y, 3, 7.0, [0.9, 0.5, 0.3], np.random.default_rng(1),
                                      options)
    loss.backward()
    captured = {}

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    optimizer = Capture(model.parameters(), lr=0.0)
    method = teracon_method(teacher, 3, [0.9, 0.5, 0.3], np.random.default_rng(1), options)
    step_loss, step_kept, stepped = loop.train_step(model, method, optimizer, Step(x, y, 7.0, Shard(24)))
    step_ratios = method.ratios
    assert stepped and step_ratios == ratios and kept.item() > 0
    torch.testing.assert_close(step_loss, loss.detach())
    torch.testing.assert_close(step_kept, kept)
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert captured.keys() == expected.keys() and "heads.0.weight" in captured
    for name, grad in expected.items():
        torch.testing.assert_close(captured[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_non_finite_total_skips_the_step():
    model, teacher = stage4_models()
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randint(1, 40, (8, 9)), torch.randint(0, 6, (8,))
    with torch.no_grad():
        model.heads[3].bias.fill_(float("inf"))
    optimizer = samplers.adam(model.parameters(), 1e-2)
    method = teracon_method(teacher, 3, [0.9, 0.9, 0.9], np.random.default_rng(0),
                            teracon_options(alpha=0.7, uniform_sampling=True, embedding_clamp="off"))
    _, _, stepped = loop.train_step(model, method, optimizer, Step(x, y, 7.0, Shard(8)))
    assert not stepped and not optimizer.state
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model.blocks[0].conv1.weight, before["blocks.0.conv1.weight"])


def test_adam_matches_reference_loop():
    torch.manual_seed(0)
    model = NextItNet(ModelConfig(n_items=30, task_classes=[30], channels=8))
    reference = copy.deepcopy(model)
    fast, slow = samplers.adam(model.parameters(), 1e-2), torch.optim.Adam(reference.parameters(), lr=1e-2, foreach=False)
    items = torch.randint(1, 30, (6, 7))
    for _ in range(3):
        for net, optimizer in ((model, fast), (reference, slow)):
            optimizer.zero_grad()
            task1_loss(net, items, 5.0, 0.75).backward()
            optimizer.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_conv_weights_stored_channels_last_and_round_trip():
    model = NextItNet(ModelConfig(n_items=30, task_classes=[30], channels=8))
    weight = model.blocks[0].conv1.weight
    assert weight.shape == (8, 8, 3) and weight.stride() == (24, 1, 8)        # C_in innermost
    assert weight.unsqueeze(2).is_contiguous(memory_format=torch.channels_last)
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    other = NextItNet(ModelConfig(n_items=30, task_classes=[30], channels=8))
    other.load_state_dict(state, strict=True)
    assert other.blocks[0].conv1.weight.stride() == (24, 1, 8)
    assert torch.equal(other.blocks[0].conv1.weight, weight)


FAULTS = """
import resource, torch, utils
utils.keep_freed_memory()
for _ in range(3):
    torch.ones(16 * 2**20)                       # 64 MiB, allocated and freed
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    torch.ones(16 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faults(repo_root, subprocess_env):
    def faults(system_malloc: str) -> int:
        env = {**subprocess_env, "TERACON_SYSTEM_MALLOC": system_malloc}
        done = subprocess.run([sys.executable, "-c", FAULTS], cwd=repo_root, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])
    default, kept = faults("1"), faults("0")
    assert default > 40 * 16384 // 2        # each 64 MiB block faults its pages in again (4 KiB pages)
    assert kept < default / 4               # a few blocks' worth at most, not one per allocation


@pytest.mark.slow
def test_compile_gives_the_eager_results(data_writer, repo_root, subprocess_env, tmp_path):
    """train_teracon_t2.py --compile (student and teacher compiled) scores what the eager run scores."""
    data = data_writer(tmp_path / "data", n_users=300, seed=1)

    def run(script: str, *args) -> None:
        command = [sys.executable, script, *map(str, args), "--epochs", "1", "--device", "cpu",
                   "--datapath_index", str(tmp_path / "index.csv")]
        done = subprocess.run(command, cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    run("train_task1.py", "--datapath", data.task1, "--savepath", tmp_path / "task1", "--channels", 16, "--batch", 32)
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        run("train_teracon_t2.py", "--datapath", data.task2, "--paths", tmp_path / "task1.t7", "--batch", 64,
            "--savepath", tmp_path / name, *extra)
    eager, compiled = (json.loads((tmp_path / f"{n}.metrics.json").read_text()) for n in ("eager", "compiled"))
    for task, entry in eager["tasks"].items():
        for metric, value in entry["test"].items():
            assert compiled["tasks"][task]["test"][metric] == pytest.approx(value, abs=1e-6), (task, metric)


def test_staging_gathers_rows_of_a_strided_array():
    matrix = np.arange(60).reshape(6, 10)[:, 1:8]                               # a non-contiguous view
    staged = data_loader.Staging(matrix, torch.device("cpu"))(np.array([4, 0, 4]))
    assert staged.dtype == torch.int64 and staged.is_contiguous()
    np.testing.assert_array_equal(staged.numpy(), matrix[[4, 0, 4]])
