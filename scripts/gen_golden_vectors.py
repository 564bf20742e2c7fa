"""Write the golden wire vectors (tests/wire/golden/): inputs, recipes, bytes and decoded values.

Run once from the repository root, after a deliberate change of the wire format or the encoder:

    PYTHONPATH=. .venv/bin/python scripts/gen_golden_vectors.py

Inputs are multiples of 1/16 (exact in every dtype, and every sum the encoder forms over them is
exact too), so the bytes do not depend on the machine's reduction order. The format of the files
is described in tests/wire/golden_vectors.py; what they cover, in docs/wire-format.md section 15.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "wire"))

import golden_vectors as gv  # noqa: E402

from fedq.codec import dequantize  # noqa: E402
from fedq.wire import WireLimits, bundle_from_bytes, message_from_frames  # noqa: E402
from fedq.wire.pb import tensor_pb2 as pb  # noqa: E402


def grid(shape: tuple[int, ...], dtype: str = "float32", seed: int = 0, span: int = 64) -> Any:
    """Values k/16 with k in [-span, span] from a small LCG (no torch RNG: stable forever)."""
    n = 1
    for d in shape:
        n *= d
    state = 12345 + 7919 * seed
    out = []
    for _ in range(n):
        state = (1103515245 * state + 12345) % 2**31
        out.append((state >> 8) % (2 * span + 1) - span)
    return torch.tensor(out, dtype=torch.float32).div(16).reshape(shape).to(gv.DTYPES[dtype])


def q(bits: int | list[int], seed: int | None = None, **spec: Any) -> dict[str, Any]:
    return {"codec": "quantize", "bits": bits, "spec": spec, "seed": seed}


RAW = {"codec": "raw"}


def entry(name: str, x: torch.Tensor, recipe: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "input": gv.tensor_to_json(x), "encode": recipe}


def encoded_vectors() -> list[dict[str, Any]]:
    """Vectors produced by fedq's encoder: ``(name, about, tensors)`` plus framing for messages."""
    v: list[dict[str, Any]] = []

    def add(name: str, about: str, *tensors: dict[str, Any], **extra: Any) -> None:
        v.append({"name": name, "about": about, "tensors": list(tensors), **extra})

    special = torch.tensor([[-0.0, 1.5, -2.25], [1e-40, 3.0e38, -7.0]], dtype=torch.float32)
    add(
        "raw_fp32",
        "RAW FLOAT32 incl. -0.0, a subnormal and a large value",
        entry("w", special, RAW),
    )
    add("raw_fp16", "RAW FLOAT16", entry("w", grid((5,), "float16", 1), RAW))
    add("raw_bf16", "RAW BFLOAT16", entry("w", grid((2, 2), "bfloat16", 2), RAW))
    add(
        "tensor_asym_fp16_scales",
        "one block, asymmetric, 4 bits, FLOAT16 scales",
        entry("w", grid((3, 5), seed=3), q(4, granularity="tensor")),
    )
    add(
        "tensor_sym_fp32_scales",
        "one block, symmetric, 3 bits, FLOAT32 scales",
        entry(
            "w",
            grid((3, 5), seed=4),
            q(3, granularity="tensor", symmetric=True, scale_dtype="float32"),
        ),
    )
    add(
        "channel_axis0",
        "per channel on axis 0, asymmetric, 4 bits",
        entry("w", grid((4, 16), seed=5), q(4, granularity="channel", axis=0)),
    )
    add(
        "channel_axis_middle",
        "per channel on axis 1 of 3, symmetric, 5 bits, FLOAT32 scales",
        entry(
            "w",
            grid((2, 3, 8), seed=6),
            q(5, granularity="channel", axis=1, symmetric=True, scale_dtype="float32"),
        ),
    )
    add(
        "channel_axis_last",
        "per channel on the last axis (sent as axis 1), 6 bits, FLOAT32",
        entry(
            "w", grid((16, 3), seed=7), q(6, granularity="channel", axis=-1, scale_dtype="float32")
        ),
    )
    add(
        "group_partial",
        "groups of 8 over 35 elements: the last group holds 3",
        entry("w", grid((5, 7), seed=8), q(3, granularity="group", group_size=8)),
    )
    dtypes = ["float32", "float16", "bfloat16"]
    for b in range(1, 9):
        dt = dtypes[b % 3]
        add(
            f"width_{b}",
            f"{b}-bit codes, groups of 6 over 13 {dt} elements, asym and sym",
            entry("asym", grid((13,), dt, 10 + b), q(b, granularity="group", group_size=6)),
            entry(
                "sym",
                grid((13,), dt, 20 + b),
                q(b, granularity="group", group_size=6, symmetric=True, scale_dtype="float32"),
            ),
        )
    add(
        "mixed_channels",
        "per-channel bit map with every width 1..8 (3 twice), one run each",
        entry(
            "w",
            grid((9, 16), seed=30),
            q([3, 8, 1, 5, 3, 7, 2, 6, 4], granularity="channel", axis=0),
        ),
    )
    add(
        "mixed_groups_partial",
        "mixed widths over groups; the partial last group in the first run",
        entry(
            "w",
            grid((23,), seed=31),
            q(
                [5, 2, 5, 7, 2],
                granularity="group",
                group_size=5,
                symmetric=True,
                scale_dtype="float32",
            ),
        ),
    )
    rows = grid((16, 8), "float16", 32)
    rows[5] = 0.0  # a zero row gets row scale 0
    add(
        "row_scales_fp16",
        "FLOAT16 tensor with per-row scales (one a zero row), channel axis -1",
        entry("w", rows, q(3, granularity="channel", axis=-1, row_scale=True)),
    )
    big = grid((2, 8, 16), "bfloat16", 33)
    big[0, 0] *= 8
    big[1, 1] *= 8
    add(
        "outliers_bf16_row_scales",
        "BFLOAT16 tensor, two outlier rows and per-row scales",
        entry("h", big, q(4, granularity="channel", axis=-1, row_scale=True, outlier_ratio=3.0)),
    )
    many = grid((3, 8, 8), seed=34)
    for row, factor in ((0, 6.0), (5, 12.0), (17, 8.0), (20, 10.0)):
        many.view(-1, 8)[row] *= factor
    add(
        "outliers_fp32_capped",
        "four candidate rows, at most 24/8 = 3 kept (the largest)",
        entry(
            "h",
            many,
            q(3, granularity="channel", axis=-1, outlier_ratio=3.0, scale_dtype="float32"),
        ),
    )
    add(
        "sigma_range",
        "clipped (sigma) ranges: an encoder choice, decoded like any block",
        entry("w", grid((4, 16), seed=35), q(2, granularity="channel", axis=0, range="sigma")),
    )
    add(
        "stochastic_seeded",
        "stochastic rounding with a seeded generator (seed 1234)",
        entry(
            "g",
            grid((4, 16), seed=36),
            q(2, 1234, granularity="channel", axis=0, stochastic=True, scale_dtype="float32"),
        ),
    )
    add(
        "zero_range",
        "constant blocks (scale 0); a symmetric 1-bit zero block decodes to -0.0",
        entry("const", torch.full((2, 16), 0.75), q(3, granularity="channel", axis=0)),
        entry("zeros_sym", torch.zeros(4), q(1, symmetric=True)),
    )
    add(
        "empty_and_scalar",
        "empty QUANTIZED and RAW tensors, and a 0-d tensor",
        entry("empty_q", torch.empty(0, 4), q(4)),
        entry("empty_raw", torch.empty(0), RAW),
        entry("scalar", torch.tensor(1.25), q(3)),
    )
    add(
        "channel_fallbacks",
        "per channel asked: 8-element channels go as groups of 16, 1-D as one block",
        entry("short_channels", grid((6, 8), seed=37), q(4, group_size=16)),
        entry("vector", grid((10,), seed=38), q(4)),
    )
    add(
        "multi_tensor",
        "a LoRA-style update: per channel, group fallback, one block, RAW",
        entry("lora_A", grid((8, 16), seed=39), q(4)),
        entry("lora_B", grid((16, 8), seed=40), q(4, group_size=32)),
        entry("bias", grid((16,), seed=41), q(8)),
        entry("head", grid((2, 8), seed=42), RAW),
    )
    add(
        "framed_global",
        "a 'global' message: Header then chunks of at most 32 bytes",
        entry("w", grid((4, 16), seed=43), q(4)),
        entry("b", grid((4,), seed=44), RAW),
        form="frames",
        chunk_size=32,
        message={
            "kind": "global",
            "client_id": "client-3",
            "round": 7,
            "step": 0,
            "scalars": {"total_rounds": 20.0, "max_samples": 180.0},
            "tags": {"strategy": "fedavg", "dp_mechanism": "none"},
        },
    )
    add(
        "framed_no_tensors",
        "a message without tensors: a Header with payload_size 0, no chunk",
        form="frames",
        chunk_size=64,
        message={
            "kind": "update",
            "client_id": "client-0",
            "round": 2,
            "step": 0,
            "scalars": {"num_samples": 12.0},
            "tags": {},
        },
    )
    return v


