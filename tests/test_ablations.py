"""The ablation flags and the fine-tuning baseline run as scripts and change what they say they change."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


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
