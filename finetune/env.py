"""`finetune env`: what this machine has and what it can train, without loading a model.

``collect()`` reads versions (package metadata), GPUs (``torch.cuda`` device properties), free disk, whether a
Hugging Face login and the gated black-forest-labs repos are present, whether ``REPLICATE_API_TOKEN`` is set (never
its value) and which optional extras are installed. ``plan()`` turns those figures into one line per base model with
the same rule as ``train.quantize: auto`` (models/common.py): bf16 when the GPU holds the bf16 transformer plus
``QUANTIZE_HEADROOM_GIB``, else int8 with gradient checkpointing when the int8 weights plus
``CHECKPOINTED_HEADROOM_GIB`` fit, else FSDP when each GPU holds its 1/N share of the bf16 weights plus the same
headroom, else it does not fit. ``plan`` is a plain function over plain data, so the GPU branch is tested on CPU
with fake device properties.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path
from typing import Any

from finetune.files import finetune_home, free_bytes

__all__ = ["CHECKPOINTED_HEADROOM_GIB", "collect", "format_report", "plan", "transformer_sizes"]

# What an int8 LoRA step at 1024 px needs beside the int8 transformer with gradient checkpointing: activations of one
# block, the VAE decoder, LoRA weights and Adam state, CUDA context. An estimate until scripts/gpu_check.py measures
# it on a lent GPU (issue 11's targets: klein 4B in 12 GB, klein 9B in 16 GB, FLUX.2 [dev] in 48 GB).
CHECKPOINTED_HEADROOM_GIB = 6.0
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub")
# Optional extras of pyproject.toml → the module each one brings.
EXTRAS = {
    "quantize": "torchao",
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "prodigy": "prodigyopt",
    "bnb": "bitsandbytes",
    "heif": "pillow_heif",
}
# The base models the plan covers, with the family that trains them (the distilled klein is for inference only).
BASE_MODELS = (
    ("black-forest-labs/FLUX.1-dev", "FLUX.1 [dev]"),
    ("black-forest-labs/FLUX.1-Kontext-dev", "FLUX.1 Kontext [dev]"),
    ("black-forest-labs/FLUX.2-klein-base-4B", "FLUX.2 [klein] 4B"),
    ("black-forest-labs/FLUX.2-klein-base-9B", "FLUX.2 [klein] 9B"),
    ("black-forest-labs/FLUX.2-dev", "FLUX.2 [dev]"),
    ("black-forest-labs/flux-3-image-klein-base", "FLUX 3 Image Klein"),
)
# what Replicate's trainers train (recipes/train_remote.py): ostris/flux-dev-lora-trainer, fast-flux-kontext-trainer
REMOTE_BASES = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-Kontext-dev")
GIB = 2**30


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _free_gib(path: Path) -> float:
    return round(free_bytes(path) / GIB, 1)


def _gpus() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append(
            {
                "index": i,
                "name": props.name,
                "memory_gib": round(props.total_memory / GIB, 1),
                "compute_capability": f"{props.major}.{props.minor}",
            }
        )
    return out


def _hub() -> dict[str, Any]:
    """The HF cache folder, whether a token is there (never the token), and which black-forest-labs repos it holds."""
    from huggingface_hub import constants, get_token

    cache = Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
    cached = sorted(
        p.name.removeprefix("models--").replace("--", "/")
        for p in (cache.glob("models--black-forest-labs--*") if cache.is_dir() else [])
    )
    return {"cache": str(cache), "logged_in": get_token() is not None, "black_forest_labs_cached": cached}


def collect() -> dict[str, Any]:
    """Everything ``finetune env`` reports, as plain data (no model is loaded; torch is imported for the GPUs)."""
    import torch

    from finetune.cache import default_cache_dir
    from finetune.replicate import load_token

    hub = _hub()
    home = finetune_home()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_cuda_build": torch.version.cuda,
        "gpus": _gpus(),
        "disk_free_gib": {
            "FINETUNE_HOME": {"path": str(home), "free_gib": _free_gib(home)},
            "cache": {"path": str(default_cache_dir()), "free_gib": _free_gib(default_cache_dir())},
            "hf_cache": {"path": hub["cache"], "free_gib": _free_gib(Path(hub["cache"]))},
        },
        "hf_logged_in": hub["logged_in"],
        "black_forest_labs_cached": hub["black_forest_labs_cached"],
        "replicate_token_set": bool(load_token()),
        "extras": {extra: importlib.util.find_spec(module) is not None for extra, module in EXTRAS.items()},
    }


def transformer_sizes() -> dict[str, float]:
    """Each planned base model's bf16 transformer in GiB, from its family (``transformer_gib``)."""
    from finetune import models

    return {hub_id: models.family_for(hub_id).transformer_gib(hub_id) for hub_id, _ in BASE_MODELS}


