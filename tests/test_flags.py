"""Every flag of every entry point is checked: a value outside its domain ends in ONE line on stderr that
names the flag, exit status 2, no traceback, and nothing written (issue 14).

Entry points run in-process through their main / parse path (utils.cli where the script uses it), so the
whole file stays fast; three subprocess runs prove the real shell behaviour.
"""
from __future__ import annotations

import argparse
import inspect
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import compare
import data_loader
import evaluate
import predict
import prepare_data
import utils
from continual import flags
from continual.training import config, loop
from model import ModelConfig, NextItNet
from continual.generators import synth
from tools import bench, figures

REPO = Path(__file__).resolve().parent.parent
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TERACON_SYSTEM_MALLOC", "1")  # keep_freed_memory would retune this test process's malloc


def error_line(capsys, call) -> str:
    """Run `call` as its script would (cli or sys.exit of its return); assert exit 2 and one clean line."""
    previous = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as info:
            sys.exit(call())
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def argv_error_line(capsys, monkeypatch, script: str, main, argv: list[str]) -> str:
    """Run an entry point whose main() reads sys.argv (evaluate.py, predict.py) under utils.cli → error_line."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    return error_line(capsys, lambda: utils.cli(main))


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, data_writer) -> dict:
    """Synthetic data, its index and an (untrained) stage-1 checkpoint: enough to reach the data checks."""
    folder = tmp_path_factory.mktemp("flags")
    data = data_writer(folder / "data")
    _, index = data_loader.load_sequences(str(data.task1))
    data_loader.write_index(index, str(folder / "index.csv"))
    args = config.parse_args(1, ["--datapath", str(data.task1), "--datapath_index", str(folder / "index.csv"),
                                  "--savepath", str(folder / "task1"), "--channels", "8", "--device", "cpu"])
    model = NextItNet(ModelConfig(n_items=index.size, task_classes=[index.size], channels=8))
    record = loop.task_record(args, index.size)
    utils.atomic_torch_save(loop.checkpoint_dict(args, model, {}, [record], 0, {"acc": 0.0}, finished=True), str(folder / "task1.t7"))
    (folder / "metrics.json").write_text('{"stage": 1, "tasks": {}}\n')
    return {"folder": folder, "t1": str(data.task1), "t2": str(data.task2), "index": str(folder / "index.csv"),
            "ckpt": str(folder / "task1.t7"), "classes": index.size,
            "rec2": data_loader.load_task(str(data.task2), index).n_classes}


# ------------------------------------------------------------------ the shared pieces

@pytest.mark.parametrize("message, line", [
    ("argument --batch: must be a positive integer (got 0)", "--batch must be a positive integer (got 0)"),
    ("argument --dataset: invalid choice: 'x'", "--dataset: invalid choice: 'x'"),
    ("the following arguments are required: --out", "the following arguments are required: --out"),
    ("two\nlines", "two lines"),
])
def test_one_line(message, line):
    assert flags.one_line(message) == line


@pytest.mark.parametrize("check, good, bad", [
    (flags.positive_int, ["1", "+7", "1_000"], ["0", "-1", "1.5", "x", ""]),
    (flags.nonnegative_int, ["0", "3"], ["-5", "nan"]),
    (flags.seed, ["0", str(2**32 - 1)], ["-1", str(2**32)]),
    (flags.positive_float, ["1e-9", "3"], ["0", "-1", "nan", "inf", "-inf", "x"]),
    (flags.nonnegative_float, ["0", "0.7"], ["-0.1", "nan", "inf"]),
    (flags.finite_float, ["-3", "4.5"], ["nan", "inf"]),
    (flags.fraction, ["0.2", "0.999"], ["0", "1", "1.5", "-0.1", "nan"]),
    (flags.smax, ["1", "400"], ["0", "0.5", "inf"]),
    (flags.metric, ["acc", "mrr@5", "ndcg@20"], ["mrr@0", "auc", "hit@x"]),
    (flags.gpu_num, ["cpu"], ["-1", "x"]),
    (flags.device, ["cpu"], ["gpu", "cuda:x", ""]),
])
def test_validators(check, good, bad):
    for text in good:
        check(text)
    for text in bad:
        with pytest.raises(flags.argparse.ArgumentTypeError):
            check(text)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_flags_without_cuda():
    for check, text in ((flags.device, "cuda"), (flags.device, "cuda:0"), (flags.gpu_num, "0")):
        with pytest.raises(flags.argparse.ArgumentTypeError, match="CUDA is not available"):
            check(text)


def parsers(monkeypatch) -> dict:
    """The parser each entry point builds, caught at its parse_args call."""
    caught = {}

    class Caught(Exception):
        pass

    def grab(self, args=None, namespace=None):
        caught["parser"] = self
        raise Caught

    monkeypatch.setattr(flags.Parser, "parse_args", grab)
    found = {}
    for name, call in {"train_task1.py": lambda: loop.main(1, []), "train_teracon.py": lambda: loop.main(None, []),
                       "evaluate.py": evaluate.main, "compare.py": lambda: compare.main([]),
                       "figures.py": lambda: figures.main([]), "prepare_data.py": lambda: prepare_data.main([]),
                       "bench.py": bench.parse, "predict.py": predict.main, "synth.py": lambda: synth.main([])}.items():
        with pytest.raises(Caught):
            call()
        found[name] = caught.pop("parser")
    return found


FREE_TEXT = {"--title"}  # figures.py: any text is a title


def test_every_flag_states_its_domain(monkeypatch):
    """Every flag that takes a value has a validator (type=) or choices, so none reaches the code unchecked."""
    for name, parser in parsers(monkeypatch).items():
        assert isinstance(parser, flags.Parser), name
        for action in parser._actions:
            if action.nargs == 0 or set(action.option_strings) & FREE_TEXT:
                continue
            assert action.type is not None or action.choices is not None, (name, action.option_strings)


def test_help_still_works(capsys):
    with pytest.raises(SystemExit) as info:
        config.parse_args(1, ["--help"])
    assert info.value.code == 0 and "--split_percentage" in capsys.readouterr().out


# ------------------------------------------------------------------ training scripts

BAD_TRAINING = [
    ("--batch", "0"), ("--batch", "-3"), ("--batch", "1.5"), ("--lr", "-1"), ("--lr", "0"), ("--lr", "nan"),
    ("--lr", "inf"), ("--smax", "0"), ("--smax", "0.5"), ("--smax", "inf"), ("--alpha", "-0.1"), ("--alpha", "nan"),
    ("--L2", "-1"), ("--L2", "inf"), ("--channels", "0"), ("--seed", "-1"), ("--seed", str(2**32)),
    ("--eval_batch", "0"), ("--epochs", "0"), ("--patience", "0"), ("--split_percentage", "1.5"),
    ("--split_percentage", "0"), ("--split_percentage", "1"), ("--top_k", "0"), ("--ce_chunk", "-5"),
    ("--max_steps", "0"), ("--max_steps", "2.5"), ("--eval_users", "0"), ("--eval_users", "-1"),
    ("--device", "gpu"), ("--gpu_num", "-1"), ("--gpu_num", "x"), ("--select_on", "auc"), ("--select_on", "mrr@7"),
    ("--task_kind", "both"), ("--method", "other"), ("--dataset", "nowhere"),
    ("--rows", "every"), ("--weights", "median"), ("--retention_at", "end"), ("--distance", "l1"),
    ("--embedding_clamp", "yes"), ("--nested_samples", "1"), ("--preset", "best"), ("--own_lr", "0"),
    ("--own_blocks", "-1"),
    ("--expert_weight", "nan"), ("--frozen_cache_mib", "-1"), ("--frozen_cache_mib", "1.5"),
    ("--lwf_weight", "1"),  # --lwf_weight: a flag of --method lwf only
    ("--datapath", "{dir}"), ("--datapath", "{dir}/missing.csv"), ("--datapath_index", "{dir}"),
    ("--savepath", "{t1}/task1"), ("--savepath", "{dir}/"), ("--savepath", ""),
] + ([("--device", "cuda"), ("--gpu_num", "0")] if NO_CUDA else [])


def stage1_argv(files: dict, out: Path, flag: str, value: str) -> list[str]:
    argv = {"--datapath": files["t1"], "--datapath_index": str(out / "index.csv"), "--savepath": str(out / "task1"),
            "--channels": "8", "--epochs": "1", "--device": "cpu"}
    value = value.format(dir=str(files["folder"]), t1=files["t1"])
    if flag == "--gpu_num":
        argv.pop("--device")
    argv[flag] = value
    return [part for key, item in argv.items() for part in (key, item)]


@pytest.mark.parametrize("flag, value", BAD_TRAINING)
def test_train_task1(stage1, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    line = error_line(capsys, lambda: utils.cli(lambda: loop.main(1, stage1_argv(stage1, out, flag, value))))
    assert line.startswith(f"error: {flag}"), line
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("flag, value, expected", [
    ("--top_k", "5000", "at most --top_k {fits} fits"),
    ("--top_k", "{fits_plus}", "at most --top_k {fits} fits"),
    ("--split_percentage", "0.001", "--split_percentage 0.005 or more"),
])
def test_train_task1_after_reading_data(stage1, tmp_path, capsys, flag, value, expected):
    """Domains that depend on the data: checked after reading it, before the index or anything else is written."""
    out = tmp_path / "out"
    fits = stage1["classes"] - 15
    value = value.format(fits_plus=fits + 1)
    line = error_line(capsys, lambda: utils.cli(lambda: loop.main(1, stage1_argv(stage1, out, flag, value))))
    assert line.startswith(f"error: {flag} {value}" if flag == "--top_k" else "error: "), line
    assert flag in line and expected.format(fits=fits) in line, line
    assert files_under(tmp_path) == []


def stage2_argv(files: dict, out: Path, *extra: str) -> list[str]:
    return ["--datapath", files["t2"], "--datapath_index", files["index"], "--paths", files["ckpt"],
            "--savepath", str(out / "task2"), "--device", "cpu", *extra]


@pytest.mark.parametrize("stage, extra, expected", [
    (2, ["--batch", "0"], "error: --batch must be a positive integer (got 0)"),
    (2, ["--alpha", "-1"], "error: --alpha must be"),
    (2, ["--paths", "{dir}"], "error: --paths: {dir} is a directory, not a file"),
    (2, ["--paths", "{dir}/nope.t7"], "error: --paths: {dir}/nope.t7: file not found"),
    (2, ["--datapath_index", "{dir}/none.csv"], "error: --datapath_index: {dir}/none.csv: file not found"),
    (None, ["--stage", "1"], "error: --stage must be an integer >= 2 (got 1)"),
    (None, ["--stage", "x"], "error: --stage must be an integer >= 2 (got 'x')"),
    (2, ["--top_k", "5000"], "error: --top_k 5000: task 1 has {classes} classes, so at most --top_k {fits} fits"),
    (2, ["--top_k", "30", "--task_kind", "rec"], "error: --top_k 30: task 2 has {rec2} classes, so at most --top_k "
                                                 "{fits2} fits"),
    (2, ["--split_percentage", "0.001"], "--split_percentage 0.001 (got"),
    (2, ["--rerun", "-1"], "error: --rerun must be"),
    (2, ["--expert", "{dir}/nope.t7"], "error: --expert: {dir}/nope.t7: file not found"),
    (2, ["--expert_weight", "-1"], "error: --expert_weight must be"),
    (2, ["--frozen_cache_mib", "-1"], "error: --frozen_cache_mib must be"),
    (2, ["--expert", "{ckpt}", "--method", "finetune"], "error: --expert is a flag of --method teracon, not of "
                                                         "--method finetune"),
    (2, ["--preset", "recommended"], "error: --preset recommended distils the new task from fine-tuning's checkpoint"),
    (2, ["--rows", "every"], "error: --rows: invalid choice"),
    (2, ["--expert", "{ckpt}"], "{ckpt}: --expert must be a stage-2 checkpoint of this task on the same split"),
])
def test_later_stages(stage1, tmp_path, capsys, stage, extra, expected):
    out = tmp_path / "out"
    before = files_under(stage1["folder"])
    names = {"dir": str(stage1["folder"]), "classes": stage1["classes"], "fits": stage1["classes"] - 15,
             "rec2": stage1["rec2"], "fits2": stage1["rec2"] - 15, "ckpt": stage1["ckpt"]}
    extra = [part.format(**names) for part in extra]
    line = error_line(capsys, lambda: utils.cli(lambda: loop.main(stage, stage2_argv(stage1, out, *extra))))
    assert expected.format(**names) in line, line
    assert files_under(tmp_path) == [] and files_under(stage1["folder"]) == before


# ------------------------------------------------------------------ evaluate.py

@pytest.mark.parametrize("extra, expected", [
    (["--batch", "0"], "error: --batch must be a positive integer"),
    (["--top_k", "0"], "error: --top_k must be"),
    (["--seed", "-1"], "error: --seed must be"),
    (["--split_percentage", "2"], "error: --split_percentage must be"),
    (["--smax", "0"], "error: --smax must be"),
    (["--task", "0"], "error: --task must be a positive integer"),
    (["--device", "gpu"], "error: --device must be"),
    (["--paths", "{dir}"], "error: --paths: {dir} is a directory"),
    (["--paths", "{dir}/no.t7"], "error: --paths: {dir}/no.t7: file not found"),
    (["--datapath", "{dir}"], "error: --datapath: {dir} is a directory"),
    (["--datapath_index", "{dir}/no.csv"], "error: --datapath_index: {dir}/no.csv: file not found"),
    (["--json", "{dir}"], "error: --json: {dir} is a directory"),
    (["--split", "train"], "error: --split: invalid choice: 'train'"),
    (["--kept_from", "{dir}/no.t7"], "error: --kept_from: {dir}/no.t7: file not found"),
    (["--seed", "77", "--kept_from", "{ckpt}"], "error: {ckpt}: splits task 1 with seed 0"),
    (["--task", "9"], "error: --task 9: "),
    (["--top_k", "5000"], "error: --top_k 5000: task 1 has {classes} classes, so at most --top_k {fits} fits"),
    (["--split_percentage", "0.001"], "at --split_percentage 0.001"),
    (["--matrix", "{dir}/none.json"], "error: --matrix: {dir}/none.json: file not found"),
    (["--matrix", "{dir}/metrics.json", "--csv", "{ckpt}/m.csv"], "error: --csv: {ckpt}/m.csv: cannot be written"),
])
def test_evaluate(stage1, tmp_path, capsys, monkeypatch, extra, expected):
    names = {"dir": str(stage1["folder"]), "ckpt": stage1["ckpt"], "classes": stage1["classes"],
             "fits": stage1["classes"] - 15}
    argv = ["--paths", stage1["ckpt"], "--task", "1", "--datapath", stage1["t1"], "--datapath_index",
            stage1["index"], "--device", "cpu", "--json", str(tmp_path / "out" / "e.json")]
    argv += [part.format(**names) for part in extra]
    before = files_under(stage1["folder"])
    line = argv_error_line(capsys, monkeypatch, "evaluate.py", evaluate.main, argv)
    assert expected.format(**names) in line, line
    assert files_under(tmp_path) == [] and files_under(stage1["folder"]) == before


def test_evaluate_refuses_a_task_file_of_another_class_count(stage1, tmp_path, capsys, monkeypatch):
    """--datapath of a file whose classes are not the head's (another task's file) ends in one line naming it."""
    out = tmp_path / "stage2"
    loop.main(2, [*stage2_argv(stage1, out, "--epochs", "1", "--method", "finetune"), "--channels", "8"])
    other = tmp_path / "other.csv"
    other.write_text("".join(f"{line.split(',,')[0]},,{n % 3}\n"
                             for n, line in enumerate(open(stage1["t2"]).read().splitlines())))
    argv = ["--paths", str(out / "task2.t7"), "--task", "2", "--datapath", str(other), "--datapath_index",
            stage1["index"], "--device", "cpu"]
    line = argv_error_line(capsys, monkeypatch, "evaluate.py", evaluate.main, argv)
    assert f"{other}: has 4 classes; task 2 of {out / 'task2.t7'} was trained on {stage1['rec2']}" in line, line


def test_evaluate_needs_paths_and_task(capsys, monkeypatch):
    assert "--paths and --task" in argv_error_line(capsys, monkeypatch, "evaluate.py", evaluate.main, ["--batch", "8"])


# ------------------------------------------------------------------ compare.py, figures.py

@pytest.mark.parametrize("argv, expected", [
    (["--seeds", "0"], "error: --seeds must be a positive integer (got 0)"),
    (["--seeds", "-2"], "error: --seeds must be"),
    (["--jobs", "0"], "error: --jobs must be a positive integer (got 0)"),
    (["--methods", "teracon,magic"], "error: --methods: unknown magic; choose from"),
    (["--methods", ","], "error: --methods: unknown (none given)"),
    (["--out", "{file}"], "error: --out: {file} is a file, not a folder"),
    (["--dataset", "nowhere"], "error: --dataset: invalid choice"),
    (["--", "--batch", "0"], "error: --batch must be a positive integer (got 0)"),
    (["--", "--lr", "nan"], "error: --lr must be"),
    (["--synth_seed", "1"], "error: --synth_seed applies to --dataset synth or synth_time, not demo"),
    (["--draws", "3"], "error: --draws applies to --dataset synth or synth_time, not demo"),
    (["--draws", "0"], "error: --draws must be a positive integer (got 0)"),
    (["--recorded", "no/such/folder"], "error: --recorded: no/such/folder: folder not found"),
    (["--recorded", "{file}"], "error: --recorded: {file} is a file, not a folder"),
    (["--synth_seed", "-1"], "error: --synth_seed must be an integer in [0, "),
    (["--threads", "0"], "error: --threads must be a positive integer (got 0)"),
    (["--data", "no/such/folder"], "error: --data: no/such/folder: folder not found"),
    (["--data", "{dir}"], "error: --data: {dir}/task1.csv: file not found (demo's files)"),
    (["--", "--max_steps", "0"], "error: --max_steps must be a positive integer (got 0)"),
])
def test_compare(stage1, tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)  # restored afterwards, should compare get as far as its os.chdir
    names = {"file": stage1["t1"], "dir": str(stage1["folder"])}               # a folder without the demo's files
    own = ["--dataset", "demo", "--out", str(tmp_path / "cmp")]
    argv = [part.format(**names) for part in argv]
    split = argv.index("--") if "--" in argv else len(argv)
    line = error_line(capsys, lambda: utils.cli(lambda: compare.main(own + argv[:split] + argv[split:])))
    assert expected.format(**names) in line, line
    assert files_under(tmp_path) == []


def test_compare_needs_dataset(tmp_path, capsys):
    line = error_line(capsys, lambda: utils.cli(lambda: compare.main(["--out", str(tmp_path / "cmp")])))
    assert "--dataset" in line and not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--paths", "{dir}"], "error: --paths: {dir} is a directory, not a file"),
    (["--paths", "{dir}/no.t7"], "error: --paths: {dir}/no.t7: file not found"),
    (["--matrix", "{dir}/metrics.json", "{dir}/no.json"], "error: --matrix: {dir}/no.json: file not found"),
    (["--paths", "{ckpt}", "--out", "{ckpt}"], "error: --out: {ckpt} is a file, not a folder"),
    ([], "give --paths, --matrix and/or --curves"),
])
def test_figures(stage1, tmp_path, capsys, argv, expected):
    names = {"dir": str(stage1["folder"]), "ckpt": stage1["ckpt"]}
    argv = [part.format(**names) for part in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "figs")]
    line = error_line(capsys, lambda: utils.cli(lambda: figures.main(argv)))
    assert expected.format(**names) in line, line
    assert files_under(tmp_path) == []


# ------------------------------------------------------------------ prepare_data.py

def raw_ratings(folder: Path) -> Path:
    """A tiny ml-latest-style source: 6 users x 12 ratings of 1..3 stars."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = [f"{u},{int(rng.integers(1, 20))},{int(rng.integers(1, 4))}.0,{100 + t}" for u in range(1, 7) for t in range(12)]
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "\n".join(rows) + "\n")
    (folder / "movies.csv").write_text("movieId,title,genres\n" + "".join(f"{i},Film {i},Drama\n" for i in range(1, 20)))
    return folder


