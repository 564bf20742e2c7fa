"""Bit policies: how many bits each tensor of an update travels at (docs/algorithms.md §2.5-2.6,
§3), and the codecs of a split-learning cut (AMAQ, fixed, identity, AQ-SGD: one interface,
one registry).

``make_policy(name, **params)`` builds one from a scenario; every policy maps a
``{name: tensor}`` update and a :class:`BitContext` to ``{name: bits}`` (1..8 packed, 9..32 raw).
"""

from fedq.adapt.amaq import (
    AmaqQuantizer,
    BitSchedule,
    FixedQuantizer,
    GateController,
    IdentityQuantizer,
    bit_stats,
)
from fedq.adapt.aqsgd import DeltaQuantizer
from fedq.adapt.base import MAX_BITS, MAX_PACKED_BITS, BitContext, BitPolicy
from fedq.adapt.budget import BudgetBits, estimated_bytes, estimated_error
from fedq.adapt.cut import Coded, CutCodec, CutReceiver, Received
from fedq.adapt.registry import CUT_CODECS, POLICIES, make_cut_codec, make_policy
from fedq.adapt.schedules import (
    ClientEntropyBits,
    CosineBits,
    FixedBits,
    client_importance,
    cosine_factor,
    label_entropy,
    normalized_label_entropy,
)

__all__ = [
    "CUT_CODECS",
    "MAX_BITS",
    "MAX_PACKED_BITS",
    "POLICIES",
    "AmaqQuantizer",
    "BitContext",
    "BitPolicy",
    "BitSchedule",
    "BudgetBits",
    "ClientEntropyBits",
    "Coded",
    "CosineBits",
    "CutCodec",
    "CutReceiver",
    "DeltaQuantizer",
    "FixedBits",
    "FixedQuantizer",
    "GateController",
    "IdentityQuantizer",
    "Received",
    "bit_stats",
    "client_importance",
    "cosine_factor",
    "estimated_bytes",
    "estimated_error",
    "label_entropy",
    "make_cut_codec",
    "make_policy",
    "normalized_label_entropy",
]
