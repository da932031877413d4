"""continual/methods/teracon.py: TERACON's stage loss by hand (the sampling ratio, Eq. 15; the retention plan, rows and
terms, Eq. 16; the weights from this or the previous batch), its options (--own_lr as a parameter group, --new_task_at,
--expert, --own_blocks, --frozen_cache_mib, the ablations), and real stages that use them."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from continual.methods import teracon
from continual.methods.base import Step, distillation_kl
from continual.methods.teracon import FrozenOutputs, Teracon, own_parameters, plan_frozen_outputs
from continual.training import config, loop, samplers
from continual.distributed import Shard
from model import NextItNet
from teracon_helpers import (KL_EVERY_ROW, option_flags, stage4_models, teracon_loss, teracon_method, teracon_options,
                             teracon_terms)
from utils import DataError

N_TRAIN, BATCH = 24, 8   # --frozen_cache_mib's runs: training rows, batch


def one_step(model: NextItNet, teacher: NextItNet, lr: float, plain: bool = False,
             **changes) -> dict[str, torch.Tensor]:
    """One train_step of stage 4 at s = 7 → every parameter's change; Adam from the method's parameter groups, or
    with `plain` from model.parameters() at lr, as the loop built it before the groups existed."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, y = torch.randint(1, 40, (12, 9), generator=torch.Generator().manual_seed(3)), torch.arange(12) % 6
    method = teracon_method(teacher, 3, [0.9, 0.5, 0.3], np.random.default_rng(1),
                            teracon_options("paper", **KL_EVERY_ROW, embedding_clamp="off", **changes))
    method.run.lr = lr
    optimizer = samplers.adam(model.parameters() if plain else method.param_groups(model, lr), lr)
    _, _, stepped = loop.train_step(model, method, optimizer, Step(x, y, 7.0, Shard(12)))
    assert stepped
    return {name: p.detach() - before[name] for name, p in model.named_parameters()}


def test_own_lr_is_adam_at_own_lr_for_the_new_tasks_parameters_only():
    """The new task's head, embedding row, relation layer and own block move as under Adam at --own_lr; every
    other parameter, and the other tasks' rows of shared tensors, as under Adam at --lr."""
    model, teacher = stage4_models(own_blocks=1)
    slow, fast = (one_step(copy.deepcopy(model), teacher, lr) for lr in (1e-3, 1e-2))
    mixed = one_step(copy.deepcopy(model), teacher, 1e-3, own_lr=1e-2)
    assert slow.keys() == mixed.keys()
    own_names = {name for name in mixed if name.startswith(("heads.3.", "task_blocks.3."))}
    assert own_names and any(name.startswith("task_blocks.3.") for name in own_names)
    for name, change in mixed.items():
        if name in own_names:
            torch.testing.assert_close(change, fast[name], msg=name)
            assert change.abs().max() > 5 * slow[name].abs().max(), name
        elif name in ("task_embedding", "relation_weight", "relation_bias"):
            torch.testing.assert_close(change[3], fast[name][3], msg=name)      # the new task's row: at own_lr
            torch.testing.assert_close(change[:3], slow[name][:3], msg=name)    # the earlier tasks': at lr
        else:
            torch.testing.assert_close(change, slow[name], msg=name)


def test_own_lr_equal_to_lr_is_the_plain_step_bit_for_bit():
    """--own_lr 1e-3 at a stage run at --lr 1e-3 changes nothing (so the configuration fixes one rate for the
    new task's own parameters whatever the stage's lr), while 1e-2 there does change them."""
    model, teacher = stage4_models(own_blocks=1)
    plain = one_step(copy.deepcopy(model), teacher, 1e-3, plain=True)
    same = one_step(copy.deepcopy(model), teacher, 1e-3, own_lr=1e-3)
    grouped = one_step(copy.deepcopy(model), teacher, 1e-3)                  # the method's one default group
    assert all(torch.equal(plain[name], change) for name, change in grouped.items())
    faster = one_step(copy.deepcopy(model), teacher, 1e-3, own_lr=1e-2)
    assert all(torch.equal(plain[name], same[name]) for name in plain)
    assert not torch.equal(plain["heads.3.weight"], faster["heads.3.weight"])
    method = teracon_method(teacher, 3, [0.9] * 3, np.random.default_rng(0), teracon_options("paper", own_lr=1e-3))
    assert len(method.param_groups(model, 1e-3)) == 1       # one group: not even a second group at the same rate
    assert [group["lr"] for group in method.param_groups(model, 1e-4)] == [1e-4, 1e-3]


