"""Benchmark on synthetic data generated in-process: training and evaluation throughput, peak memory, loading.

    python tools/bench.py                                   # defaults: CPU-sized
    python tools/bench.py --items 645974 --length 100 --device cuda --amp   # TTL scale
    python tools/bench.py --write_data /tmp/bench_data      # also write the data as TTL-style files
    python tools/bench.py --rules --stage 6 --batch 256 --channels 64 --items 500 --length 30 --users 6000
                                                            # the recommended rule's stage-K step beside the paper rule's

Each phase runs in its own process so that its peak memory (RSS on CPU, max allocated on GPU) is its own.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import fields

import numpy as np
import torch

if __package__ in (None, ""):  # run as a file (python tools/…): import the suite from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from continual import flags
from continual.evaluation.scoring import score
from continual.methods.base import Step
from continual.methods.teracon import INITIAL_RATIO, PRESETS, TeraconOptions, retention_plan, sampling_ratio
from continual.distributed import Shard
from continual.training.loop import autocast, compile_backbone, method_for, train_step
from continual.training.resources import peak_memory_mib, synchronize
from continual.training.samplers import adam
from data_loader import ItemIndex, TaskData, load_task
from model import ModelConfig, NextItNet
from utils import keep_freed_memory

PHASES = ["task1", "taskK", "eval", "load"]
RATIO_FLOOR = sampling_ratio(torch.ones(1, 1), torch.ones(1, 1))  # Eq. 15 when every mask equals the new task's
                                                                   # (cosine 1): what the paper rule runs at
# --rules: the stage-K steps it times, as extra arguments of the taskK phase
RECOMMENDED = ["--preset", "recommended", "--expert_weight", "1", "--own_blocks", "2"]
RULES = {"paper": ["--preset", "paper", "--ratio", repr(RATIO_FLOOR)], "recommended": RECOMMENDED,
         "recommended_recomputed": [*RECOMMENDED, "--frozen_cache_mib", "0"],
         "recommended_all_rows": [*RECOMMENDED, "--rows", "all", "--new_task_at", "annealed"]}  # until 2026-12-05


def parse() -> argparse.Namespace:
    parser = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--items", type=flags.integer(2), default=5000, help="vocabulary (task-1 classes), >= 2")
    add("--users", type=flags.positive_int, default=4096, help="synthetic users (rows) per task")
    add("--length", type=flags.integer(2), default=50, help="sequence length, >= 2")
    add("--channels", type=flags.positive_int, default=256, help="residual channels of the timed model")
    add("--batch1", type=flags.positive_int, default=32, help="task-1 batch")
    add("--batch", type=flags.positive_int, default=1024, help="task-K batch")
    add("--stage", type=flags.integer(2), default=2, help="K >= 2: task-K step with retention over K−1 earlier tasks")
    add("--classes", type=flags.integer(2), default=100, help="class count of tasks ≥ 2, >= 2")
    add("--preset", choices=list(PRESETS), default="paper", help="task-K step: TERACON's preset (train_teracon's flag)")
    choices = {declared.name: declared.metadata.get("choices") for declared in fields(TeraconOptions)}
    add("--rows", choices=choices["rows"], default=None,
        help="task-K step: TERACON's retention rows (train_teracon's flag); default the preset's")
    add("--new_task_at", choices=choices["new_task_at"], default=None,
        help="task-K step: the s of the new task's cross-entropy (train_teracon's flag); default the preset's")
    add("--expert_weight", type=flags.nonnegative_float, default=0.0,
        help="task-K step: β of train_teracon's --expert, distilling the new task from a frozen model (here a copy "
             "of the student); 0 = off")
    add("--own_blocks", type=flags.integer(0, len(ModelConfig(1, [1]).dilations)), default=0,
        help="task-K step: every task from 2 on reads its own copies of the top K residual blocks "
             "(train_teracon's flag)")
    add("--frozen_cache_mib", type=flags.nonnegative_int, default=1024,
        help="task-K step: MiB for the frozen models' outputs at smax kept per row (train_teracon's flag); when it "
             "keeps any, one untimed epoch over the users fills them first, so the steps timed are a later epoch's")
    add("--ratio", type=flags.real(0.0, 1.0, what="a number in [0, 1]"), default=INITIAL_RATIO,
        help="task-K step: every earlier task's sampling ratio (held fixed; 0.9: the ratio before the first batch)")
    add("--steps", type=flags.positive_int, default=5, help="timed steps per phase (after one warm-up step)")
    add("--load_lines", type=flags.positive_int, default=1_000_000, help="lines of the task file timed by the load phase")
    add("--device", type=flags.device, default="cpu", help="cpu, cuda or cuda:N")
    add("--amp", action="store_true", help="bf16 autocast (the scripts' --amp)")
    add("--ce_chunk", type=flags.nonnegative_int, default=None,
        help="rows a wide head's loss computes at a time (train_task1's flag); default: by size, 0 = all at once")
    add("--negatives", type=flags.nonnegative_int, default=0,
        help="task-1 step: a sampled softmax against N items (the scripts' --negatives); 0 = every item")
    add("--compile", action="store_true", help="torch.compile the residual stacks (as the scripts' --compile)")
    add("--rules", action="store_true",
        help="time only the stage-K step of the paper rule as it runs once the masks saturate (every earlier task's "
             "ratio at its floor 1 - sigmoid(6), int(B * 0.0025) rows) beside the recommended rule's (B // (K-1) rows "
             "of each earlier task, KL at smax, the new task at smax, the expert term, two own blocks; its frozen "
             "outputs kept, and recomputed; and as recommended until 2026-12-05: every row, the new task at the "
             "annealed s), and print each one's ratio to the paper rule's")
    add("--profile", action="store_true",
        help="task-K step: also split its time into each loss term's forward and backward, the frozen teacher's and "
             "expert's forwards inside them, and the rest (optimiser, clamps)")
    add("--phase", choices=PHASES, help="time this phase only, in this process, and print its row as JSON")
    add("--write_data", type=flags.output_dir,
        help="write the synthetic task-1 and task-2 files here (for running other code on them)")
    add("--rule", choices=list(RULES), help="the taskK phase's flags of one of --rules' rules (given after the "
                                             "command's own flags, so they win)")
    args = parser.parse_args()
    if args.rule:
        args = parser.parse_args([*sys.argv[1:], *RULES[args.rule]])
    return args


def stage_models(args: argparse.Namespace, device: torch.device) -> tuple[NextItNet, NextItNet]:
    """A stage-K student and its stage-(K−1) teacher with random weights."""
    model = NextItNet(ModelConfig(n_items=args.items, task_classes=[args.items], channels=args.channels))
    for _ in range(2, args.stage):
        model.add_task(args.classes, own_blocks=args.own_blocks)
    teacher = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    model.add_task(args.classes, own_blocks=args.own_blocks)
    return model.to(device), teacher


class TermClock:
    """--profile: seconds per step spent producing each loss term (its forward), back-propagating it, and in the
    frozen models' forwards (inside the terms' forwards). The loop back-propagates a term before it asks for the
    next one, so the time between a term's yield and the next request is that term's backward."""

    def __init__(self, method, device: torch.device) -> None:
        self.device, self.steps = device, 0
        self.forward: list[float] = []
        self.backward: list[float] = []
        self.frozen = {"teacher": 0.0, "expert": 0.0}
        terms = method.terms
        method.terms = lambda model, step: self.clocked(terms(model, step))
        for name in self.frozen:
            frozen = getattr(method, name, None)
            if frozen is not None:
                frozen.forward = self.clocked_forward(name, frozen.forward)

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def clocked(self, terms):
        self.steps += 1
        started = self.now()
        for position, term in enumerate(terms):
            produced = self.now()
            self.add(self.forward, position, produced - started)
            yield term
            started = self.now()
            self.add(self.backward, position, started - produced)

    def clocked_forward(self, name: str, forward):
        def timed_forward(*args, **kwargs):
            started = self.now()
            out = forward(*args, **kwargs)
            self.frozen[name] += self.now() - started
            return out
        return timed_forward

    @staticmethod
    def add(totals: list[float], position: int, seconds: float) -> None:
        totals.extend([0.0] * (position + 1 - len(totals)))
        totals[position] += seconds

    def report(self, step_seconds: float) -> dict:
        """Seconds per step: each term's forward and backward, the frozen forwards, and what the terms leave."""
        per = 1.0 / max(self.steps, 1)
        terms = [{"forward": f * per, "backward": b * per} for f, b in zip(self.forward, self.backward)]
        inside = sum(t["forward"] + t["backward"] for t in terms)
        return {"terms": terms, "teacher_forward": self.frozen["teacher"] * per,
                "expert_forward": self.frozen["expert"] * per, "rest": step_seconds - inside}


