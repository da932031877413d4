"""What the parameter-isolation baselines share (FineAll, SinMo, PeterRec, Piggyback): not a method itself.

Each is fine-tuning's stage 1 (next item, no masks) and, at stage K ≥ 2, a new task that reads what
`task_options` gives it (add_task's options) and, with `freeze_backbone`, a shared item embedding and residual
blocks that no later task trains; its CE trains only its own parameters, so no earlier task is forgotten.
From stage 2 on a chain must be the method's own: a stage-(K−1) checkpoint of another method holds earlier
tasks it did not keep apart; and its stage 1 must have no task masks (`train_task1.py --method finetune`): read
without its masks, a TERACON stage 1 would score task 1 otherwise than it did, so it is refused.

--protocol time: with `freeze_backbone` the shared item embedding trains only the rows that this stage created (by
the new task's CE; base.open_new_item_rows), which freeze from the next stage on. A method whose task reads its own
copy of the embedding trains the new rows there (FineAll says what its earlier tables read). Task 1's head keeps
its new rows as drawn: no later stage trains it. The earlier tasks read none of this stage's rows on their own test
users, so each still scores them exactly.
"""
from __future__ import annotations

from typing import ClassVar

from continual.methods.base import Stage, keep_earlier_item_rows, open_new_item_rows
from continual.methods.finetune import FineTune
from model import NextItNet
from utils import DataError


class Isolation(FineTune):
    """Fine-tuning's losses; every task from the second on gets parameters of its own."""
    stage1_method = "finetune"              # compare.py: a stage 1 without masks, so task 1 reads as trained
    freeze_backbone: ClassVar[bool] = False

    def task_options(self, model: NextItNet) -> dict:
        """The options of `model.add_task` that give the new task its own parameters."""
        raise NotImplementedError(f"{type(self).__name__} does not say what the new task owns")

    def begin_stage(self, stage: Stage) -> None:
        super().begin_stage(stage)
        checkpoint = stage.previous_checkpoint or {}
        written_by = (checkpoint.get("run_config") or {}).get("method")
        if stage.number >= 3:
            self.require_own_chain(stage, True, " from stage 2 on")
        if stage.number == 2 and checkpoint.get("model_config", {}).get("use_masks", False):
            raise DataError(f"{stage.run.paths}: is a stage 1 with task masks (--method {written_by}); --method "
                            f"{self.name} keeps task 1 exactly only from a stage 1 without them: python train_task1.py "
                            "--method finetune ...")

    def grow(self, model: NextItNet, n_classes: int) -> None:
        model.add_task(n_classes, relation=False, **self.task_options(model))
        if self.freeze_backbone:
            for parameter in [*model.item_embedding.parameters(), *model.blocks.parameters()]:
                parameter.requires_grad_(False)
            open_new_item_rows(model)

    def after_backward(self, model: NextItNet) -> None:
        if self.freeze_backbone:
            keep_earlier_item_rows(model)