@pytest.mark.parametrize("argv, expected", [
    (["--seq_len", "0"], "error: --seq_len must be a positive integer (got 0)"),
    (["--window", "-1"], "error: --window must be a positive integer"),
    (["--min_interactions", "0"], "error: --min_interactions must be a positive integer"),
    (["--min_interactions", "3", "--window", "3"], "error: --min_interactions must exceed --window"),
    (["--like_threshold", "nan"], "error: --like_threshold must be a finite number"),
    (["--like_threshold", "9"], "error: --like_threshold 9: no held-out rating reaches it (they range 1..3)"),
    (["--out", "{file}"], "error: --out: {file} is a file, not a folder"),
    (["--source", "{file}"], "error: --source: {file} is a file, not a folder"),
])
def test_prepare_data(tmp_path, capsys, argv, expected):
    source = raw_ratings(tmp_path / "raw")
    names = {"file": str(source / "ratings.csv")}
    argv = ["--source", str(source), "--out", str(tmp_path / "out"), "--seq_len", "4", "--window", "3",
            "--min_interactions", "5"] + [part.format(**names) for part in argv]
    line = error_line(capsys, lambda: prepare_data.main(argv))
    assert expected.format(**names) in line, line
    assert files_under(tmp_path) == ["raw", "raw/movies.csv", "raw/ratings.csv"]


