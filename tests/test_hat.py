"""HAT (Serrà et al., ICML 2018) on NextItNet: its gradient compensation never moves what earlier tasks use, and
its forgetting is exactly what its non-binary gates and LayerNorm leak, measured and bounded here."""
from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from unittest import mock

import numpy as np
import pytest
import torch

from continual.methods import checkpoints
from continual.methods import hat
from continual.methods.base import Step
from continual.training import config, loop
from continual.distributed import Shard
from model import TASK_EMBEDDING_CLAMP, ModelConfig, NextItNet
from utils import DataError

SMAX, ITEMS, CLASSES = 400.0, 50, 7


class Affine(torch.nn.Module):
    """LayerNorm's per-unit scale and shift without its normalisation over the layer's units."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(torch.ones(channels)), torch.nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def stage1_model(channels: int, binary: bool, layer_norm: bool, seed: int) -> NextItNet:
    """A HAT stage-1 model (gates σ(s·e), e ~ N(0, 1)); `binary`: task 1's embedding at ±10, so that its gates at
    smax are exactly 0 or 1 in float32; without `layer_norm`, every LayerNorm keeps its scale and shift only."""
    torch.manual_seed(seed)
    model = NextItNet(ModelConfig(n_items=ITEMS, task_classes=[ITEMS], channels=channels,
                                  **hat.HAT(hat.HATOptions(), None).model_config()))
    if binary:
        with torch.no_grad():
            model.task_embedding[0] = torch.sign(model.task_embedding[0]) * 10.0
    if not layer_norm:
        for block in model.blocks:
            block.ln1, block.ln2 = Affine(channels), Affine(channels)
    return model


def train_task2(model: NextItNet, compensate: bool = True, steps: int = 40, lr: float = 1e-3) -> tuple[NextItNet, hat.HAT]:
    """Stage 2 of HAT on random sources and labels, Adam at `lr` (the loop's step); `compensate` False drops Eq. 2's
    blocking (the capacity term and everything else stay). → (the model before stage 2, the method)."""
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    method = loop.method_for("hat", hat.HATOptions(), 2, frozen, np.random.default_rng(0), smax=SMAX)
    method.grow(model, CLASSES)
    start = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(1)
    with nullcontext() if compensate else mock.patch.object(hat, "compensate_units", lambda *_: None):
        for b in range(steps):
            x = torch.randint(1, ITEMS, (32, 12), generator=generator)
            y = torch.randint(0, CLASSES, (32,), generator=generator)
            loop.train_step(model, method, optimizer, Step(x, y, loop.anneal(b % 10, 10, SMAX), Shard(32, 0, 1)))
    return start, method


def task1_drift(before: NextItNet, after: NextItNet) -> float:
    """‖h_after − h_before‖ / ‖h_before‖ of task 1's last hidden state at smax on fixed users."""
    items = torch.randint(1, ITEMS, (64, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        old = before.hidden(items, before.task_masks(0, SMAX), True)
        new = after.hidden(items, after.task_masks(0, SMAX), True)
    return float((new - old).norm() / old.norm())


def test_compensation_never_moves_a_weight_of_the_units_earlier_tasks_use():
    """Every entry whose gradient share 1 − min(m_<t out, m_<t in) is 0 keeps its exact value through stage 2; the
    item embedding and task 1's embedding and head too; the free entries do train (so the check can fail)."""
    model = stage1_model(16, binary=False, layer_norm=True, seed=0)
    start, method = train_task2(model, lr=1e-2)
    moved_free = 0
    for (after, passes), (before, _) in zip(hat.unit_blocks(model, method.used), hat.unit_blocks(start, method.used)):
        blocked = passes.expand_as(after) == 0
        assert blocked.any()
        assert torch.equal(after[blocked], before[blocked])
        moved_free += int((after != before)[~blocked].sum())
    assert moved_free > 0
    assert torch.equal(model.item_embedding.weight, start.item_embedding.weight)
    assert torch.equal(model.task_embedding[0], start.task_embedding[0])
    assert all(torch.equal(a, b) for a, b in zip(model.heads[0].parameters(), start.heads[0].parameters()))
    assert not torch.equal(model.task_embedding[1], start.task_embedding[1])


def test_without_layernorm_and_with_binary_gates_nothing_is_forgotten():
    """No LayerNorm and gates exactly 0/1: task 1's outputs after stage 2 are bit-identical; without the
    compensation they are not."""
    model = stage1_model(16, binary=True, layer_norm=False, seed=0)
    start, _ = train_task2(model, lr=1e-2)
    assert task1_drift(start, model) == 0.0
    uncompensated = stage1_model(16, binary=True, layer_norm=False, seed=0)
    start, _ = train_task2(uncompensated, compensate=False, lr=1e-2)
    assert task1_drift(start, uncompensated) > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_leak_of_soft_gates_and_of_layernorm_is_measured_and_bounded(seed):
    """Task 1's drift after 40 Adam steps of stage 2 at lr 1e-3 (64 channels), measured 2026-12-02 (seeds 0–2):
    soft gates alone (no LayerNorm) leak a few per cent; the real blocks, where LayerNorm normalises each layer
    over every unit, so the free units' updates shift the used units' mean and variance, leak more; both stay
    below half of what the same stage does without the compensation."""
    drifts = {}
    for layer_norm in (False, True):
        for compensate in (True, False):
            model = stage1_model(64, binary=False, layer_norm=layer_norm, seed=seed)
            start, method = train_task2(model, compensate=compensate)
            drifts[layer_norm, compensate] = task1_drift(start, model)
        soft = float(((method.used > 0) & (method.used < 1)).float().mean())
        assert 0.0 < soft < 0.2                                             # N(0, 1) at smax 400: few soft gates
    assert 0.0 < drifts[False, True] < 0.1
    assert drifts[False, True] < 0.25 * drifts[False, False]
    assert drifts[True, True] < 0.5 * drifts[True, False]
    assert drifts[True, True] > drifts[False, True]                         # LayerNorm adds to the leak


def test_capacity_is_the_mean_gate_at_first_and_counts_free_units_after():
    masks = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    assert float(hat.capacity(masks, None)) == pytest.approx(0.5)
    used = torch.tensor([[1.0, 0.0], [0.5, 0.0]])                           # free: 0, 1, 0.5, 1
    assert float(hat.capacity(masks, used)) == pytest.approx((0.8 + 0.5 * 1.0) / 2.5)


def test_embedding_compensation_is_eq7_on_the_new_row_only():
    embedding = torch.nn.Parameter(torch.tensor([[[0.3, -2.0]], [[0.1, 7.0]]]))     # [2 tasks, 1 layer, 2]
    embedding.grad = torch.ones_like(embedding)
    hat.compensate_embedding(embedding, 1, 2.0, SMAX)
    assert embedding.grad[0].abs().sum() == 0
    for value, grad in zip([0.1, 7.0], embedding.grad[1, 0].tolist()):
        expected = SMAX / 2.0 * (math.cosh(min(2.0 * value, 50.0)) + 1) / (math.cosh(value) + 1)
        assert grad == pytest.approx(expected, rel=1e-5)


def test_hat_defaults_to_its_smax_and_an_explicit_one_wins():
    paths = ["--datapath", "d.csv", "--datapath_index", "i.csv", "--savepath", "o", "--paths", "p.t7"]
    assert config.parse_args(2, [*paths, "--method", "hat"]).smax == 400.0
    assert config.parse_args(2, [*paths, "--method", "hat", "--smax", "25"]).smax == 25.0
    assert config.parse_args(2, [*paths, "--method", "finetune"]).smax == 50.0
    assert config.parse_args(2, paths).smax == 50.0


def test_hat_continues_only_its_own_chain(tmp_path, synthetic_data):
    tiny_data = synthetic_data(n_users=120)
    """Stage 2 from a fine-tuning stage 1 (no gates) is refused, naming the file, before anything is written."""
    common = ["--datapath_index", str(tmp_path / "index.csv"), "--channels", "8", "--device", "cpu", "--epochs", "1"]
    loop.main(1, ["--datapath", str(tiny_data.task1), "--savepath", str(tmp_path / "ft1"), "--method", "finetune",
                  *common])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match="ft1.t7: is a checkpoint of --method finetune; --method hat continues only its "
                                        "own chain, from its own stage 1"):
        loop.main(2, ["--datapath", str(tiny_data.task2), "--paths", str(tmp_path / "ft1.t7"), "--savepath",
                      str(out / "hat2"), "--method", "hat", *common])
    assert not list(out.iterdir())


def test_the_stage1_checkpoint_keeps_hats_gates(tmp_path, synthetic_data):
    tiny_data = synthetic_data(n_users=120)
    """HAT's own stage 1: gates on, no relation layers, N(0, 1) embeddings, smax 400 recorded, λ in the options."""
    common = ["--datapath_index", str(tmp_path / "index.csv"), "--channels", "8", "--device", "cpu", "--epochs", "1"]
    loop.main(1, ["--datapath", str(tiny_data.task1), "--savepath", str(tmp_path / "hat1"), "--method", "hat", *common])
    saved = checkpoints.load_checkpoint(str(tmp_path / "hat1.t7"))
    assert saved["model_config"]["use_masks"] and not saved["model_config"]["relation"]
    assert saved["model_config"]["task_emb_dist"] == "normal"
    assert saved["run_config"]["smax"] == 400.0 and saved["run_config"]["options"]["hat_lambda"] == 0.75
    assert saved["model_state"]["task_embedding"].abs().max() <= TASK_EMBEDDING_CLAMP
