"""``hf:PATH`` models: loading a local checkpoint, LoRA from PEFT's own options, the response-only
loss mask (token by token), and adapters other tools load with the same logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fedq.data import Record
from fedq.errors import ConfigError
from fedq.models import build_model, check_model_name, model_entry
from fedq.models.hf import CausalLMBundle, encode_records, fingerprint, lora_config

ALPACA = Record("alpaca", "cba", instruction="Reverse it.", input="abc")
CHAT = Record("chat", "Paris", messages=(("user", "Capital of France?"),))
TEXT = Record("text", "plain words here")


def _lm(path: Path, **kw: object) -> CausalLMBundle:
    bundle = build_model(f"hf:{path}", num_classes=1, seed=0, max_length=64, **kw)
    assert isinstance(bundle, CausalLMBundle)
    return bundle


def test_the_task_and_the_modes_come_from_the_checkpoint(tiny_lm: Path, tiny_encoder: Path) -> None:
    lm, enc = model_entry(f"hf:{tiny_lm}"), model_entry(f"hf:{tiny_encoder}")
    assert lm is not None and (lm.task, lm.family, lm.width) == ("causal_lm", "llama", 32)
    assert lm.modes == ("federated", "split")
    assert enc is not None and (enc.task, enc.modes) == ("classification", ("federated",))
    assert check_model_name(f"hf:{tiny_encoder}", "split") == (
        f"'hf:{tiny_encoder}' cannot be trained by mode 'split' (it serves federated)"
    )


def test_a_directory_fedq_cannot_load_is_one_clear_error(tmp_path: Path, tiny_lm: Path) -> None:
    assert "no such directory" in str(check_model_name(f"hf:{tmp_path / 'absent'}", "federated"))
    (tmp_path / "empty").mkdir()
    assert "not a Hugging Face model directory (no config.json" in str(
        check_model_name(f"hf:{tmp_path / 'empty'}", "federated")
    )
    odd = tmp_path / "odd"
    shutil.copytree(tiny_lm, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "no-such-arch"}))
    problem = str(check_model_name(f"hf:{odd}", "federated"))
    assert problem.startswith(f"model hf:{odd}: transformers cannot read its config"), problem
    assert "no-such-arch" in problem


def test_lora_takes_peft_options_and_an_unknown_architecture_needs_targets() -> None:
    from torch import nn

    cfg = lora_config(
        {"r": 4, "use_dora": True, "target_modules": ["up"], "modules_to_save": ["head"]},
        r=8,
        lora_alpha=16,
        model_type="llama",
    )
    assert (cfg.r, cfg.lora_alpha, cfg.use_dora) == (4, 16, True)
    assert set(cfg.target_modules) == {"up"} and cfg.modules_to_save == ["head"]
    assert set(lora_config(None, r=8, lora_alpha=16, model_type="llama").target_modules) == {
        "q_proj",
        "v_proj",
    }
    module = nn.Sequential()
    module.add_module("proj_in", nn.Linear(2, 2))
    module.add_module("act", nn.ReLU())
    with pytest.raises(
        ConfigError,
        match=r"no default LoRA targets for model type 'mystery'.*"
        r"this model has: proj_in",
    ):
        lora_config(None, r=8, lora_alpha=16, model_type="mystery", module=module)


def test_target_modules_that_match_nothing_are_a_config_error(tiny_lm: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules"):
        _lm(tiny_lm, lora={"target_modules": ("no_such_proj",)})


@pytest.mark.parametrize("record", [ALPACA, CHAT, TEXT], ids=["alpaca", "chat", "text"])
def test_the_loss_is_on_the_response_tokens_only(tiny_lm: Path, record: Record) -> None:
    bundle = _lm(tiny_lm)
    tok = bundle.tokenizer
    inputs, labels = encode_records(tok, [record, TEXT], max_length=64)
    ids, mask = inputs["input_ids"][0], inputs["attention_mask"][0]
    response = tok(record.response, add_special_tokens=record.kind == "text")["input_ids"]
    response = [*response, tok.eos_token_id]
    n = int(mask.sum())
    start = n - len(response)
    assert ids[start:n].tolist() == response  # the response and EOS end the row
    for i in range(ids.numel()):  # token by token: a label exactly where the response is
        want = int(ids[i]) if start <= i < n else -100
        assert int(labels[0, i]) == want, (i, tok.convert_ids_to_tokens(int(ids[i])))
    if record.kind == "chat":  # the chat template rendered the prompt
        assert tok.decode(ids[:start]).replace(" ", "").startswith("<user>capitaloffrance?")
    if record.kind == "text":
        assert start == 0
    if record.kind == "alpaca":
        assert "<assistant>" in tok.decode(ids[:start]).replace(" ", "")


def test_truncation_keeps_the_prompt_and_cuts_the_response(tiny_lm: Path) -> None:
    bundle = _lm(tiny_lm)
    long = Record("alpaca", " ".join(["word"] * 100), instruction="Say word many times.")
    inputs, labels = encode_records(bundle.tokenizer, [long], max_length=20)
    assert inputs["input_ids"].shape == (1, 20)
    assert (labels[0] != -100).sum() > 0 and labels[0, 0] == -100


@pytest.mark.parametrize(
    "lora",
    [{"r": 4}, {"r": 2, "use_dora": True, "target_modules": ("q_proj", "k_proj", "up_proj")}],
    ids=["lora", "dora"],
)
def test_the_exported_adapter_loads_in_peft_with_the_same_logits(
    tiny_lm: Path, tmp_path: Path, lora: dict
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bundle = _lm(tiny_lm, lora=lora)
    if lora.get("use_dora"):  # DoRA's magnitude vectors train and travel with the adapters
        assert any("magnitude" in k for k in bundle.trainable_state())
    gen = torch.Generator().manual_seed(1)
    state = {
        k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in bundle.trainable_state().items()
    }
    bundle.load_trainable_state(state)
    bundle.eval()
    inputs, _ = encode_records(bundle.tokenizer, [ALPACA, CHAT], max_length=64)
    ours = bundle.forward(inputs)
    out = bundle.save_adapter(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    base = AutoModelForCausalLM.from_pretrained(str(tiny_lm), dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, str(out)).eval()(**inputs).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    merged = bundle.merged().eval()(**inputs).logits
    torch.testing.assert_close(merged, ours, rtol=1e-4, atol=1e-4)


def test_the_fingerprint_names_the_weights(tiny_lm: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_lm, copy)
    assert fingerprint(copy) == fingerprint(tiny_lm)
    other = tmp_path / "other"
    shutil.copytree(tiny_lm, other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert fingerprint(other) != fingerprint(tiny_lm)


def test_an_encoder_checkpoint_trains_as_a_text_classifier(tiny_encoder: Path) -> None:
    from fedq.models import LoraTextBundle

    bundle = build_model(
        f"hf:{tiny_encoder}", num_classes=3, seed=0, lora={"r": 2, "lora_alpha": 4}
    )
    assert isinstance(bundle, LoraTextBundle)
    names = sorted(bundle.trainable_state())
    assert names[-2:] == ["head.bias", "head.weight"]
    assert any("query" in n for n in names) and any("value" in n for n in names)
    logits = bundle.forward(bundle.tokenize(["a b c", "d"]))
    assert logits.shape == (2, 3)


def test_split_mode_cuts_a_local_llama_like_checkpoint(tiny_lm: Path) -> None:
    from fedq.split.models import build_split_model

    model = build_split_model(
        f"hf:{tiny_lm}", cut=1, num_classes=2, seed=0, lora={"r": 2, "use_dora": False}
    )
    assert (model.task, model.num_blocks, model.hidden) == ("causal_lm", 2, 32)
    batch = model.make_batch(["one two three", "four"], torch.zeros(2, dtype=torch.long))
    h = model.bottom(batch)
    loss, _, count = model.top(h, batch["attention_mask"], batch["labels"])
    assert torch.isfinite(loss) and count > 0
    assert model.full.peft_config["default"].r == 2


def test_split_mode_trains_on_the_response_tokens_of_instruction_records(tiny_lm: Path) -> None:
    """Split batches of records are federated mode's (labels token by token), and the cut model
    gives the federated model's loss on them: the same base, adapters that start as identity."""
    from fedq.data.datasets import InstructionDataset
    from fedq.split.models import build_split_model

    data = InstructionDataset([ALPACA, CHAT, TEXT], "three")
    split = build_split_model(f"hf:{tiny_lm}", cut=1, num_classes=1, seed=0, max_length=64)
    fed = _lm(tiny_lm)
    batch = split.batch(data, torch.tensor([2, 0, 1]))
    inputs, labels = fed.make_batch(data, torch.tensor([2, 0, 1]))
    assert torch.equal(batch["labels"], labels)
    assert torch.equal(batch["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        h = split.bottom(batch)
        loss, _, count = split.top(h, batch["attention_mask"], batch["labels"])
        want = fed.loss(inputs, labels)
    assert count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    encoder = build_split_model("tiny_bert_lora", cut=1, num_classes=2, seed=0, hidden=16)
    with pytest.raises(ConfigError, match="holds instruction/text records"):
        encoder.batch(data, torch.tensor([0]))


def test_split_mode_holds_a_packed_base_on_both_sides_of_the_cut(tiny_lm: Path) -> None:
    """``model.base_bits`` in split mode: the blocks of both halves are packed, and the cut model
    gives the federated packed model's loss (the same packed base, the same adapters)."""
    from fedq.data.datasets import InstructionDataset
    from fedq.models.lowbit import PackedLinear
    from fedq.split.models import build_split_model

    data = InstructionDataset([ALPACA, CHAT, TEXT], "three")
    packing = {"bits": 4, "group_size": 32, "budget_mb": None}
    split = build_split_model(
        f"hf:{tiny_lm}", cut=1, num_classes=1, seed=0, max_length=64, packing=packing
    )
    for half in (split.bottom, split.top):
        assert any(isinstance(m, PackedLinear) for m in half.modules())
    fed = build_model(
        f"hf:{tiny_lm}", num_classes=1, seed=0, max_length=64, base_bits=4, base_group_size=32
    )
    batch = split.batch(data, torch.tensor([2, 0, 1]))
    inputs, labels = fed.make_batch(data, torch.tensor([2, 0, 1]))
    with torch.no_grad():
        loss, _, _ = split.top(split.bottom(batch), batch["attention_mask"], batch["labels"])
        want = fed.loss(inputs, labels)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    # a model without a checkpoint (the random test LLaMA) is packed after it is made
    tiny = build_split_model(
        "tiny_llama_lora",
        cut=1,
        num_classes=1,
        seed=0,
        hidden=16,
        tiny_layers=2,
        packing={"bits": None, "group_size": 64, "budget_mb": 0.05},
    )
    assert any(isinstance(m, PackedLinear) for m in tiny.top.modules())
    trainable = [n for n, p in tiny.full.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_a_config_without_architectures_takes_its_task_from_the_model_type() -> None:
    """A config read from a GGUF file records no architectures: a decoder-only model type is a
    causal LM (the packaged SmolLM2 GGUF through ``hf:`` gives the fp32 copy's logits exactly,
    checked by hand), an encoder type a classifier."""
    from transformers import BertConfig, LlamaConfig, Qwen2Config

    from fedq.models.hf import default_task

    assert [default_task(c()) for c in (LlamaConfig, Qwen2Config, BertConfig)] == [
        "causal_lm",
        "causal_lm",
        "classification",
    ]
