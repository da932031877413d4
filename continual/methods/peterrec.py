"""PeterRec (Yuan et al., SIGIR 2020): the stage-1 network frozen, each later task learning only its own model
patches and head.

Stage 1 is fine-tuning's (next item, no masks). At stage K ≥ 2 the shared item embedding and residual blocks
are frozen (requires_grad off, as Tenrec's PeterRec port), and the new task adds a model patch to every
residual block, a C → C/4 → C bottleneck beside each of the block's two convolutions (the parallel form (b)
of the paper, Tenrec's ResidualBlock_b_2mp_parallel; model.Patch), plus its head. Only its patches and head
train, so no earlier task can be forgotten; each task costs 8 blocks × 2 bottlenecks × (C²/2 + 5C/4) weights
besides its head.
"""
from __future__ import annotations

from continual.methods.base import Stage, require_own_chain
from continual.methods.finetune import FineTune
from model import NextItNet


class PeterRec(FineTune):
    """A frozen backbone with per-task model patches."""
    name = "peterrec"
    stage1_method = "finetune"              # compare.py: a stage 1 without masks, so task 1 reads as trained

    def begin_stage(self, stage: Stage) -> None:
        super().begin_stage(stage)
        require_own_chain(self.name, stage)

    def grow(self, model: NextItNet, n_classes: int) -> None:
        model.config.use_masks = False            # a TERACON stage-1 checkpoint too: every mask is 1
        model.add_task(n_classes, relation=False, part="patch")
        for parameter in [*model.item_embedding.parameters(), *model.blocks.parameters()]:
            parameter.requires_grad_(False)
