"""What the parameter-isolation baselines share (FineAll, SinMo, PeterRec, Piggyback): not a method itself.

Each is fine-tuning's stage 1 (next item, no masks) and, at stage K ≥ 2, a new task that reads what
`task_options` gives it (add_task's options) and, with `freeze_backbone`, a shared item embedding and residual
blocks that no later task trains; its CE trains only its own parameters, so no earlier task is forgotten.
From stage 2 on a chain must be the method's own: a stage-(K−1) checkpoint of another method holds earlier
tasks it did not keep apart; and its stage 1 must have no task masks (`train_task1.py --method finetune`): read
without its masks, a TERACON stage 1 would score task 1 otherwise than it did, so it is refused.
"""
from __future__ import annotations

from typing import ClassVar

from continual.methods.base import Stage
from continual.methods.finetune import FineTune
from model import NextItNet
from utils import DataError


class Isolation(FineTune):
    """Fine-tuning's losses; every task from the second on gets parameters of its own."""
    stage1_method = "finetune"              # compare.py: a stage 1 without masks, so task 1 reads as trained
    freeze_backbone: ClassVar[bool] = False
    grows_items: ClassVar[bool] = False  # --protocol time: new rows of a frozen embedding (not yet)

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