def handmade() -> tuple[dict[str, Any], bytes]:
    """Decode-only vector: tensors built field by field to pin the rounding rules of
    docs/wire-format.md section 9, with the analytic values each must decode to."""

    def t(name: str, dtype: int, shape: list[int], **fields: Any) -> pb.PackedTensor:
        base: dict[str, Any] = {
            "format_version": 3,
            "encoding": pb.QUANTIZED,
            "granularity": pb.TENSOR,
            "scale_dtype": pb.FLOAT32,
        }
        return pb.PackedTensor(name=name, dtype=dtype, shape=shape, **{**base, **fields})

    def f32(*xs: float) -> bytes:
        return torch.tensor(xs, dtype=torch.float32).numpy().tobytes()

    def f16(*xs: float) -> bytes:
        return torch.tensor(xs, dtype=torch.float16).numpy().tobytes()

    two_bit_0123 = bytes([0b11100100])  # codes 0, 1, 2, 3 at 2 bits, LSB first
    cases = [
        # q*s + o lands exactly between two bfloat16 / float16 values: ties go to even
        (
            t(
                "bf16_ties",
                pb.BFLOAT16,
                [4],
                bits=b"\x02",
                scales=f32(2**-8),
                offsets=f32(1.0),
                payload=two_bit_0123,
            ),
            [1.0, 1.0, 1 + 2**-7, 1 + 2**-6],
        ),
        (
            t(
                "fp16_ties",
                pb.FLOAT16,
                [4],
                bits=b"\x02",
                scales=f32(2**-11),
                offsets=f32(1.0),
                payload=two_bit_0123,
            ),
            [1.0, 1.0, 1 + 2**-10, 1 + 2**-9],
        ),
        # 3 * f32(1/3) rounds to 1.0 before -1.0 is added: 0.0 (a fused multiply-add gives 3e-8)
        (
            t(
                "fp32_no_fma",
                pb.FLOAT32,
                [2],
                bits=b"\x02",
                scales=f32(1 / 3),
                offsets=f32(-1.0),
                payload=bytes([0b0011]),
            ),
            [0.0, -1.0],
        ),
        # symmetric with scale 0: codes below the centre 1.5 give -0.0
        (
            t(
                "sym_zero_scale",
                pb.FLOAT32,
                [4],
                bits=b"\x02",
                scales=f32(0.0),
                symmetric=True,
                payload=two_bit_0123,
            ),
            [-0.0, -0.0, 0.0, 0.0],
        ),
        # q*s beyond the float16 range overflows to infinity
        (
            t(
                "fp16_overflow",
                pb.FLOAT16,
                [2],
                bits=b"\x01",
                scales=f32(70000.0),
                offsets=f32(0.0),
                payload=bytes([0b01]),
            ),
            [float("inf"), 0.0],
        ),
        # 3 * f16(1/3) = 1 - 2^-12 (exact in float32) is a float16 tie: it rounds to 1.0
        (
            t(
                "row_scale_tie",
                pb.FLOAT16,
                [2, 2],
                bits=b"\x02",
                scales=f32(1.0),
                offsets=f32(0.0),
                payload=bytes([0b11100111]),
                row_scales=f16(1 / 3, 1.5),
            ),
            [1.0, 0.333251953125, 3.0, 4.5],
        ),
        # outlier values are float16; in a bfloat16 tensor they are rounded (ties to even)
        (
            t(
                "bf16_outlier_round",
                pb.BFLOAT16,
                [8, 2],
                bits=b"\x01",
                scales=f32(0.0),
                offsets=f32(0.0),
                payload=bytes(2),
                outlier_index=torch.tensor([3], dtype=torch.int32).numpy().tobytes(),
                outlier_values=f16(1 + 2**-8, 1 + 3 * 2**-8),
            ),
            [0.0] * 6 + [1.0, 1 + 2**-6] + [0.0] * 8,
        ),
    ]
    tensors, bundle = [], bytearray(pb.TensorBundle(format_version=3).SerializeToString())
    for msg, values in cases:
        body = msg.SerializeToString()
        bundle += b"\x12" + bytes([len(body)]) + body  # every body here is < 128 bytes
        expected = torch.tensor(values, dtype=torch.float32).to(gv.DTYPES[_dtype(msg.dtype)])
        tensors.append(
            {
                "name": msg.name,
                "input": None,
                "encode": None,
                "decoded": gv.tensor_to_json(expected.reshape(list(msg.shape))),
            }
        )
    about = "built field by field (decode only): rounding ties, no FMA, signed zeros, overflow"
    return {
        "name": "decode_arithmetic",
        "about": about,
        "encoder": False,
        "tensors": tensors,
    }, bytes(bundle)


