"""Any local Hugging Face checkpoint as a fedq model: ``model.name: hf:PATH``.

``PATH`` is a directory that ``transformers`` loads offline (``config.json``, safetensors or
``.bin`` weights, tokenizer files), or a ``.gguf`` file (or a directory holding one ``.gguf`` and
no ``config.json``) that transformers dequantizes to fp32. The task is the model's own: a
``...ForCausalLM`` architecture fine-tunes as a causal LM, anything else as a sequence classifier
(the encoder + mean pooling + linear head of :mod:`fedq.models.text`); ``model.task`` overrides it.

LoRA comes from PEFT with the scenario's ``model.lora`` options under PEFT's own names (``r``,
``lora_alpha``, ``lora_dropout``, ``target_modules``, ``use_dora``, ``modules_to_save``,
``bias``); :func:`lora_config` is the one place every model (the packaged ones too) gets its
``LoraConfig``. Target modules default to PEFT's table for the architecture; an architecture PEFT
has no default for needs ``model.lora.target_modules``, and the error lists its linear layers.

Every party loads the frozen base itself; what travels is PEFT's adapter state (plus any
``modules_to_save``), compressed like any other update. :func:`fingerprint` names the base by the
SHA-256 of its config and weight files, so a site whose base differs is refused before a round.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedq.data.datasets import AnyDataset
from fedq.errors import ConfigError
from fedq.models.bundle import Inputs, ModelBundle, StateMismatchError, check_state

PREFIX = "hf:"
CAUSAL_LM, CLASSIFICATION = "causal_lm", "classification"
TASKS = (CAUSAL_LM, CLASSIFICATION)
#: Files that make up a base model's identity (:func:`fingerprint`).
_WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
#: Prompt layout for instruction records when the tokenizer has no chat template (Alpaca's).
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


# ------------------------------------------------------------------------ locating a checkpoint


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where a Hugging Face model lives: ``root`` (what ``from_pretrained`` gets) and, for a GGUF
    file, its name inside ``root``."""

    root: Path
    gguf: str | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf} if self.gguf else {}

    def __str__(self) -> str:
        return str(self.root / self.gguf) if self.gguf else str(self.root)


