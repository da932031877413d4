"""Methods as plugins: the registry, the loop that names none of them, LwF's and EWC's terms by hand, their
runs through the real scripts, checkpoints written before the typed run config, and the docs' worked example."""
from __future__ import annotations

import ast
import dataclasses

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from continual.methods import checkpoints
from continual.evaluation import scoring
from continual.methods import METHODS, method_class
from continual.methods.base import Step
from continual.methods import ewc
from continual.methods.ewc import EWC, shared_parameters
from continual.training import config, loop
from continual.distributed import Shard
from data_loader import TaskData, read_index
from model import ModelConfig, NextItNet

FIXTURES = Path(__file__).parent / "fixtures" / "legacy"


# ------------------------------------------------------------------ the registry and the loop

SHARED_MODULES = ["continual/training/loop.py", "continual/training/config.py", "continual/training/samplers.py",
                  "continual/datasets.py", "continual/evaluation/scoring.py", "continual/methods/checkpoints.py"]
GENERIC_OPTION_WORDS = {"rows", "weights", "distance", "alpha", "preset"}  # option names that are also plain words


def code_words(path: Path) -> set[str]:
    """The identifiers, attribute names, keyword names, imported names and string constants of a module's code: not
    its comments, docstrings or help texts."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    prose = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node) is not None:
            prose.add(id(node.body[0].value))
        if isinstance(node, ast.keyword) and node.arg == "help":
            prose.update(id(part) for part in ast.walk(node.value))
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            words.add(node.arg)
        elif isinstance(node, ast.arg):
            words.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            words.add(node.value)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            words.update([getattr(node, "module", None) or "", *(a.name for a in node.names),
                          *(a.asname for a in node.names if a.asname)])
    return words


def not_a_method(word: str) -> str:
    """`word` without what names the project, not a method: the authors' repository (Sein-Kim/TERACON), the stage
    scripts (train_teracon_tK.py) and data file names (TTL's are named after the authors' tasks)."""
    return re.sub(r"Sein-Kim/TERACON|train_teracon\w*|\S+\.csv", "", word)


def word_parts(word: str) -> str:
    """An identifier or dotted name as words: `use_teracon_rule` → "use teracon rule", `EWCOptions` → "EWC Options",
    `continual.methods.teracon` → "continual methods teracon"."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", re.sub(r"[_.]", " ", word))


@pytest.mark.parametrize("module", SHARED_MODULES)
def test_shared_modules_name_no_method_and_no_methods_option(repo_root, module):
    """The loop, config, samplers, datasets, scoring and checkpoints call hooks and read options through them: a
    method's name, or one of its options, in their code would be a branch on the method (DEFAULT_METHOD lives in
    the registry)."""
    words = code_words(repo_root / module)
    option_names = {declared.name for name in METHODS for declared in dataclasses.fields(method_class(name).Options)}
    named = sorted(word for word in words for name in [*METHODS, "fine-?tun"]  # the authors' repository is named,
                   if re.search(rf"\b{name}", word_parts(not_a_method(word)), re.I))  # not the method
    assert named == []
    assert sorted(words & (option_names - GENERIC_OPTION_WORDS)) == []


def test_the_guard_sees_a_branch_on_a_method(tmp_path):
    """code_words finds what the guard looks for, and skips docstrings and help texts."""
    module = tmp_path / "m.py"
    module.write_text('"""TERACON in prose."""\nimport argparse\nfrom continual.methods.ewc import EWCOptions\n'
                      'def f(run, options, use_lwf_rule):\n    """teracon in a docstring"""\n'
                      '    argparse.ArgumentParser().add_argument("--x", help="like --method hat")\n'
                      '    return run.method == "teracon" or options.expert\n', encoding="utf-8")
    words = code_words(module)
    assert "teracon" in words and "expert" in words
    assert not any("TERACON" in word or "hat" in word.split() for word in words)
    parts = " ".join(word_parts(word) for word in words).split()
    assert {"EWC", "lwf", "ewc", "Options"} <= set(parts)                  # imported and snake/Camel-case names


