"""The typed run config of a stage: what the loop needs, and what a checkpoint carries (`to_dict`). It imports no
method: config.parse_args fills it from the command line, config.run_config_from_dict from a checkpoint."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class RunConfig:
    """Everything the loop needs to run one stage; `options` is the method's own typed config."""
    stage: int
    datapath: str
    datapath_index: str
    savepath: str
    paths: str | None = None              # the previous stage's checkpoint (stage ≥ 2)
    dataset: str | None = None
    method: str = ""                      # --method (parse_args: the registry's DEFAULT_METHOD when none is given)
    options: Any = None
    epochs: int = 10
    lr: float = 1e-3
    batch: int = 32
    eval_batch: int = 256
    smax: float = 50.0
    variant: str = "revised"
    seed: int = 0
    rerun: int = 0
    top_k: int = 5
    split_percentage: float = 0.2
    gpu_num: str | None = None
    device: str | None = None
    channels: int = 256
    patience: int = 5
    task_kind: str | None = None
    select_on: str = "acc"
    ties: str = "off"
    streams: str = "ours"
    protocol: str = "static"              # static: the item world stays task 1's; time: a stage's task may bring items
    amp: bool = False
    compile: bool = False
    ce_chunk: int | None = None           # rows a wide head's loss computes at a time; None: by size (base.chunk_rows)
    negatives: int = 0                    # task 1's next-item loss: 0 the full softmax; N against N sampled items
    resume: bool = False
    overwrite: bool = False               # train again over this stage's finished checkpoint
    max_steps: int | None = None          # at most this many optimiser steps a phase (a dry run); None: no limit
    eval_users: int | None = None         # every scoring pass reads at most this many users a task; None: all
    eval_negatives: int = 0               # every scoring pass ranks a rec target among N sampled items; 0: every item
    tensorboard: str | None = None        # also write each epoch's history as TensorBoard scalars under this folder

    def to_dict(self) -> dict:
        """Plain values only (the checkpoint is loaded with weights_only): the options as a dict."""
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"},
                "options": asdict(self.options) if self.options is not None else {}}


LOOP_FLAGS = [f.name for f in fields(RunConfig) if f.name not in ("options", "method", "stage")]
