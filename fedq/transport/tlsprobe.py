"""Why a connection failed, when TLS is the reason: a site without TLS against a TLS server, a
server certificate the site does not trust, no client certificate under mutual TLS. gRPC reports
each as UNAVAILABLE, like a server that is down; retried as an outage, the mistake would only show
as "reconnecting" until the site gives up. :func:`diagnose_tls` repeats the handshake with
Python's ``ssl`` and says in fedq's words which option to change; it returns None when the server
cannot be reached at all (refused, no route, timeout) or the handshake succeeds: then the failure
is an outage, and the site retries.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import tempfile
from collections.abc import Iterator

from fedq.transport.security import TlsConfig

#: What an HTTP/2 client sends first: a gRPC server answers it with its settings.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_NOT_TLS = (
    "WRONG_VERSION_NUMBER",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "UNKNOWN_PROTOCOL",
    "HTTP_REQUEST",
    "RECORD_TOO_LARGE",
)
_CERT_REFUSED = (
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_UNKNOWN",
    "DECRYPT_ERROR",
    "UNSUPPORTED_CERTIFICATE",
    "CERTIFICATE_EXPIRED",
    "ACCESS_DENIED",
)


def _split(target: str) -> tuple[str, int] | None:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _connect(target: str, timeout: float) -> socket.socket | None:
    where = _split(target)
    if where is None:
        return None
    try:
        return socket.create_connection(where, timeout=timeout)
    except OSError:  # refused, unreachable, timed out: the server is not there (an outage)
        return None


def diagnose_tls(target: str, tls: TlsConfig | None, timeout: float = 5.0) -> str | None:
    """What is wrong with TLS between this site and ``target`` (module docstring), or None."""
    sock = _connect(target, timeout)
    if sock is None:
        return None
    with sock:
        if tls is None:
            return _plaintext_against_tls(sock, target)
        return _tls_problem(sock, target, tls)


def _plaintext_against_tls(sock: socket.socket, target: str) -> str | None:
    """This site speaks plaintext: does the server answer a TLS handshake?"""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with ctx.wrap_socket(sock, server_hostname=_split(target)[0] or None):  # type: ignore[index]
            pass
    except (ssl.SSLError, OSError):
        return None  # not a TLS server either: something else is wrong
    return (
        f"TLS: the server at {target} speaks TLS, but this site connects in plaintext: pass "
        "--ca FILE (the CA that signed the server's certificate; fedq certs writes ca.pem)"
    )


@contextlib.contextmanager
def _pem_files(tls: TlsConfig) -> Iterator[tuple[str | None, str | None]]:
    """The client certificate and key as files (``ssl`` loads them from files only)."""
    if tls.cert_file or not tls.cert_pem:
        yield tls.cert_file, tls.key_file
        return
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for name, pem in (("cert.pem", tls.cert_pem), ("key.pem", tls.key_pem)):
            path = os.path.join(d, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem or b"")
            paths.append(path)
        yield paths[0], paths[1]


def _context(tls: TlsConfig) -> ssl.SSLContext:
    ca = tls._read("ca")
    ctx = ssl.create_default_context(cadata=ca.decode("ascii", "replace") if ca else None)
    ctx.set_alpn_protocols(["h2"])
    with _pem_files(tls) as (cert, key):
        if cert and key:
            ctx.load_cert_chain(cert, key)
    return ctx


def _tls_problem(sock: socket.socket, target: str, tls: TlsConfig) -> str | None:
    host = _split(target)[0]  # type: ignore[index]
    name = tls.server_name or host
    trusted = (
        f"--ca {tls.ca_file}"
        if tls.ca_file
        else "the CA given"
        if tls.ca_pem
        else ("the system's trusted CAs (no --ca)")
    )
    try:
        ctx = _context(tls)
    except (ssl.SSLError, ValueError, OSError) as e:
        return f"TLS: cannot load this site's TLS files (--ca, --cert/--key): {e}"
    try:
        ss = ctx.wrap_socket(sock, server_hostname=name)
    except ssl.SSLCertVerificationError as e:
        if e.verify_code == 62 or "hostname" in str(e).lower():  # X509_V_ERR_HOSTNAME_MISMATCH
            return (
                f"TLS: the server's certificate is not issued for {name!r}: pass --server-name "
                "NAME with a name it holds (fedq certs --host adds names)"
            )
        return (
            f"TLS: the server's certificate is not trusted by {trusted} "
            f"({e.verify_message}): pass --ca FILE, the CA that signed the server's certificate"
        )
    except ssl.SSLError as e:
        what = f"{e.reason or ''} {e}".upper()
        if any(k in what for k in ("CERTIFICATE_REQUIRED", "HANDSHAKE_FAILURE", *_CERT_REFUSED)):
            return _client_cert_refused(tls)
        if any(k in what for k in _NOT_TLS):
            return (
                f"TLS: the server at {target} speaks plaintext, but this site uses TLS: "
                "ask its operator to serve with --cert/--key, or (trusted networks only) "
                "join with --insecure and without --ca/--cert/--key"
            )
        return None  # e.g. the connection closed mid-handshake: not known to be TLS
    except OSError:
        return None
    with ss:
        # Under TLS 1.3 a server refuses a client's certificate (or its absence) after the
        # handshake: it closes the connection (or sends an alert) instead of answering the
        # HTTP/2 preface with its settings.
        try:
            ss.settimeout(2.0)
            ss.sendall(_H2_PREFACE)
            closed = ss.recv(1) == b""
        except (ssl.SSLError, ConnectionResetError):
            closed = True
        except OSError:
            return None  # no answer in time is not a TLS problem
    return _client_cert_refused(tls) if closed else None


def _client_cert_refused(tls: TlsConfig) -> str:
    """The server closed the connection during or right after the handshake: under mutual TLS,
    because this site sent no certificate, or one the server's CA did not issue."""
    if not (tls.cert_file or tls.cert_pem):
        return (
            "TLS: the server requires a client certificate (mutual TLS): pass --cert FILE "
            "and --key FILE, this site's certificate and key (fedq certs writes "
            "clients/<id>.pem and .key)"
        )
    return (
        "TLS: the server refuses this site's client certificate (--cert/--key): use the "
        "certificate issued for this client id by the CA the server trusts"
    )