def test_prepare_data_needs_out(capsys):
    assert "--out" in error_line(capsys, lambda: prepare_data.main(["--source", "recbole"]))


# ------------------------------------------------------------------ bench.py

@pytest.mark.parametrize("flag, value", [
    ("--items", "1"), ("--users", "0"), ("--length", "1"), ("--channels", "0"), ("--batch1", "0"), ("--batch", "0"),
    ("--stage", "1"), ("--classes", "1"), ("--steps", "0"), ("--load_lines", "0"), ("--ce_chunk", "-1"),
    ("--device", "gpu"), ("--write_data", "{file}"), ("--phase", "warp"), ("--own_blocks", "9"),
])
def test_bench(stage1, tmp_path, capsys, monkeypatch, flag, value):
    monkeypatch.setattr(sys, "argv", ["bench.py", flag, value.format(file=stage1["t1"])])
    line = error_line(capsys, bench.parse)
    assert line.startswith(f"error: {flag}"), line


@pytest.mark.parametrize("rule, capacity, own_blocks", [("paper", "0", "0"), ("recommended", "0.1", "2")])
def test_bench_task_k_phase_runs(monkeypatch, rule, capacity, own_blocks):
    """bench.py's stage-K phase begins TERACON on a stage with its options and times train_step on the chosen
    preset, with the expert's distillation and the tasks' own blocks when asked."""
    monkeypatch.setattr(sys, "argv", ["bench.py", "--phase", "taskK", "--stage", "3", "--items", "40", "--users",
                                      "32", "--length", "8", "--channels", "8", "--batch", "16", "--classes", "3",
                                      "--steps", "1", "--preset", rule,
                                      "--expert_weight", capacity, "--own_blocks", own_blocks])
    row = bench.run_phase(bench.parse())
    assert row["seconds"] > 0 and row["batch"] == 16
    assert rule in row["phase"]
    assert ("expert 0.1" in row["phase"]) == (capacity != "0")
    assert ("own blocks 2" in row["phase"]) == (own_blocks != "0")


