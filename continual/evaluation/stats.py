"""Evidence for a score: trivial baselines on the same split and bootstrap intervals over test users.

Pure functions over numpy arrays (the rank metrics through metrics.rank_metrics, the one definition the model's
scores use); the training and evaluation plumbing calls them (scoring.evaluate_tasks).

- Baselines, fitted on the task's TRAINING split only:
  rec tasks: every item ranked by its training popularity (`popularity`), and the same ranking with the
  user's own source items removed (`popularity_unseen`); cls tasks: the training split's majority class.
- Intervals: percentile bootstrap (95 %) over test USERS: a line of a task file with m targets is m
  examples of one user, resampled together (a cluster bootstrap). Fixed seed, B resamples; the model's
  metrics, the baselines' and their paired differences are computed on the same resamples.
"""
from __future__ import annotations

import math
import statistics

import numpy as np
import torch

from continual.evaluation.metrics import rank_metrics

BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 1000


def class_counts(labels: np.ndarray, n_classes: int, exclude: tuple[int, ...] = ()) -> np.ndarray:
    """How often each class occurs in `labels` (any shape); classes in `exclude` get −1 (ranked last)."""
    counts = np.bincount(labels.reshape(-1), minlength=n_classes)[:n_classes].astype(np.float64)
    for label in exclude:
        counts[label] = -1.0
    return counts


def rank_values(ranks: np.ndarray, top_k: int, n_classes: int) -> np.ndarray:
    """Per-example metrics [n, 7] (order of metrics.metric_names) from the target's 0-based rank in a ranking
    (np.inf: not ranked): metrics.rank_metrics, the one definition the model's scores use too."""
    return rank_metrics(torch.from_numpy(np.ascontiguousarray(ranks, dtype=np.float64)), top_k, n_classes).numpy()


def popularity_ranks(scores: np.ndarray, targets: np.ndarray, source_classes: np.ndarray | None) -> np.ndarray:
    """The target's 0-based rank in the ranking by `scores` [n_classes] (e.g. class_counts; ties: lower class
    first) for each example (targets [n]); with
    source_classes [n, L] (the classes of the user's source items, −1: none), those classes are removed
    from that user's ranking first, and a target among them is not ranked (np.inf)."""
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(scores.size, dtype=np.int64)
    rank[order] = np.arange(scores.size)                               # [n_classes]
    target_rank = rank[targets].astype(np.float64)                     # [n]
    if source_classes is None:
        return target_rank
    distinct = np.sort(source_classes, axis=1)                         # [n, L]
    repeated = np.zeros(distinct.shape, dtype=bool)
    repeated[:, 1:] = distinct[:, 1:] == distinct[:, :-1]
    valid = (distinct >= 0) & ~repeated                                # each source class once
    ahead = valid & (rank[np.maximum(distinct, 0)] < target_rank[:, None])
    own = (valid & (distinct == targets[:, None])).any(1)
    return np.where(own, np.inf, target_rank - ahead.sum(1))


