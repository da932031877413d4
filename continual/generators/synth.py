"""A controlled benchmark for continual user representations: six TTL-format task files from a known
generative model, with each task's best achievable score.

    python tools/synth.py --out Data/synth [--seed 0] [--users 6000] [--items 500] [--length 30] [--clusters 10]
                          [--attribute_classes 5,2,4]

The story (documented in Data/README.md): every user has three attributes (age group, gender, life
status) and a personal favourite item cluster. Together they set the user's taste over item clusters:
logits = A[age] + G[gender] + S[status] + β · onehot(favourite). Items belong to clusters and have a
popularity within their cluster. Task 1 is the user's sequence: each item is, with probability ρ, the
next item of the previous item's cluster (a series), otherwise a draw from the user's taste. Task 2
(click) and task 3 (like) are later behaviours drawn from the same taste (likes from the taste
sharpened twice); tasks 4–6 are the attributes themselves. Every later task's input is the full task-1
line, as in TTL.

Because the latent variables take few values, the posterior over them given a user's input is exact, so
the generator knows each task's ceiling: the expected score of the Bayes-optimal predictor given
exactly what the model sees (for task 1 the first L−1 items; for tasks 2–6 the whole line), averaged
over all users. It is written as `ceiling` per task in tasks.json, where evaluate.py finds it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
from dataclasses import dataclass

import numpy as np

from continual import flags
from utils import atomic_write_text

AGE_PRIOR = np.array([0.10, 0.30, 0.30, 0.20, 0.10])
GENDER_PRIOR = np.array([0.55, 0.45])
STATUS_PRIOR = np.array([0.40, 0.30, 0.20, 0.10])
CUTOFFS = (5, 20)
NAMES = ["next_item", "click", "like", "age", "gender", "life_status"]


@dataclass
class World:
    """The generative model's parameters (everything but the users)."""

    cluster: np.ndarray      # [M] cluster of each item (items are raw ids 1..M, array index = id − 1)
    within: np.ndarray       # [M] item's probability within its cluster
    successor: np.ndarray    # [M] next item of the same cluster (cyclic, in id order)
    age: np.ndarray          # [5, K] taste logits added by each age group
    gender: np.ndarray       # [2, K]
    status: np.ndarray       # [4, K]
    favourite: float         # β: logit bonus of the personal favourite cluster
    series: float            # ρ: probability that the next item continues the previous item's series
    priors: tuple[np.ndarray, np.ndarray, np.ndarray] = (AGE_PRIOR, GENDER_PRIOR, STATUS_PRIOR)  # of the attributes

    @property
    def n_clusters(self) -> int:
        return self.age.shape[1]


@dataclass
class Users:
    """The users' latent variables and their task data (items as 0-based array indices)."""

    age: np.ndarray          # [N] 0-based
    gender: np.ndarray       # [N]
    status: np.ndarray       # [N]
    favourite: np.ndarray    # [N] cluster
    sequences: np.ndarray    # [N, L]
    clicks: np.ndarray       # [N, n_click]
    likes: np.ndarray        # [N, n_like]


def attribute_prior(values: int, default: np.ndarray) -> np.ndarray:
    """The prior of an attribute with `values` values: the benchmark's own when it has its count, else falling
    linearly (p_i ∝ values − i: the majority class is 2 / (values + 1))."""
    if values == default.size:
        return default
    weights = np.arange(values, 0, -1, dtype=np.float64)
    return weights / weights.sum()


def make_world(rng: np.random.Generator, n_items: int, n_clusters: int, strength: float, favourite: float,
               series: float, classes: tuple[int, int, int] = (5, 2, 4)) -> World:
    cluster = rng.permutation(np.arange(n_items) % n_clusters)                    # [M]
    weight = 1.0 / (1.0 + rng.permutation(n_items)) ** 0.8                         # [M] Zipf-like popularity
    totals = np.bincount(cluster, weights=weight, minlength=n_clusters)
    successor = np.empty(n_items, dtype=np.int64)
    for c in range(n_clusters):
        members = np.flatnonzero(cluster == c)
        successor[members] = np.roll(members, -1)
    logits = [strength * rng.standard_normal((size, n_clusters)) for size in classes]
    priors = tuple(attribute_prior(size, default) for size, default in zip(classes, (AGE_PRIOR, GENDER_PRIOR,
                                                                                      STATUS_PRIOR)))
    return World(cluster, weight / totals[cluster], successor, *logits, favourite, series, priors)


