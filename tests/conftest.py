"""Shared fixtures: the repository root on sys.path, tiny models and tiny synthetic TERACON data.

The synthetic data has a learnable structure (deterministic for a seed):
- every user has a hidden step in {1, 2, 3} and a start item; the sequence walks the item ring
  start, start+step, start+2·step, ... (raw ids 1..n_items); every fourth user is 3 items shorter,
  so task 1 is ragged and the loader must left-pad it with 0 (raw "0" becomes item 1);
- task 2 (`rec`): the source is the sequence without its last item, targets are the classes
  1000 + last_source_item mod n_rec, and every third line carries a second target
  1000 + (last_source_item + 1) mod n_rec (a line with m targets = m examples);
- task 3 (`cls`): the source as in task 2, the target is the user's step (3 classes).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Two CPU cores shared with other work: one intra-op thread keeps timings stable.
torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one (tools/gpu_check.py runs them)")
    config.addinivalue_line("markers", "slow: 2 s or more on the 2-core CPU machine (pytest --durations); "
                                       "`-m \"not slow\"` leaves them out")


@dataclass
class SyntheticData:
    folder: Path
    task1: Path
    task2: Path
    task3: Path
    n_users: int
    n_items: int         # raw items 1..n_items
    n_rec: int           # task-2 target classes (without <UNK>)
    steps: np.ndarray    # [n_users] task-3 label of each user (1..3)
    lines2: int          # task-2 examples (lines expanded by their targets)

    @property
    def index(self) -> Path:
        return self.folder / "index.csv"


def write_synthetic(folder: Path, n_users: int = 400, length: int = 12, n_items: int = 100,
                    n_rec: int = 40, seed: int = 0) -> SyntheticData:
    rng = np.random.default_rng(seed)
    steps = rng.integers(1, 4, n_users)
    starts = rng.integers(0, n_items, n_users)
    task1, task2, task3 = [], [], []
    examples2 = 0
    for user in range(n_users):
        size = length if user % 4 else length - 3
        sequence = [int((starts[user] + steps[user] * i) % n_items + 1) for i in range(size)]
        source = ",".join(map(str, sequence[:-1]))
        last = sequence[-2]
        targets = [1000 + last % n_rec]
        if user % 3 == 0:
            targets.append(1000 + (last + 1) % n_rec)
        examples2 += len(targets)
        task1.append(",".join(map(str, sequence)))
        task2.append(source + ",," + ",".join(map(str, targets)))
        task3.append(source + ",," + str(int(steps[user])))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, lines in (("task1.csv", task1), ("task2.csv", task2), ("task3.csv", task3)):
        path = folder / name
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return SyntheticData(folder, *paths, n_users=n_users, n_items=n_items, n_rec=n_rec, steps=steps,
                         lines2=examples2)


@pytest.fixture
def synthetic_data(tmp_path):
    """Factory: synthetic_data(**kwargs) writes the three task files into a fresh folder of tmp_path."""
    counter = [0]

    def make(**kwargs) -> SyntheticData:
        counter[0] += 1
        return write_synthetic(tmp_path / f"data{counter[0]}", **kwargs)

    return make


@pytest.fixture
def tiny_model():
    """Factory: a NextItNet with few channels, random (non-default) task embeddings and relation layers."""
    from model import ModelConfig, NextItNet

    def make(task_classes=(30,), channels=16, relation=False, dilations=None, seed=0, n_items=None):
        torch.manual_seed(seed)
        kwargs = {} if dilations is None else {"dilations": list(dilations)}
        config = ModelConfig(n_items=n_items or task_classes[0], task_classes=list(task_classes),
                             channels=channels, relation=relation, **kwargs)
        model = NextItNet(config).eval()
        with torch.no_grad():
            model.task_embedding.uniform_(-2.0, 2.0)
            if relation:
                model.relation_weight.normal_(0.0, 0.7)
                model.relation_bias.normal_(0.0, 0.3)
        return model

    return make


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def data_writer():
    """write_synthetic itself, for module-scoped fixtures that make their own folders."""
    return write_synthetic


@pytest.fixture(scope="session")
def two_stages(data_writer, subprocess_env):
    """Factory: two_stages(folder, *flags) writes conftest's data into folder/data, runs train_task1.py and
    train_teracon_t2.py on it as subprocesses with `flags` (each must succeed) → (folder, [the two stdouts])."""
    import subprocess

    def run(folder: Path, *flags: str) -> tuple[Path, list[str]]:
        data = data_writer(folder / "data")
        common = ["--datapath_index", str(folder / "index.csv"), "--channels", "8", "--device", "cpu", *flags]
        outputs = []
        for script, own in (("train_task1.py", ["--datapath", str(data.task1), "--savepath", str(folder / "task1")]),
                            ("train_teracon_t2.py", ["--datapath", str(data.task2), "--paths",
                                                     str(folder / "task1.t7"), "--savepath", str(folder / "task2")])):
            done = subprocess.run([sys.executable, script, *own, *common], cwd=REPO_ROOT, env=subprocess_env,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            outputs.append(done.stdout)
        return folder, outputs

    return run


@pytest.fixture(scope="session")
def subprocess_env() -> dict:
    """Environment for script runs: one thread per process (stable timings on two shared cores)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


@pytest.fixture(scope="session")
def source_items():
    """A task file → each line's source items, as ints (a task-1 line: all of it)."""
    def read(path: Path) -> list[list[int]]:
        return [[int(item) for item in line.split(",,")[0].split(",")] for line in path.read_text().splitlines()]
    return read