def test_own_lr_groups_resume_as_the_uninterrupted_steps():
    """The optimiser with --own_lr's groups (Rows aliases included) saved after a step and rebuilt from the method's
    groups on a reloaded model (--resume) takes the next steps exactly as the uninterrupted one; a group that holds
    a table and Rows of it is refused."""
    model, teacher = stage4_models(own_blocks=1)
    x, y = torch.randint(1, 40, (12, 9), generator=torch.Generator().manual_seed(3)), torch.arange(12) % 6

    def method_on(model: NextItNet):
        method = teracon_method(teacher, 3, [0.9, 0.5, 0.3], np.random.default_rng(1),
                                teracon_options("paper", **KL_EVERY_ROW, own_lr=1e-2))
        method.run.lr = 1e-3
        return method, samplers.adam(method.param_groups(model, 1e-3), 1e-3)

    def steps(model, method, optimizer, n):
        for _ in range(n):
            loop.train_step(model, method, optimizer, Step(x, y, 7.0, Shard(12)))
    whole = copy.deepcopy(model)
    method, optimizer = method_on(whole)
    steps(whole, method, optimizer, 3)
    first = copy.deepcopy(model)
    method, optimizer = method_on(first)                   # the method (its ratios, its generator) carries on
    steps(first, method, optimizer, 1)
    saved = copy.deepcopy({"model": first.state_dict(), "optimizer": optimizer.state_dict()})
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved["model"], strict=True)
    optimizer = samplers.adam(method.param_groups(resumed, 1e-3), 1e-3)
    optimizer.load_state_dict(saved["optimizer"])
    steps(resumed, method, optimizer, 2)
    for (name, parameter), (_, expected) in zip(resumed.named_parameters(), whole.named_parameters()):
        assert torch.equal(parameter, expected), name
    with pytest.raises(ValueError, match="Rows"):
        samplers.adam([{"params": [model.task_embedding, samplers.Rows(model.task_embedding, 3)], "lr": 1e-3}], 1e-3)


def test_own_lr_steps_the_new_tasks_rows_exactly_as_adam_at_own_lr():
    """The new task's rows of the shared tables step as Adam at --own_lr would step them alone, to the last digit,
    over several steps (the moments carried), and the earlier tasks' rows as Adam at --lr alone."""
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(4, 3, 5))
    alone = [torch.nn.Parameter(table.data[row].clone()) for row in range(4)]
    optimizer = samplers.adam([{"params": [table], "lr": 1e-4}, {"params": [samplers.Rows(table, 3)], "lr": 1e-3}],
                              1e-4)
    references = [samplers.adam([parameter], 1e-3 if row == 3 else 1e-4) for row, parameter in enumerate(alone)]
    for step in range(3):
        gradient = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(step))
        table.grad = gradient.clone()
        optimizer.step()
        for row, (parameter, reference) in enumerate(zip(alone, references)):
            parameter.grad = gradient[row].clone()
            reference.step()
    for row in range(4):
        assert torch.equal(table.data[row], alone[row].data), row


def test_own_parameters_are_the_new_tasks_and_nothing_else_reads_them():
    model, _ = stage4_models(own_blocks=1)
    own = own_parameters(model, 3)
    rows = [entry for entry in own if isinstance(entry, samplers.Rows)]
    assert [(entry.parameter, entry.index) for entry in rows] == [(model.task_embedding, 3), (model.relation_weight, 3),
                                                                 (model.relation_bias, 3)]
    whole = [entry for entry in own if not isinstance(entry, samplers.Rows)]
    assert sum(p.numel() for p in whole) == (sum(p.numel() for p in model.heads[3].parameters())
                                             + sum(p.numel() for p in model.task_blocks["3"].parameters()))


