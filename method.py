"""TERACON's own math, in one place (Kim et al., KDD 2023, arXiv 2306.01792; equation numbers are the paper's).

The model's masks (Eqs. 11 and 13) are in model.NextItNet.task_masks; everything else the method adds to a
plain training loop is here: the annealing of s (Eq. 19), the task-1 loss and its mask regulariser, the
stage-K loss (Eqs. 14–18) with its sampling ratio (Eq. 15), retention rows and retention terms (Eq. 16),
and the clamp of the task embeddings. trainer.py holds the plumbing (loops, steps, checkpoints, resume).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model import NextItNet

INITIAL_RATIO = 0.9     # every earlier task's sampling ratio before the first batch (authors' code)
EMBEDDING_CLAMP = 6.0   # stages ≥ 2 clamp the task embeddings to [−6, 6] after each step (revised code)


@dataclass(frozen=True)
class RetentionRule:
    """How the sampling ratios (Eq. 15) become retention rows and loss weights c_j."""
    all_rows: bool      # every row of the batch for every earlier task, instead of int(B · ratio_j) rows
    per_task: bool      # c_j = ratio_j / mean_k ratio_k (near 1 each), instead of ratio_j / Σ_k ratio_k
    at_smax: bool       # pseudo-labels and student outputs at s = smax, instead of the annealed s
    text: str
    kl: bool = False    # KL(teacher's softmax ‖ student's) per row instead of the MSE of the logits
    carry_relation: bool = False  # earlier tasks keep their relation layers when the model grows (add_task)
    carry_plain: bool = False     # and at stage 2 their plain masks become relation layers that match them


# --retention (README, "Retention rules"). Every rule protects an earlier task less the more its mask is like
# the new task's (a smaller ratio_j); `paper` is the authors' rule, exactly.
RETENTION_RULES = {
    "paper": RetentionRule(False, False, False, "int(B · ratio_j) rows for earlier task j, weight ratio_j / Σ_k "
                                                "ratio_k, at the annealed s (Eqs. 15–16)"),
    "all_rows": RetentionRule(True, False, False, "every row for every earlier task, weight ratio_j / Σ_k ratio_k"),
    "per_task": RetentionRule(True, True, False, "every row for every earlier task, weight ratio_j / mean_k ratio_k "
                                                 "(near 1 for each earlier task however many there are)"),
    "per_task_smax": RetentionRule(True, True, True, "as per_task, with the teacher's pseudo-labels and the student's "
                                                     "outputs at s = smax (where the model is scored) instead of the "
                                                     "annealed s"),
    "per_task_smax_kl": RetentionRule(True, True, True, "as per_task_smax, with KL(softmax(pseudo-labels) ‖ "
                                                        "softmax(student)) per row instead of the MSE of the logits",
                                      kl=True),
    "sum_smax_kl": RetentionRule(True, False, True, "as per_task_smax_kl, with the paper's weights ratio_j / Σ_k "
                                                     "ratio_k, which sum to 1 however many earlier tasks there are",
                                 kl=True),
    "per_task_smax_kl_carry": RetentionRule(True, True, True, "as per_task_smax_kl, and every earlier task keeps "
                                                              "its relation layer when the model grows (stage ≥ "
                                                              "3), so its masks start the stage unchanged",
                                            kl=True, carry_relation=True),
    "per_task_smax_kl_carry_plain": RetentionRule(True, True, True, "as per_task_smax_kl_carry, and from stage 2: "
                                                                    "task 1's plain mask σ(s·e) becomes σ(s·tanh(s·e)), "
                                                                    "the same at s = smax, instead of a fresh relation "
                                                                    "layer", kl=True, carry_relation=True,
                                                  carry_plain=True),
}


@dataclass(frozen=True)
class Retention:
    """The knowledge-retention settings of a stage ≥ 2."""
    alpha: float = 0.7          # weight of the retention loss (Eq. 18); 0 turns retention off
    rule: str = "paper"         # a key of RETENTION_RULES
    nested: bool = False        # the original's nested samples: every earlier task draws from one shuffle
    uniform: bool = False       # ablation: the ratios stay at INITIAL_RATIO instead of following Eq. 15
    current_weights: bool = False  # weights c_j from this batch's ratios (original) instead of the previous batch's
    smax: float = 50.0          # the top of the annealing (rules with at_smax compute retention there)
    temperature: float = 1.0    # softmax temperature of the KL rules' terms (retention_term)
    capacity: float = 0.0       # weight of HAT's capacity regulariser on the new task's masks (capacity_penalty)
    expert_weight: float = 0.0  # weight of the distillation of the new task from an expert (continual_terms)


@dataclass(frozen=True)
class Shard:
    """Where this process's rows sit in the global batch: rank r holds global rows r, r + world, … (see
    distributed.batches). A single process is Shard(size, 0, 1); a rank holding a weight-0 stand-in row
    has rows = 0."""
    size: int        # rows of the global batch
    rank: int = 0
    world: int = 1

    def local(self, positions: np.ndarray) -> np.ndarray:
        """This rank's local indices of the given global positions."""
        return positions[positions % self.world == self.rank] // self.world

    @property
    def rows(self) -> int:
        """Rows of the global batch this rank holds."""
        return len(range(self.rank, self.size, self.world))