# ------------------------------------------------------------------ predict.py, synth.py

@pytest.mark.parametrize("argv, expected", [
    (["--paths", "{dir}"], "error: --paths: {dir} is a directory, not a file"),
    (["--paths", "{dir}/no.t7"], "error: --paths: {dir}/no.t7: file not found"),
    (["--task", "0"], "error: --task must be a positive integer (got 0)"),
    (["--top", "0"], "error: --top must be a positive integer (got 0)"),
    (["--batch", "-1"], "error: --batch must be a positive integer"),
    (["--probe_task", "0"], "error: --probe_task must be a positive integer"),
    (["--input", "{dir}/users.csv"], "error: --input: {dir}/users.csv: file not found"),
    (["--out", "{dir}"], "error: --out: {dir} is a directory, not a file"),
    (["--datapath", "{dir}"], "error: --datapath: {dir} is a directory, not a file"),
    (["--datapath_index", "{dir}/no.csv"], "error: --datapath_index: {dir}/no.csv: file not found"),
    (["--device", "gpu"], "error: --device must be"),
    (["--task", "9"], "error: --task 9: {ckpt} holds tasks 1..1"),
    (["--probe_task", "4", "--out", "{dir}/new/probe.json"], "error: --probe_task 4: {ckpt} holds tasks 1..1"),
])
def test_predict(stage1, tmp_path, capsys, monkeypatch, argv, expected):
    names = {"dir": str(stage1["folder"]), "ckpt": stage1["ckpt"]}
    argv = ["--paths", stage1["ckpt"], "--input", stage1["t1"], "--out", str(tmp_path / "out" / "p.csv"),
            "--device", "cpu"] + [part.format(**names) for part in argv]
    before = files_under(stage1["folder"])
    line = argv_error_line(capsys, monkeypatch, "predict.py", predict.main, argv)
    assert expected.format(**names) in line, line
    assert files_under(tmp_path) == [] and files_under(stage1["folder"]) == before


