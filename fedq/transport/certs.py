"""A development certificate authority and client tokens: what ``fedq certs DIR`` writes; and a
run's ephemeral CA and server certificate held in memory (:func:`make_run_credentials`), which a
simulation on a Ray cluster hands its hosts instead of files.

One call makes everything a TLS or mutual-TLS deployment of fedq needs: a CA, a server certificate
whose subjectAltNames are the host names and IP addresses clients dial, one client certificate per
client (common name = client id, for mutual TLS) and a fresh bearer token per client. Keys are EC
P-256, made and signed with the ``cryptography`` package. The CA key lies unencrypted next to the
certificates it signed, which is fine for development, tests and trials across a few machines; a
production deployment brings its own PKI and points :class:`~fedq.transport.TlsConfig` at it.

Layout under DIR (``serve`` and ``join`` rely on it)::

    ca.pem ca.key server.pem server.key tokens.yaml
    clients/<id>.pem clients/<id>.key clients/<id>.token
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedq.errors import ConfigError
from fedq.transport.security import TlsConfig
from fedq.transport.tokens import write_private_file, write_token, write_tokens

logger = logging.getLogger(__name__)

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 365
MAX_DAYS = 3650
#: Validity of a run's in-memory credentials (:func:`make_run_credentials`): a run that lasts
#: longer must be resumed (a resumed run gets fresh ones).
RUN_DAYS = 30
#: Client ids become file names, certificate common names (at most 64 characters) and gRPC
#: metadata values, so they are restricted to a portable, printable set.
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
#: Certificates are valid from a little before "now", so a peer whose clock is behind accepts them.
_CLOCK_SKEW = dt.timedelta(hours=1)
_CLIENT_SUFFIXES = (".pem", ".key", ".token")


def default_client_ids(n: int) -> list[str]:
    """``client-0`` .. ``client-{n-1}``: the names fedq gives simulated clients."""
    if n < 1:
        raise ConfigError(f"certs: need at least one client, got {n}")
    return [f"client-{i}" for i in range(n)]


def check_client_ids(ids: Sequence[str]) -> list[str]:
    """``ids`` as a list, refusing none, duplicates and ids that are not safe file names."""
    if not ids:
        raise ConfigError("certs: need at least one client id")
    problems = [
        f"certs: client id {cid[:80]!r} must match {CLIENT_ID_PATTERN.pattern} "
        "(letters, digits, '.', '_', '-'; at most 64 characters)"
        for cid in ids
        if not CLIENT_ID_PATTERN.fullmatch(cid)
    ]
    problems += [
        f"certs: client id {cid!r} is given twice" for cid in sorted(set(ids)) if ids.count(cid) > 1
    ]
    if problems:
        raise ConfigError(problems)
    return list(ids)


def parse_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """subjectAltName entries for ``hosts``: IP addresses (``[...]`` allowed) and DNS names."""
    if not hosts:
        raise ConfigError("certs: need at least one host name or IP address for the server")
    names: list[x509.GeneralName] = []
    for host in hosts:
        literal = host.strip()
        if literal.startswith("[") and literal.endswith("]"):
            literal = literal[1:-1]
        try:
            ip = ipaddress.ip_address(literal)
        except ValueError:
            dns = literal.lower().rstrip(".")
            if len(dns) > 253 or not all(_DNS_LABEL.fullmatch(x) for x in dns.split(".")):
                raise ConfigError(
                    f"certs: host {host[:80]!r} is neither an IP address nor a DNS name"
                ) from None
            name: x509.GeneralName = x509.DNSName(dns)
        else:
            name = x509.IPAddress(ip)
        if name not in names:
            names.append(name)
    return names


@dataclass(frozen=True, slots=True)
class ClientFiles:
    """One client's credentials: certificate, private key and token file."""

    cert: Path
    key: Path
    token: Path


