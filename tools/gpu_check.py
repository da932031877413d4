"""The prepared GPU check: everything this suite can only learn on a CUDA GPU, in one unattended call.

    bash tools/gpu_check.sh OUTDIR                 # on the GPU machine (under 8 minutes on one H100/H200)
    bash tools/gpu_check.sh OUTDIR --cpu-dry-run   # tiny sizes on the CPU: the script itself, end to end (CI)

Writes OUTDIR/gpu_check.json (every step: its command, exit status, seconds and what it measured) and
OUTDIR/gpu_check.log (every step's whole output). Steps, each in its own process with its own time limit, most
telling first, all within BUDGET seconds (8 minutes with the machine's start): a step that would start after the
budget is spent is recorded as skipped.

1. `ttl_*`: a TTL-shaped dry run on the device: tools/ttl_shaped.py writes TTL's six files (645,974 items, length
   100, TTL's class counts) with 20,000 users a task, then compare.py runs the recommended configuration (stage 1,
   fine-tuning's chain, the recommended chain with --expert) with --max_steps 2 --eval_users 2000 in fp32, then
   stage 1 and the recommended stage 6 again under --amp from that chain's checkpoints; tools/scale_report.py
   prints what each stage cost (resources.json: seconds, peak GPU memory) and the accounting's batch sizes.
2. `cuda_tests`: pytest -m cuda (tests/test_cuda.py: bf16 autocast, --compile, the pinned staging copies, the
   streaming backward on CUDA, a one-process torchrun on nccl); on the CPU they skip.
3. `bench_*`: tools/bench.py at TTL scale (645,974 items, length 100, 256 channels; batch 32 for task 1 and 1,024
   for stage 6): the task-1 step and the stage-6 step of the paper rule (as it runs once its masks saturate: every
   ratio at the floor 1 − σ(6), 2 rows of 1,024) and of the recommended rule (1,024 // 5 rows of each earlier task,
   KL at smax, the new task at smax, the expert term, two own blocks, the frozen outputs kept; bench.py's --rules
   rows) in fp32 and --amp, and evaluation throughput, each with its peak memory.
4. `stages_*`: stages 1 and 2 of the demo (--epochs 1) on CUDA and on the CPU, same seed, and the CPU stage-1
   checkpoint scored on CUDA. The CPU checkpoint scored on the GPU must give the CPU's test metrics within 2e-3
   (the same weights; only the kernels' rounding differs, which can swap near-tied items); the GPU's own
   stages must score within 0.03 of the CPU's (a whole epoch of steps in other rounding drifts further).

The dry run uses 500 items, length 12, 16 channels, 300 TTL-shaped users with small class counts, and a tiny
synthetic benchmark in OUTDIR/data in place of the demo. Nothing is downloaded and nothing outside the checkout
and OUTDIR is read or written (torch.compile's caches go to a temporary folder). The exit status is 0 when every
step that ran passed (CUDA-test skips count as passed), else 1.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file (python tools/…): import the suite from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from continual import flags
from continual.datasets import DATASETS
from utils import atomic_write_text, cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TTL = ["--items", "645974", "--length", "100", "--channels", "256", "--users", "4096", "--batch1", "32",
       "--batch", "1024", "--classes", "100"]
TINY = ["--items", "500", "--length", "12", "--channels", "16", "--users", "256", "--batch1", "8", "--batch", "32",
        "--classes", "5", "--steps", "1"]
TTL_DATA = ["--users", "20000"]
TINY_TTL_DATA = ["--users", "300", "--items", "500", "--length", "12", "--classes", "40,30,9,3,7"]
TTL_LIMITS = ["--max_steps", "2", "--eval_users", "2000"]
EVAL_TOLERANCE, TRAIN_TOLERANCE = 2e-3, 0.03
BUDGET = 450                                   # seconds for every step together (the machine's start comes on top)
OWN_FOLDERS = ("ttl_data", "ttl_dry_run", "ttl_amp", "stages_gpu", "stages_cpu", "data")   # made afresh in OUTDIR


def ttl_steps(out: str, dry_run: bool) -> dict[str, list[str]]:
    """name → arguments: TTL-shaped data written on the device, the recommended configuration's dry run through
    compare.py in fp32, stage 1 and the recommended stage 6 again under --amp, and the scale report of the run."""
    data, runs, amp = (os.path.join(out, name) for name in ("ttl_data", "ttl_dry_run", "ttl_amp"))
    first = os.path.join(runs, "seed0")
    limits = [*TTL_LIMITS, "--device", "cpu" if dry_run else "cuda"] + (["--channels", "16"] if dry_run else [])
    files = [os.path.join(data, name) for name in DATASETS["ttl"]["files"]]
    common = ["--dataset", "ttl_shaped", "--datapath_index", os.path.join(first, "index.csv"), "--amp", *limits]
    return {
        "ttl_data": ["tools/ttl_shaped.py", "--out", data, *(TINY_TTL_DATA if dry_run else TTL_DATA)],
        "ttl_recommended_fp32": ["compare.py", "--dataset", "ttl_shaped", "--data", data, "--seeds", "1", "--jobs",
                                 "1", "--threads", str(os.cpu_count() or 1), "--methods", "recommended", "--out", runs,
                                 "--", *limits],
        "ttl_stage1_amp": ["train_task1.py", "--datapath", files[0], "--savepath", os.path.join(amp, "task1"), *common],
        "ttl_recommended_stage6_amp": ["train_teracon.py", "--stage", "6", "--datapath", files[5], "--paths",
                                       os.path.join(first, "recommended", "task5.t7"), "--preset", "recommended",
                                       "--expert", os.path.join(first, "finetune", "task6.t7"), "--savepath",
                                       os.path.join(amp, "task6"), *common],
        "ttl_report": ["tools/scale_report.py", runs]}


def bench_steps(dry_run: bool) -> dict[str, list[str]]:
    """name → tools/bench.py arguments for one phase."""
    sizes, device = (TINY, "cpu") if dry_run else (TTL, "cuda")
    base = ["tools/bench.py", *sizes, "--device", device]
    rows = {}
    for precision, extra in (("fp32", []), ("amp", ["--amp"])):
        rows[f"bench_task1_{precision}"] = [*base, *extra, "--phase", "task1"]
        for rule in ("paper", "recommended"):
            rows[f"bench_stage6_{rule}_{precision}"] = [*base, *extra, "--stage", "6", "--rule", rule, "--phase", "taskK"]
    rows["bench_eval_amp"] = [*base, "--amp", "--phase", "eval"]
    return rows


def stage_steps(out: str, dry_run: bool) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(name → a stage script's arguments, name → its savepath): stages 1–2 on CUDA and on the CPU, and the CPU
    checkpoint scored on CUDA (evaluate.py)."""
    steps, saves = {}, {}
    if dry_run:
        data = os.path.join(out, "data")
        files = {1: os.path.join(data, "task1.csv"), 2: os.path.join(data, "task2.csv")}
        dataset = ["--channels", "16"]
    else:
        files, dataset = {}, ["--dataset", "demo"]
    devices = ["cpu", "cpu"] if dry_run else ["cuda", "cpu"]
    for label, device in zip(("gpu", "cpu"), devices):
        folder = os.path.join(out, f"stages_{label}")
        index = os.path.join(folder, "index.csv")
        common = [*dataset, "--epochs", "1", "--device", device, "--seed", "0", "--datapath_index", index]
        saves[f"stages_{label}_1"], saves[f"stages_{label}_2"] = (os.path.join(folder, "task1"),
                                                                    os.path.join(folder, "task2"))
        steps[f"stages_{label}_1"] = ["train_task1.py", *common, "--savepath", saves[f"stages_{label}_1"]] + (
            ["--datapath", files[1]] if files else [])
        steps[f"stages_{label}_2"] = ["train_teracon_t2.py", *common, "--paths", saves[f"stages_{label}_1"] + ".t7",
                                      "--savepath", saves[f"stages_{label}_2"]] + (
            ["--datapath", files[2]] if files else [])
    steps["stages_cpu_checkpoint_on_gpu"] = ["evaluate.py", "--paths", saves["stages_cpu_1"] + ".t7", "--task", "1",
                                             "--device", devices[0], "--datapath_index",
                                             os.path.join(out, "stages_cpu", "index.csv"),
                                             "--json", os.path.join(out, "stages_cpu_checkpoint_on_gpu.json")]
    return steps, saves


