"""FLUX.2 ([dev] and [klein]): the model family behind ``Flux2Pipeline`` and ``Flux2KleinPipeline``.

What the trainer caches and feeds the transformer is what the pipelines compute (tests/models/test_flux2.py holds
each piece equal to diffusers 0.42.1):

- Text: an LLM's hidden states of three layers, stacked along the features (``[B, 512, 3·hidden]``): Qwen3 layers
  (9, 18, 27) under its chat template with thinking off for [klein] (``Flux2KleinPipeline._get_qwen3_prompt_embeds``),
  Mistral-Small-3 layers (10, 20, 30) under BFL's system message for [dev] (``_get_mistral_3_small_prompt_embeds``).
  diffusers' klein training script uses (10, 20, 30) and so trains on embeddings the pipeline never produces
  (diffusers#13445); the layers here are the pipeline's.
- Latents: ``AutoencoderKLFlux2`` (32 channels), patchified 2×2 to 128 channels and normalised with the VAE's
  batch-norm running statistics (``Flux2KleinPipeline._encode_vae_image``); tokens are the 128-channel cells.
- Position ids are 4-d (T, H, W, L): image tokens (0, h, w, 0), text tokens (0, 0, 0, l), reference i of an edit
  pair (10·(i + 1), h, w, 0); reference tokens follow the noisy ones and the prediction is cut to the noisy tokens.
- The transformer takes timestep = σ and scales it by 1000 itself; [dev] embeds guidance (trained at 1.0), [klein]
  has no guidance embedder and samples with true CFG against the empty prompt.

The presets (``preset:flux2-tiny``, ``flux2-small``: [klein]-shaped; ``flux2-dev-tiny``: [dev]-shaped) are built in
process with random weights; see ``build_preset``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune.errors import EXIT_USAGE, FinetuneError
from finetune.models import common
from finetune.models.common import load_parts, preset_name, render, resolve_dtype

if TYPE_CHECKING:
    from PIL import Image

    from finetune.config import Config

__all__ = [
    "PRESET_NAMES",
    "Flux2Components",
    "build_preset",
    "check_config",
    "default_sampling",
    "encode_images",
    "encode_prompts",
    "image_ids",
    "image_seq_len",
    "is_distilled",
    "is_klein",
    "load_components",
    "max_sequence_length",
    "normalize_latents",
    "pack_latents",
    "patchify_latents",
    "predict",
    "reference_ids",
    "sample_images",
    "sampling_pipeline",
    "save_preset",
    "text_bytes",
    "text_ids",
    "transformer_gib",
]

NAME = "flux2"
LABEL = "FLUX.2 [dev], [klein]"
PRESET_NAMES = ("flux2-tiny", "flux2-small", "flux2-dev-tiny")
PIPELINE_CLASSES = ("Flux2Pipeline", "Flux2KleinPipeline")
KLEIN_BASE = ("black-forest-labs/FLUX.2-klein-base-4B", "black-forest-labs/FLUX.2-klein-base-9B")
KLEIN_DISTILLED = ("black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-9B")
DEV = "black-forest-labs/FLUX.2-dev"
HUB_IDS = (DEV, *KLEIN_BASE, *KLEIN_DISTILLED)
EXAMPLE = KLEIN_BASE[0]
PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
TEXT_PARTS = ("text_encoder",)
TEXT_KEYS = ("prompt_embeds",)
LORA_ALPHA_KEYS = False  # diffusers refuses .alpha keys for FLUX.2; its adapter metadata carries alpha
MAX_REFERENCES = 10  # edit pairs: reference tokens after the noisy ones, reference i at T = 10·(i + 1)
TRUE_CFG = True  # [klein] base samples with CFG against the empty prompt; [dev] ignores the negative
MAX_SEQUENCE_LENGTH = 512  # both pipelines' tokenizer_max_length
MIN_REFERENCE_SIDE = 64  # Flux2ImageProcessor.check_image_input: "Both dimensions must be at least 64px"
KLEIN_LAYERS = (9, 18, 27)  # Flux2KleinPipeline.encode_prompt text_encoder_out_layers
DEV_LAYERS = (10, 20, 30)  # Flux2Pipeline.encode_prompt text_encoder_out_layers
KLEIN_CAPTION_DROPOUT = 0.1  # true CFG needs the empty caption trained (reference/flux-family-2026.md)
# BFL's system message for FLUX.2 [dev] prompts (diffusers pipelines/flux2/system_messages.py SYSTEM_MESSAGE).
DEV_SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)
# BFL module inside a block → the diffusers modules it fuses, in row order, for the kohya and ComfyUI exports
# (lora_export.py). From diffusers 0.42.1: single_file_utils.py convert_flux2_transformer_checkpoint_to_diffusers
# (each qkv chunked 3 ways by rows, everything else renamed 1:1, linear1 → attn.to_qkv_mlp_proj included) and
# lora_conversion_utils.py _convert_non_diffusers_flux2_lora_to_diffusers / _convert_kohya_flux2_lora_to_diffusers
# (the same names for LoRAs). The modulation Linears sit outside the blocks in FLUX.2, and to_qkv_mlp_proj already
# is BFL's fused linear1, so only the double blocks' q/k/v get fused.
BFL_BLOCKS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "transformer_blocks": (
        ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
        ("img_attn.proj", ("attn.to_out.0",)),
        ("img_mlp.0", ("ff.linear_in",)),
        ("img_mlp.2", ("ff.linear_out",)),
        ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
        ("txt_attn.proj", ("attn.to_add_out",)),
        ("txt_mlp.0", ("ff_context.linear_in",)),
        ("txt_mlp.2", ("ff_context.linear_out",)),
    ),
    "single_transformer_blocks": (
        ("linear1", ("attn.to_qkv_mlp_proj",)),
        ("linear2", ("attn.to_out",)),
    ),
}
# bf16 transformer sizes from the model cards (4B, 9B, 32B parameters × 2 bytes), for train.quantize: auto.
_TRANSFORMER_GIB = {
    KLEIN_BASE[0]: 7.2,
    KLEIN_DISTILLED[0]: 7.2,
    KLEIN_BASE[1]: 16.8,
    KLEIN_DISTILLED[1]: 16.8,
    DEV: 59.6,
}
# The classes the pipelines name in model_index.json, for a folder saved without one ([klein]'s; [dev] differs in the
# text encoder and tokenizer, and a [dev] folder always has its model_index.json).
_CLASSES = {
    "transformer": ("diffusers", "Flux2Transformer2DModel"),
    "vae": ("diffusers", "AutoencoderKLFlux2"),
    "text_encoder": ("transformers", "Qwen3ForCausalLM"),
    "tokenizer": ("transformers", "Qwen2TokenizerFast"),
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
}


@dataclass
class Flux2Components:
    """The parts of a FLUX.2 pipeline; any may be None when not loaded."""

    transformer: Any = None  # diffusers.Flux2Transformer2DModel
    vae: Any = None  # diffusers.AutoencoderKLFlux2
    text_encoder: Any = None  # transformers.Qwen3ForCausalLM ([klein]) or Mistral3ForConditionalGeneration ([dev])
    tokenizer: Any = None  # Qwen2TokenizerFast ([klein]); [dev]: AutoTokenizer in its PixtralProcessor's place
    scheduler: Any = None  # diffusers.FlowMatchEulerDiscreteScheduler


# ---- which model ---------------------------------------------------------------------------------------------------


def is_klein(base_model: str) -> bool:
    """[klein] (Qwen3, no guidance embedder, Flux2KleinPipeline) rather than [dev] (Mistral, guidance embedded)."""
    preset = preset_name(base_model)
    if preset is not None:
        return preset != "flux2-dev-tiny"
    if "klein" in base_model.lower():
        return True
    if base_model == DEV:
        return False
    index = common.model_index(base_model, online=False) or {}
    return index.get("_class_name") == "Flux2KleinPipeline"


def is_distilled(base_model: str) -> bool:
    """A step-distilled [klein] checkpoint: BFL's FLUX.2-klein-4B/-9B, or a folder whose model_index.json has
    ``is_distilled: true`` (the flag Flux2KleinPipeline reads to turn CFG off)."""
    if base_model in KLEIN_DISTILLED:
        return True
    if preset_name(base_model) is not None or not is_klein(base_model):
        return False
    return bool((common.model_index(base_model, online=False) or {}).get("is_distilled", False))


def check_config(cfg: Config) -> None:
    """Settings FLUX.2 cannot train with, refused before any model loads.

    Raises:
        FinetuneError: a distilled [klein] base (unless ``train.allow_distilled``), guidance set for [klein], a
            folder without one of the parts, a preview model that is not [klein].
    """
    base = cfg.base_model
    if is_distilled(base) and not cfg.train.allow_distilled:
        size = "9B" if "9b" in base.lower() else "4B"
        raise FinetuneError(
            f"base_model: {base} is a step-distilled FLUX.2 [klein] checkpoint. LoRAs trained on it collapse: a few "
            f"hundred steps undo the distillation (reference/flux-family-2026.md). Train on the base checkpoint, "
            f"black-forest-labs/FLUX.2-klein-base-{size}, and use the LoRA on the distilled one; or set "
            "train.allow_distilled=true to train on it anyway.",
            EXIT_USAGE,
        )
    if is_klein(base) and "train.guidance" in cfg.explicit:
        raise FinetuneError(
            f"train.guidance: FLUX.2 [klein] ({base}) has no guidance embedder, so there is nothing to set; remove "
            "the key (sample.guidance sets the CFG scale of samples)",
            EXIT_USAGE,
        )
    common.check_folder_parts(base, ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"), "Flux2Pipeline")
    preview = cfg.sample.preview_model
    if preview and not (is_klein(base) and is_klein(preview)):
        raise FinetuneError(
            f"sample.preview_model: {preview} with base_model {base}: previews render a FLUX.2 [klein] LoRA on "
            "another [klein] checkpoint of the same size (e.g. the distilled black-forest-labs/FLUX.2-klein-4B for "
            "klein-base-4B); name one, or remove the key",
            EXIT_USAGE,
        )


def default_caption_dropout(base_model: str) -> float | None:
    """0.1 for [klein] (true CFG needs a trained empty caption), None (the config's) for [dev]."""
    return KLEIN_CAPTION_DROPOUT if is_klein(base_model) else None


def max_sequence_length(base_model: str, configured: int = 0) -> int:
    """Text tokens: ``configured``, else 512 (both pipelines)."""
    return configured or MAX_SEQUENCE_LENGTH


def transformer_gib(base_model: str) -> float:
    """The bf16 transformer's size in GiB (``train.quantize: auto`` weighs it against the GPU's memory)."""
    return common.transformer_bf16_gib(base_model, _TRANSFORMER_GIB)


def default_sampling(base_model: str) -> dict[str, Any]:
    """Sampling defaults: both pipelines' own (50 steps, guidance 4.0: CFG scale for [klein] base, the embedded
    guidance for [dev]) at 1024 px; the distilled [klein] 4 steps without CFG; presets 8 steps at 256 px so CPU
    sampling takes seconds."""
    if is_distilled(base_model):  # the step-distilled klein: 4 steps, no CFG (BFL model card)
        return {"steps": 4, "size": 256 if preset_name(base_model) else 1024, "guidance": 1.0}
    if preset_name(base_model) is not None:
        return {"steps": 8, "size": 256, "guidance": 4.0}
    return {"steps": 50, "size": 1024, "guidance": 4.0}


# ---- loading -------------------------------------------------------------------------------------------------------


def load_components(
    base_model: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    parts: tuple[str, ...] = ("transformer", "vae", "text_encoder"),
    quantize: str | None = None,
) -> Flux2Components:
    """Load the named parts of a FLUX.2 model, in eval mode, on ``device`` in ``dtype`` (None: the dtype policy),
    with the classes its ``model_index.json`` names (models/common.py ``load_parts``). The text encoder brings its
    tokenizer; the scheduler always comes.

    Raises:
        FinetuneError: unknown part or preset, missing folder, or weights that cannot be had (with how to get them).
    """
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise FinetuneError(f"unknown FLUX.2 part(s) {unknown}; choose from {', '.join(PARTS)}")
    wanted = set(parts) | {"scheduler"} | ({"tokenizer"} if "text_encoder" in parts else set())
    device = torch.device(device)
    loaded = load_parts(
        base_model,
        tuple(p for p in PARTS if p in wanted),
        default_classes=_CLASSES,
        build_preset=lambda name: vars(build_preset(name)),
        dtype=dtype or resolve_dtype("auto", device),
        device=device,
        quantize=quantize,
        example=EXAMPLE,
        pipeline="Flux2KleinPipeline" if is_klein(base_model) else "Flux2Pipeline",
        layout="model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/",
        substitutes={name: ("transformers", "AutoTokenizer") for name in ("PixtralProcessor", "AutoProcessor")},
    )
    return Flux2Components(**loaded)


# ---- encoding ------------------------------------------------------------------------------------------------------


def _is_dev_encoder(text_encoder: Any) -> bool:
    return "Mistral" in type(text_encoder).__name__


@torch.no_grad()
def encode_prompts(c: Flux2Components, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` [B, max_sequence_length, 3·hidden]: the text encoder's hidden states of three layers,
    stacked along the features, under the pipeline's chat template, with the attention mask the pipeline passes.

    [klein] (Qwen3): one user turn, generation prompt, thinking off, layers (9, 18, 27)
    (``Flux2KleinPipeline._get_qwen3_prompt_embeds``). [dev] (Mistral-Small-3): BFL's system message, then the
    user turn, no generation prompt, layers (10, 20, 30) (``Flux2Pipeline._get_mistral_3_small_prompt_embeds``).
    """
    if c.text_encoder is None or c.tokenizer is None:
        raise ValueError("encode_prompts needs text_encoder and tokenizer loaded")
    tokenize = dict(padding="max_length", truncation=True, max_length=max_sequence_length, return_tensors="pt")
    if _is_dev_encoder(c.text_encoder):
        layers = DEV_LAYERS
        messages = [
            [
                {"role": "system", "content": [{"type": "text", "text": DEV_SYSTEM_MESSAGE}]},
                {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]},
            ]
            for p in prompts
        ]
        inputs = c.tokenizer.apply_chat_template(
            messages, add_generation_prompt=False, tokenize=True, return_dict=True, **tokenize
        )
    else:
        layers = KLEIN_LAYERS
        texts = [
            c.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            for p in prompts
        ]
        inputs = c.tokenizer(texts, **tokenize)
    device = c.text_encoder.device
    output = c.text_encoder(
        input_ids=inputs["input_ids"].to(device),
        attention_mask=inputs["attention_mask"].to(device),
        output_hidden_states=True,
        use_cache=False,
    )
    stacked = torch.stack([output.hidden_states[k] for k in layers], dim=1)  # [B, 3, seq, hidden]
    b, n, seq, hidden = stacked.shape
    embeds = stacked.permute(0, 2, 1, 3).reshape(b, seq, n * hidden)
    return {"prompt_embeds": embeds.to(c.text_encoder.dtype)}


def text_bytes(c: Flux2Components, max_sequence_length: int, itemsize: int) -> int:
    """Bytes of one cached caption: [seq, 3·hidden] (512 × 7680 in bf16 ≈ 7.9 MB for klein 4B)."""
    config = c.text_encoder.config
    hidden = getattr(config, "text_config", config).hidden_size
    return max_sequence_length * 3 * hidden * itemsize


@torch.no_grad()
def encode_images(vae: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE latent distribution (mean, std), each [B, 32, H/8, W/8], before patchifying and normalising;
    ``pixel_values`` [B, 3, H, W] in [-1, 1]. The pipeline encodes references with the mean (``argmax``); training
    draws ``mean + std·ε`` each step, as for FLUX.1."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
    dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.mean, dist.std


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent cell before patchifying: 2 ** (VAE blocks - 1), 8 for FLUX.2."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def patchify_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, 4C, H/2, W/2], channel-major within each 2×2 patch
    (``Flux2KleinPipeline._patchify_latents``)."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(b, c * 4, h // 2, w // 2)


def normalize_latents(latents: torch.Tensor, vae: Any) -> torch.Tensor:
    """Raw VAE latents [B, 32, H, W] → the transformer's latent space [B, 128, H/2, W/2]: patchify, then
    ``(z - running_mean) / sqrt(running_var + eps)`` with the VAE's batch norm
    (``Flux2KleinPipeline._encode_vae_image``)."""
    z = patchify_latents(latents)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
    return (z - mean) / std


# ---- packing and ids ---------------------------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, 128, h, w] → [B, h·w, 128], row-major (``Flux2KleinPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def image_seq_len(latent_shape: tuple[int, ...]) -> int:
    """Image tokens of a normalized latent [..., h, w]: one per cell."""
    return latent_shape[-2] * latent_shape[-1]


def image_ids(latent_shape: tuple[int, ...], device: Any, dtype: torch.dtype, t: int = 0) -> torch.Tensor:
    """Positions (T, H, W, L) of a normalized latent [..., h, w], [h·w, 4]: (t, row, column, 0)
    (``Flux2KleinPipeline._prepare_latent_ids``; a reference image i has t = 10·(i + 1))."""
    h, w = latent_shape[-2], latent_shape[-1]
    ids = torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(1))
    return ids.to(device=device, dtype=dtype)


def reference_ids(latent_shape: tuple[int, ...], index: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """Positions of reference ``index`` (0-based), [h·w, 4]: (10·(index + 1), row, column, 0)
    (``Flux2KleinPipeline._prepare_image_ids``). Every sample of a batch gives its reference i the same T."""
    return image_ids(latent_shape, device, dtype, t=10 * (index + 1))


def text_ids(seq_len: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """Text token positions (0, 0, 0, l), [seq_len, 4] (``Flux2KleinPipeline._prepare_text_ids``)."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(seq_len))
    return ids.to(device=device, dtype=dtype)


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
    """The transformer's velocity for noisy latents [B, 128, h, w] at ``sigmas`` [B], packed [B, h·w, 128], called as
    the pipelines call it: timestep = σ (the model scales by 1000), guidance embedded for [dev], None for [klein].

    ``references`` (edit pairs): normalized reference latents [B, 128, h_i, w_i], one tensor per reference index.
    Their packed tokens and ids (``reference_ids``) go after the noisy ones, and only the noisy tokens' prediction
    comes back, as in the pipelines' denoising loop (``noise_pred[:, :latents.size(1)]``)."""
    hidden = pack_latents(noisy)
    tokens = hidden.shape[1]
    if references:
        hidden = torch.cat([hidden, *(pack_latents(r.to(hidden.dtype)) for r in references)], dim=1)
        refs = [reference_ids(r.shape, i, img_ids.device, img_ids.dtype) for i, r in enumerate(references)]
        img_ids = torch.cat([img_ids, *refs], dim=0)
    out = model(
        hidden_states=hidden,
        encoder_hidden_states=text["prompt_embeds"],
        timestep=sigmas.to(noisy.dtype),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=None if guidance is None else torch.full_like(sigmas, guidance),
        return_dict=False,
    )[0]
    return out[:, :tokens] if references else out


# ---- pipelines and sampling ----------------------------------------------------------------------------------------


def pipeline_from_components(c: Flux2Components) -> Any:
    """``Flux2Pipeline`` for a [dev] transformer (guidance embedder), ``Flux2KleinPipeline`` otherwise."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    parts = dict(transformer=c.transformer, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer)
    if c.transformer is not None and c.transformer.config.guidance_embeds:
        return Flux2Pipeline(scheduler=c.scheduler, **parts)
    return Flux2KleinPipeline(scheduler=c.scheduler, **parts)


def sampling_pipeline(transformer: Any, vae: Any, scheduler: Any) -> Any:
    """A FLUX.2 pipeline that samples from cached text embeddings (no text encoder)."""
    return pipeline_from_components(Flux2Components(transformer=transformer, vae=vae, scheduler=scheduler))


def sample_images(
    pipe: Any,
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
    """Render every prompt × seed, prompt-major (see ``common.render``). ``text``/``negative_text``
    (``encode_prompts`` of ``prompts`` and of ``""``) skip the text encoder; [klein] applies CFG with
    ``negative_text`` when ``guidance`` > 1, [dev] embeds ``guidance``. ``inputs[i]``: prompt i's reference images
    (edits), passed as the pipeline's ``image`` list (reference i at T = 10·(i + 1))."""
    if inputs:
        _check_reference_sizes(inputs, size)
    if prompts and seeds and (text is None or (negative_text is None and _needs_negative(pipe, guidance))):
        components = Flux2Components(text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        seq = max_sequence_length or MAX_SEQUENCE_LENGTH
        text = text if text is not None else encode_prompts(components, prompts, seq)
        negative_text = negative_text or encode_prompts(components, [""], seq)
    embeds = {"prompt_embeds": text["prompt_embeds"]} if text is not None else {}
    if _needs_negative(pipe, guidance):
        embeds["negative_prompt_embeds"] = negative_text["prompt_embeds"]
    return render(
        pipe,
        prompts,
        seeds,
        size,
        embeds,
        batch_size,
        inputs,
        lambda refs: {"image": refs},
        num_inference_steps=steps,
        guidance_scale=guidance,
    )


def _check_reference_sizes(inputs: list[list[Image.Image]], size: int | tuple[int, int]) -> None:
    """Refuse inputs whose fitted size (``common.edit_size``) has a side under ``MIN_REFERENCE_SIDE`` before any step:
    the pipelines' image processor raises mid-sampling on them ("Image too small")."""
    height, width = (size, size) if isinstance(size, int) else size
    side = math.isqrt(height * width)
    for images in inputs:
        w, h = common.edit_size(*images[0].size, side)
        if min(w, h) < MIN_REFERENCE_SIDE:
            raise FinetuneError(
                f"an input of {images[0].width}×{images[0].height} px samples at {w}×{h} at size {side}, and FLUX.2 "
                f"takes references of at least {MIN_REFERENCE_SIDE} px a side; sample at a larger size (sample.size, "
                "--size) or crop the input closer to square",
                EXIT_USAGE,
            )


def _needs_negative(pipe: Any, guidance: float) -> bool:
    return type(pipe).__name__ == "Flux2KleinPipeline" and guidance > 1 and not pipe.config.is_distilled


# ---- presets -------------------------------------------------------------------------------------------------------


def build_preset(name: str, seed: int = 0) -> Flux2Components:
    """Build ``preset:<name>`` in process with random weights (see flux2_presets.py)."""
    from finetune.models import flux2_presets

    if name not in PRESET_NAMES:
        choices = ", ".join("preset:" + p for p in PRESET_NAMES)
        raise FinetuneError(f"unknown FLUX.2 preset {name!r}; choose one of: {choices}")
    return Flux2Components(**flux2_presets.build(name, seed))


def save_preset(name: str, path: Path, seed: int = 0) -> Path:
    """Write ``preset:<name>`` as a diffusers folder that the family's pipeline and ``load_components`` load
    (``common.save_preset_folder``: whole or not at all)."""
    return common.save_preset_folder(path, lambda: pipeline_from_components(build_preset(name, seed)))
