"""agml: activation-guided masked LoRA unlearning for Hugging Face language models.

The public functions (docs/architecture.md, "Public contract") are importable from here; they load lazily so
that `agml --help` and the CLI's input checks stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "load_model": "agml.models",
    "score_neurons": "agml.scoring",
    "NeuronScores": "agml.scoring",
    "build_masks": "agml.masks",
    "NeuronMasks": "agml.masks",
    "apply_masked_lora": "agml.adapters",
    "apply_lora": "agml.adapters",
    "load_adapter": "agml.adapters",
    "save_adapter": "agml.adapters",
    "export_baked": "agml.adapters",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'agml' has no attribute {name!r}")
