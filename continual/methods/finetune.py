"""Fine-tuning: the forgetting baseline. No masks and no retention; each task gets a new head on the one
shared backbone, which every new task trains as it likes (so earlier tasks are forgotten)."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from continual.methods.base import Method, Step, next_item_loss
from model import NextItNet


class FineTune(Method):
    """Stage 1: next-item CE over every position. Stage K ≥ 2: CE of the new task's head, nothing else."""
    name = "finetune"

    def model_config(self) -> dict:
        return {"use_masks": False}

    def grow(self, model: NextItNet, n_classes: int) -> None:
        model.config.use_masks = False            # a TERACON stage-1 checkpoint too: every mask is 1
        model.add_task(n_classes, relation=False)

    def terms(self, model: NextItNet, step: Step) -> Iterator[torch.Tensor]:
        yield self.new_task_loss(model, step)

    def new_task_loss(self, model: NextItNet, step: Step) -> torch.Tensor:
        """The new task's own loss: next-item CE at stage 1, CE of its head at stage K ≥ 2."""
        if self.stage.number == 1:
            return next_item_loss(model, step.x, model.task_masks(0, step.s), self.run.ce_chunk, self.run.negatives)
        return F.cross_entropy(model(step.x, self.stage.task, step.s)[0].float(), step.y)
