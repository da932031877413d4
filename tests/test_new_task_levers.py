"""The levers of the study of how fast TERACON learns a new task (issue 30): --own_lr (a parameter group),
--new_task_at, and compare.py's --settings paper, --later_epochs and NAME+flag=value candidates."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import compare
from continual import comparison, datasets
from continual.methods.base import Step
from continual.methods.teracon import Teracon, distillation_kl, own_parameters
from continual.training import loop, samplers
from continual.training.config import parse_args
from continual.training.distributed import Shard
from model import NextItNet
from teracon_helpers import KL_EVERY_ROW, stage4_models, teracon_method, teracon_options


def one_step(model: NextItNet, teacher: NextItNet, lr: float, **changes) -> dict[str, torch.Tensor]:
    """One train_step of stage 4 at s = 7 → every parameter's change."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, y = torch.randint(1, 40, (12, 9), generator=torch.Generator().manual_seed(3)), torch.arange(12) % 6
    method = teracon_method(teacher, 3, [0.9, 0.5, 0.3], np.random.default_rng(1),
                            teracon_options("paper", **KL_EVERY_ROW, embedding_clamp="off", **changes))
    method.run.lr = lr
    optimizer = samplers.adam(method.param_groups(model, lr), lr)
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
    plain = one_step(copy.deepcopy(model), teacher, 1e-3)
    same = one_step(copy.deepcopy(model), teacher, 1e-3, own_lr=1e-3)
    faster = one_step(copy.deepcopy(model), teacher, 1e-3, own_lr=1e-2)
    assert all(torch.equal(plain[name], same[name]) for name in plain)
    assert not torch.equal(plain["heads.3.weight"], faster["heads.3.weight"])
    method = teracon_method(teacher, 3, [0.9] * 3, np.random.default_rng(0), teracon_options("paper", own_lr=1e-3))
    assert len(method.param_groups(model, 1e-3)) == 1       # one group: not even a second group at the same rate
    assert [group["lr"] for group in method.param_groups(model, 1e-4)] == [1e-4, 1e-3]


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


def test_paper_settings_use_the_stage_defaults_lr_and_batch_1024():
    for stage, lr in ((2, 1e-3), (3, 1e-4)):
        command = compare.stage_command("synth", "runs/c", 0, "recommended+own_lr=1e-3", stage, [],
                                        compare.later_flags("synth", "paper", 2))
        assert "--lr" not in command[:command.index("--own_lr")]
        assert command[command.index("--batch") + 1] == "1024" and command[-2:] == ["--own_lr", "1e-3"]
        assert command[command.index("--savepath") + 1] == os.path.join("runs/c", "seed0", "recommended+own_lr=1e-3",
                                                                        f"task{stage}")
        assert command[command.index("--expert") + 1] == os.path.join("runs/c", "seed0", "finetune", f"task{stage}.t7")
        epochs = [command[i + 1] for i, word in enumerate(command) if word == "--epochs"]
        assert epochs[-1] == "2"
        args = command[command.index("--paths") + 2:]          # what follows the preset's paths
        args[args.index("--expert") + 1] = __file__             # the flag's file check only
        run = parse_args(stage, ["--datapath", "d.csv", "--datapath_index", "i.csv", "--paths", "p.t7",
                                 "--savepath", "s", *args])
        assert (run.lr, run.batch, run.epochs, run.options.own_lr) == (lr, 1024, 2, 1e-3)
    stage1 = compare.stage_command("synth", "runs/c", 0, "recommended+own_lr=1e-3", 1, [],
                                   compare.later_flags("synth", "paper", 2))
    assert "--own_lr" not in stage1 and "1024" not in stage1
    assert compare.later_flags("synth") == datasets.stage_flags("synth", 2)


def test_candidate_names(tmp_path):
    assert comparison.split_overrides("recommended+alpha=0+no_relation") == (
        "recommended", ["--alpha", "0", "--no_relation"])
    assert comparison.resolve("recommended_rerun1+alpha=0") == ("teracon", "recommended", 1)
    assert comparison.known_name("finetune+lr=1e-4") and not comparison.known_name("finetune+lr=/tmp/x")
    assert not comparison.known_name("nothing+alpha=0")
    assert compare.chains_first("recommended+alpha=0") == {"--expert": "finetune"}


@pytest.mark.parametrize("argv, message", [
    (["--methods", "finetune,recommended+bogus=1"], "unrecognized arguments: --bogus 1"),
    (["--methods", "finetune,recommended+own_lr=-1"], "--own_lr"),
    (["--settings", "paper", "--recorded", "docs/experiments/data"], "--recorded"),
    (["--later_epochs", "0"], "--later_epochs"),
])
def test_refused_before_anything_runs(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        compare.main(["--dataset", "synth", "--out", str(tmp_path / "c"), *argv])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0] and "Traceback" not in error[0]
    assert not (tmp_path / "c").exists()
