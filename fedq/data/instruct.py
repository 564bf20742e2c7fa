"""Instruction and text data for causal-LM fine-tuning: ``jsonl:PATH`` and ``instructions``.

A JSON Lines file holds one record per line, each in one of three shapes (a file may mix them):

- Alpaca style: ``{"instruction": ..., "input": ... (optional), "output": ...}``; the loss is on
  the ``output`` tokens only;
- chat: ``{"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", ...}]}``;
  rendered with the tokenizer's chat template, the loss is on the last assistant message only;
- plain text: ``{"text": ...}``; the loss is on every token.

Records stay raw here (:class:`InstructionDataset`): turning them into tokens belongs to the model,
whose tokenizer and chat template they need (:mod:`fedq.models.hf`). A bad record (not UTF-8, not
JSON, not an object, no recognised shape, an empty field) is a :class:`ConfigError` naming the
file and line, raised before any training.

``instructions`` is a small instruction data set generated offline from a seed (word, number and
case tasks with one right answer each), so a causal-LM run works without any download.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedq.data.datasets import DataSplit, InstructionDataset, Record
from fedq.data.holdout import stratified_holdout
from fedq.data.registry import register_dataset, register_source
from fedq.errors import ConfigError

ROLES = ("system", "user", "assistant")


def _field(obj: Mapping[str, Any], key: str, where: str, *, required: bool) -> str:
    v = obj.get(key)
    if v is None:
        if required:
            raise ConfigError(f"{where}: missing field {key!r}")
        return ""
    if not isinstance(v, str):
        raise ConfigError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    if required and not v.strip():
        raise ConfigError(f"{where}: field {key!r} is empty")
    return v


def parse_record(obj: Any, where: str) -> Record:
    """One JSON value -> :class:`Record`, or a ConfigError naming ``where`` (file:line)."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ConfigError(f"{where}: 'messages' must be a non-empty list")
        turns = []
        for j, m in enumerate(msgs):
            at = f"{where}: messages[{j}]"
            if not isinstance(m, dict):
                raise ConfigError(f"{at}: expected an object with 'role' and 'content'")
            role = m.get("role")
            if role not in ROLES:
                raise ConfigError(f"{at}: role must be one of {list(ROLES)}, got {role!r}")
            turns.append((str(role), _field(m, "content", at, required=True)))
        if turns[-1][0] != "assistant":
            raise ConfigError(f"{where}: the last message must be the assistant's answer")
        if len(turns) < 2:
            raise ConfigError(f"{where}: 'messages' needs a prompt before the assistant's answer")
        return Record("chat", turns[-1][1], messages=tuple(turns[:-1]))
    if "instruction" in obj or "output" in obj:
        return Record(
            "alpaca",
            _field(obj, "output", where, required=True),
            instruction=_field(obj, "instruction", where, required=True),
            input=_field(obj, "input", where, required=False),
        )
    if "text" in obj:
        return Record("text", _field(obj, "text", where, required=True))
    raise ConfigError(
        f"{where}: no 'instruction'/'output', 'messages' or 'text' field (found {sorted(obj)[:6]})"
    )


def read_jsonl(path: str | Path) -> list[Record]:
    """Every record of a JSON Lines file (blank lines skipped); problems name the line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such jsonl file")
    records = []
    with p.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{p}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not JSON ({e.msg}, column {e.colno})") from None
            records.append(parse_record(obj, where))
    if not records:
        raise ConfigError(f"{p}: holds no records")
    return records


def records_to_split(
    records: Sequence[Record],
    name: str,
    *,
    test: Sequence[Record] | None = None,
    seed: int = 0,
    test_fraction: float = 0.1,
) -> DataSplit:
    if test is not None:
        return DataSplit(InstructionDataset(records, name), InstructionDataset(test, name))
    tr, te = stratified_holdout(np.zeros(len(records), np.int64), test_fraction, seed)
    return DataSplit(
        InstructionDataset([records[i] for i in tr], name),
        InstructionDataset([records[i] for i in te], name),
    )


@register_source("jsonl")
def load_jsonl(
    path: str, seed: int = 0, test_fraction: float = 0.1, test_path: str | None = None
) -> DataSplit:
    """Records of ``path``; evaluated on ``test_path`` when given, otherwise on a seeded holdout
    of ``test_fraction`` of the records."""
    records = read_jsonl(path)
    test = read_jsonl(test_path) if test_path else None
    return records_to_split(
        records, Path(path).stem, test=test, seed=seed, test_fraction=test_fraction
    )


def sample_prompts(given: Sequence[str] | None, test_data: Any) -> list[Record]:
    """The records whose answers a causal-LM run writes at each evaluation: ``given``
    (``model.sample_prompts``) as instructions, else the first three evaluation records with a
    prompt (instruction or chat; plain text records have none, nor do plain text rows)."""
    if given is not None:
        return [Record("alpaca", "", instruction=p) for p in given]
    return [r for r in getattr(test_data, "records", ()) if r.kind != "text"][:3]


def describe_prompt(record: Record) -> str:
    """What ``generations.jsonl`` shows as a record's prompt."""
    if record.kind == "chat":
        return record.messages[-1][1]
    return record.instruction + (f"\n\n{record.input}" if record.input else "")