def taste(world: World, age: np.ndarray, gender: np.ndarray, status: np.ndarray, favourite: np.ndarray,
          sharpen: float = 1.0) -> np.ndarray:
    """p(item | latent variables) [N, M]: softmax over clusters of the taste logits (× sharpen), times the
    item's share of its cluster."""
    logits = world.age[age] + world.gender[gender] + world.status[status]          # [N, K]
    logits = logits + world.favourite * np.eye(world.n_clusters)[favourite]
    logits = sharpen * logits
    clusters = np.exp(logits - logits.max(1, keepdims=True))
    clusters /= clusters.sum(1, keepdims=True)                                     # [N, K]
    return clusters[:, world.cluster] * world.within                              # [N, M]


def draw(rng: np.random.Generator, probabilities: np.ndarray, count: int) -> np.ndarray:
    """`count` independent draws per row of probabilities [N, M] → [N, count] item indices."""
    cdf = np.cumsum(probabilities, axis=1)                                         # [N, M]
    cdf /= cdf[:, -1:]
    u = rng.random((probabilities.shape[0], count))
    return np.minimum((cdf[:, None, :] < u[:, :, None]).sum(2), probabilities.shape[1] - 1)


def make_users(rng: np.random.Generator, world: World, n_users: int, length: int, n_click: int,
               n_like: int) -> Users:
    age, gender, status = (rng.choice(prior.size, n_users, p=prior) for prior in world.priors)
    favourite = rng.integers(0, world.n_clusters, n_users)
    p = taste(world, age, gender, status, favourite)                               # [N, M]
    sequences = np.empty((n_users, length), dtype=np.int64)
    sequences[:, 0] = draw(rng, p, 1)[:, 0]
    for t in range(1, length):
        continues = rng.random(n_users) < world.series
        sequences[:, t] = np.where(continues, world.successor[sequences[:, t - 1]], draw(rng, p, 1)[:, 0])
    clicks = draw(rng, p, n_click)
    likes = draw(rng, taste(world, age, gender, status, favourite, sharpen=2.0), n_like)
    return Users(age, gender, status, favourite, sequences, clicks, likes)


def latent_grid(world: World) -> np.ndarray:
    """Every combination of the latent variables → [Z, 4] (age, gender, status, favourite)."""
    return np.array(list(itertools.product(*(range(prior.size) for prior in world.priors), range(world.n_clusters))))


def posterior(world: World, sequences: np.ndarray, chunk: int = 256) -> np.ndarray:
    """p(latent combination | sequence) [N, Z], exact: prior × Π_t (ρ·[x_t = succ(x_{t−1})] + (1−ρ)·p_z(x_t))."""
    grid = latent_grid(world)
    ages, genders, statuses = world.priors
    prior = ages[grid[:, 0]] * genders[grid[:, 1]] * statuses[grid[:, 2]] / world.n_clusters                # [Z]
    p = taste(world, *grid.T)                                                      # [Z, M]
    result = np.empty((sequences.shape[0], grid.shape[0]))
    for start in range(0, sequences.shape[0], chunk):
        x = sequences[start:start + chunk]                                         # [n, L]
        likelihood = p[:, x]                                                       # [Z, n, L]
        series = np.zeros(x.shape)
        series[:, 1:] = world.successor[x[:, :-1]] == x[:, 1:]                     # [n, L]
        likelihood[:, :, 1:] = world.series * series[:, 1:] + (1 - world.series) * likelihood[:, :, 1:]
        log_post = np.log(prior)[None, :] + np.log(likelihood).sum(2).T            # [n, Z]
        log_post -= log_post.max(1, keepdims=True)
        post = np.exp(log_post)
        result[start:start + chunk] = post / post.sum(1, keepdims=True)
    return result


