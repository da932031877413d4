"""tools/paper_table.py: results.csv of several draws pooled by (draw, seed), against values computed by hand."""
from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path

import pytest

import compare
from continual import comparison
from continual.evaluation import paper_table

# (method, draw, seed) → {(stage, task): value}; three stages; "fineall" forgets nothing and is three times the size
SCORES = {
    "finetune": {(1, 1): 0.40, (2, 1): 0.20, (2, 2): 0.30, (3, 1): 0.10, (3, 2): 0.15, (3, 3): 0.60},
    "fineall": {(1, 1): 0.40, (2, 1): 0.40, (2, 2): 0.24, (3, 1): 0.40, (3, 2): 0.24, (3, 3): 0.45},
}
SHIFT = {(0, 0): 0.0, (0, 1): 0.01, (1, 0): -0.02, (1, 1): 0.03}      # each unit's own offset


def write_results(folder, draw: int, scores_by_method: dict = SCORES, name: str = "results") -> str:
    path = folder / f"{name}{draw}.csv"
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, comparison.RESULT_COLUMNS)
        writer.writeheader()
        for method, scores in scores_by_method.items():
            for seed in (0, 1):
                for (stage, task), value in scores.items():
                    size = 100.0 * (1 if method == "finetune" else stage)
                    writer.writerow({"seed": seed, "method": method, "stage": stage, "task": task, "kind": "rec",
                                     "metric": "mrr@5" if task < 3 else "acc", "value": value + SHIFT[draw, seed],
                                     "baseline": 0.05 * task, "ceiling": 0.9, "parameters": size,
                                     "stage1_parameters": 100.0, "seconds_per_epoch": 2.0 + stage})
    return str(path)


def test_units_kept_shares_new_task_ratios_and_verdicts_by_hand(tmp_path):
    paths = [write_results(tmp_path, 0), write_results(tmp_path, 1)]
    pool = paper_table.Pool(paper_table.read_records(paths))
    assert pool.stages == 3 and pool.units("fineall") == [(0, 0), (0, 1), (1, 0), (1, 1)]
    kept = pool.kept("finetune")
    for unit, shift in SHIFT.items():
        expected = ((0.10 + shift) / (0.40 + shift) + (0.15 + shift) / (0.30 + shift)) / 2
        assert kept[unit] == pytest.approx(expected)
        learned = ((0.24 + shift) / (0.30 + shift) + (0.45 + shift) / (0.60 + shift)) / 2
        assert pool.learned("fineall", "finetune")[unit] == pytest.approx(learned)
    assert pool.kept("fineall") == {unit: pytest.approx(1.0) for unit in SHIFT}
    assert pool.size("fineall") == 3.0 and pool.size("finetune") == 1.0 and pool.seconds("fineall") == 5.0
    mean, low, high = paper_table.summary(pool.final("fineall", 3))
    values = [0.45 + shift for shift in SHIFT.values()]
    half = 3.182 * statistics.stdev(values) / 2                              # t(0.975, 3) · sd / √4
    assert (mean, low, high) == pytest.approx((statistics.fmean(values), statistics.fmean(values) - half,
                                               statistics.fmean(values) + half))
    table = paper_table.paired_table(pool, ["fineall"], ["fineall", "finetune"], "finetune")
    row = table.splitlines()[2].split(" | ")
    assert row[0] == "| fineall − finetune" and row[1] == "4"
    assert row[2].startswith("▲ 0.300") and row[4].startswith("▼ -0.150")   # task 1 kept, task 3 learned worse
    short = paper_table.summary_table(pool, ["fineall", "finetune"], "finetune", "fineall").splitlines()
    assert short[2].startswith("| fineall | 4 | 1.000 [1.000, 1.000] |") and short[2].endswith("| 3.00 | 5.0 |  |")
    assert short[3].endswith("| 1.00 | 5.0 | 3 ▲, 2 ▼ |")  # fineall beats it on tasks 1, 2 and kept; not on task 3, new