def answer_rows(prompts: Sequence[Record], answers: Sequence[str]) -> list[dict[str, str]]:
    """``generations.jsonl`` rows (without the round) of ``prompts`` and their answers."""
    return [
        {"prompt": describe_prompt(p), "answer": a} for p, a in zip(prompts, answers, strict=True)
    ]


# ------------------------------------------------------------------ a generated instruction set

_WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "garden",
    "window",
    "silver",
    "market",
    "forest",
    "candle",
    "orange",
    "bridge",
    "planet",
    "winter",
    "summer",
    "pencil",
    "rocket",
    "castle",
    "dragon",
    "mirror",
    "valley",
    "coffee",
    "jacket",
    "island",
    "meadow",
    "thunder",
    "violin",
    "sunset",
    "harbor",
    "lantern",
]
_OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "light": "dark",
    "open": "closed",
    "early": "late",
    "happy": "sad",
    "full": "empty",
    "strong": "weak",
    "old": "new",
    "high": "low",
}


def _task(rng: random.Random) -> Record:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        return Record("alpaca", str(a + b), instruction=f"Add {a} and {b}.")
    if kind == 1:
        w = rng.choice(_WORDS)
        return Record(
            "alpaca", w.upper(), instruction="Write the word in capital letters.", input=w
        )
    if kind == 2:
        w = rng.choice(_WORDS)
        return Record("alpaca", w[::-1], instruction="Spell the word backwards.", input=w)
    if kind == 3:
        w = rng.choice(sorted(_OPPOSITES))
        return Record("alpaca", _OPPOSITES[w], instruction=f"What is the opposite of '{w}'?")
    if kind == 4:
        ws = rng.sample(_WORDS, 3)
        return Record(
            "alpaca",
            ", ".join(sorted(ws)),
            instruction="Sort these words alphabetically.",
            input=", ".join(ws),
        )
    w = rng.choice(_WORDS)
    return Record("alpaca", str(len(w)), instruction=f"How many letters are in '{w}'?")


def instruction_records(n: int, seed: int) -> list[Record]:
    """``n`` generated instruction records (the same for the same seed in every process)."""
    rng = random.Random(seed)
    return [_task(rng) for _ in range(n)]


@register_dataset("instructions")
def load_instructions(seed: int = 0, num_samples: int = 400) -> DataSplit:
    """Generated instruction data (module docstring): ``num_samples`` records, 10% held out.
    The records come from a fixed generator seed so that every run sees the same data; ``seed``
    picks the holdout."""
    if num_samples < 10:
        raise ConfigError(f"instructions: num_samples must be >= 10, got {num_samples}")
    return records_to_split(instruction_records(num_samples, 1234), "instructions", seed=seed)


def write_jsonl(records: Sequence[Record], path: str | Path) -> None:
    """Write records back as JSON Lines (``fedq shard`` of instruction data, tests)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for r in records:
            if r.kind == "alpaca":
                obj: dict[str, Any] = {"instruction": r.instruction, "output": r.response}
                if r.input:
                    obj["input"] = r.input
            elif r.kind == "chat":
                msgs = [{"role": role, "content": c} for role, c in r.messages]
                obj = {"messages": [*msgs, {"role": "assistant", "content": r.response}]}
            else:
                obj = {"text": r.response}
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
