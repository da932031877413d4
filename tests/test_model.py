"""model.py: the NextItNet backbone (causality, the authors' dilated convolution, channels-last weights, --compile,
recomputed blocks), the task masks (Eqs. 11-13, by hand), growing by a task, and checkpoint round trips."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import utils
from continual.methods import checkpoints
from continual.methods.base import next_item_loss
from continual.training import config, loop
from model import ModelConfig, NextItNet, causal_conv


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


def test_recomputed_blocks_give_the_same_loss_and_gradients(tiny_model, monkeypatch):
    """Above model.RECOMPUTE_BYTES a pass keeps only each block's input and recomputes the block in backward: the
    same loss and the same gradients, bit for bit; the bytes kept for backward fall."""
    import model as model_module
    from continual.training.resources import SavedForBackward
    results = []
    for limit in (2**40, 0):                                          # never, always
        monkeypatch.setattr(model_module, "RECOMPUTE_BYTES", limit)
        model = tiny_model(task_classes=(30,), channels=8)
        saved = SavedForBackward(list(model.parameters()))
        with saved.term():
            loss = next_item_loss(model, torch.randint(1, 30, (6, 9), generator=torch.Generator().manual_seed(0)),
                                  model.task_masks(0, 3.0), ce_chunk=0)
        parameters = [p for p in model.parameters() if p.requires_grad]
        results.append((loss.detach(), list(torch.autograd.grad(loss, parameters)), saved.largest))
    (whole, whole_grads, kept_all), (recomputed, recomputed_grads, kept_inputs) = results
    assert torch.equal(whole, recomputed)
    for got, want in zip(recomputed_grads, whole_grads):
        assert torch.equal(got, want)
    assert kept_inputs < kept_all / 2


# ------------------------------------------------------------------ items that arrive over time (--protocol time)

def test_growing_the_items_keeps_every_existing_row_and_round_trips(tiny_model, tmp_path):
    """add_items appends rows to the item embedding (and a task's own copy of it) and to task 1's head; every
    existing row and every other parameter stays bit-identical, earlier items score as before, new items can be
    read and scored, and the grown checkpoint loads strictly with each row's stage."""
    model = tiny_model(task_classes=[30, 6], relation=True, seed=4)
    model.add_task(5, relation=True, own_embedding=True)                        # stage 3 with its own embedding
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    old_items = torch.randint(1, 30, (4, 9), generator=torch.Generator().manual_seed(1))
    model.add_items(7)                                                           # stage 4 brings 7 new items
    model.add_task(4, relation=True)
    state = model.state_dict()
    for name, tensor in before.items():
        if name in ("item_embedding.weight", "task_item_embeddings.2.weight", "heads.0.weight", "heads.0.bias"):
            assert state[name].shape[0] == tensor.shape[0] + 7 and torch.equal(state[name][:30], tensor), name
        elif not name.startswith(("relation_", "task_embedding")):              # redrawn / grown by add_task
            assert torch.equal(state[name], tensor), name
    assert model.config.n_items == 37 and model.config.task_classes == [37, 6, 5, 4]
    assert model.config.item_counts == [30, 30, 30, 37]
    assert [model.config.item_stage(row) for row in (0, 29, 30, 36)] == [1, 1, 4, 4]
    assert model.config.first_new_item() == 30 and model.config.items_at(1) == 30
    with torch.no_grad():
        task1 = model(old_items, 0, 50.0)[0]
        new_items = torch.randint(30, 37, (4, 9), generator=torch.Generator().manual_seed(2))
        assert model(new_items, 0, 50.0)[0].shape == (4, 37)
    assert task1.shape == (4, 37)
    path = tmp_path / "grown.t7"
    torch.save({"model_config": dataclasses.asdict(model.config), "model_state": model.state_dict()}, path)
    loaded = NextItNet.from_checkpoint(torch.load(path, weights_only=True)).eval()
    assert loaded.config.item_counts == [30, 30, 30, 37]
    with torch.no_grad():
        assert torch.equal(loaded(new_items, 0, 50.0)[0], model(new_items, 0, 50.0)[0])
    loaded.add_task(3, relation=True)                      # a stage that brought no items (no add_items): none new
    assert loaded.config.first_new_item() is None


def test_growing_the_items_before_any_relation_keeps_the_scores_of_earlier_items(tiny_model):
    """With plain masks (no relation layers to redraw) the scores of every earlier task on earlier items are the
    same after the growth, bit for bit, over the earlier items' columns of task 1."""
    model = tiny_model(task_classes=[30, 6], relation=False, seed=5)
    items = torch.randint(1, 30, (4, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = [model(items, task, 50.0)[0] for task in range(2)]
        model.add_items(3)
        after = [model(items, task, 50.0)[0] for task in range(2)]
    assert torch.equal(after[0][:, :30], before[0]) and torch.equal(after[1], before[1])
    assert model.config.item_counts == [30, 30, 33]