def test_new_task_at_smax_scores_the_cross_entropy_where_the_task_is_scored():
    model, teacher = stage4_models(own_blocks=1)
    x, y = torch.randint(1, 40, (10, 9)), torch.arange(10) % 6
    expected = {s: F.cross_entropy(model(x, 3, s)[0].float(), y) for s in (7.0, 50.0)}
    for at, s in (("annealed", 7.0), ("smax", 50.0)):
        method = teracon_method(teacher, 3, [0.9] * 3, np.random.default_rng(0),
                                teracon_options("paper", alpha=0.0, new_task_at=at))
        first = next(method.terms(model, Step(x, y, 7.0, Shard(10))))
        torch.testing.assert_close(first, expected[s])
    assert not torch.isclose(expected[7.0], expected[50.0])


def test_new_task_at_smax_shares_one_student_pass_with_the_expert_term():
    """With --new_task_at smax the cross-entropy and the expert's KL read the same logits: the new task's term
    is CE + β · KL, by hand, from ONE student forward (two at the annealed s)."""
    model, teacher = stage4_models(own_blocks=1)
    x, y = torch.randint(1, 40, (10, 9)), torch.arange(10) % 6
    expert = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        expert.heads[3].weight.mul_(0.5)                                   # an expert unlike the student
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    for at, passes in (("smax", 1), ("annealed", 2)):
        method = teracon_method(teacher, 3, [0.9] * 3, np.random.default_rng(0),
                                teracon_options("paper", alpha=0.0, new_task_at=at, expert_weight=2.0))
        method.expert = expert
        calls.clear()
        first = next(method.terms(model, Step(x, y, 7.0, Shard(10))))
        assert len(calls) == passes, at
        with torch.no_grad():
            at_smax, annealed = model(x, 3, 50.0)[0].float(), model(x, 3, 7.0)[0].float()
            by_hand = F.cross_entropy(at_smax if at == "smax" else annealed, y) + 2.0 * distillation_kl(
                at_smax, expert(x, 3, 50.0)[0].float())
        torch.testing.assert_close(first.detach(), by_hand)


def test_levers_are_not_the_authors_rule():
    for change in ({"own_lr": 1e-3}, {"new_task_at": "smax"}, {"rows": "share"}, {"own_blocks": 1},
                   {"no_relation": True}):
        assert Teracon.replay_refusal(teracon_options("paper", **change)) is not None, change
    assert Teracon.replay_refusal(teracon_options("paper", expert="task2.t7")) == "--expert"
    assert Teracon.replay_refusal(teracon_options("paper", alpha=2.0, L2=0.75)) is None


def test_one_run_with_every_lever_sees_the_epochs_done(tmp_path, data_writer, monkeypatch):
    """A real stage 1 and two stages with --own_lr, --new_task_at smax and --own_blocks: the loop hands the
    method Step.epoch = epoch + batch / batches per epoch, and the checkpoint carries the options."""
    data = data_writer(tmp_path / "data", n_users=120, seed=2)
    seen: list[float] = []
    original = Teracon.stage_terms

    def spy(self, model, step):
        seen.append(step.epoch)
        yield from original(self, model, step)
    monkeypatch.setattr(Teracon, "stage_terms", spy)
    common = ["--datapath_index", str(tmp_path / "index.csv"), "--channels", "8", "--device", "cpu", "--batch", "32"]
    loop.main(1, ["--datapath", str(data.task1), "--savepath", str(tmp_path / "t1"), "--epochs", "1", *common])
    previous = tmp_path / "t1.t7"
    for stage, path in ((2, data.task2), (3, data.task3)):
        seen.clear()
        loop.main(stage, ["--datapath", str(path), "--paths", str(previous), "--savepath", str(tmp_path / f"t{stage}"),
                          "--epochs", "2", "--patience", "2", "--own_lr", "1e-2", "--new_task_at", "smax",
                          "--own_blocks", "1", *common])
        previous = tmp_path / f"t{stage}.t7"
        batches = len(seen) // 2
        assert batches >= 2 and len(seen) == 2 * batches
        assert seen[0] == 0.0 and 0 < seen[1] < 1 and seen[batches] == 1.0
        assert all(b > a for a, b in zip(seen, seen[1:]))
    options = torch.load(previous, weights_only=True)["run_config"]["options"]
    assert (options["own_lr"], options["new_task_at"], options["own_blocks"]) == (1e-2, "smax", 1)


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


