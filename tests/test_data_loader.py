"""data_loader.py: the split (SPEC's formula), the index and task files (ragged lines, the authors' dict index,
targets expanded, unknown items), batching, and the fast paths (byte tokenizer, look-ups, strided staging) against
plain Python."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

import data_loader
from utils import DataError


@pytest.mark.parametrize("n", [20, 101, 1000])
@pytest.mark.parametrize("seed", [10, 3])
def test_split_matches_spec_formula(n, seed):
    np.random.seed(seed)
    perm = np.random.permutation(n)
    dev = -int(0.2 * n)
    dv = int(dev * 0.75)
    train, valid, test = data_loader.split_indices(n, seed)
    np.testing.assert_array_equal(train, perm[:dev])
    np.testing.assert_array_equal(valid, perm[dev:dv])
    np.testing.assert_array_equal(test, perm[dv:])
    assert len(train) + len(valid) + len(test) == n
    assert len(np.unique(np.concatenate([train, valid, test]))) == n


def test_task1_ragged_lines_left_padded_and_index_numbering(tmp_path):
    path = tmp_path / "task1.csv"
    path.write_text("12,100,7\n100,7\n\n3,12,100,7\n")                # ragged, one blank line, 100 > 12 > 7 > 3
    sequences, index = data_loader.load_sequences(str(path))
    # <UNK>=0, then ascending integer ids: 0→1, 3→2, 7→3, 12→4, 100→5
    np.testing.assert_array_equal(index.keys, [0, 3, 7, 12, 100])
    assert index.size == 6
    expected_raw = np.array([[0, 12, 100, 7], [0, 0, 100, 7], [3, 12, 100, 7]])
    mapping = {0: 1, 3: 2, 7: 3, 12: 4, 100: 5}
    np.testing.assert_array_equal(sequences, np.vectorize(mapping.get)(expected_raw))
    assert sequences.dtype == np.int64

    # write_index / read_index round-trip; numbering visible in the file
    index_path = tmp_path / "index.csv"
    data_loader.write_index(index, str(index_path))
    lines = index_path.read_text().splitlines()
    assert lines[:3] == ["item,index", "<UNK>,0", "0,1"]
    assert lines[-1] == "100,5"
    again = data_loader.read_index(str(index_path))
    np.testing.assert_array_equal(again.keys, index.keys)
    assert again.size == index.size


def test_authors_dict_index_reads(tmp_path):
    path = tmp_path / "index.csv"
    original = {'<UNK>': 0, '0': 1, '5': 2, '17': 3, '120': 4}
    path.write_text(str(original))                                    # the authors' str(dict) format
    index = data_loader.read_index(str(path))
    assert index.size == len(original)
    np.testing.assert_array_equal(index.keys, [0, 5, 17, 120])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mapped = index.lookup(np.array([[0, 5, 17, 120]]), "x")
    np.testing.assert_array_equal(mapped, [[original[str(k)] for k in (0, 5, 17, 120)]])
    path.write_text("{'<UNK>': 0, '0': 1, '5': 2}")
    small = data_loader.read_index(str(path))
    np.testing.assert_array_equal(small.keys, [0, 5])


def test_task_file_expands_targets_and_maps_sources(tmp_path):
    index_path = tmp_path / "index.csv"
    index_path.write_text("item,index\n<UNK>,0\n0,1\n3,2\n7,3\n12,4\n100,5\n")
    index = data_loader.read_index(str(index_path))
    path = tmp_path / "task2.csv"
    path.write_text("3,7,12,,900,20\n12,100,,20\n0,7,100,,55,900,20\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # every source item is known
        data = data_loader.load_task(str(path), index)
    # targets get their own index: <UNK>=0, 20→1, 55→2, 900→3
    assert data.n_classes == 4
    np.testing.assert_array_equal(data.targets, [3, 1, 1, 2, 3, 1])
    line0, line1, line2 = [2, 3, 4], [1, 4, 5], [1, 3, 5]            # line 1 left-padded with raw 0 → item 1
    np.testing.assert_array_equal(data.inputs, [line0, line0, line1, line2, line2, line2])
    assert data.inputs.shape == (6, 3)


def test_unknown_source_items_warn_once_with_count(tmp_path):
    index_path = tmp_path / "index.csv"
    index_path.write_text("{'<UNK>': 0, '0': 1, '5': 2, '9': 3}")
    index = data_loader.read_index(str(index_path))
    path = tmp_path / "task.csv"
    path.write_text("5,9,44,,1\n77,5,9,,2\n44,44,9,,1,2\n")          # 4 unknown source tokens (44, 77, 44, 44)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = data_loader.load_task(str(path), index)
    relevant = list(caught)
    assert len(relevant) == 1, [str(w.message) for w in caught]
    assert re.search(r"(?<!\d)4(?!\d)", str(relevant[0].message)), str(relevant[0].message)
    np.testing.assert_array_equal(data.inputs[0], [2, 3, 0])
    np.testing.assert_array_equal(data.inputs[1], [0, 2, 3])
    np.testing.assert_array_equal(data.inputs[2], [0, 0, 3])
    np.testing.assert_array_equal(data.inputs[3], [0, 0, 3])


def test_batches_keep_every_row():
    got = data_loader.batches(10, 4, np.random.default_rng(0))
    assert [len(b) for b in got] == [4, 4, 2]
    assert sorted(np.concatenate(got).tolist()) == list(range(10))
    plain = data_loader.batches(5, 2, None)
    assert [b.tolist() for b in plain] == [[0, 1], [2, 3], [4]]


def python_parse(text: str, fields: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Reference: split lines and commas in Python (values with a 0 placeholder for ',,')."""
    values, starts, splits, file_lines = [], [0], [], []
    for number, line in enumerate(text.replace("\r", "").split("\n"), 1):
        if not line:
            continue
        if fields == 2:
            source, targets = line.split(",,")
            splits.append(len(values) + len(source.split(",")))
            values += [int(v) for v in source.split(",")] + [0] + [int(v) for v in targets.split(",")]
        else:
            values += [int(v) for v in line.split(",")]
        starts.append(len(values))
        file_lines.append(number)
    return values, starts, splits, file_lines


