"""Split learning between two network namespaces over a tc-shaped veth (real gRPC, real link).
Needs root and iproute2; small: a tiny random BERT, 3 timed steps per arm, a 20 Mbit/s cap so
the transfer dominates. Outside the ~60 s budget of tests/split (marker ``netns``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.netns import namespaces_left

from fedq.bench.netlink import link_unavailable_reason, rate_bits_per_s, run_link_arm, veth_link

ROOT = Path(__file__).resolve().parents[2]
REASON = link_unavailable_reason()

# One at a time under pytest-xdist with the other namespace tests: it compares the machine's
# namespaces before and after.
pytestmark = [
    pytest.mark.netns,
    pytest.mark.xdist_group("netns"),
    pytest.mark.skipif(REASON is not None, reason=str(REASON)),
]

TINY = [
    "model.hidden=256",
    "model.max_length=64",
    "train.batch_size=32",
    "split.tiny_layers=2",
    "split.cut=1",
    "data.max_train=256",
    "data.max_test=8",
]
FP32 = ["split.act_codec=none", "split.grad_codec=none"]
FIXED4 = ["split.act_codec=fixed", "split.grad_codec=fixed", "split.fixed_bits=4"]


def test_split_steps_cross_a_shaped_link_between_namespaces() -> None:
    """Functional checks only: the steps run across the namespaces, the cap really limits the
    link (a lower bound, which a slow machine cannot break), and 4-bit sends far fewer bytes.
    The speed-up itself is a benchmark (``fedq bench split --link``), not a test."""
    before = set(namespaces_left())
    scenario = ROOT / "scenarios" / "split_tiny.yaml"
    with veth_link("20mbit") as link:
        assert link.server_ip.startswith("10.200.") and link.client_ip.startswith("10.200.")
        fp32 = run_link_arm(link, scenario, [*TINY, *FP32], steps=3, timeout=120)
        q4 = run_link_arm(link, scenario, [*TINY, *FIXED4], steps=3, timeout=120)
    assert set(namespaces_left()) == before  # cleaned up
    transfer = fp32["bytes_per_step"] * 8 / rate_bits_per_s("20mbit")
    assert transfer > 0.5  # 2 x 32x64x256 floats: the cap, not compute, sets the pace
    assert fp32["s_per_step"] >= 0.9 * transfer  # the link really is shaped to 20 Mbit/s
    assert q4["bytes_per_step"] < fp32["bytes_per_step"] / 6
