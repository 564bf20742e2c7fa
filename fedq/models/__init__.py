"""Model builders behind one surface, :class:`ModelBundle`.

``build_model(name, num_classes=..., input_dim=..., seed=...)`` returns a bundle for ``mlp``,
``cnn``, ``minilm_lora`` or ``tiny_bert_lora``; the registry (:mod:`fedq.models.registry`) also
lists the causal LMs split mode cuts, with the modes each model serves. Importing this package
registers the builders but imports neither transformers nor peft; the text builders import them
when called.
"""

from fedq.models import small as _small  # noqa: F401  (registers mlp, cnn)
from fedq.models import sources as _sources  # noqa: F401  (registers hf:PATH, smollm2_instruct)
from fedq.models import text as _text  # noqa: F401  (registers minilm_lora, tiny_bert_lora)
from fedq.models.bundle import ModelBundle, StateMismatchError
from fedq.models.registry import (
    ModelEntry,
    add_model,
    build_model,
    check_model_name,
    model_entry,
    model_names,
    models_for,
    register_model,
    register_model_source,
    remove_model,
)
from fedq.models.text import LoraTextBundle, TextClassifier

__all__ = [
    "LoraTextBundle",
    "ModelBundle",
    "ModelEntry",
    "StateMismatchError",
    "TextClassifier",
    "add_model",
    "build_model",
    "check_model_name",
    "model_entry",
    "model_names",
    "models_for",
    "register_model",
    "register_model_source",
    "remove_model",
]
