"""Shared pieces: the error a user can fix and the CLI wrapper that reports it, atomic writes, seeding, the
device and the allocator. Dataset presets are in continual/datasets.py, metrics and reports in
continual/evaluation/, checkpoint loading in continual/methods/checkpoints.py."""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import sys
import tempfile
from typing import IO, Any, Callable, Iterator

import numpy as np
import torch


class DataError(Exception):
    """Bad input the user can fix; reported as one line naming the file, no traceback."""


class Preempted(Exception):
    """SIGTERM (a scheduler's warning before it kills) arrived while a stage trained: the run stopped after the step
    under way with its resume state written; the message says where."""


_SIGTERM = {"at_a_step": False, "received": False}   # the loop polls `received` after each step while at_a_step


def cli(main: Callable[[], Any]) -> None:
    """Run `main`, turning DataError, a refused write (OSError: a full disk, no permission) and Ctrl-C or a kill
    into one line on stderr and a non-zero exit, never a traceback."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        print(f"error: {error.filename or 'a file'}: {error.strerror or error}", file=sys.stderr)
        sys.exit(1)
    except Preempted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("interrupted: earlier checkpoints are untouched; this stage's checkpoint so far is marked unfinished "
              "(a later stage refuses it): the same command with --resume continues it", file=sys.stderr)
        sys.exit(130)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM: while a stage trains, noted (the loop stops after the step under way, with its resume state);
    elsewhere, an interrupt as Ctrl-C."""
    if _SIGTERM["at_a_step"]:
        _SIGTERM["received"] = True
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_at_a_step() -> Iterator[None]:
    """While the block runs, a SIGTERM is only noted (sigterm_received) for the loop to act on after its step."""
    _SIGTERM.update(at_a_step=True, received=False)
    try:
        yield
    finally:
        _SIGTERM["at_a_step"] = False
    if _SIGTERM["received"]:            # noted after the loop's last look: an interrupt, as outside the block
        raise KeyboardInterrupt


def sigterm_received() -> bool:
    return _SIGTERM["received"]


def write_failure(path: str, error: BaseException) -> DataError:
    """One line for a write the system refused: the path and the cause (the OSError in the exception's chain, e.g.
    'No space left on device'; torch.save reports a full disk only as 'unexpected pos', so a full file system is
    named from its free space)."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.strerror:
        reason = cause.strerror
    else:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1].strip()[:160]
        try:
            if shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 2**20:
                reason = f"No space left on device ({reason})"
        except OSError:
            pass
    return DataError(f"{path}: could not be written: {reason}; nothing was replaced")


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb") -> Iterator[IO]:
    """A file written under a temporary name in its folder and renamed onto `path` when the block ends: a reader
    never sees a partial file, and an error leaves `path` as it was (or absent) with no temporary file behind. A
    write the system refuses (a full disk, no permission; OSError, or torch.save's RuntimeError) becomes a
    DataError naming `path` and the cause. The file gets ordinary permissions (0666 minus the umask)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temp_path = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as error:
        raise write_failure(path, error) from None
    try:
        with os.fdopen(handle, mode) as stream:
            yield stream
        os.chmod(temp_path, 0o666 & ~current_umask())
        os.replace(temp_path, path)
    except (OSError, RuntimeError) as error:
        raise write_failure(path, error) from None
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    with atomic_file(path, "w") as handle:
        handle.write(text)


def atomic_torch_save(obj: Any, path: str) -> None:
    with atomic_file(path) as handle:
        torch.save(obj, handle)


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    """np.save written atomically."""
    with atomic_file(path) as handle:
        np.save(handle, array)


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