def run(name: str, arguments: list[str], log, env: dict, limit: int) -> dict:
    """One step in its own process; its output appended to the log; → its record (with the resources.json of every
    stage a ttl_* step wrote)."""
    command = [sys.executable, *arguments]
    started = time.time()
    log.write(f"\n=== {name}: {' '.join(command)}\n")
    log.flush()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        code, output = 124, f"{error.stdout or ''}{error.stderr or ''}\ntimed out after {limit} s"
    log.write(output if isinstance(output, str) else output.decode(errors="replace"))
    log.flush()
    record = {"command": command[1:], "returncode": code, "seconds": round(time.time() - started, 1)}
    if name.startswith("bench_") and code == 0:
        record["result"] = json.loads(output.strip().splitlines()[-1]) if output.strip() else {}
    if name == "cuda_tests":
        record["summary"] = output.strip().splitlines()[-1] if output.strip() else ""
    return record


def ttl_resources(out: str) -> dict[str, dict]:
    """Every TTL-shaped stage's resources.json (OUTDIR/ttl_dry_run, OUTDIR/ttl_amp), by its path under OUTDIR."""
    found = {}
    for folder, _, names in [walked for run in ("ttl_dry_run", "ttl_amp") for walked in os.walk(os.path.join(out, run))]:
        for name in sorted(names):
            if name.endswith(".resources.json"):
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    found[os.path.relpath(os.path.join(folder, name), out)] = json.load(handle)
    return found