def anneal(batch_index: int, batches_per_epoch: float, smax: float) -> float:
    """Eq. 19: s = 1/smax + (smax − 1/smax) · b / B within each epoch."""
    return 1.0 / smax + (smax - 1.0 / smax) * batch_index / batches_per_epoch


def chunked_cross_entropy(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean CE of head(hidden) computed `chunk` rows at a time; each chunk's logits are recomputed in
    backward, so the peak holds one chunk's logits instead of all (same loss, exactly)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        part = checkpoint(lambda h, y: F.cross_entropy(head(h).float(), y, reduction="sum"),
                          hidden[start:start + chunk], targets[start:start + chunk], use_reentrant=False)
        total = total + part
    return total / hidden.shape[0]


def task1_loss(model: NextItNet, sequence: torch.Tensor, s: float, l2: float, ce_chunk: int = 0) -> torch.Tensor:
    """Stage 1: CE of every next item (inputs seq[:-1], targets seq[1:]) under the masks σ(s·e_1) of Eq. 11,
    plus the original's regulariser L2 · mean of all masks (the revised code leaves it out: --L2 0)."""
    masks = model.task_masks(0, s)                                          # [n_layers, C]
    hidden = model.hidden(sequence[:, :-1], masks, last_only=False)         # [B, L−1, C]
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), sequence[:, 1:].reshape(-1)
    if ce_chunk and hidden.shape[0] > ce_chunk:
        loss = chunked_cross_entropy(model.heads[0], hidden, targets, ce_chunk)
    else:
        loss = F.cross_entropy(model.heads[0](hidden).float(), targets)
    return loss + l2 * masks.mean()


def sampling_ratio(teacher_masks: torch.Tensor, task_masks: torch.Tensor) -> float:
    """Eq. 15: ratio_j = 1 − mean over masked layers of σ(6 · cos(m̃_j, m_t)).

    teacher_masks, task_masks: [n_layers, C] (earlier task j's mask under the teacher, current task's mask).
    """
    cosine = F.cosine_similarity(teacher_masks.detach(), task_masks.detach(), dim=1, eps=1e-6)  # [n_layers]
    return float(1.0 - torch.sigmoid(6.0 * cosine).mean())


