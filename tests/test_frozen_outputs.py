"""TERACON's --frozen_cache_mib: the frozen teacher's and expert's outputs at s = smax kept per training row and
reused in later epochs (issue 31). The loss must be the one recomputed every epoch; only the frozen forwards go."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from continual.methods.base import Step
from continual.methods.teracon import FrozenOutputs, plan_frozen_outputs
from continual.training import loop, samplers
from continual.training.distributed import Shard
from teracon_helpers import KL_EVERY_ROW, stage4_models, teracon_options

N_TRAIN, BATCH = 24, 8


def recommended_like(**changes):
    """The recommended rule's terms (KL at smax, mean weights, α 2, the new task at smax, the expert) over every
    row of each earlier task; rows="share" gives the preset's B // (K−1) rows of each."""
    return teracon_options("paper", **{**KL_EVERY_ROW, "alpha": 2.0, "expert_weight": 1.0, "new_task_at": "smax",
                                       **changes})


def train_epochs(options, epochs: int = 2) -> tuple[list[float], dict[str, torch.Tensor], dict[str, int]]:
    """`epochs` epochs of stage 4 over N_TRAIN rows in shuffled batches of BATCH, Step.ids given as the loop gives
    them → (every step's loss, the parameters after, rows each frozen model computed)."""
    model, teacher = stage4_models(own_blocks=1)
    expert = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        expert.heads[3].weight.mul_(0.5)                                    # an expert unlike the student
    computed = {"teacher": 0, "expert": 0}
    for name, frozen in (("teacher", teacher), ("expert", expert)):
        frozen.register_forward_hook(lambda _, inputs, __, name=name: computed.__setitem__(
            name, computed[name] + inputs[0].shape[0]))
    method = loop.method_for("teracon", options, 4, teacher, np.random.default_rng(5), n_train=N_TRAIN)
    method.ratios, method.expert = [0.9, 0.5, 0.3], expert
    sources = torch.randint(1, 40, (N_TRAIN, 9), generator=torch.Generator().manual_seed(2))   # [N_TRAIN, L]
    targets = torch.arange(N_TRAIN) % 6                                                         # [N_TRAIN]
    optimizer, order_rng, losses = samplers.adam(model.parameters(), 1e-3), np.random.default_rng(7), []
    for epoch in range(epochs):
        for b, rows in enumerate(np.array_split(order_rng.permutation(N_TRAIN), N_TRAIN // BATCH)):
            step = Step(sources[rows], targets[rows], 1.0 + 10.0 * b, Shard(rows.size), epoch + b / 3, rows)
            loss, _, stepped = loop.train_step(model, method, optimizer, step)
            assert stepped
            losses.append(float(loss))
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}, computed


def test_kept_outputs_give_the_recomputed_loss_and_skip_the_frozen_forwards_after_epoch_one():
    """Two epochs with the outputs kept and with none kept: every step's loss and the trained weights agree (to
    float rounding: a kept row was computed in another batch), and with them kept the teacher runs over each row
    once per earlier task, the expert once per row, all in the first epoch."""
    kept_losses, kept_weights, kept_computed = train_epochs(recommended_like())
    fresh_losses, fresh_weights, fresh_computed = train_epochs(recommended_like(frozen_cache_mib=0))
    np.testing.assert_allclose(kept_losses, fresh_losses, rtol=1e-5)
    for name, weight in kept_weights.items():
        torch.testing.assert_close(weight, fresh_weights[name], rtol=1e-5, atol=1e-6, msg=name)
    assert fresh_computed == {"teacher": 2 * 3 * N_TRAIN, "expert": 2 * N_TRAIN}   # every epoch, every row
    assert kept_computed == {"teacher": 3 * N_TRAIN, "expert": N_TRAIN}            # the first epoch only


def test_share_rows_fill_the_whole_batch_in_the_first_epoch():
    """--rows share draws B // (K−1) rows per earlier task; the teacher computes every row of the batch for each
    task the first time it sees the batch, so the first epoch fills the tables (3 × N_TRAIN rows, as recomputing
    --rows all would) and the later epochs compute nothing, where recomputing computes the drawn rows every step."""
    _, _, kept = train_epochs(recommended_like(rows="share"), epochs=3)
    _, _, fresh = train_epochs(recommended_like(rows="share", frozen_cache_mib=0), epochs=3)
    assert fresh["teacher"] == 3 * 3 * (BATCH // 3) * (N_TRAIN // BATCH)     # every draw, recomputed
    assert kept["teacher"] == 3 * N_TRAIN


def test_annealed_retention_keeps_only_the_expert():
    """At the annealed s the teacher's outputs change with s: recomputed every step; the expert's (at smax) kept."""
    _, _, computed = train_epochs(recommended_like(retention_at="annealed"))
    assert computed == {"teacher": 2 * 3 * N_TRAIN, "expert": N_TRAIN}


def test_steps_without_ids_recompute():
    """A Step built by hand (no ids: bench.py's random rows, tests) never reads a kept row."""
    model, teacher = stage4_models()
    method = loop.method_for("teracon", recommended_like(expert_weight=0.0), 4, teacher, np.random.default_rng(0),
                             n_train=N_TRAIN)
    x, y = torch.randint(1, 40, (6, 9)), torch.arange(6) % 6
    first = [t.detach() for t in method.terms(model, Step(x, y, 50.0, Shard(6)))]
    x[:, -1] = (x[:, -1] % 39) + 1                                            # other inputs, same (absent) ids
    second = [t.detach() for t in method.terms(model, Step(x, y, 50.0, Shard(6)))]
    assert set(method.kept) == {"task1", "task2", "task3"}
    assert not any(table.filled.any() for table in method.kept.values())
    assert any(not torch.equal(a, b) for a, b in zip(first[1:], second[1:]))


def test_plan_keeps_the_smallest_outputs_that_fit():
    """Float32 tables of n_rows × width, smallest first, within the budget: 1,000 rows × 40,000 items (160 MB)
    does not fit 100 MiB; the two small ones (28 kB, 24 kB) do; budget 0 keeps nothing."""
    widths = {"task1": 40_000, "task2": 7, "expert": 6}
    assert plan_frozen_outputs(1000, widths, 100) == ["expert", "task2"]
    assert plan_frozen_outputs(1000, widths, 153) == ["expert", "task2", "task1"]    # 152.6 MiB + 52 kB
    assert plan_frozen_outputs(1000, widths, 152) == ["expert", "task2"]
    assert plan_frozen_outputs(1000, widths, 0) == []
    assert plan_frozen_outputs(0, widths, 100) == []


def test_a_kept_table_computes_only_the_rows_it_lacks():
    table = FrozenOutputs(10, 3, torch.device("cpu"))
    asked: list[list[int]] = []

    def compute(rows: torch.Tensor) -> torch.Tensor:                        # batch position r → [r, r, r] + 100
        asked.append(rows.tolist())
        return rows[:, None].float().expand(-1, 3) + 100
    out = table.read(np.array([4, 7, 2]), np.array([1]), compute)           # the whole batch kept, row 7 returned
    torch.testing.assert_close(out, torch.tensor([[101.0] * 3]))
    out = table.read(np.array([9, 4, 7]), np.array([0, 2, 1]), compute)     # 4 and 7 kept; 9 new at position 0
    torch.testing.assert_close(out, torch.tensor([[100.0] * 3, [101.0] * 3, [100.0] * 3]))
    assert asked == [[0, 1, 2], [0]]


def test_one_run_keeps_the_outputs_and_scores_as_without(tmp_path, data_writer, monkeypatch):
    """A real stage 1 and stage 2 of --preset recommended with an expert, two epochs: the loop hands Step.ids and
    the stage's training rows, the kept tables are read, and the stage scores as with --frozen_cache_mib 0."""
    data = data_writer(tmp_path / "data", n_users=120, seed=2)
    reads = []
    original = FrozenOutputs.read
    monkeypatch.setattr(FrozenOutputs, "read", lambda self, *args: reads.append(1) or original(self, *args))
    common = ["--datapath_index", str(tmp_path / "index.csv"), "--channels", "8", "--device", "cpu", "--batch", "32"]
    loop.main(1, ["--datapath", str(data.task1), "--savepath", str(tmp_path / "t1"), "--epochs", "1", *common])
    later = ["--datapath", str(data.task2), "--paths", str(tmp_path / "t1.t7"), "--epochs", "2", "--patience", "2",
             *common]
    loop.main(2, [*later, "--savepath", str(tmp_path / "ft"), "--method", "finetune"])
    scores = {}
    for budget in ("1024", "0"):
        reads.clear()
        metrics = loop.main(2, [*later, "--savepath", str(tmp_path / f"kept{budget}"), "--preset", "recommended",
                                "--expert", str(tmp_path / "ft.t7"), "--frozen_cache_mib", budget])
        scores[budget] = [metrics["tasks"][number]["test"] for number in ("1", "2")]
        assert bool(reads) == (budget != "0")
    for kept, fresh in zip(scores["1024"], scores["0"]):
        assert kept.keys() == fresh.keys()
        for name in kept:
            assert kept[name] == pytest.approx(fresh[name], abs=1e-6), name

