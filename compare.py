"""Compare continual-learning methods (TERACON, its ablations, fine-tuning, ...) over several seeds, in one table.

    python compare.py --dataset demo --seeds 3 [--out runs/compare] [--jobs 2] [--threads 1] [--data DIR]
                      [--methods teracon,finetune,no_relation,no_retention,uniform_sampling,recommended,lwf,ewc,
                                 sinmo,fineall,peterrec,piggyback,conure,hat,mtl,ditto]
                      [--synth_seed D] [--draws N]    (--dataset synth or synth_time: draws D .. D+N−1 of the data)
                      [--settings dataset|paper] [--later_epochs N] [--protocol static|time]
                      [-- flags for every stage]

--methods takes the registered methods (continual/methods/) and their presets (TERACON's no_relation,
no_retention, uniform_sampling, recommended); a preset runs as `--method M --preset P`. A name may carry flags
of its stages >= 2, NAME+flag=value+flag (e.g. `recommended+alpha=0+expert_weight=2`, `finetune+lr=1e-4`): one
candidate of a study, its chain in <out>/seedS/NAME+flag=value+flag.

For each seed S (0 .. seeds−1), stage 1 runs ONCE into <out>/seedS/task1 and is shared by every method of
that seed (a method whose class names a `stage1_method`, e.g. the parameter-isolation baselines, starts from
that method's stage 1 instead, <out>/seedS/stage1_<method>/task1, shared in the same way); stages 2..N then
run for each method in <out>/seedS/<method>/taskK, each stage a subprocess with one thread, up to --jobs
methods at a time. The per-dataset flags are run_all.sh's (--settings paper: at stages >= 2 the paper's batch
1024, lr 1e-3 at stage 2 and 1e-4 after, up to 100 epochs with patience 5; --later_epochs N: N epochs a stage
>= 2, a fixed budget); flags after `--` go to every stage (last one wins, e.g. `-- --epochs 5`), then a name's
own flags. A stage whose metrics.json exists is skipped (never trained again: a later stage may be built from
it), an interrupted one continues with --resume, so rerunning the same command resumes the comparison.

The table (compare.md and compare.csv in --out, and printed) has one row per method: every task's headline
metric after stage N (MRR@5 for rec tasks, accuracy for cls tasks) as mean ± sd over seeds, and task-1
retention = task 1's MRR@5 after stage N / after stage 1 (the stage 1 that chain started from). results.csv
holds every (seed, method, stage, task) score with its trivial baseline, ceiling, parameters and s/epoch.
When fine-tuning and TERACON (`teracon` or `recommended`) are among the methods, tools/paper_table.py then
writes paper_table.md and paper_figure.png into --out: the paper's layout, pooled over every (draw, seed) of
the --draws draws (each in <out>/drawD), or over the seeds of the one run.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from continual import flags
from continual.methods.checkpoints import load_checkpoint
from continual.comparison import (chains_first, known_name, method_names, read_records, records_csv,
                                  resolve, split_overrides)
from continual.datasets import DATASETS, preset_paths, stage_flags
from continual.evaluation.reports import headline_metric, retest_cells
from continual.evaluation.stats import mean_sd, paired_difference, t_interval
from continual.methods import DEFAULT_METHOD, METHODS, method_class
from continual.training.config import check_stage_flags
from continual.training.loop import parameter_count as model_parameters
from model import NextItNet
from utils import DataError, atomic_write_text, cli, write_failure

REPO = os.path.dirname(os.path.abspath(__file__))

DEFAULT_METHODS = ["teracon", "finetune", "no_relation", "no_retention", "uniform_sampling"]


# The per-dataset flags are continual/datasets.py's SMALL_RUN_FLAGS, which run_all.sh reads too.
# --settings paper: the paper's stages >= 2 (batch 1024, up to 100 epochs, patience 5) with the stage defaults'
# lr (1e-3 at stage 2, 1e-4 after: continual/datasets.py); the dataset's other flags (selection, split) kept.
PAPER_LATER = ["--batch", "1024", "--epochs", "100", "--patience", "5"]
SETTINGS = ("dataset", "paper")


def later_flags(dataset: str, settings: str = "dataset", later_epochs: int = 0,
                protocol: str | None = None) -> list[str]:
    """The flags of stages >= 2 under --settings (the dataset's, as run_all.sh, or the paper's), then
    --later_epochs (a fixed budget of epochs a stage, when given) and --protocol (when given: it wins over the
    dataset's)."""
    later = stage_flags(dataset, 2)
    if settings == "paper":
        replaced = {"--batch", "--lr", "--epochs", "--patience"}
        pairs = [later[i:i + 2] for i in range(0, len(later), 2)]  # the dataset's flags are flag-value pairs
        later = [word for pair in pairs if pair[0] not in replaced for word in pair] + PAPER_LATER
    return (later + (["--epochs", str(later_epochs)] if later_epochs else [])
            + (["--protocol", protocol] if protocol else []))


def prepare_synth(synth_seed: int = 0) -> None:
    from continual.generators import synth
    synth.main(["--out", DATASETS["synth"]["folder"], "--seed", str(synth_seed)])


def prepare_synth_time(synth_seed: int = 0) -> None:
    """The benchmark with items arriving at each stage (its preset's generator flags), its re-test files beside."""
    from continual.generators import synth
    preset = DATASETS["synth_time"]
    synth.main(["--out", preset["folder"], "--seed", str(synth_seed), *preset["generator"]])


SYNTHETIC = ("synth", "synth_time")   # generated data: --synth_seed and --draws choose the draw


def prepare_ttl_shaped(synth_seed: int = 0) -> None:
    """TTL-shaped data (tools/ttl_shaped.py's defaults: 1,000,000 users a task) unless the folder holds it already:
    it takes a minute and 2.9 GB, so it is generated once, not before every run."""
    del synth_seed
    folder = DATASETS["ttl_shaped"]["folder"]
    try:
        with open(os.path.join(folder, "tasks.json"), encoding="utf-8") as handle:
            if json.load(handle).get("source") == "ttl_shaped":
                return
    except (OSError, ValueError):
        pass
    from continual.generators import ttl_shaped
    ttl_shaped.main(["--out", folder])


def prepare_demo(synth_seed: int = 0, dataset: str = "demo") -> None:
    """MovieLens-100K from RecBole's wheel, made with its preset's flags (demo_time: time passing between tasks)."""
    del synth_seed  # the demo is one fixed download
    import prepare_data
    preset = DATASETS[dataset]
    if prepare_data.main(["--source", "recbole", "--out", preset["folder"], *preset["generator"]]):
        raise DataError("the demo data could not be prepared (pip install --no-deps recbole==1.2.1)")


def prepare_demo_time(synth_seed: int = 0) -> None:
    prepare_demo(synth_seed, "demo_time")


# The data run_all.sh regenerates before every run, with the same settings.
PREPARE = {"synth": prepare_synth, "synth_time": prepare_synth_time, "demo": prepare_demo,
           "demo_time": prepare_demo_time, "ttl_shaped": prepare_ttl_shaped}

Results = dict[str, dict[int, dict[int, dict]]]  # {method: {seed: {stage: metrics.json}}}


def check_data_draw(out: str, dataset: str, synth_seed: int) -> None:
    """<out>/data.txt names the data its stages were trained on; stages of another draw are never mixed in."""
    marker, text = os.path.join(out, "data.txt"), f"{dataset} synth_seed {synth_seed}\n"
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as handle:
            found = handle.read()
        if found != text:
            raise DataError(f"{marker}: {out} holds runs on {found.strip()}, not {text.strip()}; choose another --out")
        return
    if os.path.isdir(out) and any(name.startswith("seed") for name in os.listdir(out)) and synth_seed != 0:
        raise DataError(f"{out}: holds runs made before data.txt existed (synth_seed 0); choose another --out")
    os.makedirs(out, exist_ok=True)
    atomic_write_text(marker, text)


def first_stage_method(name: str) -> str:
    """The method whose stage 1 the chain of `name` starts from: "" for the default stage 1 that most methods
    share, else (e.g. "finetune", without masks, for the parameter-isolation baselines) its own method."""
    return method_class(resolve(name)[0]).stage1_method


def savepath(out: str, seed: int, method: str, stage: int) -> str:
    """Stage 1 is shared by the methods of a seed that start from the same one (the default, or that of
    `first_stage_method`); later stages live in the method's folder."""
    if stage == 1:
        first, folder = first_stage_method(method), os.path.join(out, f"seed{seed}")
        return os.path.join(folder, f"stage1_{first}", "task1") if first else os.path.join(folder, "task1")
    return os.path.join(out, f"seed{seed}", method, f"task{stage}")


def stage_command(dataset: str, out: str, seed: int, method: str, stage: int, extra: list[str],
                  later: list[str] | None = None, data: str | None = None) -> list[str]:
    """The command line of one stage (paths under `out`, the preset's data files via --dataset, or those in the
    folder `data`): the dataset's flags (stages >= 2: `later`, default the dataset's own), `extra`, then the flags in
    the method's name."""
    first = stage_flags(dataset, 1)
    later = later_flags(dataset) if later is None else later
    script = ["train_task1.py"] if stage == 1 else ["train_teracon.py", "--stage", str(stage)]
    command = [sys.executable, *script, "--dataset", dataset, "--seed", str(seed),
               "--savepath", savepath(out, seed, method, stage),
               "--datapath_index", os.path.join(out, f"seed{seed}", "index.csv")]
    if data:
        command += ["--datapath", os.path.join(data, DATASETS[dataset]["files"][stage - 1])]
    if stage == 1:
        own = first_stage_method(method)
        return command + (["--method", own] if own else []) + first + extra
    name, preset, rerun = resolve(method)
    flags_of_method = (["--method", name] if name != DEFAULT_METHOD else []) + (
        ["--preset", preset] if preset and preset != method_class(name).Options().preset else []) + (
        ["--rerun", str(rerun)] if rerun else [])
    for flag, chain in chains_first(method).items():
        flags_of_method += [flag, savepath(out, seed, chain, stage) + ".t7"]
    return command + ["--paths", savepath(out, seed, method, stage - 1) + ".t7", *flags_of_method, *later, *extra,
                      *split_overrides(method)[1]]


def run_stage(command: list[str], save: str, label: str, threads: int = 1) -> bool:
    """Run one stage unless its metrics.json exists, on `threads` threads; output goes to <save>.log. True when it
    has metrics."""
    if os.path.isfile(save + ".metrics.json"):
        print(f"{label}: skipped (metrics exist)", flush=True)
        return True
    if os.path.isfile(save + ".resume.t7"):
        command = command + ["--resume"]
    os.makedirs(os.path.dirname(save), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    started = time.time()
    try:                                      # a full disk: one line naming the log
        with open(save + ".log", "a", encoding="utf-8") as log:
            log.write(f"# {datetime.now().isoformat(timespec='seconds')}\n# {shlex.join(command)}\n")
            log.flush()
            code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    except OSError as error:
        raise write_failure(save + ".log", error) from None
    ok = code == 0 and os.path.isfile(save + ".metrics.json")
    state = "done" if ok else f"FAILED (exit {code}; see {save}.log)"
    print(f"{label}: {state} in {time.time() - started:.0f}s", flush=True)
    return ok


def run_all(dataset: str, out: str, seeds: list[int], methods: list[str], stages: int, extra: list[str],
            jobs: int, recorded: set[tuple[int, str]] = frozenset(), later: list[str] | None = None,
            threads: int = 1, data: str | None = None) -> int:
    """Every (seed, method) chain on a pool of `jobs` threads, except the `recorded` ones; stage 1 once per seed;
    each stage a process of `threads` threads. Returns failed chains."""
    methods_of = {seed: [m for m in methods if (seed, m) not in recorded] for seed in seeds}
    needed = {chain for method in methods for chain in chains_first(method).values()}
    chain_locks = {(seed, method): threading.Lock() for seed in seeds for method in {*methods, *needed}}
    firsts = {savepath(out, seed, method, 1) for seed in seeds for method in {*methods, *needed}}
    locks = {path: threading.Lock() for path in firsts}   # each stage 1 runs once, for every chain that reads it
    first: dict[str, bool] = {}

    def chain(seed: int, method: str) -> bool:
        if not all(chain(seed, other) for other in chains_first(method).values()):  # e.g. its expert's, first
            return False
        with chain_locks[seed, method]:  # a chain runs once at a time, even when another method asks for it too
            return method_chain(seed, method)

    def method_chain(seed: int, method: str) -> bool:
        path = savepath(out, seed, method, 1)
        with locks[path]:
            if path not in first:
                own = first_stage_method(method)
                first[path] = run_stage(stage_command(dataset, out, seed, method, 1, extra, data=data), path,
                                        f"seed {seed} stage 1" + (f" ({own})" if own else ""), threads)
        if not first[path]:
            return False
        for stage in range(2, stages + 1):
            command = stage_command(dataset, out, seed, method, stage, extra, later, data)
            if not run_stage(command, savepath(out, seed, method, stage), f"seed {seed} {method} stage {stage}",
                             threads):
                return False
        return True

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(chain, seed, method) for seed in seeds for method in methods_of[seed]]
        return sum(not future.result() for future in futures)


def load_results(out: str, seeds: list[int], methods: list[str], stages: int) -> Results:
    """Every metrics.json that exists, stage 1 (shared) repeated under each method."""
    results: Results = {}
    for method in methods:
        for seed in seeds:
            for stage in range(1, stages + 1):
                path = savepath(out, seed, method, stage) + ".metrics.json"
                if os.path.isfile(path):
                    with open(path, encoding="utf-8") as handle:
                        results.setdefault(method, {}).setdefault(seed, {})[stage] = json.load(handle)
    return results


def headline(task: dict) -> float:
    """The value of the task's headline metric (reports.headline_metric: MRR@5 for rec, accuracy for cls)."""
    return task["test"][headline_metric(task)]


def final_values(by_seed: dict[int, dict[int, dict]], final_stage: int) -> dict[str, dict[int, float]]:
    """{"task1".."taskN", "retention": {seed: value}} of the seeds that finished `final_stage`; retention =
    task 1's headline after `final_stage` / after stage 1 (needs that seed's stage 1, non-zero)."""
    values: dict[str, dict[int, float]] = {f"task{k}": {} for k in range(1, final_stage + 1)}
    values["retention"] = {}
    for seed, stages in by_seed.items():
        if final_stage not in stages:
            continue
        tasks = stages[final_stage]["tasks"]
        for k in range(1, final_stage + 1):
            if str(k) in tasks:
                values[f"task{k}"][seed] = headline(tasks[str(k)])
        if 1 in stages and headline(stages[1]["tasks"]["1"]) > 0:
            values["retention"][seed] = headline(tasks["1"]) / headline(stages[1]["tasks"]["1"])
    return values


def summary_rows(results: Results, final_stage: int) -> list[dict]:
    """One row per method: {"method", "seeds", "task1".."taskN": (mean, sd), "retention": (mean, sd)} and,
    under the same names + "_ci", the 95 % t-interval over seeds.

    Only seeds that finished `final_stage` count; retention also needs that seed's stage 1 (and a non-zero
    task-1 metric there).
    """
    rows = []
    for method, by_seed in results.items():
        values = final_values(by_seed, final_stage)
        row: dict = {"method": method, "seeds": sum(final_stage in stages for stages in by_seed.values())}
        for name, per_seed in values.items():
            row[name] = mean_sd(list(per_seed.values()))
            row[name + "_ci"] = t_interval(list(per_seed.values()))
        rows.append(row)
    return rows


def paired_rows(results: Results, final_stage: int) -> list[dict]:
    """For each pair of methods (a, b): a − b per task and for retention, paired by seed (the same stage-1
    checkpoint and split), as {"pair", name: (mean, lo, hi, n)}; the interval is the t-interval over seeds."""
    values = {method: final_values(by_seed, final_stage) for method, by_seed in results.items()}
    rows = []
    methods = list(results)
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            row: dict = {"pair": f"{a} − {b}"}
            for name in values[a]:
                row[name] = paired_difference(values[a][name], values[b][name])
            rows.append(row)
    return rows


def reference_rows(results: Results, final_stage: int) -> list[dict]:
    """The strongest trivial baseline and (when the data's generator knows it) the ceiling of every task on
    the same test splits, as rows of the summary table (mean over the seeds' splits; no retention)."""
    by_task: dict[str, dict[str, dict[int, float]]] = {"trivial baseline": {}, "ceiling": {}}
    for by_seed in results.values():
        for seed, stages in by_seed.items():
            for k, task in stages.get(final_stage, {}).get("tasks", {}).items():
                versus = task.get("vs_baseline")
                if versus:
                    by_task["trivial baseline"].setdefault(f"task{k}", {})[seed] = \
                        task["baseline"][versus["baseline"]]["test"][versus["metric"]]
                    if versus["metric"] in task.get("ceiling", {}):
                        by_task["ceiling"].setdefault(f"task{k}", {})[seed] = task["ceiling"][versus["metric"]]
    rows = []
    for name, tasks in by_task.items():
        if tasks:
            row: dict = {"method": name, "seeds": max(len(per_seed) for per_seed in tasks.values())}
            for k in range(1, final_stage + 1):
                per_seed = list(tasks.get(f"task{k}", {}).values())
                interval = t_interval(per_seed) if name != "ceiling" else (math.nan, math.nan)  # a known value
                row[f"task{k}"], row[f"task{k}_ci"] = mean_sd(per_seed), interval
            row["retention"], row["retention_ci"] = (math.nan, math.nan), (math.nan, math.nan)
            rows.append(row)
    return rows


def stage_values(by_seed: dict[int, dict[int, dict]], final_stage: int) -> dict[str, dict[int, float]]:
    """Per seed that finished `final_stage`: "keptK" = task K's headline after `final_stage` / at stage K (the
    stage that learned it; K < final_stage, non-zero there), "bestK" = the same over its highest headline after
    any stage from K to `final_stage`, and "learnedK" = task K's headline at stage K (K ≥ 2: how well the new
    task was learned)."""
    values: dict[str, dict[int, float]] = {}
    for seed, stages in by_seed.items():
        if final_stage not in stages:
            continue
        final = stages[final_stage]["tasks"]
        for k in range(1, final_stage + 1):
            own = stages.get(k, {}).get("tasks", {}).get(str(k))
            if own is None:
                continue
            if k >= 2:
                values.setdefault(f"learned{k}", {})[seed] = headline(own)
            if k < final_stage and headline(own) > 0 and str(k) in final:
                values.setdefault(f"kept{k}", {})[seed] = headline(final[str(k)]) / headline(own)
                best = max(headline(stages[u]["tasks"][str(k)]) for u in range(k, final_stage + 1)
                           if str(k) in stages.get(u, {}).get("tasks", {}))
                values.setdefault(f"best{k}", {})[seed] = headline(final[str(k)]) / best
    return values


def epoch_seconds(out: str, seeds: list[int], method: str, stage: int) -> float:
    """Mean training seconds per epoch of `stage` over seeds, read from the stages' logs (NaN without logs)."""
    times = []
    for seed in seeds:
        path = savepath(out, seed, method, stage) + ".log"
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                times += [float(match) for match in re.findall(r"\| train ([0-9.]+)s", handle.read())]
    return statistics.fmean(times) if times else math.nan


def parameter_count(save: str) -> float:
    """The parameters of the stage saved at `save` (<save>.metrics.json's count, else counted in <save>.t7; NaN
    without either)."""
    metrics = save + ".metrics.json"
    if os.path.isfile(metrics):
        with open(metrics, encoding="utf-8") as handle:
            count = json.load(handle).get("parameters")
        if count is not None:
            return float(count)
    if not os.path.isfile(save + ".t7"):
        return math.nan
    return float(model_parameters(NextItNet.from_checkpoint(load_checkpoint(save + ".t7"))))


def size_ratio(out: str, seeds: list[int], method: str, stage: int) -> float:
    """Parameters after `stage` over those of the chain's stage-1 model (one model), the mean over seeds."""
    ratios = [parameter_count(savepath(out, seed, method, stage)) / parameter_count(savepath(out, seed, method, 1))
              for seed in seeds]
    ratios = [r for r in ratios if not math.isnan(r)]
    return statistics.fmean(ratios) if ratios else math.nan


def retention_rows(results: Results, final_stage: int, reference: str = "finetune") -> list[dict]:
    """One row per method: every earlier task's kept share ("keptK", and "bestK" against its highest score:
    mean, lo, hi) and every new task's score at its own stage minus `reference`'s, paired by seed ("learnedK":
    mean, lo, hi); "min_kept" and "min_best": the smallest task mean of each kind of share."""
    values = {method: stage_values(by_seed, final_stage) for method, by_seed in results.items()}
    rows = []
    for method, per_name in values.items():
        row: dict = {"method": method, "seeds": max((len(v) for v in per_name.values()), default=0)}
        for k in range(1, final_stage):
            for name in (f"kept{k}", f"best{k}"):
                shares = list(per_name.get(name, {}).values())
                row[name] = (mean_sd(shares)[0], *t_interval(shares))
        for k in range(2, final_stage + 1):
            mine, theirs = per_name.get(f"learned{k}", {}), values.get(reference, {}).get(f"learned{k}", {})
            row[f"learned{k}"] = paired_difference(mine, theirs)[:3]
        row["min_kept"] = min((row[f"kept{k}"][0] for k in range(1, final_stage)), default=math.nan)
        row["min_best"] = min((row[f"best{k}"][0] for k in range(1, final_stage)), default=math.nan)
        rows.append(row)
    return rows


def share_cells(row: dict, kind: str, final_stage: int) -> list[str]:
    """A retention row's shares of one kind ("kept" or "best") for tasks 1..final_stage − 1, `mean [95 % interval]`
    (bold: the interval lies above 0.9), then the lowest task mean ("min_<kind>")."""
    cells = []
    for k in range(1, final_stage):
        mean, low, high = row[f"{kind}{k}"]
        text = _cell(mean, (low, high))
        cells.append(f"**{text}**" if text and low > 0.9 else text)
    lowest = row[f"min_{kind}"]
    return cells + ["" if math.isnan(lowest) else f"{lowest:.2f}"]


def retention_table(rows: list[dict], final_stage: int, seconds: dict[str, float], reference: str = "finetune",
                    sizes: dict[str, float] | None = None) -> str:
    """Kept shares and new-task differences, `mean [95 % interval over seeds]`; bold: a kept share whose
    interval lies above 0.9, a difference whose interval excludes 0; with `sizes`, each method's parameters
    after the last stage over its stage-1 model's."""
    kept = [f"kept {k}" for k in range(1, final_stage)]
    learned = [f"new {k} − {reference}" for k in range(2, final_stage + 1)]
    columns = ["method", "seeds", *kept, "lowest kept", *learned, f"s/epoch, stage {final_stage}"] + (
        ["parameters ÷ one model"] if sizes is not None else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = share_cells(row, "kept", final_stage)
        for k in range(2, final_stage + 1):
            mean, low, high = row[f"learned{k}"]
            text = _cell(mean, (low, high))
            cells.append(_bold_if_signed(text, low, high))
        time = seconds.get(row["method"], math.nan)
        cells.append("" if math.isnan(time) else f"{time:.1f}")
        if sizes is not None:
            size = sizes.get(row["method"], math.nan)
            cells.append("" if math.isnan(size) else f"{size:.2f}")
        lines.append("| " + " | ".join([row["method"], str(row["seeds"]), *cells]) + " |")
    return "\n".join(lines) + "\n"


def best_table(rows: list[dict], final_stage: int) -> str:
    """Kept shares against each task's highest score after any stage from its own on, `mean [95 % interval over
    seeds]`; bold: the interval lies above 0.9."""
    columns = ["method", "seeds", *[f"kept {k} of its best" for k in range(1, final_stage)], "lowest"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = share_cells(row, "best", final_stage)
        lines.append("| " + " | ".join([row["method"], str(row["seeds"]), *cells]) + " |")
    return "\n".join(lines) + "\n"


def task_labels(dataset: str, stages: int) -> list[str]:
    preset = DATASETS[dataset]
    return [f"{k} {preset['names'][k - 1]} ({'MRR@5' if preset['kinds'][k - 1] == 'rec' else 'acc'})"
            for k in range(1, stages + 1)]


def _cell(mean: float, interval: tuple[float, float]) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.4f}" if math.isnan(interval[0]) else f"{mean:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]"


def _bold_if_signed(text: str, low: float, high: float) -> str:
    """The cell in bold when its interval excludes 0."""
    return f"**{text}**" if text and (low > 0 or high < 0) else text


def markdown_table(rows: list[dict], labels: list[str], header: str) -> str:
    """`header` lines, then the table with `mean [95 % interval over seeds]` cells."""
    columns = ["method", "seeds", *labels, "task-1 retention"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        names = [f"task{k}" for k in range(1, len(labels) + 1)] + ["retention"]
        lines.append("| " + " | ".join([row["method"], str(row["seeds"])]
                                      + [_cell(row[name][0], row[name + "_ci"]) for name in names]) + " |")
    return "\n".join(lines) + "\n"


def paired_table(rows: list[dict], labels: list[str]) -> str:
    """Paired differences: `mean [95 % interval]`, bold where the interval excludes 0."""
    columns = ["a − b", "seeds", *labels, "task-1 retention"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        names = [f"task{k}" for k in range(1, len(labels) + 1)] + ["retention"]
        cells = []
        for name in names:
            mean, low, high, _ = row[name]
            text = _cell(mean, (low, high))
            cells.append(_bold_if_signed(text, low, high))
        lines.append("| " + " | ".join([row["pair"], str(max(row[name][3] for name in names))] + cells) + " |")
    return "\n".join(lines) + "\n"


def recorded_chains(paths: list[str], seeds: list[int], methods: list[str], stages: int) -> list[dict]:
    """The records of the (seed, method) chains that the results.csv files `paths` hold whole (every task after
    every stage 1..stages), for `seeds` and `methods`; a chain another unrecorded chain reads first (e.g.
    fine-tuning, the recommended rule's --expert) is left out, so that it runs again for its checkpoints."""
    records = [r for r in read_records(paths) if r["seed"] in seeds and r["method"] in methods]
    scored: dict[tuple[int, str], set[tuple[int, int]]] = {}
    for r in records:
        scored.setdefault((r["seed"], r["method"]), set()).add((r["stage"], r["task"]))
    whole = {(stage, task) for stage in range(1, stages + 1) for task in range(1, stage + 1)}
    done = {chain for chain, cells in scored.items() if cells >= whole}
    needed = {(seed, first) for seed, method in {(s, m) for s in seeds for m in methods} - done
              for first in chains_first(method).values()}
    kept = done - needed
    return [{k: v for k, v in r.items() if k != "draw"} for r in records if (r["seed"], r["method"]) in kept]


def result_records(out: str, results: Results) -> list[dict]:
    """One record per (seed, method, stage, task scored after that stage): the task's headline value, its strongest
    trivial baseline's and its ceiling (NaN where unknown) on the same test users, and the stage's parameters, its
    chain's stage-1 parameters and its mean training seconds per epoch (from the stage's log). results.csv holds
    them: what tools/paper_table.py pools over draws, and a record of a comparison small enough to keep."""
    records = []
    for method, by_seed in results.items():
        for seed, stages in sorted(by_seed.items()):
            first = parameter_count(savepath(out, seed, method, 1))
            for stage, metrics in sorted(stages.items()):
                save = savepath(out, seed, method, stage)
                seconds = epoch_seconds(out, [seed], method, stage)
                for task, entry in sorted(metrics["tasks"].items(), key=lambda item: int(item[0])):
                    versus = entry.get("vs_baseline") or {}
                    metric = headline_metric(entry)
                    baseline = (entry["baseline"][versus["baseline"]]["test"][versus["metric"]]
                                if versus.get("baseline") in entry.get("baseline", {}) else math.nan)
                    records.append({"seed": seed, "method": method, "stage": stage, "task": int(task),
                                    "kind": entry["kind"], "metric": metric, "value": entry["test"][metric],
                                    "baseline": baseline, "ceiling": entry.get("ceiling", {}).get(metric, math.nan),
                                    "parameters": parameter_count(save), "stage1_parameters": first,
                                    "seconds_per_epoch": seconds})
    return records


RETEST_COLUMNS = ["seed", "method", "stage", "task", "part", "users", "value", "baseline", "original"]


def retest_records(results: Results) -> list[dict]:
    """--protocol time: one record per (seed, method, stage, earlier task, part of its re-test users: all, with_new,
    without_new): users, the headline value, its strongest trivial baseline's, and the task's score on its original
    test users after the same stage (`original`)."""
    records = []
    for method, by_seed in results.items():
        for seed, stages in sorted(by_seed.items()):
            entries = [{**metrics, "stage": stage} for stage, metrics in sorted(stages.items())]
            for stage, task, part, users, cell, original in retest_cells(entries):
                records.append({"seed": seed, "method": method, "stage": stage, "task": int(task), "part": part,
                                "users": users, "value": cell["value"], "baseline": cell["baseline_value"],
                                "original": original["value"]})
    return records


def retest_table(paths: list[str], final_stage: int) -> str:
    """The re-test summary of one or several draws' retests.csv: per method, earlier task and part of its users,
    after `final_stage`, the mean over (draw, seed) units with its 95 % t-interval, beside the strongest trivial
    baseline's mean and the task's mean on its original test users."""
    units: dict[tuple[str, int, str], list[dict]] = {}
    for path in paths:
        with open(path, encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                if int(row["stage"]) == final_stage:
                    units.setdefault((row["method"], int(row["task"]), row["part"]), []).append(row)
    lines = ["| method | task | users (count) | units | re-test [95 % CI] | trivial baseline | original test users |",
             "|---|---|---|---|---|---|---|"]
    for (method, task, part), rows in units.items():
        value, baseline, original = ([float(row[name]) for row in rows] for name in ("value", "baseline", "original"))
        users = round(statistics.mean(int(row["users"]) for row in rows))
        lines.append(f"| {method} | {task} | {part} ({users}) | {len(rows)} | "
                     f"{_cell(statistics.mean(value), t_interval(value))} | {statistics.mean(baseline):.4f} | "
                     f"{_cell(statistics.mean(original), t_interval(original))} |")
    return "\n".join(lines) + "\n"


def write_retests(out: str, results: Results, final_stage: int) -> str | None:
    """<out>/retests.csv (retest_records) and retests.md (retest_table) when a stage scored re-test files; → the CSV's
    path, or None."""
    records = retest_records(results)
    if not records:
        return None
    path = os.path.join(out, "retests.csv")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, RETEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    atomic_write_text(path, buffer.getvalue())
    atomic_write_text(os.path.join(out, "retests.md"), retest_header(final_stage) + retest_table([path], final_stage))
    return path


def retest_header(final_stage: int) -> str:
    return (f"Re-tests after stage {final_stage} (--protocol time): each earlier task on its re-test file's later "
            "users (all, with an item newer than the task, without), headline metric (MRR@5 rec, accuracy cls), "
            "mean over (draw, seed) units and its 95 % t-interval; the strongest trivial baseline (fitted on the "
            "task's own training split) and the task's score on its original test users after the same stage.\n\n")


def csv_table(rows: list[dict], n_tasks: int) -> str:
    """Mean, sd and the 95 % interval over seeds in separate columns, full precision."""
    names = [f"task{k}" for k in range(1, n_tasks + 1)] + ["retention"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "seeds"] + [f"{name}_{part}" for name in names for part in ("mean", "sd", "lo", "hi")])
    for row in rows:
        writer.writerow([row["method"], row["seeds"]] + [value for name in names
                                                          for value in (*row[name], *row[name + "_ci"])])
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    own, extra = argv[:split], argv[split + 1:]
    parser = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS),
                        help="the data set: its preset's files and run_all.sh's flags (continual/datasets.py)")
    parser.add_argument("--seeds", type=flags.positive_int, default=3, help="number of seeds: 0 .. seeds-1")
    parser.add_argument("--out", type=flags.output_dir, default="runs/compare",
                        help="folder of the chains (seedS/METHOD/taskK) and the tables")
    names = list(method_names())
    parser.add_argument("--methods", type=flags.comma_list(names, known_name), default=DEFAULT_METHODS,
                        help="comma-separated: a method (" + ", ".join(METHODS) + ") or a method's preset (" +
                             ", ".join(name for name in names if name not in METHODS) + "), any of them with _rerunN "
                             "for its N-th rerun (--rerun N) and +flag=value... for flags of its stages >= 2 (e.g. "
                             "recommended+alpha=0; its chain in a folder of that name); default: "
                             + ",".join(DEFAULT_METHODS))
    parser.add_argument("--jobs", type=flags.positive_int, default=2, help="methods run in parallel (default 2)")
    parser.add_argument("--threads", type=flags.positive_int, default=1,
                        help="threads of each stage's process (default 1: with --jobs 2, one per core of a 2-core "
                             "machine; the recorded comparisons ran so)")
    parser.add_argument("--synth_seed", type=flags.seed, default=0,
                        help="synth only: the generator's seed, a fresh draw of the benchmark (default 0, the README's; "
                             "it rewrites Data/synth, which run_all.sh and compare.py regenerate at seed 0)")
    parser.add_argument("--draws", type=flags.positive_int, default=1,
                        help="synth only: N > 1 runs the comparison on draws --synth_seed .. --synth_seed + N − 1, each "
                             "in <out>/drawD, and pools them in <out>/paper_table.md and paper_figure.png")
    parser.add_argument("--recorded", type=flags.existing_dir,
                        help="a folder of earlier results.csv files of this comparison, <dataset>.csv (or "
                             "synth_drawD.csv per draw), e.g. docs/experiments/data: a chain they hold whole is not "
                             "run again, its records go into results.csv and the paper table (not compare.md); "
                             "default: none, every chain runs")
    parser.add_argument("--settings", choices=SETTINGS, default="dataset",
                        help="stages >= 2: the dataset's flags (run_all.sh's; default) or the paper's: batch 1024, lr "
                             "1e-3 at stage 2 and 1e-4 after, up to 100 epochs with patience 5 (stage 1 stays the "
                             "dataset's)")
    parser.add_argument("--data", type=flags.existing_dir,
                        help="read the dataset's files (its preset's file names) from this folder instead of its preset "
                             "folder, which is then neither read nor generated (e.g. TTL-shaped data of another size; "
                             "default: the preset's folder)")
    parser.add_argument("--protocol", choices=["static", "time"], default=None,
                        help="stages >= 2: static (every item is task 1's) or time (items arrive with the tasks; "
                             "every earlier task is also scored on its re-test files); default: the dataset's "
                             "(time for synth_time and demo_time, static for the others)")
    parser.add_argument("--later_epochs", type=flags.positive_int, default=0,
                        help="stages >= 2: a fixed budget of N epochs a stage (default: the settings' epochs)")
    args = parser.parse_args(own)
    for flag, given in (("--synth_seed", args.synth_seed), ("--draws", args.draws > 1)):
        if given and args.dataset not in SYNTHETIC:
            parser.error(f"{flag} applies to --dataset synth or synth_time, not {args.dataset}")
    if args.recorded and (args.settings != "dataset" or args.later_epochs):
        parser.error("--recorded holds runs at the dataset's settings: it cannot be mixed with --settings paper or "
                     "--later_epochs")
    for name in args.methods:  # every stage's flags are checked as the method's stages will parse them, before any runs
        check_stage_flags(later_flags(args.dataset, args.settings, args.later_epochs, args.protocol) + extra
                          + split_overrides(name)[1], resolve(name)[0])
    for name in DATASETS[args.dataset]["files"] if args.data else []:   # before anything is written
        if not os.path.isfile(os.path.join(args.data, name)):
            raise DataError(f"--data: {os.path.join(args.data, name)}: file not found ({args.dataset}'s files)")
    out = os.path.abspath(args.out)
    args.data = os.path.abspath(args.data) if args.data else None
    os.chdir(REPO)  # the presets' data paths are relative to the repository root
    out = os.path.relpath(out) if out.startswith(os.path.join(REPO, "")) else out
    command = shlex.join(["python", "compare.py", *argv])
    draws = [args.synth_seed + d for d in range(args.draws)]
    results = [compare_draw(args, out if args.draws == 1 else os.path.join(out, f"draw{d}"), d, extra, command)
               for d in draws]
    paper_tables(results, out, args.methods)
    retests = [os.path.join(os.path.dirname(path), "retests.csv") for path in results]
    retests = [path for path in retests if os.path.isfile(path)]
    if len(retests) > 1:             # pooled over the draws
        stages = len(DATASETS[args.dataset]["files"])
        atomic_write_text(os.path.join(out, "retests.md"), retest_header(stages) + retest_table(retests, stages))


def recorded_files(folder: str | None, dataset: str, synth_seed: int) -> list[str]:
    """--recorded's file for this dataset and draw, if the folder has one."""
    if not folder:
        return []
    path = os.path.join(folder, f"{dataset}_draw{synth_seed}.csv" if dataset in SYNTHETIC else f"{dataset}.csv")
    return [path] if os.path.isfile(path) else []


def paper_tables(results: list[str], out: str, methods: list[str]) -> None:
    """tools/paper_table.py over `results` into `out`, when fine-tuning (the new tasks' reference) and TERACON's
    paper rule or the recommended one (the methods compared with every other) are among `methods`."""
    against = [name for name in ("teracon", "recommended") if name in methods]
    if "finetune" not in methods or not against:
        return
    from continual.evaluation import paper_table
    paper_table.main(["--results", *results, "--out", out, "--against", ",".join(against)])


def compare_draw(args: argparse.Namespace, out: str, synth_seed: int, extra: list[str], command: str) -> str:
    """Every chain of one draw of the data into `out`, then its tables; → the path of its results.csv."""
    methods, stages = args.methods, len(DATASETS[args.dataset]["files"])
    check_data_draw(out, args.dataset, synth_seed)  # before the data is rewritten for another draw
    if not args.data and args.dataset in PREPARE:  # regenerated (deterministic, seconds), as run_all.sh does
        PREPARE[args.dataset](synth_seed)
    for stage in range(1, stages + 1):
        preset_paths(args.dataset, stage, check=not args.data)  # a missing data file is reported here, in one line
    seeds = list(range(args.seeds))
    started = time.time()
    print(f"{command}\n{len(seeds)} seeds x {len(methods)} methods, {stages} stages, {args.jobs} jobs, out {out}"
          + (f", synth_seed {synth_seed}" if args.dataset in SYNTHETIC else ""), flush=True)
    carried = recorded_chains(recorded_files(args.recorded, args.dataset, synth_seed), seeds, methods, stages)
    recorded = {(r["seed"], r["method"]) for r in carried}
    if recorded:
        print(f"{len(recorded)} chain(s) taken from --recorded, not run: "
              + ", ".join(f"seed {seed} {method}" for seed, method in sorted(recorded)), flush=True)
    failed = run_all(args.dataset, out, seeds, methods, stages, extra, args.jobs, recorded,
                     later_flags(args.dataset, args.settings, args.later_epochs, args.protocol), args.threads,
                     args.data)

    results = load_results(out, seeds, methods, stages)
    rows = summary_rows(results, stages) + reference_rows(results, stages)
    labels = task_labels(args.dataset, stages)
    header = (f"Command: `{command}`  \nDate: {datetime.now().astimezone().isoformat(timespec='seconds')} "
              f"(wall time {(time.time() - started) / 60:.1f} min)  \n"
              f"Headline metric of every task after stage {stages} (MRR@5 for rec tasks, accuracy for cls tasks), "
              f"mean and 95 % t-interval over seeds {', '.join(map(str, seeds))} (each seed its own split and "
              f"stage 1); task-1 retention = task 1's MRR@5 after stage {stages} / after stage 1. `trivial "
              f"baseline`: the strongest of popularity, popularity without the user's items (rec) and the "
              f"majority class (cls) on the same test users; `ceiling`: the Bayes-optimal score (synth only)."
              + (f"  \n{len(recorded)} chain(s) taken from --recorded are not in these tables (results.csv and "
                 "paper_table.md hold them)." if recorded else ""))
    seconds = {method: epoch_seconds(out, seeds, method, stages) for method in methods}
    sizes = {method: size_ratio(out, seeds, method, stages) for method in methods}
    retention = retention_rows(results, stages)
    table = markdown_table(rows, labels, header) + (
        "\nPaired differences a − b over seeds (same seed: same split and stage-1 checkpoint), mean and 95 % "
        "t-interval; **bold**: the interval excludes 0.\n\n" + paired_table(paired_rows(results, stages), labels)) + (
        f"\nRetention and learning: `kept K` = task K's headline after stage {stages} / at stage K (**bold**: the "
        "interval lies above 0.9); `new K − finetune` = task K's headline at stage K minus fine-tuning's, paired by "
        f"seed (**bold**: the interval excludes 0); s/epoch = mean training time of a stage-{stages} epoch from "
        f"the logs ({args.jobs} single-thread stages at a time); parameters ÷ one model = the parameters after "
        f"stage {stages} over those of the chain's stage-1 model.\n\n"
        + retention_table(retention, stages, seconds, sizes=sizes)) + (
        f"\nKept of the best: task K's headline after stage {stages} / its highest after any stage from K to "
        f"{stages} (a stricter reading where scores are noisy: the highest of several noisy scores raises the "
        "denominator; **bold**: the interval lies above 0.9).\n\n" + best_table(retention, stages))
    atomic_write_text(os.path.join(out, "compare.md"), table)
    atomic_write_text(os.path.join(out, "compare.csv"), csv_table(rows, stages))
    ran = [r for r in result_records(out, results) if (r["seed"], r["method"]) not in recorded]
    atomic_write_text(os.path.join(out, "results.csv"), records_csv(carried + ran))
    write_retests(out, results, stages)
    print("\n" + table + f"\nwritten to {os.path.join(out, 'compare.md')}, {os.path.join(out, 'compare.csv')} and "
          f"{os.path.join(out, 'results.csv')}")
    if failed:
        raise DataError(f"{failed} (seed, method) chain(s) failed; see the .log files under {out}; "
                        "rerun the same command to resume")
    return os.path.join(out, "results.csv")


if __name__ == "__main__":
    cli(main)
