"""Data-parallel training under torchrun (distributed.py): 2 CPU ranks, gloo, against one process.

1. A worker launched on 2 ranks checks the pieces against single-process gradients computed on the same
   rank: the task-1 loss and the stage-K loss (ratio 0.5: retention rows drawn from the global batch, so the
   ranks' rows are the single process's and the result is exact) on batches split 3/2 and 1/0 (a stand-in row with weight 0), every rank ending with
   bitwise identical gradients; gradients absent on one rank / on every rank; the collective
   non-finite check; rank 0's shuffle on every rank; identical sampling ratios.
2. train_task1.py and train_teracon_t2.py run by torchrun on 2 ranks versus a single process, on
   batches that split unevenly (27/26) and a last batch of one row: exit 0, one rank prints, one set of
   files, and the trained parameters equal the single-process ones within PARAM_TOL (measured: ~3e-7
   task 1, ~8e-7 task 2 without retention; wrong weighting or a doubled gradient moves them by 3e-4 to
   2e-3). With retention too: the retention rows are drawn from the global batch (samplers.OurSampler.retention_rows),
   so the two ranks use the single process's rows and the same tolerance holds.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

PARAM_TOL = 1e-5            # max |θ_2 ranks − θ_1 process| over every parameter, exact-equivalence runs
METRIC_TOL = 0.05           # test metrics (30–39 test rows: one flipped near-tie is 0.026–0.034)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")

WORKER = r'''
import sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/tests")
import copy

import numpy as np
import torch
import torch.distributed as dist

torch.set_num_threads(1)
import data_loader
from continual import distributed
from continual.distributed import Shard
from model import ModelConfig, NextItNet
from teracon_helpers import task1_loss, teracon_loss, teracon_options

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
assert world == 2 and distributed.active() and distributed.is_main() == (rank == 0)
REL_TOL = 1e-5


def grads(model):
    return {name: None if p.grad is None else p.grad.detach().clone() for name, p in model.named_parameters()}


def same_on_every_rank(got, what):
    gathered = [None] * world
    dist.all_gather_object(gathered, got)
    for name in got:
        a, b = gathered[0][name], gathered[1][name]
        assert (a is None) == (b is None), (what, name)
        assert a is None or torch.equal(a, b), (what, name, "ranks differ")


def close(got, want, what):
    for name, g in want.items():
        assert (got[name] is None) == (g is None), (what, name, got[name] is None, g is None)
        if g is not None:
            error = (got[name] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
            assert error <= REL_TOL, (what, name, error)


def check_steps(make_model, loss_of, n, batch, what):
    """Each global batch: single-process gradient of the whole batch vs the averaged per-rank gradients."""
    # rank 1 starts from another generator state: distributed.batches must hand it rank 0's shuffle
    rng = np.random.default_rng(0 if rank == 0 else 99)
    reference = np.random.default_rng(0)
    expected = data_loader.batches(n, batch, reference)
    shards = distributed.batches(n, batch, rng)
    assert rng.bit_generator.state == reference.bit_generator.state  # rank 0's stream, advanced alike
    assert len(shards) == len(expected)
    sizes = []
    for step, ((rows, weight, size), full) in enumerate(zip(shards, expected)):
        assert size == full.size
        mine = full[rank::world]
        if mine.size:
            assert np.array_equal(rows, mine) and weight == mine.size / full.size
        else:
            assert weight == 0.0 and rows.size == 1  # a stand-in row, weight 0
        sizes.append(mine.size)
        model = make_model()
        loss_of(model, full, Shard(full.size)).backward()
        want = grads(model)
        model = make_model()
        loss = loss_of(model, rows, Shard(full.size, rank, world))
        assert distributed.all_finite(loss, weight)
        loss.backward()
        distributed.average_gradients(model, weight)
        got = grads(model)
        close(got, want, f"{what} step {step}")
        same_on_every_rank(got, f"{what} step {step}")
    return sizes


# ---- task 1: 11 rows in batches of 5 → shards 3/2, 3/2, 1/0
torch.manual_seed(0)
base1 = NextItNet(ModelConfig(n_items=30, task_classes=[30], channels=8))
sequences = torch.from_numpy(np.random.default_rng(1).integers(1, 30, size=(11, 9)))
sizes = check_steps(lambda: copy.deepcopy(base1), lambda m, rows, _: task1_loss(m, sequences[rows], 3.0, 0.75),
                    11, 5, "task 1")
assert sizes == ([3, 3, 1] if rank == 0 else [2, 2, 0]), sizes

# ---- stage 2 with relation masks and retention: rows drawn from the global batch, so ranks = one process
teacher = copy.deepcopy(base1).eval().requires_grad_(False)
base2 = copy.deepcopy(base1)
torch.manual_seed(1)
base2.add_task(12, relation=True)
x = torch.from_numpy(np.random.default_rng(2).integers(1, 30, size=(11, 8)))
y = torch.from_numpy(np.random.default_rng(3).integers(0, 12, size=11))
options = teracon_options(alpha=0.7)


def stage2_loss(model, rows, shard, ratios=(0.5,)):
    """ratio 0.5: int(5 · 0.5) = 2 global rows per batch of 5, drawn by the same generator on every rank"""
    index = torch.as_tensor(rows)
    loss, kept, new_ratios = teracon_loss(model, teacher, x[index], y[index], 1, 5.0, list(ratios),
                                          np.random.default_rng(7), options, shard=shard)
    stage2_loss.kept.append(kept.item() > 0)
    stage2_loss.ratios.append(new_ratios)
    return loss


stage2_loss.ratios, stage2_loss.kept = [], []
check_steps(lambda: copy.deepcopy(base2), stage2_loss, 11, 5, "stage 2")
kept = [None] * world
dist.all_gather_object(kept, stage2_loss.kept)
assert any(kept[0]) and any(kept[1]), "each rank should hold some retention rows in some batch"
assert not all(kept[0]) or not all(kept[1]), "some batch should have its retention rows on one rank only"
ratios = stage2_loss.ratios
gathered = [None] * world
dist.all_gather_object(gathered, ratios)
assert gathered[0] == gathered[1], "sampling ratios differ between ranks"
assert all(r == ratios[0] for r in ratios), "sampling ratio depends on the rows"  # masks only

# ---- a gradient on one rank only (empty retention sample on rank 1), and on no rank (alpha 0)
model = copy.deepcopy(base2)
rows = np.arange(3)[rank::world]  # 2 rows / 1 row; ratio 0.5 → 1 global row, on one rank only
index = torch.as_tensor(rows)
loss, _, _ = teracon_loss(model, teacher, x[index], y[index], 1, 5.0, [0.5], np.random.default_rng(7), options,
                          shard=Shard(3, rank, world))
loss.backward()
holders = [None] * world
dist.all_gather_object(holders, model.heads[0].weight.grad is not None)
assert sum(holders) == 1, holders
distributed.average_gradients(model, rows.size / 3)
assert model.heads[0].weight.grad is not None
same_on_every_rank(grads(model), "one-sided gradient")
model = copy.deepcopy(base2)
loss, _, _ = teracon_loss(model, teacher, x[index], y[index], 1, 5.0, [0.5], np.random.default_rng(7),
                          teracon_options(alpha=0.0), shard=Shard(3, rank, world))
loss.backward()
distributed.average_gradients(model, rows.size / 3)
assert model.heads[0].weight.grad is None, "a parameter without gradient on every rank must keep grad None"

# ---- the non-finite check is collective; a weight-0 rank neither vetoes nor contributes
nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
assert distributed.all_finite(nan if rank == 1 else one) is False
assert distributed.all_finite(nan if rank == 1 else one, 0.0 if rank == 1 else 1.0) is True
assert distributed.all_finite(one) is True
layer = torch.nn.Linear(2, 1)
layer.weight.grad = torch.full((1, 2), float("nan") if rank == 1 else 2.0)
layer.bias.grad = torch.full((1,), float("nan") if rank == 1 else 3.0)
distributed.average_gradients(layer, 0.0 if rank == 1 else 1.0)
assert layer.weight.grad.tolist() == [[2.0, 2.0]] and layer.bias.grad.tolist() == [3.0]

# ---- rank 0's result everywhere; averaged statistics
assert distributed.from_main(lambda: {"acc": 0.25 + rank}) == {"acc": 0.25}
stats = distributed.average_stats({"loss": 1.0 + 2 * rank, "retention": 0.0, "skipped": 0, "finite_steps": 3})
assert stats == {"loss": 2.0, "retention": 0.0, "skipped": 0, "finite_steps": 3}, stats
dist.barrier()
dist.destroy_process_group()
print(f"rank {rank}: worker checks passed", flush=True)
'''


def _env(subprocess_env) -> dict:
    env = {k: v for k, v in subprocess_env.items() if k not in TORCHRUN_ENV}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(command, repo_root, env, timeout=120):
    done = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (f"{' '.join(map(str, command[:6]))} … exited {done.returncode}\n--- stdout ---\n"
                                  f"{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-4000:]}")
    return done


def torchrun(repo_root, env, script, *args, nproc=2):
    """python -m torch.distributed.run --standalone (a free rendezvous port) --nproc_per_node N script …"""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(repo_root / script), *map(str, args)]
    return _run(command, repo_root, env)


def single(repo_root, env, script, *args):
    return _run([sys.executable, str(repo_root / script), *map(str, args)], repo_root, env)


def _params(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model_state"]


def max_param_difference(a, b) -> float:
    first, second = _params(a), _params(b)
    assert first.keys() == second.keys()
    return max((first[key].double() - second[key].double()).abs().max().item() for key in first)


def check_metrics_close(a, b):
    first, second = json.loads(a.read_text()), json.loads(b.read_text())
    assert first["stage"] == second["stage"] and first["tasks"].keys() == second["tasks"].keys()
    for task, entry in first["tasks"].items():
        for name, value in entry["test"].items():
            other = second["tasks"][task]["test"][name]
            assert abs(value - other) <= METRIC_TOL, f"task {task} {name}: 2 ranks {other} vs 1 process {value}"


def check_one_writer(done, folder, stem, extra=()):
    """Rank 0 alone printed and wrote: one epoch line, one table, exactly the expected files (its learning curve
    among them)."""
    assert done.stdout.count("epoch 0:") == 1, done.stdout
    assert done.stdout.count("test metrics") == 1, done.stdout
    assert sorted(os.listdir(folder)) == sorted([f"{stem}.metrics.json", f"{stem}.resources.json", f"{stem}.t7",
                                                 f"{stem}.history.csv", *extra])


@pytest.fixture(scope="module")
def setting(tmp_path_factory, data_writer, subprocess_env, repo_root):
    """200 users: task 1 trains on 160 rows (batch 53: 27/26 per rank ×3, then 1 row: 1/0),
    task 2 on 214 examples (batch 71: 36/35 ×3, then 1/0). The single-process task-1 run is shared."""
    root = tmp_path_factory.mktemp("distributed")
    data = data_writer(root / "data", n_users=200, seed=3)
    env = _env(subprocess_env)
    common = ["--epochs", 1, "--device", "cpu"]
    task1 = ["--datapath", data.task1, "--batch", 53, "--channels", 8, *common]
    out = root / "single1"
    single(repo_root, env, "train_task1.py", *task1, "--savepath", out / "task1",
           "--datapath_index", out / "index.csv")
    task2 = ["--datapath", data.task2, "--batch", 71, "--paths", out / "task1.t7",
             "--datapath_index", out / "index.csv", *common]
    return {"root": root, "env": env, "task1": task1, "task2": task2, "single1": out}


@pytest.mark.slow
def test_worker_checks_on_two_ranks(tmp_path, repo_root, subprocess_env):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    done = torchrun(repo_root, _env(subprocess_env), worker, repo_root)
    assert "rank 0: worker checks passed" in done.stdout


@pytest.mark.slow
def test_task1_two_ranks_match_single_process(setting, repo_root):
    out, reference = setting["root"] / "ddp1", setting["single1"]
    done = torchrun(repo_root, setting["env"], "train_task1.py", *setting["task1"], "--savepath", out / "task1",
                    "--datapath_index", out / "index.csv")
    check_one_writer(done, out, "task1", extra=["index.csv"])
    assert (out / "index.csv").read_bytes() == (reference / "index.csv").read_bytes()
    difference = max_param_difference(reference / "task1.t7", out / "task1.t7")
    assert difference <= PARAM_TOL, f"2-rank parameters differ from 1 process by {difference:.3g}"
    check_metrics_close(reference / "task1.metrics.json", out / "task1.metrics.json")


@pytest.mark.slow
@pytest.mark.parametrize("retention", [False, True], ids=["no_retention", "retention"])
def test_task2_two_ranks_match_single_process(setting, repo_root, retention):
    extra = [] if retention else ["--preset", "no_retention"]
    name = "retention" if retention else "no_retention"
    reference, out = setting["root"] / f"single2_{name}", setting["root"] / f"ddp2_{name}"
    single(repo_root, setting["env"], "train_teracon_t2.py", *setting["task2"], *extra, "--savepath", reference / "task2")
    done = torchrun(repo_root, setting["env"], "train_teracon_t2.py", *setting["task2"], *extra,
                    "--savepath", out / "task2")
    check_one_writer(done, out, "task2")
    difference = max_param_difference(reference / "task2.t7", out / "task2.t7")
    assert difference <= PARAM_TOL, f"2-rank parameters differ from 1 process by {difference:.3g}"
    check_metrics_close(reference / "task2.metrics.json", out / "task2.metrics.json")


@pytest.mark.slow
def test_a_sigterm_under_torchrun_resumes_every_rank_on_its_own_rows(setting, repo_root):
    """Two ranks, batch 4 (about 27 steps an epoch): SIGTERM sent to torchrun once epoch 0's resume file exists stops
    both ranks at one step (or after the epoch, if it lands in validation) with exit 143; --resume on two ranks
    reaches the uninterrupted two-rank run's training losses, parameters and metrics (each rank continues on its own
    rows)."""
    import signal
    import time
    args = [*setting["task2"], "--preset", "no_retention", "--batch", 4, "--patience", 9]
    args[args.index("--epochs") + 1] = 3
    whole, cut = setting["root"] / "sigterm_whole", setting["root"] / "sigterm_cut"
    uninterrupted = torchrun(repo_root, setting["env"], "train_teracon_t2.py", *args, "--savepath", whole / "task2")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(repo_root / "train_teracon_t2.py"), *map(str, args), "--savepath", str(cut / "task2")]
    process = subprocess.Popen(command, cwd=repo_root, env=setting["env"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (cut / "task2.resume.t7").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert "stopped: SIGTERM: stage 2 stopped after" in stderr and "Traceback" not in stderr.split("stopped:")[0], \
        stderr[-3000:]
    resumed = torchrun(repo_root, setting["env"], "train_teracon_t2.py", *args, "--savepath", cut / "task2", "--resume")
    losses = [re.findall(r"epoch ([12]): loss (\S+) ", done.stdout) for done in (uninterrupted, resumed)]
    assert len(losses[0]) == 2 and losses[1] == losses[0], losses        # the epochs after the stop, as trained
    difference = max_param_difference(whole / "task2.t7", cut / "task2.t7")
    assert difference <= PARAM_TOL, f"resumed 2-rank parameters differ from the uninterrupted run by {difference:.3g}"
    check_metrics_close(whole / "task2.metrics.json", cut / "task2.metrics.json")