def test_metrics(save: str) -> dict[str, float]:
    with open(save + ".metrics.json", encoding="utf-8") as handle:
        return {f"task{k}:{m}": v for k, entry in json.load(handle)["tasks"].items() for m, v in entry["test"].items()}


def agreement(records: dict, saves: dict[str, str], out: str) -> dict:
    """The GPU's scores against the CPU's: the CPU checkpoint scored on the GPU, and each stage trained there."""
    checks = {}
    scored = os.path.join(out, "stages_cpu_checkpoint_on_gpu.json")
    if records.get("stages_cpu_checkpoint_on_gpu", {}).get("returncode") == 0 and os.path.isfile(scored):
        with open(scored, encoding="utf-8") as handle:
            on_gpu = json.load(handle)["test"]
        on_cpu = {k.split(":", 1)[1]: v for k, v in test_metrics(saves["stages_cpu_1"]).items() if k.startswith("task1:")}
        gap = max(abs(on_gpu[m] - v) for m, v in on_cpu.items() if m in on_gpu)
        checks["checkpoint_scored_on_gpu"] = {"max_abs_difference": gap, "tolerance": EVAL_TOLERANCE,
                                              "passed": gap <= EVAL_TOLERANCE}
    for stage in (1, 2):
        names = (f"stages_gpu_{stage}", f"stages_cpu_{stage}")
        if all(records.get(n, {}).get("returncode") == 0 for n in names):
            gpu, cpu = (test_metrics(saves[n]) for n in names)
            gap = max(abs(gpu[k] - cpu[k]) for k in cpu)
            checks[f"stage{stage}_trained_on_gpu"] = {"max_abs_difference": gap, "tolerance": TRAIN_TOLERANCE,
                                                      "passed": gap <= TRAIN_TOLERANCE}
    return checks


def environment() -> dict:
    import torch
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "cpus": os.cpu_count(), "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=flags.output_dir, help="folder for gpu_check.json and gpu_check.log")
    parser.add_argument("--cpu-dry-run", dest="dry_run", action="store_true",
                        help="tiny sizes on the CPU (the script end to end, as CI runs it)")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    for name in OWN_FOLDERS:                   # a check measures afresh: an earlier call's stages are not reused
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    report = {"dry_run": args.dry_run, "environment": environment(), "steps": {}}
    if not args.dry_run and not report["environment"]["cuda"]:
        print("no CUDA GPU here: run with --cpu-dry-run to check the script on the CPU")
    caches = tempfile.mkdtemp(prefix="gpu_check_cache_")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"),
               TRITON_CACHE_DIR=os.path.join(caches, "triton"))
    if args.dry_run:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    steps = ttl_steps(out, args.dry_run)
    steps["cuda_tests"] = ["-m", "pytest", "-q", "-m", "cuda", "-rs", "tests/test_cuda.py"]
    steps.update(bench_steps(args.dry_run))
    stages, saves = stage_steps(out, args.dry_run)
    if args.dry_run:
        steps["stages_data"] = ["tools/synth.py", "--out", os.path.join(out, "data"), "--users", "120", "--items",
                                "60", "--length", "8"]
    steps.update(stages)
    started = time.time()
    with open(os.path.join(out, "gpu_check.log"), "w", encoding="utf-8") as log:
        log.write(f"gpu_check {'(cpu dry run) ' if args.dry_run else ''}{json.dumps(report['environment'])}\n")
        for name, arguments in steps.items():
            left = BUDGET - (time.time() - started)
            if left < 10 and not args.dry_run:
                report["steps"][name] = {"command": arguments, "skipped": f"the check's {BUDGET} s were spent"}
                print(f"{name}: skipped (budget spent)", flush=True)
                continue
            limit = 300 if args.dry_run else int(min(300, left))
            report["steps"][name] = record = run(name, arguments, log, env, limit)
            print(f"{name}: exit {record['returncode']} in {record['seconds']} s", flush=True)
    report["agreement"] = agreement(report["steps"], saves, out)
    report["ttl_resources"] = ttl_resources(out)
    ran = [r for r in report["steps"].values() if "skipped" not in r]
    passed = (all(r["returncode"] == 0 for r in ran)
              and all(check["passed"] for check in report["agreement"].values()))
    report["passed"] = passed
    report["skipped"] = [name for name, r in report["steps"].items() if "skipped" in r]
    atomic_write_text(os.path.join(out, "gpu_check.json"), json.dumps(report, indent=2) + "\n")
    print(f"{'passed' if passed else 'FAILED'}: {os.path.join(out, 'gpu_check.json')} and gpu_check.log")
    return 0 if passed else 1


if __name__ == "__main__":
    cli(lambda: sys.exit(main()))
