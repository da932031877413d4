"""--variant original|revised: every behaviour in which the authors' two codes differ follows one switch, each
still its own flag (explicit flags win); the behaviours themselves: retention weights from this batch's
ratios, and ties in model selection."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from continual.methods import teracon
from continual.training import config, loop, samplers
from model import NextItNet
from teracon_helpers import KL_EVERY_ROW, option_flags, teracon_loss, teracon_options, teracon_terms
from utils import DataError

BEHAVIOURS = ["seed", "L2", "lr", "select_on", "ties", "embedding_clamp", "nested_samples", "ratio_weights"]


def parsed(stage: int, *extra: str) -> dict:
    paths = ["--datapath", "d.csv", "--datapath_index", "i.csv", "--savepath", "out/t"]
    run = config.parse_args(stage, [*paths, *(["--paths", "p.t7"] if stage > 1 else []), *extra])
    got = {key: getattr(run, key) if hasattr(run, key) else getattr(run.options, key) for key in BEHAVIOURS}
    return {**got, "no_embedding_clamp": run.options.embedding_clamp == "off"}


@pytest.mark.parametrize("stage, variant, expected", [
    (1, "revised", {"seed": 0, "L2": 0.0, "lr": 1e-3}),
    (1, "original", {"seed": 10, "L2": 0.75, "lr": 1e-3}),
    (2, "revised", {"seed": 0, "lr": 1e-3, "select_on": "acc", "ties": "off", "embedding_clamp": "on",
                    "no_embedding_clamp": False, "nested_samples": False, "ratio_weights": "previous"}),
    (2, "original", {"seed": 10, "lr": 1e-4, "select_on": "mrr@5", "ties": "on", "embedding_clamp": "off",
                     "no_embedding_clamp": True, "nested_samples": True, "ratio_weights": "current"}),
    (3, "original", {"lr": 1e-4, "select_on": "mrr@5", "ties": "on"}),
    (4, "original", {"lr": 1e-4, "select_on": "acc", "ties": "off"}),
    (4, "revised", {"lr": 1e-4, "select_on": "acc", "ties": "off"}),
])
def test_variant_sets_every_difference(stage, variant, expected):
    got = parsed(stage, "--variant", variant)
    assert {key: got[key] for key in expected} == expected
    if variant == "revised":
        assert parsed(stage) == got                                     # the default variant


def test_explicit_flags_win_over_the_variant():
    got = parsed(2, "--variant", "original", "--seed", "3", "--lr", "0.01", "--nested_samples", "off",
                 "--embedding_clamp", "--ties", "off", "--ratio_weights", "previous", "--select_on", "hit@5")
    assert got == {"seed": 3, "L2": 0.75, "lr": 0.01, "select_on": "hit@5", "ties": "off", "embedding_clamp": "on",
                   "no_embedding_clamp": False, "nested_samples": False, "ratio_weights": "previous"}
    assert parsed(2, "--no_embedding_clamp")["no_embedding_clamp"] is True
    assert parsed(2, "--nested_samples")["nested_samples"] is True


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


@pytest.mark.parametrize("ties, improvements", [("on", [0, 1, 2, 3]), ("off", [0])])
def test_ties_count_as_improvements_only_when_on(tmp_path, ties, improvements):
    run = config.RunConfig(stage=2, datapath="d.csv", datapath_index="i.csv", savepath=str(tmp_path / "t"),
                           ties=ties, select_on="mrr@5", epochs=4, patience=2)
    model = torch.nn.Linear(2, 2)
    resume = loop.Resume(run, model, torch.optim.SGD(model.parameters(), lr=0.1), np.random.default_rng(0))
    best = []
    loop.fit(run, lambda epoch, within=None: {"loss": 1.0, "retention": 0.0, "skipped": 0, "finite_steps": 1},
                lambda: {"mrr@5": 0.25}, lambda epoch, valid: best.append(epoch), resume)
    assert best == improvements


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


def test_rerun_redraws_training_but_keeps_the_split(tmp_path, synthetic_data, monkeypatch):
    """--rerun N trains stage 2 from seed + 1000·N (other weights than --rerun 0, which is the default run bit
    for bit) while the split, and the seed recorded for evaluation, stay --seed's."""
    data = synthetic_data(n_users=120, seed=6)
    common = ["--datapath_index", str(tmp_path / "index.csv"), "--channels", "8", "--device", "cpu", "--epochs", "1"]
    loop.main(1, ["--datapath", str(data.task1), "--savepath", str(tmp_path / "task1"), *common])
    splits = []
    original = samplers.split_indices
    monkeypatch.setattr(samplers, "split_indices", lambda n, seed, *rest: splits.append(seed) or original(n, seed, *rest))
    states = {}
    for name, extra in (("default", []), ("rerun0", ["--rerun", "0"]), ("rerun1", ["--rerun", "1"])):
        loop.main(2, ["--datapath", str(data.task2), "--paths", str(tmp_path / "task1.t7"), "--savepath",
                         str(tmp_path / name), "--batch", "64", "--seed", "3", *common, *extra])
        saved = torch.load(tmp_path / f"{name}.t7", map_location="cpu", weights_only=True)
        states[name] = saved["model_state"]
        assert saved["tasks"][-1]["seed"] == 3
    assert splits == [3, 3, 3]
    assert all(torch.equal(states["default"][k], states["rerun0"][k]) for k in states["default"])
    assert not torch.equal(states["default"]["heads.1.weight"], states["rerun1"]["heads.1.weight"])


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