def expected_ranking_scores(predictive: np.ndarray) -> dict[str, float]:
    """Expected metrics of ranking items by a predictive distribution [N, M] when the target is drawn from
    it (the Bayes-optimal ranking's score), averaged over rows; names as metrics.metric_names(5)."""
    top = -np.sort(-predictive, axis=1)[:, :max(CUTOFFS)]                          # [N, 20]
    rank = np.arange(top.shape[1])
    scores = {}
    for k in CUTOFFS:
        scores[f"mrr@{k}"] = float((top[:, :k] / (rank[:k] + 1)).sum(1).mean())
        scores[f"hit@{k}"] = float(top[:, :k].sum(1).mean())
        scores[f"ndcg@{k}"] = float((top[:, :k] / np.log2(rank[:k] + 2)).sum(1).mean())
    scores["acc"] = float(top[:, 0].mean())
    return scores


def predictive(world: World, posterior_z: np.ndarray, task: int, previous: np.ndarray | None = None,
               labels: np.ndarray | None = None) -> np.ndarray:
    """p(target | input) [N, classes] of the Bayes-optimal predictor for task 1..6 (1-based).

    Task 1: items; `previous` [N] the input's last item (a series continues from it). Tasks 2–3: items,
    restricted to `labels` (the items that occur as targets, the task's class space) and renormalised.
    Tasks 4–6: the attribute's values."""
    grid = latent_grid(world)
    if task >= 4:
        values = grid[:, task - 4]
        return np.stack([posterior_z[:, values == v].sum(1) for v in range(values.max() + 1)], axis=1)
    p = taste(world, *grid.T, sharpen=2.0 if task == 3 else 1.0)                  # [Z, M]
    result = posterior_z @ p                                                       # [N, M]
    if task == 1:
        result *= 1 - world.series
        result[np.arange(result.shape[0]), world.successor[previous]] += world.series
        return result
    result = result[:, labels]
    return result / result.sum(1, keepdims=True)


def ceilings(world: World, users: Users) -> list[dict[str, float]]:
    """Each task's expected Bayes-optimal score given the model's input, averaged over users."""
    inputs = posterior(world, users.sequences[:, :-1])                             # task 1 sees L − 1 items
    full = posterior(world, users.sequences)                                       # tasks 2–6 see the line
    result = [expected_ranking_scores(predictive(world, inputs, 1, previous=users.sequences[:, -2]))]
    for task, targets in ((2, users.clicks), (3, users.likes)):
        result.append(expected_ranking_scores(predictive(world, full, task, labels=np.unique(targets))))
    for task in (4, 5, 6):
        result.append({"acc": float(predictive(world, full, task).max(1).mean())})
    return result


def lines(users: Users) -> list[list[str]]:
    """The six files' lines (raw item ids are index + 1; attribute labels are value + 1)."""
    sources = [",".join(map(str, row)) for row in (users.sequences + 1).tolist()]
    task1 = [source + "\n" for source in sources]
    rec = [[f"{source},,{','.join(map(str, targets))}\n" for source, targets in zip(sources, (t + 1).tolist())]
           for t in (users.clicks, users.likes)]
    cls = [[f"{source},,{label}\n" for source, label in zip(sources, (values + 1).tolist())]
           for values in (users.age, users.gender, users.status)]
    return [task1, *rec, *cls]


def generate(seed: int, n_users: int, n_items: int, length: int, n_clusters: int, strength: float = 1.5,
             favourite: float = 3.0, series: float = 0.3, n_click: int = 3, n_like: int = 2,
             classes: tuple[int, int, int] = (5, 2, 4)) -> tuple[World, Users]:
    rng = np.random.default_rng(seed)
    world = make_world(rng, n_items, n_clusters, strength, favourite, series, classes)
    return world, make_users(rng, world, n_users, length, n_click, n_like)


