"""A packed frozen base (``model.base_bits``): a linear layer whose weight lives in fedq's packed
format gives the decoded weight's output and input gradient, keeps no fp32 weight, and a LoRA
model on such a base trains only its adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedq.codec import dequantize
from fedq.data import Record
from fedq.errors import ConfigError
from fedq.models import build_model
from fedq.models.hf import base_model, encode_records, model_config, packed_base
from fedq.models.lowbit import PackedLinear, load_packed_causal_lm, packed_bytes, quantize_base

RECORDS = [Record("alpaca", "cba", instruction="Reverse it.", input="abc"), Record("text", "a b")]


def test_a_packed_layer_is_its_decoded_weight_and_holds_no_fp32_copy() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    linear.requires_grad_(False)
    layer = PackedLinear.from_linear(linear, bits=4, group_size=32)
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
    # the same LoRA initialisation as on the full-precision base (paired runs stay paired)
    want_state, got_state = fp32.trainable_state(), packed.trainable_state()
    assert sorted(got_state) == sorted(want_state)
    for key, value in want_state.items():
        torch.testing.assert_close(got_state[key], value, rtol=0, atol=0)
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


def test_a_base_read_packed_from_safetensors_equals_the_whole_base_packed(tiny_lm: Path) -> None:
    """Read tensor by tensor (never the whole base in fp32), the packed base is the same model as
    the one loaded whole and packed afterwards: same packed bytes, same logits, bit for bit."""
    whole = base_model(tiny_lm, "causal_lm").requires_grad_(False)
    quantize_base(whole, 4, 32)
    direct = load_packed_causal_lm(tiny_lm, model_config(tiny_lm), 4, 32)
    assert direct is not None
    assert not any(p.is_meta or p.requires_grad for p in direct.parameters())
    mods = dict(direct.named_modules())
    for name, layer in whole.named_modules():
        if isinstance(layer, PackedLinear):
            other = mods[name]
            assert isinstance(other, PackedLinear)
            assert torch.equal(other.packed.payload, layer.packed.payload)
    # tied LM head: one tensor with the input embeddings, as transformers loads it
    assert direct.lm_head.weight is direct.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(direct(ids).logits, whole(ids).logits, rtol=0, atol=0)


def test_a_checkpoint_that_is_not_safetensors_is_loaded_whole_then_packed(
    tiny_lm: Path, tmp_path: Path
) -> None:
    """A .bin checkpoint (or tensor names the model does not have) falls back to the whole load;
    the base built either way is the same."""
    import shutil

    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_lm, legacy)
    from safetensors.torch import load_file, save_file

    torch.save(load_file(str(legacy / "model.safetensors")), legacy / "pytorch_model.bin")
    (legacy / "model.safetensors").unlink()
    assert not (legacy / "model.safetensors").exists()
    assert load_packed_causal_lm(legacy, model_config(legacy), 4, 32) is None
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_lm, renamed)
    tensors = load_file(str(renamed / "model.safetensors"))
    tensors = {k.replace("model.", "transformer.", 1): v for k, v in tensors.items()}
    save_file(tensors, str(renamed / "model.safetensors"), metadata={"format": "pt"})
    assert load_packed_causal_lm(renamed, model_config(renamed), 4, 32) is None
    ids = torch.tensor([[2, 4, 6]])
    with torch.no_grad():
        got = packed_base(legacy, 4, 32)(ids).logits
        want = packed_base(tiny_lm, 4, 32)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients_on_a_packed_base(tiny_lm: Path) -> None:
    """``model.gradient_checkpointing`` recomputes each decoder layer in the backward pass
    (packed weights decoded again); the adapters' gradients are the ones without it."""
    plain = build_model(f"hf:{tiny_lm}", num_classes=1, seed=0, max_length=32, base_bits=4)
    ckpt = build_model(
        f"hf:{tiny_lm}",
        num_classes=1,
        seed=0,
        max_length=32,
        base_bits=4,
        gradient_checkpointing=True,
    )
    assert ckpt.module.is_activation_checkpointing
    assert not plain.module.is_activation_checkpointing
    inputs, labels = encode_records(plain.tokenizer, RECORDS, 32)
    grads = []
    for bundle in (plain, ckpt):
        bundle.module.train()
        bundle.loss(inputs, labels).backward()
        grads.append({n: p.grad for n, p in bundle.module.named_parameters() if p.grad is not None})
    assert sorted(grads[0]) == sorted(grads[1]) and len(grads[0]) == 8  # A and B, q and v, 2 blocks
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)


