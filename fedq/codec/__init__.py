"""Quantization maths, bit packing, ``PackedTensor`` and compressors (pure torch; no ray/grpc)."""

from fedq.codec.bitpack import pack_bits, packed_nbytes, unpack_bits
from fedq.codec.compressors import Compressor, ErrorFeedback, IdentityCompressor, QuantCompressor
from fedq.codec.layout import BlockLayout, Granularity
from fedq.codec.packed import FORMAT_VERSION, Encoding, PackedTensor
from fedq.codec.quantize import QuantSpec, dequantize, quantize, raw

__all__ = [
    "FORMAT_VERSION",
    "BlockLayout",
    "Compressor",
    "Encoding",
    "ErrorFeedback",
    "Granularity",
    "IdentityCompressor",
    "PackedTensor",
    "QuantCompressor",
    "QuantSpec",
    "dequantize",
    "pack_bits",
    "packed_nbytes",
    "quantize",
    "raw",
    "unpack_bits",
]
