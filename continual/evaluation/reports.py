"""What a stage prints and a run's forgetting matrix: every task's metrics, each headline beside its trivial
baseline and 95 % interval, and the matrix of headlines after every stage."""
from __future__ import annotations

import json
from typing import Iterable, Iterator

from continual.evaluation.metrics import RETEST_PARTS, headline_name
from utils import DataError


def format_table(stage: int, tasks: dict[str, dict]) -> str:
    """The metrics of every task after `stage`, one row per task."""
    columns = list(dict.fromkeys(name for entry in tasks.values() for name in entry["test"]))
    header = f"stage {stage}: test metrics\n{'task':<6}{'kind':<6}" + "".join(f"{c:>10}" for c in columns)
    rows = []
    for key, entry in tasks.items():
        cells = "".join(f"{entry['test'][c]:>10.4f}" if c in entry["test"] else f"{'':>10}" for c in columns)
        rows.append(f"{key:<6}{entry['kind']:<6}{cells}")
    return "\n".join([header] + rows)


def format_limits(limits: dict | None) -> str:
    """The line that marks a stage run with --max_steps, --eval_users or --eval_negatives (metrics.json's "limits");
    "" otherwise."""
    if not limits:
        return ""
    sampled = (f"SAMPLED RANKING (--eval_negatives {limits['eval_negatives']}): each rec target ranked among "
               f"{limits['eval_negatives']} sampled items, not every item" if limits.get("eval_negatives") else "")
    parts = []
    if limits.get("max_steps"):
        parts.append(f"--max_steps {limits['max_steps']}: {limits['steps']} optimiser step(s) trained")
    if limits.get("eval_users"):
        parts.append(f"--eval_users {limits['eval_users']}: every task scored on at most {limits['eval_users']} "
                     "of its users")
    limited = "LIMITED RUN, not comparable with a full one: " + "; ".join(parts) if parts else ""
    return "; ".join(part for part in (limited, sampled) if part)


def headline_metric(task: dict) -> str:
    """The metric a task entry of metrics.json is judged on: MRR at its smallest cut-off (MRR@5 by default)
    for rec tasks, accuracy for cls tasks."""
    cutoffs = [int(name[4:]) for name in task["test"] if name.startswith("mrr@")]
    return headline_name(task["kind"], min(cutoffs)) if cutoffs else "acc"


def _ci(bounds: list[float]) -> str:
    return f"[{bounds[0]:.4f}, {bounds[1]:.4f}]"


def _also_above(versus: dict) -> str:
    """The other metrics on which the model is above the same baseline (paired interval above 0)."""
    others = [name for name, entry in versus.get("all", {}).items() if entry["above"] and name != versus["metric"]]
    return f"  (above on {', '.join(others)})" if others and len(versus["all"]) > 1 else ""


def format_evidence(stage: int, tasks: dict[str, dict]) -> str:
    """Each task's headline metric beside its 95 % interval, the strongest trivial baseline (with its
    interval), the paired difference and, where the data's generator knows it, the ceiling; tasks whose
    difference interval does not lie above 0 are marked `NOT above baseline`. Tasks scored on a re-test file
    (--protocol time) follow, each over all its users, those with new items and those without."""
    lines = [f"stage {stage}: headline metric vs the strongest trivial baseline (95 % bootstrap intervals "
             "over test users; difference paired on the same resamples)", _evidence_header(5)]
    lines += [_evidence_line(key, entry) for key, entry in tasks.items() if "vs_baseline" in entry]
    retests = [(key, entry["retest"]) for key, entry in tasks.items() if entry.get("retest")]
    if retests:
        lines += [f"stage {stage}: earlier tasks on their re-test files (later users, among the items known now; "
                  "baselines fitted on each task's own training split; new = users whose input holds an item newer "
                  "than the task)", _evidence_header(9)]
        for key, retest in retests:
            lines += [_evidence_line(f"{key} {RETEST_LABELS[part]}", retest[part], 9)
                      for part in RETEST_PARTS if part in retest]
    return "\n".join(lines)


