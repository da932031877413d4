"""FineAll (Yuan et al., SIGIR 2021, CONURE's baseline): for each task, a copy of the stage-1 model with all of
its weights fine-tuned on that task alone.

Stage 1 is fine-tuning's (next item, no masks). At stage K ≥ 2 the new task gets its own copy of the item
embedding and of every residual block, copied from the shared ones, which no later stage trains, so they
are still the stage-1 model's; and a new head. Its CE trains only its own copy: no weight is shared with any
other task, so no task is ever forgotten, and the model grows by a whole backbone per task.
"""
from __future__ import annotations

from continual.methods.isolation import Isolation
from model import NextItNet


class FineAll(Isolation):
    """One backbone per task, each copied from stage 1's and fine-tuned on its task."""
    name = "fineall"

    def task_options(self, model: NextItNet) -> dict:
        return {"own_blocks": len(model.blocks), "own_embedding": True}
