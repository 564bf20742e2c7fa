"""ByteCounter: exact totals under concurrent updates; take() snapshots and resets atomically."""

from __future__ import annotations

import threading

from fedq.transport import ByteCounter


def test_concurrent_adds_are_exact_and_take_resets() -> None:
    counter = ByteCounter()

    def work(cid: str) -> None:
        for _ in range(2000):
            counter.add(cid, up=3, down=5)

    threads = [threading.Thread(target=work, args=(f"c{i % 4}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (counter.bytes_up, counter.bytes_down) == (8 * 2000 * 3, 8 * 2000 * 5)
    snap = counter.take()
    assert snap["clients"]["c0"] == {"bytes_up": 2 * 2000 * 3, "bytes_down": 2 * 2000 * 5}
    assert snap["bytes_up"] == 48_000 and len(snap["clients"]) == 4
    assert counter.snapshot() == {"bytes_up": 0, "bytes_down": 0, "clients": {},
                                  "control_up": 0, "control_down": 0}  # fmt: skip
    counter.add("c9", up=1)
    counter.reset()
    assert counter.bytes_up == 0


def test_control_plane_bytes_are_kept_apart_from_client_data() -> None:
    """Registration and work-stream bytes count per principal, outside the clients' data bytes,
    so a round's data bytes do not depend on how clients are grouped into processes."""
    counter = ByteCounter()
    counter.add("client-1", up=10, down=20)
    counter.add("worker-0", up=7, down=3, control=True)
    snap = counter.take()
    assert (snap["bytes_up"], snap["bytes_down"]) == (10, 20)
    assert (snap["control_up"], snap["control_down"]) == (7, 3)
    assert set(snap["clients"]) == {"client-1"}
    assert counter.take()["control_up"] == 0
