"""gRPC transport: server and client, auth (TLS/mTLS, per-client tokens), limits, byte counters,
standard health checks. Imports grpc; ``fedq.codec`` and ``fedq.wire`` never do."""

from fedq.transport.client import TransportClient
from fedq.transport.counters import ByteCounter
from fedq.transport.security import TlsConfig
from fedq.transport.server import SplitHandler, TaskHandler, TransportServer
from fedq.transport.tokens import load_tokens, read_token

__all__ = [
    "ByteCounter",
    "SplitHandler",
    "TaskHandler",
    "TlsConfig",
    "TransportClient",
    "TransportServer",
    "load_tokens",
    "read_token",
]
