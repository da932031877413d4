"""Tests for continual/original_checkpoints.py on hand-made state dicts in the authors' layouts (no code of theirs).

The reference forward below is written from the paper/SPEC description of the authors' NextItNet:
Conv2d over [B, C, 1, L] after a left ZeroPad2d, LayerNorm(eps 1e-8), ReLU, × mask, residual, head on
the last position; masks σ(s·ec[t]) at stage 1 and the relation-aware mask at stages ≥ 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from continual.methods import checkpoints  # noqa: E402
from continual.original_checkpoints import KEY_MAP, convert_original  # noqa: E402
from model import CHECKPOINT_FORMAT, NextItNet  # noqa: E402
from utils import DataError  # noqa: E402

V, C, K_SIZE, L = 23, 8, 3, 12
DILATIONS = [1, 4, 1, 4, 1, 4, 1, 4]
CLASSES = [V, 31, 4]   # task 1 (items), task 2 (rec: > 20 classes), task 3 (cls)
SMAX = 50.0


def _linear(generator: torch.Generator, rows: int, cols: int, scale: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, cols, generator=generator) * scale, torch.randn(rows, generator=generator) * scale


def original_state(stage: int, seed: int = 0, n_blocks: int = 8) -> dict[str, torch.Tensor]:
    """A state dict named and shaped as the authors' model saved at `stage` (1: generator_hat_other)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"embeding.weight": torch.randn(V, C, generator=g)}
    for i in range(n_blocks):
        block = f"residual_blocks.{i}"
        for c in (1, 2):
            sd[f"{block}.conv{c}.weight"] = torch.randn(C, C, 1, K_SIZE, generator=g) * 0.3
            sd[f"{block}.conv{c}.bias"] = torch.randn(C, generator=g) * 0.1
            sd[f"{block}.ln{c}.weight"] = 1 + 0.1 * torch.randn(C, generator=g)
            sd[f"{block}.ln{c}.bias"] = 0.1 * torch.randn(C, generator=g)
        sd[f"{block}.ec1.weight"] = torch.rand(6, C, generator=g) * 0.2 - 0.1
        sd[f"{block}.ec2.weight"] = torch.rand(6, C, generator=g) * 0.2 - 0.1
        if stage >= 2:
            for c in (1, 2):
                for t in range(stage):
                    w, b = _linear(g, 1, 2 * stage - 1, 0.05)
                    sd[f"{block}.mlp{c}.{t}.weight"], sd[f"{block}.mlp{c}.{t}.bias"] = w, b
    if stage == 1:
        sd["final_layer.weight"], sd["final_layer.bias"] = _linear(g, V, C)
        sd["two_layer_1.weight"], sd["two_layer_1.bias"] = _linear(g, C, C)
        sd["two_layer_2.weight"], sd["two_layer_2.bias"] = _linear(g, 10, C)
        return sd
    sd["final_layer.weight"], sd["final_layer.bias"] = _linear(g, CLASSES[stage - 1], C)
    sd["past_final_layer.weight"], sd["past_final_layer.bias"] = _linear(g, V, C)
    for j in range(1, 6):  # earlier tasks' heads hold their sizes; later slots are [V, C] placeholders
        rows = CLASSES[j - 1] if j < stage else V
        sd[f"one_layer_task{j}.weight"], sd[f"one_layer_task{j}.bias"] = _linear(g, rows, C)
    return sd


def save_and_load(tmp_path: Path, sd: dict, name: str) -> tuple[dict, str]:
    path = str(tmp_path / name)
    torch.save({"net": sd, "acc(hit@1)": 1.0}, path)
    return torch.load(path, map_location="cpu", weights_only=True), path


# ---------------------------------------------------------------- the original's formulas, by hand

def original_masks(sd: dict, stage: int, task: int, s: float) -> list[torch.Tensor]:
    """Per block [mask1, mask2] ([C] each), as the authors' mask (stage 1) and attn_fmask (stage ≥ 2)."""
    masks = []
    for i in range(len(DILATIONS)):
        for c in (1, 2):
            ec = sd[f"residual_blocks.{i}.ec{c}.weight"]
            if stage == 1:
                masks.append(torch.sigmoid(s * ec[task]))
                continue
            rows = [ec[task:task + 1]]
            for j in range(stage):
                if j != task:
                    rows += [ec[j:j + 1], -ec[j:j + 1]]
            context = torch.cat(rows)                                            # [2K−1, C]
            weight = sd[f"residual_blocks.{i}.mlp{c}.{task}.weight"]             # [1, 2K−1]
            bias = sd[f"residual_blocks.{i}.mlp{c}.{task}.bias"]                 # [1]
            mixed = (torch.tanh(s * context).T @ weight.T).T + bias              # [1, C]
            masks.append(torch.sigmoid(s * mixed)[0])
    return masks