@pytest.mark.parametrize("fields", [1, 2])
def test_tokenize_matches_python_parse(tmp_path, monkeypatch, fields):
    monkeypatch.setattr(data_loader, "_CHUNK", 64)  # many chunks, tokens near every chunk edge
    rng = np.random.default_rng(fields)
    for trial in range(60):
        lines = []
        for _ in range(rng.integers(1, 25)):
            if rng.random() < 0.1:
                lines.append("")
                continue
            number = lambda: str(int(rng.integers(0, 10 ** int(rng.choice([1, 2, 4, 8, 9, 12, 16, 17, 18])))))
            source = ",".join(number() for _ in range(rng.integers(1, 12)))
            lines.append(source if fields == 1 else source + ",," + ",".join(number() for _ in range(rng.integers(1, 4))))
        lines.append("7" if fields == 1 else "7,,8")
        text = ("\r\n" if trial % 5 == 0 else "\n").join(lines) + ("\n" if trial % 2 else "")
        path = tmp_path / f"t{trial}.csv"
        path.write_bytes(text.encode())
        tokens = data_loader.tokenize(str(path), fields)
        values, starts, splits, file_lines = python_parse(text, fields)
        assert tokens.values.tolist() == values, text
        assert tokens.line_start.tolist() == starts
        assert tokens.file_line.tolist() == file_lines
        assert tokens.split.tolist() == (splits if fields == 2 else [])


