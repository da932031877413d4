"""Unit tests of the model, the data loader, the metrics, the retention pieces and checkpoints.

Every expected value is computed independently in the test (SPEC formulas written inline), never
copied from a run.
"""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import data_loader
import utils
from continual import checkpoints
from continual.evaluation import metrics, scoring
from continual.methods import teracon
from continual.methods.base import distillation_kl
from continual.training import config, loop, samplers
from continual.training.distributed import Shard
from model import ModelConfig, NextItNet, causal_conv
from teracon_helpers import teracon_options

# ------------------------------------------------------------------ backbone

@pytest.mark.parametrize("relation", [False, True])
def test_backbone_is_causal(tiny_model, relation):
    classes = [30, 7, 4] if relation else [30]
    model = tiny_model(task_classes=classes, relation=relation, seed=1)
    gen = torch.Generator().manual_seed(0)
    items = torch.randint(1, 30, (3, 20), generator=gen)
    task = len(classes) - 1
    with torch.no_grad():
        base, _ = model(items, task, 2.0, last_only=False)             # [B, L, n]
        for p in (0, 5, 13, 19):
            changed = items.clone()
            changed[:, p] = (changed[:, p] + 7) % 29 + 1                 # a different item at position p
            assert not torch.equal(changed[:, p], items[:, p])
            out, _ = model(changed, task, 2.0, last_only=False)
            assert torch.equal(out[:, :p], base[:, :p]), f"output before position {p} changed"
            assert (out[:, p:] - base[:, p:]).abs().max() > 1e-6, f"no output at >= {p} reacts to item {p}"


@pytest.mark.parametrize("relation", [False, True])
@pytest.mark.parametrize("dilations,lengths", [
    (None, (5, 30, 100, 150)),       # default [1,4]*4: receptive field 121 positions
    ((1, 2), (5, 17, 19, 30, 64)),   # receptive field 19: trimming is exercised at short lengths
])
def test_last_only_equals_last_position(tiny_model, relation, dilations, lengths):
    classes = [25, 6, 3] if relation else [25]
    model = tiny_model(task_classes=classes, relation=relation, dilations=dilations, seed=2)
    gen = torch.Generator().manual_seed(1)
    for length in lengths:
        items = torch.randint(0, 25, (4, length), generator=gen)
        for task in range(len(classes)):
            with torch.no_grad():
                full, masks_full = model(items, task, 3.0, last_only=False)
                last, masks_last = model(items, task, 3.0, last_only=True)
            assert full.shape == (4, length, classes[task])
            assert last.shape == (4, classes[task])
            assert torch.equal(masks_full, masks_last)
            torch.testing.assert_close(last, full[:, -1], rtol=1e-5, atol=1e-5,
                                       msg=f"length {length}, task {task}: last_only differs from full[:, -1]")


def _authors_conv(x, weight, bias, dilation):
    """NextItNet's conv: [B, L, C] → ZeroPad2d((k−1)·d, 0, 0, 0) → Conv2d(kernel (1, k), dilation d)."""
    c_out, c_in, k = weight.shape
    conv = nn.Conv2d(c_in, c_out, kernel_size=(1, k), padding=0, dilation=dilation)
    with torch.no_grad():
        conv.weight.copy_(weight[:, :, None, :])
        conv.bias.copy_(bias)
    pad = nn.ZeroPad2d(((k - 1) * dilation, 0, 0, 0))
    padded = pad(x.permute(0, 2, 1).unsqueeze(2))                    # [B, C, 1, L + (k−1)d]
    return conv(padded).squeeze(2).permute(0, 2, 1)                   # [B, L, C_out]


