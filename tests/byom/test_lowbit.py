"""A packed frozen base (``model.base_bits``): a linear layer whose weight lives in fedq's packed
format gives the decoded weight's output and input gradient, keeps no fp32 weight, and a LoRA
model on such a base trains only its adapters."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedq.codec import dequantize
from fedq.data import Record
from fedq.models import build_model
from fedq.models.hf import encode_records
from fedq.models.lowbit import PackedLinear, quantize_base

RECORDS = [Record("alpaca", "cba", instruction="Reverse it.", input="abc"), Record("text", "a b")]


def test_a_packed_layer_is_its_decoded_weight_and_holds_no_fp32_copy() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    linear.requires_grad_(False)
    layer = PackedLinear(linear, bits=4, group_size=32)
    w = dequantize(layer.packed)
    assert w.shape == (40, 96) and 0 < float((w - linear.weight).abs().max()) < 0.1
    x = torch.randn(3, 5, 96, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, w, linear.bias), rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-6, atol=1e-6)
    assert [n for n, _ in layer.named_parameters()] == []  # nothing to train, no fp32 weight
    assert sorted(layer.state_dict()) == ["bias"]
    assert layer.packed_nbytes() < 0.2 * linear.weight.numel() * 4


def test_a_lora_model_on_a_packed_base_trains_its_adapters_only(tiny_lm: Path) -> None:
    fp32 = build_model(f"hf:{tiny_lm}", num_classes=1, seed=0, max_length=32)
    packed = build_model(f"hf:{tiny_lm}", num_classes=1, seed=0, max_length=32, base_bits=8)
    layers = [m for m in packed.module.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 14  # 2 blocks x (q, k, v, o, gate, up, down); the LM head is kept
    assert isinstance(packed.module.base_model.model.lm_head, nn.Linear)
    assert sorted(packed.trainable_state()) == sorted(fp32.trainable_state())
    inputs, labels = encode_records(packed.tokenizer, RECORDS, 32)
    with torch.no_grad():
        want, got = fp32.forward(inputs), packed.forward(inputs)
    assert float((got - want).norm() / want.norm()) < 0.02  # 8 bits: close to the fp32 base
    loss = packed.loss(inputs, labels)
    loss.backward()
    grads = {n for n, p in packed.module.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    info = quantize_base(build_model(f"hf:{tiny_lm}", num_classes=1, seed=0).module, 4)
    assert info["layers"] == 14 and info["packed_bytes"] < 0.3 * info["fp32_bytes"]
