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
from dataclasses import dataclass, replace

import numpy as np

from continual import flags
from utils import atomic_write_text

AGE_PRIOR = np.array([0.10, 0.30, 0.30, 0.20, 0.10])
GENDER_PRIOR = np.array([0.55, 0.45])
STATUS_PRIOR = np.array([0.40, 0.30, 0.20, 0.10])
CUTOFFS = (5, 20)
NAMES = ["next_item", "click", "like", "age", "gender", "life_status"]
N_CLICK, N_LIKE = 3, 2   # targets per user of tasks 2 and 3


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
    popularity: np.ndarray | None = None  # [M] each item's popularity before the within-cluster normalisation

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
    return World(cluster, weight / totals[cluster], successor, *logits, favourite, series, priors, weight)


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
    return behave(rng, world, draw_latents(rng, world, n_users), length, n_click, n_like)


def draw_latents(rng: np.random.Generator, world: World, n_users: int) -> tuple[np.ndarray, ...]:
    """Each user's age, gender, life status (from their priors) and favourite cluster (uniform) → 4 × [N]."""
    age, gender, status = (rng.choice(prior.size, n_users, p=prior) for prior in world.priors)
    return age, gender, status, rng.integers(0, world.n_clusters, n_users)


def behave(rng: np.random.Generator, world: World, latents: tuple[np.ndarray, ...], length: int, n_click: int,
           n_like: int, labels: tuple[np.ndarray | None, np.ndarray | None] = (None, None)) -> Users:
    """The users' sequences, clicks and likes drawn from `world` given their latent variables; clicks and likes only
    among `labels` (item indices, renormalised) where given."""
    age, gender, status, favourite = latents
    n_users = age.size
    p = taste(world, age, gender, status, favourite)                               # [N, M]
    sequences = np.empty((n_users, length), dtype=np.int64)
    sequences[:, 0] = draw(rng, p, 1)[:, 0]
    for t in range(1, length):
        continues = rng.random(n_users) < world.series
        sequences[:, t] = np.where(continues, world.successor[sequences[:, t - 1]], draw(rng, p, 1)[:, 0])
    clicks = draw_among(rng, p, n_click, labels[0])
    likes = draw_among(rng, taste(world, age, gender, status, favourite, sharpen=2.0), n_like, labels[1])
    return Users(age, gender, status, favourite, sequences, clicks, likes)


def draw_among(rng: np.random.Generator, probabilities: np.ndarray, count: int,
               labels: np.ndarray | None) -> np.ndarray:
    """`draw`, restricted to the items `labels` (renormalised) where given → [N, count] item indices."""
    if labels is None:
        return draw(rng, probabilities, count)
    return labels[draw(rng, probabilities[:, labels], count)]


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


def expected_ranking_values(predictive: np.ndarray) -> dict[str, np.ndarray]:
    """Expected metrics [N] of each row's Bayes-optimal ranking of a predictive distribution [N, M] when the target
    is drawn from it; names as metrics.metric_names(5)."""
    top = -np.sort(-predictive, axis=1)[:, :max(CUTOFFS)]                          # [N, 20]
    rank = np.arange(top.shape[1])
    values = {}
    for k in CUTOFFS:
        values[f"mrr@{k}"] = (top[:, :k] / (rank[:k] + 1)).sum(1)
        values[f"hit@{k}"] = top[:, :k].sum(1)
        values[f"ndcg@{k}"] = (top[:, :k] / np.log2(rank[:k] + 2)).sum(1)
    values["acc"] = top[:, 0]
    return values


def expected_ranking_scores(predictive: np.ndarray) -> dict[str, float]:
    """`expected_ranking_values` averaged over rows."""
    return {name: float(values.mean()) for name, values in expected_ranking_values(predictive).items()}


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


# ---------------------------------------------------------------------- time passes between tasks (--new_items)

