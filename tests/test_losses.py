"""continual/methods/base.py's losses: distillation with a temperature by hand, and losses over heads too wide to
hold their outputs (TTL's task 1: 645,974 items): computed a chunk of rows at a time, they must give the loss and the
gradients of the whole-output computation, and engage only above a size the demo and the benchmark never reach
(issue 49)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from continual.methods import teracon
from continual.methods.base import (DISTANCE_BUFFERS, WIDE_OUTPUT_BYTES, chunk_rows, distillation_kl,
                                    head_cross_entropy, head_distance, next_item_loss, sampled_cross_entropy)


def gradients(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def test_chunk_rows_engages_only_when_the_outputs_exceed_the_budget():
    width = 645_974
    assert WIDE_OUTPUT_BYTES // (4 * width) == 415
    assert chunk_rows(32 * 99, width) == 415                   # TTL's stage-1 batch: 8.2 GB of logits otherwise
    assert chunk_rows(138, width) == 0 and chunk_rows(139, width) == 415   # whole: three buffers in 1 GiB
    assert chunk_rows(256 * 99, 1683) == 0                      # the demo's widest loss: MTL's task 1 at batch 256
    assert chunk_rows(1024 * 29, 501) == 0                      # the benchmark's, at the paper's batch
    assert chunk_rows(100, 10, ce_chunk=30) == 30 and chunk_rows(100, 10, ce_chunk=0) == 0
    assert chunk_rows(20, 10, ce_chunk=30) == 0                 # fewer rows than a chunk: all at once
    assert chunk_rows(921, width, None, *DISTANCE_BUFFERS) == 138   # the retention distance: three buffers a chunk
    assert chunk_rows(341, width, None, *DISTANCE_BUFFERS) == 138   # stage 4 under --rows share: 341 rows
    assert chunk_rows(69, width, None, *DISTANCE_BUFFERS) == 0      # whole: six buffers
    assert chunk_rows(1024, 17_880, None, *DISTANCE_BUFFERS) == 0   # TTL's click head at batch 1,024


def test_chunked_cross_entropy_is_the_whole_one():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(37, 8, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    whole = head_cross_entropy(head, hidden, targets, 0)
    reference = F.cross_entropy(head(hidden), targets)
    assert whole.item() == reference.item()
    tensors = [hidden, head.weight, head.bias]
    wanted = gradients(whole, tensors)
    for chunk in (1, 5, 36):
        chunked = head_cross_entropy(head, hidden, targets, chunk)
        torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
        for got, want in zip(gradients(chunked, tensors), wanted):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("distance", ["mse", "kl"])
def test_a_trainable_bias_on_a_frozen_weight_gets_its_gradient_in_chunks(distance):
    torch.manual_seed(2)
    head, teacher_head = torch.nn.Linear(8, 60), torch.nn.Linear(8, 60).requires_grad_(False)
    head.weight.requires_grad_(False)
    hidden, teacher_hidden = torch.randn(23, 8, requires_grad=True), torch.randn(23, 8)
    wanted = gradients(head_distance(hidden, head, teacher_hidden, teacher_head, distance, 0), [hidden, head.bias])
    got = gradients(head_distance(hidden, head, teacher_hidden, teacher_head, distance, 4), [hidden, head.bias])
    assert wanted[1].abs().sum() > 0
    for g, w in zip(got, wanted):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("distance", ["mse", "kl"])
def test_chunked_distance_is_the_whole_one(distance):
    torch.manual_seed(1)
    head, teacher_head = torch.nn.Linear(8, 60), torch.nn.Linear(8, 60).requires_grad_(False)
    hidden = torch.randn(23, 8, requires_grad=True)
    teacher_hidden = torch.randn(23, 8)
    whole = head_distance(hidden, head, teacher_hidden, teacher_head, distance, 0)
    student, teacher = head(hidden), teacher_head(teacher_hidden)
    by_hand = ((student - teacher) ** 2).mean() if distance == "mse" else (
        (F.softmax(teacher, 1) * (F.log_softmax(teacher, 1) - F.log_softmax(student, 1))).sum(1).mean())
    torch.testing.assert_close(whole, by_hand, rtol=1e-5, atol=1e-7)
    tensors = [hidden, head.weight, head.bias]
    wanted = gradients(3.0 * whole, tensors)
    for chunk in (1, 4, 22):
        chunked = head_distance(hidden, head, teacher_hidden, teacher_head, distance, chunk)
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-8)
        for got, want in zip(gradients(3.0 * chunked, tensors), wanted):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)


def test_the_stage_one_loss_in_chunks_is_the_whole_one(tiny_model):
    model = tiny_model(task_classes=(30,), channels=8)
    sequence = torch.randint(1, 30, (6, 9))
    whole = next_item_loss(model, sequence, model.task_masks(0, 3.0), ce_chunk=0)
    parameters = [p for p in model.parameters() if p.requires_grad]
    wanted = gradients(whole, parameters)
    chunked = next_item_loss(model, sequence, model.task_masks(0, 3.0), ce_chunk=7)     # 48 rows in 7 chunks
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
    for got, want in zip(gradients(chunked, parameters), wanted):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_sampled_cross_entropy_by_hand_never_against_the_target_and_only_through_the_drawn_rows():
    """--negatives N: each row's target against the N items one uniform draw gives the batch (1..n − 1: never <UNK>),
    a drawn item equal to the row's target left out; the head's gradient reaches only the targets' and the drawn
    rows."""
    torch.manual_seed(3)
    head = torch.nn.Linear(4, 12)
    hidden = torch.randn(5, 4)
    targets = torch.tensor([3, 7, 7, 1, 11])
    torch.manual_seed(21)
    drawn = torch.randint(1, 12, (6,))
    assert set(drawn.tolist()) & set(targets.tolist()) and 0 not in drawn.tolist()   # a collision to leave out
    torch.manual_seed(21)
    loss = sampled_cross_entropy(head, hidden, targets, 6)
    with torch.no_grad():
        logits = hidden @ head.weight.t() + head.bias                                  # [5, 12]
    expected = 0.0
    for row, target in enumerate(targets.tolist()):
        others = [logits[row, item] for item in drawn.tolist() if item != target]
        expected += -(logits[row, target] - torch.logsumexp(torch.stack([logits[row, target], *others]), 0))
    torch.testing.assert_close(loss, expected / 5, rtol=1e-6, atol=1e-7)
    loss.backward()
    touched = set(head.weight.grad.abs().sum(1).nonzero().squeeze(1).tolist())
    assert touched <= set(drawn.tolist()) | set(targets.tolist()) and touched >= set(targets.tolist())


def test_the_stage_one_loss_with_negatives_is_a_sampled_softmax(tiny_model):
    """next_item_loss with negatives > 0 is sampled_cross_entropy over the same rows (the same draw), else the full
    cross-entropy."""
    model = tiny_model(task_classes=(30,), channels=8)
    sequence = torch.randint(1, 30, (6, 9))
    masks = model.task_masks(0, 3.0)
    torch.manual_seed(5)
    sampled = next_item_loss(model, sequence, masks, negatives=4)
    hidden = model.hidden(sequence[:, :-1], masks, last_only=False).reshape(-1, 8)
    torch.manual_seed(5)
    torch.testing.assert_close(sampled, sampled_cross_entropy(model.heads[0], hidden, sequence[:, 1:].reshape(-1), 4))
    assert not torch.equal(sampled, next_item_loss(model, sequence, masks))


def test_distillation_kl_with_a_temperature_by_hand_and_gradient():
    """base.distillation_kl at T ≠ 1 (LwF's T = 2): KL(softmax(teacher / T) ‖ softmax(student / T)), not scaled."""
    gen = torch.Generator().manual_seed(14)
    student = torch.randn(5, 9, generator=gen, requires_grad=True)
    teacher = torch.randn(5, 9, generator=gen)
    temperature = 0.5
    loss = distillation_kl(student, teacher, temperature)
    p, q = torch.softmax(teacher / temperature, 1), torch.softmax(student.detach() / temperature, 1)
    kl = float((p * (p.log() - q.log())).sum(1).mean())
    assert float(loss.detach()) == pytest.approx(kl, rel=1e-5)
    loss.backward()
    torch.testing.assert_close(student.grad, (q - p) / temperature / 5)   # (q_T − p_T) / T per row
    plain = distillation_kl(student.detach(), teacher)
    assert float(plain) != pytest.approx(float(loss.detach()), rel=1e-3)    # the temperature changes the term
    assert float(distillation_kl(student.detach(), teacher, 1.0)) == float(plain)
    assert float(teracon.retention_term(student.detach(), teacher, 0.4, "kl")) == pytest.approx(0.4 * float(plain))
