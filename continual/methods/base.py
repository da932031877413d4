"""The interface every continual-learning method implements, and what the loop hands it.

The loop (continual/training/loop.py) owns the step: batching, the annealing of s, AMP, torchrun, the skip
of non-finite steps, resume, checkpoints and evaluation. A method is one file in this folder with one
registry line in methods/__init__.py; it says only where it differs from the others, through the hooks
of `Method`, which the loop calls in this order:

    add_arguments (its flags, parse time) → options_from / check
    begin_stage(stage)          before the stage's model is built (frozen models it needs, earlier state)
    model_config() / grow(...)  stage 1: the new model's ModelConfig fields; stage ≥ 2: add the new task
    param_groups(model, lr)     the optimiser's parameter groups (the loop builds Adam from them; each phase)
    terms(model, step)          every step: the loss terms, one at a time (each back-propagated at once)
    after_backward(model)       every step, after the last term's backward (e.g. HAT's compensation)
    after_step(model)           every step, after the optimiser step, skipped or not (TERACON's clamp)
    begin_phase(model, phase)   methods with `phases` > 1: before each later phase, on the best model so far;
                                the loop then trains again with a fresh optimiser and early stopping (CONURE
                                prunes, then retrains what it kept)
    end_stage(model, stage)     once, on the stage's best model (e.g. EWC's Fisher)
    state_dict / load_state_dict  what it keeps in the checkpoint and the resume file

Under --protocol time the loop has grown the model's item rows (model.add_items) before `grow`, and the frozen
previous model reads them through copies of the student's. The rows created at stage K train by stage K's own terms
under every method; a method whose item embedding is frozen opens only them (`open_new_item_rows` in `grow`,
`keep_earlier_item_rows` in `after_backward`), so they freeze from stage K + 1 on as its earlier rows did.

docs/adding_a_method.md shows a worked example.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from continual import flags
from continual.distributed import Shard
from model import NextItNet
from utils import DataError

if TYPE_CHECKING:
    from continual.run_config import RunConfig
    from data_loader import ItemIndex, TaskData


@dataclass(frozen=True)
class Rows:
    """Row `index` of `parameter` (a table with a row per task, e.g. the task embeddings) named in a parameter group
    of its own, so that it steps at that group's learning rate while the table's other rows step at theirs."""
    parameter: torch.nn.Parameter
    index: int


@dataclass(frozen=True)
class Step:
    """One batch as the loop hands it to `Method.terms`.

    Stage 1: x [B, L] whole task-1 sequences, y None. Stage K ≥ 2: x [B, L] sources, y [B] task-K classes."""
    x: torch.Tensor
    y: torch.Tensor | None
    s: float                       # the annealed scale of the masks (Eq. 19); smax at evaluation
    shard: Shard                   # where this rank's rows sit in the global batch (one process: all of it)
    epoch: float = 0.0             # epochs of this phase done before this batch: epoch index + batch / batches per epoch
    ids: np.ndarray | None = None  # [B] each row's position among the stage's training rows (None: rows unknown)


@dataclass
class Stage:
    """What a method may read about the stage being trained (built by the loop before the model)."""
    number: int                                  # K: the task being learned, 1-based
    run: "RunConfig"
    device: torch.device
    previous: NextItNet | None                   # the frozen stage-(K−1) model (eval, no gradients); None at stage 1
    previous_checkpoint: dict | None             # its checkpoint (model_state, tasks, method, …); None at stage 1
    record: dict                                 # the new task's record (name, datapath, kind, n_classes, seed, …)
    sampler: Any                                 # continual.training.samplers: batches, splits, retention rows
    examples: Callable[[int], tuple["TaskData", np.ndarray]]  # task number → (its data, its training rows)
    frozen: Callable[[dict], NextItNet]          # a checkpoint → its model on the device, frozen (compiled under
                                                 # --compile), as `previous` is built
    n_train: int = 0                             # the new task's training rows (Step.ids lie in 0 .. n_train − 1)
    index: "ItemIndex | None" = None             # the stage's item index (grown under --protocol time); None outside
                                                 # a run

    @property
    def task(self) -> int:
        """The new task's 0-based index (heads[task], task_embedding[task])."""
        return self.number - 1


