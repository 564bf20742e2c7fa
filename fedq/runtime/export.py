"""A run's model in formats other tools load (``fedq export``, and ``adapter/`` in the run folder
at the end of a run).

The run folder's ``config.json`` rebuilds the model (same seed, same frozen base) and its
``checkpoint.pt`` holds the trained state (a federated run's global model; a split run's server
top with the averaged client bottom, the cut's quantizers left out); together they give:

- a causal LM: the adapter in PEFT's format (``adapter_config.json`` +
  ``adapter_model.safetensors`` + the tokenizer), loadable with
  ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)``; with
  ``merge``, the base with the adapter merged in, a plain transformers model directory;
- a LoRA text classifier: the encoder's adapter in PEFT's format (on ``AutoModel``) and the
  classification head as ``head.safetensors`` (``weight``, ``bias``; mean pooling over the
  attention mask, as fedq trains it), described in ``fedq_head.json``; with ``merge``, the merged
  encoder plus the same head files.

A model without adapters (``mlp``, ``cnn``) is refused with the reason: its weights are the
checkpoint's ``global_state``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fedq.errors import ConfigError

log = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"


def _run_model(run: Path, *, required: bool = True) -> tuple[Any, Any]:
    """(config, the run's final model) of the run folder ``run``: the mode rebuilds it from the
    config and the checkpoint's server state (:meth:`fedq.modes.base.Mode.trained_model`);
    None for the model when the mode cannot and ``required`` is false. A run on a packed base
    is rebuilt packed, as it trained; its merged model is made on the full-precision base
    (:meth:`fedq.models.hf.CausalLMBundle.merged`)."""
    from fedq.config import load_scenario
    from fedq.modes import get_mode
    from fedq.runtime.checkpoint import load_checkpoint

    if not (run / "config.json").is_file():
        raise ConfigError(f"{run}: not a run folder (no config.json)")
    cfg = load_scenario(run / "config.json")
    ckpt = load_checkpoint(run)
    workload = (ckpt.get("server") or {}).get("workload")
    bundle = None if workload is None else get_mode(cfg.mode).trained_model(cfg, workload)
    if bundle is None and required:
        raise ConfigError(
            f"{run}: no model to export: a {cfg.mode} run whose checkpoint does not hold the "
            "whole model, or a checkpoint from a fedq that did not record the model's shape"
        )
    return cfg, bundle


def has_adapter(bundle: Any) -> bool:
    from fedq.models.hf import CausalLMBundle
    from fedq.models.text import LoraTextBundle

    return isinstance(bundle, CausalLMBundle | LoraTextBundle)


def export_bundle(bundle: Any, out: Path, *, merge: bool = False, base: str = "") -> Path:
    """Write ``bundle``'s adapter (or merged model) to ``out`` (module docstring)."""
    from fedq.models.hf import CausalLMBundle
    from fedq.models.text import LoraTextBundle

    out.mkdir(parents=True, exist_ok=True)
    if isinstance(bundle, CausalLMBundle):
        if not merge:
            return bundle.save_adapter(out)
        bundle.merged().save_pretrained(str(out))
        bundle.tokenizer.save_pretrained(str(out))
        return out
    if isinstance(bundle, LoraTextBundle):
        from safetensors.torch import save_file

        encoder: Any = bundle.module.encoder  # a peft.PeftModel
        if merge:
            import copy

            copy.deepcopy(encoder).merge_and_unload().save_pretrained(str(out))
        else:
            if base:
                encoder.peft_config["default"].base_model_name_or_path = base
            encoder.save_pretrained(str(out), save_embedding_layers=False)
        bundle.tokenizer.save_pretrained(str(out))
        head = {k: v.detach().contiguous() for k, v in bundle.module.head.state_dict().items()}
        save_file(head, str(out / "head.safetensors"))
        (out / "fedq_head.json").write_text(
            json.dumps(
                {
                    "pooling": "mean over attention_mask",
                    "num_classes": bundle.num_classes,
                    "model": bundle.name,
                },
                indent=2,
            )
            + "\n"
        )
        return out
    raise ConfigError(
        f"model {bundle.name!r} has no adapter to export; its weights are the checkpoint's "
        "global_state (torch.load(run/'checkpoint.pt')['server']['global_state'])"
    )


def export_run(run: str | Path, out: str | Path, *, merge: bool = False) -> Path:
    """``fedq export RUN [--merge] --out DIR``: the run's final model in PEFT / transformers
    format (module docstring)."""
    run = Path(run)
    cfg, bundle = _run_model(run)
    return export_bundle(bundle, Path(out), merge=merge, base=_base_name(cfg))


def write_run_adapter(run: Path) -> Path | None:
    """At the end of a run of a LoRA model: ``run/adapter`` (module docstring).
    Returns None for a model without adapters or a run without a checkpoint."""
    if not (run / "checkpoint.pt").is_file():
        return None
    cfg, bundle = _run_model(run, required=False)
    if bundle is None or not has_adapter(bundle):
        return None
    return export_bundle(bundle, run / ADAPTER_DIR, base=_base_name(cfg))


def _base_name(cfg: Any) -> str:
    """What an adapter names as its base: the directory of an ``hf:`` model, else the name."""
    name = str(cfg.model.name)
    return name.removeprefix("hf:")


def quantize_base(
    model: str,
    out: str | Path,
    *,
    bits: int | None = None,
    budget_mb: float | None = None,
    group_size: int = 64,
) -> dict[str, Any]:
    """``fedq quantize-base``: the frozen base of causal LM ``model`` (a registered name, or
    ``hf:PATH``) packed at ``bits`` or within ``budget_mb`` MiB, written to ``out`` as a model
    directory (config, tokenizer, the packed weights) that ``model.name: hf:OUT`` loads packed
    on any site, without the full-precision checkpoint and without packing it again."""
    from collections import Counter

    from fedq.models import hf, model_entry
    from fedq.models.lowbit import PackedLinear, save_packed

    if (bits is None) == (budget_mb is None):
        raise ConfigError("fedq quantize-base: give --bits or --budget-mb (one of them)")
    if bits is not None and not 2 <= bits <= 8:
        raise ConfigError(f"--bits: must be in 2..8, got {bits}")
    if budget_mb is not None and not budget_mb > 0:
        raise ConfigError(f"--budget-mb: must be > 0, got {budget_mb}")
    entry = model_entry(model)
    if entry is None or entry.base is None or entry.task != hf.CAUSAL_LM:
        raise ConfigError(
            f"fedq quantize-base: {model!r} is not a causal LM with a Hugging Face base "
            "(hf:PATH, smollm2_instruct)"
        )
    source = entry.base()
    out = Path(out)
    if (out / "config.json").exists():
        raise ConfigError(f"{out}: holds a model already; choose an empty folder")
    module: Any = hf.packed_base(source, bits, group_size, budget_mb)
    info = save_packed(module, out, source_sha256=hf.fingerprint(source))
    module.config.save_pretrained(str(out))
    hf.tokenizer(source).save_pretrained(str(out))
    widths = Counter(m.bits for m in module.modules() if isinstance(m, PackedLinear))
    return {
        "out": str(out),
        "source": str(source),
        "source_sha256": info["source_sha256"],
        "sha256": hf.fingerprint(out),
        "packed_bytes": info["packed_bytes"],
        "layers": len(info["layers"]),
        "widths": dict(sorted(widths.items())),
    }
