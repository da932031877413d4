"""CONURE (Yuan et al., SIGIR 2021): each task trains the weights that are still free, keeps the most important
share of them (by magnitude), retrains those and freezes them; later tasks read the frozen ones.

Official code (fajieyuan/SIGIR2021_Conure, TensorFlow): per task, conure_tp_tK.py trains, generator_prune.py
`save_impwei` prunes each residual block's conv1 and conv2 separately among the weights no earlier task
froze, keeping a share (1 − maskp_K) of them, maskp = 0.7 (so 30 % of the still-free weights each time), and
conure_ret_tK.py retrains what was kept. Only the convolution weights and the new head train after task 1:
the biases are not trainable there, the LayerNorms are task 1's, and the item embedding is not in the
optimiser's var_list. Here:

- the model's WeightOwners say which task owns each convolution weight (0 = free); task u reads the weights
  of tasks 1..u, and the free ones while it is being trained before its pruning (model.OwnedWeights);
- a stage has two phases, each fitted with the loop's early stopping: phase 0 trains the free weights (their
  gradients only: `after_backward` zeroes every other convolution gradient); `begin_phase` then keeps the top
  --conure_keep of each convolution's free weights by |w| for the new task, and phase 1 retrains only those;
- stage 1 is CONURE's own (task 1 is pruned too, as the official conure_tp_t1/conure_ret_t1 do), with every
  weight of task 1 trainable; after it, the item embedding, biases and LayerNorms are frozen;
- no task reads a weight that a later task trains, so none is forgotten;
- --protocol time: the item rows a stage creates train in both of its phases, by its task's loss, and freeze from
  the next stage on as every earlier row (base.open_new_item_rows); task 1's head keeps its new rows as drawn.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from continual import flags
from continual.methods.base import Stage, keep_earlier_item_rows, open_new_item_rows
from continual.methods.finetune import FineTune
from model import NextItNet


@dataclass(frozen=True)
class ConureOptions:
    conure_keep: float = flags.option(0.3, "share of each convolution's still-free weights a task keeps and freezes "
                                      "(CONURE's maskp 0.7: keep 0.3)",
                                      type=flags.real(0.0, 1.0, low_open=True, high_open=True,
                                                      what="a share in (0, 1)"))


class Conure(FineTune):
    """Prune, retrain and freeze a share of the free convolution weights per task."""
    name = "conure"
    Options = ConureOptions
    phases = 2
    stage1_method = "conure"              # compare.py: its own stage 1, pruned as every later task

    def begin_stage(self, stage: Stage) -> None:
        super().begin_stage(stage)
        self.phase = 0
        if stage.number >= 2:
            self.require_own_chain(stage, bool(stage.previous_checkpoint["model_config"].get("weight_owners")),
                                   ", from its own stage 1 (train_task1.py --method conure)")

    def model_config(self) -> dict:
        return {"use_masks": False, "weight_owners": True, "open_task": 0}

    def grow(self, model: NextItNet, n_classes: int) -> None:
        model.add_task(n_classes, relation=False)
        model.config.open_task = model.config.n_tasks - 1
        frozen = [*model.item_embedding.parameters()] + [
            p for block in model.blocks for p in (block.conv1.bias, *block.ln1.parameters(), block.conv2.bias,
                                                  *block.ln2.parameters())]
        for parameter in frozen:
            parameter.requires_grad_(False)
        open_new_item_rows(model)

    def trainable(self, owners: torch.Tensor) -> torch.Tensor:
        """The convolution weights this phase trains: the free ones (phase 0), then the new task's own (phase 1)."""
        return owners == (0 if self.phase == 0 else self.stage.number)

    def after_backward(self, model: NextItNet) -> None:
        keep_earlier_item_rows(model)
        for block, owners in zip(model.blocks, model.weight_owners):
            for conv, owned in ((block.conv1, owners.conv1), (block.conv2, owners.conv2)):
                if conv.weight.grad is not None:
                    conv.weight.grad.masked_fill_(~self.trainable(owned), 0.0)

    def begin_phase(self, model: NextItNet, phase: int) -> None:
        """Phase 1: the new task keeps the top --conure_keep of each convolution's free weights by magnitude."""
        self.phase = phase
        with torch.no_grad():
            for block, owners in zip(model.blocks, model.weight_owners):
                for conv, owned in ((block.conv1, owners.conv1), (block.conv2, owners.conv2)):
                    prune(conv.weight, owned, self.stage.number, self.options.conure_keep)
        model.config.open_task = -1


def prune(weight: torch.Tensor, owners: torch.Tensor, number: int, keep: float) -> None:
    """Give task `number` the round(keep · free) free weights of largest |w| (`owners` is changed in place)."""
    free = (owners == 0).flatten().nonzero().squeeze(1)                  # [n_free]
    count = int(round(keep * free.numel()))
    if count == 0:
        return
    magnitude = weight.detach().abs().flatten()[free.to(weight.device)]
    chosen = free[torch.topk(magnitude.cpu(), count, sorted=False).indices]
    owners.view(-1)[chosen.to(owners.device)] = number