@dataclass(frozen=True)
class NoOptions:
    """A method without flags of its own."""


class Method:
    """A continual-learning method: the loop's hooks, each a no-op unless the method differs there.

    `grow` and `terms` have no default: every method says how the model grows and what it minimises."""
    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    presets: ClassVar[dict[str, dict]] = {}      # --preset NAME → the options it sets (compare.py runs them by name)
    phases: ClassVar[int] = 1                    # training phases of a stage, each fitted with early stopping
    loop_defaults: ClassVar[dict] = {}           # the loop's flags this method defaults otherwise (HAT: smax 400);
                                                 # explicit flags win
    stage1_defaults: ClassVar[dict] = {}         # the same, for its own stage 1 only (DITTO: lr 0.01)
    variant_defaults: ClassVar[dict[str, dict]] = {}  # --variant NAME → the option defaults where the authors'
                                                 # codes differ
    retired: ClassVar[dict[str, str]] = {}       # a flag the method no longer has → why, said when one is given
    stage1_method: ClassVar[str] = ""            # compare.py: the method whose stage 1 a chain starts from ("" = the
                                                 # default stage 1 that every other chain of the seed shares)
    item_targets: ClassVar[bool] = False         # the method scores a rec task's classes through their items' rows
                                                 # (DITTO): under --protocol time its target items join the index too

    def __init__(self, options: Any, run: "RunConfig"):
        self.options, self.run = options, run

    # ------------------------------------------------------------------ flags

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, stage: int | None = None) -> None:
        """The method's own flags: --NAME for every field of `Options` declared with flags.option (its domain, help and
        default in that one declaration; None where presets fill the defaults, options_from); an option `stage` does
        not read (its `stages`) is accepted but left out of --help (stage None: any stage >= 2)."""
        flags.add_options(parser, cls.Options, unset=bool(cls.presets), stage=stage)

    @classmethod
    def options_from(cls, args: argparse.Namespace) -> Any:
        """The typed options from the parsed flags: explicit flags, else --preset's value (methods with presets),
        else the option's default (--variant's are filled before)."""
        preset, defaults = cls.presets.get(getattr(args, "preset", None), {}), cls.Options()
        values = {}
        for field in fields(cls.Options):
            given = getattr(args, field.name)
            values[field.name] = given if given is not None else preset.get(field.name, getattr(defaults, field.name))
        return cls.Options(**values)

    @classmethod
    def check(cls, options: Any, run: "RunConfig", fail: Callable[[str], None]) -> None:
        """Domains that span several flags, at parse time: `fail(message)` ends the run in one line."""

    @classmethod
    def chains_needed(cls, preset: str | None) -> dict[str, str]:
        """{flag: method}: flags whose value compare.py fills with another chain's checkpoint of the same seed and
        stage (that chain runs first), e.g. TERACON's recommended preset's --expert from fine-tuning's."""
        return {}

    @classmethod
    def replay_refusal(cls, options: Any) -> str | None:
        """Why --streams authors cannot replay the method with these options, or None where it can (only TERACON's
        paper rule)."""
        return f"--method {cls.name}"

    @classmethod
    def legacy_options(cls, args: dict) -> dict:
        """A format-1 checkpoint's parsed command line (before RunConfig) → this method's options, as a dict."""
        return {}

    # ------------------------------------------------------------------ hooks

    def begin_stage(self, stage: Stage) -> None:
        """Before the stage's model is built: load what the method needs (stage.previous is the frozen model). A
        checkpoint whose heads score item rows (ModelConfig.item_heads) is refused by a method that does not."""
        self.stage = stage
        config = (stage.previous_checkpoint or {}).get("model_config") or {}
        if any(config.get("item_heads") or []) and not self.item_targets:
            written_by = (stage.previous_checkpoint.get("run_config") or {}).get("method")
            raise DataError(f"{stage.run.paths}: its heads score item rows (--method {written_by}); --method "
                            f"{self.name} cannot continue it")

    def require_own_chain(self, stage: Stage, fits: bool, where: str) -> None:
        """Refuse in one line a previous checkpoint that another method wrote, or that lacks what this method's own
        model has (`fits`); `where` says where this method's chain starts."""
        written_by = (stage.previous_checkpoint.get("run_config") or {}).get("method")
        if written_by != self.name or not fits:
            raise DataError(f"{stage.run.paths}: is a checkpoint of --method {written_by}; --method {self.name} "
                            f"continues only its own chain{where}")

    def model_config(self) -> dict:
        """Stage 1: the ModelConfig fields this method sets on the new model."""
        return {"use_masks": False}

    def grow(self, model: NextItNet, n_classes: int) -> None:
        """Stage ≥ 2: add the new task (its head, and whatever the method adds) to the reloaded model."""
        raise NotImplementedError(f"{type(self).__name__} does not say how the model grows")

    def param_groups(self, model: NextItNet, lr: float) -> list[dict]:
        """The optimiser's parameter groups, as torch's dicts ("params", "lr"; a group's params may name
        Rows, a row of a table): every parameter at the stage's --lr by default. The loop builds Adam from
        them (--streams authors: its one group)."""
        return [{"params": list(model.parameters()), "lr": lr}]

    def terms(self, model: NextItNet, step: Step) -> Iterator[torch.Tensor]:
        """The step's loss terms, one at a time: first the new task's own loss, then any retention terms.

        Each term must have its own graph: the loop back-propagates it before asking for the next one, so
        only one pass's activations are alive at a time."""
        raise NotImplementedError(f"{type(self).__name__} does not say what it minimises")

    def after_backward(self, model: NextItNet) -> None:
        """After the last term's backward, before the optimiser step (gradient surgery goes here)."""

    def after_step(self, model: NextItNet) -> None:
        """After the optimiser step (also when the step was skipped for a non-finite loss)."""

    def begin_phase(self, model: NextItNet, phase: int) -> None:
        """Before phase `phase` ≥ 1 of a stage, on the best model of the phases before (its method state loaded)."""

    def end_stage(self, model: NextItNet, stage: Stage) -> None:
        """Once, after training, on the stage's best model; the loop then saves the checkpoint again."""

    def held_bytes(self) -> dict[str, int]:
        """Memory the method holds beyond the model it trains and its optimiser, by what it is (resources.json's
        accounting): the frozen previous model by default; a method adds what it allocates (frozen copies, tables)."""
        previous = getattr(getattr(self, "stage", None), "previous", None)
        return {"previous model": tensor_bytes(previous)} if previous is not None else {}

    def state_dict(self) -> dict:
        """What the method keeps in the checkpoint and the resume file (tensors, numbers, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s output (--resume)."""


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def open_new_item_rows(model: NextItNet) -> None:
    """--protocol time, a method that keeps the item embedding frozen: make it trainable when this stage created rows
    (model.add_items), so that they learn (no new rows: it stays frozen). `keep_earlier_item_rows` then holds every
    earlier row where it was."""
    model.item_embedding.weight.requires_grad_(model.config.first_new_item() is not None)