def add_arrivals(rng: np.random.Generator, world: World, new_items: int,
                 stages: int = len(NAMES)) -> tuple[World, np.ndarray]:
    """The world with `new_items` more items arriving at each stage after the first, each in a uniform cluster with
    the Zipf-like popularity of a uniform rank among the first items' → (the world over every item, [M_all] the
    stage at which each item arrives: the first items at 1, then new_items per stage in id order)."""
    first, n_new = world.cluster.size, new_items * (stages - 1)
    cluster = np.concatenate([world.cluster, rng.integers(0, world.n_clusters, n_new)])          # [M_all]
    popularity = np.concatenate([world.popularity, 1.0 / (1.0 + rng.integers(0, first, n_new)) ** 0.8])
    arrival = np.concatenate([np.ones(first, dtype=np.int64), np.repeat(np.arange(2, stages + 1), new_items)])
    grown = replace(world, cluster=cluster, popularity=popularity, within=np.zeros(cluster.size),
                    successor=np.arange(cluster.size))
    return grown, arrival


def world_at(world: World, arrival: np.ndarray, stage: int, drift: float) -> World:
    """The world as it stands at `stage`: only the items that have arrived, each item's popularity fading by `drift`
    per stage since its arrival (popularity · drift^(stage − arrival), so newer items gain), renormalised within its
    cluster; a series continues to the next arrived item of the cluster (cyclic, in id order)."""
    arrived = arrival <= stage                                                      # [M_all]
    weight = np.where(arrived, world.popularity * drift ** np.maximum(stage - arrival, 0), 0.0)
    totals = np.bincount(world.cluster, weights=weight, minlength=world.n_clusters)  # > 0: every cluster has a
    successor = np.arange(world.cluster.size)                                        # first item
    for c in range(world.n_clusters):
        members = np.flatnonzero((world.cluster == c) & arrived)
        successor[members] = np.roll(members, -1)
    return replace(world, within=weight / totals[world.cluster], successor=successor)