def timed(step, steps: int, device: torch.device) -> float:
    step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - started) / steps


def run_phase(args: argparse.Namespace) -> dict:
    keep_freed_memory()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if args.phase == "load":
        return load_phase(args)
    sequences = torch.from_numpy(rng.integers(1, args.items, size=(args.users, args.length)))
    if args.phase == "task1":
        model = NextItNet(ModelConfig(n_items=args.items, task_classes=[args.items], channels=args.channels)).to(device)
        if args.compile:
            compile_backbone(model)
        optimizer = adam(model.parameters(), 1e-3)
        method = method_for("teracon", TeraconOptions(L2=0.75), 1, None, rng, device=device, ce_chunk=args.ce_chunk,
                            negatives=args.negatives)

        def step() -> None:
            rows = rng.integers(0, args.users, args.batch1)
            train_step(model, method, optimizer, Step(sequences[rows].to(device), None, 25.0, Shard(args.batch1)),
                       args.amp)
        seconds = timed(step, args.steps, device)
        negatives = f" ({args.negatives} sampled negatives)" if args.negatives else ""
        return {"phase": f"task1 train step{negatives}", "batch": args.batch1, "seconds": seconds,
                "samples_per_s": args.batch1 / seconds, "peak_mib": peak_memory_mib(device)}
    model, teacher = stage_models(args, device)
    if args.compile:
        compile_backbone(model)
        compile_backbone(teacher)
    if args.phase == "taskK":
        targets = torch.from_numpy(rng.integers(1, args.classes, size=args.users))
        options = TeraconOptions(**{**PRESETS[args.preset], "alpha": 0.7, "uniform_sampling": True,
                                    "expert_weight": args.expert_weight,
                                    "own_blocks": args.own_blocks, "embedding_clamp": "on",
                                    "frozen_cache_mib": args.frozen_cache_mib,
                                    **({"rows": args.rows} if args.rows else {}),
                                    **({"new_task_at": args.new_task_at} if args.new_task_at else {})})
        method = method_for("teracon", options, args.stage, teacher, rng, device=device, n_train=args.users)
        optimizer = adam(method.param_groups(model, 1e-4), 1e-4)   # the paper's lr from stage 3 (--own_lr's group)
        method.expert = copy.deepcopy(model).eval().requires_grad_(False) if args.expert_weight else None
        method.ratios = [args.ratio] * (args.stage - 1)
        method.kept = method.plan_kept(device)

        def step(rows: np.ndarray | None = None) -> None:
            rows = rng.integers(0, args.users, args.batch) if rows is None else rows
            x, y = sequences[rows].to(device), targets[rows].to(device)
            train_step(model, method, optimizer, Step(x, y, 25.0, Shard(rows.size), ids=rows), args.amp)
        if method.kept:                                      # the first epoch computes what later epochs read
            for rows in np.array_split(np.arange(args.users), max(1, args.users // args.batch)):
                step(rows)
        seconds = timed(step, args.steps, device)
        profile = {}
        if args.profile:
            clock = TermClock(method, device)
            profile = {"profile": clock.report(timed(step, args.steps, device))}
        rows = retention_plan(options, method.ratios, args.batch)[0][0]
        extra_terms = (
            f", expert {args.expert_weight:g}" if args.expert_weight else "") + (
            f", own blocks {args.own_blocks}" if args.own_blocks else "") + (
            ", new task at smax" if options.new_task_at == "smax" else "") + (
            ", frozen outputs kept" if method.kept else "")
        return {"phase": f"task{args.stage} train step ({args.preset}{extra_terms}: {rows} retention rows per earlier "
                         "task)",
                "batch": args.batch,
                "seconds": seconds, "samples_per_s": args.batch / seconds, "peak_mib": peak_memory_mib(device),
                "kept": list(method.kept), **profile}
    data = TaskData(sequences.numpy()[:, :-1], sequences.numpy()[:, -1], args.items)
    rows = np.arange(args.users)
    with autocast(device, args.amp):
        seconds = timed(lambda: score(model, 0, data, rows, "rec", 50.0, 256, device), 1, device)
    return {"phase": "evaluation (task 1, full ranking)", "batch": 256, "seconds": seconds,
            "samples_per_s": args.users / seconds, "peak_mib": peak_memory_mib(device)}


def write_task_file(path: str, lines: int, length: int, items: int, rng: np.random.Generator) -> None:
    source = rng.integers(1, items, size=(lines, length))
    targets = rng.integers(1, 100, size=(lines, 2))
    with open(path, "w") as handle:
        for start in range(0, lines, 100_000):
            block = [",".join(map(str, s)) + ",," + ",".join(map(str, t))
                     for s, t in zip(source[start:start + 100_000], targets[start:start + 100_000])]
            handle.write("\n".join(block) + "\n")


def per_line_load(path: str, item_dict: dict[str, int]) -> np.ndarray:
    """The baseline: the authors' style of a per-line Python loop (split, dict look-ups, one row per target)."""
    examples = []
    for line in open(path):
        source, targets = line.rstrip("\n").split(",,")
        mapped = [item_dict[x] for x in source.split(",")]
        for target in targets.split(","):
            examples.append(mapped + [0, int(target)])
    return np.array(examples)


def load_phase(args: argparse.Namespace) -> dict:
    """load_task on an N-line file three times (the first run also pays for fresh memory) against the
    per-line loop on the same file, once."""
    rng = np.random.default_rng(0)
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "task.csv")
    write_task_file(path, args.load_lines, args.length, args.items, rng)
    index = ItemIndex(np.arange(1, args.items, dtype=np.int64))
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        ours = load_task(path, index)
        runs.append(time.perf_counter() - started)
        examples = len(ours.targets)
        del ours
    item_dict = {str(i): i for i in range(1, args.items)}
    started = time.perf_counter()
    per_line_load(path, item_dict)
    per_line = time.perf_counter() - started
    os.remove(path)
    os.rmdir(folder)
    median = float(np.median(runs))
    return {"phase": f"load {args.load_lines} task lines", "lines": args.load_lines, "examples": examples,
            "seconds": median, "first_seconds": runs[0], "per_line_seconds": per_line, "speedup": per_line / median,
            "first_speedup": per_line / runs[0], "peak_mib": peak_memory_mib(torch.device("cpu"))}


def write_data(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    os.makedirs(args.write_data, exist_ok=True)
    sequences = rng.integers(1, args.items, size=(args.users, args.length))
    np.savetxt(os.path.join(args.write_data, "task1.csv"), sequences, fmt="%d", delimiter=",")
    write_task_file(os.path.join(args.write_data, "task2.csv"), args.users, args.length, args.items, rng)
    print(f"wrote {args.write_data}/task1.csv and task2.csv")


def phase_row(argv: list[str], phase: str) -> dict | None:
    """One phase in its own process → its JSON row (None, with the error printed, when it failed)."""
    output = subprocess.run([sys.executable, __file__, *argv, "--phase", phase], capture_output=True, text=True)
    if output.returncode != 0:
        print(f"{phase}: failed\n{output.stderr[-2000:]}")
        return None
    return json.loads(output.stdout.strip().splitlines()[-1])


def print_row(row: dict) -> None:
    """A phase's line, and with --profile where its step's time went."""
    print(f"{row['phase']:<62}{row['seconds']:>10.3f}{row['samples_per_s']:>12.0f}{row['peak_mib']:>10.0f}")
    profile = row.get("profile")
    if not profile:
        return
    for position, term in enumerate(profile["terms"]):
        label = "the new task's terms" if position == 0 else f"retention term of earlier task {position}"
        print(f"  {label:<44} forward {term['forward']:.4f} s, backward {term['backward']:.4f} s")
    print(f"  {'inside them: the frozen teacher, the expert':<44} {profile['teacher_forward']:.4f} s, "
          f"{profile['expert_forward']:.4f} s")
    print(f"  {'the rest (optimiser, clamps)':<44} {profile['rest']:.4f} s")


def compare_rules(argv: list[str]) -> None:
    """--rules: the paper rule's and the recommended rule's stage-K steps (the latter also with its frozen outputs
    recomputed every step, and with --rows all --new_task_at annealed, the rule recommended until 2026-12-05), one
    after the other, and each one's ratio to the paper rule's."""
    argv = [a for a in argv if a != "--rules"]
    rows = {name: phase_row(argv + extra, "taskK") for name, extra in RULES.items()}
    for row in rows.values():
        if row:
            print_row(row)
    if all(rows.values()):
        ratios = {name: row["seconds"] / rows["paper"]["seconds"] for name, row in rows.items() if name != "paper"}
        for name, ratio in ratios.items():
            print(f"{name} / paper, s/step: {ratio:.2f}")
        print(json.dumps({**rows, "ratio": ratios["recommended"], "ratios": ratios}))


def main() -> None:
    args = parse()
    if args.phase:
        print(json.dumps(run_phase(args)))
        return
    if args.write_data:
        write_data(args)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {args.device}{', bf16 autocast' if args.amp else ''}")
    print(f"sizes: items {args.items}, users {args.users}, length {args.length}, channels {args.channels}, "
          f"batch {args.batch1} (task 1) / {args.batch} (task {args.stage})")
    print(f"{'phase':<62}{'s/step':>10}{'samples/s':>12}{'peak MiB':>10}")
    argv = [a for a in sys.argv[1:] if not a.startswith("--write_data")]
    if "--write_data" in sys.argv:
        position = sys.argv.index("--write_data")
        argv = sys.argv[1:position] + sys.argv[position + 2:]
    if args.rules:
        compare_rules(argv)
        return
    for phase in PHASES:
        row = phase_row(argv, phase)
        if row is None:
            continue
        if phase == "load":
            print(f"{row['phase']:<62}{row['seconds']:>10.2f}{'':>12}{row['peak_mib']:>10.0f}")
            print(f"  median of 3 runs; the first {row['first_seconds']:.2f} s. Per-line loop on the same file: "
                  f"{row['per_line_seconds']:.1f} s → {row['speedup']:.1f}× faster ({row['first_speedup']:.1f}× for "
                  f"the first run)")
        else:
            print_row(row)


if __name__ == "__main__":
    main()
