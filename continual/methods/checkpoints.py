"""Loading checkpoints: ours (they carry their own ModelConfig and run config), those written before the run
config existed (format 1, converted in memory), or the authors' (converted in memory by
original_checkpoints.py). Writing is utils.atomic_torch_save."""
from __future__ import annotations

import os

import torch

from continual.methods import DEFAULT_METHOD, method_class
from continual.original_checkpoints import convert_original
from continual.run_config import LOOP_FLAGS
from model import CHECKPOINT_FORMAT, LEGACY_FORMAT
from utils import DataError


def load_checkpoint(path: str, what: str = "--paths") -> dict:
    """Load one of our checkpoints safely (weights_only); a missing or corrupt file is a DataError."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: checkpoint not found ({what})")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{path}: not a readable checkpoint ({reason[:120]})") from None
    if not isinstance(checkpoint, dict):
        raise DataError(f"{path}: not a checkpoint of this suite or of the authors' code (not a dict)")
    if "model_config" not in checkpoint:
        return convert_original(checkpoint, path)  # the authors' layout, converted in memory
    if checkpoint.get("format_version") == LEGACY_FORMAT:  # written before the typed run config: converted
        args = checkpoint.pop("args", {})
        checkpoint.update(format_version=CHECKPOINT_FORMAT, run_config=legacy_run_config(args), method_state={})
    if checkpoint.get("format_version") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: checkpoint format {checkpoint.get('format_version')} is not {CHECKPOINT_FORMAT}")
    return checkpoint


def is_finished(checkpoint: dict, savepath: str | None = None) -> bool:
    """Whether a checkpoint is its stage's final one: recorded since 2026-12-07 ("finished"); before, a stage whose
    metrics.json was written had finished (checkpoints read without their run: finished)."""
    if "finished" in checkpoint:
        return bool(checkpoint["finished"])
    return savepath is None or os.path.isfile(savepath + ".metrics.json")


def require_finished(checkpoint: dict, path: str, what: str) -> None:
    """Refuse in one line a checkpoint whose stage did not finish (`what` names what reads it, e.g. "--expert")."""
    if not is_finished(checkpoint):
        raise DataError(f"{path}: {what}: stage {checkpoint.get('stage')} did not finish there (its run ended before "
                        "it scored and saved its final model); finish it first: its command again with --resume")


def legacy_run_config(args: dict) -> dict:
    """A format-1 checkpoint's parsed command line (`vars(args)`) → RunConfig.to_dict()'s layout (the method's options
    from its legacy_options)."""
    run = {name: args[name] for name in ["stage", *LOOP_FLAGS] if name in args}
    run["method"] = args.get("method", DEFAULT_METHOD)
    run["options"] = method_class(run["method"]).legacy_options(args)
    return run
