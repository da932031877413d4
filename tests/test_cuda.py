"""What only a CUDA GPU can check: bf16 autocast, --compile, the pinned staging copies, the streaming backward and
a one-process torchrun on nccl, each against the same computation in fp32 / eager / one backward / one process.

Every test here is marked `cuda` and skips without a GPU; tools/gpu_check.py runs them (`pytest -m cuda`)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import data_loader
from continual.methods.base import Step
from continual.training import loop
from continual.distributed import Shard
from model import ModelConfig, NextItNet
from teracon_helpers import teracon_loss, teracon_method, teracon_options

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tools/gpu_check.sh)")]
CUDA = torch.device("cuda")


def stage4(seed: int = 0) -> tuple[NextItNet, NextItNet]:
    """A stage-4 student (relation masks) and its frozen stage-3 teacher, on the GPU."""
    torch.manual_seed(seed)
    model = NextItNet(ModelConfig(n_items=300, task_classes=[300], channels=32))
    model.add_task(7)
    model.add_task(5)
    teacher = copy.deepcopy(model).eval().requires_grad_(False).to(CUDA)
    model.add_task(6, relation=True)
    return model.to(CUDA), teacher


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(1, 300, (64, 20), generator=generator).to(CUDA),
            torch.randint(0, 6, (64,), generator=generator).to(CUDA))


def test_staging_copies_from_pinned_buffers_and_gathers_the_rows():
    """Two alternating page-locked buffers, copied asynchronously: every batch arrives exactly, in order."""
    matrix = np.arange(20_000).reshape(1000, 20)[:, 2:17]                              # a strided view
    staging = data_loader.Staging(matrix, CUDA)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 1000, size) for size in (64, 64, 17, 128, 64)]
    arrived = [staging(rows) for rows in batches]
    torch.cuda.synchronize()
    assert all(buffer.is_pinned() for buffer in staging.buffers)
    for rows, tensor in zip(batches, arrived):
        assert tensor.device.type == "cuda"
        np.testing.assert_array_equal(tensor.cpu().numpy(), matrix[rows])


def test_streaming_backward_on_cuda_equals_one_backward_of_the_sum():
    model, teacher = stage4()
    x, y = batch()
    options = teracon_options("paper", alpha=0.7, embedding_clamp="off")
    reference = copy.deepcopy(model)
    loss, _, _ = teracon_loss(reference, teacher, x, y, 3, 7.0, [0.9, 0.5, 0.3], np.random.default_rng(1), options)
    loss.backward()
    captured = {}

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    method = teracon_method(teacher, 3, [0.9, 0.5, 0.3], np.random.default_rng(1), options)
    step_loss, _, stepped = loop.train_step(model, method, Capture(model.parameters(), lr=0.0), Step(x, y, 7.0,
                                                                                                   Shard(64)))
    assert stepped
    torch.testing.assert_close(step_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    for name, parameter in reference.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(captured[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_step_is_finite_and_near_fp32():
    """--amp: the loss under bf16 autocast within 5 % of fp32's (bf16 keeps 8 bits of mantissa, 0.4 % per rounding,
    over a few hundred products per output), the weights finite after the step, the residual stream in fp32."""
    losses = {}
    for amp in (False, True):
        model, teacher = stage4()
        x, y = batch()
        method = teracon_method(teacher, 3, [0.9, 0.5, 0.3], np.random.default_rng(1),
                                teracon_options("paper", alpha=0.7))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses[amp], _, stepped = loop.train_step(model, method, optimizer, Step(x, y, 7.0, Shard(64)), amp)
        assert stepped and all(torch.isfinite(p).all() for p in model.parameters())
        with loop.autocast(CUDA, amp):
            hidden = model.hidden(x, model.task_masks(3, 50.0), True, 3)
        assert hidden.dtype == torch.float32
    assert float(losses[True]) == pytest.approx(float(losses[False]), rel=0.05)


def test_compiled_backbone_on_cuda_gives_the_eager_outputs():
    model, _ = stage4()
    x, _ = batch()
    model.eval()
    with torch.no_grad():
        eager = model(x, 3, 50.0)[0]
        compiled = loop.compile_backbone(copy.deepcopy(model))
        for _ in range(2):                                             # the first call compiles
            out = compiled(x, 3, 50.0)[0]
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_one_process_torchrun_on_nccl_matches_one_process(data_writer, repo_root, subprocess_env, tmp_path):
    """train_task1.py under torchrun (1 rank, nccl on cuda:0) scores as the same run without it, within 0.02: CUDA's
    atomic adds (the embedding's backward) differ between any two runs in the last bits, which an epoch can carry
    into a few test users' ranks."""
    data = data_writer(tmp_path / "data", n_users=200, seed=2)
    common = ["--datapath", str(data.task1), "--datapath_index", str(tmp_path / "index.csv"), "--channels", "16",
              "--epochs", "1", "--device", "cuda"]
    plain = subprocess.run([sys.executable, "train_task1.py", *common, "--savepath", str(tmp_path / "plain")],
                           cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr[-2000:]
    ranked = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                             "train_task1.py", *common, "--savepath", str(tmp_path / "ranked")],
                            cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert ranked.returncode == 0, ranked.stderr[-2000:]
    scores = [json.loads((tmp_path / f"{name}.metrics.json").read_text())["tasks"]["1"]["test"]
              for name in ("plain", "ranked")]
    for metric, value in scores[0].items():
        assert scores[1][metric] == pytest.approx(value, abs=0.02), metric
