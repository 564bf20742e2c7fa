"""Hostile inputs for every RPC, made from valid ones: random bytes, truncation, bit flips, and
structure-aware tampering (any field of any protobuf message, the frame sequence, the tensors
inside the payload), all from one seeded generator so a failing case can be replayed."""

from __future__ import annotations

import random
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from fedq.wire.frame import decode_frame, encode_chunk_frame, encode_header_frame
from fedq.wire.pb import tensor_pb2 as pb

_INTS = [0, 1, 2, 3, 7, 8, 9, 255, 256, 2**31 - 1, 2**32 - 1, 2**53, 2**63 - 1]
_SIGNED = [-1, -(2**31), -(2**63)]
_FLOATS = [0.0, -0.0, 1e308, -1e308, 1e-45, float("nan"), float("inf"), float("-inf")]
_STRINGS = ["", "x" * 5000, "\x00", "client-1", "worker-0", "../../etc/passwd", "é" * 300, " "]


def _random_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


def garble(data: bytes, rng: random.Random) -> bytes:
    """Random bytes, a truncation, an extension or a few flipped bits of ``data``."""
    how = rng.randrange(4)
    if how == 0 or not data:
        return _random_bytes(rng, rng.choice([0, 1, 2, 5, 17, 64, 300]))
    if how == 1:
        return data[: rng.randrange(len(data))]
    if how == 2:
        return data + _random_bytes(rng, rng.choice([1, 3, 40]))
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 8])):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _value(field: FieldDescriptor, rng: random.Random) -> Any:
    t = field.type
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice(_FLOATS)
    if t == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if t == FieldDescriptor.TYPE_STRING:
        return rng.choice(_STRINGS)
    if t == FieldDescriptor.TYPE_BYTES:
        return _random_bytes(rng, rng.choice([0, 1, 3, 8, 100, 4096]))
    if t == FieldDescriptor.TYPE_ENUM:
        return rng.choice([0, 1, 2, 3, 7, 99])
    signed = t in (
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    )
    bits = (
        32
        if t
        in (
            FieldDescriptor.TYPE_INT32,
            FieldDescriptor.TYPE_UINT32,
            FieldDescriptor.TYPE_SINT32,
            FieldDescriptor.TYPE_FIXED32,
            FieldDescriptor.TYPE_SFIXED32,
        )
        else 64
    )
    pool = _INTS + (_SIGNED if signed else [])
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return max(lo, min(hi, rng.choice(pool)))


def _fields(msg: Message) -> list[tuple[Message, FieldDescriptor]]:
    """Every (message, field) pair reachable from ``msg``, set or not (one level into maps)."""
    out: list[tuple[Message, FieldDescriptor]] = []
    for f in msg.DESCRIPTOR.fields:
        out.append((msg, f))
        if f.type == FieldDescriptor.TYPE_MESSAGE and not _is_map(f):
            if f.is_repeated:
                for sub in getattr(msg, f.name):
                    out.extend(_fields(sub))
            elif msg.HasField(f.name):
                out.extend(_fields(getattr(msg, f.name)))
    return out


def _is_map(f: FieldDescriptor) -> bool:
    return f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def tamper(msg: Message, rng: random.Random) -> None:
    """Change one field of ``msg`` (or of a message inside it) to a hostile value, in place."""
    owner, f = rng.choice(_fields(msg))
    if _is_map(f):
        entries = getattr(owner, f.name)
        vf = f.message_type.fields_by_name["value"]
        for _ in range(rng.choice([1, 3, 200])):
            key = rng.choice(_STRINGS) + str(rng.randrange(10**6))
            if vf.type == FieldDescriptor.TYPE_MESSAGE:
                entries.get_or_create(key)
            else:
                entries[key] = _value(vf, rng)
        return
    if f.is_repeated:
        items = getattr(owner, f.name)
        how = rng.randrange(3)
        if how == 0:
            del items[:]
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            for _ in range(rng.choice([1, 2, 50])):
                new = items.add()
                if len(items) > 1:
                    new.CopyFrom(items[0])
        else:
            for _ in range(rng.choice([1, 2, 9, 1000])):
                items.append(_value(f, rng))
        return
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        if rng.random() < 0.5:
            owner.ClearField(f.name)
        else:
            getattr(owner, f.name).SetInParent()
        return
    setattr(owner, f.name, _value(f, rng))


def mutate_message(data: bytes, cls: type[Message], rng: random.Random) -> bytes:
    """``data`` (a serialized ``cls``) garbled or with one field tampered."""
    if rng.random() < 0.4:
        return garble(data, rng)
    msg = cls()
    msg.ParseFromString(data)
    tamper(msg, rng)
    return msg.SerializeToString()


def mutate_frames(frames: list[bytes], rng: random.Random) -> list[bytes]:
    """A hostile variant of a message's frames: a garbled or tampered frame, frames dropped,
    repeated, swapped or added, or the payload's tensors tampered (with consistent framing)."""
    out = list(frames)
    how = rng.randrange(7)
    if how == 0 and out:
        i = rng.randrange(len(out))
        out[i] = garble(out[i], rng)
    elif how == 1 and out:
        i = rng.randrange(len(out))
        f = pb.Frame()
        try:
            f.ParseFromString(out[i])
        except DecodeError:
            return out
        tamper(f, rng)
        out[i] = f.SerializeToString()
    elif how == 2 and out:
        del out[rng.randrange(len(out))]
    elif how == 3 and out:
        i = rng.randrange(len(out))
        out.insert(i, out[i])
    elif how == 4 and len(out) > 1:
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    elif how == 5:
        out.append(garble(out[-1] if out else b"", rng))
    else:
        out = _tamper_payload(out, rng)
    return out


def _tamper_payload(frames: list[bytes], rng: random.Random) -> list[bytes]:
    """Tamper one field of the TensorBundle inside the payload; re-frame it consistently, so
    the tampering reaches the tensor validation rather than the framing checks."""
    head = decode_frame(frames[0], "frame 0") if frames else None
    if not isinstance(head, pb.Header):
        return frames
    payload = b"".join(bytes(decode_frame(f, "chunk").data) for f in frames[1:])  # type: ignore[union-attr]
    bundle = pb.TensorBundle()
    bundle.ParseFromString(payload)
    tamper(bundle, rng)
    data = bundle.SerializeToString()
    head.payload_size = len(data)
    step = max(1, rng.choice([7, 64, 1 << 20]))
    chunks = [encode_chunk_frame(o, [data[o : o + step]]) for o in range(0, len(data), step)]
    return [encode_header_frame(head), *chunks]
