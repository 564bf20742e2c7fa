"""A round is all-or-nothing; bad, late, duplicate or unexpected updates never touch the model.

The round engine runs its real loop with one principal that registers four clients and keeps its
work stream open (tests/conftest.py, ``open_rounds``); the test plays the clients, calling the
engine as the transport would."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from fedq.codec import Encoding, Granularity, QuantSpec, quantize, raw
from fedq.config import RunConfig, config_from_dict
from fedq.errors import FedqError
from fedq.fed.server import FedServer
from fedq.rounds import client_name
from fedq.rounds.workload import Member
from fedq.runtime.setup import build_bundle, client_partitions, load_data
from fedq.wire import WireMessage


@pytest.fixture
def run(open_rounds: Any) -> Any:
    """``run(min_clients)``: a FedServer behind a round engine, four registered clients (three
    selected per round), a 1.5 s round deadline, the engine not started yet."""

    def make(min_clients: int = 1) -> Any:
        cfg: RunConfig = config_from_dict(
            {
                "data": {"name": "digits", "max_train": 200},
                "model": {"name": "mlp", "hidden": 8},
                "rounds": {
                    "count": 2,
                    "num_clients": 4,
                    "clients_per_round": 3,
                    "min_clients": min_clients,
                    "timeout_s": 1.5,
                },
            }
        )
        split = load_data(cfg)
        parts = client_partitions(cfg, split.train)
        server = FedServer(cfg, build_bundle(cfg, split.train), split.test)
        clients = {client_name(i): len(p) for i, p in enumerate(parts)}
        return open_rounds(cfg, server, clients, num_classes=10, input_dim=64)

    return make


def _update(server: FedServer, cid: str, r: int = 0, **kw: Any) -> WireMessage:
    tensors = {k: raw(torch.ones_like(v)) for k, v in server.global_state.items()}
    msg = WireMessage.update(cid, r, tensors=tensors, scalars={"num_samples": 10.0})
    return dataclasses.replace(msg, **kw)


def _snapshot(server: FedServer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in server.global_state.items()}


def test_too_few_updates_discards_round_and_keeps_model(run: Any) -> None:
    r = run(min_clients=2)
    before = _snapshot(r.workload)
    r.engine.start()
    selected = [a.client_id for a in r.next_task().tasks]
    assert len(selected) == 3
    r.engine.push_update(_update(r.workload, selected[0]))
    rec = r.record(0)  # the others never deliver: dropped at the deadline
    assert rec["applied"] is False and rec["clients_ok"] == 1 and rec["clients_dropped"] == 2
    assert set(rec["dropped"]) == set(selected[1:])
    assert all("deadline" in why for why in rec["dropped"].values())
    for k, v in before.items():
        assert torch.equal(r.workload.global_state[k], v)
    assert r.workload.round_done == -1


def test_rejections_leave_round_untouched(run: Any) -> None:
    r = run()
    s = r.workload
    before = _snapshot(s)
    r.engine.start()
    selected = [a.client_id for a in r.next_task().tasks]
    (outsider,) = {client_name(i) for i in range(4)} - set(selected)
    cid = selected[0]
    name = next(iter(s.global_state))
    bad_shape = dict(_update(s, cid).tensors)
    bad_shape[name] = raw(torch.ones(3))
    nan = dict(_update(s, cid).tensors)
    nan[name] = raw(torch.full_like(s.global_state[name], float("nan")))
    cases = {
        "round 1 is not open": _update(s, cid, round=1),
        "expected an 'update' or 'failed' message": _update(s, cid, kind="global"),
        f"{outsider} is not selected": _update(s, outsider),
        "client-99 is not selected": _update(s, "client-99"),
        "num_samples must be > 0": _update(s, cid, scalars={"num_samples": 0.0}),
        "num_samples must be > 0, got 0.0": _update(s, cid, scalars={"loss": 1.0}),  # absent
        "missing": _update(s, cid, tensors={}),
        "has shape": _update(s, cid, tensors=bad_shape),
        "NaN/Inf": _update(s, cid, tensors=nan),
    }
    for match, msg in cases.items():
        with pytest.raises(FedqError, match=match):
            r.engine.push_update(msg)
        rnd = r.engine._round
        assert rnd is not None and rnd.index == 0 and not rnd.updates, match
    r.engine.push_update(_update(s, selected[1]))
    with pytest.raises(FedqError, match="already delivered"):
        r.engine.push_update(_update(s, selected[1]))
    rec = r.record(0)
    assert rec["applied"] and rec["clients_ok"] == 1 and rec["clients_dropped"] == 2
    for k, v in before.items():
        assert torch.allclose(s.global_state[k], v + 1.0)  # exactly one delta of ones applied
    assert s.round_done == 0
    after = _snapshot(s)
    assert r.next_task().round == 1
    with pytest.raises(FedqError, match="round 0 is not open"):
        r.engine.push_update(_update(s, selected[0], round=0))  # late
    rec = r.record(1)  # nobody delivers in round 1: the late update did not count there either
    assert rec["clients_ok"] == 0 and rec["applied"] is False
    for k, v in after.items():
        assert torch.equal(s.global_state[k], v)


def test_get_task_only_for_selected_clients_in_open_round(run: Any) -> None:
    r = run()
    with pytest.raises(FedqError, match="round 0 is not open"):
        r.engine.get_task(client_name(0), 0)
    with pytest.raises(FedqError, match="no task prepared"):
        r.workload.task(0, Member(client_name(0), 0, 10))
    r.engine.start()
    item = r.next_task()
    assert item.round == 0 and all(a.round == 0 and a.deadline_s <= 1.5 for a in item.tasks)
    selected = [a.client_id for a in item.tasks]
    (outsider,) = {client_name(i) for i in range(4)} - set(selected)
    task = r.engine.get_task(selected[2], 0)
    assert task.kind == "global" and task.round == 0
    assert task.client_id == selected[2] and set(task.tensors) == set(r.workload.global_state)
    for cid in (outsider, "client-7"):
        with pytest.raises(FedqError, match="not selected"):
            r.engine.get_task(cid, 0)
    with pytest.raises(FedqError, match="round 1 is not open"):
        r.engine.get_task(selected[0], 1)


def test_update_tensors_may_be_any_dtype_and_encoding(run: Any) -> None:
    """wire-format §12: the server takes an update's tensors in FLOAT32, FLOAT16 or BFLOAT16, RAW
    or QUANTIZED, in any mix, and applies the decoded values in binary32."""
    r = run(min_clients=1)
    s = r.workload
    before = _snapshot(s)
    r.engine.start()
    cid = r.next_task().tasks[0].client_id
    encode = [
        lambda t: raw(t.half()),
        lambda t: raw(t.bfloat16()),
        lambda t: quantize(t.bfloat16(), 4, QuantSpec(granularity=Granularity.TENSOR)),
        lambda t: quantize(t.half(), 8),  # per channel; asymmetric: constant rows decode exactly
    ]
    tensors = {
        k: encode[i % len(encode)](torch.ones_like(v))
        for i, (k, v) in enumerate(s.global_state.items())
    }
    assert {p.dtype for p in tensors.values()} == {"float16", "bfloat16"}
    assert {p.encoding for p in tensors.values()} == {Encoding.RAW, Encoding.QUANTIZED}
    r.engine.push_update(WireMessage.update(cid, 0, tensors, scalars={"num_samples": 10.0}))
    rec = r.record(0)
    assert rec["applied"] and rec["clients_ok"] == 1
    for k, v in before.items():
        assert torch.equal(s.global_state[k], v + 1.0), k  # ones decode exactly in every dtype
