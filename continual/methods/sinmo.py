"""SinMo (Yuan et al., SIGIR 2021, CONURE's baseline): one model per task, trained from scratch on that task alone.

Stage 1 is fine-tuning's (next item, no masks). At stage K ≥ 2 the new task gets its own item embedding and
residual blocks, freshly initialised as a new NextItNet's (no weight of the stage-1 model is read), and a
new head; its CE trains only them. No weight is shared between tasks, so none is forgotten; against
FineAll, it shows what the transfer from task 1 is worth.
"""
from __future__ import annotations

from continual.methods.base import Stage, require_own_chain
from continual.methods.finetune import FineTune
from model import ModelConfig, NextItNet


class SinMo(FineTune):
    """A fresh backbone per task."""
    name = "sinmo"
    stage1_method = "finetune"              # compare.py: a stage 1 without masks, so task 1 reads as trained

    def begin_stage(self, stage: Stage) -> None:
        super().begin_stage(stage)
        require_own_chain(self.name, stage)

    def grow(self, model: NextItNet, n_classes: int) -> None:
        model.config.use_masks = False
        model.add_task(n_classes, relation=False, own_blocks=len(model.blocks), own_embedding=True)
        config = model.config
        fresh = NextItNet(ModelConfig(n_items=config.n_items, task_classes=[n_classes], channels=config.channels,
                                      dilations=list(config.dilations), kernel_size=config.kernel_size))
        task = str(config.n_tasks - 1)
        model.task_item_embeddings[task].load_state_dict(fresh.item_embedding.state_dict())
        model.task_blocks[task].load_state_dict(fresh.blocks.state_dict())
