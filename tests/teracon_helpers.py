"""TERACON's loss outside a run, for tests that check it by hand: the method begun on a stage with a given
teacher, ratios and generator (continual.training.loop.method_for), and the old --retention rules' options."""
from __future__ import annotations

from typing import Iterator

import copy

import numpy as np
import torch

from continual.methods.base import Step
from continual.methods.teracon import Teracon, TeraconOptions
from continual.training.config import LEGACY_RULES
from continual.training.distributed import Shard
from continual.training.loop import method_for
from model import ModelConfig, NextItNet


def teracon_options(rule: str = "paper", **changes) -> TeraconOptions:
    """The options of one of the old --retention rules (config.LEGACY_RULES), with `changes` on top."""
    rows, weights, retention_at, distance, carry = LEGACY_RULES[rule]
    return TeraconOptions(**{"rows": rows, "weights": weights, "retention_at": retention_at, "distance": distance,
                             "carry_masks": carry, **changes})


def rule_flags(rule: str) -> list[str]:
    """The command-line flags of one of the old --retention rules."""
    rows, weights, retention_at, distance, carry = LEGACY_RULES[rule]
    return ["--rows", rows, "--weights", weights, "--retention_at", retention_at, "--distance", distance,
            "--carry_masks", carry]


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