@pytest.mark.parametrize("current", [False, True], ids=["previous", "current"])
def test_retention_weights_from_previous_or_this_batch(tiny_model, current):
    """all_rows: every row, so the terms are known by hand; only the weights c_j differ."""
    teacher = tiny_model(task_classes=(30, 7, 5), relation=True, seed=1).eval().requires_grad_(False)
    model = tiny_model(task_classes=(30, 7, 5), relation=True, seed=1)
    model.add_task(4, relation=True)
    x, y, s = torch.randint(1, 30, (9, 6)), torch.randint(0, 4, (9,)), 3.0
    previous = [0.9, 0.2, 0.5]
    options = teracon_options("paper", rows="all", alpha=0.7, ratio_weights="current" if current else "previous")
    loss, kept, fresh = teracon_loss(model, teacher, x, y, 3, s, previous, np.random.default_rng(0), options)
    task_masks = model.task_masks(3, s)
    assert fresh == pytest.approx([teracon.sampling_ratio(teacher.task_masks(j, s), task_masks) for j in range(3)])
    weights = fresh if current else previous
    expected = 0.0
    for j in range(3):
        x_j = x[:, :-1] if j == 0 else x
        mse = F.mse_loss(model(x_j, j, s)[0], teacher(x_j, j, s)[0])
        expected += 0.7 * weights[j] / sum(weights) * float(mse.detach())
    assert float(kept) == pytest.approx(expected, rel=1e-5)
    assert fresh != pytest.approx(previous)                            # the two variants differ here


def grown_stage3(tiny_model):
    """A stage-3 student (two earlier tasks, relation masks), its stage-2 teacher, a batch and two ratios."""
    teacher = tiny_model(task_classes=(30, 7), relation=True, seed=2).eval().requires_grad_(False)
    model = tiny_model(task_classes=(30, 7), relation=True, seed=2)
    model.add_task(4, relation=True)
    return teacher, model, torch.randint(1, 30, (8, 6)), torch.randint(0, 4, (8,)), [0.3, 0.6]


def hand_kl_retention(teacher, model, x) -> float:
    """α 0.7 · Σ_j c_j · KL(softmax(teacher_j) ‖ softmax(student_j)) at s = 7, by hand, for grown_stage3's ratios
    0.3 and 0.6 (c_j = ratio_j / mean ratio)."""
    import torch.nn.functional as F
    expected = 0.0
    with torch.no_grad():
        for j, weight in enumerate([2 * 0.3 / 0.9, 2 * 0.6 / 0.9]):
            inputs = x[:, :-1] if j == 0 else x
            p = F.softmax(teacher(inputs, j, 7.0)[0], 1)
            q = F.softmax(model(inputs, j, 7.0)[0], 1)
            expected += 0.7 * weight * float((p * (p.log() - q.log())).sum(1).mean())
    return expected