def write(out: str, args: argparse.Namespace) -> dict:
    """Write task1.csv … task6.csv, latents.csv and tasks.json (each atomically); return tasks.json's content."""
    classes = tuple(args.attribute_classes)
    world, users = generate(args.seed, args.users, args.items, args.length, args.clusters, args.strength,
                            args.favourite, args.series, classes=classes)
    definitions = ["the user's item sequence", "3 later clicks, drawn from the user's taste",
                   "2 later likes, drawn from the taste sharpened twice", f"age group ({classes[0]} values)",
                   f"gender ({classes[1]} values)", f"life status ({classes[2]} values)"]
    entries = []
    for number, (name, task_lines, ceiling) in enumerate(zip(NAMES, lines(users), ceilings(world, users)), 1):
        path = os.path.join(out, f"task{number}.csv")
        atomic_write_text(path, "".join(task_lines))
        entries.append({"file": f"task{number}.csv", "name": name, "kind": "rec" if number <= 3 else "cls",
                        "definition": definitions[number - 1], "lines": len(task_lines), "ceiling": ceiling})
    latent = np.stack([np.arange(1, args.users + 1), users.age + 1, users.gender + 1, users.status + 1,
                       users.favourite + 1], axis=1)
    atomic_write_text(os.path.join(out, "latents.csv"), "line,age,gender,life_status,favourite_cluster\n"
                      + "".join(",".join(map(str, row)) + "\n" for row in latent.tolist()))
    meta = {"source": "synth", **{k: getattr(args, k) for k in ("seed", "users", "items", "length", "clusters",
                                                                  "strength", "favourite", "series")},
            **({"attribute_classes": list(classes)} if classes != (5, 2, 4) else {}),
            "ceiling_note": "expected score of the Bayes-optimal predictor given the model's input, mean over all users",
            "tasks": entries}
    atomic_write_text(os.path.join(out, "tasks.json"), json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> dict:
    parser = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--out", type=flags.output_dir, default="Data/synth",
        help="folder for task1.csv … task6.csv, latents.csv, tasks.json")
    add("--seed", type=flags.seed, default=0, help="generator seed, 0 ≤ seed < 2**32")
    add("--users", type=flags.integer(20), default=6000, help="users (one line per task file each), ≥ 20")
    add("--items", type=flags.integer(2), default=500, help="items, ≥ clusters")
    add("--length", type=flags.integer(3), default=30, help="items per task-1 line, ≥ 3")
    add("--clusters", type=flags.integer(2, 50), default=10, help="item clusters, 2..50")
    add("--strength", type=flags.nonnegative_float, default=1.5, help="sd of the attributes' taste logits, ≥ 0")
    add("--favourite", type=flags.nonnegative_float, default=3.0, help="logit bonus of a user's favourite cluster, ≥ 0")
    add("--series", type=flags.real(0.0, 1.0, high_open=True), default=0.3,
        help="probability that an item continues a series, in [0, 1)")
    add("--attribute_classes", type=flags.int_list(3, low=2), default=[5, 2, 4],
        help="values of age, gender and life status (tasks 4-6), comma-separated, each >= 2 (default 5,2,4: the "
             "benchmark's priors; other counts get priors falling linearly, p_i ~ count - i); another group "
             "structure for checking methods off the benchmark")
    args = parser.parse_args(argv)
    if args.items < args.clusters:
        parser.error(f"--items must be >= --clusters ({args.clusters}) (got {args.items})")
    meta = write(args.out, args)
    for entry in meta["tasks"]:
        ceiling = entry["ceiling"].get("mrr@5", entry["ceiling"].get("acc"))
        metric = "mrr@5" if entry["kind"] == "rec" else "acc"
        print(f"{entry['file']:<10} {entry['name']:<12} {entry['kind']:<4} {entry['lines']:>6} lines  "
              f"ceiling {metric} {ceiling:.4f}")
    return meta

