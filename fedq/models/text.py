"""Text classifiers: a frozen encoder with LoRA adapters (PEFT), mean pooling and a linear head.

Only the adapters and the head train and travel (``get_peft_model_state_dict``), which is what makes
federated fine-tuning of a 22.7M-parameter encoder cheap on the wire: LoRA r=8 on query/value of
MiniLM-L6 is ~74k numbers (Hu et al. 2021, arXiv:2106.09685). The head lives outside the PEFT model,
so its tensors have plain names (``head.weight``) and Opacus sees a plain ``nn.Linear``.

``minilm_lora`` uses the real pretrained all-MiniLM-L6-v2; ``tiny_bert_lora`` runs the same code on
a 2-layer, 32-wide random BERT for fast tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedq.data.datasets import AnyDataset, ArrayDataset, TextDataset
from fedq.errors import ConfigError
from fedq.models.bundle import Inputs, ModelBundle, StateMismatchError, check_state
from fedq.models.encoders import load_tokenizer, minilm_path, pretrained_encoder, tiny_encoder
from fedq.models.registry import ModelEntry, add_model, register_model

ENCODER_PREFIX = "encoder."
HEAD_PREFIX = "head."


class TextClassifier(nn.Module):
    """encoder -> masked mean over tokens (as sentence-transformers pools MiniLM) -> linear head."""

    def __init__(self, encoder: nn.Module, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_classes)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw)
        mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


class LoraTextBundle(ModelBundle):
    """A :class:`TextClassifier` whose encoder is a ``PeftModel``; adapters + head travel."""

    module: TextClassifier

    def __init__(
        self,
        module: TextClassifier,
        tokenizer: Any,
        *,
        name: str,
        num_classes: int,
        max_length: int,
    ) -> None:
        super().__init__(module, name=name, num_classes=num_classes)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """LoRA tensors (names as PEFT saves them, prefixed ``encoder.``) and the head."""
        from peft import get_peft_model_state_dict

        enc = get_peft_model_state_dict(self.module.encoder, save_embedding_layers=False)
        state = {ENCODER_PREFIX + k: v.detach().clone() for k, v in enc.items()}
        for k, v in self.module.head.state_dict().items():
            state[HEAD_PREFIX + k] = v.detach().clone()
        return state

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """All-or-nothing load through ``set_peft_model_state_dict`` plus the head."""
        from peft import set_peft_model_state_dict

        check_state(self.trainable_state(), state, self.name)
        enc = {
            k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)
        }
        head = {k[len(HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
        result = set_peft_model_state_dict(self.module.encoder, enc)
        unexpected = sorted(getattr(result, "unexpected_keys", []))
        if unexpected:  # unreachable after check_state unless PEFT renames keys
            raise StateMismatchError(f"PEFT did not place {unexpected[:5]}")
        self.module.head.load_state_dict(head)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")
        }

    def _ids_to_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = ids.long()[:, : self.max_length]
        pad = self.tokenizer.pad_token_id or 0
        return {"input_ids": ids, "attention_mask": (ids != pad).long()}

    def collate(self, batch: Sequence[tuple[Any, torch.Tensor]]) -> tuple[Inputs, torch.Tensor]:
        """Examples of raw text (tokenized here) or token-id rows -> ``(inputs dict, labels)``."""
        xs = [x for x, _ in batch]
        ys = torch.stack([torch.as_tensor(y) for _, y in batch]).long()
        if all(isinstance(x, str) for x in xs):
            return self.tokenize(xs), ys
        return self._ids_to_inputs(torch.stack([torch.as_tensor(x) for x in xs])), ys

    def make_batch(self, dataset: AnyDataset, idx: torch.Tensor) -> tuple[Inputs, torch.Tensor]:
        """Tokenize ``dataset[idx]`` (padding to the longest, truncating at ``max_length``)."""
        if isinstance(dataset, TextDataset):
            return self.tokenize([dataset.texts[int(i)] for i in idx.tolist()]), dataset.y[idx]
        if isinstance(dataset, ArrayDataset):
            return self._ids_to_inputs(dataset.x[idx]), dataset.y[idx]
        raise ConfigError(
            f"model {self.name!r} is a text classifier; data set {dataset.name!r} holds "
            "instruction records for a causal LM"
        )


def lora_text_bundle(
    encoder: nn.Module,
    tokenizer: Any,
    *,
    name: str,
    num_classes: int,
    lora: Mapping[str, Any] | None,
    lora_r: int,
    lora_alpha: int,
    max_length: int,
    target_modules: Sequence[str] | None = ("query", "value"),
) -> LoraTextBundle:
    """``encoder`` with LoRA (:func:`fedq.models.hf.lora_config`: the scenario's ``model.lora``
    over these defaults; ``target_modules`` None takes PEFT's default for the architecture),
    mean pooling and a linear head."""
    from fedq.models.hf import attach_lora, lora_config

    config = lora_config(
        lora,
        r=lora_r,
        lora_alpha=lora_alpha,
        target_modules=target_modules,
        model_type=getattr(encoder.config, "model_type", None),
        module=encoder,
    )
    config_hf: Any = encoder.config
    hidden = int(config_hf.hidden_size)
    peft_encoder = attach_lora(encoder, config, name)
    module = TextClassifier(peft_encoder, hidden, num_classes)
    module.train()  # from_pretrained returns eval mode; Opacus and dropout need train mode
    return LoraTextBundle(
        module, tokenizer, name=name, num_classes=num_classes, max_length=max_length
    )


@register_model("minilm_lora", modes=("federated", "split"), width=384, family="bert")
def build_minilm_lora(
    *,
    num_classes: int,
    input_dim: int | None,
    seed: int,
    lora_r: int = 8,
    lora_alpha: int = 16,
    max_length: int = 64,
    lora: Mapping[str, Any] | None = None,
) -> LoraTextBundle:
    """Pretrained all-MiniLM-L6-v2 (22.7M, frozen) + LoRA on query/value + a linear head."""
    path = minilm_path()
    return lora_text_bundle(
        pretrained_encoder(path),
        load_tokenizer(path),
        name="minilm_lora",
        num_classes=num_classes,
        lora=lora,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        max_length=max_length,
    )


@register_model("tiny_bert_lora", modes=("federated", "split"), family="bert")
def build_tiny_bert_lora(
    *,
    num_classes: int,
    input_dim: int | None,
    seed: int,
    lora_r: int = 8,
    lora_alpha: int = 16,
    max_length: int = 64,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    base_seed: int = 0,
    lora: Mapping[str, Any] | None = None,
) -> LoraTextBundle:
    """The ``minilm_lora`` code path on a tiny random BERT with MiniLM's tokenizer (tests)."""
    tokenizer = load_tokenizer(minilm_path())
    encoder = tiny_encoder(
        len(tokenizer), hidden=width, layers=layers, heads=heads, base_seed=base_seed
    )
    return lora_text_bundle(
        encoder,
        tokenizer,
        name="tiny_bert_lora",
        num_classes=num_classes,
        lora=lora,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        max_length=max_length,
    )


# The causal LMs split mode cuts (built by fedq.split.models from their own checkpoints).
add_model(ModelEntry("smollm2_lora", ("split",), width=576, family="llama", task="causal_lm"))
add_model(ModelEntry("tiny_llama_lora", ("split",), family="llama", task="causal_lm"))
