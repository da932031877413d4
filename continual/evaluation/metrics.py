"""The ranking metrics of every task, per example: MRR, HR and NDCG at top_k and top_k + 15, and accuracy."""
from __future__ import annotations

import torch


def metric_names(top_k: int) -> list[str]:
    long_k = top_k + 15
    return [f"mrr@{top_k}", f"hit@{top_k}", f"ndcg@{top_k}", f"mrr@{long_k}", f"hit@{long_k}", f"ndcg@{long_k}", "acc"]


def headline_name(kind: str, top_k: int = 5) -> str:
    """The metric a task is judged on: MRR at top_k for rec tasks, accuracy for cls tasks."""
    return f"mrr@{top_k}" if kind == "rec" else "acc"


def ranking_values(logits: torch.Tensor, targets: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-example MRR, HR, NDCG at top_k and top_k+15 and hit@1, as the authors' accuracy_test.

    The rank r (from 0) is the target's position in torch.topk's sorted list; MRR = 1/(r+1),
    NDCG = 1/log2(r+2), HR = 1, all 0 when the target is outside the top k.
    logits [B, n], targets [B] → [B, 7] float64 (columns in the order of `metric_names`).
    """
    n_classes = logits.shape[1]
    long_k = min(top_k + 15, n_classes)
    top = torch.topk(logits, k=long_k, sorted=True).indices  # [B, long_k]
    hit = (top == targets[:, None]).to(torch.float64)        # [B, long_k]
    rank = torch.arange(long_k, device=logits.device, dtype=torch.float64)
    reciprocal, gain = 1.0 / (rank + 1.0), 1.0 / torch.log2(rank + 2.0)   # [long_k]
    short = min(top_k, n_classes)
    columns = [
        (hit[:, :short] * reciprocal[:short]).sum(1),
        hit[:, :short].sum(1),
        (hit[:, :short] * gain[:short]).sum(1),
        (hit * reciprocal).sum(1),
        hit.sum(1),
        (hit * gain).sum(1),
        (logits.argmax(1) == targets).to(torch.float64),
    ]
    return torch.stack(columns, dim=1)


def ranking_sums(logits: torch.Tensor, targets: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-batch sums of `ranking_values`: logits [B, n], targets [B] → [7]."""
    return ranking_values(logits, targets, top_k).sum(0)
