"""Bytes per step over real gRPC on loopback: the client's count, the server's count and the sum of
the frames agree exactly, and the activation / gradient payloads are what the bit maps imply."""

from __future__ import annotations

import math

import torch

from fedq.codec.packed import expected_payload_nbytes
from fedq.split.protocol import SplitClientWorker, SplitServer
from fedq.transport import TransportClient, TransportServer
from fedq.wire import message_to_frames
from fedq.wire.pb.service_pb2 import TaskRequest


def test_bytes_per_step_match_transport_and_bit_maps(kit) -> None:  # type: ignore[no-untyped-def]
    # act_outlier_ratio 1: every token above the median one is an outlier row (capped at 1/8),
    # so the float16 rows are on the wire and must be counted too
    cfg = kit.tiny_cfg(local_steps=3, b_min=1, init_bits=4.0, act_outlier_ratio=1.0)
    split, parts = kit.data(cfg)
    server = SplitServer(cfg, kit.build(cfg), split.test, 2)
    sent_msgs: list = []
    with TransportServer(server, max_workers=4) as ts:
        client = TransportClient(ts.address, client_id="client-0", timeout=30)

        class Spy:  # records what the client put on the wire
            bytes_sent = property(lambda self: client.bytes_sent)
            bytes_received = property(lambda self: client.bytes_received)
            client_id = "client-0"

            def get_task(self, r):  # type: ignore[no-untyped-def]
                return client.get_task(r)

            def push_update(self, m):  # type: ignore[no-untyped-def]
                return client.push_update(m)

            def split_step(self, m):  # type: ignore[no-untyped-def]
                sent_msgs.append(m)
                return client.split_step(m)

        worker = SplitClientWorker(cfg, kit.build(cfg), split.train, parts, lambda n: Spy())
        # the client state the client downloads holds a mixed activation bit map (1..8 bits)
        server.client_state["act_q.gate"] = torch.linspace(-4, 4, cfg.model.hidden)
        server.open_round(0, [0])
        ts.counters.take()
        out = worker.run_client(0, 0)
        traffic = ts.counters.take()
        client.close()
    steps = out["steps"]
    assert len(steps) == 3
    up_total = sum(s["bytes_up"] for s in steps) + out["state_bytes"]
    # the client's own count of each step equals the serialized frames of the message it sent
    for s, m in zip(steps, sent_msgs, strict=True):
        assert s["bytes_up"] == sum(f.ByteSize() for f in message_to_frames(m))
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
    # ... and the server's transport counted the same bytes, both ways
    request = TaskRequest(client_id="client-0", round=0).ByteSize()  # the get_task call
    assert traffic["bytes_up"] == client.bytes_sent == up_total + request
    assert traffic["bytes_down"] == client.bytes_received
    assert sum(s["bytes_down"] for s in steps) < traffic["bytes_down"]  # plus the task download
