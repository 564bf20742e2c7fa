"""A run's in-memory credentials (what a simulation on a Ray cluster hands its hosts): a fresh CA
and a server certificate for exactly the given addresses, as PEM bytes that secure a real
TransportServer after a pickle round trip (Ray ships them as actor arguments), with nothing
written to disk and nothing secret in a repr."""

from __future__ import annotations

import ipaddress
import pickle
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedq.errors import ConfigError, TransportError
from fedq.transport import TlsConfig, TransportClient, TransportServer
from fedq.transport.certs import make_run_credentials


def test_the_server_certificate_names_exactly_the_given_addresses() -> None:
    creds = make_run_credentials(["10.200.7.1", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate(creds.ca_pem)
    server = x509.load_pem_x509_certificate(creds.server_cert_pem)
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = [ipaddress.ip_address("10.200.7.1"), ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.IPAddress) == ips
    assert san.get_values_for_type(x509.DNSName) == []
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert creds.hosts == ("10.200.7.1", "127.0.0.1")
    assert b"PRIVATE KEY" in creds.server_key_pem
    # the CA's key is not kept anywhere: only the three PEMs and the hosts
    assert set(type(creds).__slots__) == {"hosts", "ca_pem", "server_cert_pem", "server_key_pem"}
    for shown in (repr(creds), repr(creds.server_tls()), repr(creds.client_tls())):
        assert "BEGIN" not in shown


def test_pem_credentials_secure_a_real_server_after_pickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toy_handler_cls, tokens
) -> None:
    monkeypatch.chdir(tmp_path)
    creds = make_run_credentials(["127.0.0.1"])
    server_tls, client_tls = (
        pickle.loads(pickle.dumps(t)) for t in (creds.server_tls(), creds.client_tls())
    )
    with TransportServer(toy_handler_cls(), host="127.0.0.1", tls=server_tls, tokens=tokens) as srv:
        with TransportClient(srv.address, client_id="c1", token=tokens["c1"], tls=client_tls) as c:
            assert c.get_task(3).round == 3
        # a client that trusts another run's CA fails the handshake
        other = make_run_credentials(["127.0.0.1"]).client_tls()
        with TransportClient(
            srv.address, client_id="c1", token=tokens["c1"], tls=other, timeout=10
        ) as c:
            with pytest.raises(TransportError) as exc:
                c.get_task(3)
            assert exc.value.code == "UNAVAILABLE"
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_tls_config_takes_a_file_or_pem_bytes_not_both(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cert_file or cert_pem, not both"):
        TlsConfig(str(tmp_path / "c.pem"), None, cert_pem=b"x")
    cert_only = TlsConfig.from_pem(cert=make_run_credentials(["127.0.0.1"]).server_cert_pem)
    with pytest.raises(ConfigError, match="needs cert_file and key_file"):
        cert_only.server_credentials()
    with pytest.raises(ConfigError, match="days must be in"):
        make_run_credentials(["127.0.0.1"], days=0)
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
        make_run_credentials(["not a host"])
