"""``fedq certs`` run as a real subprocess: its files secure a real TransportServer (TLS, mTLS),
refusals come back with the status gRPC really gives, and tokens round-trip through the loaders."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedq.cli import build_parser
from fedq.codec import quantize
from fedq.errors import ConfigError, TransportError
from fedq.transport import TlsConfig, TransportClient, TransportServer, load_tokens, read_token
from fedq.transport.certs import CredentialFiles, default_client_ids
from fedq.wire import WireMessage

HOSTS = ["localhost", "127.0.0.1", "::1", "fedq.example.org"]


def _certs(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedq.cli", "certs", str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> CredentialFiles:
    out = tmp_path_factory.mktemp("certs") / "dev"
    host_args = [a for h in HOSTS for a in ("--host", h)]
    done = _certs(out, "--clients", "2", *host_args)
    assert done.returncode == 0, done.stderr
    assert "development CA" in done.stdout and "not for production" in done.stdout
    return CredentialFiles.under(out, ["client-0", "client-1"])


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> CredentialFiles:
    """Credentials from another CA, with the same client ids."""
    out = tmp_path_factory.mktemp("certs") / "other"
    done = _certs(out, "--client-ids", "client-0")
    assert done.returncode == 0, done.stderr
    return CredentialFiles.under(out, ["client-0"])


def _client_tls(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> TlsConfig:
    return TlsConfig(
        str(cert) if cert else None, str(key) if key else None, str(ca) if ca else None
    )


def _update(cid: str) -> WireMessage:
    return WireMessage.update(cid, tensors={"w": quantize(torch.randn(8, 8), 4)})


def test_layout_and_private_modes(creds: CredentialFiles) -> None:
    root = creds.root
    found = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    clients = {f"clients/client-{i}.{ext}" for i in range(2) for ext in ("pem", "key", "token")}
    assert found == {"ca.pem", "ca.key", "server.pem", "server.key", "tokens.yaml"} | clients
    private = [creds.ca_key, creds.server_key, creds.tokens]
    private += [p for c in creds.clients.values() for p in (c.key, c.token)]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert default_client_ids(2) == list(creds.clients)


def test_default_ids_are_the_simulated_client_names() -> None:
    from fedq.fed.server import client_name

    assert default_client_ids(3) == [client_name(i) for i in range(3)]


def test_certificates_name_hosts_and_clients(creds: CredentialFiles) -> None:
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "fedq.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for cid, files in creds.clients.items():
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cid
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_tls_with_the_ca_succeeds_and_without_it_is_refused(
    creds: CredentialFiles, toy_handler_cls
) -> None:
    tls = TlsConfig(str(creds.server_cert), str(creds.server_key))
    tokens = load_tokens(creds.tokens)
    handler = toy_handler_cls()
    with TransportServer(handler, host="localhost", tls=tls, tokens=tokens) as srv:
        token = read_token(creds.clients["client-1"].token)
        for host in ("localhost", "127.0.0.1"):  # a DNS and an IP subjectAltName
            target = f"{host}:{srv.port}"
            with TransportClient(
                target, client_id="client-1", token=token, tls=_client_tls(creds.ca_cert)
            ) as c:
                assert c.get_task(2).round == 2
                assert c.push_update(_update("client-1")) > 0
        assert [u.client_id for u in handler.updates] == ["client-1", "client-1"]
        # Without fedq's CA the client checks the server against the default roots and fails the
        # handshake: gRPC reports that as UNAVAILABLE on the client, like a plaintext client.
        for bad_tls in (_client_tls(None), None):
            with TransportClient(
                srv.address, client_id="client-1", token=token, tls=bad_tls, timeout=10
            ) as c:
                with pytest.raises(TransportError) as exc:
                    c.get_task(2)
                assert exc.value.code == "UNAVAILABLE"


def test_mutual_tls_needs_a_certificate_from_the_ca(
    creds: CredentialFiles, foreign: CredentialFiles, toy_handler_cls
) -> None:
    tls = TlsConfig(
        str(creds.server_cert), str(creds.server_key), str(creds.ca_cert), require_client_cert=True
    )
    mine, theirs = creds.clients["client-0"], foreign.clients["client-0"]
    token = read_token(mine.token)
    with TransportServer(toy_handler_cls(), tls=tls, tokens=load_tokens(creds.tokens)) as srv:
        good = _client_tls(creds.ca_cert, mine.cert, mine.key)
        with TransportClient(srv.address, client_id="client-0", token=token, tls=good) as c:
            assert c.get_task(1).round == 1
            assert c.push_update(_update("client-0")) > 0
        refused = {
            "no client certificate": _client_tls(creds.ca_cert),
            "certificate from another CA": _client_tls(creds.ca_cert, theirs.cert, theirs.key),
            "server checked against another CA": _client_tls(foreign.ca_cert, mine.cert, mine.key),
        }
        for case, bad in refused.items():
            with TransportClient(
                srv.address, client_id="client-0", token=token, tls=bad, timeout=10
            ) as c:
                # The handshake fails before any RPC reaches fedq: UNAVAILABLE, not UNAUTHENTICATED.
                with pytest.raises(TransportError) as exc:
                    c.get_task(1)
                assert exc.value.code == "UNAVAILABLE", case
                with pytest.raises(TransportError) as exc:
                    c.push_update(_update("client-0"))
                assert exc.value.code == "UNAVAILABLE", case
        with TransportClient(srv.address, client_id="client-0", token=token, tls=good) as c:
            assert c.get_task(3).round == 3  # still serving


def test_tokens_round_trip(creds: CredentialFiles) -> None:
    tokens = load_tokens(creds.tokens)
    assert list(tokens) == ["client-0", "client-1"]
    for cid, files in creds.clients.items():
        assert read_token(files.token) == tokens[cid]
        assert len(tokens[cid]) == 43  # token_urlsafe(32)
    assert tokens["client-0"] != tokens["client-1"]


def _certs_in_process(out: Path, *args: str) -> int:
    parsed = build_parser().parse_args(["certs", str(out), *args])
    return int(parsed.func(parsed))


def test_refuses_a_non_empty_dir_unless_forced(creds: CredentialFiles, tmp_path: Path) -> None:
    done = _certs(creds.root, "--clients", "1")
    assert done.returncode == 2 and "not empty" in done.stderr and "--force" in done.stderr
    out = tmp_path / "forced"
    assert _certs_in_process(out, "--clients", "3") == 0
    (out / "notes.txt").write_text("mine")
    before = load_tokens(out / "tokens.yaml")
    assert _certs_in_process(out, "--client-ids", "client-0,site-b", "--force") == 0
    after = load_tokens(out / "tokens.yaml")
    assert list(after) == ["client-0", "site-b"] and after["client-0"] != before["client-0"]
    left = sorted(p.name for p in (out / "clients").iterdir())
    assert left == [f"{c}.{e}" for c in ("client-0", "site-b") for e in ("key", "pem", "token")]
    assert (out / "notes.txt").read_text() == "mine"  # not fedq's: left alone


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--clients", "0"], "at least one client"),
        (["--client-ids", "a,../b"], "must match"),
        (["--client-ids", "a,a"], "given twice"),
        (["--clients", "3", "--client-ids", "a,b"], "lists 2 ids"),
        (["--clients", "1", "--host", "bad host!"], "neither an IP address nor a DNS name"),
        (["--clients", "1", "--days", "0"], "days"),
        ([], "--clients"),
    ],
)
def test_bad_options_are_config_errors(args: list[str], problem: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        _certs_in_process(tmp_path / "x", *args)
    assert not (tmp_path / "x").exists()


SECRET = "s3cr3t-Token_value"


@pytest.mark.parametrize(
    "text, problem",
    [
        (f"- {SECRET}\n", "mapping"),
        ("{}\n", "empty mapping"),
        ("", "got an empty file"),
        ("# only a comment\n", "got an empty file"),
        (f"a: {SECRET}\nb: x\na: {SECRET}\n", "'a' is listed twice"),
        ("a: 12345\n", "token must be a string, got int"),
        ("a: ''\n", "token is empty"),
        (f"a: '{SECRET} two'\n", "printable ASCII without spaces"),
        ("1: abc\n", "client id must be a non-empty string, got int"),
        (f"a: {SECRET}\nb: [{SECRET}\n", "not valid YAML at line"),
        (f"a: {SECRET}\n  b: {SECRET}\n", "not valid YAML at line 2"),
    ],
)
def test_bad_tokens_file_is_a_config_error_without_the_token(
    text: str, problem: str, tmp_path: Path
) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_tokens(path)
    message = str(exc.value)
    assert problem in message and str(path) in message
    assert SECRET not in message and "12345" not in message


def test_read_token_strips_refuses_empty_and_warns_when_shared(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.token"
    path.write_text(f"\n  {SECRET}  \n")
    os.chmod(path, 0o600)
    with caplog.at_level(logging.WARNING, logger="fedq.transport.tokens"):
        assert read_token(path) == SECRET
        assert not caplog.records
        os.chmod(path, 0o644)
        assert read_token(path) == SECRET
    assert len(caplog.records) == 1 and "chmod 600" in caplog.records[0].getMessage()
    assert SECRET not in caplog.text
    path.write_text(" \n")
    with pytest.raises(ConfigError, match="token is empty"):
        read_token(path)
    with pytest.raises(ConfigError, match="not found"):
        read_token(tmp_path / "missing.token")
