"""Transport security: TLS / mTLS credentials, per-client bearer tokens, and the bind policy.

fedq never listens on a non-loopback interface in plaintext unless the operator says so explicitly
(``allow_insecure=True``): model updates leak training data, so an open port without TLS is a bug,
not a default. Tokens are compared with :func:`hmac.compare_digest` to avoid timing side channels.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    """PEM files for TLS. On a server ``cert_file``/``key_file`` are its identity and ``ca_file``
    verifies client certificates (mTLS with ``require_client_cert``). On a client ``ca_file``
    verifies the server, and ``cert_file``/``key_file`` (optional) are its own identity for mTLS.
    ``server_name`` overrides the name the client expects in the server certificate."""

    cert_file: str | None
    key_file: str | None
    ca_file: str | None = None
    require_client_cert: bool = False
    server_name: str | None = None

    def _read(self, field: str) -> bytes | None:
        path = getattr(self, field)
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"tls.{field}: cannot read {path!r}: {e.strerror}") from e

    def server_credentials(self) -> grpc.ServerCredentials:
        if not self.cert_file or not self.key_file:
            raise ConfigError("tls: a server needs cert_file and key_file")
        if self.require_client_cert and not self.ca_file:
            raise ConfigError(
                "tls: require_client_cert needs ca_file to verify client certificates"
            )
        cert, key = self._read("cert_file"), self._read("key_file")
        assert cert is not None and key is not None
        return grpc.ssl_server_credentials(
            [(key, cert)],
            root_certificates=self._read("ca_file"),
            require_client_auth=self.require_client_cert,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("tls: a client certificate needs both cert_file and key_file")
        return grpc.ssl_channel_credentials(
            root_certificates=self._read("ca_file"),
            private_key=self._read("key_file"),
            certificate_chain=self._read("cert_file"),
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


def check_bind_policy(host: str, tls: TlsConfig | None, allow_insecure: bool) -> None:
    if tls is None and not is_loopback(host) and not allow_insecure:
        raise ConfigError(
            f"transport: refusing to listen on {host!r} without TLS; configure tls "
            "(cert_file/key_file) or pass allow_insecure=True explicitly (trusted networks only)"
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
