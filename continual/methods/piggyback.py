"""Piggyback (Mallya et al., ECCV 2018): the stage-1 network frozen, each later task learning a binary mask of
its convolution weights, plus its head.

Stage 1 is fine-tuning's (next item, no masks). At stage K ≥ 2 the shared item embedding, convolutions and
LayerNorms are frozen (the official code's default keeps BatchNorm fixed too: no --train_bn), and the new
task gets a real-valued score per weight of every residual block's two convolutions (model.WeightMask, a
BlockPart), initialised to the official mask_scale 1e-2 and thresholded at 5e-3 into a {0, 1} mask with a
straight-through gradient. The task reads the frozen weights times its mask. Only its scores and head train,
so no earlier task can be forgotten. The official learning rates for masks and classifier are both 1e-4
(run_piggyback_training.sh); here both take the stage's --lr, as every method's parameters do. A stored task
needs one bit per convolution weight; the model holds the real-valued scores, which parameters counts.
"""
from __future__ import annotations

from continual.methods.base import Stage, require_own_chain
from continual.methods.finetune import FineTune
from model import NextItNet


class Piggyback(FineTune):
    """A frozen backbone, a learned binary weight mask per task."""
    name = "piggyback"
    stage1_method = "finetune"              # compare.py: a stage 1 without masks, so task 1 reads as trained

    def begin_stage(self, stage: Stage) -> None:
        super().begin_stage(stage)
        require_own_chain(self.name, stage)

    def grow(self, model: NextItNet, n_classes: int) -> None:
        model.config.use_masks = False            # a TERACON stage-1 checkpoint too: every mask is 1
        model.add_task(n_classes, relation=False, part="weight_mask")
        for parameter in [*model.item_embedding.parameters(), *model.blocks.parameters()]:
            parameter.requires_grad_(False)
