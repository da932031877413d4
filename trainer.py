"""The one training routine behind train_task1.py and train_teracon_t2.py … t6.py (and any later stage).

Stage 1 pretrains NextItNet on next-item prediction with HAT-style masks σ(s·e). Stage K ≥ 2 reloads
stage K−1, adds task K and trains it with TERACON: relation-aware masks, and knowledge retention from
ONE frozen copy of the stage-(K−1) model that pseudo-labels the batch's users for every earlier task.
After each stage every task 1..K is scored on its own test split (metrics.json, printed as a table).
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

import distributed
import flags
from data_loader import (ItemIndex, Staging, TaskData, check_split, load_sequences, load_task, read_index,
                         split_indices, write_index)
from evaluate import evaluate_tasks, score
from checkpoints import load_checkpoint
from method import (INITIAL_RATIO, RETENTION_RULES, Retention, Shard, anneal, clamp_task_embedding, continual_terms,
                    task1_loss)
from model import CHECKPOINT_FORMAT, ModelConfig, NextItNet
from replay import STREAMS, AuthorsStreams, apply_fresh, original_fresh, revised_fresh
from utils import (DATASETS, VARIANTS, DataError, atomic_torch_save, format_evidence, format_table, keep_freed_memory,
                   preset_kind, preset_paths, resolve_device, set_seed, stage_defaults, task_name, write_json)


RERUN_SEED_STEP = 1000  # --rerun N trains from seed + 1000·N


def build_parser(stage: int | None) -> argparse.ArgumentParser:
    title = f"stage {stage}" if stage else "any stage ≥ 2 (--stage, or the stage after --paths)"
    parser = flags.Parser(description=f"TERACON training, {title}.")
    add = parser.add_argument
    add("--dataset", choices=sorted(DATASETS), help="fill --datapath/--datapath_index/--paths/--savepath")
    if stage is None:
        add("--stage", type=flags.integer(2),
            help="task number being learned, >= 2 (default: the stage after --paths)")
    add("--datapath", type=flags.input_file, help="this task's data file")
    add("--datapath_index", type=flags.input_file, help="item index (written by task 1, read by later tasks)")
    add("--paths", type=flags.input_file, help="previous stage's checkpoint (.t7)")
    add("--savepath", type=flags.output_prefix,
        help="checkpoint written as <savepath>.t7, metrics as <savepath>.metrics.json")
    add("--epochs", type=flags.positive_int)
    add("--lr", type=flags.positive_float)
    add("--batch", type=flags.positive_int)
    add("--eval_batch", type=flags.positive_int, default=256,
        help="batch size for validation/test (no effect on results)")
    add("--smax", type=flags.smax, default=50)
    add("--alpha", type=flags.nonnegative_float, default=0.7, help="weight of the knowledge-retention loss")
    add("--variant", choices=sorted(VARIANTS), default="revised",
        help="which of the authors' two codes the flags below default to: revised (Sein-Kim/TERACON) or original "
             "(Sein-Kim/TERACON_original); README, Faithfulness")
    add("--L2", type=flags.nonnegative_float, help="task 1: weight of the mean-mask regulariser (original 0.75, "
        "revised 0)")
    add("--seed", type=flags.seed, help="original 10, revised 0")
    add("--rerun", type=flags.nonnegative_int, default=0,
        help="N > 0: draw the training randomness (new weights, batch order, retention rows) from seed + 1000·N "
             "while the split stays --seed's: the N-th rerun of a stage on the same users, for run-to-run spread")
    add("--top_k", type=flags.positive_int, default=5)
    add("--split_percentage", type=flags.fraction, default=0.2, help="valid+test share, in (0, 1)")
    add("--gpu_num", type=flags.gpu_num, default=None, help="the original's device flag: an int (cuda:N) or 'cpu'")
    add("--device", type=flags.device, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    add("--channels", type=flags.positive_int, default=256)
    add("--patience", type=flags.positive_int, default=5)
    add("--task_kind", choices=["rec", "cls"],
        help="default: rec for task 1, later tasks rec when they have more than top_k+15 classes")
    add("--select_on", type=flags.metric,
        help="validation metric for early stopping on rec tasks (cls tasks use acc): acc, or mrr/hit/ndcg at "
             "@top_k or @top_k+15 (mrr@5 ... ndcg@20 by default); the revised code uses acc "
             "(hit@1) everywhere, the original t2/t3 scripts mrr@5")
    add("--ties", type=flags.on_off, nargs="?", const="on",
        help="on: a validation score equal to the best so far counts as an improvement (the original's t2/t3 "
             "scripts); off: only a higher one")
    add("--embedding_clamp", type=flags.on_off, nargs="?", const="on",
        help="stages ≥ 2: clamp task embeddings to [-6, 6] after each step (revised: on; the original t2–t6 "
             "scripts' clamp never fires: off)")
    add("--no_embedding_clamp", dest="embedding_clamp", action="store_const", const="off",
        help="the same as --embedding_clamp off")
    add("--nested_samples", type=flags.on_off, nargs="?", const="on",
        help="on: earlier tasks' retention rows are prefixes of one shuffle (original); off: a shuffle each (revised)")
    add("--ratio_weights", choices=["previous", "current"],
        help="retention weights c_j from the previous batch's ratios (revised) or this batch's (original)")
    add("--no_relation", action="store_true", help="ablation: plain σ(s·e) masks for every task")
    add("--no_retention", action="store_true", help="ablation: α = 0")
    add("--uniform_sampling", action="store_true", help="ablation: fixed sampling ratio 0.9")
    add("--retention", choices=list(RETENTION_RULES), default="paper",
        help="how sampling ratios become retention rows and weights: " + "; ".join(
            f"{name}: {rule.text}" for name, rule in RETENTION_RULES.items()))
    add("--kl_temperature", type=flags.positive_float, default=1.0,
        help="with a KL rule: compare the softmaxes of logits / T, times T² (T < 1 weighs the teacher's top "
             "classes more); 1 = the plain softmaxes")
    add("--mask_capacity", type=flags.nonnegative_float, default=0.0,
        help="stages >= 2: weight of HAT's capacity regulariser on the new task's masks, Σ m·(1 − m_<K) / "
             "Σ (1 − m_<K) with m_<K the earlier tasks' masks: opening a channel no earlier task uses costs, so "
             "channels stay free for later tasks (stage 1's --L2 is the same term with nothing used); 0 = off")
    add("--expert", type=flags.input_file,
        help="stages >= 2: a checkpoint of this stage trained on the same task and split without retention (e.g. "
             "the fine-tuning chain's); the new task is also distilled from it, β · KL(expert ‖ model) at smax")
    add("--expert_weight", type=flags.nonnegative_float, default=1.0, help="β of --expert")
    add("--own_blocks", type=flags.nonnegative_int, default=0,
        help="stages >= 2: the new task reads its own copies of the top K residual blocks, copied from the shared "
             "ones at the start of the stage and trained only by its own terms, so no earlier task's retention "
             "pulls on them (not in the paper's architecture; README, Retention rules); 0 = every block shared")
    add("--streams", choices=STREAMS, default="ours",
        help="stages >= 2: authors = draw batches, retention rows, evaluation rows and the new stage's fresh "
             "parameters as the authors' code does (drops partial batches; with --variant original, from an "
             "authors' checkpoint), to replay it step for step (replay_check.py); ours = this suite's draws")
    add("--amp", action="store_true", help="bf16 autocast (CPU and GPU)")
    add("--compile", action="store_true", help="torch.compile the residual stack of the model (and the teacher); "
        "the first steps of each shape are slower while it compiles")
    add("--ce_chunk", type=flags.nonnegative_int, default=0, help="task 1: exact cross-entropy over this many rows "
        "at a time (lower peak memory for large vocabularies); 0 = all at once")
    add("--resume", action="store_true", help="continue an interrupted stage from its last finished epoch")
    add("--method", choices=["teracon", "finetune"], default="teracon",
        help="finetune: no masks, no retention, a new head per task (forgetting baseline)")
    return parser


def parse_args(stage: int | None, argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(stage)
    args = parser.parse_args(argv)
    if stage is None:
        stage = args.stage
        if stage is None and args.paths:
            stage = int(load_checkpoint(args.paths)["stage"]) + 1
        if stage is None or stage < 2:
            raise DataError("give --stage K (K ≥ 2) or --paths of the previous stage's checkpoint")
    args.stage = stage
    for key, value in stage_defaults(stage, args.variant).items():
        if getattr(args, key) is None:  # explicit flags win
            setattr(args, key, value)
    flags.check_select_on(parser, args.select_on, args.top_k)
    if args.kl_temperature != 1.0 and not RETENTION_RULES[args.retention].kl:
        parser.error(f"--kl_temperature applies to the KL rules; --retention {args.retention} is not one")
    args.no_embedding_clamp, args.nested_samples = args.embedding_clamp == "off", args.nested_samples == "on"
    if args.dataset:
        for key, value in preset_paths(args.dataset, stage).items():
            if getattr(args, key) is None:  # explicit flags win
                setattr(args, key, value)
    required = ["datapath", "datapath_index", "savepath"] + (["paths"] if stage > 1 else [])
    missing = [f"--{key}" for key in required if getattr(args, key) is None]
    if missing:
        raise DataError(f"missing {', '.join(missing)} (or give --dataset)")
    if args.mask_capacity and args.method == "finetune":
        parser.error("--mask_capacity regularises the masks; --method finetune has none")
    if args.expert and args.method == "finetune":
        parser.error("--expert distils the new task into TERACON's model; --method finetune has no retention to "
                     "make up for")
    if args.method == "finetune" or args.no_retention:
        args.alpha = 0.0
    if args.streams == "authors":
        check_authors_streams(args)
    return args


def check_authors_streams(args: argparse.Namespace) -> None:
    """What --streams authors replays: stages ≥ 2 of either code, in one process, from the start."""
    unsupported = [(args.stage == 1, "stage 1"), (args.resume, "--resume"), (distributed.launched(), "torchrun"),
                   (args.rerun > 0, "--rerun"), (args.expert is not None, "--expert"),
                   (args.method != "teracon" or args.no_relation or args.retention != "paper" or args.mask_capacity
                    or args.own_blocks, "an ablation or another --retention")]
    found = [what for bad, what in unsupported if bad]
    if found:
        raise DataError(f"--streams authors replays the authors' stages >= 2 in one process; not with "
                        f"{', '.join(found)}")


def training_seed(args: argparse.Namespace) -> int:
    """The seed of the training draws: --seed, or seed + 1000·N for --rerun N (the split always uses --seed)."""
    return args.seed + RERUN_SEED_STEP * args.rerun


def load_expert(args: argparse.Namespace, record: dict, n_items: int, device: torch.device) -> NextItNet | None:
    """--expert: a frozen model of this stage trained on the same task and split (so its soft labels carry no
    test user's label); one line naming the file otherwise."""
    if not args.expert:
        return None
    checkpoint = load_checkpoint(args.expert, "--expert")
    task = checkpoint["tasks"][-1] if checkpoint.get("tasks") else {}
    theirs = (checkpoint.get("stage"), task.get("name"), task.get("n_classes"), task.get("seed"),
              task.get("split_percentage"), checkpoint["model_config"]["n_items"])
    ours = (args.stage, record["name"], record["n_classes"], args.seed, args.split_percentage, n_items)
    if theirs != ours:
        raise DataError(f"{args.expert}: --expert must be a stage-{args.stage} checkpoint of this task on the same "
                        f"split (stage, task, classes, seed, split_percentage, items: {theirs}; here: {ours})")
    return frozen_model(checkpoint, device)


def frozen_model(checkpoint: dict, device: torch.device) -> NextItNet:
    """A checkpoint's model on `device` in eval mode with no gradients: the teacher, or the --expert."""
    return NextItNet.from_checkpoint(checkpoint).to(device).eval().requires_grad_(False)


def task_record(args: argparse.Namespace, n_classes: int) -> dict:
    kind = (args.task_kind or preset_kind(args.dataset, args.stage)
            or ("rec" if args.stage == 1 or n_classes > args.top_k + 15 else "cls"))  # task 1: next item, always rec
    return {"name": task_name(args.dataset, args.stage), "datapath": args.datapath, "kind": kind,
            "n_classes": n_classes, "seed": args.seed, "split_percentage": args.split_percentage}


def guard_outputs(args: argparse.Namespace) -> str:
    """The checkpoint path; never an earlier stage's checkpoint."""
    target = args.savepath + ".t7"
    if args.paths and os.path.abspath(target) == os.path.abspath(args.paths):
        raise DataError(f"{target}: --savepath would overwrite the checkpoint this stage starts from")
    if os.path.isfile(target):
        try:
            existing = torch.load(target, map_location="cpu", weights_only=True).get("stage")
        except Exception:
            existing = None
        if existing is not None and existing != args.stage:
            raise DataError(f"{target}: holds stage {existing}'s checkpoint; choose another --savepath")
    return target


def checkpoint_dict(args: argparse.Namespace, model: NextItNet, tasks: list[dict], epoch: int,
                    valid: dict[str, float], spare_task_rows: torch.Tensor | None = None) -> dict:
    checkpoint = {"format_version": CHECKPOINT_FORMAT, "stage": args.stage, "model_config": model.config_dict(),
                  "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                  "tasks": tasks, "index_path": args.datapath_index, "args": vars(args), "epoch": epoch,
                  "valid": valid}
    if spare_task_rows is not None:  # the original's later tasks' embedding rows (replay.py)
        checkpoint["spare_task_rows"] = spare_task_rows
    return checkpoint


def fit(args: argparse.Namespace, train_epoch: Callable[[int], dict], validate: Callable[[], dict],
        on_best: Callable[[int, dict], None], resume: Resume) -> None:
    """Early stopping: validate after each epoch, `on_best` at each new best, stop after `patience` misses.

    After every epoch the training state is saved so that `--resume` continues from the next epoch.
    """
    best, misses, start = resume.restore()
    if start >= args.epochs or misses >= args.patience:
        print(f"resume: stage already finished at epoch {start - 1}")
        return
    for epoch in range(start, args.epochs):
        started = time.time()
        stats = distributed.average_stats(train_epoch(epoch))
        trained = time.time()
        valid = distributed.from_main(validate)  # rank 0's scores: every rank takes the same decisions
        value = valid[args.select_on if args.select_on in valid else "acc"]  # cls tasks only report acc
        improved = best is None or value > best or (args.ties == "on" and value == best)
        summary = " ".join(f"{k}={v:.4f}" for k, v in valid.items())
        print(f"epoch {epoch}: loss {stats['loss']:.4f} retention {stats['retention']:.3g} skipped {stats['skipped']} "
              f"| valid {summary} | train {trained - started:.1f}s, all {time.time() - started:.1f}s"
              f"{' *' if improved else ''}", flush=True)
        if stats["finite_steps"] == 0:
            raise DataError(f"{args.datapath}: no finite loss in epoch {epoch}; nothing saved (try a lower --lr)")
        if improved:
            best, misses = value, 0
            if distributed.is_main():
                on_best(epoch, valid)
        else:
            misses += 1
        if distributed.is_main():
            resume.save(epoch, best, misses)
        if misses >= args.patience:
            print(f"early stop: no better validation {args.select_on} for {args.patience} epochs")
            break


class Resume:
    """The state `--resume` needs, saved atomically after each epoch to `<savepath>.resume.t7`."""

    def __init__(self, args: argparse.Namespace, model: NextItNet, optimizer: torch.optim.Optimizer,
                 rng: np.random.Generator, extra: dict):
        self.path = args.savepath + ".resume.t7"
        self.args, self.model, self.optimizer, self.rng, self.extra = args, model, optimizer, rng, extra

    def save(self, epoch: int, best: float, misses: int) -> None:
        atomic_torch_save({"stage": self.args.stage, "epoch": epoch, "best": best, "misses": misses,
                           "model_state": self.model.state_dict(), "optimizer_state": self.optimizer.state_dict(),
                           "numpy_rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                           "extra": dict(self.extra)}, self.path)

    def restore(self) -> tuple[float | None, int, int]:
        """(best, misses, first epoch to run); a fresh start unless --resume."""
        if not self.args.resume:
            return None, 0, 0
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: nothing to resume (no interrupted run of stage {self.args.stage} there)")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model_state"], strict=True)
            self.optimizer.load_state_dict(state["optimizer_state"])
        except Exception as error:
            raise DataError(f"{self.path}: cannot resume from it ({str(error).splitlines()[0][:120]})") from None
        if state["stage"] != self.args.stage:
            raise DataError(f"{self.path}: belongs to stage {state['stage']}, not {self.args.stage}")
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        self.extra.update(state["extra"])
        print(f"resuming stage {self.args.stage} after epoch {state['epoch']}")
        return state["best"], state["misses"], state["epoch"] + 1


def finish(args: argparse.Namespace, model: NextItNet, checkpoint_path: str, index: ItemIndex,
           device: torch.device, cache: dict[int, TaskData]) -> dict:
    """Reload the best checkpoint and score every task 1..K on its own test split (rank 0 only)."""
    if not distributed.is_main():
        return {}
    checkpoint = load_checkpoint(checkpoint_path, "this stage's checkpoint")
    model.load_state_dict(checkpoint["model_state"], strict=True)
    tasks = evaluate_tasks(model, checkpoint["tasks"], index, args.smax, args.eval_batch, device, args.top_k, cache)
    metrics = {"stage": args.stage, "tasks": tasks}
    write_json(args.savepath + ".metrics.json", metrics)
    print(format_table(args.stage, tasks))
    print(format_evidence(args.stage, tasks))
    print(f"saved {checkpoint_path} and {args.savepath}.metrics.json")
    if os.path.exists(args.savepath + ".resume.t7"):
        os.remove(args.savepath + ".resume.t7")
    return metrics


def compile_backbone(model: NextItNet) -> NextItNet:
    """--compile: torch.compile model.hidden (embedding + residual blocks), where the many small ops are;
    masks, heads and losses stay eager. The batch dimension is dynamic (retention samples and the last
    batch vary); sequence lengths stay static, so a stage compiles a few graphs (train/eval, L and L−1)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.automatic_dynamic_shapes = False
    compiled = torch.compile(model.hidden)

    def hidden(items: torch.Tensor, masks: torch.Tensor, last_only: bool, task: int = 0) -> torch.Tensor:
        torch._dynamo.maybe_mark_dynamic(items, 0)
        # dynamo specialises on the int: tasks that read only the shared blocks share task 0's graph
        return compiled(items, masks, last_only, task if str(task) in model.task_blocks else 0)
    model.hidden = hidden
    return model


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast for --amp (CPU and GPU); a no-op otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@dataclass(frozen=True)
class StepOptions:
    """How continual_step runs a step, apart from the loss (retention_settings has that)."""
    amp: bool = False                  # bf16 autocast (--amp)
    clamp_embeddings: bool = True      # clamp the task embeddings after the step (--embedding_clamp on)
    zero_missing_grads: bool = False   # --streams authors: parameters without a gradient get zeros (Adam moves them)


def step_options(args: argparse.Namespace) -> StepOptions:
    """The stage's StepOptions from its flags."""
    return StepOptions(amp=args.amp, clamp_embeddings=not args.no_embedding_clamp,
                       zero_missing_grads=args.streams == "authors")


def continual_step(model: NextItNet, teacher: NextItNet, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                   y: torch.Tensor, task: int, s: float, ratios: list[float], rng: np.random.Generator,
                   retention: Retention, options: StepOptions, shard: Shard | None = None,
                   expert: NextItNet | None = None) -> tuple[torch.Tensor, torch.Tensor, list[float], bool]:
    """One optimiser step on the stage-K loss → (loss, α · retention, next ratios, stepped).

    Each term is back-propagated as soon as it is computed, so only one pass's activations are alive at
    a time (at task 6: one instead of six); the gradients add up to the gradient of the sum. The step is
    skipped if the total is non-finite (on any rank under torchrun), as optimizer_step."""
    device, shard = x.device, shard or Shard(x.shape[0])
    weight = shard.rows / shard.size                                   # this rank's share of the global batch
    optimizer.zero_grad(set_to_none=True)
    new_ratios: list[float] = []
    terms = continual_terms(model, teacher, x, y, task, s, ratios, rng, retention, new_ratios, shard, expert)
    values = []
    while True:
        with autocast(device, options.amp):
            term = next(terms, None)
        if term is None:
            break
        term.backward()
        values.append(term.detach())
    if options.zero_missing_grads:  # the authors back-propagate empty samples: zero gradients
        for parameter in model.parameters():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
    loss, retention_sum = torch.stack(values).sum(), torch.stack(values[1:]).sum() if len(values) > 1 else values[0] * 0
    stepped = distributed.all_finite(loss, weight)
    if stepped:
        distributed.average_gradients(model, weight)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if options.clamp_embeddings:
        clamp_task_embedding(model)
    return loss, retention_sum, new_ratios, stepped


def retention_settings(args: argparse.Namespace) -> Retention:
    """The stage's knowledge-retention settings from its flags."""
    return Retention(alpha=args.alpha, rule=args.retention, nested=args.nested_samples,
                     uniform=args.uniform_sampling, current_weights=args.ratio_weights == "current", smax=args.smax,
                     temperature=args.kl_temperature, capacity=args.mask_capacity,
                     expert_weight=args.expert_weight if args.expert else 0.0)


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam (β = 0.9, 0.999, eps 1e-8, no weight decay), as the authors; the fused kernel where torch has one
    for the device (one pass over all parameters instead of a dozen small ops per tensor)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def optimizer_step(model: NextItNet, optimizer: torch.optim.Optimizer, loss: torch.Tensor, clamp: bool,
                   weight: float = 1.0) -> bool:
    """Step unless the loss is non-finite (the original checks the CE term only); then clamp task embeddings.

    Under torchrun: skipped on every rank if any rank's loss is non-finite; gradients averaged over ranks,
    `weight` being this rank's share of the global batch (see distributed.batches)."""
    optimizer.zero_grad(set_to_none=True)
    finite = distributed.all_finite(loss, weight)
    if finite:
        loss.backward()
        distributed.average_gradients(model, weight)
        optimizer.step()
    if clamp:
        clamp_task_embedding(model)
    return finite


def account(stats: dict, loss: torch.Tensor, finite: bool) -> None:
    if finite:
        stats["loss"] += float(loss.detach())
        stats["finite_steps"] += 1
    else:
        stats["skipped"] += 1


def prepare_index(args: argparse.Namespace, index: ItemIndex) -> None:
    """Write the index task 1 built; an existing index from other data is never overwritten."""
    if os.path.isfile(args.datapath_index):
        existing = read_index(args.datapath_index)
        if np.array_equal(existing.keys, index.keys):
            return
        raise DataError(f"{args.datapath_index}: an index made from other data exists; "
                        "remove it or give another --datapath_index")
    write_index(index, args.datapath_index)
    print(f"index of {index.size} items written to {args.datapath_index}")


def run_task1(args: argparse.Namespace) -> dict:
    """Stage 1: CE over all positions + L2 · mean mask, s annealed per batch (Eqs. 11, 19)."""
    print("arguments: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())), flush=True)
    device = resolve_device(args.device, args.gpu_num)
    rng = set_seed(training_seed(args))
    checkpoint_path = guard_outputs(args)
    sequences, index = load_sequences(args.datapath)  # [n_users, L]
    parts = split_indices(len(sequences), args.seed, args.split_percentage)
    check_split(args.datapath, len(sequences), parts, args.split_percentage)
    train_rows, valid_rows, test_rows = parts
    print(f"task 1: {len(sequences)} users, length {sequences.shape[1]}, {index.size} items "
          f"(train/valid/test {train_rows.size}/{valid_rows.size}/{test_rows.size})")
    record = task_record(args, index.size)
    flags.check_top_k(args.top_k, record["kind"], index.size, "task 1")
    if distributed.is_main():
        prepare_index(args, index)
    examples = TaskData(sequences[:, :-1], sequences[:, -1], index.size)

    config = ModelConfig(n_items=index.size, task_classes=[index.size], channels=args.channels,
                         use_masks=args.method == "teracon")
    model = NextItNet(config).to(device)
    if args.compile:
        compile_backbone(model)
    optimizer = adam(model.parameters(), args.lr)
    stage_sequences = Staging(sequences, device)
    batches_per_epoch = train_rows.size / args.batch

    def train_epoch(epoch: int) -> dict:
        model.train()
        stats = {"loss": 0.0, "retention": 0.0, "skipped": 0, "finite_steps": 0}
        shards = distributed.batches(train_rows.size, args.batch, rng)  # (this rank's rows, its share)
        for b, (rows, weight, _) in enumerate(tqdm(shards, desc=f"task 1 epoch {epoch}", leave=False, disable=None)):
            s = anneal(b, batches_per_epoch, args.smax)
            sequence = stage_sequences(train_rows[rows])                             # [B, L]
            with autocast(device, args.amp):
                loss = task1_loss(model, sequence, s, args.L2, args.ce_chunk)
            account(stats, loss, optimizer_step(model, optimizer, loss, clamp=True, weight=weight))
        stats["loss"] /= max(stats["finite_steps"], 1)
        return stats

    def on_best(epoch: int, valid: dict) -> None:
        test = score(model, 0, examples, test_rows, record["kind"], args.smax, args.eval_batch, device, args.top_k)
        print("  test at best validation: " + " ".join(f"{k}={v:.4f}" for k, v in test.items()))
        atomic_torch_save(checkpoint_dict(args, model, [record], epoch, valid), checkpoint_path)

    fit(args, train_epoch,
        lambda: score(model, 0, examples, valid_rows, record["kind"], args.smax, args.eval_batch, device, args.top_k),
        on_best, Resume(args, model, optimizer, rng, {}))
    return finish(args, model, checkpoint_path, index, device, {1: examples})


def load_previous(args: argparse.Namespace) -> tuple[dict, ItemIndex]:
    """The stage-(K−1) checkpoint and the index, checked against each other and this script."""
    checkpoint = load_checkpoint(args.paths)
    previous = checkpoint.get("stage")
    if previous != args.stage - 1:
        maker = "train_task1.py" if args.stage == 2 else f"train_teracon_t{args.stage - 1}.py"
        raise DataError(f"{args.paths}: is stage {previous}'s checkpoint; stage {args.stage} needs task "
                        f"{args.stage - 1}'s checkpoint, made by {maker}")
    index = read_index(args.datapath_index)
    n_items = checkpoint["model_config"]["n_items"]
    if index.size != n_items:
        raise DataError(f"{args.datapath_index}: index has {index.size} items but {args.paths} was trained on "
                        f"{n_items} (made from other data)")
    return checkpoint, index


def fill_datapath(args: argparse.Namespace, number: int, record: dict) -> dict:
    """An earlier task's record; one converted from the authors' code gets its data path from --dataset."""
    if record["datapath"] is None and args.dataset:
        record = {**record, "datapath": preset_paths(args.dataset, number)["datapath"],
                  "name": task_name(args.dataset, number)}
    return record


def authors_fresh(args: argparse.Namespace, checkpoint: dict, index: ItemIndex, n_classes: int) -> dict:
    """--streams authors: the new stage's fresh parameters as the authors' constructor draws them (replay.py)."""
    config, revised = checkpoint["model_config"], args.variant == "revised"
    if index.offset != (0 if revised else 1):
        raise DataError(f"{args.datapath_index}: --variant {args.variant} --streams authors replays the "
                        f"{args.variant} code, whose index {'has no' if revised else 'starts with'} <UNK>: give "
                        f"that code's index.csv and checkpoint")
    shape = (config["channels"], config["kernel_size"], len(config["dilations"]))
    if revised:
        return revised_fresh(config["n_items"], config["task_classes"] + [n_classes], *shape)
    spare_rows = checkpoint.get("spare_task_rows")
    if spare_rows is None or len(spare_rows) == 0:
        raise DataError(f"{args.paths}: has no spare task-embedding rows of the original's stage 1; --streams "
                        "authors starts from a checkpoint of the authors' code or one written under it")
    return {**original_fresh(config["n_items"], n_classes, args.stage, *shape), "row": spare_rows[0]}


def run_continual(args: argparse.Namespace) -> dict:
    """Stage K ≥ 2: CE(task K) + α · Σ_j c_j · MSE(student_j, teacher_j) (Eqs. 14–18)."""
    device = resolve_device(args.device, args.gpu_num)
    rng = set_seed(training_seed(args))
    checkpoint_path = guard_outputs(args)
    checkpoint, index = load_previous(args)
    args.channels = checkpoint["model_config"]["channels"]  # the model's shape comes from the checkpoint
    blocks = len(checkpoint["model_config"]["dilations"])
    if args.own_blocks > blocks:
        raise DataError(f"{args.paths}: --own_blocks {args.own_blocks} is more than the model's {blocks} "
                        "residual blocks")
    print("arguments: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())), flush=True)
    data = load_task(args.datapath, index)
    streams = AuthorsStreams(args.variant) if args.streams == "authors" else None
    spare_rows = checkpoint.get("spare_task_rows")
    if streams:  # before anything else draws from torch, as the authors' constructor right after seeding
        fresh = authors_fresh(args, checkpoint, index, data.n_classes)
    parts = (streams.split(len(data.targets), args.split_percentage) if streams
             else split_indices(len(data.targets), args.seed, args.split_percentage))
    check_split(args.datapath, len(data.targets), parts, args.split_percentage)
    train_rows, valid_rows, test_rows = parts
    record = task_record(args, data.n_classes)
    kinds = [entry["kind"] for entry in checkpoint["tasks"]] + [record["kind"]]
    classes = checkpoint["model_config"]["task_classes"] + [data.n_classes]
    for number, (kind, n_classes) in enumerate(zip(kinds, classes), 1):
        flags.check_top_k(args.top_k, kind, n_classes, f"task {number}")  # every task is scored at --top_k
    print(f"task {args.stage}: {len(data.targets)} examples, {data.n_classes} classes ({record['kind']}), "
          f"train/valid/test {train_rows.size}/{valid_rows.size}/{test_rows.size}")

    teacher = frozen_model(checkpoint, device)  # ONE frozen teacher for every earlier task
    expert = load_expert(args, record, checkpoint["model_config"]["n_items"], device)
    model = NextItNet.from_checkpoint(checkpoint)
    if args.method == "finetune":
        model.config.use_masks = False
    model.add_task(data.n_classes, relation=not args.no_relation and args.method == "teracon",
                   carry_relation=RETENTION_RULES[args.retention].carry_relation,
                   carry_plain=RETENTION_RULES[args.retention].carry_plain, own_blocks=args.own_blocks)
    if streams:
        apply_fresh(model, fresh)
        spare_rows = spare_rows[1:] if spare_rows is not None else None
    model = model.to(device)
    if args.compile:
        for compiled in [m for m in (model, teacher, expert) if m is not None]:  # the expert too, when given
            compile_backbone(compiled)
    task = args.stage - 1
    optimizer = (torch.optim.Adam(model.parameters(), lr=args.lr, foreach=False) if streams  # the authors' loop
                 else adam(model.parameters(), args.lr))
    stage_sources = Staging(data.sources, device)
    stage_targets = Staging(data.targets, device)
    batches_per_epoch = train_rows.size / args.batch
    state = {"ratios": [INITIAL_RATIO] * task}  # sampling ratios carried from batch to batch
    retention, options = retention_settings(args), step_options(args)
    tasks = [fill_datapath(args, number, earlier) for number, earlier in enumerate(checkpoint["tasks"], 1)] + [record]

    def train_epoch(epoch: int) -> dict:
        model.train()
        stats = {"loss": 0.0, "retention": 0.0, "skipped": 0, "finite_steps": 0}
        shards = ([(rows, 1.0, rows.size) for rows in streams.epoch_batches(train_rows.size, args.batch)] if streams
                  else distributed.batches(train_rows.size, args.batch, rng))  # (this rank's rows, its share)
        for b, (rows, weight, size) in enumerate(tqdm(shards, desc=f"task {args.stage} epoch {epoch}", leave=False,
                                                      disable=None)):
            s = anneal(b, batches_per_epoch, args.smax)
            chosen = train_rows[rows]
            x = stage_sources(data.rows(chosen))                       # [B, L]
            y = stage_targets(chosen)                                  # [B]
            shard = Shard(size, distributed.rank(), distributed.world_size())
            loss, kept, state["ratios"], stepped = continual_step(model, teacher, optimizer, x, y, task, s,
                                                                  state["ratios"], streams or rng, retention,
                                                                  options, shard, expert)
            stats["retention"] += float(kept)
            account(stats, loss, stepped)
        stats["loss"] /= max(stats["finite_steps"], 1)
        stats["retention"] /= max(stats["finite_steps"] + stats["skipped"], 1)
        return stats

    def scored(rows: np.ndarray) -> np.ndarray:
        """Every row; under --streams authors the authors' draw of full batches of --batch."""
        return streams.scored_rows(rows, args.batch) if streams else rows

    def on_best(epoch: int, valid: dict) -> None:
        test = score(model, task, data, scored(test_rows), record["kind"], args.smax, args.eval_batch, device,
                     args.top_k)
        print("  test at best validation: " + " ".join(f"{k}={v:.4f}" for k, v in test.items()))
        atomic_torch_save(checkpoint_dict(args, model, tasks, epoch, valid, spare_rows if streams else None),
                          checkpoint_path)

    fit(args, train_epoch,
        lambda: score(model, task, data, scored(valid_rows), record["kind"], args.smax, args.eval_batch, device,
                      args.top_k),
        on_best, Resume(args, model, optimizer, rng, state))
    return finish(args, model, checkpoint_path, index, device, {args.stage: data})


def main(stage: int | None = None, argv: list[str] | None = None) -> dict:
    args = parse_args(stage, argv)
    flags.require_files(args, ["datapath"] if args.stage == 1 else ["datapath", "datapath_index", "paths", "expert"],
                        {"datapath_index": " (train_task1.py writes it)"})
    keep_freed_memory()
    with distributed.session(args):  # torchrun: join the process group (a no-op in a single process)
        return run_task1(args) if args.stage == 1 else run_continual(args)
