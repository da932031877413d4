"""Read the authors' checkpoints (Sein-Kim/TERACON_original) as checkpoints of this suite.

The authors' scripts save `{'net': model.state_dict(), 'acc(hit@1)': acc}`. `convert_original` recognises
the two layouts they produce by key names and shapes and returns one of our checkpoint dicts (format 1),
converted in memory; nothing of theirs is executed (the file was read with torch.load(weights_only=True)).

What the files hold (C channels, V items with <UNK>, n_k task k's class count, K the stage):

* Stage 1 (train_task1.py, generator_hat_other.NextItNet_Decoder):
  `embeding` [V, C]; per residual block i (8 blocks, dilations 1,4,1,4,...): `conv1`/`conv2` Conv2d weights
  [C, C, 1, k], `ln1`/`ln2`, and `ec1`/`ec2` Embedding(6, C) (one row per task slot; only row 0 is
  trained); `final_layer` [V, C] = task 1's head; `two_layer_1` [C, C] and `two_layer_2` [10, C], a
  two-layer head the task-1 script never calls (dropped).
* Stage K ≥ 2 (train_teracon_tK.py, teracon.NextItNet_Decoder with num_task = K):
  the same backbone and `ec1`/`ec2` (rows 0..K−1 are tasks 1..K; the other rows keep their random
  init), plus per block `mlp1.{t}` / `mlp2.{t}` = Linear(2K−1, 1) for t = 0..K−1 (the relation layers of
  task t+1, re-initialised at every stage); `final_layer` [n_K, C] = task K's head (trained on its CE);
  `one_layer_task{j}` = task j's head for j < K (trained only through the retention MSE; the model's
  forward with backward=True picks it for task index j−1); `past_final_layer`, a head the student
  never uses. The heads' sizes per stage, from load_model.taskK_model and the scripts:
    - stage 2: `past_target_size` = len(items) = V, so `past_final_layer` and all five
      `one_layer_task*` are [V, C]. load_model.task2_model copies task 1's `final_layer` into both
      `one_layer_task1` (the student's task-1 head, trained) and `past_final_layer` (receives no gradient,
      so it stays the stage-1 head). `one_layer_task2..5` are untrained [V, C] placeholders.
    - stage K ≥ 3: the script replaces `one_layer_task1..K−1` with Linear(C, n_j) using TTL's sizes
      hard-coded (645974, 17880, 7540, 9, 3) and loads them from the stage-(K−1) file (whose
      `final_layer` becomes `one_layer_task{K−1}`); `one_layer_taskK..5` stay untrained [V, C];
      `past_final_layer` [V, C] is deleted from the loaded dict, so it is a fresh random init.
  Only `final_layer` and `one_layer_task1..K−1` are heads of the converted model.

Masks: stage 1 uses σ(s·ec[0]) (our relation=False); stage K ≥ 2 uses attn_fmask for every task of the
student — σ(s·(w_t·tanh(s·[e_t; e_j; −e_j for j ≠ t ascending]) + b_t)) — which is our relation=True with
relation_weight[t, layer] = mlp{1,2}.{t}.weight[0] and relation_bias[t, layer] = mlp{1,2}.{t}.bias[0].
"""
from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any

import torch

from model import CHECKPOINT_FORMAT, ModelConfig, NextItNet
from utils import DataError

