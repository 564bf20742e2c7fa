"""A run's output folder (docs/design.md §5), written the same way by ``fedq simulate`` and
``fedq serve``: ``config.json``, ``metrics.jsonl`` (one record per round), ``bits.jsonl`` (a
mode's rows per step, when its rounds have steps: split), ``summary.json``, ``report.png`` and the
mode's other files (:meth:`fedq.modes.base.Mode.write_report`; split: ``bit_maps.json``), and
``checkpoint.pt`` (after every round, atomically); a causal LM's ``generations.jsonl`` (its
answers to the sample prompts at each evaluation) and ``adapter/`` (the final adapter in PEFT's
format, :mod:`fedq.runtime.export`).

A round's checkpoint is written before its log lines, and carries them: a round in
``metrics.jsonl`` can always be resumed after. On resume the logs are cut back to the rounds the
checkpoint holds (a round that was running when the run stopped is logged once, by the resumed
run), and the checkpoint's last round is logged if the run died before it was.

``summary.json``'s ``wall_seconds`` covers every process of the run: each checkpoint carries the
run's wall seconds so far, and a resumed run adds its own to the larger of that and the
``summary.json`` an interrupted process left (the time a killed process spent after its last
checkpoint is the only time not counted). A run that ends with no round applied (every round
discarded, or none run) says so in ``stopped_reason``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedq.config import RunConfig
from fedq.errors import FOR_USER, ConfigError
from fedq.modes import get_mode
from fedq.modes.base import STEPS_FILE
from fedq.rounds.workload import RunOutcome
from fedq.runtime.checkpoint import save_checkpoint, save_privacy_journal

log = logging.getLogger(__name__)

BITS_FILE = STEPS_FILE
#: A causal LM's greedy answers to the sample prompts, one row per prompt and evaluation.
GENERATIONS_FILE = "generations.jsonl"
#: How ``stopped_reason`` begins when a run ended without applying any round.
NO_ROUND_APPLIED = "no round was applied"


def _cut_log(path: Path, next_round: int) -> list[dict[str, Any]]:
    """Keep the records of rounds before ``next_round``; returns them."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # a torn last line: the process died while writing it
        if int(rec.get("round", 0)) < next_round:
            kept.append(rec)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    return kept


