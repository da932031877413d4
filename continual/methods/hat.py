"""HAT (Serrà et al., ICML 2018, "Overcoming catastrophic forgetting with hard attention to the task"; equation
numbers are that paper's), on NextItNet's residual blocks.

Each task t has an embedding e_t per masked layer; its gates m_t = σ(s·e_t) (Eq. 1) multiply the units of
both convolutions of every residual block, where TERACON's masks sit (after LayerNorm and ReLU), with s
annealed from 1/smax to smax within each epoch (Eq. 3; the loop's `anneal`, which TERACON reuses). As the
official code (joansj/hat, src/approaches/hat.py):

- the loss adds λ times the capacity regulariser Σ m_t·(1 − m_<t) / Σ (1 − m_<t) (Eq. 5), m_<t the cumulative
  max of the earlier tasks' gates at smax (at stage 1 nothing is used: the mean gate), λ = 0.75;
- gradient compensation (Eq. 2): each weight's gradient is multiplied by 1 − min(m_<t of its output unit,
  m_<t of its input unit). conv1 reads the residual stream, which no gate closes (its input counts as used),
  so conv1 is blocked by its output units alone, as HAT's first layer; conv2 by both; each bias and LayerNorm
  by its layer's units. The item embedding feeds every task ungated, so it is frozen after stage 1;
- the embedding gradient is compensated for the annealing, × smax·(cosh(clamp(s·e, ±50)) + 1) / (s·(cosh(e)
  + 1)) (Eq. 7), gradients are clipped to norm 10,000, and the new embedding is clamped to ±6 after each step;
- task embeddings start N(0, 1) (torch.nn.Embedding's init), smax is 400 (--smax; HAT's grid chose it).

Here the optimiser is the loop's Adam at the stage's --lr, as every other method's (HAT's own is SGD, lr 0.05).
Adam divides each weight's step by its own gradient scale, so a gradient scaled by 1 − m_<t > 0 still moves
the weight by a full step: the compensation blocks exactly where m_<t is exactly 1 in float32 (σ(400·e) rounds
to 1 for e ≳ 0.045). Two things leak into earlier tasks: gates strictly between 0 and 1, and LayerNorm, which
normalises each layer over all its units, so weights of units an earlier task does not use still move its
layer's mean and variance. tests/test_baselines.py measures the leak and bounds it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from continual import flags
from continual.methods.base import Method, Stage, Step, keep_earlier_item_rows, next_item_loss, open_new_item_rows
from model import NextItNet

THRES_COSH = 50.0   # the official clamp of s·e inside the embedding compensation's cosh


@dataclass(frozen=True)
class HATOptions:
    hat_lambda: float = flags.option(0.75, "weight of HAT's capacity regulariser (official 0.75)",
                                     type=flags.nonnegative_float)
    hat_clipgrad: float = flags.option(10000.0, "gradient-norm clip (official 10000)", type=flags.positive_float)


class HAT(Method):
    """Hard attention to the task: gates σ(s·e_t) on every masked layer, and the updates of the units that
    earlier tasks use blocked by gradient compensation."""
    name = "hat"
    Options = HATOptions
    loop_defaults = {"smax": 400.0}
    stage1_method = "hat"               # compare.py: its own stage 1 (gates and the capacity term from task 1 on)

    def begin_stage(self, stage: Stage) -> None:
        super().begin_stage(stage)
        self.s, self.used = 1.0, None
        if stage.number == 1:
            return
        config = stage.previous_checkpoint["model_config"]
        self.require_own_chain(stage, config.get("use_masks") and not config.get("relation"),
                               ", from its own stage 1 (train_task1.py --method hat)")
        self.used = used_units(stage.previous, stage.task, stage.run.smax)          # [n_layers, C]

    def model_config(self) -> dict:
        return {"use_masks": True, "relation": False, "task_emb_init": [0.0, 1.0], "task_emb_dist": "normal"}

    def grow(self, model: NextItNet, n_classes: int) -> None:
        """The new task; the item embedding frozen, but for the rows of items new at this stage (--protocol time: the
        loop grew them before), which train by this stage's terms and freeze from the next stage on."""
        model.add_task(n_classes, relation=False)
        open_new_item_rows(model)

    def terms(self, model: NextItNet, step: Step) -> Iterator[torch.Tensor]:
        """CE of the new task + λ · the capacity regulariser on its gates at the annealed s (Eq. 5)."""
        self.s = step.s
        task = self.stage.task
        masks = model.task_masks(task, step.s)                                          # [n_layers, C]
        if task == 0:
            loss = next_item_loss(model, step.x, masks, self.run.ce_chunk, self.run.negatives)
        else:
            loss = F.cross_entropy(model(step.x, task, step.s, masks=masks)[0].float(), step.y)
        yield loss + self.options.hat_lambda * capacity(masks, self.used)

    def after_backward(self, model: NextItNet) -> None:
        keep_earlier_item_rows(model)
        if self.used is not None:
            compensate_units(model, self.used)
        compensate_embedding(model.task_embedding, self.stage.task, self.s, self.run.smax)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                       self.options.hat_clipgrad)

    def after_step(self, model: NextItNet) -> None:
        model.clamp_task_embedding(self.stage.task)          # the official thres_emb