RETEST_LABELS = {"all": "all", "with_new": "new", "without_new": "no new"}


def _evidence_header(width: int) -> str:
    return (f"{'task':<{width}}{'kind':<5}{'metric':<7}{'users':>7}  {'score [95% CI]':<26}{'baseline':<19}"
            f"{'its score [95% CI]':<26}{'difference [95% CI]':<28}{'ceiling':>8}")


def _evidence_line(key: str, entry: dict, width: int = 5) -> str:
    """One row of format_evidence (the task's key in a column `width` wide)."""
    versus = entry["vs_baseline"]
    metric, name = versus["metric"], versus["baseline"]
    baseline = entry["baseline"][name]
    ceiling = entry.get("ceiling", {}).get(metric)
    difference = f"{versus['difference']:+.4f} {_ci(versus['ci95'])}"
    return (f"{key:<{width}}{entry['kind']:<5}{metric:<7}{entry['n_test_users']:>7}  "
            f"{entry['test'][metric]:.4f} {_ci(entry['ci95'][metric]):<19}{name:<19}"
            f"{baseline['test'][metric]:.4f} {_ci(baseline['ci95'][metric]):<19}{difference:<28}"
            f"{'' if ceiling is None else f'{ceiling:.4f}':>8}"
            f"{'' if versus['above'] else '  NOT above baseline'}{_also_above(versus)}")


def load_stages(metric_files: list[str]) -> list[dict]:
    """The metrics.json files of a run, sorted by stage."""
    stages = []
    for path in metric_files:
        try:
            with open(path, encoding="utf-8") as handle:
                stages.append(json.load(handle))
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: not a metrics file ({error})") from None
    return sorted(stages, key=lambda entry: entry["stage"])


def matrix_cell(task: dict) -> dict:
    """A task's headline metric (MRR at the smallest cut-off for rec, acc for cls) with its interval, the
    strongest baseline, whether the model is above it (None when the file has no evidence) and the ceiling."""
    metric = headline_metric(task)
    versus = task.get("vs_baseline") or {}
    baseline = task.get("baseline", {}).get(versus.get("baseline"), {})
    return {"metric": metric, "value": task["test"][metric], "ci95": task.get("ci95", {}).get(metric),
            "baseline": versus.get("baseline"), "baseline_value": baseline.get("test", {}).get(metric),
            "above": versus.get("above"), "ceiling": task.get("ceiling", {}).get(metric)}


def matrix_cells(metric_files: list[str]) -> tuple[list[int], int, dict[tuple[int, int], dict]]:
    """(stages, number of tasks, {(stage, task): matrix_cell}) of a run."""
    stages = load_stages(metric_files)
    n_tasks = max(len(entry["tasks"]) for entry in stages)
    cells = {(entry["stage"], int(k)): matrix_cell(task) for entry in stages for k, task in entry["tasks"].items()}
    return [entry["stage"] for entry in stages], n_tasks, cells


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def forgetting_matrix(metric_files: list[str]) -> tuple[list[str], list[list[str]]]:
    """The CSV table. Rows: stages; columns `task1..N`: each task's headline metric (MRR@5 for rec, acc for
    cls); then per task its 95 % interval, strongest baseline (name, value), above-baseline flag and ceiling."""
    stages, n_tasks, cells = matrix_cells(metric_files)
    tasks = range(1, n_tasks + 1)
    extra = ["lo", "hi", "baseline", "baseline_name", "above_baseline", "ceiling"]
    header = ["stage"] + [f"task{k}" for k in tasks] + [f"task{k}_{name}" for k in tasks for name in extra]
    rows = []
    for stage in stages:
        row, evidence_row = [str(stage)], []
        for k in tasks:
            cell = cells.get((stage, k))
            row.append(_number(cell["value"]) if cell else "")
            if cell is None:
                evidence_row += [""] * len(extra)
                continue
            low, high = cell["ci95"] or (None, None)
            above = "" if cell["above"] is None else str(int(cell["above"]))
            evidence_row += [_number(low), _number(high), _number(cell["baseline_value"]), cell["baseline"] or "",
                             above, _number(cell["ceiling"])]
        rows.append(row + evidence_row)
    return header, rows


