"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017), on the suite's model.

No masks: one shared backbone and a head per task, as fine-tuning. At stage K the frozen stage-(K−1) model's
earlier heads label the new task's users, and the model is trained on the new task's CE plus, for every
earlier task j, λ_o · KL(softmax(y_j / T) ‖ softmax(ŷ_j / T)) on the batch's rows (the paper's L_old, a
cross-entropy of the softened outputs, up to the teacher's entropy, which has no gradient), with the
paper's λ_o = 1 and T = 2. Recording the old heads' outputs before training, as the paper does, gives the
same targets as the frozen model here. The paper's warm-up (training the new head alone first) is not done.
Task 1's head reads the source without its last item, the item it predicts (methods.base.retention_inputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from continual import flags
from continual.methods.base import Step, distillation_kl, retention_inputs
from continual.methods.finetune import FineTune
from model import NextItNet


@dataclass(frozen=True)
class LwFOptions:
    lwf_weight: float = flags.option(1.0, "λ_o: weight of the earlier heads' distillation (Li & Hoiem: 1)",
                                     type=flags.nonnegative_float, stages="later")
    lwf_temperature: float = flags.option(2.0, "T: the outputs are compared as softmax(logits / T) (Li & Hoiem: 2)",
                                          type=flags.positive_float, stages="later")


class LwF(FineTune):
    """Fine-tuning plus the distillation of every earlier head's outputs on the new task's users."""
    name = "lwf"
    Options = LwFOptions

    def terms(self, model: NextItNet, step: Step) -> Iterator[torch.Tensor]:
        """CE of the new task, then λ_o · KL_T(teacher_j ‖ student_j) for each earlier task j, one term each."""
        yield self.new_task_loss(model, step)
        if self.stage.number == 1 or self.options.lwf_weight <= 0:
            return
        teacher, smax = self.stage.previous, self.run.smax
        for j in range(self.stage.task):
            x_j = retention_inputs(step.x, slice(None), j)                     # [B, L] or [B, L−1]
            with torch.no_grad():
                old = teacher(x_j, j, smax)[0].float()                         # [B, classes of task j]
            new = model(x_j, j, step.s)[0].float()
            yield self.options.lwf_weight * distillation_kl(new, old, self.options.lwf_temperature)
