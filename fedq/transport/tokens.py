"""Per-client bearer tokens on disk: the server's tokens file and one token file per client.

The server's file is a YAML mapping of client id to token; a client's file holds its token alone.
Tokens are secrets, so they come from files (a command line is visible to every local user), the
files are written owner-only (mode 0600), and no error or log line ever carries a token: problems
name the file, the client id and the position in the file, never the value.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import yaml

from fedq.errors import ConfigError

logger = logging.getLogger(__name__)

#: Owner read/write only: private keys and token files.
PRIVATE_MODE = 0o600


def write_private_file(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable and writable by its owner only.

    The file is created with mode 0600 (never world-readable, not even for an instant) and an
    existing file is reset to 0600 before it is overwritten.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(path, flags, PRIVATE_MODE), "wb") as f:
        os.fchmod(f.fileno(), PRIVATE_MODE)
        f.write(data)


def _check_token(token: str, where: str) -> None:
    """A token travels as a gRPC metadata value: printable ASCII without spaces."""
    if not token:
        raise ConfigError(f"{where}: token is empty")
    if not all("!" <= ch <= "~" for ch in token):
        raise ConfigError(f"{where}: token must be printable ASCII without spaces")


def _warn_if_shared(path: Path) -> None:
    if os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning(
            "%s holds a secret but is readable or writable by group or others (mode %03o); "
            "run: chmod 600 %s",
            path,
            mode,
            path,
        )


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not UTF-8 text") from None


class _DuplicateClient(Exception):
    def __init__(self, client: str, line: int) -> None:
        self.client, self.line = client, line


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            key = key_node.value
            if isinstance(key_node, yaml.ScalarNode) and isinstance(key, str):
                if key in seen:
                    raise _DuplicateClient(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_tokens(path: str | Path) -> dict[str, str]:
    """The server's tokens file: a YAML mapping of client id to token, both non-empty strings.

    Anything else (not YAML, not a mapping, an empty mapping, a repeated client id, a token that is
    not a string or not printable ASCII) is a :class:`~fedq.errors.ConfigError` naming the file.
    """
    p = Path(path)
    text = _read_text(p, "tokens file")
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except _DuplicateClient as e:
        raise ConfigError(f"tokens file {p}: client {e.client[:80]!r} is listed twice") from None
    except yaml.YAMLError as e:
        # The parser's own message quotes the offending line, which may hold a token: give only
        # the position.
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"tokens file {p}: not valid YAML{where}") from None
    if not isinstance(raw, dict) or not raw:
        got = {dict: "an empty mapping", type(None): "an empty file"}.get(type(raw))
        raise ConfigError(
            f"tokens file {p}: must be a non-empty mapping of client id to token, got "
            + (got or type(raw).__name__)
        )
    tokens: dict[str, str] = {}
    for index, (client, token) in enumerate(raw.items()):
        if not isinstance(client, str) or not client:
            raise ConfigError(
                f"tokens file {p}: entry {index}: the client id must be a non-empty string, "
                f"got {type(client).__name__}"
            )
        where = f"tokens file {p}: client {client[:80]!r}"
        if not isinstance(token, str):
            raise ConfigError(f"{where}: token must be a string, got {type(token).__name__}")
        _check_token(token, where)
        tokens[client] = token
    _warn_if_shared(p)
    return tokens


def read_token(path: str | Path) -> str:
    """One client's token from a file holding only that token (surrounding whitespace ignored)."""
    p = Path(path)
    token = _read_text(p, "token file").strip()
    _check_token(token, f"token file {p}")
    _warn_if_shared(p)
    return token


def write_tokens(path: str | Path, tokens: Mapping[str, str]) -> None:
    """Write the server's tokens file (owner-only) in the format :func:`load_tokens` reads."""
    for client, token in tokens.items():
        _check_token(token, f"client {client[:80]!r}")
    body = yaml.safe_dump(dict(tokens), default_flow_style=False, sort_keys=False)
    header = "# fedq client tokens (client id: token). Secret: keep this file mode 0600.\n"
    write_private_file(path, (header + body).encode())


def write_token(path: str | Path, token: str) -> None:
    """Write one client's token file (owner-only) in the format :func:`read_token` reads."""
    _check_token(token, "token")
    write_private_file(path, (token + "\n").encode())
