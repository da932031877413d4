"""The datasets the scripts know by name (--dataset) and the per-stage and per-variant flag defaults."""
from __future__ import annotations

import os
from typing import Any

from utils import DataError

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
    "ttl_shaped": {"folder": "Data/ttl_shaped", "files": TTL_FILES,
                   "names": ["next_item", "click", "like", "age", "gender", "life_status"],
                   "kinds": ["rec", "rec", "rec", "cls", "cls", "cls"],
                   "missing": "generate it first: python tools/ttl_shaped.py --out Data/ttl_shaped (random contents "
                              "in TTL's shapes, 1,000,000 users a task; about a minute)"},
    "movielens": {"folder": "Data/movielens", "files": PREPARED_FILES,
                  "names": ["next_item", "watch", "like", "task4", "task5", "task6"],
                  "kinds": ["rec", "rec", "rec", "cls", "cls", "cls"],
                  "missing": "prepare it first: python prepare_data.py --source <ml-folder> --out Data/movielens"},
    "synth": {"folder": "Data/synth", "files": PREPARED_FILES,
              "names": ["next_item", "click", "like", "age", "gender", "life_status"],
              "kinds": ["rec", "rec", "rec", "cls", "cls", "cls"],
              "missing": "generate it first: python tools/synth.py --out Data/synth"},
    "synth_time": {"folder": "Data/synth_time", "files": PREPARED_FILES, "generator": ["--new_items", "20"],
                   "names": ["next_item", "click", "like", "age", "gender", "life_status"],
                   "kinds": ["rec", "rec", "rec", "cls", "cls", "cls"],
                   "missing": "generate it first: python tools/synth.py --out Data/synth_time --new_items 20"},
    "demo": {"folder": "Data/demo", "files": PREPARED_FILES, "generator": ["--seq_len", "100"],
             "names": ["next_item", "watch", "like", "age", "gender", "occupation"],
             "kinds": ["rec", "rec", "rec", "cls", "cls", "cls"],
             "missing": "prepare it first: python prepare_data.py --source recbole --out Data/demo --seq_len 100 "
                        "(needs: pip install --no-deps recbole==1.2.1)"},
    "demo_time": {"folder": "Data/demo_time", "files": PREPARED_FILES,
                  "generator": ["--seq_len", "100", "--periods", "6", "--first_share", "0.5"],
                  "names": ["next_item", "watch", "like", "age", "gender", "occupation"],
                  "kinds": ["rec", "rec", "rec", "cls", "cls", "cls"],
                  "missing": "prepare it first: python prepare_data.py --source recbole --out Data/demo_time "
                             "--seq_len 100 --periods 6 --first_share 0.5 (needs: pip install --no-deps "
                             "recbole==1.2.1)"},
}

# Per-stage training defaults (paper / authors' run script): stage 1 lr 1e-3 batch 32; stage 2 lr 1e-3
# (revised script; the original 1e-4); later stages lr 1e-4; batch 1024; smax 50; α 0.7.
STAGE_DEFAULTS: dict[int, dict[str, Any]] = {
    1: {"lr": 1e-3, "batch": 32, "epochs": 10},
    2: {"lr": 1e-3, "batch": 1024, "epochs": 100},
}
LATER_STAGE_DEFAULTS: dict[str, Any] = {"lr": 1e-4, "batch": 1024, "epochs": 100}


# --variant: the loop's flags in which the authors' two codes differ, as the defaults of those flags (README,
# "Faithfulness" has the file and lines of both codes; the method's options that differ are its variant_defaults,
# e.g. TERACON's in methods/teracon.py). A flag given on the command line wins.
VARIANTS: dict[str, dict[str, Any]] = {
    "revised": {"seed": 0, "ties": "off", "select_on": "acc"},
    "original": {"seed": 10, "ties": "off", "select_on": "acc"},
}
VARIANT_STAGES: dict[str, dict[int, dict[str, Any]]] = {
    "revised": {},
    "original": {2: {"lr": 1e-4, "select_on": "mrr@5", "ties": "on"}, 3: {"select_on": "mrr@5", "ties": "on"}},
}


