"""Privacy in the federated loop: accounting equals Opacus, the budget stop, resume, mechanisms
really change what is sent, and DP disabled is exactly the non-DP run."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from opacus.accountants import RDPAccountant

from fedq.config import RunConfig, config_from_dict
from fedq.fed.privacy import laplace_participations, local_steps
from fedq.rounds import select_clients
from fedq.runtime.setup import client_partitions, load_data
from fedq.runtime.simulate import simulate


def _cfg(privacy: dict[str, Any] | None = None, rounds: int = 3) -> RunConfig:
    raw: dict[str, Any] = {
        "seed": 2,
        "data": {"name": "digits", "max_train": 300},
        "model": {"name": "mlp", "hidden": 16},
        "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
        "rounds": {"count": rounds, "num_clients": 4, "clients_per_round": 2},
        "compression": {"uplink": {"policy": "fixed", "bits": 8}},
        "runtime": {"backend": "inprocess", "workers": 1},
    }
    if privacy is not None:
        raw["privacy"] = privacy
    return config_from_dict(raw)


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _rdp_eps(history: list[tuple[float, float, int]], delta: float) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta))


def test_central_epsilon_per_round_equals_opacus(tmp_path: Path) -> None:
    cfg = _cfg({"mechanism": "central", "noise_multiplier": 1.3, "clip_norm": 0.5})
    simulate(cfg, tmp_path)
    q = cfg.rounds.clients_per_round / cfg.rounds.num_clients
    for r, rec in enumerate(_records(tmp_path)):
        assert math.isclose(rec["epsilon"], _rdp_eps([(1.3, q, r + 1)], 1e-5), rel_tol=1e-9)


def test_budget_stop_before_exceeding_and_resume_keeps_spent(tmp_path: Path) -> None:
    target = 2.0
    privacy = {"mechanism": "central", "noise_multiplier": 3.0, "target_epsilon": target}
    summary = simulate(_cfg(privacy, rounds=10), tmp_path)
    recs = _records(tmp_path)
    assert 0 < len(recs) < 10
    assert all(r["epsilon"] <= target for r in recs)
    assert "privacy budget" in summary["stopped_reason"]
    assert summary["epsilon_spent"] == recs[-1]["epsilon"] <= target
    # one more round would have exceeded the target
    q = 0.5
    assert _rdp_eps([(3.0, q, len(recs) + 1)], 1e-5) > target
    again = simulate(_cfg(privacy, rounds=10), tmp_path, resume=True)
    assert len(_records(tmp_path)) == len(recs)  # no new round: the ledger was not reset
    assert again["epsilon_spent"] == summary["epsilon_spent"]
    assert "privacy budget" in again["stopped_reason"]


def test_dpsgd_trains_privately_and_accounts_each_client(tmp_path: Path) -> None:
    plain = simulate(_cfg(), tmp_path / "plain")
    cfg = _cfg({"mechanism": "dpsgd", "noise_multiplier": 1.1, "clip_norm": 1.0})
    dp = simulate(cfg, tmp_path / "dp")
    assert dp["final_accuracy"] != plain["final_accuracy"] or [
        r["loss"] for r in _records(tmp_path / "dp")
    ] != [r["loss"] for r in _records(tmp_path / "plain")]
    parts = client_partitions(cfg, load_data(cfg).train)
    counts: Counter[int] = Counter()
    everyone = list(range(cfg.rounds.num_clients))
    for r in range(cfg.rounds.count):
        counts.update(select_clients(r, everyone, cfg.rounds.clients_per_round, cfg.seed))
    expected = max(
        _rdp_eps(
            [(1.1, local_steps(len(parts[c]), 16, 1)[1], n * local_steps(len(parts[c]), 16, 1)[0])],
            1e-5,
        )
        for c, n in counts.items()
    )
    assert math.isclose(dp["epsilon_spent"], expected, rel_tol=1e-9)


def test_laplace_noises_updates_and_charges_pure_epsilon(tmp_path: Path) -> None:
    plain = simulate(_cfg(), tmp_path / "plain")
    cfg = _cfg({"mechanism": "laplace", "target_epsilon": 30.0, "clip_norm": 1.0})
    out = simulate(cfg, tmp_path / "lap")
    recs = _records(tmp_path / "lap")
    # releases per client = ceil(T*K/N) = 2 -> 15 per release; spent is a multiple of it
    per_release = 30.0 / math.ceil(3 * 2 / 4)
    for r in recs:
        assert r["epsilon"] <= 30.0
        assert math.isclose(r["epsilon"] / per_release, round(r["epsilon"] / per_release))
    assert [r["loss"] for r in recs] != [r["loss"] for r in _records(tmp_path / "plain")][
        : len(recs)
    ]
    assert out["epsilon_spent"] == recs[-1]["epsilon"]
    assert plain["epsilon_spent"] is None


def test_laplace_budget_per_client_leaves_spent_clients_out_then_stops(tmp_path: Path) -> None:
    """4 rounds of 2 of 4 clients: a budget of ceil(4*2/4) = 2 releases per client. A client that
    has used both is not selected again; when fewer than 2 clients have budget left, the run
    stops before the release, with the reason."""
    cfg = _cfg({"mechanism": "laplace", "target_epsilon": 30.0, "clip_norm": 1.0}, rounds=4)
    out = simulate(cfg, tmp_path)
    recs = _records(tmp_path)
    per, spent, expected = 15.0, Counter[int](), []
    for r in range(cfg.rounds.count):  # what the server's selection and ledger must have done
        pool = [c for c in range(cfg.rounds.num_clients) if (spent[c] + 1) * per <= 30.0]
        if len(pool) < cfg.rounds.clients_per_round:
            break
        spent.update(select_clients(r, pool, cfg.rounds.clients_per_round, cfg.seed))
        expected.append(max(spent.values()) * per)
    assert len(expected) == 3  # this seed's draw leaves one client alone with budget left
    assert [r["epsilon"] for r in recs] == expected
    assert all(r["clients_selected"] == r["clients_ok"] == 2 and r["applied"] for r in recs)
    assert out["rounds_completed"] == 3 and "privacy budget" in out["stopped_reason"]
    assert out["epsilon_spent"] == 30.0


def test_dp_disabled_is_exactly_the_non_dp_run(tmp_path: Path) -> None:
    a = simulate(_cfg(), tmp_path / "a")
    off = {"mechanism": "none", "target_epsilon": 1.0, "clip_norm": 0.01, "noise_multiplier": 5.0}
    b = simulate(_cfg(off), tmp_path / "b")
    assert a["final_accuracy"] == b["final_accuracy"]
    assert [r["loss"] for r in _records(tmp_path / "a")] == [
        r["loss"] for r in _records(tmp_path / "b")
    ]
    assert a["bytes_wire_total"] == b["bytes_wire_total"]


def test_laplace_paper_calibration_of_a_short_run_lets_each_client_release_once(
    tmp_path: Path,
) -> None:
    """The paper's T_L = (T/E)(K/N) is 1 * 2/4 = 0.5 for one round of 2 of 4 clients: split over
    0.5 releases, one release would cost twice the budget and no client could ever be selected
    (the run stopped before round 0). The budget is split over max(T_L, 1) releases instead."""
    privacy = {
        "mechanism": "laplace",
        "laplace_calibration": "paper",
        "target_epsilon": 30.0,
        "clip_norm": 1.0,
    }
    cfg = _cfg(privacy, rounds=1)
    assert laplace_participations(cfg) == 1.0
    assert laplace_participations(_cfg(privacy, rounds=6)) == 3.0  # T_L >= 1: the paper's own
    out = simulate(cfg, tmp_path)
    recs = _records(tmp_path)
    assert [r["applied"] for r in recs] == [True]
    assert recs[0]["clients_ok"] == 2 and recs[0]["epsilon"] == 30.0
    assert out["rounds_applied"] == 1 and out["epsilon_spent"] == 30.0
