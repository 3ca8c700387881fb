"""FLUX.1 Kontext [dev]: the edit model behind ``FluxKontextPipeline``, trained on edit pairs.

Kontext is FLUX.1's architecture (the same transformer class with a guidance embedding, VAE, CLIP-L and T5-XXL), so
encoding, latents and packing are FLUX.1's (models/flux1.py). What differs is the reference image: its clean latent
(the VAE's mode, normalized) is packed and appended after the noisy tokens with ``ids[..., 0] = 1``, and only the
noisy tokens' prediction is used (``FluxKontextPipeline.prepare_latents`` and its denoising loop; diffusers
``train_dreambooth_lora_flux_kontext.py``). Training resizes the reference to its target's bucket, as ai-toolkit does
(reference/flux-family-2026.md §2.2). Kontext takes one reference per edit.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune.errors import EXIT_USAGE, FinetuneError
from finetune.models import flux1
from finetune.models.common import check_folder_parts, preset_name, render, save_preset_folder, transformer_bf16_gib
from finetune.models.flux1 import (  # the same parts, encoders and latent layout as FLUX.1
    BFL_BLOCKS,
    BFL_ROW_RATIOS,
    LORA_ALPHA_KEYS,
    PARTS,
    TEXT_KEYS,
    TEXT_PARTS,
    FluxComponents,
    encode_images,
    encode_prompts,
    image_ids,
    image_seq_len,
    normalize_latents,
    pack_latents,
    text_bytes,
    text_ids,
    vae_scale_factor,
)

if TYPE_CHECKING:
    from diffusers import FluxKontextPipeline
    from PIL import Image

    from finetune.config import Config

__all__ = [
    "BFL_BLOCKS",
    "BFL_ROW_RATIOS",
    "LORA_ALPHA_KEYS",
    "PARTS",
    "TEXT_KEYS",
    "TEXT_PARTS",
    "build_preset",
    "check_config",
    "default_caption_dropout",
    "default_sampling",
    "encode_images",
    "encode_prompts",
    "image_ids",
    "image_seq_len",
    "load_components",
    "max_sequence_length",
    "normalize_latents",
    "pack_latents",
    "pipeline_from_components",
    "predict",
    "reference_ids",
    "sample_images",
    "sampling_pipeline",
    "save_preset",
    "text_bytes",
    "text_ids",
    "transformer_gib",
    "vae_scale_factor",
]

NAME = "kontext"
LABEL = "FLUX.1 Kontext [dev]"
PIPELINE_CLASSES = ("FluxKontextPipeline",)
EXAMPLE = "black-forest-labs/FLUX.1-Kontext-dev"
HUB_IDS = (EXAMPLE,)
PRESET_NAMES = ("kontext-tiny", "kontext-small")
# Kontext presets are FLUX.1's (same shapes and seeds), saved as a FluxKontextPipeline
_PRESET_SPECS = {"kontext-tiny": "tiny", "kontext-small": "small"}
MAX_REFERENCES = 1  # FluxKontextPipeline takes one image; musubi: "Kontext: one control only"
TRUE_CFG = False  # guidance-distilled like FLUX.1 [dev]
MAX_SEQUENCE_LENGTH = 512  # FluxKontextPipeline.__call__ max_sequence_length
GUIDANCE = 2.5  # FluxKontextPipeline docs and BFL's model card; SimpleTuner validates Kontext at 2.5
_TRANSFORMER_GIB = {EXAMPLE: 22.2}  # 12B parameters × 2 bytes, as FLUX.1 [dev]


def max_sequence_length(base_model: str, configured: int = 0) -> int:
    """T5 tokens: ``configured``, else 512."""
    return configured or MAX_SEQUENCE_LENGTH


def transformer_gib(base_model: str) -> float:
    """The bf16 transformer's size in GiB (``train.quantize: auto`` weighs it against the GPU's memory)."""
    return transformer_bf16_gib(base_model, _TRANSFORMER_GIB)


def default_sampling(base_model: str) -> dict[str, Any]:
    """28 steps at 1024 px with guidance 2.5 (the pipeline's example); presets 8 steps at 256 px."""
    if preset_name(base_model) is not None:
        return {"steps": 8, "size": 256, "guidance": GUIDANCE}
    return {"steps": 28, "size": 1024, "guidance": GUIDANCE}


def check_config(cfg: Config) -> None:
    """A local folder must hold every part training loads; previews on a second model are FLUX.2 [klein]'s.

    Raises:
        FinetuneError: a folder without one of the parts, or ``sample.preview_model`` set.
    """
    check_folder_parts(cfg.base_model, PARTS, "FluxKontextPipeline")
    if cfg.sample.preview_model:
        raise FinetuneError(
            f"sample.preview_model: previews on a second model are for FLUX.2 [klein]; {cfg.base_model} is "
            f"{LABEL}, whose LoRAs run on the model they were trained on. Remove the key.",
            EXIT_USAGE,
        )


def default_caption_dropout(base_model: str) -> float | None:
    """None: the config's default (0.05, ai-toolkit's Kontext example) serves Kontext."""
    return None


# ---- presets and loading -------------------------------------------------------------------------------------------


def build_preset(name: str, seed: int = 0) -> FluxComponents:
    """Build ``preset:kontext-tiny`` / ``kontext-small`` in process: FLUX.1's ``tiny`` / ``small`` layout with random
    weights (deterministic per seed)."""
    if name not in _PRESET_SPECS:
        choices = ", ".join("preset:" + p for p in PRESET_NAMES)
        raise FinetuneError(f"unknown Kontext preset {name!r}; choose one of: {choices}")
    return flux1.build_preset(_PRESET_SPECS[name], seed)


def pipeline_from_components(c: FluxComponents) -> FluxKontextPipeline:
    """Wrap components in a diffusers ``FluxKontextPipeline`` (missing parts stay None)."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**{f.name: getattr(c, f.name) for f in fields(c)})


def sampling_pipeline(transformer: Any, vae: Any, scheduler: Any) -> FluxKontextPipeline:
    """A ``FluxKontextPipeline`` that samples from cached text embeddings (no text encoders)."""
    return pipeline_from_components(FluxComponents(transformer=transformer, vae=vae, scheduler=scheduler))


def save_preset(name: str, path: Path, seed: int = 0) -> Path:
    """Write ``preset:<name>`` as a folder that ``FluxKontextPipeline.from_pretrained`` and ``load_components`` load
    (``common.save_preset_folder``: whole or not at all)."""
    return save_preset_folder(path, lambda: pipeline_from_components(build_preset(name, seed)))


def load_components(
    base_model: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    parts: tuple[str, ...] = ("transformer", "vae", "text_encoder", "text_encoder_2"),
    quantize: str | None = None,
) -> FluxComponents:
    """Load the named parts of a Kontext model (hub id, folder or preset), as ``flux1.load_components`` does."""
    return flux1.load_flux1_parts(
        base_model,
        dtype=dtype,
        device=device,
        parts=parts,
        quantize=quantize,
        build=build_preset,
        example=EXAMPLE,
        pipeline="FluxKontextPipeline",
    )


# ---- references ----------------------------------------------------------------------------------------------------


def reference_ids(latent_shape: tuple[int, ...], index: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """Positions of the reference's packed tokens, [(h/2)·(w/2), 3]: FLUX.1's image ids with channel 0 = 1
    (``FluxKontextPipeline.prepare_latents``: ``image_ids[..., 0] = 1``).

    Raises:
        FinetuneError: ``index`` > 0; Kontext takes one reference.
    """
    if index >= MAX_REFERENCES:
        raise FinetuneError(f"{LABEL} takes one reference image per edit; got reference {index + 1}", EXIT_USAGE)
    ids = image_ids(latent_shape, device, dtype)
    ids[..., 0] = 1
    return ids


def predict(
    model: Any,
    noisy: torch.Tensor,
    sigmas: torch.Tensor,
    text: dict[str, torch.Tensor],
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    guidance: float | None,
    references: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The velocity for noisy latents [B, 16, h, w] at ``sigmas`` [B], packed [B, tokens, 64], called as the
    Kontext pipeline calls the transformer: the reference's packed tokens (``references``: one normalized latent
    [B, 16, h', w']) and ids follow the noisy ones, and only the noisy tokens' prediction comes back
    (``noise_pred[:, : latents.size(1)]``). Without references it is FLUX.1's text-to-image call."""
    hidden = pack_latents(noisy)
    tokens = hidden.shape[1]
    if references:
        refs = [reference_ids(r.shape, i, img_ids.device, img_ids.dtype) for i, r in enumerate(references)]
        hidden = torch.cat([hidden, *(pack_latents(r.to(hidden.dtype)) for r in references)], dim=1)
        img_ids = torch.cat([img_ids, *refs], dim=0)
    out = flux1.transformer_call(model, hidden, sigmas, text, img_ids, txt_ids, guidance)
    return out[:, :tokens]


# ---- sampling ------------------------------------------------------------------------------------------------------


def sample_images(
    pipe: FluxKontextPipeline,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int,
    size: int | tuple[int, int],
    guidance: float,
    text: dict[str, torch.Tensor] | None = None,
    negative_text: dict[str, torch.Tensor] | None = None,
    max_sequence_length: int | None = None,
    batch_size: int | None = None,
    inputs: list[list[Image.Image]] | None = None,
) -> list[Image.Image]:
    """Render every prompt × seed, prompt-major (see ``common.render``); ``inputs[i]`` holds prompt i's input image.

    The input is fitted to the edit size (``common.fit_inputs``) and passed with ``_auto_resize=False``: the
    pipeline would otherwise snap it to one of Kontext's preferred 1 MP resolutions, unlike training, which keeps the
    target's bucket. Without inputs Kontext generates from text alone. ``negative_text`` is unused (no true CFG).
    """
    if inputs and any(len(images) > MAX_REFERENCES for images in inputs):
        raise FinetuneError(f"{LABEL} takes one input image per prompt", EXIT_USAGE)
    if text is None and prompts and seeds:
        components = FluxComponents(**{f.name: getattr(pipe, f.name, None) for f in fields(FluxComponents)})
        text = encode_prompts(components, prompts, max_sequence_length or MAX_SEQUENCE_LENGTH)
    height, width = (size, size) if isinstance(size, int) else size
    # max_area: the pipeline rescales every output to this area (default 1024²) at the requested aspect ratio
    return render(
        pipe,
        prompts,
        seeds,
        size,
        text or {},
        batch_size,
        inputs,
        lambda images: {"image": images[0], "_auto_resize": False, "max_area": images[0].width * images[0].height},
        num_inference_steps=steps,
        guidance_scale=guidance,
        max_area=height * width,
    )