# The small-data runs' flags of each stage (run_all.sh and compare.py read them here: `stage_flags`), by dataset:
# (stage 1's, every later stage's).
# - demo: the last 100 interactions instead of 50 (users have 106 on average: prepare_data's --seq_len); 60/10/30
#   splits (--split_percentage 0.4: 95 validation and 282 test users instead of 47 and 141); 64 channels; model
#   selection on NDCG@20 (MRR@5 on 95 users jumps between epochs) with patience 15 / 5; batch 256 and lr 1e-3 after
#   stage 1 (943 users make few batches of 1024). README, "The demo". demo_time (the demo with time passing between
#   tasks: prepare_data.py --periods 6, stage 1 on the first half of the ratings' timeline): the same, with
#   --protocol time after stage 1.
# - synth (the controlled benchmark): demo-sized settings, 64 channels, at most 10 epochs a stage, batch 256 and lr
#   1e-3 after stage 1; synth_time (the benchmark with items arriving: tools/synth.py --new_items 20): the same, with
#   --protocol time after stage 1.
# Other datasets (ttl, movielens, ttl_shaped) run at the paper's settings: no flags.
SMALL_RUN_FLAGS: dict[str, tuple[list[str], list[str]]] = {
    "synth": (["--channels", "64", "--epochs", "10", "--patience", "3", "--select_on", "mrr@5"],
              ["--epochs", "10", "--patience", "3", "--select_on", "mrr@5", "--batch", "256", "--lr", "1e-3"]),
    "synth_time": (["--channels", "64", "--epochs", "10", "--patience", "3", "--select_on", "mrr@5"],
                   ["--epochs", "10", "--patience", "3", "--select_on", "mrr@5", "--batch", "256", "--lr", "1e-3",
                    "--protocol", "time"]),
    "demo": (["--channels", "64", "--epochs", "80", "--patience", "15", "--select_on", "ndcg@20",
              "--split_percentage", "0.4"],
             ["--epochs", "20", "--patience", "5", "--select_on", "ndcg@20", "--batch", "256", "--lr", "1e-3",
              "--split_percentage", "0.4"]),
    "demo_time": (["--channels", "64", "--epochs", "80", "--patience", "15", "--select_on", "ndcg@20",
                   "--split_percentage", "0.4"],
                  ["--epochs", "20", "--patience", "5", "--select_on", "ndcg@20", "--batch", "256", "--lr", "1e-3",
                   "--split_percentage", "0.4", "--protocol", "time"]),
}


def stage_flags(dataset: str, stage: int) -> list[str]:
    """The flags run_all.sh and compare.py give stage `stage` of `dataset` (SMALL_RUN_FLAGS; none elsewhere)."""
    first, later = SMALL_RUN_FLAGS.get(dataset, ([], []))
    return list(first if stage == 1 else later)


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


def preset_paths(dataset: str, stage: int, check: bool = True) -> dict[str, str]:
    """--dataset fills --datapath, --datapath_index, --paths and --savepath for a stage; with `check`, its data file
    must exist (one line naming it and how to make it)."""
    preset = DATASETS[dataset]
    if stage > len(preset["files"]):
        raise DataError(f"--dataset {dataset} has {len(preset['files'])} tasks; give --datapath for task {stage}")
    folder = preset["folder"]
    datapath = os.path.join(folder, preset["files"][stage - 1])
    if check and not os.path.isfile(datapath):
        raise DataError(f"{datapath}: not found; {preset['missing']}")
    save_folder = os.path.join("saved_models", dataset)
    paths = {"datapath": datapath, "datapath_index": os.path.join(save_folder, "index.csv"),
             "savepath": os.path.join(save_folder, f"task{stage}")}
    if stage > 1:
        paths["paths"] = os.path.join(save_folder, f"task{stage - 1}.t7")
    return paths


if __name__ == "__main__":  # run_all.sh: `python -m continual.datasets DATASET STAGE` prints the stage's flags;
    import sys             # `... DATASET generator` the flags tools/synth.py or prepare_data.py make it with
    if sys.argv[2] == "generator":
        print(" ".join(DATASETS[sys.argv[1]].get("generator", [])))
    else:
        print(" ".join(stage_flags(sys.argv[1], int(sys.argv[2]))))
