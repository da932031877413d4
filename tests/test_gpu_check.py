"""tools/gpu_check.sh --cpu-dry-run: the prepared GPU check, end to end at tiny sizes on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tools import gpu_check


@pytest.mark.slow
def test_the_dry_run_runs_every_step_and_writes_its_report(repo_root, subprocess_env, tmp_path):
    out = tmp_path / "check"
    done = subprocess.run(["bash", "tools/gpu_check.sh", str(out), "--cpu-dry-run"], cwd=repo_root,
                          env=subprocess_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and report["passed"]
    expected = {"cuda_tests", "stages_data", *gpu_check.bench_steps(True), *gpu_check.stage_steps(str(out), True)[0],
                *gpu_check.ttl_steps(str(out), True)}
    assert set(report["steps"]) == expected
    assert all(step["returncode"] == 0 for step in report["steps"].values())
    for name in gpu_check.bench_steps(True):
        result = report["steps"][name]["result"]
        assert result["seconds"] > 0 and result["peak_mib"] > 0, name
    assert "skipped" in report["steps"]["cuda_tests"]["summary"]            # no GPU here: every CUDA test skips
    checks = report["agreement"]
    assert set(checks) == {"checkpoint_scored_on_gpu", "stage1_trained_on_gpu", "stage2_trained_on_gpu"}
    assert all(check["passed"] for check in checks.values())  # what they compare: test_agreement_flags_a_gap
    assert checks["checkpoint_scored_on_gpu"]["max_abs_difference"] == 0.0  # the CPU twice here: scoring deterministic
    log = (out / "gpu_check.log").read_text()
    assert all(f"=== {name}:" in log for name in expected)
    ttl = report["ttl_resources"]                       # stage 1, fine-tuning's and the recommended chain, then --amp
    assert len([path for path in ttl if path.startswith("ttl_dry_run")]) == 11
    assert {"ttl_amp/task1.resources.json", "ttl_amp/task6.resources.json"} <= set(ttl)
    assert all(entry["steps"] == 2 and entry["peak_rss_mib"] > 0 for entry in ttl.values())
    assert "Batch sizes that fit one GPU" in log                 # the scale report of the dry run


@pytest.mark.parametrize("eval_gap, train_gap", [(0.001, 0.02), (0.004, 0.05)])
def test_agreement_flags_a_gap_beyond_its_tolerance(tmp_path, eval_gap, train_gap):
    """The GPU's scores against the CPU's: the largest absolute difference of any test metric, passed within
    EVAL_TOLERANCE (a CPU checkpoint scored on the GPU) and TRAIN_TOLERANCE (a stage trained on each)."""
    cpu_scores = {"mrr@5": 0.30, "hit@5": 0.50, "acc": 0.10}

    def metrics_file(name: str, shift: float, worst: str) -> str:
        save = str(tmp_path / name)
        test = {metric: value + (shift if metric == worst else shift / 4) for metric, value in cpu_scores.items()}
        (tmp_path / f"{name}.metrics.json").write_text(json.dumps({"tasks": {"1": {"test": test}}}))
        return save

    saves = {"stages_cpu_1": metrics_file("cpu1", 0.0, "acc"), "stages_cpu_2": metrics_file("cpu2", 0.0, "acc"),
             "stages_gpu_1": metrics_file("gpu1", train_gap, "hit@5"),
             "stages_gpu_2": metrics_file("gpu2", -train_gap, "acc")}
    scored = {metric: value - (eval_gap if metric == "mrr@5" else 0.0) for metric, value in cpu_scores.items()}
    (tmp_path / "stages_cpu_checkpoint_on_gpu.json").write_text(json.dumps({"test": scored}))
    records = {name: {"returncode": 0} for name in [*saves, "stages_cpu_checkpoint_on_gpu"]}
    checks = gpu_check.agreement(records, saves, str(tmp_path))
    assert checks["checkpoint_scored_on_gpu"]["max_abs_difference"] == pytest.approx(eval_gap)
    assert checks["checkpoint_scored_on_gpu"]["passed"] == (eval_gap <= gpu_check.EVAL_TOLERANCE)
    for stage in (1, 2):
        check = checks[f"stage{stage}_trained_on_gpu"]
        assert check["max_abs_difference"] == pytest.approx(train_gap)
        assert check["passed"] == (train_gap <= gpu_check.TRAIN_TOLERANCE)
    records["stages_gpu_2"]["returncode"] = 1                      # a failed step is not compared
    assert "stage2_trained_on_gpu" not in gpu_check.agreement(records, saves, str(tmp_path))


def test_the_real_check_asks_for_ttl_sizes():
    rows = gpu_check.bench_steps(False)
    assert {"bench_task1_fp32", "bench_task1_amp", "bench_stage6_paper_amp", "bench_stage6_recommended_fp32",
            "bench_stage6_recommended_amp"} <= set(rows)
    assert all("645974" in arguments and "cuda" in arguments for arguments in rows.values())
    ttl = gpu_check.ttl_steps("/tmp/x", False)
    assert list(ttl)[:2] == ["ttl_data", "ttl_recommended_fp32"]           # first: the data, then the dry run
    assert "--items" not in ttl["ttl_data"]                                 # TTL's own shapes, the generator's default
    for name in ("ttl_recommended_fp32", "ttl_stage1_amp", "ttl_recommended_stage6_amp"):
        arguments = ttl[name]
        assert arguments[arguments.index("--device") + 1] == "cuda" and "--max_steps" in arguments
    assert "--amp" in ttl["ttl_recommended_stage6_amp"] and "--expert" in ttl["ttl_recommended_stage6_amp"]
    stages, _ = gpu_check.stage_steps("/tmp/x", False)
    assert stages["stages_gpu_1"][stages["stages_gpu_1"].index("--device") + 1] == "cuda"
    assert "--dataset" in stages["stages_gpu_2"] and "demo" in stages["stages_gpu_2"]


@pytest.mark.slow
def test_bench_rules_times_the_recommended_step_beside_the_paper_rules(repo_root, subprocess_env):
    """bench.py --rules --profile: both stage-K steps, the paper rule at its saturated ratio (no retention row at
    batch 32), their ratio, and where each step's time goes: one term for the paper rule, the new task's and one
    per earlier task for the recommended rule, with the teacher's and the expert's forwards inside them when they
    are recomputed, and none once every user's outputs are kept (--frozen_cache_mib)."""
    done = subprocess.run([sys.executable, "tools/bench.py", "--rules", "--profile", "--items", "60", "--length", "8",
                           "--channels", "8", "--users", "64", "--batch", "32", "--stage", "3", "--classes", "4",
                           "--steps", "2"],
                          cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert any("(paper: 0 retention rows per earlier task)" in line for line in lines), done.stdout
    assert any("(recommended, expert 1, own blocks 2, new task at smax: 16 retention rows per earlier task)" in line
               for line in lines)                                                     # recomputed: nothing kept
    for rows, at_smax in ((16, ", new task at smax"), (32, "")):                      # the preset; until 2026-12-05
        assert any(f"(recommended, expert 1, own blocks 2{at_smax}, frozen outputs kept: {rows} retention rows per "
                   "earlier task)" in line for line in lines), (rows, at_smax)
    result = json.loads(lines[-1])
    paper, recommended = result["paper"], result["recommended"]
    assert result["ratio"] == recommended["seconds"] / paper["seconds"]
    for name in ("recommended_recomputed", "recommended_all_rows"):
        assert result["ratios"][name] == result[name]["seconds"] / paper["seconds"]
    assert result["recommended_recomputed"]["kept"] == [] and paper["kept"] == []
    assert result["recommended"]["kept"] == ["task2", "expert", "task1"]   # 4 classes each, then the 60 items
    assert len(paper["profile"]["terms"]) == 1 and paper["profile"]["teacher_forward"] == 0
    assert paper["profile"]["expert_forward"] == 0
    profile = result["recommended_recomputed"]["profile"]
    assert len(profile["terms"]) == 3 and profile["teacher_forward"] > 0 and profile["expert_forward"] > 0
    kept = recommended["profile"]                      # after the untimed first epoch every user's outputs are kept
    assert len(kept["terms"]) == 3 and kept["teacher_forward"] == 0 and kept["expert_forward"] == 0
    inside = sum(term["forward"] for term in profile["terms"])
    assert profile["teacher_forward"] + profile["expert_forward"] < inside     # the frozen passes are inside the terms
