"""The interface of a training mode (federated, split, and any mode a user adds).

A :class:`Mode` owns everything that differs between modes; the round engine, the transport,
checkpoints, privacy charging and the runtime know only the registry (:mod:`fedq.modes`):

- its configuration rules (:class:`fedq.config.ModeRules`: keys it does not use, its optimizer
  defaults, the privacy mechanisms it offers, its own checks), data that ``fedq.config`` checks
  every scenario against;
- its model family (:meth:`Mode.model_names`: the entries of the model registry it trains);
- its server workload (:meth:`Mode.server_workload`, a :class:`fedq.rounds.workload.Workload`) and
  what it asks of the round engine (:meth:`Mode.round_policy`: an in-round exchange in turns, when
  to exclude a client);
- its client runner (:meth:`Mode.client_runner`, a :class:`fedq.rounds.node.TaskRunner`);
- how its clients' state is checkpointed (:attr:`Mode.states_by_worker`);
- its report: the start line (:meth:`Mode.describe`), what each round's record gains
  (:meth:`Mode.complete_record`), the server's report extras (:meth:`Mode.report_extras`) and
  the files written at the end (:meth:`Mode.write_report`).

docs/design.md ("Adding a mode") walks through writing one.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fedq.config import ModeRules, RunConfig
from fedq.rounds.workload import RoundPolicy, Workload

if TYPE_CHECKING:
    import torch

    from fedq.data.datasets import DataSplit, Shard
    from fedq.rounds.node import TaskRunner
    from fedq.wire.control import Joined


#: The run folder's rows per in-round exchange (a round record's ``steps``, written by the round
#: recorder; split mode's steps).
STEPS_FILE = "bits.jsonl"


class Mode(abc.ABC):
    """One training mode (module docstring). Subclasses set :attr:`name` and :attr:`rules` and
    implement :meth:`server_workload` and :meth:`client_runner`; every other method has a
    default that suits a mode with tasks and uploads only."""

    #: The value of ``mode:`` in a scenario.
    name: ClassVar[str]
    #: What ``fedq.config`` checks for this mode (registered with the mode).
    rules: ClassVar[ModeRules]
    #: Client state in checkpoints: per logical client (False: portable to any number of
    #: workers) or per worker process (True: state a worker shares among its clients).
    states_by_worker: ClassVar[bool] = False

    # ---------------------------------------------------------------- models
    def model_names(self) -> list[str]:
        """The model names this mode trains (``model.name``), as error messages list them."""
        from fedq.models import models_for

        return [e.name for e in models_for(self.name)]

    def data_problem(self, cfg: RunConfig, train: Any, task: str) -> str | None:
        """Why this mode cannot train the model (its ``task``: classification or causal_lm)
        on ``train``, or None. Default: the data's task must be the model's (instruction or
        text records for a causal LM, labelled rows for a classifier)."""
        data_task = getattr(train, "task", "classification")
        if data_task == task:
            return None
        if task == "causal_lm":
            return (
                f"model {cfg.model.name!r} is a causal LM; it trains on instruction or text "
                f"records (jsonl:PATH, instructions), not {cfg.data.name!r}"
            )
        return (
            f"{cfg.data.name!r} holds instruction/text records for a causal LM; model "
            f"{cfg.model.name!r} is a classifier (set model.task: causal_lm for a causal LM "
            "checkpoint, or use labelled data)"
        )

    # ---------------------------------------------------------------- server
    @abc.abstractmethod
    def server_workload(
        self,
        cfg: RunConfig,
        data: DataSplit,
        num_classes: int,
        input_dim: int,
        device: torch.device,
    ) -> Workload:
        """The server's half of a round: built from the resolved config with the run's seed, on
        ``device``; ``data`` is the server's data set (its test split evaluates), ``input_dim``
        0 for text."""

    def round_policy(self, cfg: RunConfig) -> RoundPolicy:
        """What this mode asks of the round engine (default: no in-round exchange, no
        exclusion)."""
        return RoundPolicy()

    # ---------------------------------------------------------------- clients
    @abc.abstractmethod
    def client_runner(
        self,
        cfg: RunConfig,
        shards: Mapping[str, Shard],
        joined: Joined,
        device: torch.device,
    ) -> TaskRunner:
        """The task runner of a client process hosting ``shards`` (client id -> its rows) in
        the run it ``joined`` (the server's answer: roster indices, classes, input width)."""

    def merge_client_states(
        self, states: Sequence[dict[str, Any]], principals: Sequence[str]
    ) -> dict[str, Any]:
        """The checkpoint's client states from the workers' (in ``principals`` order)."""
        if self.states_by_worker:
            return dict(zip(principals, states, strict=True))
        merged: dict[str, Any] = {}
        for s in states:
            merged.update(s)
        return merged

    def client_state_of(self, saved: Mapping[str, Any], principal: str) -> dict[str, Any]:
        """What worker ``principal`` loads of the checkpoint's client states ``saved``."""
        if self.states_by_worker:
            return dict(saved.get(principal, {}))
        return dict(saved)

    # ---------------------------------------------------------------- report
    def describe(self, cfg: RunConfig) -> str:
        """The mode's part of the line printed before a run (after the shared head)."""
        return ""

    def complete_record(self, record: dict[str, Any], trainable_params: int) -> None:
        """Complete a closed round's record in place before it is written (default: as is)."""
        return None

    def report_extras(self, workload: Workload) -> dict[str, Any]:
        """What the server's workload adds to the report at the end of a run (JSON values)."""
        return {}

    def trained_model(self, cfg: RunConfig, server_state: Mapping[str, Any]) -> Any | None:
        """The run's model with the trained state of a checkpoint's ``server_state`` (what
        ``fedq export`` writes and ``adapter/`` holds), or None when this mode's server does not
        hold the whole model (the default)."""
        return None

    def write_report(
        self, out: Path, records: Sequence[Mapping[str, Any]], extras: Mapping[str, Any]
    ) -> None:
        """The mode's files in the run folder at the end: ``report.png`` (default: the
        accuracy / bytes plot of :func:`fedq.report.plot_report`)."""
        from fedq.report import plot_report

        plot_report(records, out / "report.png")
