"""The paper's comparison: every method × task after the last stage, pooled over draws and seeds, and its figure.

    python tools/paper_table.py --results runs/paper_synth/draw0/results.csv runs/paper_synth/draw1/results.csv ...
                                [--out DIR] [--reference finetune] [--against teracon,recommended] [--methods a,b,...]
                                [--versus OTHER_RESULTS ... --labels static,time]

Each --results file is one compare.py run (one draw of the data); a unit is one (file, seed): its own data draw,
split and stage 1. Over the units that finished every stage, it writes to --out:

- paper_table.md: the table in the paper's layout (methods × tasks: each task's headline score after the last
  stage, mean [95 % t-interval over units]), with per method the mean own-stage score of the new tasks over the
  reference's (paired by unit), the mean kept share of the earlier tasks, the parameters after the last stage
  over one model, the s/epoch of the last stage, and the trivial-baseline and ceiling rows; then every task's
  own-stage score, marked against its trivial baseline; then paired differences of each --against method with
  every other method: ▲ beats (the interval lies above 0), ▼ loses (below), = ties;
- paper_figure.png: each method a point, x = mean kept share, y = mean new-task score over the reference's,
  marker area ∝ parameters over one model, with the 95 % intervals as bars;
- orderings.md, with --versus (results of the same methods under another protocol or data): the rankings by kept
  share and by new tasks under each, and every paired cell whose verdict changes from --results to --versus.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics

from continual.comparison import known_name, method_names, read_records
from continual.evaluation.stats import mean_sd, paired_difference as paired, t_interval
from continual import flags
from utils import DataError, atomic_write_text

Unit = tuple[int, int]                     # (results file, seed)
Scores = dict[tuple[int, int], float]      # (stage, task) → headline value


class Pool:
    """The records by method and unit, and the numbers the table is made of (each: {unit: value})."""

    def __init__(self, records: list[dict]):
        self.scores: dict[str, dict[Unit, Scores]] = {}
        self.stage_info: dict[str, dict[Unit, dict[int, tuple[float, float, float]]]] = {}
        self.references: dict[str, dict[int, dict[Unit, float]]] = {"trivial baseline": {}, "ceiling": {}}
        self.kinds: dict[int, str] = {}
        for r in records:
            unit = (r["draw"], r["seed"])
            self.scores.setdefault(r["method"], {}).setdefault(unit, {})[r["stage"], r["task"]] = r["value"]
            self.stage_info.setdefault(r["method"], {}).setdefault(unit, {})[r["stage"]] = (
                r["parameters"], r["stage1_parameters"], r["seconds_per_epoch"])
            self.kinds[r["task"]] = r["metric"]
            for name, column in (("trivial baseline", "baseline"), ("ceiling", "ceiling")):
                if not math.isnan(r[column]):
                    self.references[name].setdefault(r["task"], {})[unit] = r[column]
        self.stages = max(self.kinds, default=0)

    def units(self, method: str) -> list[Unit]:
        """The units whose chain of `method` finished the last stage."""
        return sorted(u for u, scores in self.scores.get(method, {}).items() if (self.stages, self.stages) in scores)

    def final(self, method: str, task: int) -> dict[Unit, float]:
        return {u: self.scores[method][u][self.stages, task] for u in self.units(method)
                if (self.stages, task) in self.scores[method][u]}

    def own(self, method: str, task: int) -> dict[Unit, float]:
        return {u: self.scores[method][u][task, task] for u in self.units(method)
                if (task, task) in self.scores[method][u]}

    def kept_task(self, method: str, task: int) -> dict[Unit, float]:
        """Task `task`'s score after stage N / its score at its own stage, per unit (units scoring 0 left out)."""
        own, final = self.own(method, task), self.final(method, task)
        return {u: final[u] / own[u] for u in own.keys() & final.keys() if own[u] > 0}

    def kept(self, method: str) -> dict[Unit, float]:
        """Mean over tasks 1..N−1 of score after stage N / score at its own stage."""
        shares: dict[Unit, list[float]] = {}
        for task in range(1, self.stages):
            for u, share in self.kept_task(method, task).items():
                shares.setdefault(u, []).append(share)
        return {u: statistics.fmean(v) for u, v in shares.items() if len(v) == self.stages - 1}

    def learned(self, method: str, reference: str) -> dict[Unit, float]:
        """Mean over new tasks 2..N of own-stage score / the reference's own-stage score of the same unit."""
        ratios: dict[Unit, list[float]] = {}
        for task in range(2, self.stages + 1):
            mine, theirs = self.own(method, task), self.own(reference, task)
            for u in mine.keys() & theirs.keys():
                if theirs[u] > 0:
                    ratios.setdefault(u, []).append(mine[u] / theirs[u])
        return {u: statistics.fmean(v) for u, v in ratios.items() if len(v) == self.stages - 1}

    def size(self, method: str) -> float:
        """Parameters after the last stage over the chain's stage-1 model, mean over units."""
        ratios = [info[self.stages][0] / info[self.stages][1] for u, info in self.stage_info[method].items()
                  if self.stages in info and info[self.stages][1] > 0]
        return statistics.fmean(ratios) if ratios else math.nan

    def seconds(self, method: str) -> float:
        times = [info[self.stages][2] for info in self.stage_info[method].values()
                 if self.stages in info and not math.isnan(info[self.stages][2])]
        return statistics.fmean(times) if times else math.nan


