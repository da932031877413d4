"""Shared pieces: the error a user can fix and the CLI wrapper that reports it, atomic writes, seeding, the
device and the allocator. Dataset presets are in continual/datasets.py, metrics and reports in
continual/evaluation/, checkpoint loading in continual/checkpoints.py."""
from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import sys
import tempfile
from typing import Any, Callable

import numpy as np
import torch


class DataError(Exception):
    """Bad input the user can fix; reported as one line naming the file, no traceback."""


def cli(main: Callable[[], Any]) -> None:
    """Run `main`, turning DataError (and Ctrl-C or a kill) into one line on stderr and a non-zero exit."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: earlier checkpoints are untouched; this stage's best-so-far checkpoint "
              "(if any) is loadable", file=sys.stderr)
        sys.exit(130)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(handle)
    try:
        write(temp_path)
        os.replace(temp_path, path)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)


def atomic_write_text(path: str, text: str) -> None:
    def write(temp_path: str) -> None:
        with open(temp_path, "w", encoding="utf-8") as handle:
            handle.write(text)
    _atomic_write(path, write)


def atomic_torch_save(obj: Any, path: str) -> None:
    _atomic_write(path, lambda temp_path: torch.save(obj, temp_path))


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    """np.save written atomically (through an open handle: np.save would append .npy to the temporary name)."""
    def write(temp_path: str) -> None:
        with open(temp_path, "wb") as handle:
            np.save(handle, array)
    _atomic_write(path, write)


def write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def keep_freed_memory() -> None:
    """Stop glibc from returning large freed blocks to the kernel (no mmap, no trimming).

    A training step frees and re-allocates activation buffers of tens of MiB; by default each is a fresh
    mmap whose pages fault in again, which cost a third of a CPU step in the kernel (5.4M page faults
    per stage-2 step at batch 1024). Memory stays with the process at its peak instead. No effect on
    results; skipped off glibc or when TERACON_SYSTEM_MALLOC=1.
    """
    if os.environ.get("TERACON_SYSTEM_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)


def set_seed(seed: int) -> np.random.Generator:
    """Seed python, numpy and torch; return the numpy Generator the training loop draws batches from."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def resolve_device(device: str | None, gpu_num: str | None) -> torch.device:
    """--device wins; else the original's --gpu_num (an int or 'cpu'); else cuda when available."""
    if device is None and gpu_num is not None:
        device = "cpu" if str(gpu_num) == "cpu" else f"cuda:{gpu_num}"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(device)
