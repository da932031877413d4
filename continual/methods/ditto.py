"""DITTO (Choi et al., "Dynamic Time-aware Continual User Representation Learning", SIGIR 2025; code
seungyoon-Choi/DITTO_official): TERACON's relation-aware masks, with knowledge carried forward to the new task's
users and backward to the earlier tasks as time passes (items arrive, the earlier tasks' item world shifts).

Its model (ditto.py:238): every item task's head maps the hidden state h to W_t h + b in R^C, scored against item rows
(task 1: every item; a later item task: its classes' items, whose targets join the index under --protocol time);
classification tasks keep their head's cross-entropy. At stage K ≥ 2 (train_ditto.py:211–410), per batch:

- the current task: BPR, −Σ log σ(o·e_y − o·e_n) summed over 99 negatives per user drawn uniformly from the current
  items (never the target; the code's pairing of positives with negatives is an accident: docs/methods.md);
- r_i = 1 − mean over the 16 masks (two per block, at the batch's annealed s) of σ(2 · cos(the previous model's
  mask of task i, the new task's mask)), updated after each batch, 0.9 at the stage's start (mask_ratio);
  n_i = min(B, max(⌊B · r_i⌋, 20)) (sampled_users);
- users ranked by the cosine between the previous model's hidden state for task i and the mean of the stage-i
  model's item rows (row 0 included), kept from the stage after task i (rank_users);
- FKT, weighted by r_i / Σr: on the n_i most similar users whose input holds no item newer than the previous model,
  the mean squared difference between the student's and the previous model's h · E_neg for 99 negatives drawn from
  the old items (the student's rows, detached; no head); for a classification task the MSE of the hidden states;
- BKT1 (task 1): on the users holding this stage's new items, the k = min(#, max(⌊# · r_1⌋, 20)) with most distinct
  new items, next-item BPR of inputs[:, :-2] → inputs[:, 1:-1] at every position through task 1's head, summed;
- BKT2 (later item tasks i): on the n_i least similar users holding items newer than task i, one deletion and one
  substitution view (20 % each; deletion_view, substitution_view), their hidden states for task i, the NT-Xent loss
  at temperature 1 summed over the 2m anchors (nt_xent_sum);
- L = L_cur + α FKT + β BKT1 + γ BKT2 (0.7, 0.4, 0.8, for these reductions); the loop skips a non-finite step and
  clamps nothing else: the task embeddings are clamped to ±6 after every step (after_step).

Its own stage 1 (train_task1.py): the same masked model with task 1's item head, trained by BPR over every
position against 99 negatives drawn by popularity rank, p ∝ exp(−(rank + 1) / (ρ V)), ρ 0.3 (by rank: the code
assigns the decay by item index, an accident), at its lr 0.01 unless --lr is given (a BPR sum learns slowly at
the suite's stage-1 lr 1e-3). Every parameter of the student trains (the code's Adam over model.parameters()); its
lr 5e-4 and batch 512 at later stages are here the stage's, as every method's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from continual import flags
from continual.methods.base import Method, Stage, Step
from continual import distributed
from model import NextItNet

if TYPE_CHECKING:
    from continual.run_config import RunConfig

INITIAL_RATIO = 0.9      # r_i at the stage's start (train_ditto.py:194)
FEWEST_USERS = 20        # the smallest sampled subset (train_ditto.py:246, 256, 343)


@dataclass(frozen=True)
class DittoOptions:
    ditto_alpha: float = flags.option(0.7, "α: weight of forward knowledge transfer, FKT (DITTO: 0.7)",
                                      type=flags.nonnegative_float, stages="later")
    ditto_beta: float = flags.option(0.4, "β: weight of task 1's backward transfer, BKT1 (DITTO: 0.4)",
                                     type=flags.nonnegative_float, stages="later")
    ditto_gamma: float = flags.option(0.8, "γ: weight of the later item tasks' backward transfer, BKT2 (DITTO: 0.8)",
                                      type=flags.nonnegative_float, stages="later")
    ditto_negatives: int = flags.option(99, "negatives per positive of each BPR sum and per user of FKT (DITTO: 99)",
                                        type=flags.positive_int)
    ditto_augment: float = flags.option(0.2, "share of a sequence's items that BKT2's deletion and substitution "
                                        "views change (DITTO: 0.2)",
                                        type=flags.real(0.0, 1.0, high_open=True, what="a share in [0, 1)"),
                                        stages="later")
    ditto_rho: float = flags.option(0.3, "ρ: stage 1's popularity negatives, p ∝ exp(−(rank + 1) / (ρ · items)) "
                                    "(DITTO: 0.3)", type=flags.positive_float, stages="first")
    fkt: bool = flags.option(True, "on|off: forward knowledge transfer (DITTO's --fkt; off: its ablation)",
                             type=flags.on_off_bool, stages="later")
    task1_bkt: bool = flags.option(True, "on|off: task 1's backward transfer (DITTO's --task1_bkt)",
                                   type=flags.on_off_bool, stages="later")
    rest_bkt: bool = flags.option(True, "on|off: the later item tasks' backward transfer (DITTO's --rest_bkt)",
                                  type=flags.on_off_bool, stages="later")


class Ditto(Method):
    """TERACON's masks; the current task by BPR; FKT, BKT1 and BKT2 between the previous model and the student."""
    name = "ditto"
    Options = DittoOptions
    stage1_method = "ditto"             # compare.py: its own stage 1 (task 1's item head, BPR, popularity negatives)
    item_targets = True                 # its item tasks score their classes through their items' rows
    stage1_defaults = {"lr": 0.01}      # its stage 1's (train_task1.py:32); later stages take the stage's, as all

    @classmethod
    def check(cls, options: DittoOptions, run: "RunConfig", fail: Callable[[str], None]) -> None:
        if run.negatives:
            fail("--negatives: --method ditto draws its own negatives (--ditto_negatives; stage 1 by popularity)")
        if distributed.launched():
            fail("--method ditto runs in one process: its BPR and NT-Xent terms are sums over the batch, which "
                 "torchrun's averaging of gradients over ranks would rescale against FKT's means")

    def begin_stage(self, stage: Stage) -> None:
        super().begin_stage(stage)
        run = stage.run
        self.generator = torch.Generator().manual_seed((run.seed + 1000 * run.rerun) * 100 + stage.number)
        self.ratios = [INITIAL_RATIO] * stage.task
        self.pad = pad_index(stage)
        if stage.number == 1:
            self.popularity = self.stage1_popularity(stage) if stage.n_train else None
            return
        config = stage.previous_checkpoint["model_config"]
        self.require_own_chain(stage, bool(config.get("item_heads")) and config.get("use_masks", True),
                               ", from its own stage 1 (train_task1.py --method ditto)")
        teacher = stage.previous
        saved = stage.previous_checkpoint.get("method_state") or {}
        mean = teacher.item_embedding.weight.detach().mean(0).cpu()                     # [C], row 0 included
        self.means = [*saved.get("means", []), mean]                                    # task i's: after stage i + 1
        self.old_items = config["n_items"]                                              # V_{K−1}

    def stage1_popularity(self, stage: Stage) -> torch.Tensor:
        """Stage 1's negative distribution [n_items]: item j (never <UNK> nor the padding) with
        p ∝ exp(−(rank_j + 1) / (ρ V)), rank_j its place by frequency in the training users' sequences (most frequent
        0; ties by index)."""
        data, rows = stage.examples(1)
        n_items = data.n_classes
        seen = np.concatenate([data.sources[data.rows(rows)].reshape(-1), data.targets[rows]])
        counts = np.bincount(seen, minlength=n_items)[:n_items].astype(np.float64)
        counts[[0, self.pad]] = -1.0                                                    # <UNK>, padding: last, p 0
        rank = np.empty(n_items, dtype=np.int64)
        rank[np.argsort(-counts, kind="stable")] = np.arange(n_items)
        weights = np.exp(-(rank + 1) / (self.options.ditto_rho * n_items))
        weights[[0, self.pad]] = 0.0
        return torch.from_numpy(weights / weights.sum())

    def model_config(self) -> dict:
        return {"use_masks": True, "relation": False, "item_heads": [True]}

    def grow(self, model: NextItNet, n_classes: int) -> None:
        """The new task with relation-aware masks; an item task (rec) gets an item head over its classes' items."""
        if self.stage.record.get("kind") != "rec":
            model.add_task(n_classes, relation=True)
            return
        data, _ = self.stage.examples(self.stage.number)
        index = self.stage.index
        items = index.positions(data.target_keys)                                       # −1: not an item
        if np.any(items < 0):
            print(f"{self.stage.run.datapath}: {int((items < 0).sum())} target item(s) not in the index score "
                  "through <UNK>'s row (under --protocol static a task's new items are unknown)")
        class_items = np.concatenate([np.zeros(index.offset, dtype=np.int64), np.maximum(items, 0)])
        model.add_task(n_classes, relation=True, class_items=torch.from_numpy(class_items))

    # ------------------------------------------------------------------ the loss

    def terms(self, model: NextItNet, step: Step) -> Iterator[torch.Tensor]:
        if self.stage.number == 1:
            yield self.stage1_loss(model, step)
            return
        task, s, x = self.stage.task, step.s, step.x
        teacher, options = self.stage.previous, self.options
        with torch.no_grad():
            teacher_masks = [teacher.task_masks(i, s) for i in range(task)]               # K−1 × [n_layers, C]
            teacher_hidden = [teacher.hidden(x, teacher_masks[i], True, i) for i in range(task)]   # K−1 × [B, C]
            similarity = [rank_users(hidden, mean.to(x.device)) for hidden, mean in zip(teacher_hidden, self.means)]
        current_masks = model.task_masks(task, s)                                          # [n_layers, C]
        yield self.current_loss(model, step, current_masks)
        old_only = (x < self.old_items).all(1)                                             # [B] no item new here
        counts = [sampled_users(x.shape[0], ratio) for ratio in self.ratios]
        if options.fkt and options.ditto_alpha > 0:
            total = sum(self.ratios)
            for i in range(task):
                chosen = torch.topk(similarity[i], counts[i]).indices                      # most similar users
                rows = chosen[old_only[chosen]]
                if not rows.numel():
                    continue
                inputs = x[rows, :-1] if i == 0 else x[rows]                               # task 1: without the last
                with torch.no_grad():
                    previous = (teacher.hidden(inputs, teacher_masks[0], True, 0) if i == 0
                                else teacher_hidden[i][rows])                              # [n, C]
                yield options.ditto_alpha * self.ratios[i] / total * self.forward_transfer(model, inputs, i, s,
                                                                                           previous)
        if options.task1_bkt and options.ditto_beta > 0:
            term = self.task1_backward(model, x, s)
            if term is not None:
                yield options.ditto_beta * term
        if options.rest_bkt and options.ditto_gamma > 0:
            for i in range(1, task):
                if not model.config.has_item_head(i):
                    continue
                chosen = torch.topk(-similarity[i], counts[i]).indices                     # least similar users
                newer = (x[chosen] >= model.config.items_at(i + 1)).any(1)
                if newer.any():
                    yield options.ditto_gamma * self.rest_backward(model, x[chosen[newer]], i, s)
        self.ratios = [mask_ratio(masks, current_masks.detach()) for masks in teacher_masks]

    def stage1_loss(self, model: NextItNet, step: Step) -> torch.Tensor:
        """Σ over every position and negative of −log σ(o·e_y − o·e_n), negatives by popularity rank."""
        hidden = model.hidden(step.x[:, :-1], model.task_masks(0, step.s), last_only=False)   # [B, L−1, C]
        out = model.heads[0](hidden.reshape(-1, hidden.shape[-1]))                             # [n, C]
        targets = step.x[:, 1:].reshape(-1)                                                    # [n]
        drawn = torch.multinomial(self.popularity, targets.numel() * self.options.ditto_negatives, replacement=True,
                                  generator=self.generator).view(targets.numel(), -1).to(out.device)  # [n, k]
        return bpr_sum(out, model.item_embedding.weight, targets, drawn)

    def current_loss(self, model: NextItNet, step: Step, masks: torch.Tensor) -> torch.Tensor:
        """The new task: BPR against uniform negatives for an item task, its head's cross-entropy otherwise."""
        task = self.stage.task
        hidden = model.hidden(step.x, masks, True, task)                                       # [B, C]
        if not model.config.has_item_head(task):
            return F.cross_entropy(model.heads[task](hidden).float(), step.y)
        targets = model.class_items(task)[step.y]                                             # [B] item rows
        drawn = uniform_negatives(targets, self.options.ditto_negatives, model.config.n_items, self.generator)
        return bpr_sum(model.heads[task](hidden), model.item_embedding.weight, targets, drawn)

    def forward_transfer(self, model: NextItNet, inputs: torch.Tensor, task: int, s: float,
                         previous: torch.Tensor) -> torch.Tensor:
        """FKT for earlier task `task` on `inputs` [n, L'] (users with old items only), `previous` [n, C] the previous
        model's hidden states of them: an item task's mean squared difference of h · E_neg (99 old items a user, the
        student's rows detached), else of the hidden states."""
        student = model.hidden(inputs, model.task_masks(task, s), True, task)               # [n, C]
        if not model.config.has_item_head(task):
            return F.mse_loss(student, previous)
        drawn = torch.randint(1, self.old_items, (inputs.shape[0], self.options.ditto_negatives),
                              generator=self.generator).to(inputs.device)                   # [n, k]
        rows = model.item_embedding.weight.detach()[drawn]                                  # [n, k, C]
        return F.mse_loss(torch.bmm(rows, student[:, :, None]), torch.bmm(rows, previous[:, :, None]))

    def task1_backward(self, model: NextItNet, x: torch.Tensor, s: float) -> torch.Tensor | None:
        """BKT1: next-item BPR on the users with most distinct new items (None when no user holds one)."""
        new_items = x >= self.old_items                                                      # [B, L]
        holders = new_items.any(1).nonzero().squeeze(1)
        if not holders.numel():
            return None
        ordered = x[holders].sort(1).values                                                  # [h, L]
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        distinct = ((ordered >= self.old_items) & first).sum(1)                              # [h] distinct new items
        count = min(holders.numel(), max(math.floor(holders.numel() * self.ratios[0]), FEWEST_USERS))
        chosen = x[holders[torch.topk(distinct, count).indices]]                             # [k, L]
        hidden = model.hidden(chosen[:, :-2], model.task_masks(0, s), last_only=False)       # [k, L−2, C]
        out = model.heads[0](hidden.reshape(-1, hidden.shape[-1]))                           # [k(L−2), C]
        targets = chosen[:, 1:-1].reshape(-1)
        drawn = uniform_negatives(targets, self.options.ditto_negatives, model.config.n_items, self.generator)
        return bpr_sum(out, model.item_embedding.weight, targets, drawn)

    def rest_backward(self, model: NextItNet, users: torch.Tensor, task: int, s: float) -> torch.Tensor:
        """BKT2 for item task `task`: NT-Xent between a deletion and a substitution view of each user."""
        share = self.options.ditto_augment
        views = torch.cat([deletion_view(users, self.pad, share, self.generator),
                           substitution_view(users, self.pad, share, model.item_embedding.weight.detach(),
                                             self.generator)])                               # [2m, L]
        return nt_xent_sum(model.hidden(views, model.task_masks(task, s), True, task))

    def after_step(self, model: NextItNet) -> None:
        model.clamp_task_embedding()                          # every task's rows, as the code clamps every .ec

    def state_dict(self) -> dict:
        state = {"generator": self.generator.get_state(), "ratios": list(self.ratios)}
        if self.stage.number >= 2:
            state["means"] = list(self.means)
        return state

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self.ratios = list(state.get("ratios", self.ratios))


