"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017), on the suite's model.

No masks: one shared backbone and a head per task, as fine-tuning. At the end of each stage the diagonal
empirical Fisher F_K of the new task is computed on the best model θ*_K, from per-example gradients of
the task's own loss on its training rows (at most --ewc_samples of them, in the split's random order), and
kept in the checkpoint. At stage K the model is trained on the new task's CE plus the paper's penalty, one
per earlier task j: (λ/2) · Σ_j Σ_i F_j,i (θ_i − θ*_j,i)², over the shared backbone (item embedding and
residual blocks; the heads of earlier tasks receive no other gradient, so they stay where they are).

The sum over tasks is kept as its exact equivalent, F = Σ_j F_j and the Fisher-weighted anchor
θ̄ = Σ_j F_j θ*_j / F: Σ_j F_j (θ − θ*_j)² = F (θ − θ̄)² + a constant, so the gradient is the paper's while the
checkpoint holds two tensors per parameter however many tasks there are.

A stage-(K−1) checkpoint of another method (e.g. compare.py's shared TERACON stage 1) carries no Fisher: the
earlier tasks' are then computed at the start of stage K from that model, without masks as EWC reads it,
which for task K−1 is exactly what the end of its stage would have computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from continual import flags
from continual.methods.base import Stage, Step, task_loss
from continual.methods.finetune import FineTune
from model import NextItNet

SHARED = ("item_embedding.", "blocks.")  # the parameters every task reads: the backbone


@dataclass(frozen=True)
class EWCOptions:
    ewc_lambda: float = flags.option(1e4, "λ: weight of the penalty (λ/2) Σ_j F_j (θ − θ*_j)² (default 1e4, chosen "
                                     "on a draw of the benchmark that no reported number uses; README, Methods)",
                                     type=flags.nonnegative_float, stages="later")
    ewc_samples: int = flags.option(1000, "training examples per task the Fisher is estimated from, one backward pass "
                                    "each, the first of the split's random order (default 1000); 0 = all",
                                    type=flags.nonnegative_int, stages="later")


class EWC(FineTune):
    """Fine-tuning plus the quadratic penalty of every earlier task's Fisher information."""
    name = "ewc"
    Options = EWCOptions

    def begin_stage(self, stage: Stage) -> None:
        super().begin_stage(stage)
        self.tasks, self.fisher, self.anchor = 0, {}, {}
        if stage.number == 1:
            return
        saved = stage.previous_checkpoint.get("method_state") or {}
        if stage.previous_checkpoint.get("run_config", {}).get("method") == self.name and "fisher" in saved:
            self.tasks, self.fisher, self.anchor = saved["tasks"], dict(saved["fisher"]), dict(saved["anchor"])
        if self.tasks < stage.task:                                         # a chain begun by another method
            with torch.random.fork_rng(devices=[]):                         # the stage's own draws stay as they were
                model = NextItNet.from_checkpoint(stage.previous_checkpoint).to(stage.device)
            model.config.use_masks = False
            for number in range(self.tasks + 1, stage.number):
                self.consolidate(model, number)

    def terms(self, model: NextItNet, step: Step) -> Iterator[torch.Tensor]:
        yield self.new_task_loss(model, step)
        if self.tasks and self.options.ewc_lambda > 0:
            yield self.options.ewc_lambda / 2 * self.penalty(model)

    def penalty(self, model: NextItNet) -> torch.Tensor:
        """Σ_i F_i (θ_i − θ̄_i)² over the shared parameters (the earlier tasks' penalties, up to a constant)."""
        total = None
        for name, parameter in shared_parameters(model):
            if self.fisher[name].shape[0] < parameter.shape[0]:              # grown once, not every step
                self.fisher[name], self.anchor[name] = (grown(self.fisher[name], parameter.shape[0]),
                                                        grown(self.anchor[name], parameter.shape[0]))
            fisher = self.fisher[name].to(parameter.device)
            term = (fisher * (parameter - self.anchor[name].to(parameter.device)) ** 2).sum()
            total = term if total is None else total + term
        return total

    def end_stage(self, model: NextItNet, stage: Stage) -> None:
        """The new task's Fisher on the stage's best model, added to the earlier tasks'."""
        self.consolidate(model, stage.number)

    def consolidate(self, model: NextItNet, number: int) -> None:
        """Add task `number`'s Fisher at `model`'s weights: F ← F + F_k, θ̄ ← (F θ̄ + F_k θ*_k) / F."""
        fisher = self.task_fisher(model, number)
        for name, parameter in shared_parameters(model):
            weights = parameter.detach().cpu()
            if name not in self.fisher:
                self.fisher[name], self.anchor[name] = fisher[name], weights.clone()
                continue
            earlier, anchor = grown(self.fisher[name], weights.shape[0]), grown(self.anchor[name], weights.shape[0])
            total = earlier + fisher[name]
            weighted = earlier * anchor + fisher[name] * weights
            self.anchor[name] = torch.where(total > 0, weighted / total.clamp_min(1e-30), weights)
            self.fisher[name] = total
        self.tasks = number

    def task_fisher(self, model: NextItNet, number: int) -> dict[str, torch.Tensor]:
        """The diagonal empirical Fisher of task `number`: the mean over its training examples of the squared
        gradient of the example's loss (next-item CE over its sequence for task 1, CE of its label else)."""
        data, rows = self.stage.examples(number)
        if self.options.ewc_samples:
            rows = rows[:self.options.ewc_samples]
        params = dict(shared_parameters(model))
        sums = {name: torch.zeros_like(p) for name, p in params.items()}
        smax = self.run.smax
        for row in rows:
            loss = task_loss(model, number, data, np.array([row]), smax)                        # one example
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (name, _), grad in zip(params.items(), grads):
                if grad is not None:
                    sums[name] += grad.detach() ** 2
        return {name: (total / max(len(rows), 1)).cpu() for name, total in sums.items()}

    def state_dict(self) -> dict:
        return {"tasks": self.tasks, "fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.tasks, self.fisher, self.anchor = state["tasks"], dict(state["fisher"]), dict(state["anchor"])


def grown(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """An earlier task's Fisher or anchor of a table that has since grown (--protocol time: new items' rows) with
    zero rows appended up to `rows`: a Fisher of 0 leaves those rows free."""
    if tensor.shape[0] >= rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))])


def shared_parameters(model: NextItNet) -> list[tuple[str, torch.nn.Parameter]]:
    """The backbone's parameters (item embedding, shared residual blocks), which every task reads."""
    return [(name, p) for name, p in model.named_parameters() if name.startswith(SHARED)]
