"""One exception hierarchy for fedq.

Inside a process every failure is a subclass of :class:`FedqError`; across the network failures
travel as gRPC status codes with a reason (see ``fedq.transport``), never as pickled exceptions.
"""

from __future__ import annotations


class FedqError(Exception):
    """Base class of every error fedq raises on purpose."""


class ConfigError(FedqError, ValueError):
    """A scenario or option is invalid. ``problems`` lists every problem found, one line each."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        head = "invalid configuration" if len(self.problems) != 1 else "invalid configuration:"
        body = (
            self.problems[0]
            if len(self.problems) == 1
            else "\n".join(f"  - {p}" for p in self.problems)
        )
        sep = " " if len(self.problems) == 1 else f" ({len(self.problems)} problems):\n"
        super().__init__(f"{head}{sep}{body}")


class CodecError(FedqError, ValueError):
    """A tensor cannot be quantized or packed as asked (NaN/Inf input, bad bit-width, ...)."""


class WireFormatError(FedqError, ValueError):
    """Bytes from the network do not form a valid fedq message. The message names the field."""


class TransportError(FedqError):
    """A gRPC call failed; carries the status code name and the server's reason."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


class AlreadyConnected(FedqError):
    """A client id is held by a process whose work stream is open: a second holder is refused
    (reported as ALREADY_EXISTS)."""


class TlsMismatch(TransportError):
    """The TLS handshake failed for a reason a retry cannot fix (no TLS against a TLS server, a
    server certificate the site does not trust, no client certificate under mutual TLS): the
    reason names the option to change."""


class UnsupportedError(FedqError):
    """A valid request for something fedq does not support (says what to change instead)."""


class PrivacyBudgetExceeded(FedqError):
    """The next privacy release would exceed the configured (epsilon, delta) target."""


class ResourceExhausted(FedqError):
    """A server limit is reached (memory for uploads, calls per caller): RESOURCE_EXHAUSTED."""


#: ``extra=`` of a logged warning meant for the person running fedq (bad scale of their data, a
#: collapsed model): the CLI prints it as ``fedq: warning: ...`` rather than as a log line.
FOR_USER: dict[str, bool] = {"fedq_for_user": True}
