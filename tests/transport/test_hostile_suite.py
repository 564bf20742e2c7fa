"""Thousands of hostile calls against live servers (the round engine with the federated and the
split workload behind real gRPC on loopback): random, truncated, bit-flipped and field-tampered
messages and frame sequences for every RPC (Register, Work, GetTask, PushUpdate, Step, health),
with a valid token, a wrong one and none. Every call ends with a status that names the caller's
mistake or a refused precondition (never INTERNAL or UNKNOWN, never a hang, never the server
going away), and afterwards the server is healthy, serves a valid client, and its memory has not
grown with what it was sent.

``FEDQ_HOSTILE_CASES`` sets the number of cases per server (default 2500)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import psutil
import pytest
import torch
from grpc_health.v1 import health_pb2
from hostile import mutate_frames, mutate_message

from fedq import __version__
from fedq.codec import quantize, raw
from fedq.config import config_from_dict
from fedq.errors import TransportError
from fedq.runtime.hosts import ServerHost
from fedq.transport import TransportClient
from fedq.wire import WireMessage, message_to_frame_bytes
from fedq.wire.control import ClientInfo, Registration, registration_to_proto
from fedq.wire.pb import service_pb2

CASES = int(os.environ.get("FEDQ_HOSTILE_CASES", "2500"))
TOKENS = {"client-0": "tok-0-secret", "client-1": "tok-1-secret"}
#: What a hostile call may get: the caller's mistake, a refused precondition, or success (a
#: mutation can leave a message valid). Never INTERNAL / UNKNOWN (a server bug), DEADLINE_EXCEEDED
#: (a hang) or UNAVAILABLE (the server went away).
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,  # a registration while the client's work stream is open
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.CANCELLED,  # only ever our own cancel of a Work stream after its first item
}
FED = "/fedq.v2.Rounds/"
_PRINTABLE = [chr(c) for c in range(0x20, 0x7F)]


def _cfg(mode: str) -> Any:
    base: dict[str, Any] = {
        "seed": 3,
        "rounds": {
            "count": 100_000,
            "num_clients": 2,
            "clients_per_round": 1,
            "min_clients": 1,
            "eval_every": 100_000,
            "timeout_s": 30,
        },
        "runtime": {"backend": "inprocess"},
    }
    if mode == "federated":
        base.update(
            data={"name": "digits", "max_train": 200, "max_test": 20},
            model={"name": "mlp", "hidden": 8},
            defence={"max_bad_updates": 0},
        )  # client-0 stays: the suite is its alone
    else:
        base.update(
            mode="split",
            data={"name": "rotten_tomatoes", "partition": "iid", "max_train": 40, "max_test": 8},
            model={"name": "tiny_bert_lora", "hidden": 16, "lora_r": 2, "max_length": 8},
            train={"batch_size": 4},
            split={"cut": 1, "tiny_layers": 2, "local_steps": 1},
        )
    return config_from_dict(base)


@dataclass
class Live:
    host: ServerHost
    address: str
    keeper: TransportClient  # client-0, registered, its work stream open: round 0 is open
    valid: dict[str, list[bytes] | bytes]


def _update_frames(host: ServerHost) -> list[bytes]:
    state = host.workload.global_state if hasattr(host.workload, "global_state") else {}
    tensors = {k: quantize(torch.zeros_like(v).float(), 4) for k, v in state.items()} or {
        "act": quantize(torch.randn(4, 8, 16), 4)
    }
    msg = WireMessage.update("client-0", 0, tensors=tensors, scalars={"num_samples": 10.0})
    return list(message_to_frame_bytes(msg, 256))


@pytest.fixture(scope="module", params=["federated", "split"])
def live(request: pytest.FixtureRequest) -> Iterator[Live]:
    cfg = _cfg(request.param)
    roster = list(TOKENS)
    host = ServerHost(cfg, roster, tokens=TOKENS)
    address = host.start()
    host.begin(0)
    keeper = TransportClient(address, client_id="client-0", token=TOKENS["client-0"], timeout=10)
    reg = Registration((ClientInfo("client-0", 10),), __version__, node="keeper")
    joined = keeper.register(reg)
    feed = keeper.work(joined.run_id)
    first = next(iter(feed))
    assert first.action in ("wait", "task")
    step = WireMessage.activations(
        "client-0",
        0,
        0,
        tensors={"act": quantize(torch.randn(2, 8, 16), 4), "mask": raw(torch.ones(2, 8))},
    )
    valid = {
        "Register": registration_to_proto(reg).SerializeToString(),
        "Work": service_pb2.WorkRequest(run_id=joined.run_id).SerializeToString(),
        "GetTask": service_pb2.TaskRequest(client_id="client-0", round=0).SerializeToString(),
        "PushUpdate": _update_frames(host),
        "Step": list(message_to_frame_bytes(step, 512)),
        "Check": health_pb2.HealthCheckRequest(service="fedq.v2.Rounds").SerializeToString(),
    }
    yield Live(host, address, keeper, valid)
    feed.cancel()
    keeper.close()
    host.stop()


def _metadata(rng: random.Random) -> list[tuple[str, str]]:
    how = rng.randrange(10)  # 4 in 10 unauthenticated or impersonating, 6 in 10 valid
    if how == 0:
        return []
    if how == 1:
        return [("x-fedq-client", "client-0"), ("authorization", "Bearer wrong")]
    if how == 2:
        return [("x-fedq-client", "client-1"), ("authorization", f"Bearer {TOKENS['client-0']}")]
    if how == 3:  # any printable value (gRPC itself refuses to send control characters)
        name = "".join(rng.choice(_PRINTABLE) for _ in range(rng.choice([1, 8, 300])))
        return [("x-fedq-client", name), ("authorization", "Bearer " + "a" * rng.choice([0, 5000]))]
    return [("x-fedq-client", "client-0"), ("authorization", f"Bearer {TOKENS['client-0']}")]


def _call(channel: grpc.Channel, rpc: str, data: Any, md: list[tuple[str, str]]) -> Any:
    """One raw call (no serializers: the bytes go out as they are); its status code."""
    timeout = 10.0
    try:
        if rpc == "Register":
            channel.unary_unary(FED + rpc)(data, metadata=md, timeout=timeout)
        elif rpc == "Check":
            channel.unary_unary("/grpc.health.v1.Health/Check")(data, timeout=timeout)
        elif rpc == "Work":
            call = channel.unary_stream(FED + rpc)(data, metadata=md, timeout=timeout)
            next(call, None)  # a valid request streams work items: the first one will do
            call.cancel()
        elif rpc == "GetTask":
            for _ in channel.unary_stream(FED + rpc)(data, metadata=md, timeout=timeout):
                pass
        elif rpc == "PushUpdate":
            channel.stream_unary(FED + rpc)(iter(data), metadata=md, timeout=timeout)
        else:
            for _ in channel.stream_stream("/fedq.v2.Split/Step")(
                iter(data), metadata=md, timeout=timeout
            ):
                pass
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def _mutant(live: Live, rpc: str, rng: random.Random) -> Any:
    base = live.valid[rpc]
    if isinstance(base, list):
        return mutate_frames(base, rng)
    classes = {
        "Register": service_pb2.RegisterRequest,
        "Work": service_pb2.WorkRequest,
        "GetTask": service_pb2.TaskRequest,
        "Check": health_pb2.HealthCheckRequest,
    }
    cls = classes[rpc]
    return mutate_message(base, cls, rng)


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def test_every_hostile_call_gets_an_error_status_and_the_server_stays_healthy(live: Live) -> None:
    rng = random.Random(20261125)
    rpcs = ["Register", "Work", "GetTask", "PushUpdate", "Step", "Check"]
    seen: dict[tuple[str, Any], int] = {}
    bad: list[str] = []
    with grpc.insecure_channel(live.address) as channel:
        for rpc in rpcs:  # warm-up: one valid call each, before the memory baseline
            _call(channel, rpc, live.valid[rpc], _metadata(random.Random(5)))
        before = _rss()
        for i in range(CASES):
            rpc = rpcs[i % len(rpcs)]
            data, md = _mutant(live, rpc, rng), _metadata(rng)
            code, details = _call(channel, rpc, data, md)
            seen[rpc, code] = seen.get((rpc, code), 0) + 1
            if code not in ALLOWED:
                bad.append(f"case {i} {rpc}: {code.name} {details[:200]}")
        grown = _rss() - before
        health = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )(health_pb2.HealthCheckRequest(service="fedq.v2.Rounds"), timeout=10)
    assert not bad, f"{len(bad)} of {CASES} calls got a status they must not:\n" + "\n".join(
        bad[:20]
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    # the server still does its job for a valid client: one registers, and client-0 keeps its
    # place (registering it again while its work stream is open is refused) and its stream
    with TransportClient(
        live.address, client_id="client-1", token=TOKENS["client-1"], timeout=10
    ) as other:
        again = other.register(Registration((ClientInfo("client-1", 10),), __version__))
    assert again.run_id == live.host.engine.run_id
    with pytest.raises(TransportError, match="ALREADY_EXISTS: client-0 is already connected"):
        live.keeper.register(Registration((ClientInfo("client-0", 10),), __version__))
    assert [m.client_id for m in live.host.engine.available()] == ["client-0"]
    assert grown < 200 << 20, f"server memory grew by {grown >> 20} MiB over {CASES} calls"
    # the suite reached every RPC's validation, not only the authentication in front of it
    for rpc in ("Register", "GetTask", "PushUpdate", "Step"):
        assert seen.get((rpc, grpc.StatusCode.INVALID_ARGUMENT), 0) > 0, (rpc, seen)


def test_poisoned_and_tampered_updates_are_refused_and_memory_stays_bounded(live: Live) -> None:
    """Valid messages with hostile values (3e38 everywhere, random codes with shifted offsets),
    from the authenticated client of the open round: each refused with a reason, the model stays
    finite, and the server's memory does not grow with them."""
    from fedq.bench.robust import attacked

    if not hasattr(live.host.workload, "global_state"):
        pytest.skip("federated updates only")
    state = live.host.workload.global_state
    gen = torch.Generator().manual_seed(7)
    md = [("x-fedq-client", "client-0"), ("authorization", f"Bearer {TOKENS['client-0']}")]
    codes: dict[str, int] = {}
    with grpc.insecure_channel(live.address) as channel:
        before = _rss()
        for i in range(60):
            r = live.host.engine._current
            kind = ("poison", "tamper")[i % 2]
            delta = {k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in state.items()}
            msg = WireMessage.update(
                "client-0", r, tensors=attacked(kind, delta, gen), scalars={"num_samples": 10.0}
            )
            code, details = _call(
                channel, "PushUpdate", list(message_to_frame_bytes(msg, 4096)), md
            )
            codes[code.name] = codes.get(code.name, 0) + 1
            assert code is not grpc.StatusCode.OK, (kind, details)
        grown = _rss() - before
    assert codes.get("FAILED_PRECONDITION", 0) > 0, codes  # refused by the bounds, with a reason
    assert all(bool(torch.isfinite(v).all()) for v in live.host.workload.global_state.values())
    assert max(float(v.abs().max()) for v in live.host.workload.global_state.values()) < 100
    assert grown < 100 << 20, f"server memory grew by {grown >> 20} MiB over 60 poisoned updates"
