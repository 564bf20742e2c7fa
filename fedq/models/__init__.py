"""Model builders behind one surface, :class:`ModelBundle`.

``build_model(name, num_classes=..., input_dim=..., seed=...)`` returns a bundle for ``mlp``,
``cnn``, ``minilm_lora`` or ``tiny_bert_lora``. Importing this package registers the builders but
imports neither transformers nor peft; the text builders import them when called.
"""

from fedq.models import small as _small  # noqa: F401  (registers mlp, cnn)
from fedq.models import text as _text  # noqa: F401  (registers minilm_lora, tiny_bert_lora)
from fedq.models.bundle import ModelBundle, StateMismatchError
from fedq.models.registry import build_model, model_names, register_model
from fedq.models.text import LoraTextBundle, TextClassifier

__all__ = [
    "LoraTextBundle",
    "ModelBundle",
    "StateMismatchError",
    "TextClassifier",
    "build_model",
    "model_names",
    "register_model",
]
