"""fedq: collaborative fine-tuning with real low-bit compressed communication.

Importing fedq is cheap and side-effect free: heavy stacks (peft, opacus, transformers, triton, ray)
are imported lazily by the modules that need them.
"""

__version__ = "0.1.0"
