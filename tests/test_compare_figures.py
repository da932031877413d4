"""compare.py's table and stage commands, figures.py's mask similarity and PNG files.

Expected values are computed by hand in the tests (loops over channels, explicit means and n−1 sds).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import compare
import utils
from continual import comparison, datasets
from continual.training import config, loop
from continual.training.config import parse_args
from continual.training.history import History
from model import ModelConfig, NextItNet
from tools import figures



needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed (pip install matplotlib): figures untested")


def three_task_model(relation: bool) -> NextItNet:
    """A tiny NextItNet grown to 3 tasks with add_task, random embeddings (and relation layers)."""
    torch.manual_seed(0)
    model = NextItNet(ModelConfig(n_items=20, task_classes=[20], channels=8, dilations=[1, 2]))
    model.add_task(5, relation=relation)
    model.add_task(3, relation=relation)
    with torch.no_grad():
        model.task_embedding.uniform_(-1.0, 1.0)
        if relation:
            model.relation_weight.normal_(0.0, 0.7)
            model.relation_bias.normal_(0.0, 0.3)
    return model.eval()


def hand_cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.mark.parametrize("relation", [False, True])
@pytest.mark.parametrize("s", [1.5, 50.0])
def test_mask_similarity_matches_hand_computation(relation, s):
    model = three_task_model(relation)
    similarity = figures.mask_similarity(model, s)
    n_layers = model.config.n_layers
    assert similarity.shape == (n_layers, 3, 3)
    embedding = model.task_embedding.detach()
    for layer in range(n_layers):
        for a in range(3):
            for b in range(3):
                if relation:
                    mask_a = model.task_masks(a, s)[layer].tolist()
                    mask_b = model.task_masks(b, s)[layer].tolist()
                else:  # Eq. 11 by hand: σ(s·e)
                    mask_a = [1 / (1 + math.exp(-s * float(v))) for v in embedding[a, layer]]
                    mask_b = [1 / (1 + math.exp(-s * float(v))) for v in embedding[b, layer]]
                assert similarity[layer, a, b] == pytest.approx(hand_cosine(mask_a, mask_b), abs=1e-6)
    np.testing.assert_allclose(similarity, similarity.transpose(0, 2, 1), atol=1e-12)
    np.testing.assert_allclose(similarity[:, range(3), range(3)], 1.0, atol=1e-9)
    if s == 1.5:  # unsaturated masks: the tasks really differ
        assert similarity.min() < 0.99


def metrics_file(path, stage: int, values: dict[int, float]) -> str:
    """A metrics.json with task 1 rec and the others cls, as loop.finish writes it."""
    tasks = {str(k): {"kind": "rec", "test": {"mrr@5": v, "mrr@20": v + 0.1, "hit@5": 0.5, "acc": 0.01}}
             if k == 1 else {"kind": "cls", "test": {"acc": v}} for k, v in values.items()}
    path.write_text(json.dumps({"stage": stage, "tasks": tasks}))
    return str(path)


@needs_matplotlib
def test_figures_writes_png_files(tmp_path):
    model = three_task_model(relation=True)
    argv = ["--datapath", "d.csv", "--datapath_index", "index.csv", "--savepath", str(tmp_path / "task3"),
            "--paths", str(tmp_path / "task2.t7"), "--channels", "8", "--device", "cpu"]
    args = config.parse_args(3, argv)
    tasks = [{"name": name, "datapath": "x", "kind": kind, "n_classes": n, "seed": 10, "split_percentage": 0.2}
             for name, kind, n in (("next_item", "rec", 20), ("watch", "cls", 5), ("age", "cls", 3))]
    checkpoint = tmp_path / "task3.t7"
    utils.atomic_torch_save(loop.checkpoint_dict(args, model, {}, tasks, 0, {"acc": 0.5}, finished=True), str(checkpoint))
    first = metrics_file(tmp_path / "task1.metrics.json", 1, {1: 0.2})
    second = metrics_file(tmp_path / "task2.metrics.json", 2, {1: 0.1, 2: 0.6})
    curves = []
    for stage in (1, 2):
        history = History(str(tmp_path / f"task{stage}"), resume=False)
        for epoch in range(3):
            history.add(0, epoch, {"loss": 2.0 - epoch / 3, "retention": 0.1 * stage, "skipped": 0, "finite_steps": 9},
                        {"acc": 0.1 * epoch, "mrr@5": 0.05 * epoch}, epoch != 1, 1.0, 1.2)
        curves.append(history.path)
    out = tmp_path / "figures"
    written = figures.main(["--paths", str(checkpoint), "--out", str(out), "--matrix", second, first,
                            "--curves", *curves])
    names = {os.path.basename(path) for path in written}
    assert names == {"task_relation_layers.png", "task_relation_mean.png", "forgetting_matrix.png",
                     "learning_curves.png"}
    for path in written:
        with open(path, "rb") as handle:
            data = handle.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, path


def run(stage: int, task_values: dict[int, float]) -> dict:
    return {"stage": stage, "tasks": {str(k): {"kind": "rec" if k == 1 else "cls",
                                               "test": {"mrr@5": v, "mrr@20": 0.9, "acc": 0.0} if k == 1
                                               else {"acc": v}} for k, v in task_values.items()}}


def test_summary_rows_mean_sd_and_retention():
    results = {
        "teracon": {s: {1: run(1, {1: first}), 3: run(3, {1: last, 2: t2, 3: t3})}
                    for s, (first, last, t2, t3) in enumerate([(0.2, 0.1, 0.5, 0.7), (0.4, 0.3, 0.6, 0.7),
                                                               (0.5, 0.5, 0.7, 0.7)])},
        "finetune": {0: {1: run(1, {1: 0.2}), 2: run(2, {1: 0.05, 2: 0.9}), 3: run(3, {1: 0.02, 2: 0.4, 3: 0.8})},
                     1: {1: run(1, {1: 0.4}), 2: run(2, {1: 0.3, 2: 0.9})}},  # seed 1 did not finish stage 3
    }
    rows = {row["method"]: row for row in compare.summary_rows(results, final_stage=3)}
    teracon = rows["teracon"]
    assert teracon["seeds"] == 3
    mean1 = (0.1 + 0.3 + 0.5) / 3
    sd1 = math.sqrt(((0.1 - mean1) ** 2 + (0.3 - mean1) ** 2 + (0.5 - mean1) ** 2) / 2)
    assert teracon["task1"] == pytest.approx((mean1, sd1))
    assert teracon["task2"] == pytest.approx((0.6, 0.1))
    assert teracon["task3"] == pytest.approx((0.7, 0.0), abs=1e-12)
    ratios = [0.1 / 0.2, 0.3 / 0.4, 0.5 / 0.5]
    mean_r = sum(ratios) / 3
    sd_r = math.sqrt(sum((r - mean_r) ** 2 for r in ratios) / 2)
    assert teracon["retention"] == pytest.approx((mean_r, sd_r))
    finetune = rows["finetune"]
    assert finetune["seeds"] == 1
    assert finetune["task1"] == pytest.approx((0.02, 0.0))
    assert finetune["retention"] == pytest.approx((0.1, 0.0))

    half1 = 4.303 * sd1 / math.sqrt(3)                              # t(0.975, 2 df)
    assert teracon["task1_ci"] == pytest.approx((mean1 - half1, mean1 + half1))
    assert all(math.isnan(v) for v in finetune["task1_ci"])          # one seed: no interval

    markdown = compare.markdown_table(compare.summary_rows(results, 3), ["1 a", "2 b", "3 c"], "Command: `x`")
    assert markdown.startswith("Command: `x`")
    assert f"| teracon | 3 | {mean1:.4f} [{mean1 - half1:.4f}, {mean1 + half1:.4f}] | " in markdown
    assert "| finetune | 1 | 0.0200 | 0.4000 | 0.8000 | 0.1000 |" in markdown
    lines = compare.csv_table(compare.summary_rows(results, 3), 3).splitlines()
    assert lines[0].split(",")[:6] == ["method", "seeds", "task1_mean", "task1_sd", "task1_lo", "task1_hi"]
    assert float(lines[1].split(",")[2]) == pytest.approx(mean1)


def test_paired_differences_by_seed():
    a = {s: {1: run(1, {1: 0.5}), 2: run(2, {1: v, 2: 0.5})} for s, v in enumerate([0.40, 0.42, 0.44])}
    b = {s: {1: run(1, {1: 0.5}), 2: run(2, {1: v, 2: 0.5})} for s, v in enumerate([0.10, 0.13, 0.16])}
    (row,) = compare.paired_rows({"a": a, "b": b}, final_stage=2)
    differences = [0.30, 0.29, 0.28]
    mean, sd = 0.29, 0.01
    half = 4.303 * sd / math.sqrt(3)
    assert row["pair"] == "a − b"
    assert row["task1"] == pytest.approx((mean, mean - half, mean + half, 3))
    assert row["task2"][:3] == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)
    assert row["retention"][0] == pytest.approx(sum(differences) / 3 / 0.5)
    table = compare.paired_table([row], ["1 x", "2 y"])
    assert f"**{mean:.4f} [{mean - half:.4f}, {mean + half:.4f}]**" in table   # excludes 0: bold
    assert "| 0.0000 [0.0000, 0.0000] |" in table                                # does not


def test_reference_rows_carry_baseline_and_ceiling():
    def stage(seed: int) -> dict:
        task = {"kind": "cls", "test": {"acc": 0.8}, "baseline": {"majority": {"test": {"acc": 0.5 + seed / 10}}},
                "vs_baseline": {"baseline": "majority", "metric": "acc"}, "ceiling": {"acc": 0.9}}
        return {1: {"stage": 1, "tasks": {"1": task}}}
    rows = compare.reference_rows({"m": {0: stage(0), 1: stage(1)}}, final_stage=1)
    assert [row["method"] for row in rows] == ["trivial baseline", "ceiling"]
    assert rows[0]["task1"] == pytest.approx((0.55, math.sqrt(0.005)))
    assert rows[1]["task1"] == pytest.approx((0.9, 0.0))
    assert all(math.isnan(v) for v in rows[1]["task1_ci"])          # a known value, not an estimate


def test_headline_is_mrr5_for_rec_and_acc_for_cls():
    assert compare.headline({"kind": "rec", "test": {"mrr@20": 0.3, "mrr@5": 0.2, "acc": 0.1}}) == 0.2
    assert compare.headline({"kind": "cls", "test": {"acc": 0.7}}) == 0.7


def test_stage_commands_share_stage1_and_chain_per_method():
    first = compare.stage_command("demo", "runs/c", 2, "finetune", 1, ["--epochs", "1"])
    assert first[1] == "train_task1.py"
    assert first[first.index("--savepath") + 1] == os.path.join("runs/c", "seed2", "task1")
    assert first[first.index("--datapath_index") + 1] == os.path.join("runs/c", "seed2", "index.csv")
    assert first[first.index("--seed") + 1] == "2" and "--method" not in first
    assert first[first.index("--channels") + 1] == "64" and first[-2:] == ["--epochs", "1"]

    second = compare.stage_command("demo", "runs/c", 2, "finetune", 2, ["--epochs", "1"])
    assert second[second.index("--paths") + 1] == os.path.join("runs/c", "seed2", "task1.t7")
    assert second[second.index("--savepath") + 1] == os.path.join("runs/c", "seed2", "finetune", "task2")
    assert second[second.index("--method") + 1] == "finetune" and second[-2:] == ["--epochs", "1"]
    assert second[second.index("--batch") + 1] == "256"

    third = compare.stage_command("demo", "runs/c", 0, "no_relation", 3, [])
    assert third[third.index("--paths") + 1] == os.path.join("runs/c", "seed0", "no_relation", "task2.t7")
    assert third[third.index("--preset") + 1] == "no_relation" and third[third.index("--stage") + 1] == "3"
    assert "--method" not in third                                        # a preset of the default method
    teracon = compare.stage_command("demo", "runs/c", 0, "teracon", 4, [])
    assert not {"--method", "--preset", "--rerun"} & set(teracon)
    rerun = compare.stage_command("demo", "runs/c", 0, "finetune_rerun1", 2, [])
    assert rerun[rerun.index("--rerun") + 1] == "1" and rerun[rerun.index("--method") + 1] == "finetune"
    assert rerun[rerun.index("--savepath") + 1] == os.path.join("runs/c", "seed0", "finetune_rerun1", "task2")


def test_expert_method_distils_from_the_finetune_chain_which_runs_first(monkeypatch):
    """The recommended preset's stage K gets --expert <out>/seedS/finetune/taskK.t7, and its chain waits for the
    fine-tuning chain of its seed, also when both methods run side by side."""
    command = compare.stage_command("synth", "runs/c", 1, "recommended", 3, [])
    assert command[command.index("--expert") + 1] == os.path.join("runs/c", "seed1", "finetune", "task3.t7")
    assert command[command.index("--preset") + 1] == "recommended"
    assert command[command.index("--paths") + 1] == os.path.join("runs/c", "seed1", "recommended", "task2.t7")
    assert "{finetune}" not in " ".join(compare.stage_command("synth", "runs/c", 1, "finetune", 3, []))
    ran = []
    monkeypatch.setattr(compare, "run_stage", lambda command, save, label, *threads: ran.append(save) or True)
    assert compare.run_all("synth", "runs/c", [0], ["recommended"], 3, [], 1) == 0
    names = [os.path.relpath(save, "runs/c") for save in ran]
    assert names == [os.path.join("seed0", *parts) for parts in
                     [("task1",), ("finetune", "task2"), ("finetune", "task3"), ("recommended", "task2"),
                      ("recommended", "task3")]]
    ran.clear()
    assert compare.run_all("synth", "runs/c", [0], ["finetune", "recommended"], 3, [], 2) == 0
    names = [os.path.relpath(save, "runs/c") for save in ran]
    for stage in (2, 3):
        expert = names.index(os.path.join("seed0", "recommended", f"task{stage}"))
        assert os.path.join("seed0", "finetune", f"task{stage}") in names[:expert]


@pytest.mark.slow
def test_run_all_and_compare_read_one_declaration_of_the_stage_flags(repo_root, subprocess_env):
    """`python -m continual.datasets DATASET STAGE` prints datasets.stage_flags, which compare.py gives its stages, so
    compare.py's tables describe run_all.sh's runs (test_scripts.py runs run_all.sh on what that command prints)."""
    for dataset in ("demo", "synth", "ttl"):
        for stage in (1, 2):
            printed = subprocess.run([sys.executable, "-m", "continual.datasets", dataset, str(stage)], cwd=repo_root,
                                     env=subprocess_env, capture_output=True, text=True, check=True).stdout.split()
            assert printed == datasets.stage_flags(dataset, stage), (dataset, stage)
            command = compare.stage_command(dataset, "runs/c", 0, "finetune", stage, [])
            assert command[-len(printed):] == printed or not printed, (dataset, stage)
    assert "--split_percentage" in datasets.stage_flags("demo", 2) and datasets.stage_flags("ttl", 1) == []


def test_kept_shares_and_new_task_differences_by_seed(tmp_path):
    """kept K = task K after the last stage / at stage K; new K − finetune paired by seed; s/epoch from logs."""
    def chain(t1, t2, final1, final2, new3):
        return {1: run(1, {1: t1}), 2: run(2, {1: 0.0, 2: t2}), 3: run(3, {1: final1, 2: final2, 3: new3})}
    results = {"finetune": {0: chain(0.4, 0.5, 0.1, 0.25, 0.60), 1: chain(0.2, 0.6, 0.1, 0.30, 0.70)},
               "kept": {0: chain(0.4, 0.5, 0.38, 0.50, 0.62), 1: chain(0.2, 0.6, 0.19, 0.57, 0.66)}}
    values = compare.stage_values(results["kept"], 3)
    assert values["kept1"] == pytest.approx({0: 0.95, 1: 0.95}) and values["kept2"] == pytest.approx({0: 1.0, 1: 0.95})
    assert values["learned2"] == {0: 0.5, 1: 0.6} and values["learned3"] == {0: 0.62, 1: 0.66}
    assert values["best1"] == pytest.approx(values["kept1"]) and values["best2"] == pytest.approx(values["kept2"])
    peaked = {0: {1: run(1, {1: 0.4}), 2: run(2, {1: 0.5, 2: 0.6}), 3: run(3, {1: 0.38, 2: 0.66, 3: 0.6})}}
    best = compare.stage_values(peaked, 3)   # task 1 peaks after stage 2; task 2 is highest after stage 3
    assert best["kept1"][0] == pytest.approx(0.95) and best["best1"][0] == pytest.approx(0.38 / 0.5)
    assert best["kept2"][0] == pytest.approx(1.1) and best["best2"][0] == pytest.approx(1.0)
    rows = {row["method"]: row for row in compare.retention_rows(results, 3)}
    assert rows["kept"]["kept1"][:1] == pytest.approx((0.95,)) and rows["kept"]["min_kept"] == pytest.approx(0.95)
    assert rows["finetune"]["kept1"][0] == pytest.approx((0.25 + 0.5) / 2)
    assert rows["kept"]["learned3"][0] == pytest.approx(((0.62 - 0.60) + (0.66 - 0.70)) / 2)
    assert rows["kept"]["learned2"][:3] == pytest.approx((0.0, 0.0, 0.0))
    log = tmp_path / "seed0" / "kept" / "task3.log"
    log.parent.mkdir(parents=True)
    log.write_text("epoch 0: loss 1 | valid acc=0.1 | train 2.0s, all 2.5s *\nepoch 1: loss 1 | train 4.0s, all 4.1s\n")
    seconds = {"kept": compare.epoch_seconds(str(tmp_path), [0, 1], "kept", 3)}
    assert seconds["kept"] == pytest.approx(3.0)
    table = compare.retention_table(list(rows.values()), 3, seconds)
    assert "| kept | 2 | **0.9500 [0.9500, 0.9500]** |" in table and table.rstrip().endswith("| 3.0 |")
    best_lines = compare.best_table(list(rows.values()), 3).splitlines()
    assert best_lines[0] == "| method | seeds | kept 1 of its best | kept 2 of its best | lowest |"
    assert "| kept | 2 | **0.9500 [0.9500, 0.9500]** | 0.9750 [0.6573, 1.2927] | 0.95 |" in best_lines


def test_data_draw_marker_keeps_two_draws_apart(tmp_path):
    """<out>/data.txt records the synth draw; another draw into the same --out is refused, the marker unchanged."""
    out = str(tmp_path / "c")
    compare.check_data_draw(out, "synth", 1)
    marker = tmp_path / "c" / "data.txt"
    assert marker.read_text() == "synth synth_seed 1\n"
    compare.check_data_draw(out, "synth", 1)  # the same draw again: resumes
    with pytest.raises(utils.DataError, match="holds runs on synth synth_seed 1, not synth synth_seed 0"):
        compare.check_data_draw(out, "synth", 0)
    assert marker.read_text() == "synth synth_seed 1\n"
    older = tmp_path / "old"
    (older / "seed0").mkdir(parents=True)  # runs from before the marker existed were made at seed 0
    with pytest.raises(utils.DataError, match="made before data.txt existed"):
        compare.check_data_draw(str(older), "synth", 2)
    compare.check_data_draw(str(older), "synth", 0)
    assert (older / "data.txt").read_text() == "synth synth_seed 0\n"


def test_prepare_synth_draws_with_the_seed(tmp_path, monkeypatch):
    """--synth_seed reaches synth.py's generator: two seeds give two different task files, one seed the same."""
    from continual.generators import synth
    real_main, folders = synth.main, {}
    monkeypatch.setattr(synth, "main", lambda argv: real_main(argv + ["--users", "40", "--items", "30"]))
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        folder = tmp_path / name
        monkeypatch.setitem(compare.DATASETS["synth"], "folder", str(folder))
        compare.prepare_synth(seed)
        folders[name] = (folder / "task6.csv").read_text()
    assert folders["a"] == folders["b"] != folders["c"]