def test_every_method_is_registered_with_its_own_flags():
    flags_of = {name: config.method_flags(name) for name in METHODS}
    assert {"--alpha", "--preset", "--expert", "--own_blocks", "--L2"} <= flags_of["teracon"]
    assert flags_of["finetune"] == set()
    assert flags_of["lwf"] == {"--lwf_weight", "--lwf_temperature"}
    assert flags_of["ewc"] == {"--ewc_lambda", "--ewc_samples"}
    for name in METHODS:
        assert method_class(name).name == name
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        method_class("nope")


@pytest.mark.parametrize("argv, message", [
    (["--method", "lwf", "--lwf_weight", "-1"], "--lwf_weight must be"),
    (["--method", "lwf", "--lwf_temperature", "0"], "--lwf_temperature must be"),
    (["--method", "ewc", "--ewc_samples", "-3"], "--ewc_samples must be"),
    (["--method", "ewc", "--alpha", "2"], "--alpha is a flag of --method teracon, not of --method ewc"),
    (["--lwf_weight", "2"], "--lwf_weight is a flag of --method lwf, not of --method teracon"),
    (["--method", "magic"], "--method: invalid choice: 'magic'"),
])
def test_method_flags_are_checked_at_parse_time(capsys, argv, message):
    paths = ["--datapath", "d.csv", "--datapath_index", "i.csv", "--savepath", "o", "--paths", "p.t7"]
    with pytest.raises(SystemExit) as info:
        config.parse_args(2, [*paths, *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_presets_fill_options_and_explicit_flags_win():
    paths = ["--datapath", "d.csv", "--datapath_index", "i.csv", "--savepath", "o", "--paths", "p.t7"]
    assert config.parse_args(2, [*paths, "--preset", "no_retention"]).options.alpha == 0.0
    assert config.parse_args(2, [*paths, "--preset", "no_retention", "--alpha", "1"]).options.alpha == 1.0
    run = config.parse_args(3, [*paths, "--preset", "recommended", "--expert", str(FIXTURES / "task2.t7")])
    options = run.options
    assert (options.rows, options.weights, options.retention_at, options.distance, options.alpha, options.new_task_at,
            options.own_blocks, options.own_lr) == ("share", "mean", "smax", "kl", 2.0, "smax", 2, 1e-3)
    assert config.parse_args(3, [*paths, "--preset", "recommended", "--own_blocks", "0", "--expert",
                                 str(FIXTURES / "task2.t7")]).options.own_blocks == 0
    round_trip = config.run_config_from_dict(run.to_dict())
    assert round_trip == run and round_trip.options == options


# ------------------------------------------------------------------ LwF

def grown(seed: int = 3) -> tuple[NextItNet, NextItNet]:
    """A stage-3 student grown as fine-tuning grows it, and its stage-2 teacher (with masks, as a TERACON chain's)."""
    torch.manual_seed(seed)
    teacher = NextItNet(ModelConfig(n_items=30, task_classes=[30, 7], channels=8, relation=True))
    with torch.no_grad():
        teacher.task_embedding.uniform_(-2.0, 2.0)
    teacher = teacher.eval().requires_grad_(False)
    model = copy.deepcopy(teacher).requires_grad_(True)
    return model, teacher


def test_lwf_terms_by_hand():
    """CE of the new head, then per earlier task j: λ_o · KL(softmax(teacher_j / T) ‖ softmax(student_j / T)), the
    teacher at smax with its own masks, task 1 reading the source without its last item; no masks on the model."""
    model, teacher = grown()
    method = loop.method_for("lwf", method_class("lwf").Options(lwf_weight=0.5, lwf_temperature=2.0), 3, teacher,
                             np.random.default_rng(0), smax=7.0)
    method.grow(model, 4)
    assert not model.config.use_masks and not model.config.relation and model.config.task_classes == [30, 7, 4]
    with torch.no_grad():                                                # a student that has moved away
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    x, y = torch.randint(1, 30, (6, 9)), torch.randint(0, 4, (6,))
    terms = [float(t.detach()) for t in method.terms(model, Step(x, y, 3.0, Shard(6)))]
    with torch.no_grad():
        expected = [float(F.cross_entropy(model(x, 2, 3.0)[0], y))]
        for j, inputs in ((0, x[:, :-1]), (1, x)):
            p = F.softmax(teacher(inputs, j, 7.0)[0] / 2.0, 1)
            q = F.softmax(model(inputs, j, 3.0)[0] / 2.0, 1)
            expected.append(0.5 * float((p * (p.log() - q.log())).sum(1).mean()))
    assert terms == pytest.approx(expected, rel=1e-5) and expected[1] > 1e-3 and expected[2] > 1e-3
    off = loop.method_for("lwf", method_class("lwf").Options(lwf_weight=0.0), 3, teacher, np.random.default_rng(0))
    assert len(list(off.terms(model, Step(x, y, 3.0, Shard(6))))) == 1


# ------------------------------------------------------------------ EWC

def ewc_stage(model: NextItNet, teacher: NextItNet, data: dict[int, tuple[TaskData, np.ndarray]], samples: int = 0,
              lam: float = 10.0) -> EWC:
    method = EWC(EWC.Options(ewc_lambda=lam, ewc_samples=samples),
                 config.RunConfig(stage=3, datapath="", datapath_index="", savepath="", method="ewc", smax=7.0))
    method.stage = loop.Stage(3, method.run, torch.device("cpu"), teacher, {"model_config": teacher.config_dict()},
                              {}, None, lambda number: data[number], None)
    method.tasks, method.fisher, method.anchor = 0, {}, {}
    return method


def tiny_tasks() -> dict[int, tuple[TaskData, np.ndarray]]:
    rng = np.random.default_rng(5)
    task1 = TaskData(rng.integers(1, 30, (5, 8)), rng.integers(1, 30, 5), 30)
    task2 = TaskData(rng.integers(1, 30, (4, 8)), rng.integers(0, 7, 6), 7, source_row=np.array([0, 0, 1, 2, 3, 3]))
    return {1: (task1, np.array([4, 0, 2])), 2: (task2, np.arange(6))}


def test_ewc_fisher_is_the_mean_squared_per_example_gradient():
    model, teacher = grown()
    model.config.use_masks = False
    data = tiny_tasks()
    method = ewc_stage(model, teacher, data)
    fisher = method.task_fisher(model, 2)
    task2, rows = data[2]
    by_hand = {name: torch.zeros_like(p) for name, p in shared_parameters(model)}
    for row in rows:
        model.zero_grad()
        source = torch.from_numpy(task2.sources[task2.source_row[[row]]])
        F.cross_entropy(model(source, 1, 7.0)[0], torch.from_numpy(task2.targets[[row]])).backward()
        for name, p in shared_parameters(model):
            by_hand[name] += p.grad ** 2 / len(rows)
    for name, value in by_hand.items():
        torch.testing.assert_close(fisher[name], value, rtol=1e-5, atol=1e-12, msg=name)
    assert sum(float(v.sum()) for v in fisher.values()) > 0
    task1, rows1 = data[1]
    model.zero_grad()                                                    # task 1: next-item CE over the sequence
    sequence = torch.cat([torch.from_numpy(task1.sources[[rows1[0]]]),
                          torch.from_numpy(task1.targets[[rows1[0]]])[:, None]], 1)
    logits = model.heads[0](model.hidden(sequence[:, :-1], model.task_masks(0, 7.0), last_only=False))
    F.cross_entropy(logits.reshape(-1, 30), sequence[:, 1:].reshape(-1)).backward()
    one = ewc_stage(model, teacher, data, samples=1).task_fisher(model, 1)
    torch.testing.assert_close(one["blocks.0.conv1.weight"], model.blocks[0].conv1.weight.grad ** 2)


def test_ewc_penalty_has_the_gradient_of_one_penalty_per_task():
    """Σ_j F_j (θ − θ*_j)² kept as F (θ − θ̄)²: the same gradient as the sum over tasks, 0 at a lone anchor."""
    model, teacher = grown()
    model.config.use_masks = False
    data = tiny_tasks()
    method = ewc_stage(model, teacher, data)
    first = {name: p.detach().clone() for name, p in shared_parameters(model)}
    fisher1 = method.task_fisher(model, 1)
    method.consolidate(model, 1)
    assert float(method.penalty(model).detach()) == pytest.approx(0.0, abs=1e-12)    # at its anchor
    with torch.no_grad():
        for _, p in shared_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    second = {name: p.detach().clone() for name, p in shared_parameters(model)}
    fisher2 = method.task_fisher(model, 2)
    method.consolidate(model, 2)
    assert method.tasks == 2
    with torch.no_grad():
        for _, p in shared_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    merged = torch.autograd.grad(method.penalty(model), [p for _, p in shared_parameters(model)])
    explicit = sum((fisher1[n] * (p - first[n]) ** 2).sum() + (fisher2[n] * (p - second[n]) ** 2).sum()
                   for n, p in shared_parameters(model))
    wanted = torch.autograd.grad(explicit, [p for _, p in shared_parameters(model)])
    for got, want in zip(merged, wanted):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    method.grow(model, 4)                                                # task 3's head; the backbone unchanged
    terms = list(method.terms(model, Step(torch.randint(1, 30, (4, 8)), torch.randint(0, 4, (4,)), 3.0, Shard(4))))
    assert len(terms) == 2
    assert float(terms[1].detach()) == pytest.approx(5.0 * float(method.penalty(model).detach()), rel=1e-6)


# ------------------------------------------------------------------ every method through the real scripts

@pytest.fixture(scope="module")
def chain(tmp_path_factory, data_writer):
    """A shared TERACON stage 1, then stages 2 and 3 of every non-default method, one epoch each."""
    root = tmp_path_factory.mktemp("methods")
    data = data_writer(root / "data", n_users=120, seed=8)
    common = ["--datapath_index", str(root / "index.csv"), "--channels", "8", "--device", "cpu", "--epochs", "1",
              "--batch", "64"]
    loop.main(1, ["--datapath", str(data.task1), "--savepath", str(root / "task1"), *common])
    results = {}
    for name in ("lwf", "ewc"):
        for stage, path in ((2, data.task2), (3, data.task3)):
            previous = root / "task1.t7" if stage == 2 else root / f"{name}{stage - 1}.t7"
            results[name, stage] = loop.main(stage, ["--datapath", str(path), "--paths", str(previous), "--savepath",
                                                     str(root / f"{name}{stage}"), "--method", name, *common])
    return root, data, results


def test_lwf_and_ewc_run_stages_and_score_every_task(chain):
    root, _, results = chain
    for (name, stage), metrics in results.items():
        assert set(metrics["tasks"]) == {str(k) for k in range(1, stage + 1)}, (name, stage)
        saved = checkpoints.load_checkpoint(str(root / f"{name}{stage}.t7"))
        assert saved["run_config"]["method"] == name and not saved["model_config"]["use_masks"]
        model = NextItNet.from_checkpoint(saved)                      # strict round trip
        assert model.config.task_classes == saved["model_config"]["task_classes"]


def test_ewc_keeps_every_tasks_fisher_in_its_checkpoints(chain):
    """Stage 2 (after a TERACON stage 1, which has none) computes task 1's Fisher at its start and task 2's at its
    end; stage 3 reads both from stage 2's checkpoint and adds task 3's."""
    root, _, _ = chain
    second = checkpoints.load_checkpoint(str(root / "ewc2.t7"))["method_state"]
    third = checkpoints.load_checkpoint(str(root / "ewc3.t7"))["method_state"]
    assert second["tasks"] == 2 and third["tasks"] == 3
    names = {name for name, _ in shared_parameters(NextItNet.from_checkpoint(
        checkpoints.load_checkpoint(str(root / "ewc2.t7"))))}
    assert set(second["fisher"]) == set(second["anchor"]) == names
    for name in names:
        assert torch.all(third["fisher"][name] >= second["fisher"][name])    # Fisher only adds up
    assert any(not torch.equal(third["fisher"][n], second["fisher"][n]) for n in names)


# ------------------------------------------------------------------ checkpoints written before the run config

LEGACY = ["task1", "task2", "task3", "finetune2", "carry2"]


@pytest.mark.parametrize("name", LEGACY)
def test_checkpoints_of_the_previous_format_evaluate_to_their_metrics(monkeypatch, name):
    """Checkpoints and metrics.json written by main at 95e4187 (tests/fixtures/legacy: format 1, the command line
    under "args"): they load, their run config is converted, and every task scores what it scored then."""
    monkeypatch.chdir(FIXTURES)                                           # their records name data/taskK.csv
    saved = checkpoints.load_checkpoint(f"{name}.t7")
    assert saved["format_version"] == 2 and "args" not in saved
    run = config.run_config_from_dict(saved["run_config"])
    assert run.method == ("finetune" if name == "finetune2" else "teracon") and run.smax == 50
    model = NextItNet.from_checkpoint(saved).eval()
    tasks = scoring.evaluate_tasks(model, saved["tasks"], read_index("index.csv"), run.smax, 256,
                                    torch.device("cpu"), run.top_k)
    stored = json.loads(Path(f"{name}.metrics.json").read_text())["tasks"]
    assert set(tasks) == set(stored)
    for number, entry in stored.items():
        assert json.loads(json.dumps(tasks[number]["test"])) == pytest.approx(entry["test"], abs=1e-6), number
        for metric, bounds in entry["ci95"].items():
            assert list(tasks[number]["ci95"][metric]) == pytest.approx(bounds, abs=1e-6), (number, metric)


def test_the_previous_formats_retention_rules_become_options(monkeypatch):
    monkeypatch.chdir(FIXTURES)
    third = checkpoints.load_checkpoint("task3.t7")["run_config"]["options"]   # --retention per_task_smax_kl ...
    assert (third["rows"], third["weights"], third["retention_at"], third["distance"], third["carry_masks"],
            third["alpha"], third["own_blocks"]) == ("all", "mean", "smax", "kl", "off", 2.0, 1)
    carry = checkpoints.load_checkpoint("carry2.t7")["run_config"]["options"]  # per_task_smax_kl_carry_plain
    assert carry["carry_masks"] == "all" and carry["mask_capacity"] == 0.1 and carry["no_relation"]  # retired: kept
    assert carry["preset"] == "legacy --retention per_task_smax_kl_carry_plain"                     # as recorded
    options = config.run_config_from_dict(checkpoints.load_checkpoint("carry2.t7")["run_config"]).options
    assert options.no_relation and not hasattr(options, "carry_masks") and not hasattr(options, "mask_capacity")
    assert checkpoints.load_checkpoint("task2.t7")["run_config"]["options"]["rows"] == "sampled"


@pytest.mark.slow
def test_a_chain_continues_from_a_checkpoint_of_the_previous_format(tmp_path, subprocess_env, repo_root):
    """Stage 3 from the old stage-2 checkpoint, through the real script and evaluate.py."""
    folder = tmp_path / "legacy"
    shutil.copytree(FIXTURES, folder)
    run = subprocess.run([sys.executable, str(repo_root / "train_teracon_t3.py"), "--datapath", "data/task3.csv",
                          "--paths", "task2.t7", "--savepath", "next3", "--datapath_index", "index.csv",
                          "--channels", "8", "--device", "cpu", "--epochs", "1", "--batch", "32"],
                         cwd=folder, env=subprocess_env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads((folder / "next3.metrics.json").read_text())
    assert set(metrics["tasks"]) == {"1", "2", "3"}
    scored = subprocess.run([sys.executable, str(repo_root / "evaluate.py"), "--paths", "task2.t7", "--task", "2",
                             "--device", "cpu"], cwd=folder, env=subprocess_env, capture_output=True, text=True,
                            timeout=240)
    assert scored.returncode == 0, scored.stderr[-2000:]
    stored = json.loads((folder / "task2.metrics.json").read_text())["tasks"]["2"]["test"]
    assert json.loads(scored.stdout)["test"] == pytest.approx(stored, abs=1e-6)


# ------------------------------------------------------------------ docs/adding_a_method.md

def test_the_worked_example_runs_as_a_method(repo_root, tmp_path, monkeypatch, data_writer):
    """The docs page's method file and registry line, as written there: a stage-2 run through the loop, whose
    penalty is 0 at the start and pulls the backbone towards stage 1's."""
    page = (repo_root / "docs" / "adding_a_method.md").read_text(encoding="utf-8")
    code, line = re.findall(r"```python\n(.*?)```", page, re.S)[:2]
    (tmp_path / "worked_l2.py").write_text(code, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    name, target = re.fullmatch(r'\s*"(\w+)": "continual\.methods\.l2:(\w+)",\s*', line).groups()
    monkeypatch.setitem(METHODS, name, f"worked_l2:{target}")
    data = data_writer(tmp_path / "data", n_users=120, seed=9)
    common = ["--datapath_index", str(tmp_path / "index.csv"), "--channels", "8", "--device", "cpu", "--epochs",
              "1", "--batch", "64"]
    loop.main(1, ["--datapath", str(data.task1), "--savepath", str(tmp_path / "task1"), *common])
    penalties = []
    original = loop.train_step

    def spy(model, method, optimizer, step, *args):
        loss, kept, stepped = original(model, method, optimizer, step, *args)
        penalties.append(float(kept))
        return loss, kept, stepped
    monkeypatch.setattr(loop, "train_step", spy)
    metrics = loop.main(2, ["--datapath", str(data.task2), "--paths", str(tmp_path / "task1.t7"), "--savepath",
                            str(tmp_path / "l2"), "--method", name, "--l2_lambda", "10", *common])
    assert set(metrics["tasks"]) == {"1", "2"} and penalties[0] == 0.0 and max(penalties) > 0
    assert os.path.isfile(tmp_path / "l2.t7")


def test_ewc_leaves_the_rows_of_new_items_free():
    """--protocol time: a table that grew since the Fisher was taken (new items' rows) is penalised on its earlier
    rows only, as before the growth: the new rows have Fisher 0."""
    torch.manual_seed(0)
    fisher, anchor = torch.rand(5, 3), torch.randn(5, 3)
    assert torch.equal(ewc.grown(fisher, 5), fisher)
    wide = ewc.grown(fisher, 8)
    assert wide.shape == (8, 3) and torch.equal(wide[:5], fisher) and not wide[5:].any()
    method = object.__new__(EWC)
    method.fisher, method.anchor = {"item_embedding.weight": fisher}, {"item_embedding.weight": anchor}
    model = torch.nn.Module()
    model.item_embedding = torch.nn.Embedding(8, 3)
    weights = model.item_embedding.weight
    expected = float((fisher * (weights.detach()[:5] - anchor) ** 2).sum())
    assert float(method.penalty(model).detach()) == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        weights[5:] += 100.0                                               # the new rows cost nothing
    assert float(method.penalty(model).detach()) == pytest.approx(expected, rel=1e-6)