def task_values(world: World, users: Users, task: int, labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each user's expected Bayes-optimal score [N] of task `task` (1-based) given the model's input (task 1: the
    first L − 1 items; tasks 2–6: the line), tasks 2–3 among `labels`: the per-user form of `ceilings`."""
    if task == 1:
        inputs = posterior(world, users.sequences[:, :-1])
        return expected_ranking_values(predictive(world, inputs, 1, previous=users.sequences[:, -2]))
    full = posterior(world, users.sequences)
    if task <= 3:
        return expected_ranking_values(predictive(world, full, task, labels=labels))
    return {"acc": predictive(world, full, task).max(1)}


def means(values: dict[str, np.ndarray], rows: np.ndarray | None = None) -> dict[str, float]:
    """The mean of each metric's values over `rows` (a boolean mask; None: all)."""
    return {name: float(value.mean() if rows is None else value[rows].mean()) for name, value in values.items()}


def time_tasks(rng: np.random.Generator, world: World, arrival: np.ndarray, latents: tuple[np.ndarray, ...],
               args: argparse.Namespace) -> tuple[list[list[str]], list[dict], list[np.ndarray | None]]:
    """Task K's file drawn from the world at stage K, by the same users (their behaviour drawn again then) → (the six
    files' lines, each task's ceiling, the class items of tasks 2 and 3 as their heads know them)."""
    files, task_ceilings, labels = [], [], [None, None]
    for stage in range(1, len(NAMES) + 1):
        now = world_at(world, arrival, stage, args.drift)
        users = behave(rng, now, latents, args.length, N_CLICK, N_LIKE)
        files.append(task_lines(users, stage))
        if stage in (2, 3):
            labels[stage - 2] = np.unique(users.clicks if stage == 2 else users.likes)
        task_ceilings.append(means(task_values(now, users, stage, labels[stage - 2] if stage in (2, 3) else None)))
    return files, task_ceilings, labels


def retest(world: World, arrival: np.ndarray, task: int, stage: int, args: argparse.Namespace,
           labels: list[np.ndarray | None]) -> tuple[list[str], dict]:
    """Task `task`'s re-test file after stage `stage`: --retest_users fresh users (their own seeded stream), their
    behaviour drawn from the world at `stage` (tasks 2–3: targets among the classes the task's head knows) → (its
    lines, its tasks.json entry: ceilings over all users, over those whose input holds an item newer than the task's
    stage and over the others)."""
    rng = np.random.default_rng([args.seed, 52, task, stage])
    now = world_at(world, arrival, stage, args.drift)
    users = behave(rng, now, draw_latents(rng, world, args.retest_users), args.length, N_CLICK, N_LIKE,
                   labels=(labels[0], labels[1]))
    values = task_values(now, users, task, labels[task - 2] if task in (2, 3) else None)
    inputs = users.sequences[:, :-1] if task == 1 else users.sequences
    newer = (arrival[inputs] > task).any(1)                                          # [N]
    entry = {"file": retest_name(task, stage), "task": task, "stage": stage, "kind": "rec" if task <= 3 else "cls",
             "lines": args.retest_users, "users_with_new": int(newer.sum()), "ceiling": means(values)}
    for name, rows in (("ceiling_with_new", newer), ("ceiling_without_new", ~newer)):
        if rows.any():
            entry[name] = means(values, rows)
    return task_lines(users, task), entry


def retest_name(task: int, stage: int) -> str:
    """The file of task `task`'s re-test after stage `stage` (scoring.retest_path finds it beside the task's file)."""
    return f"task{task}.retest{stage}.csv"


def lines(users: Users) -> list[list[str]]:
    """The six files' lines (raw item ids are index + 1; attribute labels are value + 1)."""
    return [task_lines(users, task) for task in range(1, len(NAMES) + 1)]


def task_lines(users: Users, task: int) -> list[str]:
    """Task `task`'s (1-based) file lines: the sequence (task 1), or the sequence,, the targets of tasks 2–6."""
    sources = [",".join(map(str, row)) for row in (users.sequences + 1).tolist()]
    if task == 1:
        return [source + "\n" for source in sources]
    targets = (users.clicks, users.likes, users.age, users.gender, users.status)[task - 2] + 1
    if targets.ndim == 1:
        return [f"{source},,{label}\n" for source, label in zip(sources, targets.tolist())]
    return [f"{source},,{','.join(map(str, row))}\n" for source, row in zip(sources, targets.tolist())]


def generate(seed: int, n_users: int, n_items: int, length: int, n_clusters: int, strength: float = 1.5,
             favourite: float = 3.0, series: float = 0.3, n_click: int = N_CLICK, n_like: int = N_LIKE,
             classes: tuple[int, int, int] = (5, 2, 4)) -> tuple[World, Users]:
    rng = np.random.default_rng(seed)
    world = make_world(rng, n_items, n_clusters, strength, favourite, series, classes)
    return world, make_users(rng, world, n_users, length, n_click, n_like)


def write(out: str, args: argparse.Namespace) -> dict:
    """Write task1.csv … task6.csv, latents.csv and tasks.json (each atomically), and with --new_items the re-test
    files; return tasks.json's content."""
    classes = tuple(args.attribute_classes)
    definitions = ["the user's item sequence", "3 later clicks, drawn from the user's taste",
                   "2 later likes, drawn from the taste sharpened twice", f"age group ({classes[0]} values)",
                   f"gender ({classes[1]} values)", f"life status ({classes[2]} values)"]
    retests, time_meta = [], {}
    if not args.new_items:
        world, users = generate(args.seed, args.users, args.items, args.length, args.clusters, args.strength,
                                args.favourite, args.series, classes=classes)
        files, task_ceilings = lines(users), ceilings(world, users)
        latents = (users.age, users.gender, users.status, users.favourite)
    else:
        rng = np.random.default_rng(args.seed)
        world, arrival = add_arrivals(rng, make_world(rng, args.items, args.clusters, args.strength, args.favourite,
                                                      args.series, classes), args.new_items)
        latents = draw_latents(rng, world, args.users)
        files, task_ceilings, labels = time_tasks(rng, world, arrival, latents, args)
        definitions = [f"{text}, at stage {number}" for number, text in enumerate(definitions, 1)]
        for task in range(1, len(NAMES)):
            for stage in range(task + 1, len(NAMES) + 1):
                retest_lines, entry = retest(world, arrival, task, stage, args, labels)
                atomic_write_text(os.path.join(out, entry["file"]), "".join(retest_lines))
                retests.append(entry)
        time_meta = {"new_items": args.new_items, "drift": args.drift, "retest_users": args.retest_users,
                     "time_note": "items 1..items arrive at stage 1, then new_items more at each later stage (ids in "
                                  "order); at stage K an item's popularity is its base popularity times drift^(K - "
                                  "its arrival stage), renormalised within its cluster; task K is drawn from the "
                                  "world at stage K by the same users. taskU.retestK.csv: task U's examples of "
                                  "retest_users fresh users drawn from the world at stage K (tasks 2-3: targets "
                                  "among the task's own classes), scored after stage K; ceiling_with_new: over the "
                                  "users whose input holds an item that arrived after stage U",
                     "retests": retests}
    entries = []
    for number, (name, one_task, ceiling) in enumerate(zip(NAMES, files, task_ceilings), 1):
        path = os.path.join(out, f"task{number}.csv")
        atomic_write_text(path, "".join(one_task))
        entries.append({"file": f"task{number}.csv", "name": name, "kind": "rec" if number <= 3 else "cls",
                        "definition": definitions[number - 1], "lines": len(one_task), "ceiling": ceiling})
    latent = np.stack([np.arange(1, args.users + 1), *(values + 1 for values in latents)], axis=1)
    atomic_write_text(os.path.join(out, "latents.csv"), "line,age,gender,life_status,favourite_cluster\n"
                      + "".join(",".join(map(str, row)) + "\n" for row in latent.tolist()))
    meta = {"source": "synth", **{k: getattr(args, k) for k in ("seed", "users", "items", "length", "clusters",
                                                                  "strength", "favourite", "series")},
            **({"attribute_classes": list(classes)} if classes != (5, 2, 4) else {}),
            "ceiling_note": "expected score of the Bayes-optimal predictor given the model's input, mean over all users",
            "tasks": entries, **time_meta}
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
    add("--new_items", type=flags.integer(0), default=0,
        help="time passes between tasks: items that arrive at each stage after the first (default 0: the static "
             "benchmark); task K is drawn from the world at stage K, and taskU.retestK.csv re-tests each task U "
             "after every later stage K (for --protocol time)")
    add("--drift", type=flags.real(0.0, 1.0, low_open=True), default=None,
        help="with --new_items: an item's popularity fades by this factor per stage since its arrival, in (0, 1] "
             "(default 0.8; 1: no fading)")
    add("--retest_users", type=flags.integer(20), default=None,
        help="with --new_items: users of each re-test file, >= 20 (default: --users / 5, at least 20)")
    args = parser.parse_args(argv)
    if args.items < args.clusters:
        parser.error(f"--items must be >= --clusters ({args.clusters}) (got {args.items})")
    if not args.new_items and (args.drift is not None or args.retest_users is not None):
        parser.error("--drift and --retest_users need --new_items N > 0")
    args.drift = 0.8 if args.drift is None else args.drift
    args.retest_users = args.retest_users or max(20, args.users // 5)
    meta = write(args.out, args)
    for entry in meta["tasks"] + meta.get("retests", []):
        ceiling = entry["ceiling"].get("mrr@5", entry["ceiling"].get("acc"))
        metric = "mrr@5" if entry["kind"] == "rec" else "acc"
        print(f"{entry['file']:<18} {entry.get('name', 're-test'):<12} {entry['kind']:<4} {entry['lines']:>6} lines  "
              f"ceiling {metric} {ceiling:.4f}")
    return meta

