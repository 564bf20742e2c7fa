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
