"""Activation DP (privacy.mechanism: activations): clip + Gaussian noise on what the client sends,
accounted per client with Opacus's accountant, budget stop before the target is exceeded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedq.codec import dequantize
from fedq.config import config_from_dict, load_scenario
from fedq.errors import ConfigError
from fedq.privacy import GaussianMechanism
from fedq.rounds import client_seed
from fedq.runtime.simulate import simulate
from fedq.split.privacy import privatize_activations, sample_rate
from fedq.split.protocol import SplitClientWorker, SplitServer

ROOT = Path(__file__).resolve().parents[2]


def test_privatize_clips_each_example_and_adds_noise_of_std_z_c() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 16, 32, generator=g) * torch.tensor([0.01, 0.1, 1, 2, 5, 9]).view(6, 1, 1)
    h.requires_grad_()
    mech = GaussianMechanism(clip_norm=3.0, noise_multiplier=0.5)
    out, clipped = privatize_activations(h, mech, torch.Generator().manual_seed(7))
    norms = h.detach().flatten(1).norm(dim=1)
    assert clipped == int((norms > 3.0).sum()) >= 3
    factor = torch.clamp(3.0 / norms, max=1.0)
    clipped_h = h.detach() * factor.view(6, 1, 1)
    noise = out.detach() - clipped_h
    assert float(noise.std()) == pytest.approx(mech.std, rel=0.05)  # 3072 draws: ~1.3% s.e.
    assert abs(float(noise.mean())) < 0.05
    assert float(clipped_h.flatten(1).norm(dim=1).max()) <= 3.0 + 1e-5
    again, _ = privatize_activations(h, mech, torch.Generator().manual_seed(7))
    assert torch.equal(again, out)  # fixed seed, same noise
    out.sum().backward()  # constant clip factors in the backward pass
    assert h.grad is not None
    torch.testing.assert_close(h.grad[:, 0, 0], factor * (1 - 1e-6) ** (factor < 1).float())


def _dp_cfg(kit: Any, **privacy: Any) -> Any:
    cfg = kit.tiny_cfg(act_codec="none", grad_codec="none", local_steps=2)
    raw = cfg.to_dict()
    raw["privacy"] = {"mechanism": "activations", "clip_norm": 2.0, **privacy}
    return config_from_dict(raw)


def test_client_sends_clipped_noised_activations(kit, open_rounds) -> None:  # type: ignore[no-untyped-def]
    cfg = _dp_cfg(kit, noise_multiplier=0.8)
    split, parts = kit.data(cfg)
    server = SplitServer(cfg, kit.build(cfg), split.test, 2)
    shards = kit.shards(cfg, split, parts)
    harness = open_rounds(cfg, server, {c: sh.size for c, sh in shards.items()})
    harness.engine.start()
    (task,) = [a for a in harness.next_task().tasks if a.client_id == "client-0"]
    conn = harness.connection()
    sent: list[Any] = []
    got: list[Any] = []

    class Recording:  # what the client downloads and sends, as it is before the wire
        def get_task(self, r: int, client_id: str | None = None) -> Any:
            got.append(conn.get_task(r, client_id))
            return got[-1]

        def split_step(self, msg: Any) -> Any:
            sent.append(msg)
            return conn.split_step(msg)

        def push_update(self, msg: Any) -> int:
            return conn.push_update(msg)

    worker = SplitClientWorker(cfg, kit.build(cfg), shards, {c: int(c[-1]) for c in shards})
    ref = kit.build(cfg)  # same init: the noiseless activations of the first step
    for m in (worker.model, ref):
        m.full.eval()
    worker.run(task, Recording())
    # the task carries the mechanism's parameters: the client noises with std z * C = 1.6
    scalars = got[0].scalars
    assert (scalars["dp_noise_multiplier"], scalars["dp_clip"]) == (0.8, 2.0)
    assert GaussianMechanism(scalars["dp_clip"], scalars["dp_noise_multiplier"]).std == 1.6
    h_sent = dequantize(sent[0].tensors["h"])
    gen = torch.Generator().manual_seed(client_seed(cfg.seed, 0, 0))
    idx = parts[0][torch.randperm(parts[0].numel(), generator=gen)][: cfg.train.batch_size]
    batch = ref.make_batch([split.train.texts[int(i)] for i in idx], split.train.y[idx])
    with torch.no_grad():
        h = ref.bottom(batch)
    norms = h.flatten(1).norm(dim=1)
    clipped = h * torch.clamp(2.0 / norms, max=1.0).view(-1, 1, 1)
    assert bool((norms > 2.0).all())  # the tiny model's rows are far above C: all clipped
    noise = h_sent - clipped
    assert float(noise.std()) == pytest.approx(1.6, rel=0.05)
    assert not torch.allclose(h_sent, h)
    # the client reports the fraction it clipped; the server's step row keeps it
    assert sent[0].scalars["dp_clipped_frac"] == 1.0
    row = next(r for r in server._rows if r["client"] == "client-0" and r["step"] == 0)
    assert row["dp_clipped_frac"] == 1.0


def test_epsilon_matches_opacus_and_budget_stops_before_target(tmp_path: Path) -> None:
    from opacus.accountants import RDPAccountant

    base = load_scenario(ROOT / "scenarios" / "split_tiny.yaml").to_dict()
    base["privacy"] = {
        "mechanism": "activations",
        "noise_multiplier": 1.1,
        "clip_norm": 1.0,
        "delta": 1e-5,
    }
    base["rounds"]["count"] = 2
    cfg = config_from_dict(base)
    simulate(cfg, tmp_path / "a")
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    q = sample_rate(cfg, 128)  # 256 examples, 2 iid clients
    for r, rec in enumerate(recs):
        acc = RDPAccountant()
        acc.history = [(1.1, q, (r + 1) * cfg.split.local_steps)]
        assert rec["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert recs[-1]["epsilon"] > recs[0]["epsilon"] > 0
    # a target between round 1's and round 2's epsilon: round 2 is refused, not run
    base["privacy"]["target_epsilon"] = (recs[0]["epsilon"] + recs[1]["epsilon"]) / 2
    summary = simulate(config_from_dict(base), tmp_path / "b")
    stopped = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(stopped) == 1 and stopped[0]["epsilon"] <= base["privacy"]["target_epsilon"]
    assert "privacy budget" in summary["stopped_reason"]


def test_activation_mechanism_is_split_only() -> None:
    with pytest.raises(ConfigError, match="not available in mode 'federated'"):
        config_from_dict({"privacy": {"mechanism": "activations", "noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match="not available in mode 'split'"):
        config_from_dict(
            {"mode": "split", "privacy": {"mechanism": "laplace", "target_epsilon": 1.0}}
        )
    with pytest.raises(ConfigError, match="noise_multiplier"):
        config_from_dict({"mode": "split", "privacy": {"mechanism": "activations"}})
