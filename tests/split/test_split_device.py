"""``runtime.device``: split mode on a CUDA GPU. The codec's packed form stays on the CPU (it is
the wire form) and decodes onto the device; a run on the GPU sends the same bytes as on the CPU
and follows the same loss curve. The GPU tests skip without CUDA (CI has none); the set-up errors
are checked everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedq.codec import QuantSpec, dequantize, quantize, raw
from fedq.config import RuntimeConfig, config_from_dict, load_scenario
from fedq.errors import ConfigError
from fedq.report import read_metrics
from fedq.runtime.backend import wants_gpu
from fedq.runtime.setup import torch_device
from fedq.runtime.simulate import simulate

ROOT = Path(__file__).resolve().parents[2]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_device_setting_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"runtime\.device"):
        config_from_dict({"runtime": {"device": "tpu"}})
    # both modes take it (federated: tests/fed/test_fed_device.py)
    fed = config_from_dict({"mode": "federated", "runtime": {"device": "cuda"}})
    assert fed.runtime.device == "cuda"
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert torch_device("auto").type == want
    assert torch_device("cpu").type == "cpu"
    # Ray hosts ask for a GPU share exactly when the run wants the GPU
    assert wants_gpu(RuntimeConfig(device="cuda")) and not wants_gpu(RuntimeConfig(device="cpu"))
    assert wants_gpu(RuntimeConfig(device="auto")) == torch.cuda.is_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error_before_anything_runs(tmp_path: Path) -> None:
    cfg = load_scenario(ROOT / "scenarios" / "split_tiny.yaml", ["runtime.device=cuda"])
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        simulate(cfg, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


@cuda
@pytest.mark.parametrize(
    "spec", [QuantSpec(), QuantSpec(range="sigma", row_scale=True, outlier_ratio=3.0)]
)
def test_packed_tensor_of_a_gpu_tensor_lives_on_the_cpu_and_decodes_alike(spec: QuantSpec) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 32, generator=g)
    x[1, 3] *= 40.0  # an outlier row
    p_gpu = quantize(x.cuda(), 3, spec)
    for t in (p_gpu.payload, p_gpu.bits, p_gpu.scales):
        assert t.device.type == "cpu"
    y = dequantize(p_gpu, device="cuda")  # unpacked and decoded on the GPU
    assert y.device.type == "cuda"
    torch.testing.assert_close(y.cpu(), dequantize(p_gpu), rtol=0, atol=0)
    # coding on either device gives the same tensor up to reduction order in the ranges
    step = float(p_gpu.scales.float().max())
    torch.testing.assert_close(
        dequantize(p_gpu), dequantize(quantize(x, 3, spec)), rtol=0, atol=step * 1.01
    )
    r = raw(x.cuda())
    assert r.payload.device.type == "cpu" and torch.equal(dequantize(r), x)


@cuda
def test_split_run_on_the_gpu_matches_the_cpu_run(tmp_path: Path) -> None:
    """Same bytes (the bit maps and sizes do not depend on the device) and the same losses up to
    float rounding (fixed 4-bit activations, so codes near a rounding edge may differ; fp32
    gradients, since stochastic rounding draws its noise differently on the two devices)."""
    over = ["split.act_codec=fixed", "split.grad_codec=none", "split.fixed_bits=4"]
    recs = {}
    for dev in ("cpu", "cuda"):
        cfg = load_scenario(
            ROOT / "scenarios" / "split_tiny.yaml", [*over, f"runtime.device={dev}"]
        )
        simulate(cfg, tmp_path / dev)
        recs[dev] = read_metrics(tmp_path / dev)
    for a, b in zip(recs["cpu"], recs["cuda"], strict=True):
        assert (a["bytes_up"], a["bytes_down"]) == (b["bytes_up"], b["bytes_down"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.02)