# ---------------------------------------------------------------- the key mapping (the only one)
# (original key, as a regular expression; our key, formatted with the groups and {layer} = 2·i + c − 1,
#  {last} = K − 1, {head} = j − 1, where `name[...]` is a slot of a stacked tensor; transform)
KEY_MAP: list[tuple[str, str | None, str]] = [
    (r"embeding\.weight",                                       "item_embedding.weight",        "copy"),
    (r"residual_blocks\.(?P<i>\d+)\.conv(?P<c>[12])\.weight",    "blocks.{i}.conv{c}.weight",    "conv2d_to_conv1d"),
    (r"residual_blocks\.(?P<i>\d+)\.conv(?P<c>[12])\.bias",      "blocks.{i}.conv{c}.bias",      "copy"),
    (r"residual_blocks\.(?P<i>\d+)\.ln(?P<c>[12])\.(?P<p>weight|bias)", "blocks.{i}.ln{c}.{p}",  "copy"),
    (r"residual_blocks\.(?P<i>\d+)\.ec(?P<c>[12])\.weight",      "task_embedding[:, {layer}]",   "task_rows"),
    (r"residual_blocks\.(?P<i>\d+)\.mlp(?P<c>[12])\.(?P<t>\d+)\.weight", "relation_weight[{t}, {layer}]", "relation_weight"),
    (r"residual_blocks\.(?P<i>\d+)\.mlp(?P<c>[12])\.(?P<t>\d+)\.bias",   "relation_bias[{t}, {layer}]",   "relation_bias"),
    (r"final_layer\.(?P<p>weight|bias)",                        "heads.{last}.{p}",             "copy"),
    (r"one_layer_task(?P<j>[1-5])\.(?P<p>weight|bias)",          "heads.{head}.{p}",             "earlier_head"),
    (r"past_final_layer\.(?P<p>weight|bias)",                   None,                           "drop"),
    (r"two_layer_[12]\.(?P<p>weight|bias)",                     None,                           "drop"),
]
# conv2d_to_conv1d: [C, C, 1, k] → [C, C, k] (same taps order). task_rows: ec [6, C] → rows 0..K−1.
# relation_weight: Linear(2K−1, 1).weight [1, 2K−1] → [2K−1]; relation_bias: [1] → scalar.
# earlier_head: task j's head when j < K, else an untrained placeholder (dropped). drop: not converted.

ORIGINAL_DILATIONS = [1, 4, 1, 4, 1, 4, 1, 4]  # every script of the authors; not recoverable from shapes
ORIGINAL_TASK_SLOTS = 6                       # rows of ec1/ec2
ORIGINAL_SMAX = 50.0                          # default --smax of every script; evaluation uses s = smax
ORIGINAL_SEED, ORIGINAL_SPLIT = 10, 0.2
REC_ABOVE = 20                                # rec when n_classes > top_k + 15 (top_k = 5), as trainer.task_record

_COMPILED = [(re.compile(pattern), ours, how) for pattern, ours, how in KEY_MAP]
_SLOT = re.compile(r"(\w+)\[(.*)\]")


def convert_original(checkpoint: dict, path: str) -> dict:
    """An authors' checkpoint ({'net': state_dict, 'acc(hit@1)': acc}) → our checkpoint dict.

    Raises DataError naming `path` when the dict is neither layout.
    """
    net = checkpoint.get("net") if isinstance(checkpoint, dict) else None
    if net is None and isinstance(checkpoint, dict) and "embeding.weight" in checkpoint:
        net = checkpoint  # a bare state dict of the authors' model
    if not isinstance(net, dict) or not net:
        keys = ", ".join(sorted(map(str, checkpoint))[:5]) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise DataError(f"{path}: not a checkpoint of this suite (no model_config) nor of the authors' code "
                        f"(no 'net'; has {keys or 'nothing'})")
    if "task_classifier.0.weight" in net:
        config, state = _convert_revised(net, path)
        return _our_checkpoint(checkpoint, config, state, path, "revised", None)
    matches = _match_keys(net, path)
    shape = _infer_shape(net, matches, path)
    state = _convert_state(net, matches, shape, path)
    _check_against_model(state, shape["config"], path)
    config = shape["config"]
    layout = "generator_hat_other" if config.n_tasks == 1 else "teracon"
    return _our_checkpoint(checkpoint, config, state, path, layout, _spare_rows(net, config))


def _our_checkpoint(checkpoint: dict, config: ModelConfig, state: dict, path: str, layout: str,
                    spare_rows: torch.Tensor | None) -> dict:
    stage = config.n_tasks
    tasks = []
    for number, n_classes in enumerate(config.task_classes, start=1):
        kind = "rec" if number == 1 or n_classes > REC_ABOVE else "cls"
        tasks.append({"name": f"task{number}", "datapath": None, "kind": kind, "n_classes": int(n_classes),
                      "seed": ORIGINAL_SEED, "split_percentage": ORIGINAL_SPLIT})
    accuracy = checkpoint.get("acc(hit@1)") if isinstance(checkpoint, dict) else None
    accuracy = float(accuracy) if isinstance(accuracy, (int, float)) else None
    return {
        "format_version": CHECKPOINT_FORMAT,
        "stage": stage,
        "model_config": asdict(config),
        "model_state": state,
        "tasks": tasks,
        "index_path": None,
        "run_config": {"stage": stage, "method": "teracon", "smax": ORIGINAL_SMAX, "top_k": 5, "seed": ORIGINAL_SEED,
                       "split_percentage": ORIGINAL_SPLIT, "converted_from": str(path), "original_layout": layout,
                       "original_acc_hit1": accuracy},
        "method_state": {},
        "epoch": -1,  # unknown: the authors' files do not record it
        "valid": {},
        **({"spare_task_rows": spare_rows} if spare_rows is not None else {}),
    }


