"""A tiny in-test handler and a loopback server with per-client tokens."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fedq.codec import QuantSpec, dequantize, quantize, raw
from fedq.errors import FedqError
from fedq.transport import TransportClient, TransportServer
from fedq.wire import WireMessage

TOKENS = {"c1": "secret-1", "c2": "secret-2"}


class ToyHandler:
    """Serves fixed global tensors, records updates, and doubles activations in split steps."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.global_tensors = {
            "fc1.weight": quantize(torch.randn(16, 8, generator=gen), 4, QuantSpec(axis=1)),
            "fc1.bias": raw(torch.randn(16, generator=gen)),
        }
        self.updates: list[WireMessage] = []

    def get_task(self, client_id: str, round: int) -> WireMessage:
        if round == 99:
            raise FedqError("round 99 is closed")
        if round == 98:
            raise RuntimeError("handler bug")
        if round == 97:  # a reply the wire format refuses to encode: a server bug
            return WireMessage.global_model(client_id, scalars={"x": float("nan")})
        return WireMessage.global_model(
            client_id,
            round,
            tensors=self.global_tensors,
            scalars={"lr": 0.1},
            tags={"strategy": "fedavg"},
        )

    def push_update(self, msg: WireMessage) -> None:
        self.updates.append(msg)

    def exchange(self, msg: WireMessage) -> WireMessage:
        act = dequantize(msg.tensors["act"])
        return WireMessage.gradients(
            msg.client_id,
            msg.round,
            msg.step,
            tensors={"grad": quantize(2 * act, 8)},
            scalars={"loss": float(act.sum())},
        )


@pytest.fixture(scope="session")
def tokens() -> dict[str, str]:
    return dict(TOKENS)


@pytest.fixture(scope="session")
def toy_handler_cls() -> type[ToyHandler]:
    return ToyHandler


@pytest.fixture(scope="module")
def handler() -> ToyHandler:
    return ToyHandler()


@pytest.fixture(scope="module")
def server(handler: ToyHandler) -> Iterator[TransportServer]:
    with TransportServer(handler, tokens=TOKENS) as srv:
        yield srv


@pytest.fixture
def client(server: TransportServer) -> Iterator[TransportClient]:
    with TransportClient(server.address, client_id="c1", token=TOKENS["c1"], timeout=20) as c:
        yield c
