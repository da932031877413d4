"""FineAll (Yuan et al., SIGIR 2021, CONURE's baseline): for each task, a copy of the stage-1 model with all of
its weights fine-tuned on that task alone.

Stage 1 is fine-tuning's (next item, no masks). At stage K ≥ 2 the new task gets its own copy of the item
embedding and of every residual block, copied from the shared ones, which no later stage trains, so they
are still the stage-1 model's; and a new head. Its CE trains only its own copy: no weight is shared with any
other task, so no task is ever forgotten, and the model grows by a whole backbone per task.
"""
from __future__ import annotations

from continual.methods.base import Stage, require_own_chain
from continual.methods.finetune import FineTune
from model import NextItNet


class FineAll(FineTune):
    """One backbone per task, each copied from stage 1's and fine-tuned on its task."""
    name = "fineall"
    stage1_method = "finetune"              # compare.py: a stage 1 without masks, so task 1 reads as trained

    def begin_stage(self, stage: Stage) -> None:
        super().begin_stage(stage)
        require_own_chain(self.name, stage)

    def grow(self, model: NextItNet, n_classes: int) -> None:
        model.config.use_masks = False            # a TERACON stage-1 checkpoint too: every mask is 1
        model.add_task(n_classes, relation=False, own_blocks=len(model.blocks), own_embedding=True)

