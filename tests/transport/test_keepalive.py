"""Keepalive agreed on both ends: a site whose work stream stays idle across many of its pings
keeps its stream (the server accepts pings at the client's interval); a client pinging faster than
the server accepts is cut off with GOAWAY, which is what dropped healthy sites before. Real gRPC on
loopback, with pings every second so that a few seconds span several of them."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from typing import Any

import pytest

from fedq.errors import ConfigError, TransportError
from fedq.transport import TransportClient, TransportServer
from fedq.transport.keepalive import Keepalive
from fedq.wire.control import ClientInfo, Joined, Registration, WorkItem

#: Long enough for five of the client's pings (and three strikes at the server), short for a test.
IDLE_S = 5.0


class Waiting:
    """A round handler whose run never starts: every work stream gets WAIT, then nothing (no
    data flows on the connection, as while a site waits for min_clients or trains)."""

    def __init__(self) -> None:
        self.open = 0

    def register(self, principal: str, reg: Registration) -> Joined:
        return Joined("run", "{}", {c.client_id: 0 for c in reg.clients}, 2, 4, "test")

    def work(
        self, principal: str, run_id: str, closed: threading.Event
    ) -> Generator[WorkItem, None, None]:
        self.open += 1
        try:
            yield WorkItem("wait", 0, reason="waiting for clients")
            closed.wait()
        finally:
            self.open -= 1

    def wake(self) -> None:
        return None

    def get_task(self, client_id: str, round: int) -> Any:
        raise AssertionError("no tasks")

    def push_update(self, msg: Any) -> None:
        raise AssertionError("no updates")


def _hold_stream(server_keepalive: Keepalive, client_keepalive: Keepalive) -> tuple[Any, int]:
    """Open a work stream, leave it idle for IDLE_S; returns (the error that broke it, or None;
    the streams the server still had open at the end)."""
    handler = Waiting()
    with (
        TransportServer(handler, keepalive=server_keepalive) as srv,
        TransportClient(srv.address, client_id="c1", keepalive=client_keepalive) as c,
    ):
        c.register(Registration((ClientInfo("c1", 10),), "test"))
        stream = c.work("run")
        items: list[WorkItem] = []
        errors: list[BaseException] = []

        def read() -> None:
            try:
                items.extend(stream)
            except TransportError as e:
                errors.append(e)

        t = threading.Thread(target=read, daemon=True)
        t.start()
        time.sleep(IDLE_S)
        still_open = handler.open
        stream.cancel()
        t.join(10)
        assert [i.action for i in items] == ["wait"]
        return (errors[0] if errors else None), still_open


def test_an_idle_work_stream_survives_many_keepalive_pings() -> None:
    error, still_open = _hold_stream(Keepalive(min_ping_s=0.5), Keepalive(ping_s=1.0))
    assert error is None and still_open == 1


def test_pings_faster_than_the_server_accepts_break_the_stream() -> None:
    """Why both ends must agree: the server refuses pings below its minimum with GOAWAY."""
    error, still_open = _hold_stream(Keepalive(min_ping_s=10.0), Keepalive(ping_s=1.0))
    assert isinstance(error, TransportError) and error.code == "UNAVAILABLE"
    assert still_open == 0


def test_keepalive_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="ping_s must be positive"):
        Keepalive(ping_s=0)
    server = dict(Keepalive(min_ping_s=2.5).server_options())
    assert server["grpc.http2.min_ping_interval_without_data_ms"] == 2500
    assert server["grpc.keepalive_permit_without_calls"] == 1
    client = dict(Keepalive(ping_s=30).client_options())
    assert client["grpc.keepalive_time_ms"] == 30_000
    assert client["grpc.keepalive_permit_without_calls"] == 1
    # the defaults agree: a client pings no more often than a server accepts
    assert Keepalive().ping_s >= 2 * Keepalive().min_ping_s


def test_the_command_line_states_the_defaults_it_uses() -> None:
    from fedq.cli import build_parser
    from fedq.runtime.deploy import LINGER_S
    from fedq.transport.keepalive import DEFAULT_MIN_PING_S, DEFAULT_PING_S

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    join, serve = commands["join"].format_help(), commands["serve"].format_help()
    assert f"(default {DEFAULT_PING_S:g};" in " ".join(join.split())
    assert f"(default {DEFAULT_MIN_PING_S:g};" in " ".join(serve.split())
    assert f"(default {LINGER_S:g})" in " ".join(serve.split())
