"""A failed TLS handshake is told apart from an outage when a client registers: each mistake is a
TlsMismatch naming the option to change (and is not retried by the node); a server that is down
is plain UNAVAILABLE; a right configuration registers. Real gRPC servers on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from test_keepalive import Waiting

from fedq.errors import TlsMismatch, TransportError
from fedq.transport import TlsConfig, TransportClient, TransportServer
from fedq.transport.certs import make_credentials
from fedq.wire.control import ClientInfo, Registration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    d = tmp_path_factory.mktemp("pki")
    own = make_credentials(d / "certs", ["c1"], ["localhost", "127.0.0.1"]).files
    other = make_credentials(d / "other", ["c1"], ["localhost"]).files
    return own, other


@pytest.fixture(scope="module", params=[False, True], ids=["tls", "mtls"])
def server(request: pytest.FixtureRequest, pki: tuple[Any, Any]) -> Iterator[TransportServer]:
    own, _ = pki
    mtls = bool(request.param)
    ca = str(own.ca_cert) if mtls else None
    tls = TlsConfig(str(own.server_cert), str(own.server_key), ca_file=ca, require_client_cert=mtls)
    with TransportServer(Waiting(), tls=tls) as srv:
        srv.mtls = mtls  # type: ignore[attr-defined]
        yield srv


def _register(address: str, tls: TlsConfig | None) -> None:
    with TransportClient(address, client_id="c1", tls=tls, timeout=10) as c:
        c.register(Registration((ClientInfo("c1", 10),), "test"))


def _client(pki: tuple[Any, Any], case: str) -> TlsConfig | None:
    own, other = pki
    ca, mine, theirs = str(own.ca_cert), own.clients["c1"], other.clients["c1"]
    return {
        "plaintext": None,
        "system CAs": TlsConfig(None, None),
        "other CA": TlsConfig(None, None, ca_file=str(other.ca_cert)),
        "wrong name": TlsConfig(None, None, ca_file=ca, server_name="elsewhere"),
        "no client certificate": TlsConfig(None, None, ca_file=ca),
        "foreign client certificate": TlsConfig(str(theirs.cert), str(theirs.key), ca_file=ca),
        "right": TlsConfig(str(mine.cert), str(mine.key), ca_file=ca),
    }[case]


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("plaintext", r"speaks TLS, but this site connects in plaintext: pass --ca FILE"),
        ("system CAs", r"not trusted by the system's trusted CAs \(no --ca\).*pass --ca FILE"),
        ("other CA", r"not trusted by --ca .*other.*pass --ca FILE"),
        ("wrong name", r"not issued for 'elsewhere': pass --server-name NAME"),
        ("no client certificate", r"requires a client certificate .*pass --cert FILE and --key"),
        ("foreign client certificate", r"refuses this site's client certificate \(--cert/--key\)"),
        ("right", None),
    ],
)
def test_a_tls_mistake_is_named_and_a_right_configuration_registers(
    server: TransportServer, pki: tuple[Any, Any], case: str, says: str | None
) -> None:
    mtls_only = case in ("no client certificate", "foreign client certificate")
    if says is None or (mtls_only and not server.mtls):  # type: ignore[attr-defined]
        _register(server.address, _client(pki, case))  # no mistake on this server
        return
    with pytest.raises(TlsMismatch, match=says) as exc:
        _register(server.address, _client(pki, case))
    assert exc.value.code == "UNAVAILABLE" and str(exc.value).startswith("UNAVAILABLE: TLS: ")


def test_a_plaintext_server_and_a_server_that_is_down(pki: tuple[Any, Any]) -> None:
    tls = TlsConfig(None, None, ca_file=str(pki[0].ca_cert))
    with (
        TransportServer(Waiting()) as plain,
        pytest.raises(TlsMismatch, match="speaks plaintext, but this site uses TLS"),
    ):
        _register(plain.address, tls)
    with pytest.raises(TransportError) as exc:  # nothing listens: an outage, retried
        _register(plain.address, tls)
    assert exc.value.code == "UNAVAILABLE" and not isinstance(exc.value, TlsMismatch)
