"""Optimizers and learning-rate schedules for LoRA training, checked before any work starts.

``adamw`` is torch's (fused kernel where the device has one), ``adamw8bit`` is bitsandbytes' (CUDA only) and
``prodigy`` is prodigyopt's (the ``prodigy`` extra). ``check_optimizer`` runs before models load, so a missing
package or an unsupported device is reported in a second, not after caching.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch

from finetune.errors import FinetuneError

__all__ = ["build_lr_scheduler", "build_optimizer", "check_optimizer"]


def check_optimizer(name: str, device: torch.device) -> None:
    """Raise a FinetuneError when optimizer ``name`` cannot run here, saying how to fix it."""
    if name == "adamw8bit":
        if device.type != "cuda":
            raise FinetuneError(
                f"train.optimizer: adamw8bit (bitsandbytes) needs a CUDA GPU, but this run uses {device}; "
                "use train.optimizer=adamw on this machine"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise FinetuneError(
                "train.optimizer: adamw8bit needs bitsandbytes, which is not installed; "
                "run `pip install 'finetune[bnb]'` or use train.optimizer=adamw"
            )
    elif name == "prodigy":
        if importlib.util.find_spec("prodigyopt") is None:
            raise FinetuneError(
                "train.optimizer: prodigy needs the prodigyopt package, which is not installed; "
                "run `pip install 'finetune[prodigy]'` or use train.optimizer=adamw"
            )
    elif name != "adamw":
        raise FinetuneError(f"train.optimizer: unknown optimizer {name!r}; use adamw, adamw8bit or prodigy")


def build_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params`` (call ``check_optimizer`` first)."""
    params = list(params)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy estimates the step size itself; lr scales it (1.0 is the authors' recommendation).
        return Prodigy(params, lr=lr, weight_decay=weight_decay)
    # The fused kernel updates every tensor in one launch (CUDA, and CPU since torch 2.4).
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type in ("cuda", "cpu"))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """``constant`` or ``cosine`` (to 0 at ``total_steps``) after a linear warm-up; diffusers' ``get_scheduler``."""
    from diffusers.optimization import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine": "cosine"}.get(kind)
    if name is None:
        raise FinetuneError(f"train.lr_scheduler: unknown schedule {kind!r}; use constant or cosine")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
