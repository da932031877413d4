"""Shared pieces: errors, atomic writes, seeding, metrics, the per-dataset / per-stage defaults and report
formatting. TERACON's math is in method.py, checkpoint loading in checkpoints.py."""
from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import sys
import tempfile
from typing import Any, Callable

import numpy as np
import torch

class DataError(Exception):
    """Bad input the user can fix; reported as one line naming the file, no traceback."""


def cli(main: Callable[[], Any]) -> None:
    """Run `main`, turning DataError (and Ctrl-C or a kill) into one line on stderr and a non-zero exit."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: earlier checkpoints are untouched; this stage's best-so-far checkpoint "
              "(if any) is loadable", file=sys.stderr)
        sys.exit(130)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(handle)
    try:
        write(temp_path)
        os.replace(temp_path, path)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)


def atomic_write_text(path: str, text: str) -> None:
    def write(temp_path: str) -> None:
        with open(temp_path, "w", encoding="utf-8") as handle:
            handle.write(text)
    _atomic_write(path, write)


def atomic_torch_save(obj: Any, path: str) -> None:
    _atomic_write(path, lambda temp_path: torch.save(obj, temp_path))


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    """np.save written atomically (through an open handle: np.save would append .npy to the temporary name)."""
    def write(temp_path: str) -> None:
        with open(temp_path, "wb") as handle:
            np.save(handle, array)
    _atomic_write(path, write)


def write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def keep_freed_memory() -> None:
    """Stop glibc from returning large freed blocks to the kernel (no mmap, no trimming).

    A training step frees and re-allocates activation buffers of tens of MiB; by default each is a fresh
    mmap whose pages fault in again, which cost a third of a CPU step in the kernel (5.4M page faults
    per stage-2 step at batch 1024). Memory stays with the process at its peak instead. No effect on
    results; skipped off glibc or when TERACON_SYSTEM_MALLOC=1.
    """
    if os.environ.get("TERACON_SYSTEM_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)


def set_seed(seed: int) -> np.random.Generator:
    """Seed python, numpy and torch; return the numpy Generator the training loop draws batches from."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def resolve_device(device: str | None, gpu_num: str | None) -> torch.device:
    """--device wins; else the original's --gpu_num (an int or 'cpu'); else cuda when available."""
    if device is None and gpu_num is not None:
        device = "cpu" if str(gpu_num) == "cpu" else f"cuda:{gpu_num}"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(device)


# ---------------------------------------------------------------- metrics

def metric_names(top_k: int) -> list[str]:
    long_k = top_k + 15
    return [f"mrr@{top_k}", f"hit@{top_k}", f"ndcg@{top_k}", f"mrr@{long_k}", f"hit@{long_k}", f"ndcg@{long_k}", "acc"]


