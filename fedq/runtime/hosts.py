"""Plain host objects for one process each: the server (FedServer + gRPC server) and a client
worker (ClientWorker + gRPC connections). ``fedq.runtime.backend`` runs them as Ray actors or
in-process; they hold no Ray code themselves."""

from __future__ import annotations

import logging
from typing import Any

from fedq.config import RunConfig
from fedq.errors import PrivacyBudgetExceeded
from fedq.fed.client import ClientWorker, Connection
from fedq.fed.server import FedServer
from fedq.runtime.setup import build_bundle, client_partitions, load_data, quiet_process
from fedq.wire.limits import WireLimits

log = logging.getLogger(__name__)


class ServerHost:
    def __init__(self, cfg: RunConfig, tokens: dict[str, str]) -> None:
        quiet_process(cfg.runtime.threads_per_worker)
        from fedq.transport.server import TransportServer

        split = load_data(cfg)
        sizes = [int(p.numel()) for p in client_partitions(cfg, split.train)]
        bundle = build_bundle(cfg, split.train)
        self.server = FedServer(cfg, bundle, split.test, sizes)
        self.transport = TransportServer(
            self.server, host="127.0.0.1", port=0, tokens=tokens, limits=WireLimits()
        )
        self.num_params = sum(v.numel() for v in self.server.global_state.values())

    def start(self) -> str:
        self.transport.start()
        return str(self.transport.address)

    def info(self) -> dict[str, Any]:
        return {
            "trainable_params": self.num_params,
            "tensors": len(self.server.global_state),
            "privacy": self.server.privacy.plan(),
        }

    def open_round(self, r: int) -> dict[str, Any]:
        """{"clients": [...]} or, when the privacy budget does not allow the round,
        {"stop": reason} (nothing was selected or charged)."""
        self.transport.counters.take()  # bytes of a discarded stray request do not leak in
        try:
            return {"clients": self.server.open_round(r)}
        except PrivacyBudgetExceeded as e:
            return {"stop": str(e)}

    def close_round(self) -> dict[str, Any]:
        out = self.server.close_round()
        traffic = self.transport.counters.take()
        out["bytes_up"] = int(traffic["bytes_up"])
        out["bytes_down"] = int(traffic["bytes_down"])
        return out

    def stop(self) -> None:
        self.transport.stop(0.5)

    def state_dict(self) -> dict[str, Any]:
        return self.server.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.server.load_state_dict(state)


class WorkerHost:
    def __init__(self, cfg: RunConfig, address: str, tokens: dict[str, str]) -> None:
        quiet_process(cfg.runtime.threads_per_worker)
        from fedq.transport.client import TransportClient

        split = load_data(cfg)
        parts = client_partitions(cfg, split.train)
        bundle = build_bundle(cfg, split.train)
        chunk = cfg.runtime.chunk_bytes

        def connect(name: str) -> Connection:
            limits = WireLimits(chunk_size=chunk)
            return TransportClient(address, client_id=name, token=tokens[name], limits=limits)

        self.worker = ClientWorker(cfg, bundle, split.train, parts, connect)

    def ready(self) -> bool:
        return True

    def run_round(self, r: int, cids: list[int]) -> list[dict[str, Any]]:
        return self.worker.run_round(r, cids)

    def state_dict(self) -> dict[int, Any]:
        return self.worker.state_dict()

    def load_state_dict(self, states: dict[int, Any]) -> None:
        self.worker.load_state_dict(states)