def _convert_revised(net: dict, path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The revised code's layout (Sein-Kim/TERACON: generator_hat_other at stage 1, teracon at stage K): per
    block `ec.{k}` = Embedding(2, C) (row 0 masks conv1, row 1 conv2), `mlp1/mlp2.{t}` at stages ≥ 2, and
    `task_classifier.{k}` = task k+1's head. Its numbering has no `<UNK>` (read its index.csv with it)."""
    embedding = _need(net, "embeding.weight", None, path)
    n_items, channels = map(int, embedding.shape)
    n_blocks = len(ORIGINAL_DILATIONS)
    n_tasks = len({key for key in net if re.fullmatch(r"task_classifier\.\d+\.weight", key)})
    relation = any(".mlp1." in key for key in net)
    kernel = int(_need(net, "residual_blocks.0.conv1.weight", None, path).shape[3])
    state: dict[str, torch.Tensor] = {"item_embedding.weight": embedding}
    rows = torch.empty(n_tasks, 2 * n_blocks, channels)
    weights = torch.empty(n_tasks, 2 * n_blocks, 2 * n_tasks - 1)
    biases = torch.empty(n_tasks, 2 * n_blocks)
    for i in range(n_blocks):
        for c in (1, 2):
            state[f"blocks.{i}.conv{c}.weight"] = _need(net, f"residual_blocks.{i}.conv{c}.weight",
                                                        (channels, channels, 1, kernel), path).squeeze(2)
            for part in ("conv{c}.bias", "ln{c}.weight", "ln{c}.bias"):
                name = part.format(c=c)
                state[f"blocks.{i}.{name}"] = _need(net, f"residual_blocks.{i}.{name}", (channels,), path)
        for k in range(n_tasks):
            rows[k, 2 * i:2 * i + 2] = _need(net, f"residual_blocks.{i}.ec.{k}.weight", (2, channels), path)
            for c in (1, 2) if relation else ():
                weights[k, 2 * i + c - 1] = _need(net, f"residual_blocks.{i}.mlp{c}.{k}.weight",
                                                  (1, 2 * n_tasks - 1), path)[0]
                biases[k, 2 * i + c - 1] = _need(net, f"residual_blocks.{i}.mlp{c}.{k}.bias", (1,), path)[0]
    classes = []
    for k in range(n_tasks):
        head = _need(net, f"task_classifier.{k}.weight", None, path)
        classes.append(int(head.shape[0]))
        state[f"heads.{k}.weight"] = head
        state[f"heads.{k}.bias"] = _need(net, f"task_classifier.{k}.bias", (int(head.shape[0]),), path)
    state["task_embedding"] = rows
    if relation:
        state["relation_weight"], state["relation_bias"] = weights, biases
    config = ModelConfig(n_items=n_items, task_classes=classes, channels=channels, dilations=list(ORIGINAL_DILATIONS),
                         kernel_size=kernel, relation=relation)
    for key in net:
        _finite(net, key, path)
    state = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in state.items()}
    _check_against_model(state, config, path)
    return config, state


def _finite(net: dict, key: str, path: str) -> torch.Tensor:
    """net[key] as float32 on the CPU; a DataError naming the file when it holds NaN or inf."""
    tensor = net[key].detach().to("cpu", torch.float32)
    if not torch.isfinite(tensor).all():
        raise DataError(f"{path}: {key} holds NaN or inf (a diverged run of the authors' code; "
                        f"its empty-sample retention loss is NaN when batch × ratio < 1)")
    return tensor


def _spare_rows(net: dict, config: ModelConfig) -> torch.Tensor:
    """Rows K..5 of every ec1/ec2 → [6 − K, n_layers, C]: the original's later tasks' embedding rows, as its
    stage-1 constructor drew them (no stage touches them before their task; replay.py uses them)."""
    layers = [net[f"residual_blocks.{i}.ec{c}.weight"][config.n_tasks:] for i in range(len(config.dilations))
              for c in (1, 2)]                                                   # n_layers × [6 − K, C]
    return torch.stack(layers, dim=1).detach().to("cpu", torch.float32).contiguous()


# ---------------------------------------------------------------- steps

