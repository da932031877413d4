"""TERACON (Kim et al., KDD 2023, arXiv 2306.01792; equation numbers are the paper's), as a method of the loop.

The masks (Eqs. 11–13) are in model.NextItNet.task_masks and the annealing of s (Eq. 19) is the loop's; this
file holds the rest: the task-1 loss with its mask regulariser, the stage-K loss (Eqs. 14–18) with its
sampling ratio (Eq. 15), retention rows and terms (Eq. 16), when the task embeddings are clamped, and the new
task's own parameters (--own_lr's optimiser group).

Its options are orthogonal: each changes one thing, and `paper` (every option at the authors' value) is the
default. `--preset` names the combinations a reader needs (PRESETS); explicit flags win over a preset.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from continual import flags
from continual.methods.checkpoints import load_checkpoint, require_finished
from continual.methods.base import (DISTANCE_BUFFERS, Method, Rows, Stage, Step, chunk_rows, distillation_kl,
                                    head_distance, next_item_loss, retention_inputs, tensor_bytes)
from model import NextItNet
from utils import DataError

INITIAL_RATIO = 0.9     # every earlier task's sampling ratio before the first batch (authors' code)


# --preset: what each combination sets (explicit flags win). The paper's rule, its three ablations (Sec. 5.4),
# and the rule this suite recommends (README, "Retention rules"): B // (K−1) rows of each earlier task at smax
# (one batch of retention rows in all; every row ties it at 3× the step, issue 31), KL terms weighted by
# ratio_j / mean_k ratio_k, α = 2, the new task's cross-entropy at smax, distillation of the new task from
# fine-tuning's model of the same stage (--expert, which compare.py runs first), the new task's own copies of the
# top two blocks, and Adam at 1e-3 for the new task's own parameters (--own_lr: a no-op at a stage run at lr 1e-3,
# as the benchmark's and the demo's; at the paper's lr 1e-4 from stage 3 it is what lets the new task learn,
# issue 30).
PRESETS: dict[str, dict] = {
    "paper": {},
    "no_relation": {"no_relation": True},
    "no_retention": {"alpha": 0.0},
    "uniform_sampling": {"uniform_sampling": True},
    "recommended": {"rows": "share", "weights": "mean", "retention_at": "smax", "distance": "kl", "alpha": 2.0,
                    "new_task_at": "smax", "own_blocks": 2, "own_lr": 1e-3},
}
EXPERT_PRESETS = {"recommended"}  # presets that distil from the fine-tuning chain's checkpoint (--expert)

# --variant: the options in which the authors' two codes differ (README, "Faithfulness" has the file and lines of
# both); the loop's flags that differ (seed, select_on, ties) are in continual/datasets.py. A flag given wins.
VARIANT_DEFAULTS: dict[str, dict] = {
    "revised": {"L2": 0.0, "ratio_weights": "previous", "nested_samples": False, "embedding_clamp": "on"},
    "original": {"L2": 0.75, "ratio_weights": "current", "nested_samples": True, "embedding_clamp": "off"},
}
option = flags.option


@dataclass(frozen=True)
class TeraconOptions:
    """TERACON's options, each with its flag (README, "Retention rules"); the defaults are the paper's rule,
    `--preset paper`, and the options marked rule=True make the retention rule (is_paper_rule)."""
    preset: str = option("paper", "a named combination of the options below (explicit flags win): paper (the authors' "
                         "rule), its ablations no_relation, no_retention, uniform_sampling, and recommended (README, "
                         "Retention rules; needs --expert)", choices=list(PRESETS), default="paper",
                         recorded=True, stages="later")
    alpha: float = option(0.7, "weight of the knowledge-retention loss (Eq. 18; default 0.7); 0 = no retention",
                          type=flags.nonnegative_float, stages="later")
    no_relation: bool = option(False, "ablation: plain σ(s·e) masks for every task (Eq. 11 only)",
                               action="store_const", const=True, rule=True, stages="later")
    uniform_sampling: bool = option(False, "ablation: fixed sampling ratio 0.9 (no Eq. 15)", action="store_const",
                                    const=True, stages="later")
    rows: str = option("sampled", "retention rows of earlier task j: sampled = int(B · ratio_j) (the paper's), all = "
                       "every row, share = B // (K-1) rows of each of the K-1 earlier tasks (one batch of retention "
                       "rows in all)", choices=["sampled", "all", "share"], rule=True, stages="later")
    weights: str = option("sum", "retention weights c_j = ratio_j / Σ_k ratio_k (sum, the paper's) or ratio_j / "
                          "mean_k ratio_k (mean: near 1 for each earlier task however many there are)",
                          choices=["sum", "mean"], rule=True, stages="later")
    retention_at: str = option("annealed", "the teacher's pseudo-labels and the student's outputs at the annealed s "
                               "(the paper's) or at smax", choices=["annealed", "smax"], rule=True, stages="later")
    distance: str = option("mse", "retention term: mse of the logits (the paper's, Eq. 16) or kl = "
                           "KL(softmax(teacher) ‖ softmax(student))", choices=["mse", "kl"], rule=True, stages="later")
    own_blocks: int = option(0, "stages >= 2: the new task reads its own copies of the top K residual blocks, copied "
                             "from the shared ones at the start of the stage and trained only by its own terms (not in "
                             "the paper); 0 = all shared", type=flags.nonnegative_int, rule=True, stages="later")
    expert: str | None = option(None, "stages >= 2: a checkpoint of this stage trained on the same task and split "
                                "without retention (e.g. the fine-tuning chain's); the new task is also distilled from "
                                "it, β · KL(expert ‖ model) at smax", type=flags.input_file, stages="later")
    expert_weight: float = option(1.0, "β of --expert (default 1)", type=flags.nonnegative_float, stages="later")
    L2: float = option(0.0, "task 1: weight of the mean-mask regulariser (original 0.75, revised 0)",
                       type=flags.nonnegative_float, stages="first")
    embedding_clamp: str = option("on", "stages ≥ 2: clamp task embeddings to [-6, 6] after each step (revised: on; "
                                  "the original t2–t6 scripts' clamp never fires: off)", type=flags.on_off,
                                  choices=["on", "off"], nargs="?", const="on",
                                  aliases=[("--no_embedding_clamp", {"action": "store_const", "const": "off",
                                                                     "help": "the same as --embedding_clamp off"})],
                                  stages="later")
    nested_samples: bool = option(False, "on: earlier tasks' retention rows are prefixes of one shuffle (original); "
                                  "off: a shuffle each (revised)", type=flags.on_off_bool, nargs="?", const=True,
                                  stages="later")
    ratio_weights: str = option("previous", "retention weights c_j from the previous batch's ratios (revised) or this "
                                "batch's (original)", choices=["previous", "current"], stages="later")
    new_task_at: str = option("annealed", "stages >= 2: the new task's cross-entropy at the annealed s (the paper's) "
                              "or at smax, where it is scored (the sampling ratios stay at the annealed s)",
                              choices=["annealed", "smax"], rule=True, stages="later")
    own_lr: float | None = option(None, "stages >= 2: Adam's learning rate for the new task's own parameters (its "
                                  "head, task-embedding row, relation layer and --own_blocks), a parameter group of "
                                  "their own; default the stage's --lr", type=flags.positive_float, rule=True,
                                  stages="later")
    frozen_cache_mib: int = option(1024, "stages >= 2: MiB of memory (on the device) for the frozen teacher's and "
                                   "expert's outputs at s = smax, kept per training row from the first use on instead "
                                   "of recomputed every epoch (the same values: speed only); the cheapest tasks' "
                                   "outputs first, a task that does not fit is recomputed; 0 = keep nothing "
                                   "(default 1024)", type=flags.nonnegative_int, stages="later")

    def __post_init__(self) -> None:
        flags.check_choices(self)

    @property
    def is_paper_rule(self) -> bool:
        """Every option of the retention rule (rule=True) at the authors' value (what --streams authors replays)."""
        return all(getattr(self, declared.name) == declared.default for declared in fields(self)
                   if declared.metadata.get("rule"))