def _dtype(value: int) -> str:
    return {pb.FLOAT32: "float32", pb.FLOAT16: "float16", pb.BFLOAT16: "bfloat16"}[value]


def _decoded(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: gv.tensor_to_json(dequantize(p)) for name, p in tensors.items()}


def main() -> None:
    limits = WireLimits()
    gv.GOLDEN_DIR.mkdir(exist_ok=True)
    for old in gv.GOLDEN_DIR.glob("*.bin"):
        old.unlink()
    out = []
    for vector in encoded_vectors():
        vector.setdefault("form", "bundle")
        vector["encoder"] = True
        if vector["form"] == "bundle":
            data = gv.encode_bundle(vector)
            decoded = _decoded(bundle_from_bytes(data, limits))
        else:
            frames = gv.encode_frames(vector)
            data = gv.join_frames(frames)
            parsed = [pb.Frame.FromString(f) for f in frames]
            decoded = _decoded(message_from_frames(parsed, limits).tensors)
        vector["file"] = f"{vector['name']}.bin"
        for t in vector["tensors"]:
            t["decoded"] = decoded[t["name"]]
        (gv.GOLDEN_DIR / vector["file"]).write_bytes(data)
        out.append(vector)
    vector, data = handmade()
    decoded = _decoded(bundle_from_bytes(data, limits))
    for t in vector["tensors"]:  # the analytic values are what fedq decodes, bit for bit
        assert decoded[t["name"]] == t["decoded"], t["name"]
    vector["form"], vector["file"] = "bundle", f"{vector['name']}.bin"
    (gv.GOLDEN_DIR / vector["file"]).write_bytes(data)
    out.append(vector)
    manifest = {
        "format_version": 3,
        "about": "fedq wire golden vectors; see tests/wire/golden_vectors.py for the file format",
        "generated_by": "scripts/gen_golden_vectors.py",
        "vectors": out,
    }
    gv.MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in gv.GOLDEN_DIR.iterdir())
    print(f"wrote {len(out)} vectors, {size} bytes, to {gv.GOLDEN_DIR}")


if __name__ == "__main__":
    main()