def _match_keys(net: dict, path: str) -> dict[str, tuple[re.Match, str | None, str]]:
    matches = {}
    for key, value in net.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise DataError(f"{path}: 'net' holds {key!r} = {type(value).__name__}, not a state dict of the authors' model")
        for pattern, ours, how in _COMPILED:
            found = pattern.fullmatch(key)
            if found:
                matches[key] = (found, ours, how)
                break
        else:
            raise DataError(f"{path}: unknown layout: key {key!r} is in neither the task-1 "
                            f"(generator_hat_other) nor the task-K (teracon) model of the authors")
    return matches


def _need(net: dict, key: str, shape: tuple[int, ...] | None, path: str) -> torch.Tensor:
    if key not in net:
        raise DataError(f"{path}: unknown layout: no {key!r}")
    tensor = net[key]
    if shape is not None and tuple(tensor.shape) != shape:
        raise DataError(f"{path}: unknown layout: {key} has shape {list(tensor.shape)}, expected {list(shape)}")
    if not tensor.is_floating_point():
        raise DataError(f"{path}: {key} is {tensor.dtype}, not a floating-point tensor")
    return tensor


def _infer_shape(net: dict, matches: dict, path: str) -> dict[str, Any]:
    """Channels, kernel, blocks, vocabulary, stage K and head sizes, all checked against each other."""
    embedding = _need(net, "embeding.weight", None, path)
    if embedding.dim() != 2:
        raise DataError(f"{path}: unknown layout: embeding.weight has shape {list(embedding.shape)}")
    n_items, channels = map(int, embedding.shape)
    blocks = sorted({int(found["i"]) for found, _, _ in matches.values() if "i" in found.groupdict()})
    if blocks != list(range(len(ORIGINAL_DILATIONS))):
        raise DataError(f"{path}: unknown layout: {len(blocks)} residual blocks numbered {blocks[0] if blocks else '-'}.."
                        f"{blocks[-1] if blocks else '-'}; the authors' NextItNet has {len(ORIGINAL_DILATIONS)} "
                        f"(dilations {','.join(map(str, ORIGINAL_DILATIONS))}, not stored in the file)")
    conv = _need(net, "residual_blocks.0.conv1.weight", None, path)
    if conv.dim() != 4 or conv.shape[2] != 1 or tuple(conv.shape[:2]) != (channels, channels):
        raise DataError(f"{path}: unknown layout: residual_blocks.0.conv1.weight has shape {list(conv.shape)}, "
                        f"expected [{channels}, {channels}, 1, k]")
    kernel = int(conv.shape[3])
    relation_keys = [found for found, _, how in matches.values() if how.startswith("relation")]
    n_tasks = len({int(found["t"]) for found in relation_keys}) if relation_keys else 1
    stage_one = not relation_keys
    if stage_one and any(how in ("earlier_head", "drop") and key.startswith(("one_layer", "past_final"))
                         for key, (_, _, how) in matches.items()):
        raise DataError(f"{path}: unknown layout: earlier-task heads (one_layer_task*/past_final_layer) but no "
                        f"relation layers (mlp1/mlp2), as in none of the authors' saved models")
    if not stage_one and any(key.startswith("two_layer_") for key in matches):
        raise DataError(f"{path}: unknown layout: two_layer_* (task-1 model) next to relation layers (task-K model)")
    if n_tasks > ORIGINAL_TASK_SLOTS:
        raise DataError(f"{path}: unknown layout: {n_tasks} tasks; the authors' model has {ORIGINAL_TASK_SLOTS} slots")

    for i in blocks:
        for c in (1, 2):
            _need(net, f"residual_blocks.{i}.conv{c}.weight", (channels, channels, 1, kernel), path)
            _need(net, f"residual_blocks.{i}.conv{c}.bias", (channels,), path)
            _need(net, f"residual_blocks.{i}.ln{c}.weight", (channels,), path)
            _need(net, f"residual_blocks.{i}.ln{c}.bias", (channels,), path)
            _need(net, f"residual_blocks.{i}.ec{c}.weight", (ORIGINAL_TASK_SLOTS, channels), path)
            if not stage_one:
                for t in range(n_tasks):
                    _need(net, f"residual_blocks.{i}.mlp{c}.{t}.weight", (1, 2 * n_tasks - 1), path)
                    _need(net, f"residual_blocks.{i}.mlp{c}.{t}.bias", (1,), path)
    extra = sorted(key for key, (found, _, how) in matches.items()
                   if how.startswith("relation") and int(found["t"]) >= n_tasks)
    if extra:
        raise DataError(f"{path}: unknown layout: {extra[0]} beyond {n_tasks} tasks")

    last = _need(net, "final_layer.weight", None, path)
    if last.dim() != 2 or last.shape[1] != channels:
        raise DataError(f"{path}: unknown layout: final_layer.weight has shape {list(last.shape)}")
    task_classes = []
    for j in range(1, n_tasks):
        weight = _need(net, f"one_layer_task{j}.weight", None, path)
        if weight.dim() != 2 or weight.shape[1] != channels:
            raise DataError(f"{path}: unknown layout: one_layer_task{j}.weight has shape {list(weight.shape)}")
        _need(net, f"one_layer_task{j}.bias", (int(weight.shape[0]),), path)
        task_classes.append(int(weight.shape[0]))
    _need(net, "final_layer.bias", (int(last.shape[0]),), path)
    task_classes.append(int(last.shape[0]))
    if task_classes[0] != n_items:
        where = "final_layer" if stage_one else "one_layer_task1"
        raise DataError(f"{path}: unknown layout: task 1's head ({where}) has {task_classes[0]} classes but the "
                        f"embedding {n_items} items")
    config = ModelConfig(n_items=n_items, task_classes=task_classes, channels=channels,
                         dilations=list(ORIGINAL_DILATIONS), kernel_size=kernel, relation=not stage_one)
    return {"config": config, "n_tasks": n_tasks}


