"""``runtime.device`` in federated mode: clients train on the device, the server decodes and
aggregates there, checkpoints stay portable (CPU tensors). Without a GPU the plumbing is checked on
torch's ``meta`` device (tensors without data) and the set-up errors everywhere; the GPU run
itself (same bytes, same losses up to float rounding as the CPU run) skips without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedq.config import config_from_dict, load_scenario
from fedq.errors import ConfigError
from fedq.fed.server import FedServer, to_cpu
from fedq.models import build_model
from fedq.report import read_metrics
from fedq.runtime.simulate import simulate

ROOT = Path(__file__).resolve().parents[2]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_batches_go_to_the_models_device_and_the_data_stays() -> None:
    from fedq.data import load_dataset

    data = load_dataset("digits", seed=0, max_train=40, max_test=8).train
    bundle = build_model("mlp", num_classes=10, input_dim=64, seed=0, hidden=8)
    x, y = bundle.batch(data, torch.arange(4))
    assert x.device.type == y.device.type == "cpu" and bundle.device.type == "cpu"
    bundle.to("meta")
    x, y = bundle.batch(data, torch.arange(4))
    assert (x.device.type, y.device.type, bundle.device.type) == ("meta", "meta", "meta")
    assert data.x.device.type == "cpu"


def test_server_state_is_saved_on_the_cpu_and_loaded_onto_the_models_device() -> None:
    cfg = config_from_dict({"fed": {"strategy": "fedadam"}, "model": {"hidden": 8}})
    bundle = build_model("mlp", num_classes=10, input_dim=64, seed=0, hidden=8)
    server = FedServer(cfg, bundle, None)
    state = server.state_dict()
    other = FedServer(
        cfg, build_model("mlp", num_classes=10, input_dim=64, seed=1, hidden=8).to("meta"), None
    )
    other.load_state_dict(state)
    assert all(v.device.type == "meta" for v in other.global_state.values())
    moved = to_cpu({"a": [torch.zeros(1)], "b": (1, "x")})  # structure kept (GPU: below)
    assert moved["a"][0].device.type == "cpu" and moved["b"] == (1, "x")


def test_federated_mode_takes_a_device_and_refuses_a_missing_gpu_early(tmp_path: Path) -> None:
    cfg = load_scenario(ROOT / "scenarios" / "quickstart.yaml", ["runtime.device=cuda"])
    assert cfg.runtime.device == "cuda"
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal of a missing one cannot be shown here")
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        simulate(cfg, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


@cuda
def test_federated_run_on_the_gpu_matches_the_cpu_run(tmp_path: Path) -> None:
    """Fixed bit widths (so sizes do not depend on values) with nearest rounding: same bytes per
    round; losses and accuracy equal up to float rounding (a code near a rounding edge may
    differ between devices)."""
    over = ["rounds.count=4", "runtime.backend=inprocess", "runtime.workers=2"]
    recs = {}
    for dev in ("cpu", "cuda"):
        cfg = load_scenario(
            ROOT / "scenarios" / "quickstart.yaml", [*over, f"runtime.device={dev}"]
        )
        simulate(cfg, tmp_path / dev)
        recs[dev] = read_metrics(tmp_path / dev)
    for a, b in zip(recs["cpu"], recs["cuda"], strict=True):
        assert (a["bytes_up"], a["bytes_down"]) == (b["bytes_up"], b["bytes_down"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.02)
    assert recs["cpu"][-1]["accuracy"] == pytest.approx(recs["cuda"][-1]["accuracy"], abs=0.03)
    # the checkpointed server state is on the CPU
    state = FedServer(
        cfg, build_model("mlp", num_classes=10, input_dim=64, seed=0, hidden=8).to("cuda"), None
    ).state_dict()
    assert all(v.device.type == "cpu" for v in state["global_state"].values())
