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

from continual.methods.isolation import Isolation
from model import NextItNet


class Piggyback(Isolation):
    """A frozen backbone, a learned binary weight mask per task."""
    name = "piggyback"
    freeze_backbone = True

    def task_options(self, model: NextItNet) -> dict:
        return {"part": "weight_mask"}