def test_another_draw_is_refused_before_the_data_is_rewritten(tmp_path, monkeypatch, capsys):
    """compare.py --synth_seed into an --out of another draw stops before Data/synth is regenerated."""
    out = tmp_path / "c"
    compare.check_data_draw(str(out), "synth", 0)
    prepared = []
    monkeypatch.setitem(compare.PREPARE, "synth", lambda synth_seed=0: prepared.append(synth_seed))
    with pytest.raises(SystemExit) as stopped:
        utils.cli(lambda: compare.main(["--dataset", "synth", "--synth_seed", "1", "--out", str(out)]))
    assert stopped.value.code != 0 and prepared == []
    assert "holds runs on synth synth_seed 0, not synth synth_seed 1" in capsys.readouterr().err


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


def test_the_protocol_reaches_stages_two_on_and_synth_time_is_generated_with_its_preset(tmp_path, monkeypatch):
    """--protocol X is given to every stage >= 2 after the dataset's flags (so it wins over synth_time's own
    --protocol time), never to stage 1; DITTO's chain starts from its own stage 1; synth_time is drawn with its preset's
    generator flags (items arriving, re-test files), which run_all.sh reads through `python -m continual.datasets`."""
    later = compare.later_flags("synth_time", protocol="static")
    assert later[-2:] == ["--protocol", "static"] and later[:-2] == datasets.stage_flags("synth_time", 2)
    assert "--protocol" in datasets.stage_flags("synth_time", 2) and "--protocol" not in compare.later_flags("synth")
    run = parse_args(2, ["--datapath", "d.csv", "--datapath_index", "i.csv", "--paths", "p.t7", "--savepath", "s",
                         *later])
    assert run.protocol == "static"
    first = compare.stage_command("synth_time", "runs/c", 0, "ditto", 1, [], later)
    assert "--protocol" not in first and first[first.index("--method") + 1] == "ditto"
    assert first[first.index("--savepath") + 1] == os.path.join("runs/c", "seed0", "stage1_ditto", "task1")
    from continual.generators import synth
    real_main = synth.main
    monkeypatch.setattr(synth, "main", lambda argv: real_main(argv + ["--users", "60", "--items", "30"]))
    monkeypatch.setitem(compare.DATASETS["synth_time"], "folder", str(tmp_path / "time"))
    compare.prepare_synth_time(0)
    meta = json.loads((tmp_path / "time" / "tasks.json").read_text())
    assert meta["new_items"] == int(datasets.DATASETS["synth_time"]["generator"][1]) and len(meta["retests"]) == 15


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


