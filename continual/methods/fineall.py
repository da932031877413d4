"""FineAll (Yuan et al., SIGIR 2021, CONURE's baseline): for each task, a copy of the stage-1 model with all of
its weights fine-tuned on that task alone.

Stage 1 is fine-tuning's (next item, no masks). At stage K ≥ 2 the new task gets its own copy of the item
embedding and of every residual block, copied from the shared ones, which no later stage trains, so they
are still the stage-1 model's; and a new head. Its CE trains only its own copy: no weight is shared with any
other task, so no task is ever forgotten, and the model grows by a whole backbone per task.

--protocol time: the new task's copy holds the rows of this stage's new items (the loop grew every table before the
copy was made) and trains them with the rest of it. Once the stage is trained, the shared embedding (task 1's) and
every earlier task's copy take those rows from it: each frozen table reads the new items through the rows the
trained model learned, as a teacher does (rows that no earlier task's test users read).
"""
from __future__ import annotations

import torch

from continual.methods.base import Stage
from continual.methods.isolation import Isolation
from model import NextItNet


class FineAll(Isolation):
    """One backbone per task, each copied from stage 1's and fine-tuned on its task."""
    name = "fineall"

    def task_options(self, model: NextItNet) -> dict:
        return {"own_blocks": len(model.blocks), "own_embedding": True}

    def end_stage(self, model: NextItNet, stage: Stage) -> None:
        """--protocol time: the new items' rows of the new task's trained copy into every earlier table."""
        first = model.config.first_new_item()
        if first is None:
            return
        tables = model.task_item_embeddings
        learned = tables[str(stage.task)].weight.detach()[first:]                  # [n_new, C]
        with torch.no_grad():
            for table in [model.item_embedding, *(tables[key] for key in tables if key != str(stage.task))]:
                table.weight[first:] = learned
