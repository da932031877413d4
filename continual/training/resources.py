"""What a stage costs: seconds and memory measured while it runs, written to <savepath>.resources.json beside
metrics.json (which holds only results, byte-identical for the same seed). tools/scale_report.py reads them."""
from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field

import torch


def peak_memory_mib(device: torch.device) -> float:
    """MiB: the most the process has held, its peak RSS (as /usr/bin/time -v's maximum resident set size), or on a
    GPU the most torch has allocated there."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SavedForBackward:
    """The activations of a step: per loss term, the bytes of the distinct storages autograd saves for its backward
    while the term is computed (the loop back-propagates each term before the next, so the largest is what is
    alive at once), parameters excluded (they are the model's)."""

    def __init__(self, parameters: list[torch.Tensor]):
        self.parameters = {p.untyped_storage().data_ptr() for p in parameters}
        self.largest = 0

    def term(self) -> torch.autograd.graph.saved_tensors_hooks:
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.parameters:
                storages[storage.data_ptr()] = storage.nbytes()
                self.largest = max(self.largest, sum(storages.values()))
            return tensor
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Resources:
    """Seconds and sizes of one stage, filled in as it runs."""
    device: torch.device
    load_seconds: float = 0.0                       # the previous checkpoint, the index and the task's data
    build_seconds: float = 0.0                      # the models (student, frozen copies) on the device
    step_seconds: list[float] = field(default_factory=list)   # every optimiser step, first included
    evaluation: list[dict] = field(default_factory=list)      # the final scoring: {task, users, seconds} per task
    checkpoint_mib: float = 0.0
    checkpoint_write_seconds: float = 0.0
    batch: int = 0
    parameters: int = 0                             # of the model trained (its gradient and Adam's two moments too)
    held: dict[str, int] = field(default_factory=dict)        # bytes the method holds beyond it (Method.held_bytes)
    data_bytes: int = 0                             # the stage's task data, resident while it trains
    saved_bytes: int = 0                            # activations of the first step's largest term (SavedForBackward)
    shapes: dict = field(default_factory=dict)      # items, length, channels, classes of every task, training rows
    options: dict = field(default_factory=dict)     # the method's options (what its step computes)
    started: float = field(default_factory=time.perf_counter)

    def step_done(self, started: float) -> None:
        synchronize(self.device)
        self.step_seconds.append(time.perf_counter() - started)

    def summary(self) -> dict:
        """The JSON of <savepath>.resources.json."""
        later = self.step_seconds[1:]
        users = sum(entry["users"] for entry in self.evaluation)
        seconds = sum(entry["seconds"] for entry in self.evaluation)
        return {"device": str(self.device), "threads": torch.get_num_threads(), "shapes": self.shapes,
                "options": self.options,
                "peak_rss_mib": round(peak_memory_mib(torch.device("cpu")), 1),
                "peak_gpu_mib": round(peak_memory_mib(self.device), 1) if self.device.type == "cuda" else None,
                "load_seconds": round(self.load_seconds, 2), "build_seconds": round(self.build_seconds, 2),
                "steps": len(self.step_seconds),
                "first_step_seconds": round(self.step_seconds[0], 3) if self.step_seconds else None,
                "step_seconds": round(statistics.median(later), 3) if later else None,
                "evaluation": self.evaluation,
                "eval_seconds_per_10k_users": round(seconds / users * 10_000, 1) if users else None,
                "accounted_mib": self.accounted(),
                "checkpoint_mib": round(self.checkpoint_mib, 1),
                "checkpoint_write_seconds": round(self.checkpoint_write_seconds, 2),
                "stage_seconds": round(time.perf_counter() - self.started, 1)}

    def accounted(self) -> dict:
        """MiB of what the stage holds while it trains, by what it is: the trained model with its gradient and Adam's
        two moments (4 × its float32 parameters), what the method holds (frozen models, kept outputs), the task
        data, and the first step's activations at this batch (with their bytes a batch row, to scale)."""
        mib = 2**20
        held = {name: round(size / mib, 1) for name, size in self.held.items()}
        return {"batch": self.batch, "model_grad_adam": round(16 * self.parameters / mib, 1), **held,
                "task_data": round(self.data_bytes / mib, 1), "activations": round(self.saved_bytes / mib, 1),
                "activations_per_row": round(self.saved_bytes / max(self.batch, 1) / mib, 3)}
