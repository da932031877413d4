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

from continual.methods.isolation import Isolation
from model import NextItNet


class PeterRec(Isolation):
    """A frozen backbone with per-task model patches."""
    name = "peterrec"
    freeze_backbone = True

    def task_options(self, model: NextItNet) -> dict:
        return {"part": "patch"}