def keep_earlier_item_rows(model: NextItNet) -> None:
    """After the backward pass: zero the gradient of every item row before the first that this stage created
    (ModelConfig.first_new_item), so that Adam (no weight decay) leaves them bit-identical: their moments stay 0 and
    so does their update."""
    first = model.config.first_new_item()
    if first is not None and model.item_embedding.weight.grad is not None:
        model.item_embedding.weight.grad[:first] = 0


# ---------------------------------------------------------------------- losses every method builds on

WIDE_OUTPUT_BYTES = 2**30  # a loss over more float32 head outputs than this is computed in chunks of this size


def chunk_rows(n_rows: int, width: int, ce_chunk: int | None = None, whole_buffers: int = 3,
               chunk_buffers: int = 1) -> int:
    """Rows of a head's outputs [n_rows, width] that a loss computes at a time, 0 = all at once: --ce_chunk when
    given (0: all at once); else (None, the default) all at once while the loss computed whole, which holds
    `whole_buffers` [n_rows, width] float32 buffers at once, fits in WIDE_OUTPUT_BYTES (1 GiB: the demo's and the
    benchmark's always do), and otherwise as many rows as let its chunked form's `chunk_buffers` [rows, width]
    buffers fit in it. TTL's task 1 (645,974 outputs): the cross-entropy (whole: logits, log-softmax, gradient;
    chunked: one) goes by 415 rows beyond 138; the retention distance (whole: six; chunked: three) by 138 beyond 69."""
    if ce_chunk is not None:
        return ce_chunk if 0 < ce_chunk < n_rows else 0
    if n_rows * width * 4 * whole_buffers <= WIDE_OUTPUT_BYTES:
        return 0
    return max(1, WIDE_OUTPUT_BYTES // (4 * width * chunk_buffers))


def next_item_loss(model: NextItNet, sequence: torch.Tensor, masks: torch.Tensor,
                   ce_chunk: int | None = None, negatives: int = 0) -> torch.Tensor:
    """Stage 1: mean CE of every next item (inputs seq[:-1], targets seq[1:]) under `masks` [n_layers, C], over every
    item (the paper's objective) or, with --negatives N > 0, against N sampled ones (sampled_cross_entropy)."""
    hidden = model.hidden(sequence[:, :-1], masks, last_only=False)          # [B, L−1, C]
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), sequence[:, 1:].reshape(-1)
    if negatives:
        return sampled_cross_entropy(model.heads[0], hidden, targets, negatives)
    return head_cross_entropy(model.heads[0], hidden, targets, chunk_rows(hidden.shape[0], model.heads[0].out_features,
                                                                          ce_chunk))


