"""MTL: at stage K, tasks 1..K trained jointly on their training splits. Not continual: every earlier task's
training data is read again, so it is the reference that continual methods approach, not a competitor.

No masks: one shared backbone and a head per task, as fine-tuning. Stage K starts from the stage-(K−1) MTL
model (at stage 2, from any stage-1 model). Each step adds to the new task's CE, for every earlier task j, the
mean loss of --mtl_batch rows drawn uniformly (with replacement) from task j's training rows with their true
labels: next-item CE over every position of the sequence for task 1, CE of its head else. The tasks weigh
equally (a sum of per-task means). Validation, early stopping and scoring are the loop's, on the new task.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from continual import flags
from continual.methods.base import Step, task_loss
from continual.methods.finetune import FineTune
from model import NextItNet


@dataclass(frozen=True)
class MTLOptions:
    mtl_batch: int = flags.option(0, "rows of each earlier task's training split per step, drawn with replacement "
                                  "(default 0: the stage's --batch)", type=flags.nonnegative_int, stages="later")


class MTL(FineTune):
    """Fine-tuning's model, trained at stage K on the training rows of every task 1..K at once."""
    name = "mtl"
    Options = MTLOptions

    def terms(self, model: NextItNet, step: Step) -> Iterator[torch.Tensor]:
        """The new task's CE, then one term per earlier task j: its loss on a draw of its training rows."""
        yield self.new_task_loss(model, step)
        size = self.options.mtl_batch or step.shard.size
        for number in range(1, self.stage.number):
            data, train_rows = self.stage.examples(number)
            rows = self.draw(train_rows, size)[step.shard.rank::step.shard.world]   # this rank's part
            if rows.size:
                yield task_loss(model, number, data, rows, step.s, self.run.ce_chunk, self.run.negatives)

    def draw(self, train_rows: np.ndarray, size: int) -> np.ndarray:
        """`size` rows of `train_rows`, uniformly with replacement, from the run's generator (the same on every
        rank, and saved by --resume)."""
        return train_rows[self.stage.sampler.rng.integers(0, train_rows.size, size)]