def test_per_task_smax_is_per_task_at_smax(tiny_model):
    """per_task_smax computes the retention terms at s = smax whatever the annealed s; the CE term and the next
    ratios (Eq. 15) stay at the annealed s."""
    teacher, model, x, y, ratios = grown_stage3(tiny_model)

    def loss(retention_at: str, s: float):
        options = teracon_options("paper", rows="all", weights="mean", retention_at=retention_at)
        return teracon_loss(model, teacher, x, y, 2, s, ratios, np.random.default_rng(0), options, smax=7.0)
    anchored_loss, anchored_kept, anchored_ratios = loss("smax", 3.0)
    at_smax_loss, at_smax_kept, _ = loss("annealed", 7.0)
    annealed_loss, annealed_kept, annealed_ratios = loss("annealed", 3.0)
    assert float(anchored_kept) == pytest.approx(float(at_smax_kept), rel=1e-6)
    assert float(anchored_kept) != pytest.approx(float(annealed_kept), rel=1e-3)
    assert anchored_ratios == annealed_ratios
    ce = [float((total - kept).detach()) for total, kept in ((anchored_loss, anchored_kept), (annealed_loss, annealed_kept))]
    assert ce[0] == pytest.approx(ce[1], rel=1e-6)


def test_per_task_smax_kl_is_per_task_smax_with_kl_terms(tiny_model):
    """per_task_smax_kl: the same rows, weights and s as per_task_smax; each term is the KL of the softmaxes."""
    teacher, model, x, y, ratios = grown_stage3(tiny_model)
    total, kept, _ = teracon_loss(model, teacher, x, y, 2, 3.0, ratios, np.random.default_rng(0),
                                  teracon_options("paper", **KL_EVERY_ROW), smax=7.0)
    assert float(kept) == pytest.approx(hand_kl_retention(teacher, model, x), rel=1e-5)


def test_sum_smax_kl_is_per_task_smax_kl_with_weights_summing_to_one(tiny_model):
    """sum_smax_kl: per_task_smax_kl's rows, s and KL terms with the paper's weights ratio_j / Σ_k ratio_k, so its
    retention is per_task_smax_kl's divided by the number of earlier tasks; the cross-entropy is the same."""
    teacher, model, x, y, ratios = grown_stage3(tiny_model)
    runs = {rule: teracon_loss(model, teacher, x, y, 2, 3.0, ratios, np.random.default_rng(0),
                               teracon_options("paper", **{**KL_EVERY_ROW, "weights": weights}), smax=7.0)
            for rule, weights in (("per_task_smax_kl", "mean"), ("sum_smax_kl", "sum"))}
    (per_task, per_task_kept, _), (summed, summed_kept, _) = runs["per_task_smax_kl"], runs["sum_smax_kl"]
    assert float(summed_kept) == pytest.approx(float(per_task_kept) / 2, rel=1e-6)
    assert float((summed - summed_kept).detach()) == pytest.approx(float((per_task - per_task_kept).detach()), rel=1e-6)
    plan = teracon.retention_plan(teracon_options("paper", rows="all", retention_at="smax", distance="kl"), ratios, 8)
    assert [count for count, _ in plan] == [8, 8] and [weight for _, weight in plan] == pytest.approx([1 / 3, 2 / 3])


def test_expert_adds_the_distillation_of_the_new_task_to_its_term(tiny_model):
    """--expert with weight β: the first term is CE(task K at s) + β · KL(softmax(expert_K) ‖ softmax(student_K))
    at s = smax, by hand; the retention terms are unchanged; no expert (or β = 0) leaves the stage as before."""
    teacher, model, x, y, ratios = grown_stage3(tiny_model)
    expert = tiny_model(task_classes=(30, 7, 4), relation=True, seed=5).eval().requires_grad_(False)

    def terms(weight: float, given) -> list[float]:
        options = teracon_options("paper", **KL_EVERY_ROW, alpha=0.7, expert_weight=weight)
        terms, _ = teracon_terms(model, teacher, x, y, 2, 3.0, ratios, np.random.default_rng(0), options, smax=7.0,
                                 expert=given)
        return [float(t.detach()) for t in terms]
    plain, distilled, off = terms(0.0, expert), terms(0.5, expert), terms(0.5, None)
    with torch.no_grad():
        ce = float(F.cross_entropy(model(x, 2, 3.0)[0], y))
        p = F.softmax(expert(x, 2, 7.0)[0], 1)
        q = F.softmax(model(x, 2, 7.0)[0], 1)
        kl = float((p * (p.log() - q.log())).sum(1).mean())
    assert plain == off and plain[0] == pytest.approx(ce, rel=1e-5)
    assert distilled[0] == pytest.approx(ce + 0.5 * kl, rel=1e-5) and kl > 0
    assert distilled[1:] == pytest.approx(plain[1:], rel=1e-6)


