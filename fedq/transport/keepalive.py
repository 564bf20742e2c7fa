"""HTTP/2 keepalive, agreed by both ends: what a client sends and what a server accepts.

A site's work stream is idle for as long as it waits for a round or trains a long task (minutes,
hours). Keepalive pings keep that connection open through NATs and firewalls and notice a peer
that vanished (no answer within ``timeout_s``). A gRPC server with its defaults answers pings
more often than every five minutes on a connection without data with GOAWAY ``too_many_pings``,
which closes every call on it: the site's work stream breaks and the server drops its clients
from the round. So the server here accepts a ping every ``min_ping_s`` seconds, with or without
calls, and a client pings every ``ping_s`` seconds, which must not be below the server's
``min_ping_s`` (the defaults leave a factor of two for network jitter). The server pings its
clients too (every ``server_ping_s``), so it drops a site whose machine vanished without closing
its connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedq.errors import ConfigError

#: A client pings every this many seconds (``fedq join --keepalive-s``).
DEFAULT_PING_S = 20.0
#: A server accepts a ping at most this often (``fedq serve --min-ping-s``).
DEFAULT_MIN_PING_S = 10.0
#: How long either end waits for a ping's answer before it closes the connection.
DEFAULT_TIMEOUT_S = 20.0
#: A server pings each client connection every this many seconds.
DEFAULT_SERVER_PING_S = 60.0


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


@dataclass(frozen=True, slots=True)
class Keepalive:
    """Keepalive of one end (module docstring): ``ping_s`` is what a client sends, ``min_ping_s``
    what a server accepts, ``server_ping_s`` what a server sends, ``timeout_s`` how long a ping
    may go unanswered on either end."""

    ping_s: float = DEFAULT_PING_S
    min_ping_s: float = DEFAULT_MIN_PING_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    server_ping_s: float = DEFAULT_SERVER_PING_S

    def __post_init__(self) -> None:
        for name in ("ping_s", "min_ping_s", "timeout_s", "server_ping_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"keepalive: {name} must be positive, got {value!r}")

    def client_options(self) -> list[tuple[str, Any]]:
        """Channel options: ping every ``ping_s`` seconds while the channel is open, with or
        without calls and however long no data flows."""
        return [
            ("grpc.keepalive_time_ms", _ms(self.ping_s)),
            ("grpc.keepalive_timeout_ms", _ms(self.timeout_s)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),  # 0: no limit (gRPC's default stops at 2)
        ]

    def server_options(self) -> list[tuple[str, Any]]:
        """Server options: accept a client's pings every ``min_ping_s`` seconds or more, with or
        without calls; ping each client every ``server_ping_s`` seconds."""
        return [
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(self.min_ping_s)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_time_ms", _ms(self.server_ping_s)),
            ("grpc.keepalive_timeout_ms", _ms(self.timeout_s)),
        ]
