"""TLS and mutual TLS with a throwaway self-signed certificate (skipped without openssl)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fedq.errors import TransportError
from fedq.transport import TlsConfig, TransportClient, TransportServer
from fedq.transport.certs import make_credentials


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not available")
    d = tmp_path_factory.mktemp("tls")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return str(crt), str(key)


def test_mutual_tls_round_trip(tmp_path: Path, toy_handler_cls, tokens) -> None:
    """Under mutual TLS a client presents its own certificate (issued for its id by the CA the
    server trusts); another client's certificate or none at all is refused."""
    files = make_credentials(tmp_path / "certs", ["c1", "c2"], ["localhost"]).files
    ca = str(files.ca_cert)
    server_tls = TlsConfig(
        str(files.server_cert), str(files.server_key), ca_file=ca, require_client_cert=True
    )
    with TransportServer(toy_handler_cls(), host="localhost", tls=server_tls, tokens=tokens) as srv:
        own, other = files.clients["c1"], files.clients["c2"]
        client_tls = TlsConfig(str(own.cert), str(own.key), ca_file=ca, server_name="localhost")
        with TransportClient(srv.address, client_id="c1", token=tokens["c1"], tls=client_tls) as c:
            assert c.get_task(4).round == 4
        theirs = TlsConfig(str(other.cert), str(other.key), ca_file=ca, server_name="localhost")
        with (
            TransportClient(srv.address, client_id="c1", token=tokens["c1"], tls=theirs) as c,
            pytest.raises(TransportError, match=r"UNAUTHENTICATED.*not for 'c1'"),
        ):
            c.get_task(4)
        no_cert = TlsConfig(None, None, ca_file=ca, server_name="localhost")
        with TransportClient(
            srv.address, client_id="c1", token=tokens["c1"], tls=no_cert, timeout=5
        ) as c:
            with pytest.raises(TransportError) as exc:
                c.get_task(4)
            assert exc.value.code == "UNAVAILABLE"


def test_tls_allows_public_bind_and_checks_files(cert: tuple[str, str], toy_handler_cls) -> None:
    crt, key = cert
    TransportServer(toy_handler_cls(), host="0.0.0.0", tls=TlsConfig(crt, key))  # no error
    with pytest.raises(Exception, match="cert_file"):
        TlsConfig(str(Path(crt).with_name("missing.pem")), key).server_credentials()