def test_predict_needs_paths(capsys, monkeypatch):
    assert "--paths" in argv_error_line(capsys, monkeypatch, "predict.py", predict.main, ["--task", "1"])


@pytest.mark.parametrize("argv, expected", [
    (["--seed", "-1"], "error: --seed must be"), (["--users", "19"], "error: --users must be an integer >= 20"),
    (["--items", "1"], "error: --items must be"), (["--length", "2"], "error: --length must be an integer >= 3"),
    (["--clusters", "51"], "error: --clusters must be an integer in [2, 50]"),
    (["--strength", "-1"], "error: --strength must be"), (["--favourite", "nan"], "error: --favourite must be"),
    (["--series", "1"], "error: --series must be a finite number >= 0 and < 1 (got 1)"),
    (["--items", "5", "--clusters", "10"], "error: --items must be >= --clusters (10) (got 5)"),
    (["--out", "{file}"], "error: --out: {file} is a file, not a folder"),
])
def test_synth(stage1, tmp_path, capsys, argv, expected):
    names = {"file": stage1["t1"]}
    argv = ["--out", str(tmp_path / "synth")] + [part.format(**names) for part in argv]
    line = error_line(capsys, lambda: utils.cli(lambda: synth.main(argv)))
    assert expected.format(**names) in line, line
    assert files_under(tmp_path) == []