@dataclass(frozen=True, slots=True)
class CredentialFiles:
    """Where ``fedq certs`` puts each file under ``root`` (see the module docstring)."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    tokens: Path
    clients: dict[str, ClientFiles]

    @classmethod
    def under(cls, root: str | Path, client_ids: Sequence[str]) -> CredentialFiles:
        r = Path(root)
        c = r / "clients"
        return cls(
            root=r,
            ca_cert=r / "ca.pem",
            ca_key=r / "ca.key",
            server_cert=r / "server.pem",
            server_key=r / "server.key",
            tokens=r / "tokens.yaml",
            clients={
                cid: ClientFiles(c / f"{cid}.pem", c / f"{cid}.key", c / f"{cid}.token")
                for cid in client_ids
            },
        )


@dataclass(frozen=True, slots=True)
class Issued:
    """What :func:`make_credentials` wrote."""

    files: CredentialFiles
    hosts: list[str]
    not_after: dt.datetime
    removed: list[Path]  # stale client files of an earlier run, deleted under ``force``


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # gRPC reads unencrypted PEM keys only
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedq development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    start: dt.datetime,
    end: dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf(
    common_name: str,
    usage: x509.ObjectIdentifier,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    end: dt.datetime,
    sans: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        _builder(_name(common_name), ca.subject, key, ca.not_valid_before_utc, end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _authority(
    common_name: str, days: int
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, dt.datetime]:
    """A self-signed CA valid for ``days`` (from a little before now); returns it, its key and
    the end of its validity."""
    now = dt.datetime.now(dt.UTC)
    start, end = now - _CLOCK_SKEW, now + dt.timedelta(days=days)
    ca_key = _key()
    ca_name = _name(common_name)
    ca = (
        _builder(ca_name, ca_name, ca_key, start, end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return ca, ca_key, end


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _prepare_dir(root: Path, client_ids: Sequence[str], force: bool) -> list[Path]:
    """Check that ``root`` may be written; under ``force`` delete other clients' stale files."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"certs: {root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not force:
        raise ConfigError(
            f"certs: {root} is not empty; refusing to overwrite credentials there "
            "(use --force to replace them)"
        )
    removed: list[Path] = []
    clients = root / "clients"
    if force and clients.is_dir():
        keep = set(client_ids)
        for path in sorted(clients.iterdir()):
            if path.is_file() and path.suffix in _CLIENT_SUFFIXES and path.stem not in keep:
                path.unlink()
                removed.append(path)
    clients.mkdir(parents=True, exist_ok=True)
    return removed


def make_credentials(
    root: str | Path,
    client_ids: Sequence[str],
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> Issued:
    """Write a development CA, server and client certificates and tokens under ``root``.

    ``hosts`` become the server certificate's subjectAltNames (exactly these; clients must dial
    one of them). Refuses a non-empty ``root`` unless ``force``, which replaces fedq's files there
    (and deletes client files of ids no longer listed) and leaves anything else alone.
    """
    ids = check_client_ids(client_ids)
    sans = parse_hosts(hosts)
    if not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"certs: days must be in 1..{MAX_DAYS}, got {days}")
    files = CredentialFiles.under(root, ids)
    # Everything is made in memory first: a failure leaves no half-written set behind.
    ca, ca_key, end = _authority("fedq development CA", days)
    first = sans[0].value
    server = _leaf(str(first), ExtendedKeyUsageOID.SERVER_AUTH, ca, ca_key, end, sans)
    clients = {cid: _leaf(cid, ExtendedKeyUsageOID.CLIENT_AUTH, ca, ca_key, end) for cid in ids}
    tokens = {cid: secrets.token_urlsafe(32) for cid in ids}

    removed = _prepare_dir(files.root, ids, force)
    files.ca_cert.write_bytes(_pem(ca))
    write_private_file(files.ca_key, _key_pem(ca_key))
    files.server_cert.write_bytes(_pem(server[0]))
    write_private_file(files.server_key, _key_pem(server[1]))
    write_tokens(files.tokens, tokens)
    for cid, (cert, key) in clients.items():
        paths = files.clients[cid]
        paths.cert.write_bytes(_pem(cert))
        write_private_file(paths.key, _key_pem(key))
        write_token(paths.token, tokens[cid])
    logger.info("wrote a development CA and credentials for %d clients to %s", len(ids), root)
    return Issued(files, [str(n.value) for n in sans], end, removed)


@dataclass(frozen=True, slots=True)
class RunCredentials:
    """One run's TLS material, in memory only: the PEM of a fresh CA's certificate (what clients
    trust) and of a server certificate for ``hosts`` with its key. The CA's key is dropped once
    the server certificate is signed, so nothing else can ever be issued under it."""

    hosts: tuple[str, ...]
    ca_pem: bytes = field(repr=False)
    server_cert_pem: bytes = field(repr=False)
    server_key_pem: bytes = field(repr=False)

    def server_tls(self) -> TlsConfig:
        return TlsConfig.from_pem(cert=self.server_cert_pem, key=self.server_key_pem)

    def client_tls(self) -> TlsConfig:
        return TlsConfig.from_pem(ca=self.ca_pem)


def make_run_credentials(hosts: Sequence[str], *, days: int = RUN_DAYS) -> RunCredentials:
    """An ephemeral CA and a server certificate for ``hosts`` (the addresses clients dial), as
    PEM bytes: what a simulation's driver hands its hosts for one run, written nowhere."""
    sans = parse_hosts(hosts)
    if not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"certs: days must be in 1..{MAX_DAYS}, got {days}")
    ca, ca_key, end = _authority("fedq run CA", days)
    cert, key = _leaf(str(sans[0].value), ExtendedKeyUsageOID.SERVER_AUTH, ca, ca_key, end, sans)
    return RunCredentials(tuple(str(n.value) for n in sans), _pem(ca), _pem(cert), _key_pem(key))