def _convert_state(net: dict, matches: dict, shape: dict, path: str) -> dict[str, torch.Tensor]:
    config: ModelConfig = shape["config"]
    n_tasks, n_layers, channels = shape["n_tasks"], config.n_layers, config.channels
    stacked = {"task_embedding": torch.full((n_tasks, n_layers, channels), float("nan"))}
    if config.relation:
        stacked["relation_weight"] = torch.full((n_tasks, n_layers, 2 * n_tasks - 1), float("nan"))
        stacked["relation_bias"] = torch.full((n_tasks, n_layers), float("nan"))
    state: dict[str, torch.Tensor] = {}
    for key, (found, ours, how) in matches.items():
        groups = found.groupdict()
        if how == "drop" or (how == "earlier_head" and int(groups["j"]) >= n_tasks):
            continue
        fields = dict(groups)
        if "i" in groups and "c" in groups:
            fields["layer"] = 2 * int(groups["i"]) + int(groups["c"]) - 1
        fields["last"] = n_tasks - 1
        if "j" in groups:
            fields["head"] = int(groups["j"]) - 1
        tensor = _finite(net, key, path)
        value = _TRANSFORMS[how](tensor, n_tasks)
        target = ours.format(**fields)
        slot = _SLOT.fullmatch(target)
        if slot:
            name, index = slot.group(1), tuple(slice(None) if part.strip() == ":" else int(part)
                                               for part in slot.group(2).split(","))
            stacked[name][index] = value
        else:
            state[target] = value.contiguous()  # shares memory with the loaded file's tensor (no copy)
    for name, tensor in stacked.items():
        if torch.isnan(tensor).any():
            raise DataError(f"{path}: unknown layout: some of {name} has no source tensor")
        state[name] = tensor
    return state


def _check_against_model(state: dict[str, torch.Tensor], config: ModelConfig, path: str) -> None:
    """The converted state must be exactly NextItNet(config)'s (built on the meta device: no memory)."""
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in NextItNet(ModelConfig(**asdict(config))).state_dict().items()}
    got = {key: tuple(value.shape) for key, value in state.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        wrong = sorted(key for key in set(expected) & set(got) if expected[key] != got[key])
        detail = f"missing {missing[0]}" if missing else (f"{wrong[0]} is {list(got[wrong[0]])}, expected "
                                                         f"{list(expected[wrong[0]])}" if wrong else
                                                         f"extra {sorted(set(got) - set(expected))[0]}")
        raise DataError(f"{path}: unknown layout: conversion does not fit the model ({detail})")


_TRANSFORMS = {
    "copy": lambda tensor, n_tasks: tensor,
    "earlier_head": lambda tensor, n_tasks: tensor,
    "conv2d_to_conv1d": lambda tensor, n_tasks: tensor.squeeze(2),
    "task_rows": lambda tensor, n_tasks: tensor[:n_tasks],
    "relation_weight": lambda tensor, n_tasks: tensor[0],
    "relation_bias": lambda tensor, n_tasks: tensor[0],
}