# ---------------------------------------------------------------------- its pieces, each checked by hand in the tests

def pad_index(stage: Stage) -> int:
    """The index that left-pads short sources: the raw item "0" where it is an item, else <UNK> (0)."""
    index = stage.index
    if index is None or not index.has_zero:
        return 0
    return int(index.positions(np.zeros(1, dtype=np.int64))[0])


def mask_ratio(previous: torch.Tensor, current: torch.Tensor) -> float:
    """r = 1 − mean over the masked layers of σ(2 · cos(previous_ℓ, current_ℓ)); masks [n_layers, C]
    (utils.py:239–248)."""
    return float(1.0 - torch.sigmoid(2.0 * F.cosine_similarity(previous, current, dim=1)).mean())


def sampled_users(batch: int, ratio: float) -> int:
    """n = min(B, max(⌊B · r⌋, 20)) (train_ditto.py:246)."""
    return min(batch, max(math.floor(batch * ratio), FEWEST_USERS))


def rank_users(hidden: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Each user's cosine [B] between its hidden state [B, C] and an item-embedding mean [C]."""
    return F.cosine_similarity(hidden, mean[None, :].to(hidden.dtype), dim=1)


def uniform_negatives(targets: torch.Tensor, count: int, n_items: int, generator: torch.Generator) -> torch.Tensor:
    """`count` items a row [n, count], uniform over 1 .. n_items − 1 without the row's target (never <UNK>)."""
    valid = (targets >= 1) & (targets < n_items)                                            # [n]
    span = (n_items - 1 - valid.long()).cpu()                                               # choices a row has
    drawn = (torch.rand(targets.numel(), count, generator=generator) * span[:, None]).long() + 1
    drawn = drawn.to(targets.device)
    return drawn + ((drawn >= targets[:, None]) & valid[:, None]).long()                   # skip the target


def bpr_sum(out: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Σ over rows and negatives of −log σ(o·e_target − o·e_negative), a negative equal to its row's target left out;
    out [n, C], rows the item embedding [V, C], targets [n], negatives [n, k] → a scalar. The negatives' scores come
    from every item's ([n, V], then gathered) where that is smaller than their rows ([n, k, C]): the same numbers."""
    positive = (out * rows[targets]).sum(1)                                                 # [n]
    if rows.shape[0] <= negatives.shape[1] * rows.shape[1]:
        negative = (out @ rows.t()).gather(1, negatives)                                    # [n, k]
    else:
        negative = torch.bmm(rows[negatives], out[:, :, None]).squeeze(2)                   # [n, k]
    pairs = -F.logsigmoid((positive[:, None] - negative).float())
    return pairs.masked_fill(negatives == targets[:, None], 0.0).sum()


def picked_items(users: torch.Tensor, pad: int, share: float, generator: torch.Generator) -> torch.Tensor:
    """[n, L] True at ⌊share · a row's items⌋ of its item positions (from its first item on, after the left
    padding), drawn at random without replacement, never at the padding."""
    items = (users != pad).cumsum(1) > 0                                                   # [n, L] from the first item
    counts = torch.floor(share * items.sum(1).double()).long()                             # [n] how many a row
    scores = torch.rand(users.shape, generator=generator).to(users.device).masked_fill(~items, math.inf)
    order = scores.argsort(1).argsort(1)                                                   # [n, L] each one's rank
    return order < counts[:, None]


def deletion_view(users: torch.Tensor, pad: int, share: float, generator: torch.Generator) -> torch.Tensor:
    """Each row [L] with ⌊share · its items⌋ of its items deleted at random and the row left-padded again with `pad`
    (utils.py:250–270)."""
    deleted = picked_items(users, pad, share, generator)                                   # [n, L]
    length = users.shape[1]
    positions = torch.arange(length, device=users.device)
    order = torch.argsort((~deleted).long() * length + positions, dim=1, stable=True)     # deleted first, in order
    moved = users.gather(1, order)                                                         # [n, L]
    return moved.masked_fill(positions[None, :] < deleted.sum(1, keepdim=True), pad)


def substitution_view(users: torch.Tensor, pad: int, share: float, embedding: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
    """Each row with ⌊share · its items⌋ of its items replaced at random by the most similar other item of the
    batch (cosine of their embedding rows; the code indexes the similarity by the user's row, an accident)."""
    present = torch.unique(users[users != pad])                                             # [m] the batch's items
    picked = picked_items(users, pad, share, generator) & (users != pad)                   # [n, L]
    if present.numel() < 2:
        return users.clone()
    vectors = F.normalize(embedding[present].float(), dim=1)
    similarity = vectors @ vectors.t()                                                      # [m, m]
    similarity.fill_diagonal_(-math.inf)
    nearest = present[similarity.argmax(1)]                                                 # [m] each one's nearest
    where = torch.searchsorted(present, users).clamp(max=present.numel() - 1)              # [n, L] (pads: unused)
    return torch.where(picked, nearest[where], users)


def nt_xent_sum(hidden: torch.Tensor) -> torch.Tensor:
    """Σ over the 2m anchors of −log(exp(cos(z_a, z_a⁺)) / Σ_{j ≠ a} exp(cos(z_a, z_j))), temperature 1; hidden
    [2m, C], the first m one view of each user and the last m the other (train_ditto.py:368–376)."""
    count = hidden.shape[0] // 2
    unit = F.normalize(hidden.float(), dim=1)
    cosine = unit @ unit.t()                                                                # [2m, 2m]
    cosine = cosine.masked_fill(torch.eye(2 * count, dtype=torch.bool, device=hidden.device), -math.inf)
    partner = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(hidden.device)
    return F.cross_entropy(cosine, partner, reduction="sum")

