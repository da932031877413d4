"""The ranking metrics of every task, per example: MRR, HR and NDCG at top_k and top_k + 15, and accuracy."""
from __future__ import annotations

import torch

RETEST_PARTS = ("all", "with_new", "without_new")  # --protocol time, a re-test file's users: every one, those whose
                                                   # input holds an item newer than the task's stage, the others


def metric_names(top_k: int) -> list[str]:
    long_k = top_k + 15
    return [f"mrr@{top_k}", f"hit@{top_k}", f"ndcg@{top_k}", f"mrr@{long_k}", f"hit@{long_k}", f"ndcg@{long_k}", "acc"]


def headline_name(kind: str, top_k: int = 5) -> str:
    """The metric a task is judged on: MRR at top_k for rec tasks, accuracy for cls tasks."""
    return f"mrr@{top_k}" if kind == "rec" else "acc"


def ranking_values(logits: torch.Tensor, targets: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-example MRR, HR, NDCG at top_k and top_k+15 and hit@1, as the authors' accuracy_test: the target's rank r
    (from 0) is its position in torch.topk's sorted list of the top top_k+15 (not ranked beyond), hit@1 is argmax's.
    logits [B, n], targets [B] → [B, 7] float64 (columns in the order of `metric_names`; rank_metrics)."""
    n_classes = logits.shape[1]
    top = torch.topk(logits, k=min(top_k + 15, n_classes), sorted=True).indices    # [B, long_k]
    hit = top == targets[:, None]                                                  # [B, long_k]
    rank = torch.where(hit.any(1), hit.to(torch.int8).argmax(1).to(torch.float64),
                       torch.tensor(float("inf"), dtype=torch.float64, device=logits.device))  # [B]
    return rank_metrics(rank, top_k, n_classes, logits.argmax(1) == targets)


def rank_metrics(rank: torch.Tensor, top_k: int, n_classes: int, first: torch.Tensor | None = None) -> torch.Tensor:
    """The seven metrics of each example [n, 7] (order of `metric_names`) from the target's 0-based rank [n]
    (float64; inf: not ranked): MRR = 1/(r+1), NDCG = 1/log2(r+2), HR = 1 inside the top k, 0 outside; hit@1 is
    `first` [n] (argmax's verdict, which breaks ties otherwise than topk) or r == 0."""
    short, long_k = min(top_k, n_classes), min(top_k + 15, n_classes)
    positions = torch.arange(long_k, dtype=torch.float64, device=rank.device)
    reciprocals, gains = 1.0 / (positions + 1.0), 1.0 / torch.log2(positions + 2.0)  # [long_k], per rank
    index = torch.where(rank < long_k, rank, torch.zeros_like(rank)).long()       # [n]: a rank inside the table
    reciprocal, gain = reciprocals[index], gains[index]                          # [n]
    inside_short, inside_long = (rank < short).to(torch.float64), (rank < long_k).to(torch.float64)
    first = rank == 0 if first is None else first
    columns = [reciprocal * inside_short, inside_short, gain * inside_short,
               reciprocal * inside_long, inside_long, gain * inside_long, first.to(torch.float64)]
    return torch.stack(columns, dim=1)


def ranking_sums(logits: torch.Tensor, targets: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-batch sums of `ranking_values`: logits [B, n], targets [B] → [7]."""
    return ranking_values(logits, targets, top_k).sum(0)


def candidate_rank(scores: torch.Tensor, candidates: torch.Tensor, removed: torch.Tensor | None = None) -> torch.Tensor:
    """--eval_negatives (DITTO's evaluation): the target's 0-based rank among its sampled candidates. scores and
    candidates [n, 1 + N] (column 0: the target, its score and class; then its N negatives) → [n] float64: how many
    negatives score higher, or equal with a lower class (the tie rule of a popularity ranking: lower class first).
    removed [n, 1 + N] (a baseline's own source items): a removed negative never counts; a removed target is not
    ranked (inf)."""
    target_score, target_class = scores[:, :1], candidates[:, :1]                                   # [n, 1]
    ahead = (scores[:, 1:] > target_score) | ((scores[:, 1:] == target_score) & (candidates[:, 1:] < target_class))
    if removed is not None:
        ahead &= ~removed[:, 1:]
    rank = ahead.sum(1).to(torch.float64)                                                           # [n]
    if removed is not None:
        rank = torch.where(removed[:, 0], torch.tensor(float("inf"), dtype=torch.float64, device=rank.device), rank)
    return rank


def sampled_ranking_values(logits: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
                           top_k: int) -> torch.Tensor:
    """`ranking_values` among sampled candidates: the target against its own negatives [B, N] (DITTO's 99) instead
    of every class. logits [B, n], targets [B] → [B, 7] (hit@1: the target ranked first among its candidates)."""
    candidates = torch.cat([targets[:, None], negatives], dim=1)                                    # [B, 1 + N]
    rank = candidate_rank(logits.gather(1, candidates), candidates)                                 # [B]
    return rank_metrics(rank, top_k, candidates.shape[1])