# Format-1 checkpoints' --retention rules (before RunConfig) as these options: (rows, weights, retention_at,
# distance, carry_masks); docs/retention.md names the commit at which they last ran.
LEGACY_RULES: dict[str, tuple[str, str, str, str, str]] = {
    "paper": ("sampled", "sum", "annealed", "mse", "off"),
    "all_rows": ("all", "sum", "annealed", "mse", "off"),
    "per_task": ("all", "mean", "annealed", "mse", "off"),
    "per_task_smax": ("all", "mean", "smax", "mse", "off"),
    "per_task_smax_kl": ("all", "mean", "smax", "kl", "off"),
    "sum_smax_kl": ("all", "sum", "smax", "kl", "off"),
    "per_task_smax_kl_carry": ("all", "mean", "smax", "kl", "relation"),
    "per_task_smax_kl_carry_plain": ("all", "mean", "smax", "kl", "all"),
}
# Options retired on 2026-12-07 (their studies ended negative; docs/retention.md keeps the results and the commit
# at which to rerun them): a checkpoint's run config still records them, config.run_config_from_dict leaves them out.
RETIRED_OPTIONS = ("carry_masks", "mask_capacity", "retention_ramp")


class Teracon(Method):
    """TERACON: relation-aware task masks, and retention of every earlier task from ONE frozen copy of the
    stage-(K−1) model that pseudo-labels the batch's users for each of them (Eqs. 14–18)."""
    name = "teracon"
    Options = TeraconOptions
    presets = PRESETS
    variant_defaults = VARIANT_DEFAULTS
    retired = {f"--{name}": "retired on 2026-12-07 (docs/retention.md, Retired options: its results, and `git "
               "checkout 01ce4a5` to rerun it)" for name in RETIRED_OPTIONS}

    @classmethod
    def check(cls, options: TeraconOptions, run, fail: Callable[[str], None]) -> None:
        if options.expert and not os.path.isfile(options.expert):
            raise DataError(f"--expert: {options.expert}: file not found")
        if options.preset in EXPERT_PRESETS and not options.expert and run.stage > 1:
            fail(f"--preset {options.preset} distils the new task from fine-tuning's checkpoint of this stage: give "
                 "--expert CKPT (compare.py runs the fine-tuning chain first)")

    @classmethod
    def chains_needed(cls, preset: str | None) -> dict[str, str]:
        return {"--expert": "finetune"} if preset in EXPERT_PRESETS else {}

    @classmethod
    def replay_refusal(cls, options: TeraconOptions) -> str | None:
        reasons = [reason for refused, reason in ((options.expert is not None, "--expert"), (
            not options.is_paper_rule, "an ablation or an option beyond the paper's rule")) if refused]
        return ", ".join(reasons) or None

    @classmethod
    def legacy_options(cls, args: dict) -> dict:
        """A format-1 checkpoint's --retention rule and TERACON flags (its parsed command line) as these options."""
        rule = args.get("retention", "paper")
        rows, weights, retention_at, distance, carry = LEGACY_RULES.get(rule, LEGACY_RULES["paper"])
        names = [declared.name for declared in fields(TeraconOptions) if declared.name != "preset"]
        copied = {name: args[name] for name in [*names, *RETIRED_OPTIONS] if name in args}
        return {"preset": f"legacy --retention {rule}", "rows": rows, "weights": weights, "retention_at": retention_at,
                "distance": distance, "carry_masks": carry, **copied}

    # ------------------------------------------------------------------ hooks

    def begin_stage(self, stage: Stage) -> None:
        super().begin_stage(stage)
        self.ratios = [INITIAL_RATIO] * stage.task       # sampling ratios carried from batch to batch
        self.teacher, self.expert = stage.previous, None
        self.kept: dict[str, FrozenOutputs] | None = None   # planned at the first step (bench.py sets its expert late)
        if stage.number == 1:
            return
        blocks = len(stage.previous_checkpoint["model_config"]["dilations"])
        if self.options.own_blocks > blocks:
            raise DataError(f"{stage.run.paths}: --own_blocks {self.options.own_blocks} is more than the model's "
                            f"{blocks} residual blocks")
        if self.options.expert:
            self.expert = load_expert(self.options.expert, stage)

    def model_config(self) -> dict:
        return {"use_masks": True}

    def grow(self, model: NextItNet, n_classes: int) -> None:
        model.add_task(n_classes, relation=not self.options.no_relation, own_blocks=self.options.own_blocks)

    def terms(self, model: NextItNet, step: Step) -> Iterator[torch.Tensor]:
        if self.stage.number == 1:
            masks = model.task_masks(0, step.s)                            # [n_layers, C], Eq. 11
            yield (next_item_loss(model, step.x, masks, self.run.ce_chunk, self.run.negatives)
                   + self.options.L2 * masks.mean())
            return
        yield from self.stage_terms(model, step)

    def stage_terms(self, model: NextItNet, step: Step) -> Iterator[torch.Tensor]:
        """Stage K's loss (Eqs. 14–18) one term at a time: CE(task K) (+ β · KL(softmax(expert_K) ‖
        softmax(student_K)) over the batch at s = smax when an --expert of task K is given: the new task distilled
        from a model trained on it without retention, as Progress & Compress, Schwarz et al. 2018), then
        α · c_j · MSE_j (or KL_j) for each earlier task j.

        For every earlier task j the rows of `retention_plan` are pseudo-labelled by the ONE frozen teacher
        under its task-j mask; the student's head j under its own task-j mask is pulled towards them. The rows
        are drawn from the global batch (step.shard) by the stage's sampler; a rank's term is scaled so that
        the ranks' weighted sum is the one-process term. self.ratios holds the previous batch's ratios and
        becomes this batch's (Eq. 15, from this batch's masks, as the revised code)."""
        options, smax, shard, teacher, task = self.options, self.run.smax, step.shard, self.teacher, self.stage.task
        x, y, s, ratios = step.x, step.y, step.s, self.ratios
        task_masks = model.task_masks(task, s)                              # [n_layers, C]
        s_new = smax if options.new_task_at == "smax" else s
        new_masks = task_masks if s_new == s else model.task_masks(task, s_new)
        new_logits = model(x, task, s_new, masks=new_masks)[0].float()       # [B, n_classes of task K]
        new_task = F.cross_entropy(new_logits, y)
        if self.expert is not None and options.expert_weight > 0:
            everything = np.arange(x.shape[0])
            expert_logits = self.frozen_outputs("expert", step, everything,      # [B, n_classes of task K]
                                                lambda rows: self.expert(x[rows], task, smax)[0].float())
            at_smax = new_logits if s_new == smax else model(x, task, smax)[0].float()  # one pass when both at smax
            new_task = new_task + options.expert_weight * distillation_kl(at_smax, expert_logits)
        yield new_task
        if options.alpha <= 0 or task == 0:
            return
        with torch.no_grad():
            teacher_masks = [teacher.task_masks(j, s) for j in range(task)]  # task × [n_layers, C]
        fresh = [ratios[j] if options.uniform_sampling else sampling_ratio(teacher_masks[j], task_masks)
                 for j in range(task)]
        self.ratios = fresh
        plan = retention_plan(options, ratios, shard.size, fresh if options.ratio_weights == "current" else None)
        drawn = self.stage.sampler.retention_rows([count for count, _ in plan], shard.size, options.nested_samples)
        if options.retention_at == "smax" and s != smax:
            s = smax                                                        # retention where the model is scored
            with torch.no_grad():
                teacher_masks = [teacher.task_masks(j, s) for j in range(task)]
        for j, ((count, weight), positions) in enumerate(zip(plan, drawn)):
            batch_rows = shard.local(positions)                             # [n] positions in this rank's x
            local = torch.from_numpy(batch_rows).to(x.device)
            if not local.numel():                                           # an empty sample contributes nothing
                continue
            x_j = retention_inputs(x, local, j)
            scale = local.numel() / count / shard.share                     # 1 in a single process
            chunk = chunk_rows(local.numel(), model.heads[j].out_features, self.run.ce_chunk, *DISTANCE_BUFFERS)
            if chunk and not self.keeps(f"task{j + 1}", step):               # TTL's task 1: no [n, classes] outputs
                with torch.no_grad():
                    teacher_hidden = teacher.hidden(x_j, teacher_masks[j], True, j)             # [n, C]
                student_hidden = model.hidden(x_j, model.task_masks(j, s), True, j)              # [n, C]
                yield options.alpha * scale * weight * head_distance(
                    student_hidden, model.heads[j], teacher_hidden, teacher.heads[j], options.distance, chunk)
                continue
            pseudo = self.frozen_outputs(f"task{j + 1}", step, batch_rows, lambda rows, j=j: teacher(  # [n, classes_j]
                retention_inputs(x, rows, j), j, s, masks=teacher_masks[j])[0].float())
            yield options.alpha * scale * retention_term(model(x_j, j, s)[0].float(), pseudo, weight, options.distance)

    def keeps(self, key: str, step: Step) -> bool:
        """Whether --frozen_cache_mib keeps the outputs `key` ("taskJ", "expert") for this step's rows."""
        if self.kept is None:
            self.kept = self.plan_kept(step.x.device)
        return step.ids is not None and key in self.kept

    def frozen_outputs(self, key: str, step: Step, positions: np.ndarray,
                       compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """A frozen model's outputs at smax for the batch rows `positions` [n]: `compute(rows)` (rows: a tensor of
        positions in step.x) without gradients, or, where --frozen_cache_mib keeps `key` ("taskJ": the teacher
        under earlier task J, 1-based; "expert"), what it computed for these training rows before
        (FrozenOutputs.read)."""
        kept = self.kept[key] if self.keeps(key, step) else None
        with torch.no_grad():
            if kept is None:
                return compute(torch.from_numpy(positions).to(step.x.device))
            return kept.read(step.ids, positions, compute)

    def plan_kept(self, device: torch.device) -> dict[str, FrozenOutputs]:
        """The outputs kept this stage: the teacher's of every earlier task when retention runs at smax, the
        expert's when there is one, within --frozen_cache_mib (plan_frozen_outputs)."""
        options, stage = self.options, self.stage
        classes = {}
        if options.retention_at == "smax" and options.alpha > 0:
            classes = {f"task{j}": n for j, n in enumerate(stage.previous.config.task_classes, 1)}
        if self.expert is not None and options.expert_weight > 0:
            classes["expert"] = self.expert.config.task_classes[stage.task]
        chosen = plan_frozen_outputs(stage.n_train, classes, options.frozen_cache_mib)
        return {key: FrozenOutputs(stage.n_train, classes[key], device) for key in chosen}

    def param_groups(self, model: NextItNet, lr: float) -> list[dict]:
        """--own_lr at a stage ≥ 2 where it differs from --lr: the new task's own parameters (own_parameters) in a
        group of their own at own_lr, the rest at lr; equal to it (the benchmark's, the demo's), the one default
        group, so the step is bit for bit the plain one."""
        own_lr = self.options.own_lr
        if self.stage.number == 1 or own_lr in (None, lr):
            return super().param_groups(model, lr)
        own = own_parameters(model, self.stage.task)
        own_ids = {id(parameter) for parameter in own if isinstance(parameter, torch.nn.Parameter)}
        return [{"params": [p for p in model.parameters() if id(p) not in own_ids], "lr": lr},
                {"params": own, "lr": own_lr}]

    def after_step(self, model: NextItNet) -> None:
        if self.stage.number == 1 or self.options.embedding_clamp == "on":
            model.clamp_task_embedding()              # every row (the revised code; stage 1 too)

    def held_bytes(self) -> dict[str, int]:
        held = super().held_bytes()
        if self.expert is not None:
            held["expert"] = tensor_bytes(self.expert)
        if self.kept:
            held["kept outputs"] = sum(kept.table.numel() * 4 for kept in self.kept.values())
        return held

    def state_dict(self) -> dict:
        return {"ratios": list(self.ratios)}

    def load_state_dict(self, state: dict) -> None:
        self.ratios = list(state["ratios"])


class FrozenOutputs:
    """One frozen model's outputs at s = smax for each of a stage's training rows, filled on first use.

    The frozen teacher and expert never change within a stage, and at smax neither do their masks, so a row's
    outputs are the same every epoch (up to the rounding of the batch it was computed in)."""

    def __init__(self, n_rows: int, n_classes: int, device: torch.device):
        self.table = torch.zeros(n_rows, n_classes, device=device)             # [n_train, n_classes], written now:
                                                                               # its memory counts from the first step
        self.filled = np.zeros(n_rows, dtype=bool)                             # host-side: no device sync per read

    def read(self, batch_ids: np.ndarray, positions: np.ndarray,
             compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The outputs of the batch rows at `positions` [n] → [n, n_classes], for a batch whose rows are the
        training rows `batch_ids` [B]. Every row of the batch not kept yet is computed, `compute(its batch
        positions)`, and kept: with a sample of rows per step (--rows share) the first epoch fills the table."""
        device = self.table.device
        missing = np.flatnonzero(~self.filled[batch_ids])                    # batch positions not kept yet
        if missing.size:
            self.table[torch.from_numpy(batch_ids[missing]).to(device)] = compute(torch.from_numpy(missing).to(device))
            self.filled[batch_ids[missing]] = True
        return self.table[torch.from_numpy(batch_ids[positions]).to(device)]


def plan_frozen_outputs(n_rows: int, classes: dict[str, int], budget_mib: int) -> list[str]:
    """Which outputs to keep: the keys of `classes` (key → output width) in order of size, smallest first, while
    their float32 tables of n_rows rows fit in `budget_mib` MiB together. At TTL scale task 1's table (645,974
    items × the users) never fits and is recomputed; the classification tasks' fit."""
    chosen, used = [], 0
    for key, width in sorted(classes.items(), key=lambda item: item[1]):
        size = n_rows * width * 4
        if n_rows and used + size <= budget_mib * 2**20:
            chosen.append(key)
            used += size
    return chosen


def sampling_ratio(teacher_masks: torch.Tensor, task_masks: torch.Tensor) -> float:
    """Eq. 15: ratio_j = 1 − mean over masked layers of σ(6 · cos(m̃_j, m_t)).

    teacher_masks, task_masks: [n_layers, C] (earlier task j's mask under the teacher, current task's mask).
    """
    cosine = F.cosine_similarity(teacher_masks.detach(), task_masks.detach(), dim=1, eps=1e-6)  # [n_layers]
    return float(1.0 - torch.sigmoid(6.0 * cosine).mean())


def retention_term(student: torch.Tensor, teacher: torch.Tensor, weight: float, distance: str = "mse") -> torch.Tensor:
    """One earlier task's share of Eq. 16: c_j · MSE(student_j, teacher_j); with distance "kl", c_j · the mean
    over rows of KL(softmax(teacher_j) ‖ softmax(student_j)), which ignores the logits' common shift and weighs
    each class by the teacher's probability of it (student, teacher: [n, n_classes] logits)."""
    if distance == "kl":
        return weight * distillation_kl(student, teacher)
    return weight * F.mse_loss(student, teacher)


def retention_plan(options: TeraconOptions, ratios: list[float], size: int,
                   weight_ratios: list[float] | None = None) -> list[tuple[int, float]]:
    """(rows to pseudo-label, loss weight c_j) of every earlier task j for a global batch of `size` rows.

    Row counts follow `ratios` (options.rows "sampled": int(size · ratio_j)), or are size ("all") or
    max(1, size // (K−1)) ("share": each earlier task its own draw of an equal share); the weights follow
    `weight_ratios` (default: the same ratios), divided by their sum (options.weights "sum") or mean ("mean")."""
    weight_ratios = ratios if weight_ratios is None else weight_ratios
    total = sum(weight_ratios)
    if total <= 0:
        return [(0, 0.0) for _ in ratios]
    if options.rows == "all":
        counts = [size] * len(ratios)
    elif options.rows == "share":
        counts = [max(1, size // len(ratios))] * len(ratios)
    else:
        counts = [int(size * ratio) for ratio in ratios]
    scale = len(ratios) if options.weights == "mean" else 1
    return [(count, scale * ratio / total) for count, ratio in zip(counts, weight_ratios)]


def own_parameters(model: NextItNet, task: int) -> list[torch.nn.Parameter | Rows]:
    """The new task's own parameters, which nothing else reads: its head, its own top blocks (--own_blocks), and its
    rows of the shared tables: the task embedding and the relation layer (Eq. 13)."""
    own: list[torch.nn.Parameter | Rows] = [*model.heads[task].parameters()]
    if str(task) in model.task_blocks:
        own += [*model.task_blocks[str(task)].parameters()]
    tables = [model.task_embedding] + ([model.relation_weight, model.relation_bias] if model.config.relation else [])
    return own + [Rows(table, task) for table in tables]


def load_expert(path: str, stage: Stage) -> NextItNet:
    """--expert: a frozen model of this stage trained on the same task and split (so its soft labels carry no
    test user's label); one line naming the file otherwise."""
    checkpoint = load_checkpoint(path, "--expert")
    require_finished(checkpoint, path, "--expert")
    task = checkpoint["tasks"][-1] if checkpoint.get("tasks") else {}
    theirs = (checkpoint.get("stage"), task.get("name"), task.get("n_classes"), task.get("seed"),
              task.get("split_percentage"), checkpoint["model_config"]["n_items"])
    record, run = stage.record, stage.run
    items = stage.index.size if stage.index is not None else stage.previous_checkpoint["model_config"]["n_items"]
    ours = (stage.number, record["name"], record["n_classes"], run.seed, run.split_percentage, items)  # items: grown
    if theirs != ours:
        raise DataError(f"{path}: --expert must be a stage-{stage.number} checkpoint of this task on the same "
                        f"split (stage, task, classes, seed, split_percentage, items: {theirs}; here: {ours})")
    expert = stage.frozen(checkpoint)
    for task in range(len(expert.heads)):                 # only the new task's head is read (at TTL's size the
        if task != stage.task:                            # task-1 head is 0.66 GB)
            expert.heads[task] = torch.nn.Identity()
    return expert