def ranking_values(logits: torch.Tensor, targets: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-example MRR, HR, NDCG at top_k and top_k+15 and hit@1, as the authors' accuracy_test.

    The rank r (from 0) is the target's position in torch.topk's sorted list; MRR = 1/(r+1),
    NDCG = 1/log2(r+2), HR = 1, all 0 when the target is outside the top k.
    logits [B, n], targets [B] → [B, 7] float64 (columns in the order of `metric_names`).
    """
    n_classes = logits.shape[1]
    long_k = min(top_k + 15, n_classes)
    top = torch.topk(logits, k=long_k, sorted=True).indices  # [B, long_k]
    hit = (top == targets[:, None]).to(torch.float64)        # [B, long_k]
    rank = torch.arange(long_k, device=logits.device, dtype=torch.float64)
    reciprocal, gain = 1.0 / (rank + 1.0), 1.0 / torch.log2(rank + 2.0)   # [long_k]
    short = min(top_k, n_classes)
    columns = [
        (hit[:, :short] * reciprocal[:short]).sum(1),
        hit[:, :short].sum(1),
        (hit[:, :short] * gain[:short]).sum(1),
        (hit * reciprocal).sum(1),
        hit.sum(1),
        (hit * gain).sum(1),
        (logits.argmax(1) == targets).to(torch.float64),
    ]
    return torch.stack(columns, dim=1)


def ranking_sums(logits: torch.Tensor, targets: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-batch sums of `ranking_values`: logits [B, n], targets [B] → [7]."""
    return ranking_values(logits, targets, top_k).sum(0)


# ---------------------------------------------------------------- defaults

TTL_FILES = [
    "original_desen_pretrain.csv",
    "original_desen_finetune_click_nouserID.csv",
    "original_desen_finetune_like_nouserID.csv",
    "original_desen_age.csv",
    "original_desen_gender.csv",
    "original_desen_lifestatus.csv",
]
PREPARED_FILES = [f"task{k}.csv" for k in range(1, 7)]

DATASETS: dict[str, dict[str, Any]] = {
    "ttl": {"folder": "Data/TTL", "files": TTL_FILES,
            "names": ["next_item", "click", "like", "age", "gender", "life_status"],
            "kinds": ["rec", "rec", "rec", "cls", "cls", "cls"],
            "missing": "download the TTL dataset (link in the authors' README, github.com/Sein-Kim/TERACON) "
                       "and put its six CSV files in Data/TTL/"},
    "movielens": {"folder": "Data/movielens", "files": PREPARED_FILES,
                  "names": ["next_item", "watch", "like", "task4", "task5", "task6"],
                  "kinds": ["rec", "rec", "rec", "cls", "cls", "cls"],
                  "missing": "prepare it first: python prepare_data.py --source <ml-folder> --out Data/movielens"},
    "synth": {"folder": "Data/synth", "files": PREPARED_FILES,
              "names": ["next_item", "click", "like", "age", "gender", "life_status"],
              "kinds": ["rec", "rec", "rec", "cls", "cls", "cls"],
              "missing": "generate it first: python synth.py --out Data/synth"},
    "demo": {"folder": "Data/demo", "files": PREPARED_FILES,
             "names": ["next_item", "watch", "like", "age", "gender", "occupation"],
             "kinds": ["rec", "rec", "rec", "cls", "cls", "cls"],
             "missing": "prepare it first: python prepare_data.py --source recbole --out Data/demo --seq_len 100 "
                        "(needs: pip install --no-deps recbole==1.2.1)"},
}

# Per-stage training defaults (paper / authors' run script): stage 1 lr 1e-3 batch 32; stage 2 lr 1e-3
# (revised script; the original 1e-4); later stages lr 1e-4; batch 1024; smax 50; α 0.7.
STAGE_DEFAULTS: dict[int, dict[str, Any]] = {
    1: {"lr": 1e-3, "batch": 32, "epochs": 10},
    2: {"lr": 1e-3, "batch": 1024, "epochs": 100},
}
LATER_STAGE_DEFAULTS: dict[str, Any] = {"lr": 1e-4, "batch": 1024, "epochs": 100}


# --variant: every behaviour in which the authors' two codes differ, as the defaults of its own flag (README,
# "Faithfulness" has the file and lines of both codes). A flag given on the command line wins.
VARIANTS: dict[str, dict[str, Any]] = {
    "revised": {"seed": 0, "L2": 0.0, "ratio_weights": "previous", "ties": "off", "nested_samples": "off",
                "embedding_clamp": "on", "select_on": "acc"},
    "original": {"seed": 10, "L2": 0.75, "ratio_weights": "current", "ties": "off", "nested_samples": "on",
                 "embedding_clamp": "off", "select_on": "acc"},
}
VARIANT_STAGES: dict[str, dict[int, dict[str, Any]]] = {
    "revised": {},
    "original": {2: {"lr": 1e-4, "select_on": "mrr@5", "ties": "on"}, 3: {"select_on": "mrr@5", "ties": "on"}},
}


def stage_defaults(stage: int, variant: str = "revised") -> dict[str, Any]:
    """Every flag default of `stage` under `variant` that is not the flag's own default."""
    return {**STAGE_DEFAULTS.get(stage, LATER_STAGE_DEFAULTS), **VARIANTS[variant],
            **VARIANT_STAGES[variant].get(stage, {})}


def stage_script(stage: int) -> str:
    """The script that trains stage `stage`."""
    return "train_task1.py" if stage == 1 else f"train_teracon_t{stage}.py"


def task_name(dataset: str | None, stage: int) -> str:
    if dataset in DATASETS and stage <= len(DATASETS[dataset]["names"]):
        return DATASETS[dataset]["names"][stage - 1]
    return f"task{stage}"


def preset_kind(dataset: str | None, stage: int) -> str | None:
    """The kind of the preset's task (rec or cls), None outside the presets."""
    kinds = DATASETS.get(dataset or "", {}).get("kinds", [])
    return kinds[stage - 1] if stage <= len(kinds) else None


def preset_paths(dataset: str, stage: int) -> dict[str, str]:
    """--dataset fills --datapath, --datapath_index, --paths and --savepath for a stage."""
    preset = DATASETS[dataset]
    if stage > len(preset["files"]):
        raise DataError(f"--dataset {dataset} has {len(preset['files'])} tasks; give --datapath for task {stage}")
    folder = preset["folder"]
    datapath = os.path.join(folder, preset["files"][stage - 1])
    if not os.path.isfile(datapath):
        raise DataError(f"{datapath}: not found; {preset['missing']}")
    save_folder = os.path.join("saved_models", dataset)
    paths = {"datapath": datapath, "datapath_index": os.path.join(save_folder, "index.csv"),
             "savepath": os.path.join(save_folder, f"task{stage}")}
    if stage > 1:
        paths["paths"] = os.path.join(save_folder, f"task{stage - 1}.t7")
    return paths


def format_table(stage: int, tasks: dict[str, dict]) -> str:
    """The metrics of every task after `stage`, one row per task."""
    columns = list(dict.fromkeys(name for entry in tasks.values() for name in entry["test"]))
    header = f"stage {stage}: test metrics\n{'task':<6}{'kind':<6}" + "".join(f"{c:>10}" for c in columns)
    rows = []
    for key, entry in tasks.items():
        cells = "".join(f"{entry['test'][c]:>10.4f}" if c in entry["test"] else f"{'':>10}" for c in columns)
        rows.append(f"{key:<6}{entry['kind']:<6}{cells}")
    return "\n".join([header] + rows)



def headline_metric(task: dict) -> str:
    """The metric a task entry of metrics.json is judged on: MRR at its smallest cut-off (MRR@5 by default)
    for rec tasks, accuracy for cls tasks."""
    names = [name for name in task["test"] if name.startswith("mrr@")]
    if task["kind"] != "rec" or not names:
        return "acc"
    return min(names, key=lambda name: int(name[4:]))


def _ci(bounds: list[float]) -> str:
    return f"[{bounds[0]:.4f}, {bounds[1]:.4f}]"


def _also_above(versus: dict) -> str:
    """The other metrics on which the model is above the same baseline (paired interval above 0)."""
    others = [name for name, entry in versus.get("all", {}).items() if entry["above"] and name != versus["metric"]]
    return f"  (above on {', '.join(others)})" if others and len(versus["all"]) > 1 else ""


def format_evidence(stage: int, tasks: dict[str, dict]) -> str:
    """Each task's headline metric beside its 95 % interval, the strongest trivial baseline (with its
    interval), the paired difference and, where the data's generator knows it, the ceiling; tasks whose
    difference interval does not lie above 0 are marked `NOT above baseline`."""
    lines = [f"stage {stage}: headline metric vs the strongest trivial baseline (95 % bootstrap intervals "
             "over test users; difference paired on the same resamples)",
             f"{'task':<5}{'kind':<5}{'metric':<7}{'users':>7}  {'score [95% CI]':<26}{'baseline':<19}"
             f"{'its score [95% CI]':<26}{'difference [95% CI]':<28}{'ceiling':>8}"]
    for key, entry in tasks.items():
        if "vs_baseline" not in entry:
            continue
        versus = entry["vs_baseline"]
        metric, name = versus["metric"], versus["baseline"]
        baseline = entry["baseline"][name]
        ceiling = entry.get("ceiling", {}).get(metric)
        difference = f"{versus['difference']:+.4f} {_ci(versus['ci95'])}"
        lines.append(f"{key:<5}{entry['kind']:<5}{metric:<7}{entry['n_test_users']:>7}  "
                     f"{entry['test'][metric]:.4f} {_ci(entry['ci95'][metric]):<19}{name:<19}"
                     f"{baseline['test'][metric]:.4f} {_ci(baseline['ci95'][metric]):<19}{difference:<28}"
                     f"{'' if ceiling is None else f'{ceiling:.4f}':>8}"
                     f"{'' if versus['above'] else '  NOT above baseline'}{_also_above(versus)}")
    return "\n".join(lines)
