"""Hostile input, bad credentials and failing handlers end one RPC with a status code; the server
keeps serving valid requests afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch

from fedq.codec import FORMAT_VERSION, quantize
from fedq.errors import ConfigError, TransportError
from fedq.transport import TransportClient, TransportServer
from fedq.wire import WireMessage, bundle_to_bytes, message_to_frames, packed_to_proto
from fedq.wire.control import ClientInfo, Joined, Registration, WorkItem
from fedq.wire.pb import service_pb2, service_pb2_grpc
from fedq.wire.pb import tensor_pb2 as pb

MD = [("x-fedq-client", "c1"), ("authorization", "Bearer secret-1")]


def _update(client_id: str = "c1") -> WireMessage:
    return WireMessage.update(client_id, tensors={"w": quantize(torch.randn(8, 8), 4)})


def _bad_header() -> list[pb.Frame]:
    frames = list(message_to_frames(_update()))
    frames[0].header.format_version = 9
    return frames


def _bad_offsets() -> list[pb.Frame]:
    frames = list(message_to_frames(_update(), chunk_size=16))
    frames[2].chunk.offset += 1
    return frames


def _bits_nine() -> list[pb.Frame]:
    t = packed_to_proto(quantize(torch.randn(4, 4), 4), "fc1.weight")
    t.bits = b"\x09" + t.bits[1:]
    payload = pb.TensorBundle(format_version=FORMAT_VERSION, tensors=[t]).SerializeToString()
    header = pb.Header(
        format_version=FORMAT_VERSION, kind="update", client_id="c1", payload_size=len(payload)
    )
    return [pb.Frame(header=header), pb.Frame(chunk=pb.Chunk(offset=0, data=payload))]


def _no_header() -> list[pb.Frame]:
    return list(message_to_frames(_update(), chunk_size=64))[1:]


def _payload_claim() -> list[pb.Frame]:
    header = pb.Header(
        format_version=FORMAT_VERSION, kind="update", client_id="c1", payload_size=1 << 62
    )
    return [pb.Frame(header=header)]


def _unknown_kind() -> list[pb.Frame]:
    frames = list(message_to_frames(_update(), chunk_size=64))
    frames[0].header.kind = "ack"  # round protocol 3: only the five kinds of wire-format §12
    return frames


HOSTILE: dict[str, tuple[Callable[[], list[pb.Frame]], str]] = {
    "bad header": (_bad_header, "format_version"),
    "unknown kind": (_unknown_kind, "kind"),
    "wrong chunk offsets": (_bad_offsets, "chunk.offset"),
    "bits 9": (_bits_nine, "bits"),
    "missing header": (_no_header, "header"),
    "huge payload claim": (_payload_claim, "payload_size"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_frames_get_invalid_argument_and_server_survives(
    case: str, server: TransportServer, client: TransportClient
) -> None:
    make, field = HOSTILE[case]
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.RoundsStub(channel)
        with pytest.raises(grpc.RpcError) as exc:
            stub.PushUpdate(iter(make()), metadata=MD, timeout=10)
        split = service_pb2_grpc.SplitStub(channel)
        with pytest.raises(grpc.RpcError) as split_exc:
            list(split.Step(iter(make()), metadata=MD, timeout=10))
    for e in (exc.value, split_exc.value):
        assert e.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert f"'{field}'" in e.details()
    assert client.push_update(_update()) > 0  # still serving


# Frames as bytes that no protobuf Frame object can express (protobuf would merge or drop them).
_HEADER = pb.Frame(
    header=pb.Header(format_version=FORMAT_VERSION, kind="update", client_id="c1", payload_size=1)
).SerializeToString()
_CHUNK = pb.Frame(chunk=pb.Chunk(data=b"z")).SerializeToString()
RAW_HOSTILE: dict[str, tuple[list[bytes], str]] = {
    "header and chunk in one frame": ([_HEADER + _CHUNK], "chunk"),
    "two chunks in one frame": ([_HEADER, _CHUNK + _CHUNK], "chunk"),
    "chunk as a varint": ([_HEADER, b"\x10\x01"], "chunk"),
    "truncated frame": ([_HEADER, _CHUNK[:-1]], "chunk"),
}


@pytest.mark.parametrize("case", list(RAW_HOSTILE), ids=list(RAW_HOSTILE))
def test_hostile_frame_bytes_get_invalid_argument(
    case: str, server: TransportServer, client: TransportClient
) -> None:
    frames, field = RAW_HOSTILE[case]
    with grpc.insecure_channel(server.address) as channel:
        push = channel.stream_unary("/fedq.v2.Rounds/PushUpdate")  # frames sent as given
        step = channel.stream_stream("/fedq.v2.Split/Step")
        with pytest.raises(grpc.RpcError) as exc:
            push(iter(frames), metadata=MD, timeout=10)
        with pytest.raises(grpc.RpcError) as split_exc:
            list(step(iter(frames), metadata=MD, timeout=10))
    for e in (exc.value, split_exc.value):
        assert e.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert f"'{field}'" in e.details(), e.details()
    assert client.push_update(_update()) > 0  # still serving


def test_wrong_or_missing_token_is_unauthenticated(server: TransportServer, client) -> None:
    for cid, token in [("c1", "nope"), ("c1", None), ("ghost", "secret-1"), ("c2", "secret-1")]:
        with TransportClient(server.address, client_id=cid, token=token) as bad:
            with pytest.raises(TransportError) as exc:
                bad.get_task(1)
            assert exc.value.code == "UNAUTHENTICATED"
            with pytest.raises(TransportError) as exc:
                bad.push_update(_update(cid))
            assert exc.value.code == "UNAUTHENTICATED"
    with grpc.insecure_channel(server.address) as channel:  # no metadata at all
        stub = service_pb2_grpc.RoundsStub(channel)
        with pytest.raises(grpc.RpcError) as raw_exc:
            list(stub.GetTask(service_pb2.TaskRequest(client_id="c1", round=1), timeout=10))
        assert raw_exc.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert client.get_task(1).round == 1


def test_client_id_must_match_credentials(client: TransportClient) -> None:
    with pytest.raises(TransportError) as exc:
        client.push_update(_update("c2"))
    assert exc.value.code == "PERMISSION_DENIED"


def test_handler_errors_map_to_status_codes(client: TransportClient) -> None:
    with pytest.raises(TransportError) as exc:
        client.get_task(99)
    assert (exc.value.code, exc.value.reason) == ("FAILED_PRECONDITION", "round 99 is closed")
    with pytest.raises(TransportError) as exc:
        client.get_task(98)
    assert exc.value.code == "INTERNAL" and "handler bug" in exc.value.reason
    with pytest.raises(TransportError) as exc:
        client.get_task(97)
    assert exc.value.code == "INTERNAL" and "'scalars'" in exc.value.reason
    assert client.get_task(2).round == 2


def test_split_stream_recovers_after_a_failed_step(client: TransportClient) -> None:
    with pytest.raises(TransportError) as exc:
        client.split_step(WireMessage.activations("c1"))  # no "act" tensor
    assert exc.value.code == "INTERNAL" and "act" in exc.value.reason
    good = WireMessage.activations("c1", tensors={"act": quantize(torch.ones(2, 2), 8)})
    assert client.split_step(good).kind == "gradients"


def test_registering_again_drops_the_split_stream_of_a_server_that_went_away(
    toy_handler_cls: type, tokens: dict[str, str]
) -> None:
    """A client that registers with a restarted server sends its next split step to that server
    at once, not into the stream the old one left open (which would fail and cost a retry)."""

    class Rounds(toy_handler_cls):  # type: ignore[misc, valid-type]
        def register(self, principal: str, reg: Registration) -> Joined:
            return Joined("run-1", "{}", {"c1": 0}, 2, 4, "test")

        def work(self, principal: str, run_id: str, closed: Any) -> Iterator[WorkItem]:
            yield WorkItem("done", 0, reason="over")

        def wake(self) -> None:
            pass

    act = WireMessage.activations("c1", tensors={"act": quantize(torch.ones(2, 2), 8)})
    reg = Registration(clients=(ClientInfo("c1", 1),), fedq_version="test")
    first = TransportServer(Rounds(), tokens=tokens)
    port = first.start()
    with TransportClient(first.address, client_id="c1", token=tokens["c1"], timeout=20) as c:
        c.register(reg)
        assert c.split_step(act).kind == "gradients"  # the stream stays open between steps
        first.stop(0)
        with TransportServer(Rounds(), port=port, tokens=tokens) as second:
            assert c.register(reg).run_id == "run-1"
            assert c.split_step(act).kind == "gradients"
            assert second.counters.snapshot()["clients"]["c1"]["bytes_up"] > 0


def test_bind_policy_refuses_plaintext_on_public_interfaces(toy_handler_cls) -> None:
    with pytest.raises(ConfigError, match="TLS"):
        TransportServer(toy_handler_cls(), host="0.0.0.0")
    srv = TransportServer(toy_handler_cls(), host="0.0.0.0", allow_insecure=True)
    assert srv.address.startswith("0.0.0.0:")
    assert TransportServer(toy_handler_cls(), host="::1").address.startswith("[::1]:")


def test_bundle_encoding_used_on_the_wire_is_the_bundle_format() -> None:
    msg = _update()
    frames = list(message_to_frames(msg))
    assert b"".join(f.chunk.data for f in frames[1:]) == bundle_to_bytes(msg.tensors)
