"""continual/training (loop, samplers, config) and checkpoints: the step (terms back-propagated one at a time, a
non-finite step skipped), Adam against the reference loop, retention-row draws, --variant's loop flags, ties,
--rerun, freed memory, and foreign checkpoints refused."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import utils
from continual.methods import checkpoints
from continual.methods.base import Step
from continual.training import config, loop, samplers
from continual.evaluation import reports, scoring
from continual.generators import synth
from continual.distributed import Shard
from data_loader import read_index
from model import ModelConfig, NextItNet
from teracon_helpers import stage4_models, task1_loss, teracon_loss, teracon_method, teracon_options


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


# ------------------------------------------------------------------ --protocol time: items that arrive with a task

def with_new_items(path: Path, first_new: int, every: int) -> set[int]:
    """Rewrite a task file so that every `every`-th line's last source item is a new id (first_new, first_new + 1,
    ...); → the new ids."""
    lines, new = path.read_text().splitlines(), set()
    for number in range(0, len(lines), every):
        source, targets = lines[number].split(",,")
        items = source.split(",")
        items[-1] = str(first_new + number // every)
        new.add(int(items[-1]))
        lines[number] = ",".join(items) + ",," + targets
    path.write_text("\n".join(lines) + "\n")
    return new


FROZEN_EMBEDDING = {"hat", "conure", "peterrec", "piggyback"}   # an item's row never moves after its stage
ISOLATED = {"hat", "conure", "fineall", "sinmo", "peterrec", "piggyback"}  # earlier tasks scored exactly as before


@pytest.mark.parametrize("method", ["teracon", "lwf", "mtl", "ewc", "hat", "conure", "fineall", "sinmo", "peterrec",
                                    "piggyback"])
def test_time_protocol_grows_the_index_and_the_model_stage_by_stage(tmp_path, data_writer, method):
    """Under --protocol time each stage's new source items join the index after the earlier ones (written beside its
    checkpoint, read by the next stage) and the model's item rows grow with them; every task is scored at the end,
    task 1 among the items it knew. Methods that freeze the item embedding train only the stage's new rows; the
    isolation methods still score every earlier task exactly. Under static the same file's new items are <UNK> and
    nothing grows."""
    data = data_writer(tmp_path / "data", n_users=120, seed=3)
    new2, new3 = with_new_items(data.task2, 500, 5), with_new_items(data.task3, 700, 4)
    common = ["--datapath_index", str(tmp_path / "index.csv"), "--channels", "8", "--device", "cpu", "--epochs", "1",
              "--batch", "32"]
    loop.main(1, ["--datapath", str(data.task1), "--savepath", str(tmp_path / "t1"),
                  *({"teracon": [], "hat": ["--method", "hat"], "conure": ["--method", "conure"]}.get(
                      method, ["--method", "finetune"])), *common])
    stage1 = read_index(str(tmp_path / "index.csv"))
    for stage, path in ((2, data.task2), (3, data.task3)):
        loop.main(stage, ["--datapath", str(path), "--paths", str(tmp_path / f"t{stage - 1}.t7"), "--savepath",
                          str(tmp_path / f"t{stage}"), "--protocol", "time", "--method", method, *common])
    grown2, grown3 = (read_index(str(tmp_path / f"t{stage}.index.csv")) for stage in (2, 3))
    assert np.array_equal(grown2.keys[:stage1.keys.size], stage1.keys)
    assert set(grown2.keys[grown2.stages == 2].tolist()) == new2 and set(grown3.keys[grown3.stages == 3]) == new3
    assert np.array_equal(grown3.keys[:grown2.keys.size], grown2.keys)
    saved = torch.load(tmp_path / "t3.t7", weights_only=True)
    assert saved["model_config"]["n_items"] == grown3.size == stage1.size + len(new2) + len(new3)
    assert saved["model_config"]["item_counts"] == [stage1.size, grown2.size, grown3.size]
    assert saved["run_config"]["datapath_index"] == str(tmp_path / "t3.index.csv")
    assert set(json.loads((tmp_path / "t3.metrics.json").read_text())["tasks"]) == {"1", "2", "3"}
    states = [torch.load(tmp_path / f"t{stage}.t7", weights_only=True)["model_state"] for stage in (1, 2, 3)]
    first, before, after = (state["item_embedding.weight"] for state in states)
    if method in FROZEN_EMBEDDING:
        assert torch.equal(before[:stage1.size], first) and torch.equal(after[:grown2.size], before)
        assert not torch.equal(after[grown2.size:], torch.zeros_like(after[grown2.size:]))
    if method == "fineall":                   # every earlier table reads the new items through the trained copy's rows
        learned = states[2]["task_item_embeddings.2.weight"][grown2.size:]
        assert torch.equal(after[grown2.size:], learned)
        assert torch.equal(states[2]["task_item_embeddings.1.weight"][grown2.size:], learned)
    if method in ISOLATED:
        scores = [json.loads((tmp_path / f"t{stage}.metrics.json").read_text())["tasks"] for stage in (2, 3)]
        assert all(scores[1][task]["test"] == scores[0][task]["test"] for task in ("1", "2"))
    with pytest.warns(UserWarning, match=f"{len(new2)} item token"):
        loop.main(2, ["--datapath", str(data.task2), "--paths", str(tmp_path / "t1.t7"), "--savepath",
                      str(tmp_path / "static2"), "--method", method, *common])
    assert torch.load(tmp_path / "static2.t7", weights_only=True)["model_config"]["n_items"] == stage1.size
    assert not (tmp_path / "static2.index.csv").exists()



def test_time_protocol_scores_every_earlier_task_on_its_retest_file_split_by_new_items(tmp_path, source_items):
    """After stage K under --protocol time each earlier task with a re-test file after K is scored on it over all its
    users, those whose input holds an item newer than the task's stage and the others (counted here from the files
    and the index); evaluate.py's matrix writes the rows beside the forgetting matrix. Static scores none."""
    synth.main(["--out", str(tmp_path / "data"), "--users", "240", "--items", "40", "--length", "10", "--clusters",
                "4", "--new_items", "6", "--retest_users", "40"])
    data, out = tmp_path / "data", tmp_path / "runs"
    common = ["--datapath_index", str(out / "index.csv"), "--channels", "8", "--device", "cpu", "--epochs", "1",
              "--batch", "64", "--method", "finetune"]
    out.mkdir()
    loop.main(1, ["--datapath", str(data / "task1.csv"), "--savepath", str(out / "t1"), *common])
    for stage in (2, 3):
        loop.main(stage, ["--datapath", str(data / f"task{stage}.csv"), "--paths", str(out / f"t{stage - 1}.t7"),
                          "--savepath", str(out / f"t{stage}"), "--protocol", "time", *common])
    index = read_index(str(out / "t3.index.csv"))
    tasks = json.loads((out / "t3.metrics.json").read_text())["tasks"]
    assert "retest" not in tasks["3"]
    for number in (1, 2):
        retest = tasks[str(number)]["retest"]
        lines = source_items(data / f"task{number}.retest3.csv")
        inputs = [line[:-1] if number == 1 else line for line in lines]
        positions = [index.positions(np.array(line)) for line in inputs]         # −1: an item the index lacks
        with_new = sum(bool(((p < 0) | (p >= index.size_at(number))).any()) for p in positions)
        assert retest["file"] == str(data / f"task{number}.retest3.csv") and retest["left_out"] == 0
        assert retest["all"]["n_test_users"] == 40
        assert retest["with_new"]["n_test_users"] == with_new
        assert retest.get("without_new", {}).get("n_test_users", 0) == 40 - with_new
        assert retest["all"]["ceiling"] == scoring.known_ceiling(retest["file"])
    assert set(json.loads((out / "t2.metrics.json").read_text())["tasks"]["1"]["retest"]) >= {"all", "with_new"}
    header, rows = reports.retest_matrix([str(out / f"t{stage}.metrics.json") for stage in (1, 2, 3)])
    assert [row[:3] for row in rows if row[2] == "all"] == [["2", "1", "all"], ["3", "1", "all"], ["3", "2", "all"]]
    assert rows[0][header.index("original")] == f"{tasks_at(out, 2)['1']['test']['mrr@5']:.4f}"
    with pytest.warns(UserWarning, match="not in the index"):   # static: the new items are <UNK>
        loop.main(2, ["--datapath", str(data / "task2.csv"), "--paths", str(out / "t1.t7"), "--savepath",
                      str(out / "static2"), *common])
    assert "retest" not in json.loads((out / "static2.metrics.json").read_text())["tasks"]["1"]


