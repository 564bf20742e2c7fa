"""Federated mode (the FedAvg family): each selected client trains the whole model (or its LoRA
adapters) on its own data and uploads a quantized update; the server combines the updates
(:mod:`fedq.fed`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedq.config import FEDERATED_RULES, RunConfig
from fedq.modes.base import Mode
from fedq.rounds.workload import RoundPolicy, Workload

if TYPE_CHECKING:
    import torch

    from fedq.data.datasets import DataSplit, Shard
    from fedq.models import ModelBundle
    from fedq.rounds.node import TaskRunner
    from fedq.wire.control import Joined


def build_bundle(cfg: RunConfig, num_classes: int, input_dim: int) -> ModelBundle:
    """The run's whole model (same seed, same weights in every process)."""
    from fedq.models import build_model

    return build_model(
        cfg.model.name,
        num_classes=num_classes,
        input_dim=input_dim or None,
        seed=cfg.seed,
        **cfg.model.build_options(),
    )


class FederatedMode(Mode):
    name = "federated"
    rules = FEDERATED_RULES

    def model_names(self) -> list[str]:
        return sorted(super().model_names())

    def server_workload(
        self,
        cfg: RunConfig,
        data: DataSplit,
        num_classes: int,
        input_dim: int,
        device: torch.device,
    ) -> Workload:
        from fedq.fed.server import FedServer

        bundle = build_bundle(cfg, num_classes, input_dim).to(device)
        test = data.test
        if cfg.data.standardize:  # with the evaluation data's own statistics (fedq.data.scaling)
            from fedq.data.scaling import standardized

            test = standardized(test, "the evaluation data")
        return FedServer(cfg, bundle, test)

    def round_policy(self, cfg: RunConfig) -> RoundPolicy:
        return RoundPolicy(max_bad_updates=cfg.defence.max_bad_updates)

    def client_runner(
        self,
        cfg: RunConfig,
        shards: Mapping[str, Shard],
        joined: Joined,
        device: torch.device,
    ) -> TaskRunner:
        from fedq.fed.client import ClientWorker

        bundle = build_bundle(cfg, joined.num_classes, joined.input_dim)
        return ClientWorker(cfg, bundle.to(device), shards, joined.client_index)

    def trained_model(self, cfg: RunConfig, server_state: Mapping[str, Any]) -> Any | None:
        """The global model of a checkpoint (the server workload's state), built for the shape
        the server recorded."""
        shape = server_state.get("model_shape")
        if shape is None:
            return None  # a checkpoint written before fedq recorded it
        num_classes, input_dim = int(shape["num_classes"]), int(shape["input_dim"])
        state = server_state["global_state"]
        bundle = build_bundle(cfg, num_classes, input_dim)
        bundle.load_trainable_state(state)
        return bundle

    def describe(self, cfg: RunConfig) -> str:
        up, down = cfg.compression.uplink, cfg.compression.downlink

        def link(c: Any) -> str:
            bits = f" {c.bits}-bit" if c.policy == "fixed" else ""
            return f"{c.policy}{bits}" + (" +EF" if c.error_feedback else "")

        dp = "" if cfg.privacy.mechanism == "none" else f" | privacy {cfg.privacy.mechanism}"
        return f" | uplink {link(up)} | downlink {link(down)}{dp}"

    def complete_record(self, record: dict[str, Any], trainable_params: int) -> None:
        """The fp32 baseline of the round: the uplink's as the clients reported it, and the
        downlink's, every selected client's copy of the trainable parameters as fp32."""
        down = 4 * trainable_params * int(record["clients_selected"])
        record["bytes_fp32"] = int(record.pop("fp32_up", 0)) + down
