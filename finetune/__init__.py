"""finetune: fine-tune FLUX.1 with LoRA, locally or on Replicate, and compare the versions you get.

The Python API mirrors the CLI: ``prepare``, ``train``, ``evaluate``. Importing this package is cheap; torch and
diffusers load when a function that needs them runs.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "prepare": ("finetune.recipes.prepare", "prepare"),
    "train": ("finetune.recipes.train_local", "train"),
    "train_remote": ("finetune.recipes.train_remote", "train_remote"),
    "evaluate": ("finetune.recipes.evaluate", "evaluate"),
    "load_config": ("finetune.config", "load_config"),
    "Config": ("finetune.config", "Config"),
    "Registry": ("finetune.registry", "Registry"),
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