def original_head(sd: dict, stage: int, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    if stage == 1 or task == stage - 1:
        return sd["final_layer.weight"], sd["final_layer.bias"]
    return sd[f"one_layer_task{task + 1}.weight"], sd[f"one_layer_task{task + 1}.bias"]


def original_forward(sd: dict, stage: int, task: int, items: torch.Tensor, s: float) -> torch.Tensor:
    """Conv2d + ZeroPad2d residual blocks, last position, the task's head → logits [B, n]."""
    masks = original_masks(sd, stage, task, s)
    x = sd["embeding.weight"][items]                                             # [B, L, C]

    def conv(inp: torch.Tensor, name: str, dilation: int) -> torch.Tensor:
        padded = F.pad(inp.permute(0, 2, 1).unsqueeze(2), ((K_SIZE - 1) * dilation, 0, 0, 0))  # [B, C, 1, L+pad]
        out = F.conv2d(padded, sd[f"{name}.weight"], sd[f"{name}.bias"], dilation=dilation)
        return out.squeeze(2).permute(0, 2, 1)                                   # [B, L, C]

    for i, d in enumerate(DILATIONS):
        block = f"residual_blocks.{i}"
        out = conv(x, f"{block}.conv1", d)
        out = F.relu(F.layer_norm(out, (C,), sd[f"{block}.ln1.weight"], sd[f"{block}.ln1.bias"], eps=1e-8))
        out = out * masks[2 * i]
        out = conv(out, f"{block}.conv2", 2 * d)
        out = F.relu(F.layer_norm(out, (C,), sd[f"{block}.ln2.weight"], sd[f"{block}.ln2.bias"], eps=1e-8))
        out = out * masks[2 * i + 1]
        x = out + x
    weight, bias = original_head(sd, stage, task)
    return x[:, -1] @ weight.T + bias


def items_batch(seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, V, (6, L), generator=g)
    items[0, :5] = 1        # left padding (the padding token "0" is item 1)
    items[1, :] = 1
    return items


# ---------------------------------------------------------------- tests

def test_mapping_table_is_one_table() -> None:
    assert all(len(row) == 3 for row in KEY_MAP)
    assert {how for _, _, how in KEY_MAP} >= {"copy", "conv2d_to_conv1d", "task_rows", "drop"}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_conversion_config_and_records(tmp_path: Path, stage: int) -> None:
    checkpoint, path = save_and_load(tmp_path, original_state(stage), f"task{stage}.t7")
    ours = convert_original(checkpoint, path)
    assert ours["format_version"] == CHECKPOINT_FORMAT and ours["stage"] == stage
    config = ours["model_config"]
    assert config["n_items"] == V and config["channels"] == C and config["kernel_size"] == K_SIZE
    assert config["dilations"] == DILATIONS and config["relation"] == (stage >= 2) and config["use_masks"]
    assert config["task_classes"] == CLASSES[:stage]
    assert [t["name"] for t in ours["tasks"]] == [f"task{k}" for k in range(1, stage + 1)]
    assert [t["kind"] for t in ours["tasks"]] == ["rec", "rec", "cls"][:stage]
    assert all(t["datapath"] is None and t["seed"] == 10 and t["split_percentage"] == 0.2 for t in ours["tasks"])
    assert ours["index_path"] is None and ours["run_config"]["smax"] == SMAX and isinstance(ours["epoch"], int)
    model = NextItNet.from_checkpoint(ours)  # strict load
    assert model.task_embedding.shape == (stage, 16, C)
    if stage >= 2:
        assert model.relation_weight.shape == (stage, 16, 2 * stage - 1)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_weights_go_where_the_table_says(tmp_path: Path, stage: int) -> None:
    sd = original_state(stage, seed=1)
    checkpoint, path = save_and_load(tmp_path, sd, "x.t7")
    state = convert_original(checkpoint, path)["model_state"]
    assert torch.equal(state["item_embedding.weight"], sd["embeding.weight"])
    assert torch.equal(state["blocks.3.conv2.weight"], sd["residual_blocks.3.conv2.weight"][:, :, 0])
    assert torch.equal(state["task_embedding"][:, 5], sd["residual_blocks.2.ec2.weight"][:stage])
    assert torch.equal(state[f"heads.{stage - 1}.weight"], sd["final_layer.weight"])
    for j in range(1, stage):
        assert torch.equal(state[f"heads.{j - 1}.bias"], sd[f"one_layer_task{j}.bias"])
    if stage >= 2:
        assert torch.equal(state["relation_weight"][1, 6], sd["residual_blocks.3.mlp1.1.weight"][0])
        assert torch.equal(state["relation_bias"][0, 7], sd["residual_blocks.3.mlp2.0.bias"][0])


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("s", [SMAX, 0.7])
def test_masks_equal_original_formulas(tmp_path: Path, stage: int, s: float) -> None:
    sd = original_state(stage, seed=2)
    checkpoint, path = save_and_load(tmp_path, sd, "x.t7")
    model = NextItNet.from_checkpoint(convert_original(checkpoint, path))
    for task in range(stage):
        expected = torch.stack(original_masks(sd, stage, task, s))
        assert torch.allclose(model.task_masks(task, s), expected, atol=1e-6, rtol=0)
    if stage >= 2:  # the relation makes the tasks' masks differ
        assert not torch.allclose(model.task_masks(0, 0.7), model.task_masks(1, 0.7))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_forward_equals_original_forward(tmp_path: Path, stage: int) -> None:
    sd = original_state(stage, seed=3)
    checkpoint, path = save_and_load(tmp_path, sd, "x.t7")
    model = NextItNet.from_checkpoint(convert_original(checkpoint, path)).eval()
    items = items_batch()
    with torch.no_grad():
        for task in range(stage):
            for s in (SMAX, 1.3):
                ours, _ = model(items, task, s, last_only=True)
                reference = original_forward(sd, stage, task, items, s)
                assert ours.shape == (items.shape[0], CLASSES[task])
                assert (ours - reference).abs().max() < 1e-5
                full, _ = model(items, task, s, last_only=False)
                assert (full[:, -1] - reference).abs().max() < 1e-5


def test_bare_state_dict_is_accepted(tmp_path: Path) -> None:
    sd = original_state(2)
    assert convert_original(sd, str(tmp_path / "bare.t7"))["stage"] == 2


@pytest.mark.parametrize("case", ["foreign", "no_net", "seven_blocks", "extra_key", "mlp_width", "heads_no_mlp",
                                  "missing_head", "nan", "ec_rows"])
def test_unknown_layouts_raise_data_error_naming_the_file(tmp_path: Path, case: str) -> None:
    sd = original_state(2)
    checkpoint: object = {"net": sd, "acc(hit@1)": 1.0}
    if case == "foreign":
        checkpoint = {"net": {"encoder.weight": torch.zeros(3, 3)}}
    elif case == "no_net":
        checkpoint = {"state_dict": {}, "epoch": 3}
    elif case == "seven_blocks":
        checkpoint = {"net": original_state(1, n_blocks=7)}
    elif case == "extra_key":
        sd["residual_blocks.0.attention.weight"] = torch.zeros(C)
    elif case == "mlp_width":
        sd["residual_blocks.4.mlp2.1.weight"] = torch.zeros(1, 5)
    elif case == "heads_no_mlp":
        for key in [k for k in sd if ".mlp" in k]:
            del sd[key]
    elif case == "missing_head":
        del sd["one_layer_task1.weight"]
    elif case == "nan":
        sd["residual_blocks.2.conv1.bias"][0] = float("nan")
    elif case == "ec_rows":
        sd["residual_blocks.1.ec1.weight"] = torch.zeros(5, C)
    path = str(tmp_path / f"{case}.t7")
    torch.save(checkpoint, path)
    with pytest.raises(DataError) as error:
        convert_original(torch.load(path, map_location="cpu", weights_only=True), path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_load_checkpoint_converts_when_wired(tmp_path: Path) -> None:
    _, path = save_and_load(tmp_path, original_state(3), "task3.t7")
    checkpoint = checkpoints.load_checkpoint(path)
    assert checkpoint["stage"] == 3 and checkpoint["model_config"]["relation"]
    NextItNet.from_checkpoint(checkpoint)
    foreign = tmp_path / "foreign.t7"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(DataError, match=str(foreign)):
        checkpoints.load_checkpoint(str(foreign))
