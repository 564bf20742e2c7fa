"""Transport security: TLS / mTLS credentials, per-client bearer tokens, and the bind policy.

fedq never listens on a non-loopback interface in plaintext unless the operator says so explicitly
(``allow_insecure=True``): model updates leak training data, so an open port without TLS is a bug,
not a default. Tokens are compared with :func:`hmac.compare_digest` to avoid timing side channels.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fedq.errors import ConfigError, FedqError

#: Metadata keys (gRPC requires lowercase).
AUTH_HEADER = "authorization"
CLIENT_HEADER = "x-fedq-client"


class AuthenticationError(FedqError):
    """The caller's token is missing or wrong (reported as UNAUTHENTICATED)."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """PEM material for TLS, from files (``*_file``) or in memory (``*_pem``, see
    :meth:`from_pem`; one of the two per item). On a server ``cert``/``key`` are its identity and
    ``ca`` verifies client certificates (mTLS with ``require_client_cert``). On a client ``ca``
    verifies the server, and ``cert``/``key`` (optional) are its own identity for mTLS.
    ``server_name`` overrides the name the client expects in the server certificate. PEM bytes
    never show in the repr."""

    cert_file: str | None
    key_file: str | None
    ca_file: str | None = None
    require_client_cert: bool = False
    server_name: str | None = None
    cert_pem: bytes | None = field(default=None, repr=False)
    key_pem: bytes | None = field(default=None, repr=False)
    ca_pem: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for item in ("cert", "key", "ca"):
            if getattr(self, f"{item}_file") is not None and getattr(self, f"{item}_pem"):
                raise ConfigError(f"tls: give {item}_file or {item}_pem, not both")

    @classmethod
    def from_pem(
        cls,
        *,
        cert: bytes | None = None,
        key: bytes | None = None,
        ca: bytes | None = None,
        server_name: str | None = None,
    ) -> TlsConfig:
        """TLS from PEM bytes held in memory (nothing is read from or written to disk)."""
        return cls(None, None, cert_pem=cert, key_pem=key, ca_pem=ca, server_name=server_name)

    def _read(self, item: str) -> bytes | None:
        pem: bytes | None = getattr(self, f"{item}_pem")
        if pem:
            return pem
        path = getattr(self, f"{item}_file")
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"tls.{item}_file: cannot read {path!r}: {e.strerror}") from e

    def _has(self, item: str) -> bool:
        return bool(getattr(self, f"{item}_file") or getattr(self, f"{item}_pem"))

    def server_credentials(self) -> grpc.ServerCredentials:
        if not self._has("cert") or not self._has("key"):
            raise ConfigError("tls: a server needs cert_file and key_file")
        if self.require_client_cert and not self._has("ca"):
            raise ConfigError(
                "tls: require_client_cert needs ca_file to verify client certificates"
            )
        cert, key = self._read("cert"), self._read("key")
        assert cert is not None and key is not None
        return grpc.ssl_server_credentials(
            [(key, cert)],
            root_certificates=self._read("ca"),
            require_client_auth=self.require_client_cert,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if self._has("cert") != self._has("key"):
            raise ConfigError("tls: a client certificate needs both cert_file and key_file")
        return grpc.ssl_channel_credentials(
            root_certificates=self._read("ca"),
            private_key=self._read("key"),
            certificate_chain=self._read("cert"),
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def format_address(host: str, port: int) -> str:
    """``host:port``, bracketing IPv6 literals."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def check_bind_policy(
    host: str,
    tls: TlsConfig | None,
    allow_insecure: bool,
    fix: str = "configure tls (cert_file/key_file) or pass allow_insecure=True explicitly",
) -> None:
    """Refuse plaintext off loopback unless allowed; ``fix`` says how, in the caller's terms
    (Python arguments here, command-line flags for ``fedq serve``)."""
    if tls is None and not is_loopback(host) and not allow_insecure:
        raise ConfigError(
            f"transport: refusing to listen on {host!r} without TLS; {fix} (trusted networks only)"
        )


def client_metadata(client_id: str, token: str | None) -> list[tuple[str, str]]:
    md = [(CLIENT_HEADER, client_id)]
    if token is not None:
        md.append((AUTH_HEADER, f"Bearer {token}"))
    return md


def authenticate(metadata: Sequence[Any], tokens: Mapping[str, str] | None) -> str | None:
    """The caller's client id from gRPC metadata, checked against ``tokens`` when they are set.

    Returns None when no tokens are configured and the caller did not name itself.
    """
    md: dict[str, str] = {}
    for item in metadata:
        key, value = item[0], item[1]
        md[key.lower()] = value if isinstance(value, str) else value.decode("utf-8", "replace")
    client = md.get(CLIENT_HEADER) or None
    if tokens is None:
        return client
    if client is None:
        raise AuthenticationError(f"missing {CLIENT_HEADER} metadata")
    scheme, _, token = md.get(AUTH_HEADER, "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError(f"missing bearer token for client {client[:80]!r}")
    expected = tokens.get(client)
    # Compare even for unknown clients so the timing does not reveal which ids exist.
    same = hmac.compare_digest(token.encode(), (expected or "\0invalid").encode())
    if expected is None or not same:
        raise AuthenticationError(f"invalid token for client {client[:80]!r}")
    return client


def check_certificate_name(
    auth_context: Mapping[str, Sequence[bytes]], principal: str | None
) -> None:
    """Under mutual TLS the client certificate must be the caller's own: its common name must be
    the principal the call authenticates as (a valid certificate of another client is refused)."""
    names = [n.decode("utf-8", "replace") for n in auth_context.get("x509_common_name", [])]
    if principal is None or principal not in names:
        shown = names[0][:80] if names else "no common name"
        raise AuthenticationError(
            f"the client certificate is for {shown!r}, not for {(principal or '?')[:80]!r}"
        )
