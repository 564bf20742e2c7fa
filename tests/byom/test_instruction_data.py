"""Instruction and text records (``jsonl:PATH``, ``instructions``): the three record shapes, and a
bad record is one error naming the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedq.data import InstructionDataset, load_dataset
from fedq.data.instruct import instruction_records, read_jsonl, write_jsonl
from fedq.errors import ConfigError

ALPACA = {"instruction": "Add 2 and 3.", "output": "5"}
WITH_INPUT = {"instruction": "Reverse it.", "input": "abc", "output": "cba"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
}
TEXT = {"text": "Plain text to model."}


def _jsonl(path: Path, *rows: object) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_the_three_record_shapes_read_as_written(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", ALPACA, WITH_INPUT, CHAT, TEXT)
    a, b, c, t = read_jsonl(path)
    assert (a.kind, a.instruction, a.input, a.response) == ("alpaca", "Add 2 and 3.", "", "5")
    assert (b.input, b.response) == ("abc", "cba")
    assert c.kind == "chat" and c.response == "Paris"
    assert c.messages == (("system", "Be brief."), ("user", "Capital of France?"))
    assert (t.kind, t.response) == ("text", "Plain text to model.")
    again = tmp_path / "again.jsonl"
    write_jsonl([a, b, c, t], again)
    assert read_jsonl(again) == [a, b, c, t]


def test_blank_lines_are_skipped_and_the_holdout_is_seeded(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n\n", encoding="utf-8")
    split = load_dataset(f"jsonl:{path}", seed=3)
    assert isinstance(split.train, InstructionDataset)
    assert (len(split.train), len(split.test)) == (27, 3)
    again = load_dataset(f"jsonl:{path}", seed=3)
    assert [r.response for r in again.test.records] == [r.response for r in split.test.records]
    other = load_dataset(f"jsonl:{path}", seed=4)
    assert [r.response for r in other.test.records] != [r.response for r in split.test.records]
    assert split.train.task == "causal_lm" and split.num_classes == 1


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"instruction": "x"}', "missing field 'output'"),
        ('{"instruction": "x", "output": "  "}', "field 'output' is empty"),
        ('{"instruction": 3, "output": "y"}', "field 'instruction' must be a string, got int"),
        ('{"instruction": "x", "output": "y"', "not JSON (Expecting ',' delimiter, column 35)"),
        ("[1, 2]", "expected a JSON object, got list"),
        (
            '{"prompt": "x"}',
            "no 'instruction'/'output', 'messages' or 'text' field (found ['prompt'])",
        ),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}',
            "the last message must be the assistant's answer",
        ),
        (
            '{"messages": [{"role": "bot", "content": "hi"}]}',
            "messages[0]: role must be one of ['system', 'user', 'assistant'], got 'bot'",
        ),
        ('{"text": ""}', "field 'text' is empty"),
    ],
)
def test_a_bad_record_names_its_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        read_jsonl(path)
    assert e.value.problems == [f"{path}:3: {problem}"]


def test_bytes_that_are_not_utf8_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ALPACA).encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=r"d\.jsonl:2: not UTF-8 \(invalid continuation byte"):
        read_jsonl(path)


def test_an_empty_or_missing_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(ConfigError, match="holds no records"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(ConfigError, match="no such jsonl file"):
        load_dataset(f"jsonl:{tmp_path / 'absent.jsonl'}")


def test_the_generated_instruction_set_is_the_same_in_every_process() -> None:
    a, b = instruction_records(50, 1234), instruction_records(50, 1234)
    assert a == b and len({r.instruction for r in a}) > 5
    split = load_dataset("instructions", num_samples=100)
    assert (len(split.train), len(split.test)) == (90, 10)
    assert len(load_dataset("instructions").train) == 360  # 400 records by default
    add = next(r for r in a if r.instruction.startswith("Add "))
    x, y = (int(w.strip(".")) for w in add.instruction.split()[1::2])
    assert add.response == str(x + y)


def _csv(path: Path, header: list[str], *rows: list[str]) -> Path:
    import csv

    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_a_csv_without_labels_holds_records_of_every_shape(tmp_path: Path) -> None:
    """Columns instruction/input/output, messages (a JSON list) and text in one file: empty cells
    are absent, so each row is the shape its filled cells make; a ``label`` column keeps the file
    a classification table."""
    chat = json.dumps(CHAT["messages"])
    path = _csv(
        tmp_path / "mixed.csv",
        ["instruction", "input", "output", "messages", "text"],
        ["Add 2 and 3.", "", "5", "", ""],
        ["Reverse it.", "abc", "cba", "", ""],
        ["", "", "", chat, ""],
        ["", "", "", "", "Plain text to model."],
    )
    split = load_dataset(f"csv:{path}", test_path=str(path))
    assert isinstance(split.train, InstructionDataset)
    assert split.train.records == read_jsonl(
        _jsonl(tmp_path / "same.jsonl", ALPACA, WITH_INPUT, CHAT, TEXT)
    )
    labelled = _csv(tmp_path / "cls.csv", ["text", "label"], ["good", "pos"], ["bad", "neg"])
    assert load_dataset(f"csv:{labelled}", test_path=str(labelled)).num_classes == 2


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (["Add 2 and 3.", ""], "{p}:3: missing field 'output'"),
        (["", "5"], "{p}:3: missing field 'instruction'"),
    ],
)
def test_a_bad_csv_row_names_its_file_and_line(
    tmp_path: Path, row: list[str], problem: str
) -> None:
    p = _csv(tmp_path / "bad.csv", ["instruction", "output"], ["Add 1 and 1.", "2"], row)
    with pytest.raises(ConfigError) as e:
        load_dataset(f"csv:{p}")
    assert e.value.problems == [problem.format(p=p)]


def test_parquet_holds_records_or_a_classification_table(tmp_path: Path) -> None:
    """Parquet as Hugging Face data sets write it: chats as lists of role/content structs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def table(*rows: dict) -> object:  # every column in every row, None where absent
        keys = list(dict.fromkeys(k for r in rows for k in r))
        return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])

    path = tmp_path / "chat.parquet"
    rows = [ALPACA, WITH_INPUT, CHAT, TEXT]
    pq.write_table(table(*rows), path)
    split = load_dataset(f"parquet:{path}", test_path=str(path))
    assert split.test.records == read_jsonl(_jsonl(tmp_path / "same.jsonl", *rows))
    labelled = tmp_path / "cls.parquet"
    pq.write_table(pa.table({"text": ["good", "bad", "fine"], "label": [1, 0, 1]}), labelled)
    cls = load_dataset(f"parquet:{labelled}", test_path=str(labelled))
    assert cls.train.texts == ["good", "bad", "fine"] and cls.train.y.tolist() == [1, 0, 1]
    bad = tmp_path / "bad.parquet"
    pq.write_table(table(ALPACA, {"instruction": "Say hi."}), bad)
    with pytest.raises(ConfigError) as e:
        load_dataset(f"parquet:{bad}")
    assert e.value.problems == [f"{bad} row 1: missing field 'output'"]
    fake = tmp_path / "fake.parquet"
    fake.write_text("instruction,output\n")
    with pytest.raises(ConfigError, match=r"fake.parquet: not a readable Parquet file"):
        load_dataset(f"parquet:{fake}")