def test_retest_records_and_their_pooled_table(tmp_path):
    """--protocol time: compare.py's retests.csv holds every (seed, method, stage, earlier task, part) re-test score
    beside the strongest baseline and the original test users' score; retests.md pools the final stage's units."""
    def part(value: float, users: int, baseline: float) -> dict:
        return {"kind": "rec", "test": {"mrr@5": value}, "n_test_users": users,
                "vs_baseline": {"metric": "mrr@5", "baseline": "popularity", "above": value > baseline},
                "baseline": {"popularity": {"test": {"mrr@5": baseline}}}}

    def stage(task1: float, all_: float, new: float) -> dict:
        return {"tasks": {"1": {"kind": "rec", "test": {"mrr@5": task1},
                                "retest": {"all": part(all_, 10, 0.1), "with_new": part(new, 4, 0.05)}},
                          "2": {"kind": "rec", "test": {"mrr@5": 0.2}}}}

    results = {"ditto": {0: {2: stage(0.3, 0.25, 0.2)}, 1: {2: stage(0.5, 0.35, 0.4)}}}
    records = compare.retest_records(results)
    assert [(r["seed"], r["part"], r["value"], r["baseline"], r["original"], r["users"]) for r in records] == [
        (0, "all", 0.25, 0.1, 0.3, 10), (0, "with_new", 0.2, 0.05, 0.3, 4),
        (1, "all", 0.35, 0.1, 0.5, 10), (1, "with_new", 0.4, 0.05, 0.5, 4)]
    path = compare.write_retests(str(tmp_path), results, 2)
    assert path == str(tmp_path / "retests.csv") and len((tmp_path / "retests.csv").read_text().splitlines()) == 5
    rows = [line for line in (tmp_path / "retests.md").read_text().splitlines() if line.startswith("| ditto")]
    low, high = compare.t_interval([0.25, 0.35])
    assert rows[0].startswith(f"| ditto | 1 | all (10) | 2 | 0.3000 [{low:.4f}, {high:.4f}] | 0.1000 | 0.4000 ")
    assert rows[1].startswith("| ditto | 1 | with_new (4) | 2 | 0.3000 ")
    assert compare.write_retests(str(tmp_path / "none"), {"finetune": {0: {2: {"tasks": {}}}}}, 2) is None
