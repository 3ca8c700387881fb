"""finetune: fine-tune FLUX (1, Kontext, 2, 3) with LoRA, locally or on Replicate, and compare the versions you get.

The Python API mirrors the CLI: ``prepare``, ``train``, ``evaluate``. Importing this package is cheap; torch and
diffusers load when a function that needs them runs.
"""

from __future__ import annotations

import logging
from typing import Any

__version__ = "0.1.0"

# With torchao installed, importing transformers, peft or diffusers' models imports it, and that logs about CUDA
# kernels a CPU build lacks, torch pytree deprecations and pre-serialized checkpoints: none of it concerns int8
# weight-only quantization, and it would greet every run. Set here, before any submodule imports those libraries.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)

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
