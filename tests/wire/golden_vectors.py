"""Reading, writing and re-encoding the golden wire vectors in ``tests/wire/golden/``.

``vectors.json`` lists every vector: its inputs (exact bit patterns, as hex of the little-endian
elements), the encoder recipe that produced it, the file holding the expected bytes and the
expected decoded values (bit patterns again). ``form`` is ``bundle`` (the file is one serialized
``TensorBundle``) or ``frames`` (the file is a sequence of serialized ``Frame`` messages, each
preceded by its length as a protobuf varint). Vectors with ``encoder: false`` were built field by
field to pin decoding rules that fedq's encoder never produces; they are checked on decoding only.
``scripts/gen_golden_vectors.py`` writes the files with the helpers below; the tests re-encode
with the same helpers, so a change of the encoder or of the format shows up as a byte difference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedq.codec import Granularity, PackedTensor, QuantSpec, quantize, raw
from fedq.wire import MessageKind, WireMessage, bundle_to_bytes, message_to_frames

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
MANIFEST = GOLDEN_DIR / "vectors.json"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def tensor_to_json(t: torch.Tensor) -> dict[str, Any]:
    """``{"dtype", "shape", "hex"}``: the tensor's exact little-endian bytes."""
    name = next(k for k, v in DTYPES.items() if v == t.dtype)
    flat = t.detach().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {"dtype": name, "shape": list(t.shape), "hex": data.hex()}


def tensor_from_json(d: dict[str, Any]) -> torch.Tensor:
    data = bytes.fromhex(d["hex"])
    dtype = DTYPES[d["dtype"]]
    if not data:
        return torch.empty(d["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(d["shape"]).clone()


def spec_from_json(d: dict[str, Any]) -> QuantSpec:
    fields = dict(d)
    fields["granularity"] = Granularity(fields.get("granularity", "channel"))
    return QuantSpec(**fields)


def encode_tensor(recipe: dict[str, Any], x: torch.Tensor) -> PackedTensor:
    """Run fedq's encoder as ``recipe`` says: ``{"codec": "raw"}`` or ``{"codec": "quantize",
    "bits": int | [per-block widths], "spec": {QuantSpec fields}, "seed": int | None}``."""
    if recipe["codec"] == "raw":
        return raw(x)
    bits = recipe["bits"]
    bit_arg = bits if isinstance(bits, int) else torch.tensor(bits, dtype=torch.uint8)
    seed = recipe.get("seed")
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return quantize(x, bit_arg, spec_from_json(recipe.get("spec", {})), generator=gen)


def encode_tensors(vector: dict[str, Any]) -> dict[str, PackedTensor]:
    return {
        t["name"]: encode_tensor(t["encode"], tensor_from_json(t["input"]))
        for t in vector["tensors"]
    }


def encode_bundle(vector: dict[str, Any]) -> bytes:
    return bundle_to_bytes(encode_tensors(vector))


def vector_message(vector: dict[str, Any], tensors: dict[str, PackedTensor]) -> WireMessage:
    m = vector["message"]
    return WireMessage(
        kind=MessageKind(m["kind"]),
        client_id=m["client_id"],
        round=m["round"],
        step=m["step"],
        scalars=dict(m["scalars"]),
        tags=dict(m["tags"]),
        tensors=tensors,
    )


def encode_frames(vector: dict[str, Any]) -> list[bytes]:
    """The serialized frames of a ``frames`` vector (map entries in deterministic order)."""
    msg = vector_message(vector, encode_tensors(vector))
    frames = message_to_frames(msg, vector["chunk_size"])
    return [f.SerializeToString(deterministic=True) for f in frames]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def join_frames(frames: list[bytes]) -> bytes:
    """Frames as stored in a ``frames`` file: each preceded by its length as a varint."""
    return b"".join(_varint(len(f)) + f for f in frames)


def split_frames(data: bytes) -> list[bytes]:
    """Inverse of :func:`join_frames`."""
    out, pos = [], 0
    while pos < len(data):
        size, shift = 0, 0
        while True:
            byte = data[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        out.append(data[pos : pos + size])
        pos += size
    return out


def load_manifest() -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads(MANIFEST.read_text(encoding="utf-8"))
    return manifest


def vector_bytes(vector: dict[str, Any]) -> bytes:
    return (GOLDEN_DIR / vector["file"]).read_bytes()