def plan(gpus: list[dict[str, Any]], sizes: dict[str, float]) -> list[dict[str, str]]:
    """One line per base model: how it trains on the largest GPU here, by ``train.quantize: auto``'s rule.

    ``gpus`` as ``collect()`` gives them (``memory_gib`` each); ``sizes`` maps a hub id to its bf16 transformer in
    GiB (each family's ``transformer_gib``).
    """
    from finetune.models.common import bf16_fits

    out = []
    for hub_id, label in BASE_MODELS:
        weights = sizes[hub_id]
        if not gpus:
            how = "no CUDA GPU here: train on a GPU machine" + (
                ", or on Replicate (backend: replicate)" if hub_id in REMOTE_BASES else ""
            )
            out.append({"base_model": hub_id, "label": label, "fits": "no", "how": how})
            continue
        best = max(gpus, key=lambda g: g["memory_gib"])
        memory, name = best["memory_gib"], f"{best['memory_gib']:.0f} GiB {best['name']}"
        smallest = min(g["memory_gib"] for g in gpus)
        if bf16_fits(memory, weights):
            fits, how = "yes", f"bf16 on this {name} (train.quantize: auto keeps bf16)"
        elif memory >= weights / 2 + CHECKPOINTED_HEADROOM_GIB:
            fits, how = "yes", f"int8 + gradient checkpointing on this {name} (train.quantize: auto picks int8)"
        elif len(gpus) > 1 and bf16_fits(smallest, weights / len(gpus)):  # each GPU holds its 1/N share
            fits = "sharded"
            how = f"bf16 sharded over the {len(gpus)} GPUs: accelerate launch --use_fsdp, train.quantize=none"
        else:
            need = weights / 2 + CHECKPOINTED_HEADROOM_GIB
            fits, how = "no", f"needs about {need:.0f} GiB even in int8; this {name} has less"
        out.append({"base_model": hub_id, "label": label, "fits": fits, "how": how})
    return out


def format_report(info: dict[str, Any], lines: list[dict[str, str]]) -> str:
    """The human form of ``finetune env``."""
    packages = ", ".join(f"{k} {v or 'missing'}" for k, v in info["packages"].items())
    rows = [
        f"Python {info['python']} on {info['platform']}",
        f"Packages: {packages}",
        f"torch CUDA build: {info['torch_cuda_build'] or 'none (CPU build)'}",
    ]
    if info["gpus"]:
        for g in info["gpus"]:
            cc = g["compute_capability"]
            rows.append(f"GPU {g['index']}: {g['name']}, {g['memory_gib']:.1f} GiB, compute capability {cc}")
    else:
        rows.append("GPU: none visible (torch.cuda.is_available() is False)")
    for what, disk in info["disk_free_gib"].items():
        rows.append(f"Free disk at {what} ({disk['path']}): {disk['free_gib']:.1f} GiB")
    cached = ", ".join(info["black_forest_labs_cached"]) or "none"
    rows.append(
        f"Hugging Face login: {'yes' if info['hf_logged_in'] else 'no'}; black-forest-labs repos cached: {cached}"
    )
    rows.append(f"REPLICATE_API_TOKEN: {'set' if info['replicate_token_set'] else 'not set'}")
    extras = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["extras"].items())
    rows.append(f"Extras installed: {extras}")
    rows.append("What trains here (train.quantize: auto's rule; the presets train anywhere):")
    rows += [f"  {line['label']:<20} {line['how']}" for line in lines]
    return "\n".join(rows) + "\n"