def sampled_cross_entropy(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, negatives: int,
                          first_item: int = 1) -> torch.Tensor:
    """--negatives N: mean CE of each row's target against N items drawn uniformly, with replacement, from items
    first_item .. n − 1 (1: never <UNK>), one draw shared by the batch's rows, from torch's CPU generator (which
    --resume restores): a sampled softmax. A drawn item equal to a row's target is left out of that row, so no row's
    negatives hold its target. Not the paper's objective (the full softmax, head_cross_entropy), which it approximates
    at a fraction of the cost over a wide head: [n, 1 + N] logits instead of [n, n_items].
    hidden [n, C], targets [n] → a scalar."""
    drawn = torch.randint(first_item, head.out_features, (negatives,)).to(hidden.device)        # [N] (CPU generator:
                                                                                                # the resume file's)
    positive = (hidden * head.weight[targets]).sum(1) + head.bias[targets]                      # [n]
    negative = torch.addmm(head.bias[drawn], hidden, head.weight[drawn].t())                    # [n, N]
    negative = negative.masked_fill(drawn[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([positive[:, None], negative], 1).float()                                # [n, 1 + N]
    return F.cross_entropy(logits, torch.zeros_like(targets))


def task_loss(model: NextItNet, number: int, data: "TaskData", rows: np.ndarray, s: float,
              ce_chunk: int | None = None, negatives: int = 0) -> torch.Tensor:
    """Task `number`'s own loss on its examples `rows` with their true labels: next-item CE over every position of
    the whole sequence (source + target) for task 1, CE of its head else."""
    device = next(model.parameters()).device
    sources = torch.from_numpy(data.sources[data.rows(rows)]).to(device)                     # [n, L]
    targets = torch.from_numpy(data.targets[rows]).to(device)                                # [n]
    if number == 1:
        sequence = torch.cat([sources, targets[:, None]], 1)                                 # [n, L + 1]
        return next_item_loss(model, sequence, model.task_masks(0, s), ce_chunk, negatives)
    return F.cross_entropy(model(sources, number - 1, s)[0].float(), targets)


def head_cross_entropy(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean CE of head(hidden) [n, classes] against targets [n]; with chunk > 0 torch's linear_cross_entropy computes
    it `chunk` rows at a time, each chunk's gradients within its forward, so the [n, classes] logits never exist
    (the same loss and gradients to float rounding; float32, also under --amp)."""
    if not chunk:
        return F.cross_entropy(head(hidden).float(), targets)
    options = torch.nn.LinearCrossEntropyOptions(chunking_method=None, batch_chunk_size=chunk,
                                                 acc_policy="auto" if hidden.is_cuda else "compact")
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear_cross_entropy(hidden.float(), head.weight, targets, linear_bias=head.bias, options=options)


def head_distance(student_hidden: torch.Tensor, head: torch.nn.Linear, teacher_hidden: torch.Tensor,
                  teacher_head: torch.nn.Linear, distance: str, chunk: int) -> torch.Tensor:
    """The retention distance (Eq. 16) between head(student_hidden) and the frozen teacher_head(teacher_hidden), each
    [n, classes]: "mse", the mean squared difference of the logits, or "kl", the mean over rows of
    KL(softmax(teacher) ‖ softmax(student)). With chunk > 0 neither [n, classes] output exists whole: `chunk` rows at
    a time (WideHeadDistance), the same value and gradients to float rounding."""
    if not chunk:
        student, teacher = head(student_hidden).float(), teacher_head(teacher_hidden).float()
        return distillation_kl(student, teacher) if distance == "kl" else F.mse_loss(student, teacher)
    return WideHeadDistance.apply(student_hidden, head.weight, head.bias, teacher_hidden.detach(),
                                  teacher_head.weight.detach(), teacher_head.bias.detach(), distance, chunk)


DISTANCE_BUFFERS = (6, 3)  # [rows, classes] buffers of the distance computed whole, and of WideHeadDistance


class WideHeadDistance(torch.autograd.Function):
    """head_distance over `chunk` rows at a time, float32. Each chunk's gradients (with respect to the student's
    hidden states, head weight and bias) are computed in its forward and added up, so the peak holds three
    [chunk, classes] buffers and one head-sized gradient instead of the [n, classes] outputs of both models and
    their gradient; backward scales what forward kept.

    mse: d = z − t, loss = Σ d² / (n · classes), ∂/∂z = 2d / (n · classes); kl: loss = Σ p_t (log p_t − log p_z) / n,
    ∂/∂z = (p_z − p_t) / n, with z = W h + b the student's and t the teacher's logits."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, teacher_bias: torch.Tensor, distance: str, chunk: int) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            hidden, teacher_hidden = hidden.float(), teacher_hidden.float()
            n, width = hidden.shape[0], weight.shape[0]
            scale = 1.0 / (n * width) if distance == "mse" else 1.0 / n
            grad_hidden = torch.empty_like(hidden)                                     # [n, C]
            grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None  # [classes, C]
            grad_bias = torch.zeros_like(bias) if ctx.needs_input_grad[2] else None      # [classes]
            total = hidden.new_zeros((), dtype=torch.float64)
            for start in range(0, n, chunk):
                rows = slice(start, start + chunk)
                student = torch.addmm(bias, hidden[rows], weight.t())                  # [c, classes]
                teacher = torch.addmm(teacher_bias, teacher_hidden[rows], teacher_weight.t())
                if distance == "mse":
                    gradient = student.sub_(teacher)                                   # d
                    total += torch.dot(gradient.view(-1), gradient.view(-1)).double()
                    gradient.mul_(2.0 * scale)
                else:
                    teacher.sub_(teacher.logsumexp(1, keepdim=True))                   # log p_t
                    student.sub_(student.logsumexp(1, keepdim=True))                   # log p_z
                    probabilities = teacher.exp()                                      # p_t
                    teacher.sub_(student)                                              # log p_t − log p_z
                    total += torch.dot(probabilities.view(-1), teacher.view(-1)).double()
                    gradient = student.exp_().sub_(probabilities).mul_(scale)           # (p_z − p_t) / n
                grad_hidden[rows] = gradient @ weight
                if grad_weight is not None:
                    grad_weight.addmm_(gradient.t(), hidden[rows])
                if grad_bias is not None:
                    grad_bias += gradient.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)     # what autograd keeps for this term
        return (total * scale).float()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple:
        gradients = [None if gradient is None else gradient.mul_(grad_output) for gradient in ctx.saved_tensors]
        return (*gradients, None, None, None, None, None)


def retention_inputs(x: torch.Tensor, rows: torch.Tensor | slice, task: int) -> torch.Tensor:
    """What an earlier task's head reads of the stage-K sources x [B, L] at `rows`: task 1 (next item)
    predicts the source's last item from the items before it, x[rows, :-1]; every other task reads x[rows]."""
    return x[rows, :-1] if task == 0 else x[rows]


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher / T) ‖ softmax(student / T)) (student, teacher: [n, classes] logits)."""
    if temperature != 1.0:
        student, teacher = student / temperature, teacher / temperature
    return F.kl_div(F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1), reduction="batchmean",
                    log_target=True)