def test_stage_distils_from_the_expert_and_refuses_another_split(tmp_path, synthetic_data, monkeypatch, capsys):
    """train_teracon --expert CKPT hands the frozen expert (the fine-tuning run of the same stage) to every
    step; an expert of another split (--seed), which was trained on this stage's test users, is refused in one
    line naming the file, before anything is written."""
    data = synthetic_data(n_users=120, seed=6)
    common = ["--datapath_index", str(tmp_path / "index.csv"), "--channels", "8", "--device", "cpu", "--epochs", "1",
              "--batch", "64"]
    loop.main(1, ["--datapath", str(data.task1), "--savepath", str(tmp_path / "task1"), *common])
    stage2 = ["--datapath", str(data.task2), "--paths", str(tmp_path / "task1.t7"), *common]
    loop.main(2, [*stage2, "--savepath", str(tmp_path / "ft2"), "--method", "finetune"])
    loop.main(2, [*stage2, "--savepath", str(tmp_path / "ft2_seed1"), "--method", "finetune", "--seed", "1"])
    given = []
    original = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda model, method, *a, **k: given.append(method.expert)
                        or original(model, method, *a, **k))
    loop.main(2, [*stage2, "--savepath", str(tmp_path / "kd2"), "--expert", str(tmp_path / "ft2.t7"),
                     *option_flags(**KL_EVERY_ROW)])
    assert given and all(isinstance(e, NextItNet) and not e.config.use_masks for e in given)
    with pytest.raises(DataError, match=r"ft2_seed1\.t7: --expert must be a stage-2 checkpoint of this task on the same split"):
        loop.main(2, [*stage2, "--savepath", str(tmp_path / "kd2b"), "--expert", str(tmp_path / "ft2_seed1.t7")])
    with pytest.raises(DataError, match=r"task1\.t7: --expert must be a stage-2 checkpoint"):
        loop.main(2, [*stage2, "--savepath", str(tmp_path / "kd2c"), "--expert", str(tmp_path / "task1.t7")])
    assert not (tmp_path / "kd2b.t7").exists() and not (tmp_path / "kd2c.t7").exists()