# ------------------------------------------------------------------ from the shell

@pytest.mark.parametrize("script, argv, flag", [
    ("train_task1.py", ["--batch", "0"], "--batch"),
    ("compare.py", ["--dataset", "demo", "--seeds", "0"], "--seeds"),
    ("prepare_data.py", ["--source", "recbole", "--seq_len", "0"], "--seq_len"),
])
def test_shell(stage1, tmp_path, subprocess_env, script, argv, flag):
    out = tmp_path / "out"
    common = {"train_task1.py": ["--datapath", stage1["t1"], "--datapath_index", str(out / "index.csv"),
                                 "--savepath", str(out / "task1"), "--device", "cpu"],
              "compare.py": ["--out", str(out)], "prepare_data.py": ["--out", str(out)]}[script]
    result = subprocess.run([sys.executable, str(REPO / script), *common, *argv], capture_output=True, text=True,
                            env=subprocess_env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert re.fullmatch(rf"error: {flag} must be a positive integer \(got 0\)\n", result.stderr), result.stderr
    assert result.stdout == "" and files_under(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["bench", "figures", "replay_check", "synth"])
def test_tools_run_as_files_and_as_modules(repo_root, subprocess_env, tool):
    """tools/ sits apart from the library: `python tools/X.py` and `python -m tools.X` both find the suite."""
    for command in ([sys.executable, str(repo_root / "tools" / f"{tool}.py"), "--help"],
                    [sys.executable, "-m", f"tools.{tool}", "--help"]):
        done = subprocess.run(command, cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage" in done.stdout, done.stderr[-2000:]


# ------------------------------------------------------------------ help: every flag of every script

def script_parsers(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    """Each script's parser as its main() builds it (caught at parse_args), and the stage scripts' for every
    method at stage 1, stage 2 and train_teracon.py's any stage."""
    import importlib

    from continual.methods import METHODS
    from continual.training import config

    class Caught(Exception):
        pass

    caught: list = []

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise Caught

    parsers = {f"stage {stage} --method {method}": config.build_parser(stage, method)
               for stage in (1, 2, None) for method in METHODS}
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    monkeypatch.setattr(sys, "argv", ["script"])
    modules = ["compare", "evaluate", "predict", "prepare_data", "continual.evaluation.paper_table",
               "continual.generators.synth", "continual.generators.ttl_shaped", "tools.figures", "tools.bench",
               "tools.scale_report", "tools.gpu_check", "tools.replay_check"]
    for name in modules:
        main = importlib.import_module(name).main
        caught.clear()
        with pytest.raises(Caught):
            main() if not inspect.signature(main).parameters else main([])
        parsers[name] = caught[0]
    return parsers


def test_every_flag_of_every_script_has_help_that_shows_its_default(monkeypatch):
    """--help: each flag says what it does and, unless it is a switch or required, its default (its value, "none",
    or what the default depends on); the stage scripts' --method says how to list a method's own flags."""
    parsers = script_parsers(monkeypatch)
    assert len(parsers) == 3 * 12 + 12
    silent = []
    for name, parser in parsers.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            text = formatter._get_help_string(action) or ""
            switch = action.nargs == 0 or action.required
            if not action.help or not (switch or "default" in text.lower()):
                silent.append(f"{name}: {action.option_strings[0]}")
    assert not silent, silent
    method = next(a for a in parsers["stage 2 --method teracon"]._actions if "--method" in a.option_strings)
    assert "--method NAME --help" in method.help


def listed(stage: int | None, method: str) -> set[str]:
    """The flags stage `stage`'s --help lists for `method`."""
    from continual.training import config
    return {name for action in config.build_parser(stage, method)._actions if action.help != argparse.SUPPRESS
            for name in action.option_strings}


def test_a_stage_lists_only_the_flags_it_reads_and_notes_the_others(capsys):
    """Stage 1 lists task 1's flags (TERACON's --L2, DITTO's --ditto_rho, --channels), not the retention's or the
    later stages' (--expert, --alpha, --paths, --protocol, --streams, LwF's, DITTO's FKT weight); stages >= 2 the
    reverse. An unlisted flag is still accepted (run_all.sh gives every stage the same), with one note naming it."""
    from continual.training import config
    first, later = listed(1, "teracon"), listed(None, "teracon")
    assert {"--L2", "--channels"} <= first and not {"--expert", "--alpha", "--paths", "--protocol", "--streams",
                                                   "--no_embedding_clamp"} & first
    assert {"--expert", "--alpha", "--paths", "--protocol"} <= later and not {"--L2", "--channels"} & later
    assert "--ditto_rho" in listed(1, "ditto") and "--ditto_alpha" not in listed(1, "ditto")
    assert "--ditto_alpha" in listed(2, "ditto") and "--ditto_rho" not in listed(2, "ditto")
    assert "--lwf_weight" not in listed(1, "lwf") and {"--hat_lambda", "--conure_keep"} <= listed(1, "hat") | listed(
        1, "conure")
    run = config.parse_args(1, ["--datapath", "t1.csv", "--datapath_index", "i.csv", "--savepath", "out/t1",
                                "--alpha", "2", "--protocol", "time"])
    assert run.options.L2 == 0.0
    assert capsys.readouterr().err == "note: stage 1 does not read --alpha, --protocol (flags of stages >= 2 only)\n"
