"""A round is all-or-nothing; bad, late, duplicate or unexpected updates never touch the model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedq.codec import quantize, raw
from fedq.config import RunConfig, config_from_dict
from fedq.errors import FedqError
from fedq.fed.server import FedServer, client_name
from fedq.runtime.setup import build_bundle, client_partitions, load_data
from fedq.wire import WireMessage


def _server(min_clients: int = 1) -> FedServer:
    cfg: RunConfig = config_from_dict(
        {
            "data": {"name": "digits", "max_train": 200},
            "model": {"name": "mlp", "hidden": 8},
            "fed": {
                "num_clients": 3,
                "clients_per_round": 3,
                "rounds": 2,
                "min_clients": min_clients,
            },
        }
    )
    split = load_data(cfg)
    parts = client_partitions(cfg, split.train)
    return FedServer(cfg, build_bundle(cfg, split.train), split.test, [len(p) for p in parts])


def _update(server: FedServer, cid: int, r: int = 0, **kw: Any) -> WireMessage:
    tensors = {k: raw(torch.ones_like(v)) for k, v in server.global_state.items()}
    msg = WireMessage("update", client_name(cid), r, 0, {"num_samples": 10.0}, {}, tensors)
    for k, v in kw.items():
        setattr(msg, k, v)
    return msg


def _snapshot(server: FedServer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in server.global_state.items()}


def test_too_few_updates_discards_round_and_keeps_model() -> None:
    s = _server(min_clients=2)
    before = _snapshot(s)
    s.open_round(0)
    s.push_update(_update(s, 0))
    rec = s.close_round()
    assert rec["applied"] is False and rec["clients_ok"] == 1
    for k, v in before.items():
        assert torch.equal(s.global_state[k], v)
    assert s.round_done == -1


def test_rejections_leave_round_untouched() -> None:
    s = _server()
    before = _snapshot(s)
    s.open_round(0)
    name = next(iter(s.global_state))
    bad_shape = dict(_update(s, 0).tensors)
    bad_shape[name] = raw(torch.ones(3))
    nan = dict(_update(s, 0).tensors)
    nan[name] = raw(torch.full_like(s.global_state[name], float("nan")))
    cases = {
        "wrong round": _update(s, 0, round=1),
        "wrong kind": _update(s, 0, kind="global"),
        "not selected": _update(s, 0, client_id="client-99"),
        "bad num_samples": _update(s, 0, scalars={"num_samples": 0.0}),
        "missing tensor": _update(s, 0, tensors={}),
        "wrong shape": _update(s, 0, tensors=bad_shape),
        "nan": _update(s, 0, tensors=nan),
    }
    for label, msg in cases.items():
        with pytest.raises(FedqError):
            s.push_update(msg)
        assert s._round is not None and not s._round.updates, label
    s.push_update(_update(s, 1))
    with pytest.raises(FedqError, match="duplicate"):
        s.push_update(_update(s, 1))
    rec = s.close_round()
    assert rec["applied"] and rec["clients_ok"] == 1
    for k, v in before.items():
        assert torch.allclose(s.global_state[k], v + 1.0)  # exactly one delta of ones applied
    with pytest.raises(FedqError, match="no such round"):
        s.push_update(_update(s, 2, round=0))


def test_get_task_only_for_selected_clients_in_open_round() -> None:
    s = _server()
    with pytest.raises(FedqError, match="no task"):
        s.get_task(client_name(0), 0)
    s.open_round(0)
    task = s.get_task(client_name(2), 0)
    assert task.client_id == client_name(2) and set(task.tensors) == set(s.global_state)
    with pytest.raises(FedqError, match="not selected"):
        s.get_task("client-7", 0)
    q = quantize(torch.randn(4, 4), 4)
    assert q.numel == 16  # sanity: the codec used by clients is importable here