def summary(values: dict[Unit, float]) -> tuple[float, float, float]:
    """(mean, 95 % t-interval low, high) over units."""
    numbers = list(values.values())
    return (mean_sd(numbers)[0], *t_interval(numbers))


def cell(values: tuple[float, float, float], digits: int = 4) -> str:
    mean, low, high = values
    if math.isnan(mean):
        return ""
    if math.isnan(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def verdict(low: float, high: float) -> str:
    """▲ the interval lies above 0, ▼ below, = it holds 0 (or there is none)."""
    return "▲" if low > 0 else "▼" if high < 0 else "="


def task_headers(pool: Pool) -> list[str]:
    return [f"task {k} ({pool.kinds[k]})" for k in range(1, pool.stages + 1)]


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def main_table(pool: Pool, methods: list[str], reference: str) -> str:
    n = pool.stages
    columns = ["method", "units", *task_headers(pool), f"own-stage ÷ {reference} (tasks 2–{n})",
               f"kept (tasks 1–{n - 1})", "parameters ÷ one model", f"s/epoch, stage {n}"]
    lines = [table_row(columns), "|" + "---|" * len(columns)]
    for method in methods:
        tasks = [cell(summary(pool.final(method, k))) for k in range(1, n + 1)]
        size, seconds = pool.size(method), pool.seconds(method)
        lines.append(table_row([method, str(len(pool.units(method))), *tasks,
                                cell(summary(pool.learned(method, reference)), 3), cell(summary(pool.kept(method)), 3),
                                "" if math.isnan(size) else f"{size:.2f}",
                                "" if math.isnan(seconds) else f"{seconds:.1f}"]))
    for name, by_task in pool.references.items():
        if by_task:
            shown = [cell(summary(by_task[k])) if name != "ceiling" else cell((statistics.fmean(by_task[k].values()),
                                                                               math.nan, math.nan))
                     if k in by_task else "" for k in range(1, n + 1)]
            lines.append(table_row([name, str(max(len(v) for v in by_task.values())), *shown, "", "", "", ""]))
    return "\n".join(lines) + "\n"


def paired_cells(pool: Pool, a: str, b: str, reference: str) -> list[tuple[float, float, float, int]]:
    """a − b paired by unit over the comparison's cells: every task after the last stage, the new tasks over
    the reference, the kept share → (mean, low, high, units) each."""
    pairs = [paired(pool.final(a, k), pool.final(b, k)) for k in range(1, pool.stages + 1)]
    return pairs + [paired(pool.learned(a, reference), pool.learned(b, reference)), paired(pool.kept(a), pool.kept(b))]


def summary_table(pool: Pool, methods: list[str], reference: str, against: str) -> str:
    """The README's table: per method the kept share, the new tasks over the reference, size, s/epoch and how
    `against` fares with it over the paired cells of paired_table (▲ wins, = ties, ▼ losses)."""
    n = pool.stages
    columns = ["method", "units", f"kept (tasks 1–{n - 1})", f"new ÷ {reference}", "size", f"s/epoch, stage {n}",
               f"{against} vs it"]
    lines = [table_row(columns), "|" + "---|" * len(columns)]
    for method in methods:
        size, seconds = pool.size(method), pool.seconds(method)
        counts = ""
        if method != against:
            signs = [verdict(low, high) for mean, low, high, _ in paired_cells(pool, against, method, reference)
                     if not math.isnan(mean)]
            counts = ", ".join(f"{signs.count(sign)} {sign}" for sign in "▲=▼" if signs.count(sign))
        lines.append(table_row([method, str(len(pool.units(method))), cell(summary(pool.kept(method)), 3),
                                cell(summary(pool.learned(method, reference)), 3),
                                "" if math.isnan(size) else f"{size:.2f}",
                                "" if math.isnan(seconds) else f"{seconds:.1f}", counts]))
    return "\n".join(lines) + "\n"


def own_stage_table(pool: Pool, methods: list[str]) -> str:
    """Every task's score at its own stage, marked by its paired difference with the trivial baseline on the same
    test users: ▲ the interval lies above 0, ▼ below, = it holds 0."""
    columns = ["method", "units", *task_headers(pool)]
    lines = [table_row(columns), "|" + "---|" * len(columns)]
    trivial = pool.references["trivial baseline"]
    for method in methods:
        cells = []
        for k in range(1, pool.stages + 1):
            own = pool.own(method, k)
            _, low, high, _ = paired(own, trivial.get(k, {}))
            cells.append(f"{verdict(low, high)} {cell(summary(own))}" if own else "")
        lines.append(table_row([method, str(len(pool.units(method))), *cells]))
    return "\n".join(lines) + "\n"


def kept_table(pool: Pool, methods: list[str]) -> str:
    """Every earlier task's kept share (after the last stage ÷ at its own stage), mean [95 % t-interval over
    units] and its lowest unit."""
    columns = ["method", "units", *(f"task {k} kept (lowest)" for k in range(1, pool.stages))]
    lines = [table_row(columns), "|" + "---|" * len(columns)]
    for method in methods:
        cells = []
        for k in range(1, pool.stages):
            shares = pool.kept_task(method, k)
            cells.append(f"{cell(summary(shares), 3)} ({min(shares.values()):.3f})" if shares else "")
        lines.append(table_row([method, str(len(pool.units(method))), *cells]))
    return "\n".join(lines) + "\n"


def paired_table(pool: Pool, against: list[str], methods: list[str], reference: str) -> str:
    columns = ["a − b", "units", *task_headers(pool), f"own-stage ÷ {reference}", "kept"]
    lines = [table_row(columns), "|" + "---|" * len(columns)]
    for a in against:
        for b in methods:
            if b == a:
                continue
            pairs = paired_cells(pool, a, b, reference)
            cells = [f"{verdict(low, high)} {cell((mean, low, high), 3)}" if not math.isnan(mean) else ""
                     for mean, low, high, _ in pairs]
            lines.append(table_row([f"{a} − {b}", str(max(p[3] for p in pairs)), *cells]))
    return "\n".join(lines) + "\n"


def ranking(methods: list[str], numbers) -> str:
    """The methods by mean of `numbers(method)` ({unit: value}), highest first: "a 0.98 > b 0.81 > ..."."""
    means = {m: summary(numbers(m))[0] for m in methods}
    ordered = sorted((m for m in methods if not math.isnan(means[m])), key=lambda m: -means[m])
    return " > ".join(f"{m} {means[m]:.3f}" for m in ordered)


def verdict_cells(pool: Pool, a: str, b: str, reference: str) -> list[tuple[str, str]]:
    """a − b over paired_cells' cells → (verdict, "mean [low, high]") each ("" where a cell has no units)."""
    return [(verdict(low, high), cell((mean, low, high), 3)) if not math.isnan(mean) else ("", "")
            for mean, low, high, _ in paired_cells(pool, a, b, reference)]


def ordering_changes(first: Pool, second: Pool, methods: list[str], reference: str, labels: list[str]) -> str:
    """Which orderings change between two pools of the same methods (two protocols): the rankings by kept share
    and by new tasks over the reference under each, then every pair a − b (a before b in `methods`) and cell of
    paired_cells whose verdict differs (▲ beats, = ties, ▼ loses), each pool's verdict judged over its own units.
    A change is a reversal (▲ ↔ ▼), a lost verdict (▲ or ▼ → =) or a new one (= → ▲ or ▼)."""
    names = [*task_headers(first), f"own-stage ÷ {reference}", "kept"]
    lines, counts = [], {"reversed": 0, "lost": 0, "new": 0, "same": 0}
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            for name, (was, was_text), (now, now_text) in zip(names, verdict_cells(first, a, b, reference),
                                                               verdict_cells(second, a, b, reference)):
                if not was or not now:
                    continue
                kind = ("same" if was == now else "reversed" if "=" not in (was, now)
                        else "lost" if now == "=" else "new")
                counts[kind] += 1
                if kind != "same":
                    lines.append(table_row([f"{a} − {b}", name, f"{was} {was_text}", f"{now} {now_text}", kind]))
    total = sum(counts.values())
    head = (f"Rankings by mean kept share (tasks 1–{first.stages - 1}):\n\n"
            + "".join(f"- {label}: {ranking(methods, pool.kept)}\n" for label, pool in zip(labels, (first, second)))
            + f"\nRankings by mean new-task score ÷ {reference}'s:\n\n"
            + "".join(f"- {label}: {ranking(methods, lambda m, p=pool: p.learned(m, reference))}\n"
                      for label, pool in zip(labels, (first, second)))
            + f"\nOf {total} paired cells ({len(methods)} methods, every pair, {len(names)} cells a pair, each judged "
              f"over its own pool's units), {counts['same']} keep their verdict from {labels[0]} to {labels[1]}, "
              f"{counts['reversed']} reverse (▲ ↔ ▼), {counts['lost']} lose theirs (→ =) and {counts['new']} gain "
              "one (= →):\n\n")
    columns = ["a − b", "cell", labels[0], labels[1], "change"]
    return head + "\n".join([table_row(columns), "|" + "---|" * len(columns), *lines]) + "\n"


def figure(pool: Pool, methods: list[str], reference: str, path: str) -> None:
    """x = mean kept share, y = mean own-stage score over the reference's, area ∝ parameters ÷ one model; each
    method its own colour (up to 14)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    palette = [*plt.get_cmap("tab10").colors, "black", "darkgoldenrod", "navy", "magenta"]   # one per method
    for number, method in enumerate(methods):
        kept, learned, size = summary(pool.kept(method)), summary(pool.learned(method, reference)), pool.size(method)
        if math.isnan(kept[0]) or math.isnan(learned[0]):
            continue
        xerr = [[kept[0] - kept[1]], [kept[2] - kept[0]]] if not math.isnan(kept[1]) else None
        yerr = [[learned[0] - learned[1]], [learned[2] - learned[0]]] if not math.isnan(learned[1]) else None
        ax.errorbar(kept[0], learned[0], xerr=xerr, yerr=yerr, fmt="none", ecolor="0.6", lw=0.8, zorder=1)
        ax.scatter([kept[0]], [learned[0]], s=60 * (size if not math.isnan(size) else 1.0), alpha=0.6, zorder=2,
                   color=palette[number % len(palette)])
        ax.annotate(method, (kept[0], learned[0]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axhline(1.0, color="0.8", lw=0.8, zorder=0)
    ax.axvline(1.0, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel(f"mean kept share of earlier tasks (tasks 1–{pool.stages - 1}: after stage {pool.stages} ÷ own stage)")
    ax.set_ylabel(f"mean new-task score ÷ {reference}'s (tasks 2–{pool.stages}, own stage)")
    ax.set_title("Each method: retention vs plasticity (area ∝ parameters ÷ one model; bars: 95 % intervals)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def versus_pool(paths: list[str], pool: Pool, methods: list[str]) -> tuple[Pool, list[str]]:
    """--versus's pool and the methods finished in both pools; a DataError naming the file when it has another
    number of stages or fewer than two such methods."""
    other = Pool(read_records(paths))
    if other.stages != pool.stages:
        raise DataError(f"{paths[0]}: {other.stages} stages, but --results have {pool.stages}")
    both = [m for m in methods if other.units(m) and pool.units(m)]
    if len(both) < 2:
        raise DataError(f"{paths[0]}: fewer than two of the methods ({', '.join(methods)}) finished in both "
                        "--results and --versus")
    return other, both


def main(argv: list[str] | None = None) -> list[str]:
    parser = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=flags.existing_file, nargs="+", required=True,
                        help="results.csv of compare.py runs, one per draw of the data")
    parser.add_argument("--out", type=flags.output_dir, default="runs/paper_table",
                        help="folder of paper_table.md and paper_figure.png")
    names = list(method_names())
    parser.add_argument("--reference", type=flags.comma_list(names, known_name), default=["finetune"],
                        help="the method new-task scores are divided by")
    parser.add_argument("--against", type=flags.comma_list(names, known_name), default=["teracon", "recommended"],
                        help="methods whose paired differences with every other method are shown")
    parser.add_argument("--methods", type=flags.comma_list(names, known_name), default=None,
                        help="the methods shown, in this order (default: every method in the results)")
    parser.add_argument("--versus", type=flags.existing_file, nargs="+", default=None,
                        help="results.csv of the same methods under another protocol: writes orderings.md, what "
                             "changes from --results to these, over the methods in both")
    parser.add_argument("--labels", type=flags.name_pair, default=["results", "versus"],
                        help="the names of --results and --versus in orderings.md")
    args = parser.parse_args(argv)
    if len(args.reference) != 1:
        parser.error("--reference takes one method")
    args.reference = args.reference[0]
    pool = Pool(read_records(args.results))
    methods = args.methods or list(pool.scores)
    for name in dict.fromkeys([args.reference, *args.against, *methods]):
        if name not in pool.scores:
            raise DataError(f"{args.results[0]}: no method {name!r} in the results (have {', '.join(pool.scores)})")
    other, both = (versus_pool(args.versus, pool, methods) if args.versus else (None, []))   # checked before writing
    os.makedirs(args.out, exist_ok=True)
    units = sorted({u for m in methods for u in pool.units(m)})
    text = (f"Pooled over {len(units)} units ({len(args.results)} result files × their seeds): "
            + ", ".join(args.results) + "\n\nIn short, mean [95 % t-interval over units]; the last column counts "
              f"the paired cells below (the {len(pool.kinds)} tasks after the last stage, new ÷ {args.reference}, kept) "
              f"where {args.against[-1]} beats the method (▲), ties (=) or loses (▼):\n\n"
            + summary_table(pool, methods, args.reference, args.against[-1])
            + "\nAfter the last stage, mean [95 % t-interval over units]:\n\n"
            + main_table(pool, methods, args.reference)
            + "\nEach task at its own stage (the score it was learned to; ▲ above its trivial baseline on the same "
              "test users, paired interval above 0):\n\n" + own_stage_table(pool, methods)
            + "\nEach earlier task's kept share, after the last stage ÷ at its own stage, mean [95 % t-interval over "
              "units] (the lowest unit's):\n\n" + kept_table(pool, methods)
            + "\nPaired differences a − b over units (▲ a beats b: the interval lies above 0; ▼ below; = ties):\n\n"
            + paired_table(pool, args.against, methods, args.reference))
    table_path, figure_path = os.path.join(args.out, "paper_table.md"), os.path.join(args.out, "paper_figure.png")
    atomic_write_text(table_path, text)
    figure(pool, methods, args.reference, figure_path)
    written = [table_path, figure_path]
    if args.versus:
        orderings = ordering_changes(pool, other, both, args.reference, args.labels)
        written.append(os.path.join(args.out, "orderings.md"))
        atomic_write_text(written[-1], orderings)
        text += "\n" + orderings
    print(text + "\nwritten to " + ", ".join(written))
    return written

