"""SinMo (Yuan et al., SIGIR 2021, CONURE's baseline): one model per task, trained from scratch on that task alone.

Stage 1 is fine-tuning's (next item, no masks). At stage K ≥ 2 the new task gets its own item embedding and
residual blocks, freshly initialised as a new NextItNet's (no weight of the stage-1 model is read), and a
new head; its CE trains only them. No weight is shared between tasks, so none is forgotten; against
FineAll, it shows what the transfer from task 1 is worth.

--protocol time: the new task's fresh table trains the rows of this stage's new items with the rest. The earlier
tasks' tables share no space with it, so they keep their new rows as drawn (FineAll copies them; SinMo does not).
"""
from __future__ import annotations

from continual.methods.base import Stage
from continual.methods.fineall import FineAll
from model import ModelConfig, NextItNet


class SinMo(FineAll):
    """A fresh backbone per task: FineAll's own copies, overwritten with a new NextItNet's initial weights."""
    name = "sinmo"

    def grow(self, model: NextItNet, n_classes: int) -> None:
        super().grow(model, n_classes)
        config = model.config
        fresh = NextItNet(ModelConfig(n_items=config.n_items, task_classes=[n_classes], channels=config.channels,
                                      dilations=list(config.dilations), kernel_size=config.kernel_size))
        task = str(config.n_tasks - 1)
        model.task_item_embeddings[task].load_state_dict(fresh.item_embedding.state_dict())
        model.task_blocks[task].load_state_dict(fresh.blocks.state_dict())

    def end_stage(self, model: NextItNet, stage: Stage) -> None:
        """Nothing to copy: each task's table lives in its own model's space."""
