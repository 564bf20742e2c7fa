"""``fedq bench transport`` from the real CLI, tiny: the JSON has every case, and both paths moved
exactly the bytes they should (fedq's frames, the raw stream's payload), counted at both ends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fedq.bench.transport import payload_message
from fedq.wire import bundle_to_bytes, message_to_frames


def test_bench_transport_cli_counts_every_byte(tmp_path: Path) -> None:
    out = tmp_path / "transport.json"
    done = subprocess.run(
        [sys.executable, "-m", "fedq.cli", "bench", "transport", "--size-mib", "2",
         "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "fedq MB/s" in done.stdout and "raw MB/s" in done.stdout
    result = json.loads(out.read_text())
    msg = payload_message(2, 0)
    payload = len(bundle_to_bytes(msg.tensors))
    frames = sum(f.ByteSize() for f in message_to_frames(msg, 1 << 20))
    assert result["bench"] == "transport" and result["config"]["payload_bytes"] == payload
    assert result["all_pass"] == all(c["pass"] for c in result["cases"])
    cases = {(c["tls"], c["direction"]): c for c in result["cases"]}
    assert set(cases) == {(tls, d) for tls in (False, True) for d in ("upload", "download")}
    for (_, direction), c in cases.items():
        calls = c["calls"]
        assert calls == 2  # one warm-up and one timed transfer per path
        assert len(c["fedq_seconds"]) == len(c["raw_seconds"]) == 1
        assert (c["fedq_frame_bytes_per_call"], c["raw_bytes_per_call"]) == (frames, payload)
        assert c["ratio"] == c["fedq_mbps"] / c["raw_mbps"]
        fedq, raw = c["fedq_bytes"], c["raw_bytes"]
        assert fedq["content_equal"] is True
        if direction == "upload":
            assert fedq["client_sent"] == fedq["server_received"] == calls * frames
            assert (fedq["updates_decoded"], fedq["updates_wrong_size"]) == (calls, 0)
            assert raw == {k: calls * payload for k in ("client_sent", "server_received",
                                                         "server_acked")}  # fmt: skip
        else:
            assert fedq["server_sent"] == fedq["client_received"] == calls * frames
            assert raw == {"server_sent": calls * payload, "client_received": calls * payload}