def test_each_earlier_tasks_kept_share_with_its_lowest_unit_by_hand(tmp_path):
    pool = paper_table.Pool(paper_table.read_records([write_results(tmp_path, 0), write_results(tmp_path, 1)]))
    task1 = {unit: (0.10 + shift) / (0.40 + shift) for unit, shift in SHIFT.items()}
    task2 = {unit: (0.15 + shift) / (0.30 + shift) for unit, shift in SHIFT.items()}
    assert pool.kept_task("finetune", 1) == pytest.approx(task1)
    assert pool.kept_task("finetune", 2) == pytest.approx(task2)
    row = paper_table.kept_table(pool, ["finetune", "fineall"]).splitlines()
    assert row[0] == "| method | units | task 1 kept (lowest) | task 2 kept (lowest) |"
    mean, low, high = paper_table.summary(task1)
    assert row[2].startswith(f"| finetune | 4 | {mean:.3f} [{low:.3f}, {high:.3f}] ({min(task1.values()):.3f}) |")
    assert row[3] == "| fineall | 4 | 1.000 [1.000, 1.000] (1.000) | 1.000 [1.000, 1.000] (1.000) |"


def hand_verdict(differences: list[float]) -> str:
    """▲/=/▼ of the 95 % t-interval of four paired differences, by hand: mean ± t(0.975, 3) · sd / √4."""
    mean, half = statistics.fmean(differences), 3.182 * statistics.stdev(differences) / 2
    return "▲" if mean - half > 0 else "▼" if mean + half < 0 else "="


def hand_kept_and_new(scores: dict) -> tuple[str, str]:
    """The verdicts of fineall − finetune on the kept share (tasks 1–2) and on new tasks ÷ finetune's (tasks 2–3)."""
    kept = [statistics.fmean([(scores["fineall"][3, k] + s) / (scores["fineall"][k, k] + s)
                              - (scores["finetune"][3, k] + s) / (scores["finetune"][k, k] + s) for k in (1, 2)])
            for s in SHIFT.values()]
    new = [statistics.fmean([(scores["fineall"][k, k] + s) / (scores["finetune"][k, k] + s) - 1 for k in (2, 3)])
           for s in SHIFT.values()]
    return hand_verdict(kept), hand_verdict(new)


def test_orderings_name_every_cell_whose_verdict_changes_between_two_pools_by_hand(tmp_path):
    """Under the second protocol fineall loses task 1 below finetune (a reversal) and ties it on task 2 (a lost
    verdict); task 3 keeps its ▼. The kept and new-task cells' verdicts are computed by hand per unit."""
    time = {"finetune": SCORES["finetune"], "fineall": {**SCORES["fineall"], (3, 1): 0.02, (3, 2): 0.15}}
    first = paper_table.Pool(paper_table.read_records([write_results(tmp_path, d) for d in (0, 1)]))
    second = paper_table.Pool(paper_table.read_records([write_results(tmp_path, d, time, "time") for d in (0, 1)]))
    text = paper_table.ordering_changes(first, second, ["fineall", "finetune"], "finetune", ["static", "time"])
    assert ("| fineall − finetune | task 1 (mrr@5) | ▲ 0.300 [0.300, 0.300] | ▼ -0.080 [-0.080, -0.080] | reversed |"
            in text)
    assert "| fineall − finetune | task 2 (mrr@5) | ▲ 0.090 [0.090, 0.090] | = 0.000 [0.000, 0.000] | lost |" in text
    assert "task 3 (acc)" not in text                                          # ▼ under both: no change
    changes = {"reversed": 1, "lost": 1, "new": 0, "same": 1}
    for was, now in zip(hand_kept_and_new(SCORES), hand_kept_and_new(time)):
        changes["same" if was == now else "reversed" if "=" not in (was, now) else "lost" if now == "=" else "new"] += 1
    assert (f"Of 5 paired cells (2 methods, every pair, 5 cells a pair, each judged over its own pool's units), "
            f"{changes['same']} keep their verdict from static to time, {changes['reversed']} reverse (▲ ↔ ▼), "
            f"{changes['lost']} lose theirs (→ =) and {changes['new']} gain one (= →)") in text
    assert "- static: fineall 1.000 > finetune" in text                        # ranked by kept share, highest first


