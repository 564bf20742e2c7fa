"""Real gRPC over 127.0.0.1: round trips, large streamed payloads, split steps, byte counters."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health, health_pb2

from fedq.codec import PackedTensor, dequantize, quantize, raw
from fedq.errors import TransportError
from fedq.transport import TransportClient, TransportServer
from fedq.transport.server import (
    RETIRED_SERVICES,
    _health_handlers,
    _rounds_handlers,
    _Servicer,
    _split_handlers,
)
from fedq.wire import WireMessage, message_to_frames
from fedq.wire.control import ClientInfo, Registration
from fedq.wire.pb import service_pb2

MiB = 1 << 20


def _same(a: PackedTensor, b: PackedTensor) -> bool:
    return (
        (a.shape, a.dtype, a.encoding, a.granularity, a.axis, a.symmetric, a.scale_dtype)
        == (b.shape, b.dtype, b.encoding, b.granularity, b.axis, b.symmetric, b.scale_dtype)
        and torch.equal(a.payload, b.payload)
        and torch.equal(a.bits, b.bits)
        and torch.equal(a.scales, b.scales)
    )


def _frame_bytes(msg: WireMessage) -> int:
    return sum(f.ByteSize() for f in message_to_frames(msg))


def test_get_task_and_push_update_round_trip(client, handler, server) -> None:
    task = client.get_task(3)
    assert (task.kind, task.client_id, task.round) == ("global", "c1", 3)
    assert task.scalars == {"lr": 0.1} and task.tags == {"strategy": "fedavg"}
    assert set(task.tensors) == set(handler.global_tensors)
    for name, p in handler.global_tensors.items():
        assert _same(task.tensors[name], p)
    update = WireMessage.update(
        "c1",
        3,
        tensors={"fc1.weight": quantize(torch.randn(16, 8), 3)},
        scalars={"num_samples": 64.0},
    )
    sent = client.push_update(update)
    assert sent == _frame_bytes(update)
    got = handler.updates[-1]
    assert got.client_id == "c1" and got.scalars == {"num_samples": 64.0}
    assert _same(got.tensors["fc1.weight"], update.tensors["fc1.weight"])


def test_payload_over_4mib_is_streamed(client, handler) -> None:
    big = torch.randn(5 * MiB // 4 + 3)
    update = WireMessage.update("c1", 1, tensors={"big": raw(big)})
    frames = list(message_to_frames(update))
    assert len(frames) == 7 and max(f.ByteSize() for f in frames) < 2 * MiB
    assert client.push_update(update) > 5 * MiB
    assert torch.equal(dequantize(handler.updates[-1].tensors["big"]), big)


def test_byte_counters_agree_and_equal_frame_sizes(
    server: TransportServer, handler, tokens: dict[str, str]
) -> None:
    server.counters.take()
    with TransportClient(server.address, client_id="c2", token=tokens["c2"]) as c:
        task = c.get_task(5)
        update = WireMessage.update("c2", 5, tensors=task.tensors)
        c.push_update(update)
        request = service_pb2.TaskRequest(client_id="c2", round=5)
        ack = service_pb2.Ack(accepted=True, bytes_received=_frame_bytes(update))
        expect_up = request.ByteSize() + _frame_bytes(update)
        expect_down = _frame_bytes(handler.get_task("c2", 5)) + ack.ByteSize()
        assert (c.bytes_sent, c.bytes_received) == (expect_up, expect_down)
    snap = server.counters.take()
    assert snap["clients"]["c2"] == {"bytes_up": expect_up, "bytes_down": expect_down}
    assert (snap["bytes_up"], snap["bytes_down"]) == (expect_up, expect_down)
    assert server.counters.snapshot()["bytes_up"] == 0  # take() reset the counters


def test_split_steps_share_one_stream(server: TransportServer, client) -> None:
    server.counters.take()
    sent_before = client.bytes_sent
    replies, up = [], 0
    for step in range(2):
        act = torch.randn(4, 6)
        msg = WireMessage.activations("c1", 0, step, tensors={"act": quantize(act, 8)})
        up += _frame_bytes(msg)
        reply = client.split_step(msg)
        assert reply.kind == "gradients" and reply.step == step
        expected = 2 * dequantize(msg.tensors["act"])
        assert torch.allclose(dequantize(reply.tensors["grad"]), expected, atol=0.1)
        replies.append(reply)
    assert client._split is not None  # still open between steps
    assert client.bytes_sent - sent_before == up
    assert server.counters.snapshot()["clients"]["c1"]["bytes_up"] == up
    down = sum(_frame_bytes(r) for r in replies)
    assert server.counters.snapshot()["clients"]["c1"]["bytes_down"] == down


def test_service_tables_cover_every_rpc_of_the_schema() -> None:
    """The server writes its service tables by hand (requests arrive as bytes that fedq parses,
    Frame replies leave as bytes): none is missing, health included."""
    servicer = object.__new__(_Servicer)
    tables = [
        (service_pb2.DESCRIPTOR.services_by_name["Rounds"], _rounds_handlers(servicer)),
        (service_pb2.DESCRIPTOR.services_by_name["Split"], _split_handlers(servicer)),
        (
            health_pb2.DESCRIPTOR.services_by_name["Health"],
            _health_handlers(servicer, health.HealthServicer()),
        ),
    ]
    for service, handlers in tables:
        assert set(handlers) == {m.name for m in service.methods}
        for method in service.methods:
            h = handlers[method.name]
            assert (h.request_streaming, h.response_streaming) == (
                method.client_streaming,
                method.server_streaming,
            )
            frames_out = method.output_type.full_name == "fedq.v2.Frame"
            assert h.request_deserializer is None  # parsed by fedq: bad bytes INVALID_ARGUMENT
            assert (h.response_serializer is None) == frames_out


def test_health_reports_serving(client, server: TransportServer) -> None:
    client.wait_ready(timeout=5)
    assert server.serves_split


def test_health_not_serving_after_stop(toy_handler_cls) -> None:
    srv = TransportServer(toy_handler_cls())
    srv.start()
    with TransportClient(srv.address, client_id="x") as c:
        c.wait_ready(timeout=5)
        srv.stop(grace=0)
        with pytest.raises(TransportError):
            c.wait_ready(timeout=0.5)


def _health_check(address: str, service: str) -> Any:
    """``Health.Check`` with no metadata at all: no principal, no token."""
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            return check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        except grpc.RpcError as e:
            return e.code()


def test_health_needs_no_token_and_reports_each_service(server: TransportServer) -> None:
    """wire-format §13: health answers without x-fedq-client or a token, even on a server with
    tokens; SERVING for "", Rounds and (split served) Split; NOT_FOUND for other names."""
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ("", "fedq.v2.Rounds", "fedq.v2.Split"):
        assert _health_check(server.address, name) == serving, name
    assert _health_check(server.address, "fedq.v2.Nope") == grpc.StatusCode.NOT_FOUND


def test_health_of_a_federated_only_server_has_no_split(toy_handler_cls) -> None:
    class NoSplit:  # tasks and updates only: no exchange, so no Split service
        def __init__(self) -> None:
            self._toy = toy_handler_cls()

        def get_task(self, client_id: str, round: int) -> WireMessage:
            return self._toy.get_task(client_id, round)

        def push_update(self, msg: WireMessage) -> None:
            self._toy.push_update(msg)

    with TransportServer(NoSplit()) as srv:
        assert not srv.serves_split
        assert (
            _health_check(srv.address, "fedq.v2.Rounds") == health_pb2.HealthCheckResponse.SERVING
        )
        assert _health_check(srv.address, "fedq.v2.Split") == grpc.StatusCode.NOT_FOUND


def _register_status(address: str, metadata: list[tuple[str, str]], data: bytes = b"") -> Any:
    with grpc.insecure_channel(address) as channel:
        register = channel.unary_unary("/fedq.v2.Rounds/Register")  # request sent as given
        with pytest.raises(grpc.RpcError) as e:
            register(data, metadata=metadata, timeout=10)
    return e.value.code()


def test_register_checks_the_token_before_the_client_header(
    server: TransportServer, toy_handler_cls
) -> None:
    """wire-format §13, order of checks: with tokens, a Register without x-fedq-client is
    UNAUTHENTICATED (authentication answers first); without tokens it is INVALID_ARGUMENT; a
    named caller on a server that runs no rounds gets UNIMPLEMENTED before its request bytes
    are parsed."""
    garbage = b"\xff\xff\xff"
    assert _register_status(server.address, []) == grpc.StatusCode.UNAUTHENTICATED
    assert _register_status(server.address, [], garbage) == grpc.StatusCode.UNAUTHENTICATED
    md = [("x-fedq-client", "c1"), ("authorization", "Bearer secret-1")]
    assert _register_status(server.address, md, garbage) == grpc.StatusCode.UNIMPLEMENTED
    with TransportServer(toy_handler_cls()) as open_srv:  # no tokens
        assert _register_status(open_srv.address, []) == grpc.StatusCode.INVALID_ARGUMENT
        assert _register_status(open_srv.address, [], garbage) == grpc.StatusCode.INVALID_ARGUMENT
        named = [("x-fedq-client", "c1")]
        assert _register_status(open_srv.address, named, garbage) == grpc.StatusCode.UNIMPLEMENTED


def test_retired_service_paths_name_both_protocol_versions(server: TransportServer) -> None:
    """Round protocol 3 renamed fedq.v1.Federated to fedq.v2.Rounds (wire-format §16): a client of
    protocol 2 calling any old path gets FAILED_PRECONDITION naming both versions, not gRPC's
    bare UNIMPLEMENTED, before anything is authenticated or read."""
    assert set(RETIRED_SERVICES) == {"fedq.v1.Federated", "fedq.v1.Split"}
    with grpc.insecure_channel(server.address) as channel:
        calls = {
            "/fedq.v1.Federated/Register": lambda p: channel.unary_unary(p)(b"", timeout=10),
            "/fedq.v1.Federated/Work": lambda p: list(channel.unary_stream(p)(b"", timeout=10)),
            "/fedq.v1.Federated/GetTask": lambda p: list(channel.unary_stream(p)(b"", timeout=10)),
            "/fedq.v1.Federated/PushUpdate": lambda p: channel.stream_unary(p)(
                iter([b""]), timeout=10
            ),
            "/fedq.v1.Split/Step": lambda p: list(
                channel.stream_stream(p)(iter([b""]), timeout=10)
            ),
        }
        assert {p.split("/")[1] for p in calls} == set(RETIRED_SERVICES)
        assert sum(len(m) for m in RETIRED_SERVICES.values()) == len(calls)
        for path, call in calls.items():
            with pytest.raises(grpc.RpcError) as e:
                call(path)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, path
            reason = e.value.details()
            assert "round protocol 2" in reason and "round protocol 3" in reason, reason
            assert "fedq.v2.Rounds" in reason, reason


def test_client_names_the_missing_rounds_service() -> None:
    """A server without fedq.v2.Rounds (an older fedq, or not fedq) answers Register with gRPC's
    UNIMPLEMENTED; the client says which service and protocol it needed."""
    from concurrent import futures

    bare = grpc.server(futures.ThreadPoolExecutor(1))
    port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    try:
        with TransportClient(f"127.0.0.1:{port}", client_id="c1", timeout=10) as c:
            reg = Registration((ClientInfo("c1", 1),), "0.0.1")
            with pytest.raises(TransportError, match="UNIMPLEMENTED") as e:
                c.register(reg)
        assert "does not serve fedq.v2.Rounds" in str(e.value)
        assert "round protocol 2" in str(e.value) and "round protocol 3" in str(e.value)
    finally:
        bare.stop(0)
