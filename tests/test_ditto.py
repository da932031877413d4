"""DITTO (continual/methods/ditto.py) against hand computations on tiny batches: its ratio, user counts and ranking,
the negatives (never the target), the BPR sum, FKT, BKT1's user choice, the augmentations (never the padding) and
the NT-Xent sum; the item heads of its model; and its chain over stages under --protocol time."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from continual.generators import synth
from continual.methods import ditto
from continual.methods.base import Step
from continual.training import loop
from continual.distributed import Shard
from continual.training.loop import method_for, train_step
from continual.training.samplers import adam
from model import ModelConfig, NextItNet


def test_mask_ratio_and_user_counts_by_hand():
    previous = torch.tensor([[1.0, 0.0, 1.0], [0.5, 0.5, 0.0]])
    current = torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    cosines = [0.5, 1.0]                                        # (1·1) / (√2 · √2); identical rows
    expected = 1.0 - sum(1.0 / (1.0 + math.exp(-2.0 * c)) for c in cosines) / 2
    assert ditto.mask_ratio(previous, current) == pytest.approx(expected)
    assert ditto.sampled_users(512, 0.9) == 460 and ditto.sampled_users(512, 0.01) == 20
    assert ditto.sampled_users(10, 0.5) == 10 and ditto.sampled_users(100, 0.119) == 20
    hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    torch.testing.assert_close(ditto.rank_users(hidden, torch.tensor([1.0, 1.0])),
                               torch.tensor([1 / math.sqrt(2), 1 / math.sqrt(2), -1.0]))


def test_uniform_negatives_never_hold_the_target_nor_unk_and_cover_the_rest():
    generator = torch.Generator().manual_seed(0)
    targets = torch.tensor([2, 0, 3])                           # 0: <UNK>, no item to leave out
    drawn = ditto.uniform_negatives(targets, 3000, 4, generator)
    assert set(drawn[0].tolist()) == {1, 3} and set(drawn[1].tolist()) == {1, 2, 3} and set(drawn[2].tolist()) == {1, 2}
    shares = torch.bincount(drawn[1], minlength=4)[1:].float() / 3000
    assert torch.all((shares - 1 / 3).abs() < 0.04)


def test_bpr_sum_by_hand_leaves_out_a_negative_equal_to_its_target():
    rows = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    out = torch.tensor([[2.0, 1.0], [0.5, -1.0]])
    targets, negatives = torch.tensor([1, 3]), torch.tensor([[2, 3], [3, 1]])   # row 2's first negative is its target
    expected = -(F.logsigmoid(torch.tensor(2.0 - 1.0)) + F.logsigmoid(torch.tensor(2.0 - 3.0))
                 + F.logsigmoid(torch.tensor(-0.5 - 0.5)))
    torch.testing.assert_close(ditto.bpr_sum(out, rows, targets, negatives), expected)   # scores of every item
    one = -(F.logsigmoid(torch.tensor(1.0)) + F.logsigmoid(torch.tensor(-1.0)))           # 4 items > 1 · 2: rows
    torch.testing.assert_close(ditto.bpr_sum(out, rows, targets, torch.tensor([[2], [1]])), one)


def test_the_augmentations_never_touch_the_padding():
    """Deletion: ⌊0.2 · items⌋ items go, the rest keep their order and the row is left-padded again; substitution:
    that many positions take the most similar other item of the batch (by hand), the padding never."""
    pad, generator = 0, torch.Generator().manual_seed(3)
    users = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 0, 4, 9]])
    deleted = ditto.deletion_view(users, pad, 0.4, generator)
    for row, view in zip(users, deleted):
        items = row[row != pad].tolist()
        kept = view[view != pad].tolist()
        assert len(kept) == len(items) - math.floor(0.4 * len(items))
        assert view[:len(row) - len(kept)].eq(pad).all()
        assert all(item in items for item in kept) and kept == sorted(kept, key=items.index)
    embedding = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    substituted = ditto.substitution_view(users, pad, 0.4, embedding, generator)
    present = torch.unique(users[users != pad])
    unit = F.normalize(embedding[present], dim=1)
    similarity = unit @ unit.t()
    similarity.fill_diagonal_(-math.inf)
    nearest = {int(item): int(present[similarity[number].argmax()]) for number, item in enumerate(present)}
    for row, view in zip(users, substituted):
        assert torch.equal(view[row == pad], row[row == pad])
        changed = (view != row).nonzero().squeeze(1).tolist()
        assert len(changed) <= math.floor(0.4 * int((row != pad).sum()))
        assert all(int(view[p]) == nearest[int(row[p])] for p in changed)


def test_nt_xent_sum_by_hand():
    hidden = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    unit = F.normalize(hidden, dim=1)
    expected = 0.0
    for anchor in range(6):
        partner = (anchor + 3) % 6
        others = [j for j in range(6) if j != anchor]
        denominator = sum(torch.exp(unit[anchor] @ unit[j]) for j in others)
        expected += -torch.log(torch.exp(unit[anchor] @ unit[partner]) / denominator)
    torch.testing.assert_close(ditto.nt_xent_sum(hidden), expected, rtol=1e-5, atol=1e-6)


def item_head_model(n_items: int = 12, channels: int = 8, seed: int = 0) -> NextItNet:
    torch.manual_seed(seed)
    return NextItNet(ModelConfig(n_items=n_items, task_classes=[n_items], channels=channels, dilations=[1, 2],
                                 relation=False, item_heads=[True]))


def test_an_item_head_scores_its_output_against_item_rows_and_round_trips_strictly():
    model = item_head_model()
    model.add_task(4, relation=True, class_items=torch.tensor([0, 7, 2, 9]))
    model.add_task(3, relation=True)                               # a classification task: a plain head
    hidden = torch.randn(5, 8)
    out = model.heads[1](hidden)
    torch.testing.assert_close(model.logits(1, hidden), out @ model.item_embedding.weight[[0, 7, 2, 9]].t())
    torch.testing.assert_close(model.logits(0, hidden), model.heads[0](hidden) @ model.item_embedding.weight.t())
    assert model.logits(2, hidden).shape == (5, 3) and model.heads[0].out_features == 8
    checkpoint = {"model_config": model.config_dict(), "model_state": model.state_dict()}
    again = NextItNet.from_checkpoint(checkpoint)
    assert all(torch.equal(value, again.state_dict()[key]) for key, value in model.state_dict().items())
    model.add_items(3)                                             # the item head does not grow; the table does
    assert model.heads[0].weight.shape == (8, 8) and model.logits(0, hidden).shape == (5, 15)


def stage_two(seed: int = 0) -> tuple[NextItNet, NextItNet, ditto.Ditto]:
    """A DITTO stage 2 outside a run: a stage-1 teacher over 12 items, a student grown by 3 new items and an item
    task over 4 classes."""
    teacher = item_head_model(seed=seed).eval().requires_grad_(False)
    student = NextItNet.from_checkpoint({"model_config": teacher.config_dict(), "model_state": teacher.state_dict()})
    student.add_items(3)
    teacher.add_items(3, rows_from=student)
    options = ditto.DittoOptions(ditto_negatives=5)
    method = method_for("ditto", options, 2, teacher, np.random.default_rng(0), record={"kind": "rec"})
    method.old_items = 12                                          # method_for's checkpoint is the grown teacher's
    student.add_task(4, relation=True, class_items=torch.tensor([0, 3, 13, 9]))
    return teacher, student, method


def test_fkt_by_hand():
    """FKT for task 1: mean over users and negatives of ((h_student − h_teacher) · e_n)², e_n the student's rows of
    negatives drawn from the old items by the method's generator."""
    teacher, student, method = stage_two()
    inputs = torch.randint(1, 12, (4, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        h_teacher = teacher.hidden(inputs, teacher.task_masks(0, 2.0), True, 0)
    state = method.generator.get_state()
    got = method.forward_transfer(student, inputs, 0, 2.0, h_teacher)
    method.generator.set_state(state)
    drawn = torch.randint(1, 12, (4, 5), generator=method.generator)
    assert drawn.max() < 12 and drawn.min() >= 1
    h_student = student.hidden(inputs, student.task_masks(0, 2.0), True, 0)
    rows = student.item_embedding.weight.detach()
    expected = sum(((h_student[u] - h_teacher[u]) @ rows[drawn[u, k]]) ** 2 for u in range(4) for k in range(5)) / 20
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_fkt_and_bkt2_choose_their_users_by_the_stage_means_and_weigh_fkt_by_the_ratios():
    """Stage 3 (two earlier tasks, both item tasks): FKT of task i reads the n_i = min(B, max(⌊B r_i⌋, 20)) users whose
    previous-model hidden state is most similar to the stage-i item mean, less those holding an item new at this
    stage (task 1 without the last item), weighted α r_i / Σr with the ratios before the batch; BKT2 of task 2 reads
    the n_2 least similar users holding an item newer than task 2."""
    teacher = item_head_model(seed=1)
    teacher.add_items(3)                                            # stage 2 brought items 12..14
    teacher.add_task(4, relation=True, class_items=torch.tensor([0, 3, 13, 9]))
    teacher = teacher.eval().requires_grad_(False)
    student = NextItNet.from_checkpoint({"model_config": teacher.config_dict(), "model_state": teacher.state_dict()})
    student.add_items(3)                                            # stage 3 brings 15..17
    teacher.add_items(3, rows_from=student)
    student.add_task(3, relation=True, class_items=torch.tensor([0, 16, 2]))
    method = method_for("ditto", ditto.DittoOptions(ditto_negatives=5), 3, teacher, np.random.default_rng(0),
                        record={"kind": "rec"})
    method.old_items, method.ratios = 15, [0.5, 0.4]
    method.means = [torch.randn(8, generator=torch.Generator().manual_seed(k)) for k in (7, 8)]
    seen = {"fkt": {}, "bkt2": {}}
    method.forward_transfer = lambda model, inputs, task, s, previous: (
        seen["fkt"].__setitem__(task, inputs), torch.ones((), requires_grad=True))[1]
    method.rest_backward = lambda model, users, task, s: (seen["bkt2"].__setitem__(task, users),
                                                          torch.ones((), requires_grad=True))[1]
    method.task1_backward = lambda model, x, s: None
    generator = torch.Generator().manual_seed(9)
    x, y = torch.randint(1, 18, (64, 6), generator=generator), torch.randint(1, 3, (64,), generator=generator)
    terms = list(method.terms(student, Step(x, y, 2.0, Shard(64))))
    with torch.no_grad():
        similarity = [F.cosine_similarity(teacher.hidden(x, teacher.task_masks(i, 2.0), True, i),
                                          method.means[i][None, :], dim=1) for i in (0, 1)]
    old_only, newer = (x < 15).all(1), (x >= 15).any(1)
    most = [torch.topk(similarity[i], count).indices for i, count in ((0, 32), (1, 25))]
    least = torch.topk(-similarity[1], 25).indices
    assert torch.equal(seen["fkt"][0], x[most[0][old_only[most[0]]], :-1])
    assert torch.equal(seen["fkt"][1], x[most[1][old_only[most[1]]]])
    assert torch.equal(seen["bkt2"][1], x[least[newer[least]]])
    assert [float(term.detach()) for term in terms[1:]] == pytest.approx([0.7 * 0.5 / 0.9, 0.7 * 0.4 / 0.9, 0.8])
    assert method.ratios != [0.5, 0.4]


def test_task1_backward_chooses_the_users_with_most_distinct_new_items():
    """BKT1 at r_1 = 0.9: k = min(#holders, max(⌊# · 0.9⌋, 20)) = all 3 holders here; with r_1 such that k would be
    smaller than #holders (20 of 25), the 20 with most distinct new items (≥ 12) are chosen."""
    _, student, method = stage_two()
    x = torch.randint(1, 12, (30, 6), generator=torch.Generator().manual_seed(5))
    distinct = torch.arange(30) % 4                                 # 0..3 distinct new items a user
    for user in range(30):
        for position in range(int(distinct[user])):
            x[user, position] = 12 + position
    holders = int((distinct > 0).sum())
    chosen = []
    original = student.hidden
    student.hidden = lambda items, *rest, **keywords: (chosen.append(items.clone()), original(items, *rest,
                                                                                               **keywords))[1]
    method.ratios = [0.5]
    assert method.task1_backward(student, x, 2.0) is not None
    assert holders == 22 and chosen[0].shape[0] == 20               # min(22, max(11, 20))
    counts = [len({int(item) for item in row if item >= 12}) for row in chosen[0]]
    assert sorted(counts, reverse=True)[:20] == sorted(distinct[distinct > 0].tolist(), reverse=True)[:20]
    student.hidden = original
    assert method.task1_backward(student, torch.randint(1, 12, (5, 6)), 2.0) is None


def test_a_stage_two_step_updates_the_ratios_from_the_masks_it_used():
    """After a step every r_i is mask_ratio(the teacher's mask of task i, the new task's mask) at the step's s, and
    the step's loss is the sum of its terms (each finite)."""
    teacher, student, method = stage_two()
    generator = torch.Generator().manual_seed(6)
    x = torch.randint(1, 15, (24, 6), generator=generator)
    y = torch.randint(1, 4, (24,), generator=generator)
    optimizer = adam(method.param_groups(student, 1e-3), 1e-3)
    masks_before = student.task_masks(1, 3.0).detach()
    loss, retention, stepped = train_step(student, method, optimizer, Step(x, y, 3.0, Shard(24)))
    assert stepped and torch.isfinite(loss) and retention != 0
    assert method.ratios == [pytest.approx(ditto.mask_ratio(teacher.task_masks(0, 3.0), masks_before))]
    assert student.task_embedding.abs().max() <= 6.0


def test_ditto_chain_under_time_passing(tmp_path, source_items):
    """DITTO's own stage 1 and two later stages under --protocol time on the time-passing benchmark: its item task's
    target items join the index, every task is scored (task 2 beside its re-test file), every score is finite, and
    the final checkpoint loads strictly and scores what the stage printed (evaluate's task_report)."""
    synth.main(["--out", str(tmp_path / "data"), "--users", "240", "--items", "40", "--length", "10", "--clusters",
                "4", "--new_items", "6", "--retest_users", "40"])
    data, out = tmp_path / "data", tmp_path / "runs"
    out.mkdir()
    common = ["--datapath_index", str(out / "index.csv"), "--channels", "8", "--device", "cpu", "--epochs", "1",
              "--batch", "64", "--method", "ditto", "--task_kind", "rec"]
    loop.main(1, ["--datapath", str(data / "task1.csv"), "--savepath", str(out / "t1"), *common])
    for stage in (2, 3):
        loop.main(stage, ["--datapath", str(data / f"task{stage}.csv"), "--paths", str(out / f"t{stage - 1}.t7"),
                          "--savepath", str(out / f"t{stage}"), "--protocol", "time", *common])
    from data_loader import read_index
    index = read_index(str(out / "t2.index.csv"))
    targets = {int(t) for line in (data / "task2.csv").read_text().splitlines() for t in line.split(",,")[1].split(",")}
    assert np.all(index.positions(np.array(sorted(targets))) > 0)          # every target item has a row
    saved = torch.load(out / "t3.t7", weights_only=True)
    assert saved["model_config"]["item_heads"] == [True, True, True]
    assert len(saved["method_state"]["means"]) == 2
    metrics = json.loads((out / "t3.metrics.json").read_text())["tasks"]
    assert set(metrics) == {"1", "2", "3"} and "retest" in metrics["2"]
    assert all(math.isfinite(value) for task in metrics.values() for value in task["test"].values())
    from continual.evaluation.scoring import evaluate_tasks
    model = NextItNet.from_checkpoint(saved)
    again = evaluate_tasks(model, saved["tasks"], read_index(str(out / "t3.index.csv")), 50.0, 256,
                           torch.device("cpu"), 5)
    assert all(again[key]["test"] == metrics[key]["test"] for key in metrics)


def test_ditto_refuses_torchrun_at_parse_time(monkeypatch, capsys):
    """Its summed terms would be rescaled against FKT's means by the averaging over ranks: one line, exit 2."""
    from continual.training import config
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stopped:
        config.parse_args(2, ["--datapath", "d.csv", "--datapath_index", "i.csv", "--paths", "p.t7", "--savepath", "s",
                              "--method", "ditto"])
    assert stopped.value.code == 2 and "--method ditto runs in one process" in capsys.readouterr().err


def test_ditto_stage1_takes_its_own_lr_unless_given():
    from continual.training import config
    common = ["--datapath", "d.csv", "--datapath_index", "i.csv", "--savepath", "s", "--method", "ditto"]
    assert config.parse_args(1, common).lr == 0.01
    assert config.parse_args(1, [*common, "--lr", "1e-3"]).lr == 1e-3
    assert config.parse_args(2, [*common, "--paths", "p.t7"]).lr == 1e-3          # the stage's, as every method's


def test_another_method_refuses_a_ditto_checkpoint_and_ditto_refuses_negatives(capsys):
    """A model whose heads score item rows is continued only by DITTO: fine-tuning from it ends in one line; and
    --negatives (the next-item loss's sampled softmax) is DITTO's own business (--ditto_negatives)."""
    from continual.training import config
    from utils import DataError
    teacher = item_head_model().eval().requires_grad_(False)
    with pytest.raises(DataError, match="its heads score item rows .* --method finetune cannot continue it"):
        method_for("finetune", None, 2, teacher, np.random.default_rng(0))
    with pytest.raises(SystemExit):
        config.parse_args(1, ["--datapath", "d.csv", "--datapath_index", "i.csv", "--savepath", "s", "--method",
                              "ditto", "--negatives", "5"])
    assert "--method ditto draws its own negatives" in capsys.readouterr().err


def test_stage1_negatives_are_never_unk_nor_the_padding_and_follow_the_popularity_rank():
    """p ∝ exp(−(rank + 1) / (ρ V)) by each item's frequency in the training users' items (the padding item and <UNK>
    get 0), by hand on four items."""
    from continual.methods.base import Stage
    from data_loader import TaskData
    sequences = np.array([[1, 1, 2, 3], [1, 3, 3, 4], [1, 1, 1, 3]])   # item 1 pads (raw "0" as an item)
    data = TaskData(sequences[:, :-1], sequences[:, -1], 6)
    method = ditto.Ditto(ditto.DittoOptions(), None)
    method.pad = 1
    stage = Stage(1, None, torch.device("cpu"), None, None, {}, None, lambda number: (data, np.arange(3)),
                  lambda saved: None)
    weights = method.stage1_popularity(stage)
    ranks = {3: 0, 2: 1, 4: 2, 5: 3}                                   # counts 4, 1, 1, 0 (ties by index)
    expected = torch.tensor([0.0] * 2 + [math.exp(-(ranks[j] + 1) / (0.3 * 6)) for j in (2, 3, 4, 5)],
                            dtype=torch.float64)
    torch.testing.assert_close(weights, expected / expected.sum())
