"""Split mode (SFL-V2): each client runs the bottom of a model cut in two and exchanges the cut's
activations and gradients with the server, which trains the shared top; the client halves are
averaged at the end of each round (:mod:`fedq.split`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedq.config import SPLIT_RULES, RunConfig
from fedq.modes.base import STEPS_FILE, Mode
from fedq.rounds.workload import RoundPolicy, TakeTurns, Workload

if TYPE_CHECKING:
    import torch

    from fedq.data.datasets import DataSplit, Shard
    from fedq.rounds.node import TaskRunner
    from fedq.split.models import SplitModel
    from fedq.wire.control import Joined

#: The file of the bits each boundary's gates chose (``report_extras``' ``bit_maps``).
BIT_MAPS_FILE = "bit_maps.json"


def build_split_model(cfg: RunConfig, num_classes: int, device: torch.device) -> SplitModel:
    """The run's model cut at ``split.cut`` (same seed, same weights in every process), with
    quantizers at every inner boundary when ``split.all_boundaries``."""
    from fedq.models import model_entry
    from fedq.split.codecs import boundary_factory
    from fedq.split.models import build_split_model as build

    m, sc = cfg.model, cfg.split
    entry = model_entry(m.name)
    width = m.hidden if entry is None else entry.hidden(m.hidden)
    model = build(
        m.name,
        cut=sc.cut,
        num_classes=num_classes,
        seed=cfg.seed,
        lora_r=m.lora.r or m.lora_r,
        max_length=m.max_length,
        hidden=m.hidden,
        tiny_layers=sc.tiny_layers,
        lora=m.lora.options(),
        make_boundary=boundary_factory(sc, width),
        packing=m.packing(),
    )
    return model.to(device)


class SplitMode(Mode):
    name = "split"
    rules = SPLIT_RULES
    # the AQ-SGD copies a worker shares among its clients are checkpointed per worker
    states_by_worker = True

    def data_problem(self, cfg: RunConfig, train: Any, task: str) -> str | None:
        """As in federated mode (:meth:`Mode.data_problem`), and a causal LM also trains on
        plain text rows (the loss on every token)."""
        if task == "causal_lm" and hasattr(train, "texts"):
            return None
        return super().data_problem(cfg, train, task)

    def server_workload(
        self,
        cfg: RunConfig,
        data: DataSplit,
        num_classes: int,
        input_dim: int,
        device: torch.device,
    ) -> Workload:
        from fedq.split.models import CLASSIFY
        from fedq.split.protocol import SplitServer

        model = build_split_model(cfg, num_classes, device)
        labels = num_classes if model.task == CLASSIFY else len(model.tokenizer)
        return SplitServer(cfg, model, data.test, labels)

    def round_policy(self, cfg: RunConfig) -> RoundPolicy:
        # every selected client takes all its split.local_steps steps in its turn; bad updates
        # are counted, never a reason to exclude (split scenarios have no defence section)
        return RoundPolicy(turns=TakeTurns(cfg.split.local_steps))

    def client_runner(
        self,
        cfg: RunConfig,
        shards: Mapping[str, Shard],
        joined: Joined,
        device: torch.device,
    ) -> TaskRunner:
        from fedq.split.protocol import SplitClientWorker

        model = build_split_model(cfg, joined.num_classes, device)
        return SplitClientWorker(cfg, model, shards, joined.client_index)

    def trained_model(self, cfg: RunConfig, server_state: Mapping[str, Any]) -> Any | None:
        """The whole model of a checkpoint: the server's top (its LoRA, and a classifier's head)
        with the averaged client state's bottom, as a fedq bundle (a causal LM's, or a LoRA
        text classifier's); the cut's quantizers are not part of it."""
        import torch

        top, client = server_state.get("top"), server_state.get("client_state")
        if top is None or client is None:
            return None
        head = top.get("mods.head.weight")
        num_classes = 1 if head is None else int(head.shape[0])
        model = build_split_model(cfg, num_classes, torch.device("cpu"))
        model.load_bottom_state({k: v for k, v in client.items() if not k.startswith("act_q.")})
        params = dict(model.top.named_parameters())
        if set(top) - set(params):
            return None  # a checkpoint of another model
        with torch.no_grad():
            for n, v in top.items():
                params[n].copy_(v)
        return model.bundle

    def describe(self, cfg: RunConfig) -> str:
        sp = cfg.split
        return (
            f" | split after block {sp.cut}"
            + (" (all boundaries)" if sp.all_boundaries else "")
            + f" | activations {sp.act_codec}, gradients {sp.grad_codec}"
            + (f" -> {sp.target_bits} bits" if "amaq" in (sp.act_codec, sp.grad_codec) else "")
        )

    def report_extras(self, workload: Workload) -> dict[str, Any]:
        bit_maps = getattr(workload, "bit_maps", None)
        return {"bit_maps": bit_maps() if bit_maps is not None else {}}

    def write_report(
        self, out: Path, records: Sequence[Mapping[str, Any]], extras: Mapping[str, Any]
    ) -> None:
        """``bit_maps.json`` and the 2x2 split report (with the steps of ``bits.jsonl``)."""
        from fedq.split.report import plot_split_report

        bit_maps = dict(extras.get("bit_maps") or {})
        (out / BIT_MAPS_FILE).write_text(json.dumps(bit_maps) + "\n")
        plot_split_report(records, bit_maps, out / "report.png", steps_path=out / STEPS_FILE)