def test_segments_regular_view_equals_general_copy():
    values = np.arange(40)
    starts, stops = np.array([0, 10, 20, 30]), np.array([6, 16, 26, 36])      # stride 10, width 6
    fast = data_loader.segments(values, starts, stops)
    assert not fast.flags.owndata                                              # a view, no copy
    np.testing.assert_array_equal(fast, [values[a:b] for a, b in zip(starts, stops)])
    ragged = data_loader.segments(values, np.array([0, 10, 21]), np.array([6, 13, 22]), pad_value=-1)
    np.testing.assert_array_equal(ragged, [[0, 1, 2, 3, 4, 5], [-1, -1, -1, 10, 11, 12], [-1, -1, -1, -1, -1, 21]])


@pytest.mark.parametrize("largest", [1000, 2**40])  # a table, and binary search beyond _DENSE_LIMIT
def test_lookup_and_unique_match_searchsorted(largest):
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(0, largest, 300))
    index = data_loader.ItemIndex(keys)
    raw = np.concatenate([rng.choice(keys, 500), [largest + 5, 1 if 1 not in keys else largest + 7]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapped = index.lookup(raw.reshape(2, -1), "f.csv")
    position = np.searchsorted(keys, raw)
    known = (position < keys.size) & (keys[np.minimum(position, keys.size - 1)] == raw)
    np.testing.assert_array_equal(mapped.reshape(-1), np.where(known, position + 1, 0))
    assert len(caught) == 1 and "2 item token(s) not in the index" in str(caught[0].message)
    unique_keys, inverse = data_loader.dense_unique(raw)
    expected_keys, expected_inverse = np.unique(raw, return_inverse=True)
    np.testing.assert_array_equal(unique_keys, expected_keys)
    np.testing.assert_array_equal(inverse, expected_inverse)


def test_multi_target_lines_share_one_source_row(tmp_path):
    path = tmp_path / "task2.csv"
    path.write_text("1,2,3,,7,8\n2,3,4,,9\n")
    index = data_loader.ItemIndex(np.array([1, 2, 3, 4]))
    data = data_loader.load_task(str(path), index)
    assert data.sources.shape == (2, 3) and data.targets.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(data.rows(np.array([0, 1, 2])), [0, 0, 1])
    np.testing.assert_array_equal(data.inputs, [[1, 2, 3], [1, 2, 3], [2, 3, 4]])


def test_staging_gathers_rows_of_a_strided_array():
    matrix = np.arange(60).reshape(6, 10)[:, 1:8]                               # a non-contiguous view
    staged = data_loader.Staging(matrix, torch.device("cpu"))(np.array([4, 0, 4]))
    assert staged.dtype == torch.int64 and staged.is_contiguous()
    np.testing.assert_array_equal(staged.numpy(), matrix[[4, 0, 4]])


# ------------------------------------------------------------------ an index that grows (--protocol time)

def test_a_grown_index_keeps_every_earlier_index_and_says_which_stage_added_each(tmp_path):
    index = data_loader.build_index(np.array([[0, 5, 3], [9, 3, 5]]))          # stage 1: 0, 3, 5, 9 → 1..4
    grown = index.grow(np.array([[7, 3, -1], [1, 12, 7]]), 2).grow(np.array([2, 12, 40]), 4)
    assert grown.keys.tolist() == [0, 3, 5, 9, 1, 7, 12, 2, 40] and grown.stages.tolist() == [1] * 4 + [2] * 3 + [4] * 2
    raw = np.array([0, 3, 5, 9, 1, 7, 12, 2, 40, 4, 10**9])
    assert grown.positions(raw).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, -1, -1]
    assert np.array_equal(grown.positions(raw[:4]), index.positions(raw[:4]))   # earlier indices unchanged
    assert [grown.size_at(stage) for stage in (1, 2, 3, 4)] == [5, 8, 8, 10] and grown.size == 10
    big = data_loader.ItemIndex(grown.keys + 2**40, 1, grown.stages)             # the binary-search path
    assert big.positions(raw + 2**40).tolist() == grown.positions(raw).tolist()
    with pytest.raises(ValueError, match="stage 3 cannot add items after stage 4"):
        grown.grow(np.array([99]), 3)
    data_loader.write_index(grown, str(tmp_path / "index.csv"))
    lines = (tmp_path / "index.csv").read_text().splitlines()
    assert lines[:3] == ["item,index,stage", "<UNK>,0,1", "0,1,1"] and lines[6:8] == ["1,5,2", "7,6,2"]
    again = data_loader.read_index(str(tmp_path / "index.csv"))
    assert np.array_equal(again.keys, grown.keys) and np.array_equal(again.stages, grown.stages)
    data_loader.write_index(index, str(tmp_path / "static.csv"))                  # one stage: the format of before
    assert (tmp_path / "static.csv").read_text() == "item,index\n<UNK>,0\n0,1\n3,2\n5,3\n9,4\n"


@pytest.mark.parametrize("rows, message", [
    ("item,index,stage\n<UNK>,0,1\n3,1,1\n2,2,1\n", "ascending"),       # not ascending within a stage
    ("item,index,stage\n<UNK>,0,1\n3,1,2\n4,2,1\n", "never decrease"),  # a stage before the one above it
    ("item,index,stage\n<UNK>,0,1\n3,1,1\n3,2,2\n", "distinct"),        # an item added twice
    ("item,index,stage\n<UNK>,0,1\n3,2,1\n", "0, 1, 2"),               # an index skipped
    ("item,index,stage\n<UNK>,0,1\n3,1\n", "item,index,stage rows"),
])
def test_a_grown_index_that_breaks_its_rules_is_refused(tmp_path, rows, message):
    path = tmp_path / "index.csv"
    path.write_text(rows)
    with pytest.raises(DataError, match=message):
        data_loader.read_index(str(path))


def test_a_retest_file_lies_beside_its_task_and_numbers_its_targets_as_the_tasks_classes(tmp_path):
    """A re-test file's targets become the task's own classes (its head's), whatever classes the file itself holds;
    an example whose target the head does not know is left out and counted; its new items map through the index."""
    assert data_loader.retest_path(str(tmp_path / "task2.csv"), 4) == str(tmp_path / "task2.retest4.csv")
    index = data_loader.build_index(np.array([[1, 2, 3, 4]])).grow(np.array([8, 9]), 2)   # 1..4 → 1..4, 8, 9 → 5, 6
    (tmp_path / "task2.csv").write_text("1,2,,30,10\n3,4,,20\n")              # classes: 10 → 1, 20 → 2, 30 → 3
    task = data_loader.load_task(str(tmp_path / "task2.csv"), index)
    (tmp_path / "task2.retest3.csv").write_text("8,2,,30\n9,1,,99,10\n2,3,,20\n77,3,,20\n")
    with pytest.warns(UserWarning, match="1 item token"):                     # 77: newer than the index
        later, left_out, unknown = data_loader.load_retest(str(tmp_path / "task2.retest3.csv"), index, task)
    assert left_out == 1 and later.n_classes == task.n_classes == 4 and unknown.tolist() == [False] * 3 + [True]
    assert later.targets.tolist() == [3, 1, 2, 2] and later.rows(np.arange(4)).tolist() == [0, 1, 2, 3]
    assert later.inputs.tolist() == [[5, 2], [6, 1], [2, 3], [0, 3]]
    (tmp_path / "task2.retest4.csv").write_text("8,2,,30\n2,3,,20\n")
    assert data_loader.load_retest(str(tmp_path / "task2.retest4.csv"), index, task)[0].source_row is None
    (tmp_path / "task1.retest2.csv").write_text("1,8,9\n2,3,77\n77,4,8\n")    # task 1: the last item is the target
    with pytest.warns(UserWarning, match="1 item token"):
        later, left_out, unknown = data_loader.load_retest(str(tmp_path / "task1.retest2.csv"), index, None)
    assert left_out == 1 and later.n_classes == index.size == 7                 # 77's line: no row to score it by
    assert later.sources.tolist() == [[1, 5], [0, 4]] and later.targets.tolist() == [6, 5]
    assert unknown.tolist() == [False, True]