@pytest.mark.parametrize("dilation", [1, 2, 4, 8])
@pytest.mark.parametrize("kernel", [3, 2])
def test_causal_conv_matches_authors_conv2d(dilation, kernel):
    gen = torch.Generator().manual_seed(dilation * 10 + kernel)
    x = torch.randn(2, 23, 6, generator=gen)
    weight = torch.randn(5, 6, kernel, generator=gen)
    bias = torch.randn(5, generator=gen)
    with torch.no_grad():
        expected = _authors_conv(x, weight, bias, dilation)           # [2, 23, 5]
        full = causal_conv(x, weight, bias, dilation, n_out=23)
        torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-5)
        for n_out in (1, 4, 11):                                       # only the last n_out positions
            torch.testing.assert_close(causal_conv(x, weight, bias, dilation, n_out), expected[:, -n_out:],
                                       rtol=1e-5, atol=1e-5)
        # x holding only the positions the last output needs (the trimmed window) gives the same result
        need = 3 + (kernel - 1) * dilation
        if need <= 23:
            torch.testing.assert_close(causal_conv(x[:, -need:], weight, bias, dilation, 3), expected[:, -3:],
                                       rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ masks

def test_plain_masks_range_and_annealing(tiny_model):
    smax = 50.0
    batches = 37
    assert loop.anneal(0, batches, smax) == pytest.approx(1.0 / smax, abs=1e-12)
    assert loop.anneal(batches, batches, smax) == pytest.approx(smax, abs=1e-9)
    assert loop.anneal(batches / 2, batches, smax) == pytest.approx((1.0 / smax + smax) / 2, rel=1e-9)
    values = [loop.anneal(b, batches, smax) for b in range(batches + 1)]
    assert all(b > a for a, b in zip(values, values[1:]))

    model = tiny_model(task_classes=[20, 5], seed=3)
    with torch.no_grad():
        model.task_embedding.uniform_(0.0, 2.0)                       # the SPEC's init range
    for task in range(2):
        for s in (1.0 / smax, 1.0, smax):
            masks = model.task_masks(task, s)
            assert masks.shape == (model.config.n_layers, model.config.channels)
            assert torch.all(masks >= 0) and torch.all(masks <= 1)        # float32 σ saturates at s = smax
            if s <= 1.0:
                assert torch.all(masks > 0) and torch.all(masks < 1)
            torch.testing.assert_close(masks, torch.sigmoid(s * model.task_embedding[task]))
        start = model.task_masks(task, 1.0 / smax)
        assert (start - 0.5).abs().max() < 0.011, "at s = 1/smax a plain mask must be close to 0.5"
        assert (model.task_masks(task, smax) - 0.5).abs().max() > 0.3


def _hand_relation_mask(model, task, s):
    emb = model.task_embedding.detach()                              # [N, n_layers, C]
    n_tasks, n_layers, _ = emb.shape
    rows = []
    for layer in range(n_layers):
        E = [emb[task, layer]]
        for j in range(n_tasks):
            if j != task:
                E.append(emb[j, layer])
                E.append(-emb[j, layer])
        E = torch.stack(E)                                            # [2N−1, C]
        assert E.shape[0] == 2 * n_tasks - 1
        w = model.relation_weight.detach()[task, layer]               # [2N−1]
        b = model.relation_bias.detach()[task, layer]
        rows.append(torch.sigmoid(s * (w @ torch.tanh(s * E) + b)))
    return torch.stack(rows)


@pytest.mark.parametrize("s", [0.02, 0.7, 3.0, 50.0])
def test_relation_mask_matches_hand_computation(tiny_model, s):
    model = tiny_model(task_classes=[20, 5, 3], relation=True, seed=4)
    n_layers = model.config.n_layers
    assert model.relation_weight.shape == (3, n_layers, 5)
    assert model.relation_bias.shape == (3, n_layers)
    with torch.no_grad():
        for task in range(3):
            got = model.task_masks(task, s)
            expected = _hand_relation_mask(model, task, s)
            assert got.shape == expected.shape == (n_layers, model.config.channels)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            assert torch.all(got >= 0) and torch.all(got <= 1)
            if s < 10:
                assert torch.all(got > 0) and torch.all(got < 1)


def test_relation_mask_default_init_in_unit_interval():
    torch.manual_seed(0)
    model = NextItNet(ModelConfig(n_items=20, task_classes=[20, 5], channels=8, relation=True))
    assert torch.all(model.relation_bias == 0.1)
    assert model.relation_weight.std() < 0.05
    for task in range(2):
        masks = model.task_masks(task, 2.0)
        assert torch.all(masks > 0) and torch.all(masks < 1)


# ------------------------------------------------------------------ metrics

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


# ------------------------------------------------------------------ split

@pytest.mark.parametrize("n", [20, 101, 1000])
@pytest.mark.parametrize("seed", [10, 3])
def test_split_matches_spec_formula(n, seed):
    np.random.seed(seed)
    perm = np.random.permutation(n)
    dev = -int(0.2 * n)
    dv = int(dev * 0.75)
    train, valid, test = data_loader.split_indices(n, seed)
    np.testing.assert_array_equal(train, perm[:dev])
    np.testing.assert_array_equal(valid, perm[dev:dv])
    np.testing.assert_array_equal(test, perm[dv:])
    assert len(train) + len(valid) + len(test) == n
    assert len(np.unique(np.concatenate([train, valid, test]))) == n


# ------------------------------------------------------------------ data loading

def test_task1_ragged_lines_left_padded_and_index_numbering(tmp_path):
    path = tmp_path / "task1.csv"
    path.write_text("12,100,7\n100,7\n\n3,12,100,7\n")                # ragged, one blank line, 100 > 12 > 7 > 3
    sequences, index = data_loader.load_sequences(str(path))
    # <UNK>=0, then ascending integer ids: 0→1, 3→2, 7→3, 12→4, 100→5
    np.testing.assert_array_equal(index.keys, [0, 3, 7, 12, 100])
    assert index.size == 6
    expected_raw = np.array([[0, 12, 100, 7], [0, 0, 100, 7], [3, 12, 100, 7]])
    mapping = {0: 1, 3: 2, 7: 3, 12: 4, 100: 5}
    np.testing.assert_array_equal(sequences, np.vectorize(mapping.get)(expected_raw))
    assert sequences.dtype == np.int64

    # write_index / read_index round-trip; numbering visible in the file
    index_path = tmp_path / "index.csv"
    data_loader.write_index(index, str(index_path))
    lines = index_path.read_text().splitlines()
    assert lines[:3] == ["item,index", "<UNK>,0", "0,1"]
    assert lines[-1] == "100,5"
    again = data_loader.read_index(str(index_path))
    np.testing.assert_array_equal(again.keys, index.keys)
    assert again.size == index.size


def test_authors_dict_index_reads(tmp_path):
    path = tmp_path / "index.csv"
    original = {'<UNK>': 0, '0': 1, '5': 2, '17': 3, '120': 4}
    path.write_text(str(original))                                    # the authors' str(dict) format
    index = data_loader.read_index(str(path))
    assert index.size == len(original)
    np.testing.assert_array_equal(index.keys, [0, 5, 17, 120])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mapped = index.lookup(np.array([[0, 5, 17, 120]]), "x")
    np.testing.assert_array_equal(mapped, [[original[str(k)] for k in (0, 5, 17, 120)]])
    path.write_text("{'<UNK>': 0, '0': 1, '5': 2}")
    small = data_loader.read_index(str(path))
    np.testing.assert_array_equal(small.keys, [0, 5])


def test_task_file_expands_targets_and_maps_sources(tmp_path):
    index_path = tmp_path / "index.csv"
    index_path.write_text("item,index\n<UNK>,0\n0,1\n3,2\n7,3\n12,4\n100,5\n")
    index = data_loader.read_index(str(index_path))
    path = tmp_path / "task2.csv"
    path.write_text("3,7,12,,900,20\n12,100,,20\n0,7,100,,55,900,20\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # every source item is known
        data = data_loader.load_task(str(path), index)
    # targets get their own index: <UNK>=0, 20→1, 55→2, 900→3
    assert data.n_classes == 4
    np.testing.assert_array_equal(data.targets, [3, 1, 1, 2, 3, 1])
    line0, line1, line2 = [2, 3, 4], [1, 4, 5], [1, 3, 5]            # line 1 left-padded with raw 0 → item 1
    np.testing.assert_array_equal(data.inputs, [line0, line0, line1, line2, line2, line2])
    assert data.inputs.shape == (6, 3)


def test_unknown_source_items_warn_once_with_count(tmp_path):
    index_path = tmp_path / "index.csv"
    index_path.write_text("{'<UNK>': 0, '0': 1, '5': 2, '9': 3}")
    index = data_loader.read_index(str(index_path))
    path = tmp_path / "task.csv"
    path.write_text("5,9,44,,1\n77,5,9,,2\n44,44,9,,1,2\n")          # 4 unknown source tokens (44, 77, 44, 44)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = data_loader.load_task(str(path), index)
    relevant = list(caught)
    assert len(relevant) == 1, [str(w.message) for w in caught]
    assert re.search(r"(?<!\d)4(?!\d)", str(relevant[0].message)), str(relevant[0].message)
    np.testing.assert_array_equal(data.inputs[0], [2, 3, 0])
    np.testing.assert_array_equal(data.inputs[1], [0, 2, 3])
    np.testing.assert_array_equal(data.inputs[2], [0, 0, 3])
    np.testing.assert_array_equal(data.inputs[3], [0, 0, 3])


def test_batches_keep_every_row():
    got = data_loader.batches(10, 4, np.random.default_rng(0))
    assert [len(b) for b in got] == [4, 4, 2]
    assert sorted(np.concatenate(got).tolist()) == list(range(10))
    plain = data_loader.batches(5, 2, None)
    assert [b.tolist() for b in plain] == [[0, 1], [2, 3], [4]]


# ------------------------------------------------------------------ checkpoints and add_task

def _args(tmp_path, stage):
    argv = ["--datapath", str(tmp_path / "d.csv"), "--datapath_index", str(tmp_path / "index.csv"),
            "--savepath", str(tmp_path / f"task{stage}"), "--channels", "16", "--device", "cpu"]
    if stage > 1:
        argv += ["--paths", str(tmp_path / f"task{stage - 1}.t7")]
    return config.parse_args(stage, argv)


@pytest.mark.parametrize("relation", [False, True])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, tiny_model, relation):
    classes = [30, 6, 3] if relation else [30]
    model = tiny_model(task_classes=classes, relation=relation, seed=7)
    stage = len(classes)
    args = _args(tmp_path, stage)
    tasks = [{"name": f"task{k}", "datapath": "x", "kind": "rec", "n_classes": n, "seed": 10,
              "split_percentage": 0.2} for k, n in enumerate(classes, 1)]
    path = tmp_path / "ckpt.t7"
    utils.atomic_torch_save(loop.checkpoint_dict(args, model, {}, tasks, 0, {"acc": 0.5}, finished=True), str(path))
    checkpoint = checkpoints.load_checkpoint(str(path))
    assert checkpoint["stage"] == stage
    loaded = NextItNet.from_checkpoint(checkpoint).eval()
    assert loaded.config == model.config
    items = torch.randint(0, 30, (5, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for task in range(len(classes)):
            for s in (0.5, 50.0):
                a, ma = model(items, task, s, last_only=False)
                b, mb = loaded(items, task, s, last_only=False)
                assert torch.equal(a, b) and torch.equal(ma, mb)


def test_load_checkpoint_rejects_foreign_files(tmp_path):
    bad = tmp_path / "bad.t7"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(utils.DataError):
        checkpoints.load_checkpoint(str(bad))
    with pytest.raises(utils.DataError):
        checkpoints.load_checkpoint(str(tmp_path / "missing.t7"))
    foreign = tmp_path / "foreign.t7"
    torch.save({"state": torch.zeros(2)}, foreign)
    with pytest.raises(utils.DataError):
        checkpoints.load_checkpoint(str(foreign))


def test_add_task_without_relation_keeps_earlier_outputs(tiny_model):
    model = tiny_model(task_classes=[30, 6], relation=False, seed=8)
    items = torch.randint(0, 30, (4, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = [model(items, t, s)[0] for t in range(2) for s in (0.3, 50.0)]
    heads = [(h.weight.detach().clone(), h.bias.detach().clone()) for h in model.heads]
    rows = model.task_embedding.detach().clone()
    model.add_task(5, relation=False)
    assert model.config.task_classes == [30, 6, 5]
    assert len(model.heads) == 3 and model.heads[2].out_features == 5
    assert model.task_embedding.shape[0] == 3
    with torch.no_grad():
        after = [model(items, t, s)[0] for t in range(2) for s in (0.3, 50.0)]
        new, _ = model(items, 2, 50.0)
    assert new.shape == (4, 5)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    for (w, b), head in zip(heads, model.heads):
        assert torch.equal(head.weight, w) and torch.equal(head.bias, b)
    assert torch.equal(model.task_embedding[:2], rows)
    assert isinstance(model.task_embedding, nn.Parameter)
    assert any(p is model.task_embedding for p in model.parameters())


def test_add_task_with_relation_keeps_earlier_weights(tiny_model):
    model = tiny_model(task_classes=[30, 6], relation=True, seed=9)
    heads = [(h.weight.detach().clone(), h.bias.detach().clone()) for h in model.heads]
    rows = model.task_embedding.detach().clone()
    backbone = {k: v.clone() for k, v in model.state_dict().items()
                if k.startswith(("item_embedding", "blocks"))}
    model.add_task(4, relation=True)
    n_layers = model.config.n_layers
    assert model.relation_weight.shape == (3, n_layers, 5)
    assert model.relation_bias.shape == (3, n_layers)
    for (w, b), head in zip(heads, model.heads):
        assert torch.equal(head.weight, w) and torch.equal(head.bias, b)
    assert torch.equal(model.task_embedding[:2], rows)
    for key, value in backbone.items():
        assert torch.equal(model.state_dict()[key], value)
    registered = {name for name, _ in model.named_parameters()}
    assert {"task_embedding", "relation_weight", "relation_bias"} <= registered
    masks = model.task_masks(2, 3.0)
    torch.testing.assert_close(masks, _hand_relation_mask(model, 2, 3.0), rtol=1e-5, atol=1e-6)


def test_add_task_draws_every_relation_layer_fresh(tiny_model):
    """Growing redraws every task's relation layer, as the authors do: every earlier task's masks and outputs move
    (the study that kept them ended negative, docs/retention.md); the new layer has the new context's width."""
    items = torch.randint(0, 30, (4, 11), generator=torch.Generator().manual_seed(5))
    model = tiny_model(task_classes=[30, 6], relation=True, seed=10)
    with torch.no_grad():
        model.relation_weight.normal_(0.0, 0.5)                             # trained-looking relation layers
        before = [(model(items, t, s)[0], model.task_masks(t, s)) for t in range(2) for s in (0.3, 50.0)]
    model.add_task(4, relation=True)
    with torch.no_grad():
        after = [(model(items, t, s)[0], model.task_masks(t, s)) for t in range(2) for s in (0.3, 50.0)]
    assert not any(torch.equal(a, b) or torch.equal(ma, mb) for (a, ma), (b, mb) in zip(before, after))
    assert model.relation_weight.shape == (3, model.config.n_layers, 5)
    torch.testing.assert_close(model.task_masks(1, 3.0), _hand_relation_mask(model, 1, 3.0), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ retention pieces

def test_sampling_ratio_by_hand():
    gen = torch.Generator().manual_seed(11)
    teacher = torch.rand(6, 10, generator=gen)
    current = torch.rand(6, 10, generator=gen)
    cosines = [float(teacher[l] @ current[l] / (teacher[l].norm() * current[l].norm())) for l in range(6)]
    expected = 1.0 - np.mean([1.0 / (1.0 + math.exp(-6.0 * c)) for c in cosines])
    assert teracon.sampling_ratio(teacher, current) == pytest.approx(expected, abs=1e-6)
    # identical masks: cos = 1 → 1 − σ(6)
    assert teracon.sampling_ratio(teacher, teacher) == pytest.approx(1.0 - 1.0 / (1.0 + math.exp(-6.0)), abs=1e-6)
    # opposite-signed rows: cos = −1 → 1 − σ(−6)
    assert teracon.sampling_ratio(teacher, -teacher) == pytest.approx(1.0 - 1.0 / (1.0 + math.exp(6.0)), abs=1e-6)


def test_retention_plan_by_hand():
    ratios = [0.9, 0.2, 0.05]
    total = sum(ratios)
    # paper (Eqs. 15–16): int(B · ratio_j) rows, weight ratio_j / Σ ratio
    paper = teracon_options("paper")
    assert teracon.retention_plan(paper, ratios, 100) == [(90, 0.9 / total), (20, 0.2 / total), (5, 0.05 / total)]
    assert [rows for rows, _ in teracon.retention_plan(paper, [0.0025] * 5, 256)] == [0] * 5  # the vanishing sample
    # all_rows: every row, same weights; per_task: every row, weights with mean 1
    assert teracon.retention_plan(teracon_options("paper", rows="all"), ratios, 100) == [(100, r / total) for r in ratios]
    per_task = teracon.retention_plan(teracon_options("paper", rows="all", weights="mean"), ratios, 64)
    assert [rows for rows, _ in per_task] == [64] * 3
    assert [w for _, w in per_task] == pytest.approx([3 * r / total for r in ratios])
    assert teracon.retention_plan(teracon_options("paper", rows="all", weights="mean"), [0.0025] * 5, 256) == [(256, pytest.approx(1.0))] * 5
    assert teracon.retention_plan(teracon_options("paper"), [0.0, 0.0], 10) == [(0, 0.0), (0, 0.0)]
    # share: B // (K−1) rows of each earlier task (at least one), the weights of per_task
    share = teracon_options("paper", rows="share", weights="mean")
    assert teracon.retention_plan(share, ratios, 64) == [(21, w) for _, w in per_task]
    assert [rows for rows, _ in teracon.retention_plan(share, [0.0025] * 5, 256)] == [51] * 5
    assert [rows for rows, _ in teracon.retention_plan(share, [0.5] * 5, 3)] == [1] * 5
    with pytest.raises(ValueError, match="rows must be one of sampled, all"):
        teracon_options(rows="nope")


def test_retention_rows_global_draw_and_shards():
    counts = [5, 3]
    whole = samplers.OurSampler(np.random.default_rng(4)).retention_rows(counts, 11, one_shuffle=False)
    assert [p.size for p in whole] == [5, 3] and all(len(set(p)) == p.size and p.max() < 11 for p in whole)
    nested = samplers.OurSampler(np.random.default_rng(4)).retention_rows(counts, 11, one_shuffle=True)
    assert np.array_equal(nested[1], nested[0][:3])                   # prefixes of one shuffle
    # two ranks: rank r holds global rows r, r+2, …; together they hold exactly the one-process rows
    shards = [Shard(11, rank, 2) for rank in range(2)]
    assert [shard.rows for shard in shards] == [6, 5] and Shard(1, 1, 2).rows == 0
    for positions in whole:
        local = [shard.local(positions) for shard in shards]
        assert sorted(np.concatenate([2 * local[0], 2 * local[1] + 1]).tolist()) == sorted(positions.tolist())


def test_retention_term_by_hand_and_gradient():
    gen = torch.Generator().manual_seed(12)
    student = torch.randn(7, 30, generator=gen, requires_grad=True)
    teacher = torch.randn(7, 30, generator=gen)
    loss = teracon.retention_term(student, teacher, 0.4)
    assert float(loss.detach()) == pytest.approx(0.4 * float(((student.detach() - teacher) ** 2).mean()), rel=1e-5)
    loss.backward()
    torch.testing.assert_close(student.grad, 0.4 * 2 * (student.detach() - teacher) / student.numel())


def test_kl_retention_term_by_hand_and_gradient():
    gen = torch.Generator().manual_seed(13)
    student = torch.randn(5, 9, generator=gen, requires_grad=True)
    teacher = torch.randn(5, 9, generator=gen)
    loss = teracon.retention_term(student, teacher, 0.4, "kl")
    p, q = torch.softmax(teacher, 1), torch.softmax(student.detach(), 1)
    assert float(loss.detach()) == pytest.approx(0.4 * float((p * (p.log() - q.log())).sum(1).mean()), rel=1e-5)
    loss.backward()
    torch.testing.assert_close(student.grad, 0.4 * (q - p) / 5)              # d KL / d logits = q − p per row
    shifted = teracon.retention_term(student.detach() + 3.0, teacher, 0.4, "kl")
    assert float(shifted) == pytest.approx(float(loss.detach()), rel=1e-5)  # a common shift costs nothing


def test_distillation_kl_with_a_temperature_by_hand_and_gradient():
    """base.distillation_kl at T ≠ 1 (LwF's T = 2): KL(softmax(teacher / T) ‖ softmax(student / T)), not scaled."""
    gen = torch.Generator().manual_seed(14)
    student = torch.randn(5, 9, generator=gen, requires_grad=True)
    teacher = torch.randn(5, 9, generator=gen)
    temperature = 0.5
    loss = distillation_kl(student, teacher, temperature)
    p, q = torch.softmax(teacher / temperature, 1), torch.softmax(student.detach() / temperature, 1)
    kl = float((p * (p.log() - q.log())).sum(1).mean())
    assert float(loss.detach()) == pytest.approx(kl, rel=1e-5)
    loss.backward()
    torch.testing.assert_close(student.grad, (q - p) / temperature / 5)   # (q_T − p_T) / T per row
    plain = distillation_kl(student.detach(), teacher)
    assert float(plain) != pytest.approx(float(loss.detach()), rel=1e-3)    # the temperature changes the term
    assert float(distillation_kl(student.detach(), teacher, 1.0)) == float(plain)
    assert float(teracon.retention_term(student.detach(), teacher, 0.4, "kl")) == pytest.approx(0.4 * float(plain))