def test_versus_writes_the_orderings_and_refuses_pools_that_do_not_match(tmp_path):
    pytest.importorskip("matplotlib")
    paths = [write_results(tmp_path, 0)]
    written = paper_table.main(["--results", *paths, "--versus", *paths, "--labels", "static,time",
                                "--out", str(tmp_path / "out"), "--against", "fineall"])
    assert [os.path.basename(p) for p in written] == ["paper_table.md", "paper_figure.png", "orderings.md"]
    assert "keep their verdict from static to time, 0 reverse" in open(written[2], encoding="utf-8").read()
    one = write_results(tmp_path, 0, {"finetune": SCORES["finetune"]}, "one")
    with pytest.raises(paper_table.DataError, match=r"one0.csv: fewer than two of the methods"):
        paper_table.main(["--results", *paths, "--versus", one, "--out", str(tmp_path / "out2"),
                          "--against", "fineall"])
    assert not (tmp_path / "out2").exists()                                    # refused before anything is written
    with pytest.raises(SystemExit):
        paper_table.main(["--results", *paths, "--versus", *paths, "--labels", "static"])


def test_the_table_and_figure_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    paths = [write_results(tmp_path, 0), write_results(tmp_path, 1)]
    table, figure = paper_table.main(["--results", *paths, "--out", str(tmp_path / "out"), "--against", "fineall"])
    text = open(table, encoding="utf-8").read()
    assert "| trivial baseline | 4 |" in text and "| ceiling | 4 | 0.9000 |" in text
    assert "| fineall | 4 |" in text and "3.00" in text
    assert "| fineall | 4 | 1.000 [1.000, 1.000] (1.000) |" in text                # the kept share of each task
    with open(figure, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_methods_picks_the_rows_and_a_method_not_in_the_results_is_named(tmp_path):
    pytest.importorskip("matplotlib")
    paths = [write_results(tmp_path, 0)]
    table, _ = paper_table.main(["--results", *paths, "--out", str(tmp_path / "out"), "--against", "finetune",
                                 "--methods", "finetune"])
    text = open(table, encoding="utf-8").read()
    assert "| finetune | 2 |" in text and "| fineall |" not in text
    with pytest.raises(paper_table.DataError, match=r"results0.csv: no method 'lwf' in the results \(have finetune, fineall\)"):
        paper_table.main(["--results", *paths, "--out", str(tmp_path / "out2"), "--against", "finetune",
                          "--methods", "finetune,lwf"])
    with pytest.raises(SystemExit):
        paper_table.main(["--results", *paths, "--methods", "finetune,nosuchmethod"])


def test_a_missing_results_file_is_one_line_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        paper_table.main(["--results", str(tmp_path / "nowhere.csv"), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: --results: {tmp_path / 'nowhere.csv'}: file not found\n"
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_results_csv_is_named(tmp_path):
    bad = tmp_path / "compare.csv"
    bad.write_text("method,seeds\nteracon,3\n")
    with pytest.raises(paper_table.DataError, match="compare.csv: not a compare.py results.csv"):
        paper_table.read_records([str(bad)])


def test_a_bad_value_names_its_file_and_line(tmp_path):
    path = write_results(tmp_path, 0)
    lines = open(path, encoding="utf-8").read().splitlines()
    lines[3] = lines[3].split(",")
    lines[3][6] = "high"
    lines[3] = ",".join(lines[3])
    open(path, "w", encoding="utf-8").write("\n".join(lines) + "\n")
    with pytest.raises(paper_table.DataError, match=r"results0.csv, line 4: could not convert"):
        paper_table.read_records([path])


def test_compare_takes_whole_recorded_chains_and_reruns_what_another_chain_needs(tmp_path):
    """--recorded: a chain with every task after every stage is carried (its records, not its run); one with a
    record missing is run again; fine-tuning is run again when the recommended rule, unrecorded, needs it."""
    path = write_results(tmp_path, 0)
    lines = open(path, encoding="utf-8").read().splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if not line.startswith("1,fineall,3,2,")]
    open(path, "w", encoding="utf-8").write("\n".join(kept) + "\n")
    carried = compare.recorded_chains([path], [0, 1], ["finetune", "fineall"], 3)
    assert {(r["seed"], r["method"]) for r in carried} == {(0, "finetune"), (1, "finetune"), (0, "fineall")}
    assert len(carried) == 3 * 6 and "draw" not in carried[0]
    carried = compare.recorded_chains([path], [0, 1], ["finetune", "fineall", "recommended"], 3)
    assert {(r["seed"], r["method"]) for r in carried} == {(0, "fineall")}
    assert compare.recorded_files(str(tmp_path), "synth", 1) == []
    (tmp_path / "synth_draw1.csv").write_text(open(path, encoding="utf-8").read())
    assert compare.recorded_files(str(tmp_path), "synth", 1) == [str(tmp_path / "synth_draw1.csv")]


def fake_metrics(stage: int, method: str, seed: int, draw: int) -> dict:
    """A stage's metrics.json as the loop writes it, with made-up scores."""
    tasks = {}
    for task in range(1, stage + 1):
        value = 0.3 + 0.01 * task - (0.02 * (stage - task) if method == "finetune" else 0.0) + 0.003 * (seed + draw)
        tasks[str(task)] = {"kind": "rec", "test": {"mrr@5": value, "acc": value / 2},
                            "baseline": {"popularity": {"test": {"mrr@5": 0.1, "acc": 0.05}}},
                            "vs_baseline": {"baseline": "popularity", "metric": "mrr@5"}, "ceiling": {"mrr@5": 0.5}}
    return {"stage": stage, "method": method, "parameters": 1000 + 10 * stage, "tasks": tasks}


def test_compare_draws_write_results_and_the_pooled_table_and_carry_recorded_chains(tmp_path, monkeypatch):
    """compare.py --draws 2 (the chains' runs replaced by metrics.json files): each draw's results.csv, then
    paper_table.md and paper_figure.png over both; again with --recorded, the recorded chains are not run."""
    pytest.importorskip("matplotlib")
    ran: list[tuple[str, int, str]] = []

    def fake_run_all(dataset, out, seeds, methods, stages, extra, jobs, recorded=frozenset(), later=None, *_):
        draw = int(out.rsplit("draw", 1)[1])
        for seed in seeds:
            for method in methods:
                if (seed, method) in recorded:
                    continue
                ran.append((out, seed, method))
                for stage in range(1, stages + 1):
                    path = compare.savepath(out, seed, method, stage) + ".metrics.json"
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "w", encoding="utf-8") as handle:
                        json.dump(fake_metrics(stage, method, seed, draw), handle)
        return 0
    monkeypatch.setattr(compare, "run_all", fake_run_all)
    monkeypatch.setattr(compare, "PREPARE", {})
    monkeypatch.setattr(compare, "preset_paths", lambda dataset, stage, check=True: {})
    out = tmp_path / "paper"
    argv = ["--dataset", "synth", "--draws", "2", "--seeds", "2", "--out", str(out), "--methods", "teracon,finetune"]
    compare.main(argv)
    assert len(ran) == 2 * 2 * 2
    for draw in (0, 1):
        rows = list(csv.DictReader(open(out / f"draw{draw}" / "results.csv", encoding="utf-8")))
        assert len(rows) == 2 * 2 * sum(range(1, 7))                       # seeds × methods × (stage, task)
    text = (out / "paper_table.md").read_text(encoding="utf-8")
    assert "| teracon | 4 |" in text and "| teracon − finetune | 4 |" in text
    assert (out / "paper_figure.png").read_bytes()[:4] == b"\x89PNG"
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    (recorded / "synth_draw0.csv").write_text((out / "draw0" / "results.csv").read_text(encoding="utf-8"))
    ran.clear()
    compare.main([*argv[:7], str(tmp_path / "again"), *argv[8:], "--recorded", str(recorded)])
    assert sorted({(Path(o).name, m) for o, _, m in ran}) == [("draw1", "finetune"), ("draw1", "teracon")]
    again = list(csv.DictReader(open(tmp_path / "again" / "draw0" / "results.csv", encoding="utf-8")))
    assert len(again) == 2 * 2 * sum(range(1, 7))                          # carried from the record
