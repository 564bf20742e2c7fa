"""A client whose update its uplink codec cannot encode (float16 scales would overflow) reports the
round as failed, naming the tensor and the fix, instead of sending bytes the server refuses."""

from __future__ import annotations

from typing import Any

import torch

from fedq.adapt import BitContext
from fedq.config import LinkConfig
from fedq.fed.pipeline import LinkCodec
from fedq.rounds.node import ClientNode
from fedq.wire.control import Assignment, ClientInfo, Joined, WorkItem


class Conn:
    def __init__(self, items: list[WorkItem]) -> None:
        self.items = items
        self.pushed: list[Any] = []

    def register(self, reg: Any) -> Joined:
        return Joined(
            run_id="run-1",
            config_json="{}",
            client_index={"c": 0},
            num_classes=2,
            input_dim=4,
            fedq_version="x",
        )

    def work(self, run_id: str) -> Any:
        items = self.items

        class Feed:
            def __iter__(self) -> Any:
                return iter(items)

            def cancel(self) -> None:
                return None

        return Feed()

    def push_update(self, msg: Any) -> int:
        self.pushed.append(msg)
        return 0


class Uplink:
    """Encodes a delta with the default uplink (8 bits, float16 scales) as a client does."""

    def __init__(self, delta: dict[str, torch.Tensor]) -> None:
        self.codec = LinkCodec(LinkConfig())
        self.delta = delta

    def run(self, task: Assignment, conn: Any) -> dict[str, Any]:
        self.codec.encode(self.delta, BitContext(task.round, 10))
        return {}

    def round_closed(self, r: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def test_an_update_beyond_float16_scales_is_a_failed_task_naming_the_tensor_and_fix() -> None:
    delta = {"fc.bias": torch.randn(8), "fc.weight": torch.linspace(-5e7, 5e7, 256).reshape(8, 32)}
    items = [WorkItem("task", 0, (Assignment("c", 0, 10.0),)), WorkItem("done", 1, reason="ok")]
    conn = Conn(items)
    runner = Uplink(delta)
    node = ClientNode(conn, [ClientInfo("c", 1)], lambda j: runner)  # type: ignore[arg-type]
    assert node.run() == "ok"
    assert node.stats["failed"] == 1 and node.stats["tasks"] == 0
    [report] = conn.pushed
    assert (report.kind, report.round) == ("failed", 0) and not report.tensors
    error = report.tags["error"]
    assert "tensor 'fc.weight'" in error and "overflows float16" in error, error
    assert "scale_dtype: float32" in error, error  # the fix survives the report's length cap
    # with float32 scales the same update encodes, and every tensor decodes finite
    codec = LinkCodec(LinkConfig(scale_dtype="float32"))
    packed, _ = codec.encode(delta, BitContext(0, 10))
    assert all(bool(torch.isfinite(codec.decode(packed)[k]).all()) for k in delta)
