"""``fedq bench transport`` from the real CLI, tiny: the JSON has every case, and both paths moved
exactly the bytes they should (fedq's frames, the raw stream's payload), counted at both ends; the
rounds part runs the same run three ways (simulate on Ray, simulate in one process, serve + joins
over TLS) with the same bytes and accuracy in every round, and leaves no process behind."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fedq.bench.transport import payload_message
from fedq.wire import bundle_to_bytes, message_to_frames


def test_bench_transport_cli_counts_every_byte(tmp_path: Path) -> None:
    out = tmp_path / "transport.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedq.cli",
            "bench",
            "transport",
            "--part",
            "throughput",
            "--size-mib",
            "2",
            "--repeats",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "fedq MB/s" in done.stdout and "raw MB/s" in done.stdout
    result = json.loads(out.read_text())
    msg = payload_message(2, 0)
    payload = len(bundle_to_bytes(msg.tensors))
    frames = sum(f.ByteSize() for f in message_to_frames(msg, 1 << 20))
    assert result["bench"] == "transport" and result["config"]["payload_bytes"] == payload
    assert result["part"] == "throughput" and "rounds" not in result
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
            assert raw == {
                k: calls * payload for k in ("client_sent", "server_received", "server_acked")
            }
        else:
            assert fedq["server_sent"] == fedq["client_received"] == calls * frames
            assert raw == {"server_sent": calls * payload, "client_received": calls * payload}


@pytest.mark.slow
def test_bench_transport_rounds_part_runs_three_ways_alike(tmp_path: Path) -> None:
    out, keep = tmp_path / "rounds.json", tmp_path / "work"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedq.cli",
            "bench",
            "transport",
            "--part",
            "rounds",
            "--clients",
            "3",
            "--rounds",
            "2",
            "--keep",
            str(keep),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "s/round" in done.stdout and "serve + joins / simulate (ray)" in done.stdout
    result = json.loads(out.read_text())
    assert result["part"] == "rounds" and "cases" not in result
    rounds = result["rounds"]
    assert rounds["config"]["clients"] == rounds["config"]["clients_per_round"] == 3
    ways = {w["way"]: w for w in rounds["ways"]}
    assert list(ways) == ["ray", "inprocess", "serve"]
    for w in ways.values():
        assert w["rounds"] == 2 and len(w["bytes"]) == len(w["accuracy"]) == 2
        assert len(w["engine_round_seconds"]) == 2 and w["round0_s"] == w["engine_round_seconds"][0]
        assert len(w["round_seconds"]) == 1 and w["seconds_per_round"] == w["round_seconds"][0]
        assert w["engine_seconds_per_round"] == w["engine_round_seconds"][1]
        assert w["bytes_per_round"] == statistics.median(up + down for up, down in w["bytes"])
        assert min(up for up, _ in w["bytes"]) > 0 and min(d for _, d in w["bytes"]) > 0
        assert w["final_accuracy"] == w["accuracy"][-1] is not None
        assert 0 < w["peak_pss_gib"] <= w["peak_rss_gib"]
        assert (w["listening_s"] is None) == (w["way"] != "serve")
    # the same run every way: same selection, seeds and data -> the same bytes and accuracy
    assert ways["ray"]["bytes"] == ways["inprocess"]["bytes"] == ways["serve"]["bytes"]
    assert ways["ray"]["accuracy"] == ways["inprocess"]["accuracy"] == ways["serve"]["accuracy"]
    assert rounds["agree"] == {"bytes": True, "accuracy": True}
    # what carries the clients: threads of one process, or a server and one process per client
    assert ways["inprocess"]["peak_processes"] == 1
    assert ways["serve"]["peak_processes"] == 1 + 3
    assert ways["ray"]["peak_processes"] > 3  # the driver, Ray's own processes and the actors
    assert set(rounds["serve_over"]) == {"ray", "inprocess"}
    for way, q in rounds["serve_over"].items():
        for key in ("startup_s", "seconds_per_round", "peak_rss_gib"):
            assert q[key] == ways["serve"][key] / ways[way][key]
    logs = {p.stem for p in (keep / "logs").iterdir()}
    assert logs == {"ray", "inprocess", "serve", "client-0", "client-1", "client-2"}
    assert "(TLS)" in (keep / "logs" / "client-0.log").read_text()
    left = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(keep) in " ".join(p.info["cmdline"] or [])
    ]
    assert not left, [p.info["cmdline"] for p in left]