def used_units(model: NextItNet, n_earlier: int, smax: float) -> torch.Tensor:
    """m_<t: the cumulative max of tasks 0..n_earlier−1's gates at smax → [n_layers, C] (no gradient)."""
    with torch.no_grad():
        return torch.stack([model.task_masks(j, smax) for j in range(n_earlier)]).amax(0).float()


def capacity(masks: torch.Tensor, used: torch.Tensor | None) -> torch.Tensor:
    """Eq. 5: Σ m·(1 − m_<t) / Σ (1 − m_<t) over every masked unit; the mean gate when nothing is used yet."""
    if used is None:
        return masks.float().mean()
    free = 1.0 - used                                                                   # [n_layers, C]
    return (masks.float() * free).sum() / free.sum().clamp_min(1e-12)


def unit_blocks(model: NextItNet, used: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, the share of its gradient that passes = 1 − min(m_<t out, m_<t in)) for each parameter of the
    residual blocks (Eq. 2); `used` [n_layers, C]."""
    for i, block in enumerate(model.blocks):
        first, second = used[2 * i], used[2 * i + 1]                                    # [C], [C]
        yield block.conv1.weight, (1.0 - first)[:, None, None]                          # [out, in, k]: input ungated
        yield block.conv2.weight, (1.0 - torch.minimum(second[:, None], first[None, :]))[:, :, None]
        for parameter in (block.conv1.bias, block.ln1.weight, block.ln1.bias):
            yield parameter, 1.0 - first
        for parameter in (block.conv2.bias, block.ln2.weight, block.ln2.bias):
            yield parameter, 1.0 - second


def compensate_units(model: NextItNet, used: torch.Tensor) -> None:
    """Eq. 2: block the updates of the units earlier tasks use (gradients scaled in place)."""
    for parameter, passes in unit_blocks(model, used):
        if parameter.grad is not None:
            parameter.grad.mul_(passes.to(parameter.grad.dtype))


def compensate_embedding(embedding: torch.nn.Parameter, task: int, s: float, smax: float) -> None:
    """Eq. 7 on the new task's row of the task embeddings [N, n_layers, C]; every other row's gradient is zeroed
    (earlier tasks' gates stay as they were)."""
    if embedding.grad is None:
        return
    with torch.no_grad():
        row = embedding[task]
        numerator = torch.cosh(torch.clamp(s * row, -THRES_COSH, THRES_COSH)) + 1
        denominator = torch.cosh(row) + 1
        factor = smax / s * numerator / denominator
        grad = embedding.grad
        grad[task] *= factor
        grad[:task] = 0.0
        grad[task + 1:] = 0.0