def bootstrap(values: np.ndarray, groups: np.ndarray | None, resamples: int = BOOTSTRAP_RESAMPLES,
              seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Cluster-bootstrap means: values [n, m] per example, groups [n] user id of each example (None: each
    example its own user) → [resamples, m], each row the mean over the examples of G users drawn with
    replacement from the G test users."""
    values = np.asarray(values, dtype=np.float64)
    if groups is None:
        sums, sizes = values, np.ones(values.shape[0])
    else:
        _, group = np.unique(groups, return_inverse=True)
        sums = np.zeros((group.max() + 1, values.shape[1]))
        np.add.at(sums, group, values)                                 # [G, m]
        sizes = np.bincount(group).astype(np.float64)                  # [G]
    n_groups = sizes.size
    rng = np.random.default_rng(seed)
    draws = np.empty((resamples, values.shape[1]))
    for r in range(resamples):
        chosen = rng.integers(0, n_groups, n_groups)                   # [G]
        draws[r] = sums[chosen].sum(0) / sizes[chosen].sum()
    return draws


def interval(draws: np.ndarray, level: float = 0.95) -> np.ndarray:
    """Percentile interval of bootstrap draws [B, m] → [m, 2] (lower, upper)."""
    tail = (1.0 - level) / 2.0 * 100.0
    return np.stack([np.percentile(draws, tail, axis=0), np.percentile(draws, 100.0 - tail, axis=0)], axis=1)


def kept_share(earlier: np.ndarray, later: np.ndarray, groups: np.ndarray | None,
               resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """How much of a task's score a later checkpoint keeps on the same test examples: mean(later) / mean(earlier),
    with a paired cluster-bootstrap 95 % interval over test users (both means from the same resampled users).
    This is the test users' share of the noise only: it does not see the training seed's.

    earlier [n], later [n]: per-example headline values of the two checkpoints on the same rows; groups [n].
    → {"earlier", "later", "share", "ci95": [lo, hi], "resamples_dropped"}; share is None when mean(earlier) is 0,
    and the resamples whose earlier mean is 0 are dropped (their count is reported).
    """
    pair = np.stack([np.asarray(earlier, np.float64), np.asarray(later, np.float64)], axis=1)   # [n, 2]
    means = pair.mean(0)
    draws = bootstrap(pair, groups, resamples, seed)                                           # [B, 2]
    usable = draws[:, 0] > 0
    ratios = draws[usable, 1] / draws[usable, 0]                                               # [B']
    share = float(means[1] / means[0]) if means[0] > 0 else None
    bounds = interval(ratios[:, None])[0].tolist() if ratios.size else None
    return {"earlier": float(means[0]), "later": float(means[1]), "share": share, "ci95": bounds,
            "resamples_dropped": int((~usable).sum())}


def evidence(model: np.ndarray, baselines: dict[str, np.ndarray], names: list[str], headline: str,
             groups: np.ndarray | None, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """The model's and each baseline's 95 % intervals, and the paired difference against the strongest
    baseline on the headline metric (on the full test set), all from the same bootstrap resamples.

    model [n, m] and each baseline [n, m]: per-example metric values in the order of `names`.
    → {"ci95": {name: [lo, hi]}, "baseline": {b: {"test": {...}, "ci95": {...}}},
       "vs_baseline": {"baseline", "metric", "difference", "ci95", "above", "all": {name: {...}}}}: "above"
    when the interval of the difference lies entirely above 0; "all" holds the same for every metric.
    """
    h = names.index(headline)
    strongest = max(baselines, key=lambda b: (baselines[b][:, h].mean(), b))
    columns = [model] + list(baselines.values()) + [model - baselines[strongest]]
    draws = bootstrap(np.concatenate(columns, axis=1), groups, resamples, seed)
    bounds = interval(draws)                                           # [columns, 2]
    m = len(names)

    def named(block: int) -> dict[str, list[float]]:
        return {name: [float(lo), float(hi)] for name, (lo, hi) in zip(names, bounds[block * m:(block + 1) * m])}

    result = {"ci95": named(0), "baseline": {}}
    for b, (name, values) in enumerate(baselines.items(), start=1):
        result["baseline"][name] = {"test": dict(zip(names, values.mean(0).tolist())), "ci95": named(b)}
    differences = (model - baselines[strongest]).mean(0)
    every = {name: {"difference": float(differences[i]), "ci95": named(len(baselines) + 1)[name],
                    "above": bool(named(len(baselines) + 1)[name][0] > 0)} for i, name in enumerate(names)}
    result["vs_baseline"] = {"baseline": strongest, "metric": headline, **every[headline], "all": every}
    return result


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96 is within 4 %).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value, NaN for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def t_interval(values: list[float]) -> tuple[float, float]:
    """95 % interval of the mean over seeds: mean ± t(0.975, n−1) · sd / √n (NaN for fewer than 2 values)."""
    if len(values) < 2:
        return math.nan, math.nan
    mean, sd = mean_sd(values)
    t = T975[len(values) - 2] if len(values) - 1 <= len(T975) else 1.96
    half = t * sd / math.sqrt(len(values))
    return mean - half, mean + half


def paired_difference(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float, int]:
    """a − b over the seeds both have: (mean, 95 % t-interval low, high, number of seeds)."""
    differences = [a[seed] - b[seed] for seed in sorted(set(a) & set(b))]
    return (mean_sd(differences)[0], *t_interval(differences), len(differences))
