"""The command line that fills a stage's typed run config (continual/run_config.py), and the config a
checkpoint carries.

`parse_args` reads the loop's flags (every method has them) and the chosen method's own flags (its
`add_arguments`), fills the per-stage and per-variant defaults and the --dataset paths, and returns a
RunConfig whose `options` are the method's typed options. Checkpoints carry `RunConfig.to_dict()`;
checkpoints written before it existed (format 1, with the parsed command line under "args") are read
through `continual.methods.checkpoints.legacy_run_config`.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Callable

from continual import distributed, flags
from continual.datasets import DATASETS, VARIANTS, preset_paths, stage_defaults
from continual.methods import DEFAULT_METHOD, METHODS, method_class
from continual.run_config import LOOP_FLAGS, RunConfig
from continual.training.history import check_tensorboard
from continual.training.samplers import STREAMS
from utils import DataError

PROTOCOLS = ("static", "time")


def run_config_from_dict(values: dict) -> RunConfig:
    """A checkpoint's `RunConfig.to_dict()` → RunConfig, its options typed by the method's Options (options the method
    no longer has, e.g. retired ones, are left out)."""
    known = {f.name for f in fields(RunConfig)}
    config = RunConfig(**{key: value for key, value in values.items() if key in known and key != "options"})
    config.method = config.method or DEFAULT_METHOD
    options_class = method_class(config.method).Options
    names = {f.name for f in fields(options_class)}
    config.options = options_class(**{k: v for k, v in (values.get("options") or {}).items() if k in names})
    return config


def build_parser(stage: int | None, method: str = DEFAULT_METHOD) -> argparse.ArgumentParser:
    """The loop's flags, then `method`'s own (its add_arguments, under a heading of its name)."""
    title = f"stage {stage}" if stage else "any stage ≥ 2 (--stage, or the stage after --paths)"
    parser = flags.Parser(description=f"Continual user representation learning, {title}.")
    add = parser.add_argument

    def scoped(text: str, stages: str) -> str:
        """A loop flag's help at this stage: hidden where the stage does not read it (accepted all the same)."""
        return text if flags.used_at(stages, stage) else argparse.SUPPRESS

    add("--method", choices=list(METHODS), default=DEFAULT_METHOD,
        help="the continual-learning method (continual/methods/; default teracon); its own flags are listed under "
             "its name at the end of this help: `--method NAME --help` lists NAME's")
    add("--dataset", choices=sorted(DATASETS),
        help="fill --datapath/--datapath_index/--paths/--savepath from the data set's preset (continual/datasets.py; "
             "default: none, give the paths)")
    if stage is None:
        add("--stage", type=flags.integer(2),
            help="task number being learned, >= 2 (default: the stage after --paths)")
    add("--datapath", type=flags.input_file, help="this task's data file (default: --dataset's)")
    add("--datapath_index", type=flags.input_file,
        help="item index (written by task 1, read by later tasks; default: --dataset's saved_models/DATASET/index.csv)")
    add("--paths", type=flags.input_file,
        help=scoped("previous stage's checkpoint (.t7; default: --dataset's saved_models/DATASET/task<K-1>.t7)",
                    "later"))
    add("--savepath", type=flags.output_prefix,
        help="checkpoint written as <savepath>.t7, metrics as <savepath>.metrics.json, the learning curve as "
             "<savepath>.history.csv (default: --dataset's saved_models/DATASET/task<K>)")
    add("--epochs", type=flags.positive_int,
        help="most epochs of the stage (default by stage: 10 at stage 1, 100 later; run_all.sh and compare.py give "
             "the small-data runs their own, continual/datasets.py; docs/cli.md has the table)")
    add("--lr", type=flags.positive_float,
        help="Adam's learning rate (default by stage: 1e-3 at stages 1 and 2, 1e-4 later; --variant original: 1e-4 "
             "at stage 2; a method may set its stage 1's, DITTO 0.01; docs/cli.md)")
    add("--batch", type=flags.positive_int, help="training users a step (default by stage: 32 at stage 1, 1024 later)")
    add("--eval_batch", type=flags.positive_int, default=256,
        help="batch size for validation/test (no effect on results)")
    add("--smax", type=flags.smax, help="the top of the annealing of s (Eq. 19); masks are scored there (default 50; "
        "HAT's 400 under --method hat)")
    add("--variant", choices=sorted(VARIANTS), default="revised",
        help="which of the authors' two codes the flags default to: revised (Sein-Kim/TERACON) or original "
             "(Sein-Kim/TERACON_original); README, Faithfulness (default: revised)")
    add("--seed", type=flags.seed, help="the split's seed, and the training's unless --rerun (default by --variant: "
        "original 10, revised 0)")
    add("--rerun", type=flags.nonnegative_int, default=0,
        help="N > 0: draw the training randomness (new weights, batch order, retention rows) from seed + 1000·N "
             "while the split stays --seed's: the N-th rerun of a stage on the same users, for run-to-run spread")
    add("--top_k", type=flags.positive_int, default=5,
        help="the ranking metrics' cut-offs: @top_k and @top_k+15 (MRR, HR, NDCG)")
    add("--split_percentage", type=flags.fraction, default=0.2, help="valid+test share, in (0, 1)")
    add("--gpu_num", type=flags.gpu_num, default=None,
        help="the original's device flag: an int (cuda:N) or 'cpu' (default: --device's)")
    add("--device", type=flags.device, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    add("--channels", type=flags.positive_int, default=256,
        help=scoped("residual channels of stage 1's new model (later stages take the checkpoint's)", "first"))
    add("--patience", type=flags.positive_int, default=5,
        help="epochs without a better validation score before the stage stops")
    add("--task_kind", choices=["rec", "cls"],
        help="default: rec for task 1, later tasks rec when they have more than top_k+15 classes")
    add("--select_on", type=flags.metric,
        help="validation metric for early stopping on rec tasks (cls tasks use acc): acc, or mrr/hit/ndcg at "
             "@top_k or @top_k+15 (mrr@5 ... ndcg@20 by default); the revised code uses acc "
             "(hit@1) everywhere, the original t2/t3 scripts mrr@5")
    add("--ties", type=flags.on_off, nargs="?", const="on",
        help="on: a validation score equal to the best so far counts as an improvement (the original's t2/t3 "
             "scripts); off: only a higher one (default by --variant: off; the original's stages 2-3 on)")
    add("--streams", choices=STREAMS, default="ours",
        help=scoped("stages >= 2: authors = draw batches, retention rows, evaluation rows and the new stage's fresh "
                    "parameters as the authors' code does (drops partial batches; with --variant original, from an "
                    "authors' checkpoint), to replay it step for step (tools/replay_check.py); ours = this suite's "
                    "draws", "later"))
    add("--protocol", choices=PROTOCOLS, default="static",
        help=scoped("stages >= 2: static = every item is task 1's (the paper's protocol); time = time passes between "
                    "tasks: a task's sources may hold items no earlier stage saw, which grow the item index (written "
                    "beside the checkpoint as <savepath>.index.csv, read by the next stage) and the model's item rows",
                    "later"))
    add("--amp", action="store_true", help="bf16 autocast (CPU and GPU)")
    add("--compile", action="store_true", help="torch.compile the residual stack of the model (and of the frozen "
        "models); the first steps of each shape are slower while it compiles")
    add("--ce_chunk", type=flags.nonnegative_int, default=None,
        help="rows of a head's outputs that a loss (task 1's cross-entropy, a retention term) computes at a time, "
             "exactly, so that the [rows, classes] outputs never exist whole; 0 = all at once; default: all at once "
             "while the outputs fit in 1 GiB (the demo's and the benchmark's always do), else 1 GiB at a time "
             "(TTL's task 1: 415 rows)")
    add("--negatives", type=flags.nonnegative_int, default=0,
        help="task 1's next-item loss (stage 1 of every method, MTL's replay of task 1): 0 = the cross-entropy over "
             "every item (the paper's objective; default); N > 0 = a sampled softmax of the target against N items "
             "drawn uniformly per batch, shared by its rows (a departure from the paper's objective, far cheaper a "
             "step over TTL's 645,974 items); scoring always ranks every item")
    add("--resume", action="store_true",
        help="continue an interrupted stage where it stopped: after its last finished epoch, or at the step where a "
             "SIGTERM stopped it")
    add("--overwrite", action="store_true",
        help="train the stage again where its finished checkpoint is (--savepath): without it that is refused, as a "
             "later stage may have been built from it")
    add("--max_steps", type=flags.positive_int, default=None,
        help="train at most N optimiser steps (batches, a skipped one included) in the stage, then select, score and "
             "save as usual: a dry run; each phase of a method with several (CONURE) gets N. Recorded in "
             "metrics.json and printed with the scores (default: no limit)")
    add("--eval_users", type=flags.positive_int, default=None,
        help="every scoring pass (validation, the test at each new best, the final scores of every task) reads at "
             "most N users of each task, a draw seeded by the task's --seed (the same users at every stage). Recorded "
             "in metrics.json and printed with the scores (default: every user)")
    add("--eval_negatives", type=flags.nonnegative_int, default=0,
        help="DITTO's evaluation: every scoring pass ranks each rec task's target among N items drawn uniformly from "
             "the task's classes (never the target, padding or <UNK>; seeded by the task's --seed, the same at every "
             "stage), the trivial baselines among the same; with the default 80/5/15 split and --patience 2 it is "
             "DITTO's protocol (docs/methods.md). Recorded in metrics.json and printed with the scores. Default 0: "
             "every item is ranked (this suite's protocol)")
    add("--tensorboard", type=flags.output_dir, default=None,
        help="also write each epoch's row of <savepath>.history.csv (the learning curve every stage writes) as "
             "TensorBoard scalars under DIR/<savepath's name>; needs the optional tensorboard package (default: none)")
    method_class(method).add_arguments(parser.add_argument_group(f"--method {method}"), stage)
    parser.explain_unknown = lambda words: unknown_flags_message(words, stage, method)
    return parser


def chosen_method(argv: list[str] | None) -> str:
    """--method's value before the full parse (whose flags depend on it); an unknown one is left to the parser."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--method", default=DEFAULT_METHOD)
    known, _ = probe.parse_known_args(argv)
    return known.method if known.method in METHODS else DEFAULT_METHOD


def parse_args(stage: int | None, argv: list[str] | None = None,
               stage_of: Callable[[str], int] | None = None) -> RunConfig:
    """The stage's RunConfig from the command line: explicit flags, then the stage's and the variant's defaults,
    then --dataset's paths. Every domain is checked here, before any file is read or written. With `stage` None
    (train_teracon.py): --stage, or the stage after `stage_of(--paths)` (the caller reads the checkpoint; this
    layer sits below continual.methods.checkpoints)."""
    method = chosen_method(argv)
    parser = build_parser(stage, method)
    args = parser.parse_args(argv)
    note_unread_flags(parser, sys.argv[1:] if argv is None else argv, stage)
    if stage is None:
        stage = args.stage
        if stage is None and args.paths and stage_of is not None:
            stage = stage_of(args.paths) + 1
        if stage is None or stage < 2:
            raise DataError("give --stage K (K ≥ 2) or --paths of the previous stage's checkpoint")
    args.stage = stage
    cls = method_class(method)
    loop_defaults = {"smax": RunConfig.smax, **stage_defaults(stage, args.variant),
                     **cls.variant_defaults.get(args.variant, {}), **cls.loop_defaults,
                     **(cls.stage1_defaults if stage == 1 else {})}
    for key, value in loop_defaults.items():
        if getattr(args, key, value) is None:  # explicit flags win; a default of a flag the method lacks is skipped
            setattr(args, key, value)
    flags.check_select_on(parser, args.select_on, args.top_k)
    flags.check_eval_negatives(parser, args.eval_negatives, args.top_k)
    check_tensorboard(args.tensorboard)
    if args.dataset:
        for key, value in preset_paths(args.dataset, stage, check=args.datapath is None).items():
            if getattr(args, key) is None:  # explicit flags win
                setattr(args, key, value)
    required = ["datapath", "datapath_index", "savepath"] + (["paths"] if stage > 1 else [])
    missing = [f"--{key}" for key in required if getattr(args, key) is None]
    if missing:
        raise DataError(f"missing {', '.join(missing)} (or give --dataset)")
    run = RunConfig(stage=stage, method=method, options=cls.options_from(args),
                    **{name: getattr(args, name) for name in LOOP_FLAGS})
    cls.check(run.options, run, parser.error)
    if run.streams == "authors":
        check_authors_streams(run)
    return run


def note_unread_flags(parser: argparse.ArgumentParser, argv: list[str], stage: int | None) -> None:
    """One line on stderr naming the flags given that this stage does not read (hidden from its --help; accepted so
    that run_all.sh can give every stage the same flags)."""
    hidden = {name for action in parser._actions if action.help == argparse.SUPPRESS for name in action.option_strings}
    given = [word.split("=")[0] for word in argv if word.split("=")[0] in hidden]
    if given:
        which = "stages >= 2" if stage == 1 else "stage 1"
        print(f"note: stage {stage or 'K'} does not read {', '.join(dict.fromkeys(given))} (flags of {which} only)",
              file=sys.stderr)


def check_stage_flags(argv: list[str], method: str) -> None:
    """Parse `argv` as a stage of `method` would (compare.py's flags for every stage): one line if it would fail."""
    build_parser(None, method).parse_args(argv)


def method_flags(method: str) -> set[str]:
    """The flags `method` adds to the loop's."""
    group = flags.Parser(add_help=False)
    method_class(method).add_arguments(group)
    return set(group._option_string_actions)


def unknown_flags_message(unknown: list[str], stage: int | None, method: str) -> str:
    """An unknown flag that is another method's says whose it is; any other is argparse's own complaint."""
    flag = next((word.split("=")[0] for word in unknown if word.startswith("--")), None)
    if flag in method_class(method).retired:
        return f"{flag} of --method {method} was {method_class(method).retired[flag]}"
    for other in METHODS:
        if flag and other != method and flag in method_flags(other):
            return f"{flag} is a flag of --method {other}, not of --method {method}"
    return f"unrecognized arguments: {' '.join(unknown)}"


def check_authors_streams(run: RunConfig) -> None:
    """What --streams authors replays: stages ≥ 2 of what the method says it can replay (Method.replay_refusal), in
    one process, from the start."""
    refusal = method_class(run.method).replay_refusal(run.options)
    unsupported = [(run.stage == 1, "stage 1"), (run.resume, "--resume"), (distributed.launched(), "torchrun"),
                   (run.rerun > 0, "--rerun"), (run.protocol == "time", "--protocol time"),
                   (run.negatives > 0, "--negatives"),
                   (refusal is not None, refusal)]
    found = [what for bad, what in unsupported if bad]
    if found:
        raise DataError(f"--streams authors replays the authors' stages >= 2 in one process; not with "
                        f"{', '.join(found)}")