def locate(path: str | Path) -> Checkpoint:
    """The checkpoint at ``path``, or a ConfigError saying what is missing."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return Checkpoint(p.parent.resolve(), p.name)
    if not p.is_dir():
        raise ConfigError(f"model {PREFIX}{path}: no such directory (or .gguf file)")
    p = p.resolve()
    if (p / "config.json").is_file():
        return Checkpoint(p)
    ggufs = sorted(q.name for q in p.glob("*.gguf"))
    if len(ggufs) == 1:
        return Checkpoint(p, ggufs[0])
    raise ConfigError(
        f"model {PREFIX}{path}: not a Hugging Face model directory (no config.json"
        + (f"; {len(ggufs)} .gguf files, name one" if ggufs else "")
        + "); save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
    )


@functools.lru_cache(maxsize=8)
def _config(ckpt: Checkpoint) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(ckpt.root), local_files_only=True, **ckpt.kwargs)
    except (ValueError, OSError, KeyError) as e:
        why = f"model {PREFIX}{ckpt}: transformers cannot read its config ({e})"
        raise ConfigError(why) from None


def model_config(path: str | Path) -> Any:
    """The transformers config of the checkpoint at ``path`` (reads no weights)."""
    return _config(locate(path))


def default_task(config: Any) -> str:
    """The task a checkpoint was made for: causal LM for a ``...ForCausalLM`` architecture."""
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        return (
            CAUSAL_LM
            if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
            else (CLASSIFICATION)
        )
    # no architectures recorded (a config read from a GGUF file): a decoder-only model type,
    # one transformers has a causal-LM class for and no masked-LM class
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    if getattr(config, "is_decoder", False) or (
        kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    ):
        return CAUSAL_LM
    return CLASSIFICATION


def resolve_task(config: Any, task: str) -> str:
    if task in ("", "auto"):
        return default_task(config)
    if task not in TASKS:
        raise ConfigError(f"model.task: one of auto, {', '.join(TASKS)}; got {task!r}")
    return task


def width_of(config: Any) -> int | None:
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        v = getattr(config, key, None)
        if isinstance(v, int):
            return v
    return None


@functools.lru_cache(maxsize=8)
def _fingerprint(ckpt: Checkpoint) -> str:
    files = [ckpt.root / ckpt.gguf] if ckpt.gguf else []
    if not ckpt.gguf:
        files = [ckpt.root / "config.json"]
        files += sorted(f for f in ckpt.root.iterdir() if f.suffix in _WEIGHTS and f.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def fingerprint(path: str | Path) -> str:
    """SHA-256 over the checkpoint's config and weight files (names and bytes, in name order):
    two sites with equal fingerprints train the same frozen base."""
    return _fingerprint(locate(path))


# ------------------------------------------------------------------------ LoRA settings


def lora_config(
    options: Mapping[str, Any] | None,
    *,
    r: int,
    lora_alpha: int,
    target_modules: Sequence[str] | None = None,
    model_type: str | None = None,
    module: nn.Module | None = None,
    task_type: str | None = None,
) -> Any:
    """PEFT's ``LoraConfig`` from a scenario's ``model.lora`` (PEFT's option names; None values
    keep the caller's defaults ``r``, ``lora_alpha``, ``target_modules``). Without target
    modules, PEFT's default for ``model_type``; an architecture PEFT has no default for is a
    ConfigError listing the linear layers of ``module`` to choose from."""
    from peft import LoraConfig
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    opts = {k: v for k, v in dict(options or {}).items() if v is not None}
    opts.setdefault("r", r)
    opts.setdefault("lora_alpha", lora_alpha)
    opts.setdefault("lora_dropout", 0.0)
    targets = opts.get("target_modules") or target_modules
    if not targets:
        if model_type not in DEFAULTS:
            linear = sorted(
                {
                    n.rsplit(".", 1)[-1]
                    for n, m in (module or nn.Module()).named_modules()
                    if isinstance(m, nn.Linear)
                }
            )
            raise ConfigError(
                f"model.lora.target_modules: PEFT has no default LoRA targets for model type "
                f"{model_type!r}; name the linear layers to adapt (this model has: "
                f"{', '.join(linear[:20]) or 'none'})"
            )
        targets = DEFAULTS[model_type]
    opts["target_modules"] = list(targets)
    if opts.get("modules_to_save") is not None:
        opts["modules_to_save"] = list(opts["modules_to_save"])
    if task_type:
        opts["task_type"] = task_type
    try:
        return LoraConfig(**opts)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.lora: PEFT refuses these options ({e})") from None


def attach_lora(module: nn.Module, config: Any, where: str) -> Any:
    """``get_peft_model`` with an error that names the modules when none of them matched."""
    from peft import get_peft_model

    try:
        return get_peft_model(module, config)
    except ValueError as e:
        raise ConfigError(f"model.lora.target_modules ({where}): {e}") from None


# ------------------------------------------------------------------------ loading the base


def _base(ckpt: Checkpoint, task: str) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if task == CAUSAL_LM else AutoModel
    try:
        model = cls.from_pretrained(
            str(ckpt.root), local_files_only=True, dtype=torch.float32, **ckpt.kwargs
        )
    except (ValueError, OSError, KeyError) as e:
        arch = getattr(_config(ckpt), "model_type", "?")
        raise ConfigError(
            f"model {PREFIX}{ckpt}: transformers cannot load it as a {task} model "
            f"(model type {arch!r}): {e}"
        ) from None
    if getattr(model.config, "quantization_config", None) is not None and ckpt.gguf:
        del model.config.quantization_config  # dequantized to fp32 on load
    return model.eval()


@functools.lru_cache(maxsize=4)
def _tokenizer(ckpt: Checkpoint) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(ckpt.root), local_files_only=True, **ckpt.kwargs)
    except (ValueError, OSError, KeyError) as e:
        why = f"model {PREFIX}{ckpt}: no tokenizer transformers can load ({e})"
        raise ConfigError(why) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"model {PREFIX}{ckpt}: the tokenizer has neither pad nor eos token")
        tok.pad_token = tok.eos_token
    return tok


def base_model(path: str | Path, task: str) -> nn.Module:
    """The frozen base at ``path``, loaded from disk. Not cached: a process builds its model
    once (a worker's clients share it), and a cached pristine copy would hold a second set of
    base weights for the whole run (for SmolLM2-135M, 0.5 GiB per process)."""
    return _base(locate(path), task)


def frozen_causal_lm(
    path: str | Path,
    bits: int | None = None,
    group_size: int = 64,
    budget_mb: float | None = None,
) -> nn.Module:
    """The frozen base of a causal LM at ``path``: in full precision, packed as asked
    (:func:`packed_base`), or, for a directory ``fedq quantize-base`` wrote, packed as it was
    made (then ``bits`` and ``budget_mb`` must be unset: its widths are its own)."""
    from fedq.models.lowbit import is_packed_checkpoint, load_packed_checkpoint

    ckpt = locate(path)
    if ckpt.gguf is None and is_packed_checkpoint(ckpt.root):
        if bits is not None or budget_mb is not None:
            raise ConfigError(
                f"model {PREFIX}{ckpt}: a base packed by fedq quantize-base; leave "
                "model.base_bits and model.base_budget_mb unset (its widths are its own)"
            )
        return load_packed_checkpoint(ckpt.root, _config(ckpt))
    if bits is None and budget_mb is None:
        return _base(ckpt, CAUSAL_LM)
    return packed_base(path, bits, group_size, budget_mb)


#: Generator seed of the instruction records a memory budget is calibrated on (not the seed of
#: the packaged ``instructions`` data set's records, 1234).
CALIBRATION_SEED = 20261207
CALIBRATION_RECORDS = 32


def calibration_moments(path: str | Path) -> dict[str, torch.Tensor]:
    """Each packed layer's input second moments (:func:`fedq.models.lowbit.input_moments`) for
    the causal LM at ``path``, over :data:`CALIBRATION_RECORDS` generated instruction records,
    with the base packed at 8 bits (close to full precision, a quarter of its memory). The same
    on every site: the records come from a fixed seed."""
    from fedq.data.instruct import instruction_records
    from fedq.models.lowbit import input_moments, release_freed_memory

    model = packed_base(path, 8)
    tok = tokenizer(path)
    records = instruction_records(CALIBRATION_RECORDS, CALIBRATION_SEED)
    batches = []
    for start in range(0, len(records), 8):
        inputs, _ = encode_records(tok, records[start : start + 8], 64)
        batches.append(inputs)
    try:
        return input_moments(model, batches)
    finally:
        del model
        release_freed_memory()


def packed_base(
    path: str | Path, bits: int | None, group_size: int = 64, budget_mb: float | None = None
) -> nn.Module:
    """The causal LM at ``path`` with its frozen linear layers packed to ``bits``, or within
    ``budget_mb`` MiB (:mod:`fedq.models.lowbit`; a budget's errors weighted by the layers'
    input moments, :func:`calibration_moments`): read packed tensor by tensor from a
    safetensors checkpoint, or, for other checkpoints, loaded whole and then packed."""
    from fedq.models.lowbit import load_packed_causal_lm, quantize_base

    ckpt = locate(path)
    budget = None if budget_mb is None else budget_mb * 2**20
    moments = None if budget is None else calibration_moments(path)
    if ckpt.gguf is None:
        model = load_packed_causal_lm(
            ckpt.root, _config(ckpt), bits, group_size, budget, moments=moments
        )
        if model is not None:
            return model
    model = _base(ckpt, CAUSAL_LM).requires_grad_(False)
    quantize_base(model, bits, group_size, budget, moments=moments)
    return model


def import_libraries() -> None:
    """Import transformers' model code and PEFT now (for a measurement whose baseline should
    hold them whatever the model)."""
    import peft  # noqa: F401
    import transformers.modeling_utils  # noqa: F401


def tokenizer(path: str | Path) -> Any:
    return _tokenizer(locate(path))


# ------------------------------------------------------------------------ causal-LM bundle


def render(tok: Any, record: Any) -> tuple[str, str, bool]:
    """``(prompt, response, prompt_has_special_tokens)`` of an instruction record: a chat
    template when the tokenizer has one, else Alpaca's prompt layout; plain text has no prompt."""
    if record.kind == "text":
        return "", record.response, False
    if record.kind == "alpaca":
        user = record.instruction + (f"\n\n{record.input}" if record.input else "")
        turns: list[tuple[str, str]] = [("user", user)]
    else:
        turns = list(record.messages)
    if getattr(tok, "chat_template", None):
        msgs = [{"role": r, "content": c} for r, c in turns]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return str(prompt), record.response, True
    if record.kind == "alpaca":
        layout = ALPACA_PROMPT_INPUT if record.input else ALPACA_PROMPT
        return (
            layout.format(instruction=record.instruction, input=record.input),
            record.response,
            False,
        )
    text = "".join(f"{r}: {c}\n" for r, c in turns) + "assistant: "
    return text, record.response, False


def encode_records(
    tok: Any, records: Sequence[Any], max_length: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Token ids, attention mask and labels of ``records``: prompt then response then EOS,
    truncated to ``max_length`` tokens from the right (no packing: one record per row, padded
    to the batch's longest). Labels are the token ids on the response (every token of a plain
    text record) and -100 on the prompt and the padding, so the loss is on the response only."""
    rows: list[list[int]] = []
    labels: list[list[int]] = []
    eos = tok.eos_token_id
    for rec in records:
        prompt, response, templated = render(tok, rec)
        p_ids = tok(prompt, add_special_tokens=not templated)["input_ids"] if prompt else []
        if not prompt and rec.kind == "text":
            r_ids = tok(response, add_special_tokens=True)["input_ids"]
        else:
            r_ids = tok(response, add_special_tokens=False)["input_ids"]
        if eos is not None:
            r_ids = [*r_ids, eos]
        ids = (list(p_ids) + list(r_ids))[:max_length]
        lab = ([-100] * len(p_ids) + list(r_ids))[:max_length]
        rows.append(ids)
        labels.append(lab)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1
        target[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask}, target


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed next-token cross-entropy over labelled positions, their count)."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])
    target = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(pred.float(), target, ignore_index=-100, reduction="sum")
    return total, int((target != -100).sum())


@torch.no_grad()
def generate(
    module: Any, tok: Any, prompts: Sequence[Any], max_new_tokens: int, device: torch.device
) -> list[str]:
    """Greedy continuations by ``module`` (a causal LM with ``generate``) of instruction
    records' prompts, rendered as for training; the module's train/eval mode is kept."""
    out = []
    was = module.training
    module.eval()
    try:
        for rec in prompts:
            prompt, _, templated = render(tok, rec)
            enc = tok(prompt, add_special_tokens=not templated, return_tensors="pt")
            enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
            ids = module.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
            out.append(tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    finally:
        module.train(was)
    return out


class CausalLMBundle(ModelBundle):
    """A PEFT-wrapped causal LM: the adapters (and ``modules_to_save``) train and travel;
    batches are instruction records (:class:`fedq.data.instruct.InstructionDataset`)."""

    task = CAUSAL_LM
    module: Any  # a peft.PeftModel

    def __init__(
        self, module: nn.Module, tok: Any, *, name: str, max_length: int, base: str
    ) -> None:
        super().__init__(module, name=name, num_classes=1)
        self.tokenizer = tok
        self.max_length = max_length
        self.base = base  # what PeftModel.from_pretrained(base, adapter) loads the base from
        #: each LoRA layer's starting (A, B) when it started from a packing residual
        self.lowrank_start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.module, save_embedding_layers=False)
        return {k: v.detach().clone() for k, v in state.items()}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        check_state(self.trainable_state(), state, self.name)
        result = set_peft_model_state_dict(self.module, dict(state))
        unexpected = sorted(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise StateMismatchError(f"PEFT did not place {unexpected[:5]}")

    def make_batch(self, dataset: AnyDataset, idx: torch.Tensor) -> tuple[Inputs, torch.Tensor]:
        records = getattr(dataset, "records", None)
        if records is None:
            raise ConfigError(
                f"model {self.name!r} is a causal LM: it needs instruction or text data "
                f"(jsonl:PATH, instructions), not {dataset.name!r}"
            )
        return encode_records(
            self.tokenizer, [records[int(i)] for i in idx.tolist()], self.max_length
        )

    def forward(self, inputs: Inputs) -> torch.Tensor:
        assert isinstance(inputs, dict)
        return self.module(**inputs).logits

    __call__ = forward

    def loss(self, inputs: Inputs, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the batch's response tokens."""
        total, count = self.token_losses(inputs, labels)
        return total / max(count, 1)

    def token_losses(self, inputs: Inputs, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """:func:`token_losses` of the model's logits, with the LM head run only at the positions
        that predict a labelled token where the model can (transformers' ``logits_to_keep`` as a
        boolean mask): the logits of a batch are [labelled tokens, vocabulary], not [batch,
        length, vocabulary] (for SmolLM2's 49,152-word vocabulary, most of a step's memory)."""
        assert isinstance(inputs, dict)
        target = labels[:, 1:]
        labelled = target != -100
        if self._keeps_logits:
            keep = F.pad(labelled, (0, 1))  # position t predicts token t + 1
            logits = self.module(**inputs, logits_to_keep=keep).logits
            count = int(labelled.sum())
            if logits.dim() == 2 and logits.shape[0] == count:
                total = F.cross_entropy(logits.float(), target[labelled], reduction="sum")
                return total, count
            self._keeps_logits = False  # this model keeps positions another way
        return token_losses(self.forward(inputs), labels)

    @functools.cached_property
    def _keeps_logits(self) -> bool:
        import inspect

        base = self.module.get_base_model()
        return "logits_to_keep" in inspect.signature(base.forward).parameters

    def generate(self, prompts: Sequence[Any], max_new_tokens: int = 32) -> list[str]:
        """Greedy continuations of instruction records' prompts (for the run's sample file)."""
        return generate(self.module, self.tokenizer, prompts, max_new_tokens, self.device)

    def save_adapter(self, out: str | Path) -> Path:
        """The adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``,
        loadable with ``PeftModel.from_pretrained(base, out)``) and the tokenizer. An adapter
        that started from a packing residual (``model.base_lowrank_init``) is written for the
        full-precision base: at rank 2r, ``[B, -B0] [A; A0]`` at the same scale, so the base gets
        exactly what training added, ``scaling * (B A - B0 A0)``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        config = self.module.peft_config["default"]
        config.base_model_name_or_path = self.base
        if not self.lowrank_start:
            self.module.save_pretrained(str(out), save_embedding_layers=False)
        else:
            from peft import get_peft_model_state_dict
            from safetensors.torch import save_file

            state = get_peft_model_state_dict(self.module, save_embedding_layers=False)
            for key in list(state):
                owner, _, part = key.removeprefix("base_model.model.").partition(".lora_")
                if owner not in self.lowrank_start:
                    continue
                a0, b0 = self.lowrank_start[owner]
                if part.startswith("A."):
                    state[key] = torch.cat([state[key], a0], dim=0)
                elif part.startswith("B."):
                    state[key] = torch.cat([state[key], -b0], dim=1)
            doubled = copy.deepcopy(config)
            doubled.r, doubled.lora_alpha = 2 * config.r, 2 * config.lora_alpha
            doubled.save_pretrained(str(out))
            state = {k: v.detach().contiguous() for k, v in state.items()}
            save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(str(out))
        return out

    def merged(self) -> Any:
        """A full-precision copy of the base with the adapters merged in (a plain transformers
        model). A packed base's adapter is merged into the full-precision checkpoint it was
        packed from (through :meth:`save_adapter` and PEFT); a base that is packed as made
        (``fedq quantize-base``) has no full-precision weights to merge into: a ConfigError."""
        from fedq.models.lowbit import PackedLinear, is_packed_checkpoint

        if not any(isinstance(m, PackedLinear) for m in self.module.modules()):
            return copy.deepcopy(self.module).merge_and_unload()
        ckpt = locate(self.base)
        if ckpt.gguf is None and is_packed_checkpoint(ckpt.root):
            raise ConfigError(
                f"--merge needs the full-precision base; {self.base} is a packed one (fedq "
                "quantize-base): export the adapter and merge it into the checkpoint the base "
                "was made from"
            )
        import tempfile

        from peft import PeftModel

        with tempfile.TemporaryDirectory(prefix="fedq-merge-") as tmp:
            self.save_adapter(tmp)
            full = PeftModel.from_pretrained(_base(ckpt, CAUSAL_LM), tmp)
            return full.merge_and_unload()


def build_causal_lm(
    path: str | Path,
    *,
    name: str,
    seed: int,
    lora: Mapping[str, Any] | None,
    lora_r: int,
    max_length: int,
    base_bits: int | None = None,
    base_group_size: int = 64,
    base_budget_mb: float | None = None,
    gradient_checkpointing: bool = False,
    base_lowrank_init: bool = False,
) -> CausalLMBundle:
    """The causal LM at ``path`` with LoRA (PEFT defaults: alpha 2r, the architecture's targets);
    with ``base_bits`` (or ``base_budget_mb``, or a base packed by ``fedq quantize-base``) its
    frozen linear weights held packed (:func:`frozen_causal_lm`), LoRA on top."""
    from fedq.models.lowbit import PackedLinear

    module = frozen_causal_lm(path, base_bits, base_group_size, base_budget_mb)
    packed = any(isinstance(m, PackedLinear) for m in module.modules())
    cfg = lora_config(
        lora,
        r=lora_r,
        lora_alpha=2 * int((lora or {}).get("r") or lora_r),
        model_type=getattr(module.config, "model_type", None),
        module=module,
        task_type="CAUSAL_LM",
    )
    if packed:
        from fedq.models.lowbit import lora_on_packed

        cfg = lora_on_packed(cfg)
    if base_lowrank_init and (cfg.use_dora or cfg.use_rslora):
        raise ConfigError(
            "model.base_lowrank_init: not with DoRA or rsLoRA (its exported adapter doubles "
            "the rank at the same scale, which those change)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = attach_lora(module, cfg, name)
    start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if base_lowrank_init:
        start = _lowrank_start(peft_model, path)
    if gradient_checkpointing:
        # non-reentrant: the recomputed layer's LoRA weights get their gradients although the
        # layer's input (the frozen embeddings' output) needs none
        peft_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    peft_model.train()
    bundle = CausalLMBundle(
        peft_model, tokenizer(path), name=name, max_length=max_length, base=str(locate(path))
    )
    bundle.lowrank_start = start
    return bundle


def _lowrank_start(model: Any, path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`fedq.models.lowbit.lowrank_init` with the full-precision weights of the checkpoint
    at ``path`` (read one at a time; a checkpoint that is not safetensors is loaded whole)."""
    from fedq.models.lowbit import checkpoint_tensors, is_packed_checkpoint, lowrank_init

    ckpt = locate(path)
    if ckpt.gguf is None and is_packed_checkpoint(ckpt.root):
        raise ConfigError(
            "model.base_lowrank_init: needs the full-precision checkpoint; "
            f"{ckpt} is a base packed by fedq quantize-base"
        )
    where, read = checkpoint_tensors(ckpt.root) if ckpt.gguf is None else ({}, None)
    if not where or read is None:
        state = _base(ckpt, CAUSAL_LM).state_dict()
        read = state.__getitem__
    try:
        return lowrank_init(model, read)
    except KeyError as e:
        raise ConfigError(
            f"model.base_lowrank_init: {ckpt} has no tensor {e} (names transformers renames)"
        ) from None
