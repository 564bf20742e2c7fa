"""fedq's Triton kernels: fused unpack + dequantize and fused quantize + pack of the codec's
packed format (v3), bit-identical to the torch path of :mod:`fedq.codec`.

``fedq.codec`` imports this package lazily and only for tensors on a CUDA device
(:mod:`fedq.codec.dispatch`); importing it loads triton. Under ``TRITON_INTERPRET=1`` (set before
this import) the kernels run on CPU tensors through Triton's interpreter, which is how the tests
check them on machines without a GPU.
"""

from fedq_kernels.common import MAX_NUMEL, supports
from fedq_kernels.decode import DecodePlan, decode_range, dequantize, dequantize_ref
from fedq_kernels.encode import quantize_pack, quantize_pack_ref

__all__ = [
    "MAX_NUMEL",
    "DecodePlan",
    "decode_range",
    "dequantize",
    "dequantize_ref",
    "quantize_pack",
    "quantize_pack_ref",
    "supports",
]