def test_own_blocks_start_as_the_shared_ones_and_only_their_task_trains_them(tiny_model):
    """--own_blocks K: the new task reads its own copies of the top K residual blocks, copied when it is added,
    so every output starts as without them; the config records them (none: the config as before); the earlier
    tasks' retention terms leave the copies without gradient, and the new task's term leaves the shared top
    blocks without gradient; a checkpoint round-trips strictly; predict's user vectors read the task's blocks."""
    import predict
    plain = tiny_model(task_classes=(30, 7), relation=True, seed=2)
    plain.add_task(4, relation=True)
    owned = tiny_model(task_classes=(30, 7), relation=True, seed=2)
    owned.add_task(4, relation=True, own_blocks=2)
    assert plain.config.own_blocks == [] and owned.config.own_blocks == [0, 0, 2]
    x = torch.randint(1, 30, (8, 6))
    for task in range(3):
        assert torch.equal(owned(x, task, 3.0)[0], plain(x, task, 3.0)[0])
    teacher = tiny_model(task_classes=(30, 7), relation=True, seed=2).eval().requires_grad_(False)
    terms, _ = teracon_terms(owned, teacher, x, torch.randint(0, 4, (8,)), 2, 3.0, [0.3, 0.6],
                             np.random.default_rng(0), teracon_options("paper", **KL_EVERY_ROW, alpha=0.7), smax=7.0)
    new_task, *kept = terms
    copies, shared_top = list(owned.task_blocks["2"].parameters()), list(owned.blocks[-2:].parameters())
    assert all(g is None for g in torch.autograd.grad(sum(kept), copies, allow_unused=True, retain_graph=True))
    assert all(g is not None for g in torch.autograd.grad(sum(kept), shared_top, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(new_task, shared_top, allow_unused=True, retain_graph=True))
    assert all(g is not None for g in torch.autograd.grad(new_task, copies))
    with torch.no_grad():
        owned.task_blocks["2"][1].conv2.weight.add_(torch.randn_like(owned.blocks[-1].conv2.weight))  # copies differ
    assert not torch.allclose(owned(x, 2, 3.0)[0], plain(x, 2, 3.0)[0])
    assert torch.equal(owned(x, 1, 3.0)[0], plain(x, 1, 3.0)[0])
    hidden, logits = predict.outputs(owned, 2, x.numpy(), owned.task_masks(2, 3.0), torch.device("cpu"), False)
    assert torch.allclose(logits, owned(x, 2, 3.0)[0], atol=1e-6)
    grown = NextItNet.from_checkpoint({"model_config": owned.config_dict(), "model_state": owned.state_dict()})
    assert torch.equal(grown(x, 2, 3.0)[0], owned(x, 2, 3.0)[0])
    grown.add_task(3, relation=True)
    assert grown.config.own_blocks == [0, 0, 2, 0] and "3" not in grown.task_blocks
    with pytest.raises(ValueError, match="own_blocks must be in 0..8"):
        grown.add_task(3, relation=True, own_blocks=9)


def test_stage_with_own_blocks_round_trips_and_feeds_the_next_stage(tmp_path, synthetic_data, monkeypatch):
    """A stage-2 run with --own_blocks writes a checkpoint that reloads strictly, scores as the run reported and
    grows into a plain stage 3 that keeps task 2's blocks; more own blocks than the model has is refused in one
    line naming the checkpoint, before anything is written; --streams authors refuses the flag."""
    import json
    import sys

    import evaluate
    data = synthetic_data(n_users=120, seed=6)
    common = ["--datapath_index", str(tmp_path / "index.csv"), "--channels", "8", "--device", "cpu", "--epochs", "1",
              "--batch", "64"]
    loop.main(1, ["--datapath", str(data.task1), "--savepath", str(tmp_path / "task1"), *common])
    stage2 = ["--datapath", str(data.task2), "--paths", str(tmp_path / "task1.t7"), *common]
    reported = loop.main(2, [*stage2, "--savepath", str(tmp_path / "task2"), "--own_blocks", "1"])
    model = NextItNet.from_checkpoint(torch.load(tmp_path / "task2.t7", weights_only=False))
    assert model.config.own_blocks == [0, 1] and len(model.task_blocks["1"]) == 1
    assert not torch.equal(model.task_blocks["1"][0].conv1.weight, model.blocks[-1].conv1.weight)  # trained apart
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--paths", str(tmp_path / "task2.t7"), "--task", "2", "--device",
                                      "cpu", "--json", str(tmp_path / "rescored.json")])
    evaluate.main()
    rescored = json.loads((tmp_path / "rescored.json").read_text())["test"]
    assert rescored == pytest.approx(reported["tasks"]["2"]["test"], abs=1e-6)
    loop.main(3, ["--datapath", str(data.task3), "--paths", str(tmp_path / "task2.t7"), *common,
                     "--savepath", str(tmp_path / "task3")])
    third = NextItNet.from_checkpoint(torch.load(tmp_path / "task3.t7", weights_only=False))
    assert third.config.own_blocks == [0, 1, 0]
    with pytest.raises(DataError, match=r"task1\.t7: --own_blocks 9 is more than the model's 8 residual blocks"):
        loop.main(2, [*stage2, "--savepath", str(tmp_path / "bad"), "--own_blocks", "9"])
    with pytest.raises(DataError, match="--streams authors replays .* an ablation or an option beyond the paper's rule"):
        loop.main(2, [*stage2, "--savepath", str(tmp_path / "bad"), "--own_blocks", "1", "--streams", "authors"])
    assert not list(tmp_path.glob("bad*"))


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