def tasks_at(out: Path, stage: int) -> dict:
    return json.loads((out / f"t{stage}.metrics.json").read_text())["tasks"]


def test_negatives_train_stage_one_by_a_sampled_softmax_and_are_recorded(tmp_path, data_writer, capsys):
    """--negatives N: stage 1 trains against N sampled items (another model than the full softmax's from the same
    seed) and records N in its run config; a negative N is refused at parse time."""
    data = data_writer(tmp_path / "data", n_users=120, seed=4)
    common = ["--datapath", str(data.task1), "--datapath_index", str(tmp_path / "index.csv"), "--channels", "8",
              "--device", "cpu", "--epochs", "1", "--batch", "32", "--method", "finetune"]
    sampled = loop.main(1, [*common, "--savepath", str(tmp_path / "sampled"), "--negatives", "5"])
    full = loop.main(1, [*common, "--savepath", str(tmp_path / "full")])
    saved = [torch.load(tmp_path / f"{name}.t7", weights_only=True) for name in ("sampled", "full")]
    assert saved[0]["run_config"]["negatives"] == 5 and saved[1]["run_config"]["negatives"] == 0
    assert not torch.equal(saved[0]["model_state"]["heads.0.weight"], saved[1]["model_state"]["heads.0.weight"])
    assert sampled["tasks"]["1"]["test"] != full["tasks"]["1"]["test"]
    with pytest.raises(SystemExit):
        config.parse_args(1, [*common, "--savepath", "x", "--negatives", "-1"])
    assert "--negatives" in capsys.readouterr().err


def test_time_protocol_accepts_an_expert_of_the_same_grown_stage(tmp_path, data_writer):
    """The recommended preset's --expert (fine-tuning's stage-2 checkpoint under --protocol time) holds the grown item
    count, as the stage it serves does: accepted, where the stage-1 count would refuse it."""
    data = data_writer(tmp_path / "data", n_users=120, seed=3)
    with_new_items(data.task2, 500, 5)
    common = ["--datapath_index", str(tmp_path / "index.csv"), "--channels", "8", "--device", "cpu", "--epochs", "1",
              "--batch", "32"]
    loop.main(1, ["--datapath", str(data.task1), "--savepath", str(tmp_path / "t1"), *common])
    stage2 = ["--datapath", str(data.task2), "--paths", str(tmp_path / "t1.t7"), "--protocol", "time", *common]
    loop.main(2, [*stage2, "--savepath", str(tmp_path / "expert"), "--method", "finetune"])
    metrics = loop.main(2, [*stage2, "--savepath", str(tmp_path / "recommended"), "--preset", "recommended",
                            "--expert", str(tmp_path / "expert.t7")])
    assert set(metrics["tasks"]) == {"1", "2"}
