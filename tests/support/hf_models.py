"""Tiny Hugging Face checkpoints saved with ``save_pretrained`` (no download): a 2-layer random
LLaMA causal LM and a 2-layer random BERT encoder, both with MiniLM's tokenizer (which ships
with fedq's text extra). The causal LM's tokenizer gets a small chat template, so chat records
render through ``apply_chat_template`` as with a real instruct model."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def save_tiny_causal_lm(out: Path, *, chat: bool = True, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedq.models.encoders import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.eos_token, tok.bos_token = tok.sep_token, tok.cls_token
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def save_tiny_encoder(out: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedq.models.encoders import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