def run(repo_root, env, script, *args):
    done = subprocess.run([sys.executable, str(repo_root / script), *map(str, args)], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_ablation_flags_and_finetune(tmp_path, data_writer, subprocess_env, repo_root):
    data = data_writer(tmp_path / "data", n_users=200, seed=3)
    common = ["--epochs", 1, "--channels", 8, "--device", "cpu", "--datapath_index", tmp_path / "index.csv"]
    run(repo_root, subprocess_env, "train_task1.py", "--datapath", data.task1, "--savepath", tmp_path / "task1",
        *common)
    variants = {
        "ablated": ["--no_relation", "--uniform_sampling", "--nested_samples", "--no_embedding_clamp"],
        "no_retention": ["--preset", "no_retention"],
        "finetune": ["--method", "finetune"],
        "teracon": [],
    }
    configs = {}
    for name, flags in variants.items():
        done = run(repo_root, subprocess_env, "train_teracon_t2.py", "--datapath", data.task2,
                   "--paths", tmp_path / "task1.t7", "--savepath", tmp_path / name, "--batch", 32, *common, *flags)
        checkpoint = torch.load(tmp_path / f"{name}.t7", weights_only=True)
        configs[name] = checkpoint["model_config"]
        options = checkpoint["run_config"]["options"]
        metrics = json.loads((tmp_path / f"{name}.metrics.json").read_text())
        assert set(metrics["tasks"]) == {"1", "2"}
        if name in ("no_retention", "finetune"):
            assert options.get("alpha", 0.0) == 0.0 and ("alpha" in options) == (name == "no_retention")
            assert "retention 0 " in done.stdout
        else:
            assert options["alpha"] == 0.7
        if name == "ablated":
            assert options["no_relation"] and options["uniform_sampling"] and options["nested_samples"]
            assert options["embedding_clamp"] == "off"
    assert configs["teracon"]["relation"] and configs["teracon"]["use_masks"]
    assert not configs["ablated"]["relation"] and configs["ablated"]["use_masks"]
    assert not configs["finetune"]["relation"] and not configs["finetune"]["use_masks"]


@pytest.mark.parametrize("rule", [{}, KL_EVERY_ROW])
def test_a_teracon_step_with_chunked_retention_is_the_whole_one(rule):
    """Every retention term (task 1's 40 items and the others) in chunks of 3 rows: the same terms and gradients. The
    teacher is the student before it grew, so the KL terms are small (about 1e-6): compared to 1e-7 absolute."""
    results = []
    for ce_chunk in (0, 3):
        model, teacher = stage4_models(own_blocks=1)
        method = teracon_method(teacher, 3, [0.9, 0.6, 0.4], np.random.default_rng(3), teracon_options("paper", **rule),
                                ce_chunk=ce_chunk)
        x, y = torch.randint(1, 40, (16, 9), generator=torch.Generator().manual_seed(4)), torch.arange(16) % 6
        terms = list(method.terms(model, Step(x, y, 7.0, Shard(16))))
        parameters = [p for p in model.parameters() if p.requires_grad]
        results.append((torch.stack([t.detach() for t in terms]),
                        torch.autograd.grad(torch.stack(terms).sum(), parameters, allow_unused=True)))
    (whole_terms, whole_grads), (chunked_terms, chunked_grads) = results
    assert whole_terms.numel() == 4                                           # the new task and three earlier
    torch.testing.assert_close(chunked_terms, whole_terms, rtol=1e-5, atol=1e-7)
    for got, want in zip(chunked_grads, whole_grads):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("flag", ["--carry_masks", "--mask_capacity", "--retention_ramp"])
def test_a_retired_flag_says_so_in_one_line(capsys, flag):
    argv = ["--datapath", "d.csv", "--datapath_index", "i.csv", "--savepath", "o", "--paths", "p.t7", flag, "1"]
    with pytest.raises(SystemExit) as stopped:
        config.parse_args(2, argv)
    assert stopped.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line == f"error: {flag} of --method teracon was retired on 2026-12-07 (docs/retention.md, Retired options: "\
                   "its results, and `git checkout 01ce4a5` to rerun it)", line