def retention_term(student: torch.Tensor, teacher: torch.Tensor, weight: float, kl: bool = False,
                   temperature: float = 1.0) -> torch.Tensor:
    """One earlier task's share of Eq. 16: c_j · MSE(student_j, teacher_j); with `kl`, c_j · the mean over
    rows of KL(softmax(teacher_j) ‖ softmax(student_j)), which ignores the logits' common shift and weighs
    each class by the teacher's probability of it (student, teacher: [n, n_classes] logits). A `temperature`
    T ≠ 1 compares softmax(logits / T) instead, times T² (Hinton et al.'s scaling); T < 1 sharpens the
    teacher, so the term weighs its top-ranked classes, the ones a ranking metric looks at, more."""
    if kl:  # at T = 1 the division and T² are exact: the plain softmaxes' term, bit for bit
        return weight * temperature * temperature * F.kl_div(
            F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
            reduction="batchmean", log_target=True)
    return weight * F.mse_loss(student, teacher)


def capacity_penalty(task_masks: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """HAT's capacity regulariser (Serrà et al., ICML 2018, Eq. 5) on the new task's masks [n_layers, C]:
    Σ m · (1 − m_<K) / Σ (1 − m_<K), where `used` [n_layers, C] = m_<K is the element-wise max of the earlier
    tasks' masks. Reusing a channel an earlier task uses costs nothing; opening a fresh one costs, so fresh
    channels stay free for later tasks. With nothing used before (stage 1) it is the mean mask, the `--L2` term."""
    free = 1.0 - used                                                       # [n_layers, C]
    return (task_masks * free).sum() / free.sum().clamp_min(1e-12)


def retention_plan(rule: str, ratios: list[float], size: int,
                   weight_ratios: list[float] | None = None) -> list[tuple[int, float]]:
    """(rows to pseudo-label, loss weight c_j) of every earlier task j for a global batch of `size` rows.

    Row counts follow `ratios`; the weights follow `weight_ratios` (default: the same ratios)."""
    if rule not in RETENTION_RULES:
        raise ValueError(f"unknown retention rule {rule!r}")
    how = RETENTION_RULES[rule]
    weight_ratios = ratios if weight_ratios is None else weight_ratios
    total = sum(weight_ratios)
    if total <= 0:
        return [(0, 0.0) for _ in ratios]
    counts = [size] * len(ratios) if how.all_rows else [int(size * ratio) for ratio in ratios]
    scale = len(ratios) if how.per_task else 1
    return [(count, scale * ratio / total) for count, ratio in zip(counts, weight_ratios)]


def retention_rows(rng: np.random.Generator, plan: list[tuple[int, float]], shard: Shard,
                   nested: bool) -> list[np.ndarray]:
    """Global positions of each earlier task's retention rows, drawn from the GLOBAL batch, so N ranks use
    the rows one process would (every rank draws the same permutations: their generators are in step).
    With `nested` (the original), every task takes a prefix of one shuffle; otherwise one shuffle each.
    `rng` may instead be a replay.AuthorsStreams (--streams authors): then the rows come from Python's
    `random` as in the authors' code (one process)."""
    if hasattr(rng, "retention_rows"):
        return rng.retention_rows([count for count, _ in plan], shard.size, nested)
    shared = rng.permutation(shard.size)
    return [(shared if nested else rng.permutation(shard.size))[:count] for count, _ in plan]


def clamp_task_embedding(model: NextItNet) -> None:
    with torch.no_grad():
        model.task_embedding.clamp_(-EMBEDDING_CLAMP, EMBEDDING_CLAMP)


def continual_terms(model: NextItNet, teacher: NextItNet, x: torch.Tensor, y: torch.Tensor, task: int, s: float,
                    ratios: list[float], rng: np.random.Generator, retention: Retention,
                    new_ratios: list[float], shard: Shard | None = None,
                    expert: NextItNet | None = None) -> Iterator[torch.Tensor]:
    """Stage K's loss (Eqs. 14–18) one term at a time: CE(task K) (+ the capacity penalty on its masks when
    `retention.capacity` > 0, + β · KL(softmax(expert_K) ‖ softmax(student_K)) over the batch at s = smax when
    an `expert` of task K is given and `retention.expert_weight` = β > 0: the new task distilled from a model
    trained on it without retention, as Progress & Compress, Schwarz et al. 2018), then α · c_j · MSE_j for
    each earlier task j.

    For every earlier task j the rows of `retention_plan` are pseudo-labelled by the ONE frozen teacher
    under its task-j mask; the student's head j under its own task-j mask is pulled towards them. The rows
    are drawn from the global batch (`shard`; default: this process holds the whole batch); a rank's term
    is scaled so that the ranks' weighted sum is the one-process term. Each term has its own graph, so a
    caller may back-propagate it before asking for the next one. The next batch's ratios (Eq. 15, from
    this batch's masks, as the revised code) are appended to `new_ratios`.
    """
    shard = shard or Shard(x.shape[0])
    task_masks = model.task_masks(task, s)                                  # [n_layers, C]
    new_task = F.cross_entropy(model(x, task, s, masks=task_masks)[0].float(), y)
    if retention.capacity > 0 and task > 0:
        with torch.no_grad():                                               # earlier tasks' masks where scored
            used = torch.stack([teacher.task_masks(j, retention.smax) for j in range(task)]).amax(0)
        new_task = new_task + retention.capacity * capacity_penalty(task_masks, used)
    if expert is not None and retention.expert_weight > 0:
        with torch.no_grad():
            expert_logits = expert(x, task, retention.smax)[0].float()     # [B, n_classes of task K]
        new_task = new_task + retention_term(model(x, task, retention.smax)[0].float(), expert_logits,
                                             retention.expert_weight, kl=True)
    yield new_task
    if retention.alpha <= 0 or task == 0:
        new_ratios.extend(ratios)
        return
    with torch.no_grad():
        teacher_masks = [teacher.task_masks(j, s) for j in range(task)]     # task × [n_layers, C]
    fresh = [ratios[j] if retention.uniform else sampling_ratio(teacher_masks[j], task_masks) for j in range(task)]
    new_ratios.extend(fresh)
    plan = retention_plan(retention.rule, ratios, shard.size, fresh if retention.current_weights else None)
    drawn = retention_rows(rng, plan, shard, retention.nested)
    if RETENTION_RULES[retention.rule].at_smax and s != retention.smax:
        s = retention.smax                                                  # retention where the model is scored
        with torch.no_grad():
            teacher_masks = [teacher.task_masks(j, s) for j in range(task)]
    share = shard.rows / shard.size                                         # this rank's gradient weight
    for j, ((count, weight), positions) in enumerate(zip(plan, drawn)):
        local = torch.from_numpy(shard.local(positions)).to(x.device)
        if not local.numel():                                               # an empty sample contributes nothing
            continue
        x_j = x[local, :-1] if j == 0 else x[local]                         # task 1 predicts the source's last item
        with torch.no_grad():
            pseudo = teacher(x_j, j, s, masks=teacher_masks[j])[0].float()
        scale = local.numel() / count / share                               # 1 in a single process
        yield retention.alpha * scale * retention_term(model(x_j, j, s)[0].float(), pseudo, weight,
                                                       RETENTION_RULES[retention.rule].kl, retention.temperature)


def continual_loss(model: NextItNet, teacher: NextItNet, x: torch.Tensor, y: torch.Tensor, task: int, s: float,
                   ratios: list[float], rng: np.random.Generator, retention: Retention,
                   shard: Shard | None = None,
                   expert: NextItNet | None = None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """The whole stage-K loss as one graph → (loss, α · retention, next batch's ratios)."""
    new_ratios: list[float] = []
    ce, *kept = continual_terms(model, teacher, x, y, task, s, ratios, rng, retention, new_ratios, shard, expert)
    retention_sum = torch.stack(kept).sum() if kept else ce.new_zeros(())
    return ce + retention_sum, retention_sum.detach(), new_ratios
