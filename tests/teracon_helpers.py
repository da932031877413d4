"""TERACON's loss outside a run, for tests that check it by hand: the method begun on a stage with a given
teacher, ratios and generator (continual.training.loop.method_for), and options built from today's presets."""
from __future__ import annotations

from typing import Iterator

import copy

import numpy as np
import torch

from continual.methods.base import Step
from continual.methods.teracon import PRESETS, Teracon, TeraconOptions
from continual.distributed import Shard
from continual.training.loop import method_for
from model import ModelConfig, NextItNet


# The recommended preset's retention terms (mean weights, KL at smax) over every row of each earlier task: the rule
# most loss tests check by hand, as it makes every retention row count.
KL_EVERY_ROW = {"rows": "all", "weights": "mean", "retention_at": "smax", "distance": "kl"}


def teracon_options(preset: str = "paper", **changes) -> TeraconOptions:
    """The options of --preset `preset` with `changes` on top (as the flags would set them)."""
    return TeraconOptions(**{**PRESETS[preset], "preset": preset, **changes})


def option_flags(**options) -> list[str]:
    """The command-line flags that set `options`."""
    return [word for name, value in options.items() for word in (f"--{name}", str(value))]


def teracon_method(teacher: NextItNet | None, task: int, ratios: list[float], rng: np.random.Generator,
                   options: TeraconOptions, smax: float = 50.0, expert: NextItNet | None = None,
                   ce_chunk: int = 0) -> Teracon:
    """TERACON begun on stage task + 1 with `teacher` as the frozen previous model and `ratios` as the previous
    batch's sampling ratios."""
    method = method_for("teracon", options, task + 1, teacher, rng, smax=smax, ce_chunk=ce_chunk)
    method.ratios, method.expert = list(ratios), expert
    return method


def teracon_terms(model: NextItNet, teacher: NextItNet, x: torch.Tensor, y: torch.Tensor, task: int, s: float,
                  ratios: list[float], rng: np.random.Generator, options: TeraconOptions, smax: float = 50.0,
                  shard: Shard | None = None, expert: NextItNet | None = None
                  ) -> tuple[Iterator[torch.Tensor], Teracon]:
    """The stage's loss terms, one at a time, and the method (whose .ratios become this batch's)."""
    method = teracon_method(teacher, task, ratios, rng, options, smax, expert)
    return method.terms(model, Step(x, y, s, shard or Shard(x.shape[0]))), method


def teracon_loss(model: NextItNet, teacher: NextItNet, x: torch.Tensor, y: torch.Tensor, task: int, s: float,
                 ratios: list[float], rng: np.random.Generator, options: TeraconOptions, smax: float = 50.0,
                 shard: Shard | None = None, expert: NextItNet | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """The whole stage-K loss as one graph → (loss, its retention part detached, next batch's ratios)."""
    terms, method = teracon_terms(model, teacher, x, y, task, s, ratios, rng, options, smax, shard, expert)
    ce, *kept = list(terms)
    retention = torch.stack(kept).sum() if kept else ce.new_zeros(())
    return ce + retention, retention.detach(), method.ratios


def task1_loss(model: NextItNet, sequence: torch.Tensor, s: float, l2: float, ce_chunk: int = 0) -> torch.Tensor:
    """TERACON's stage-1 loss: next-item CE under σ(s·e_1) + L2 · mean mask."""
    method = teracon_method(None, 0, [], np.random.default_rng(0), TeraconOptions(L2=l2), ce_chunk=ce_chunk)
    return next(method.terms(model, Step(sequence, None, s, Shard(sequence.shape[0]))))


def stage4_models(seed: int = 0, own_blocks: int = 0) -> tuple[NextItNet, NextItNet]:
    """A stage-4 model (the new task with `own_blocks` top blocks of its own) and its frozen stage-3 teacher."""
    torch.manual_seed(seed)
    model = NextItNet(ModelConfig(n_items=40, task_classes=[40], channels=16))
    model.add_task(7)
    model.add_task(5)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    model.add_task(6, relation=True, own_blocks=own_blocks)
    return model, teacher
