"""Bytes per step over real gRPC on loopback: the client's count, the server's count and the sum of
the frames agree exactly, and the activation / gradient payloads are what the bit maps imply."""

from __future__ import annotations

import math
from typing import Any

import torch

from fedq.codec.packed import expected_payload_nbytes
from fedq.split.protocol import SplitServer
from fedq.wire import message_to_frames
from fedq.wire.pb.service_pb2 import Ack, TaskRequest


def test_bytes_per_step_match_transport_and_bit_maps(kit, rounds, metered) -> None:  # type: ignore[no-untyped-def]
    # act_outlier_ratio 1: every token above the median one is an outlier row (capped at 1/8),
    # so the float16 rows are on the wire and must be counted too
    cfg = kit.tiny_cfg(
        local_steps=3,
        b_min=1,
        init_bits=4.0,
        act_outlier_ratio=1.0,
        rounds={"count": 1, "num_clients": 1, "clients_per_round": 1},
    )
    split, parts = kit.data(cfg)
    server = SplitServer(cfg, kit.build(cfg), split.test, 2)
    # the client state the client downloads holds a mixed activation bit map (1..8 bits)
    server.client_state["act_q.gate"] = torch.linspace(-4, 4, cfg.model.hidden)
    conns: list[Any] = []

    def wrap(principal: str, conn: Any) -> Any:
        conns.append(metered(conn))
        return conns[-1]

    _, hooks, _ = rounds(cfg, server, kit.shards(cfg, split, parts), grpc=True, wrap=wrap)
    (conn,) = conns
    (rec,) = hooks.records
    steps = rec["steps"]  # the server's row of each step
    calls = [c for c in conn.calls if c["kind"] == "step"]
    assert len(steps) == len(calls) == 3
    for s, call in zip(steps, calls, strict=True):
        m = call["msg"]
        assert s["step"] == m.step
        # the server's count of each step, the client's own count and the message's serialized
        # frames are the same bytes, both ways
        assert s["bytes_up"] == call["up"] == sum(f.ByteSize() for f in message_to_frames(m))
        assert s["bytes_down"] == call["down"] > 0
        ph = m.tensors["h"]
        assert len(set(ph.bits.tolist())) > 2  # genuinely mixed bits
        lens = ph.layout.block_lengths()
        by_hand = sum(math.ceil(int(lens[ph.bits == b].sum()) * b / 8) for b in range(1, 9))
        assert ph.payload_nbytes == by_hand == expected_payload_nbytes(ph.layout, ph.bits)
        assert s["act_payload"] == by_hand
        assert s["act_bits"] == float((lens * ph.bits.long()).sum()) / ph.numel
        rows = ph.numel // ph.shape[-1]  # bit map + fp16 scale + offset; fp16 row (token) scales
        assert ph.row_scales is not None and ph.row_scales.numel() == rows
        assert ph.outlier_index is not None and ph.outlier_values is not None
        k = ph.outlier_index.numel()
        assert 0 < k <= rows // 8 and ph.outlier_values.shape == (k, ph.shape[-1])
        outliers = k * (4 + 2 * ph.shape[-1])  # int32 index + float16 row
        assert s["act_meta"] == ph.bits.numel() * (1 + 2 + 2) + 2 * rows + outliers
    # ... and the server's transport counted the round's bytes as the client did: the task
    # request and download, the steps, the client state upload and its ack
    (task,) = [c for c in conn.calls if c["kind"] == "task"]
    (update,) = [c for c in conn.calls if c["kind"] == "update"]
    state_up = sum(f.ByteSize() for f in message_to_frames(update["msg"]))
    assert update["up"] == state_up == rec["state_bytes"]
    assert update["down"] == Ack(accepted=True, bytes_received=state_up).ByteSize()
    assert task["up"] == TaskRequest(client_id="client-0", round=0).ByteSize()
    up_total = sum(s["bytes_up"] for s in steps) + state_up + task["up"]
    down_total = sum(s["bytes_down"] for s in steps) + task["down"] + update["down"]
    own = conn.counters.snapshot()  # the client's data bytes; registration and work stream apart
    assert rec["bytes_up"] == own["bytes_up"] == up_total
    assert rec["bytes_down"] == own["bytes_down"] == down_total
    assert conn.bytes_sent == own["bytes_up"] + own["control_up"]
    assert conn.bytes_received == own["bytes_down"] + own["control_down"]
    assert sum(s["bytes_down"] for s in steps) < rec["bytes_down"]  # plus the task download