def matrix_lines(metric_files: list[str]) -> list[str]:
    """The printed matrix: per stage a line of values (`!` = not above the strongest baseline), a line of
    95 % intervals and a line of baselines (and ceilings, where known)."""
    stages, n_tasks, cells = matrix_cells(metric_files)
    width = 19
    limited = [f"after stage {entry['stage']}: {format_limits(entry['limits'])}" for entry in load_stages(metric_files)
               if entry.get("limits")]
    lines = limited + ["forgetting matrix (rows: after stage; MRR@5 for rec tasks, accuracy for cls tasks). Under each value:",
             "its 95 % bootstrap interval over test users, then b = the strongest trivial baseline on the same test",
             "users (and c = the ceiling the data's generator knows). ! = not above the baseline (paired interval",
             "of the difference not above 0).",
             "stage".rjust(6) + "".join(f"task{k}".rjust(width) for k in range(1, n_tasks + 1))]
    for stage in stages:
        value_line, interval_line, baseline_line = str(stage).rjust(6), " " * 6, " " * 6
        for k in range(1, n_tasks + 1):
            cell = cells.get((stage, k))
            if cell is None:
                value_line, interval_line, baseline_line = (line + " " * width for line in
                                                            (value_line, interval_line, baseline_line))
                continue
            value_line += (f"{cell['value']:.4f}" + ("!" if cell["above"] is False else " ")).rjust(width)
            interval_line += (f"[{cell['ci95'][0]:.3f},{cell['ci95'][1]:.3f}] " if cell["ci95"] else "").rjust(width)
            reference = f"b {cell['baseline_value']:.3f}" if cell["baseline_value"] is not None else ""
            reference += f" c {cell['ceiling']:.3f}" if cell["ceiling"] is not None else ""
            baseline_line += (reference + " ").rjust(width)
        lines += [value_line, interval_line, baseline_line]
    return lines


def retest_matrix(metric_files: list[str]) -> tuple[list[str], list[list[str]]]:
    """--protocol time: the re-test scores of a run as CSV rows, one per (stage, earlier task, part of its users:
    all, with_new, without_new): users, the headline value with its 95 % interval, the strongest baseline, the
    above-baseline flag and the ceiling, beside the task's score on its original test users after the same stage
    (`original`), so that forgetting (original) and the shift of the item world (re-test) read side by side.
    No rows when no stage scored a re-test file."""
    header = ["stage", "task", "part", "users", "value", "lo", "hi", "baseline_name", "baseline", "above_baseline",
              "ceiling", "original"]
    rows = []
    for stage, key, part, users, cell, original in retest_cells(load_stages(metric_files)):
        low, high = cell["ci95"] or (None, None)
        rows.append([str(stage), key, part, str(users), _number(cell["value"]), _number(low), _number(high),
                     cell["baseline"] or "", _number(cell["baseline_value"]),
                     "" if cell["above"] is None else str(int(cell["above"])), _number(cell["ceiling"]),
                     _number(original["value"])])
    return header, rows


def retest_cells(stages: Iterable[dict]) -> Iterator[tuple[int, str, str, int, dict, dict]]:
    """--protocol time: (stage, task key, part of its re-test users, their count, the re-test's matrix_cell, the task's
    matrix_cell on its original test users) for every re-test the stages' metrics.json entries scored."""
    for entry in stages:
        for key, task in entry["tasks"].items():
            retest = task.get("retest") or {}
            for part in (name for name in RETEST_PARTS if name in retest):
                yield (entry["stage"], key, part, retest[part]["n_test_users"], matrix_cell(retest[part]),
                       matrix_cell(task))