def _summary_wall(out: Path) -> float:
    """``wall_seconds`` of the summary.json an earlier process of the run wrote, else 0."""
    from fedq.report.metrics import SUMMARY_FILE

    try:
        return float(json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))["wall_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def _no_round_applied(summary: dict[str, Any], cfg: RunConfig) -> str:
    """``stopped_reason`` of a run that applied no round: why, and the earlier reason if any."""
    n, why = summary["rounds_discarded"], summary.get("stopped_reason")
    text = NO_ROUND_APPLIED
    if n:
        text += (
            f": {n} round{'s' if n > 1 else ''} discarded, each with fewer than "
            f"rounds.min_clients={cfg.rounds.min_clients} updates"
        )
    return f"{text}; {why}" if why else text


class RunRecorder:
    """Writes one run's folder (module docstring). ``trainable_params`` is handed to the mode's
    :meth:`~fedq.modes.base.Mode.complete_record` (federated mode sizes the fp32 baseline of the
    downlink with it: the same tensors as raw fp32)."""

    def __init__(
        self,
        out: Path,
        cfg: RunConfig,
        *,
        resume_round: int | None = None,
        last_round: dict[str, Any] | None = None,
        t0: float | None = None,
        wall_before: float = 0.0,
    ) -> None:
        from fedq.report import MetricsWriter, write_config

        self.out = out
        self.cfg = cfg
        self.mode = get_mode(cfg.mode)
        self.t0 = time.perf_counter() if t0 is None else t0  # this process's start
        out.mkdir(parents=True, exist_ok=True)
        # the wall seconds of the processes before this one (module docstring)
        self.wall_before = 0.0 if resume_round is None else max(wall_before, _summary_wall(out))
        write_config(out, cfg.to_dict())
        self.previous: list[dict[str, Any]] = []
        if resume_round is None:
            for name in ("metrics.jsonl", BITS_FILE, GENERATIONS_FILE):
                (out / name).unlink(missing_ok=True)
        else:
            self.previous = _cut_log(out / "metrics.jsonl", resume_round)
            _cut_log(out / BITS_FILE, resume_round)
            _cut_log(out / GENERATIONS_FILE, resume_round)
        self.writer = MetricsWriter(out)
        done = int(self.previous[-1]["round"]) if self.previous else -1
        if last_round is not None and int(last_round["record"]["round"]) > done:
            self._write(last_round)  # the run died between this checkpoint and its lines
        logged = self.previous + self.writer.records
        self.cum_bytes = int(logged[-1]["cum_bytes"]) if logged else 0
        self.trainable_params = 0
        self._pending: dict[str, Any] | None = None
        self._collapse_warned = False

    def wall_seconds(self) -> float:
        """The run's wall seconds so far, every process of it (module docstring)."""
        return self.wall_before + time.perf_counter() - self.t0

    def _write(self, entry: dict[str, Any]) -> None:
        """Append one round's lines: its steps to bits.jsonl, its record to metrics.jsonl."""
        if entry["steps"]:
            with (self.out / BITS_FILE).open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in entry["steps"])
        if entry.get("samples"):
            with (self.out / GENERATIONS_FILE).open("a", encoding="utf-8") as f:
                f.writelines(
                    json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n"
                    for row in entry["samples"]
                )
        self.writer.write(entry["record"])

    def round(self, record: dict[str, Any], t_round: float) -> dict[str, Any]:
        """Complete one round's record; returns it. Its lines are written by the round's
        :meth:`checkpoint`, after the checkpoint itself."""
        from fedq.report import to_json_value

        steps = record.pop("steps", None)
        samples = record.pop("samples", None)
        self._check_collapse(record, record.pop("predictions", None))
        self.cum_bytes += int(record["bytes_up"]) + int(record["bytes_down"])
        record["cum_bytes"] = self.cum_bytes
        self.mode.complete_record(record, self.trainable_params)
        for key in ("accuracy", "loss", "epsilon", "mean_bits"):
            record.setdefault(key, None)
        record["seconds"] = round(time.perf_counter() - t_round, 3)
        clean = to_json_value(record)
        self._pending = {
            "record": clean,
            "steps": list(steps or []),
            "samples": [{"round": clean["round"], **s} for s in samples or []],
        }
        return dict(clean)

    def _check_collapse(self, record: dict[str, Any], predictions: list[int] | None) -> None:
        """Warn (once a run) when the evaluated model predicts one class for every row."""
        from fedq.fed.train import collapsed_class

        cls = None if predictions is None else collapsed_class(predictions)
        if cls is None or self._collapse_warned:
            return
        self._collapse_warned = True
        log.warning(
            "round %d: the model predicts class %d for all %d evaluation rows (accuracy %.4f): "
            "training collapsed to one class; unscaled features (set data.standardize: true) or "
            "a too-high train.lr are common causes",
            int(record["round"]),
            cls,
            sum(predictions or []),
            float(record.get("accuracy") or 0.0),
            extra=FOR_USER,
        )

    def checkpoint(self, state: dict[str, Any]) -> None:
        """Write the checkpoint of the round :meth:`round` completed, then that round's lines."""
        pending, self._pending = self._pending, None
        save_checkpoint(self.out, {**state, "log": pending, "wall_seconds": self.wall_seconds()})
        if pending is not None:
            self._write(pending)

    def journal(self, round_index: int, ledger: dict[str, Any]) -> None:
        save_privacy_journal(self.out, round_index, ledger)

    def finish(self, extra: dict[str, Any], report_extras: Mapping[str, Any]) -> dict:
        """Write summary.json, then the mode's files (report.png; split: bit_maps.json) from the
        records and what the server's workload reported at the end (``report_extras``)."""
        from fedq.report import summarize, write_summary

        self.writer.close()
        records = self.previous + self.writer.records
        summary = summarize(records, wall_seconds=self.wall_seconds(), extra=extra)
        if summary["rounds_applied"] == 0 and not summary.get("interrupted"):
            summary["stopped_reason"] = _no_round_applied(summary, self.cfg)
        write_summary(self.out, summary)
        self.mode.write_report(self.out, records, report_extras)
        if summary["rounds_applied"]:
            self._write_adapter()
        return summary

    def _write_adapter(self) -> None:
        """``adapter/``: the final LoRA adapter in PEFT's format (:mod:`fedq.runtime.export`)."""
        from fedq.runtime.export import write_run_adapter

        try:
            where = write_run_adapter(self.out)
        except (ConfigError, OSError, RuntimeError, ValueError) as e:
            log.warning("the final adapter was not written: %s", e, extra=FOR_USER)
            return
        if where is not None:
            log.info("final adapter (PEFT format): %s", where)


class RoundLog:
    """The round engine's hooks that record a run, the same for ``fedq simulate`` and ``fedq
    serve``: a round's privacy charge is journaled before anything of it is released; a closed
    round's record is completed (:meth:`RunRecorder.round`), then ``checkpoint(next_round)``
    writes its checkpoint (through :meth:`RunRecorder.checkpoint`, which writes the round's lines
    after it), then ``on_round`` hears of it; the end is kept as :attr:`outcome`.

    ``fedq serve`` hands it to the engine as its hooks; a simulation's driver, whose engine runs
    in the server host (maybe another process), feeds it the events the host relays."""

    def __init__(
        self,
        recorder: RunRecorder,
        checkpoint: Callable[[int], None],
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.recorder = recorder
        self.checkpoint = checkpoint
        self.on_round_done = on_round
        self.done = threading.Event()
        self.outcome: RunOutcome | None = None
        self._t = time.perf_counter()

    def begin(self) -> None:
        """The first round's time counts from now (the rounds begin)."""
        self._t = time.perf_counter()

    def on_start(self, info: dict[str, Any]) -> None:
        return None

    def on_open(self, r: int, ledger: dict[str, Any]) -> None:
        if ledger:  # a run with privacy: journaled before any release of the round
            self.recorder.journal(r, ledger)

    def on_round(self, record: dict[str, Any]) -> None:
        rec = self.recorder.round(record, self._t)
        self.checkpoint(int(rec["round"]) + 1)
        if self.on_round_done is not None:
            self.on_round_done(rec)
        self._t = time.perf_counter()

    def on_done(self, outcome: RunOutcome) -> None:
        self.outcome = outcome
        self.done.set()