def test_a_budget_gives_each_matrix_the_width_of_least_error_that_fits(tiny_lm: Path) -> None:
    """``model.base_budget_mb``: the bytes each width would take are exact, the allocation fits
    the budget, spends it (a larger budget never packs worse), and the packed base loads the
    same read tensor by tensor as loaded whole."""
    from fedq.models.lowbit import BUDGET_WIDTHS, allocate, width_options

    torch.manual_seed(0)
    w = torch.randn(40, 96)
    options = width_options(w)
    assert len(options) == len(BUDGET_WIDTHS)
    for width, (nbytes, err) in zip(BUDGET_WIDTHS, options, strict=True):
        layer = PackedLinear.pack(w, bits=width.bits, group_size=width.group_size)
        assert nbytes == layer.packed_nbytes() and err > 0
    # the integer program against brute force on three small matrices
    mats = {f"m{i}": torch.randn(8 + 8 * i, 64) * (1 + i) for i in range(3)}
    opts = {n: width_options(m) for n, m in mats.items()}
    import itertools

    least = sum(min(b for b, _ in o) for o in opts.values())
    most = sum(max(b for b, _ in o) for o in opts.values())
    for budget in (least, (2 * least + most) // 3, (least + most) // 2):
        best = min(
            (
                sum(opts[n][j][1] for n, j in zip(sorted(opts), pick, strict=True)),
                pick,
            )
            for pick in itertools.product(range(len(BUDGET_WIDTHS)), repeat=3)
            if sum(opts[n][j][0] for n, j in zip(sorted(opts), pick, strict=True)) <= budget
        )
        got = allocate(opts, budget)
        got_err = sum(opts[n][BUDGET_WIDTHS.index(got[n])][1] for n in sorted(opts))
        assert got_err <= best[0] * (1 + 1e-6)
        assert sum(opts[n][BUDGET_WIDTHS.index(got[n])][0] for n in opts) <= budget
    with pytest.raises(ConfigError, match="below the smallest packed base"):
        allocate(opts, least - 1)
    # a whole model: tight and loose budgets
    sizes = []
    for mib in (0.006, 0.02):
        direct = load_packed_causal_lm(tiny_lm, model_config(tiny_lm), None, 64, mib * 2**20)
        assert direct is not None
        sizes.append(packed_bytes(direct))
        assert sizes[-1] <= mib * 2**20
        whole = base_model(tiny_lm, "causal_lm").requires_grad_(False)
        quantize_base(whole, None, budget_bytes=mib * 2**20)
        ids = torch.tensor([[1, 5, 9, 3, 7]])
        with torch.no_grad():
            torch.testing.assert_close(direct(ids).logits, whole(ids).logits, rtol=0, atol=0)
    assert sizes[0] < sizes[1]


def test_the_loss_runs_the_lm_head_only_where_a_token_is_labelled(tiny_lm: Path) -> None:
    """The causal LM's loss and gradients equal those from the full logits, while the LM head
    sees only the positions that predict a labelled token."""
    from fedq.models.hf import token_losses

    bundle = build_model(f"hf:{tiny_lm}", num_classes=1, seed=0, max_length=32)
    inputs, labels = encode_records(bundle.tokenizer, RECORDS, 32)
    seen: list[tuple[int, ...]] = []
    head = bundle.module.get_base_model().lm_head
    hook = head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    total, count = bundle.token_losses(inputs, labels)
    hook.remove()
    assert count == int((labels[:, 1:] != -100).sum()) and seen == [(count, head.out_features)]
    assert count < labels.numel() // 2
    want_total, want_count = token_losses(bundle.forward(inputs), labels)
    assert want_count == count
    torch.testing.assert_close(total, want_total, rtol=1e-5, atol=1e-5)
    grads = []
    for loss in (total / count, want_total / count):
        bundle.module.zero_grad()
        loss.backward()
        grads.append([p.grad.clone() for p in bundle.module.parameters() if p.grad is not None])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_budget_weighs_each_matrix_error_by_its_inputs(tiny_lm: Path) -> None:
    """Calibration: each packed layer's input second moments (the same on every call: fixed
    records), and option errors weighted by them (all-ones moments give the plain error)."""
    from fedq.models.hf import calibration_moments
    from fedq.models.lowbit import width_options

    moments = calibration_moments(tiny_lm)
    assert len(moments) == 14 and all(m.shape in ((32,), (64,)) for m in moments.values())
    assert all(bool((m >= 0).all()) and float(m.sum()) > 0 for m in moments.values())
    again = calibration_moments(tiny_lm)
    assert all(torch.equal(again[n], m) for n, m in moments.items())
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    plain = width_options(w)
    assert width_options(w, torch.ones(64)) == plain
    half = torch.cat([torch.ones(32), torch.zeros(32)])
    for (b1, e1), (b2, e2) in zip(width_options(w, half), plain, strict=True):
        assert b1 == b2 and 0 < e1 < e2


def test_a_packed_base_on_disk_round_trips_and_a_damaged_one_is_refused(
    tiny_lm: Path, tmp_path: Path
) -> None:
    """:func:`save_packed` / :func:`load_packed_checkpoint`: the same layers back, bit for bit;
    a file whose fields do not fit a layer's shape, or that lacks one, is a ConfigError naming
    it."""
    import json as json_

    from safetensors import safe_open
    from safetensors.torch import save_file

    from fedq.models.lowbit import PACKED_FILE, load_packed_checkpoint, save_packed

    model = load_packed_causal_lm(tiny_lm, model_config(tiny_lm), 3, 32)
    assert model is not None
    info = save_packed(model, tmp_path, source_sha256="abc")
    assert info["source_sha256"] == "abc" and len(info["layers"]) == 14
    back = load_packed_checkpoint(tmp_path, model_config(tiny_lm))
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
    with safe_open(str(tmp_path / PACKED_FILE), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = sorted(info["layers"])[0]
    for damage in ("truncate", "drop"):
        bad = dict(tensors)
        key = f"{name}.packed.payload"
        if damage == "truncate":
            bad[key] = bad[key][:-1].clone()
        else:
            del bad[key]
        save_file(bad, str(tmp_path / PACKED_FILE), metadata=meta)
        with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
            load_packed_checkpoint(tmp_path, model_config(tiny_lm))
    future = {**json_.loads(meta["fedq"]), "format": 99}
    save_file(tensors, str(tmp_path / PACKED_FILE), metadata={"fedq": json_.dumps(future)})
    with pytest.raises(ConfigError, match="make it again with fedq quantize-base"):
        load_packed_checkpoint(tmp_path, model_config(tiny_lm))


def test_lora_can_start_from_what_packing_loses(tiny_lm: Path) -> None:
    """``model.base_lowrank_init`` (LQ-LoRA's start): the adapted layers hold ``Q`` and LoRA
    starts at ``L`` with ``Q + L`` closer to the full-precision weight than plain packing; the
    model's output is closer to the fp32 model's; the exported adapter gives the full-precision
    base exactly what training added, ``scaling * (B A - B0 A0)``."""
    import tempfile

    from peft import PeftModel

    from fedq.models.hf import base_model

    fp32 = build_model(f"hf:{tiny_lm}", num_classes=1, seed=0, max_length=32)
    plain = build_model(f"hf:{tiny_lm}", num_classes=1, seed=0, max_length=32, base_bits=3)
    lq = build_model(
        f"hf:{tiny_lm}", num_classes=1, seed=0, max_length=32, base_bits=3, base_lowrank_init=True
    )
    assert sorted(lq.lowrank_start) == sorted(
        n for n, m in lq.module.get_base_model().named_modules() if hasattr(m, "lora_A")
    )
    inputs, labels = encode_records(lq.tokenizer, RECORDS, 32)
    with torch.no_grad():
        want = fp32.forward(inputs)
        err_plain = float((plain.forward(inputs) - want).norm())
        err_lq = float((lq.forward(inputs) - want).norm())
    assert err_lq < err_plain
    # train a step, then the adapter exported for the full-precision base
    lq.loss(inputs, labels).backward()
    with torch.no_grad():
        for p in lq.module.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    with tempfile.TemporaryDirectory() as tmp:
        lq.save_adapter(tmp)
        merged = PeftModel.from_pretrained(base_model(tiny_lm, "causal_lm"), tmp)
        merged = merged.merge_and_unload()
    full = dict(base_model(tiny_lm, "causal_lm").named_parameters())
    got = dict(merged.named_parameters())
    base = lq.module.get_base_model()
    for name, (a0, b0) in lq.lowrank_start.items():
        layer = base.get_submodule(name)
        s = layer.scaling["default"]
        delta = s * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight - b0 @ a0)
        torch.testing.assert_close(
            got[f"{name}.weight"] - full[f"{name}.weight"], delta, rtol=1e-4, atol=1e-6
        )
    # fedq export --merge's model is that merge (the packed base is not what it merges into)
    again = dict(lq.merged().named_parameters())
    for key, value in got.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0)
