"""Control messages of the round protocol (version 3): registration and the work stream.

Plain dataclasses with ``*_to_proto`` / ``*_from_proto`` pairs (the Flower serde shape). Parsing
treats every message as hostile, like the tensor path: counts, string lengths and characters are
checked against :class:`~fedq.wire.limits.WireLimits` before anything is kept, and every failure
is a :class:`~fedq.errors.WireFormatError` naming the field. docs/wire-format.md §17 specifies
the protocol.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from fedq.codec.packed import FORMAT_VERSION
from fedq.errors import WireFormatError
from fedq.wire.limits import WireLimits
from fedq.wire.pb import service_pb2 as spb

#: Round protocol version spoken by this fedq (1: GetTask / PushUpdate / Step only; 2: Register
#: and Work added, service fedq.v1.Federated; 3: the same service renamed fedq.v2.Rounds).
PROTOCOL_VERSION = 3
#: Client ids and principals: printable, no whitespace, at most this long.
MAX_ID_LENGTH = 128
_ID = re.compile(r"[A-Za-z0-9._:@+-]+")

Action = Literal["wait", "task", "done"]
_ACTION_TO_PB: dict[Action, int] = {
    "wait": spb.WorkItem.WAIT,
    "task": spb.WorkItem.TASK,
    "done": spb.WorkItem.DONE,
}
_ACTION_FROM_PB: dict[int, Action] = {v: k for k, v in _ACTION_TO_PB.items()}


def check_id(value: str, what: str) -> str:
    """``value`` if it is a valid client id / principal, else WireFormatError naming ``what``."""
    if not 1 <= len(value) <= MAX_ID_LENGTH or not _ID.fullmatch(value):
        shown = value[:40] + ("..." if len(value) > 40 else "")
        raise WireFormatError(
            f"{what}: {shown!r} is not a valid id (1-{MAX_ID_LENGTH} characters of "
            "letters, digits and . _ : @ + -)"
        )
    return value


@dataclass(frozen=True, slots=True)
class ClientInfo:
    client_id: str
    num_examples: int


@dataclass(frozen=True, slots=True)
class Registration:
    """What a client process tells the server first (``RegisterRequest``)."""

    clients: tuple[ClientInfo, ...]
    fedq_version: str
    node: str = ""
    protocol_version: int = PROTOCOL_VERSION
    wire_format_version: int = FORMAT_VERSION


@dataclass(frozen=True, slots=True)
class Joined:
    """The server's answer to a registration (``RegisterReply``)."""

    run_id: str
    config_json: str
    client_index: dict[str, int]
    num_classes: int
    input_dim: int
    fedq_version: str
    protocol_version: int = PROTOCOL_VERSION
    wire_format_version: int = FORMAT_VERSION


@dataclass(frozen=True, slots=True)
class Assignment:
    client_id: str
    round: int
    deadline_s: float


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One message of the work stream: wait, run these tasks, or the run is over."""

    action: Action
    round: int = 0
    tasks: tuple[Assignment, ...] = ()
    reason: str = field(default="")


def registration_to_proto(r: Registration) -> spb.RegisterRequest:
    return spb.RegisterRequest(
        protocol_version=r.protocol_version,
        fedq_version=r.fedq_version,
        wire_format_version=r.wire_format_version,
        clients=[
            spb.ClientInfo(client_id=c.client_id, num_examples=c.num_examples) for c in r.clients
        ],
        node=r.node,
    )


def registration_from_proto(msg: spb.RegisterRequest, limits: WireLimits) -> Registration:
    """Validate a ``RegisterRequest`` (versions are checked by the server, which knows what it
    speaks; here only the shape)."""
    n = len(msg.clients)
    if not 1 <= n <= limits.max_clients_per_principal:
        raise WireFormatError(
            f"register: field 'clients': {n} clients (need 1..{limits.max_clients_per_principal})"
        )
    seen: set[str] = set()
    clients = []
    for i, c in enumerate(msg.clients):
        cid = check_id(c.client_id, f"register: field 'clients[{i}].client_id'")
        if cid in seen:
            raise WireFormatError(f"register: field 'clients': {cid!r} listed twice")
        if c.num_examples < 1:
            raise WireFormatError(
                f"register: field 'clients[{i}].num_examples': a client needs >= 1 example"
            )
        seen.add(cid)
        clients.append(ClientInfo(cid, int(c.num_examples)))
    if len(msg.node) > 256 or len(msg.fedq_version) > 64:
        raise WireFormatError("register: field 'node' / 'fedq_version': too long")
    return Registration(
        clients=tuple(clients),
        fedq_version=msg.fedq_version,
        node=msg.node,
        protocol_version=int(msg.protocol_version),
        wire_format_version=int(msg.wire_format_version),
    )


def joined_to_proto(j: Joined) -> spb.RegisterReply:
    return spb.RegisterReply(
        run_id=j.run_id,
        protocol_version=j.protocol_version,
        fedq_version=j.fedq_version,
        wire_format_version=j.wire_format_version,
        config_json=j.config_json,
        client_index=j.client_index,
        num_classes=j.num_classes,
        input_dim=j.input_dim,
    )


def joined_from_proto(msg: spb.RegisterReply) -> Joined:
    if not msg.run_id or not msg.config_json:
        raise WireFormatError("register reply: fields 'run_id' and 'config_json' are required")
    return Joined(
        run_id=msg.run_id,
        config_json=msg.config_json,
        client_index={str(k): int(v) for k, v in msg.client_index.items()},
        num_classes=int(msg.num_classes),
        input_dim=int(msg.input_dim),
        fedq_version=msg.fedq_version,
        protocol_version=int(msg.protocol_version),
        wire_format_version=int(msg.wire_format_version),
    )


def work_item_to_proto(w: WorkItem) -> spb.WorkItem:
    return spb.WorkItem(
        action=_ACTION_TO_PB[w.action],  # type: ignore[arg-type]  # the enum's int value
        round=w.round,
        tasks=[
            spb.Assignment(client_id=a.client_id, round=a.round, deadline_s=a.deadline_s)
            for a in w.tasks
        ],
        reason=w.reason,
    )


def work_item_from_proto(msg: spb.WorkItem) -> WorkItem:
    action = _ACTION_FROM_PB.get(msg.action)
    if action is None:
        raise WireFormatError(f"work item: field 'action': unknown value {msg.action}")
    tasks = []
    for i, a in enumerate(msg.tasks):
        check_id(a.client_id, f"work item: field 'tasks[{i}].client_id'")
        if not math.isfinite(a.deadline_s):
            raise WireFormatError(f"work item: field 'tasks[{i}].deadline_s': not finite")
        tasks.append(Assignment(a.client_id, int(a.round), float(a.deadline_s)))
    if action == "task" and not tasks:
        raise WireFormatError("work item: field 'tasks': a TASK item needs at least one task")
    return WorkItem(action, int(msg.round), tuple(tasks), msg.reason)
