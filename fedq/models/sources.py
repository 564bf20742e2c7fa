"""Registry entries for Hugging Face checkpoints: ``hf:PATH`` (any local model directory) and
``smollm2_instruct`` (SmolLM2-135M-Instruct from its package, through the same path).

Resolving a name reads the checkpoint's config only (no weights), so a scenario is checked before
any host starts: a missing directory, an unreadable config or a task fedq cannot train is one
:class:`ConfigError` line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fedq.models import hf
from fedq.models.bundle import ModelBundle
from fedq.models.registry import ModelEntry, add_model, register_model_source

#: Architectures split mode can cut (LLaMA-like causal LMs: embeddings, decoder layers with
#: rotary embeddings, a final norm and an LM head).
LLAMA_LIKE = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo", "granite"})


def hf_builder(where: Callable[[], str], name: str) -> Any:
    """The whole-model builder of the checkpoint at ``where()`` (both tasks; the path is asked
    for only when a model is built, as the packaged SmolLM2 makes its directory then)."""

    def build(
        *,
        num_classes: int,
        input_dim: int | None,
        seed: int,
        lora_r: int = 8,
        max_length: int = 64,
        lora: Mapping[str, Any] | None = None,
        task: str = "auto",
        base_bits: int | None = None,
        base_group_size: int = 64,
        base_budget_mb: float | None = None,
        gradient_checkpointing: bool = False,
        base_lowrank_init: bool = False,
    ) -> ModelBundle:
        path = where()
        resolved = hf.resolve_task(hf.model_config(path), task)
        if resolved == hf.CAUSAL_LM:
            return hf.build_causal_lm(
                path,
                name=name,
                seed=seed,
                lora=lora,
                lora_r=lora_r,
                max_length=max_length,
                base_bits=base_bits,
                base_group_size=base_group_size,
                base_budget_mb=base_budget_mb,
                gradient_checkpointing=gradient_checkpointing,
                base_lowrank_init=base_lowrank_init,
            )
        from fedq.models.text import lora_text_bundle

        module = hf.base_model(path, hf.CLASSIFICATION)
        return lora_text_bundle(
            module,
            hf.tokenizer(path),
            name=name,
            num_classes=num_classes,
            lora=lora,
            lora_r=lora_r,
            lora_alpha=16,
            max_length=max_length,
            target_modules=None,
        )

    return build


def hf_entry(name: str, path: str) -> ModelEntry:
    config = hf.model_config(path)
    model_type = getattr(config, "model_type", None)
    modes: tuple[str, ...] = ("federated",)
    family = None
    if hf.default_task(config) == hf.CAUSAL_LM and model_type in LLAMA_LIKE:
        family, modes = "llama", ("federated", "split")
    task = hf.default_task(config)
    return ModelEntry(
        name, modes, hf_builder(lambda: path, name), hf.width_of(config), family, task, lambda: path
    )


def _resolve_hf(name: str, arg: str) -> ModelEntry:
    return hf_entry(name, arg)


register_model_source("hf", _resolve_hf, ("federated", "split"))


def smollm2_instruct_path() -> str:
    """The fp32 copy of the packaged SmolLM2-135M-Instruct (made once per machine)."""
    from fedq.models.packaged import smollm2_fp32_cache

    return str(smollm2_fp32_cache())


add_model(
    ModelEntry(
        "smollm2_instruct",
        ("federated", "split"),
        hf_builder(smollm2_instruct_path, "smollm2_instruct"),
        576,
        "llama",
        "causal_lm",
        smollm2_instruct_path,
    )
)


def base_fingerprint(name: str) -> str | None:
    """SHA-256 of the frozen base of model ``name`` (:func:`fedq.models.hf.fingerprint`), or
    None for a model without a Hugging Face base."""
    from fedq.models.registry import model_entry

    entry = model_entry(name)
    if entry is None or entry.base is None:
        return None
    return hf.fingerprint(entry.base())
