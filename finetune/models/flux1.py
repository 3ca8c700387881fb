"""FLUX.1 (dev, schnell, Krea): the model family behind ``FluxPipeline``.

Real models come from diffusers/transformers ``from_pretrained`` with the classes their ``model_index.json`` names
(models/common.py). ``preset:tiny`` and ``preset:small`` build the whole pipeline in process with random weights
(deterministic per seed) for tests, the demo and benchmarks; their tokenizers are built with the ``tokenizers``
library and wrapped in the classes ``FluxPipeline`` names, so a saved preset is an ordinary diffusers folder.

The latent conventions (16-channel VAE, ``(z - shift) * scale``, 2×2 packing into 64-d tokens, 3-d ids) follow
diffusers' ``FluxPipeline``; tests check these functions against its private helpers and ``encode_prompt``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune.errors import EXIT_USAGE, FinetuneError
from finetune.models.common import (
    FLUX_SCHEDULER,
    PRESET_VAE_LOGVAR_SHIFT,
    PRESET_WORDS,
    bytes_to_unicode,
    check_folder_parts,
    load_parts,
    preset_name,
    render,
    resolve_dtype,
    save_preset_folder,
    transformer_bf16_gib,
)

if TYPE_CHECKING:
    from diffusers import FluxPipeline
    from PIL import Image

    from finetune.config import Config

__all__ = [
    "PARTS",
    "PRESET_NAMES",
    "FluxComponents",
    "build_preset",
    "check_config",
    "default_caption_dropout",
    "default_sampling",
    "denormalize_latents",
    "encode_images",
    "encode_prompts",
    "image_ids",
    "image_seq_len",
    "is_schnell",
    "latent_image_ids",
    "load_components",
    "load_flux1_parts",
    "load_pipeline",
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
    "transformer_call",
    "transformer_gib",
    "unpack_latents",
]

NAME = "flux1"
LABEL = "FLUX.1 [dev], [schnell], Krea"
PIPELINE_CLASSES = ("FluxPipeline",)
HUB_IDS = (
    "black-forest-labs/FLUX.1-dev",
    "black-forest-labs/FLUX.1-schnell",
    "black-forest-labs/FLUX.1-Krea-dev",
)
EXAMPLE = "black-forest-labs/FLUX.1-dev"
TEXT_PARTS = ("text_encoder", "text_encoder_2")  # CLIP-L (pooled) and T5-XXL (hidden states)
TEXT_KEYS = ("prompt_embeds", "pooled_prompt_embeds")
LORA_ALPHA_KEYS = True  # .alpha tensors: ComfyUI applies alpha/rank from them (diffusers reads them too)
MAX_REFERENCES = 0  # no edit pairs: those train on FLUX.1 Kontext (models/kontext.py)
EDIT_PAIRS_UNSUPPORTED = (
    "FLUX.1 [dev]/[schnell] takes no reference images; edit pairs train on FLUX.1 Kontext "
    "(black-forest-labs/FLUX.1-Kontext-dev) or FLUX.2 [klein]/[dev]"
)
TRUE_CFG = False  # guidance-distilled (dev) or timestep-distilled (schnell): no negative prompt when sampling
PRESET_NAMES = ("tiny", "small")
PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
# The classes FluxPipeline names (model_index.json of FLUX.1-dev), for a folder saved without model_index.json.
_CLASSES = {
    "transformer": ("diffusers", "FluxTransformer2DModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "text_encoder_2": ("transformers", "T5EncoderModel"),
    "tokenizer_2": ("transformers", "T5TokenizerFast"),
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
}
# bf16 transformer sizes (12B parameters × 2 bytes), for train.quantize: auto before the weights are on disk.
_TRANSFORMER_GIB = {hub_id: 22.2 for hub_id in HUB_IDS}

# BFL module inside a block → the diffusers modules it fuses, in row order (reference/comfyui-lora-keys.md §4), for
# the kohya and ComfyUI exports (lora_export.py). proj_mlp has 4 × hidden rows (FLUX's MLP ratio) in linear1.
BFL_BLOCKS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "transformer_blocks": (
        ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
        ("img_attn.proj", ("attn.to_out.0",)),
        ("img_mlp.0", ("ff.net.0.proj",)),
        ("img_mlp.2", ("ff.net.2",)),
        ("img_mod.lin", ("norm1.linear",)),
        ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
        ("txt_attn.proj", ("attn.to_add_out",)),
        ("txt_mlp.0", ("ff_context.net.0.proj",)),
        ("txt_mlp.2", ("ff_context.net.2",)),
        ("txt_mod.lin", ("norm1_context.linear",)),
    ),
    "single_transformer_blocks": (
        ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
        ("linear2", ("proj_out",)),
        ("modulation.lin", ("norm.linear",)),
    ),
}
BFL_ROW_RATIOS = {"proj_mlp": 4}  # rows of a fused part per hidden unit, when it is untrained and filled with zeros
CLIP_MAX_LENGTH = 77  # CLIP-L's position embeddings; FluxPipeline reads tokenizer.model_max_length
T5_MAX_LENGTH = 512  # FLUX.1-dev's longest T5 prompt (schnell uses 256)

_VAE_BLOCKS = 4  # 4 blocks = 3 downsamplings = the ×8 VAE scale factor of FLUX.1
_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "transformer": dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 6, 6],  # sums to attention_head_dim
        ),
        "vae": dict(block_out_channels=(8, 8, 16, 16), norm_num_groups=4),
        "clip": dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, projection_dim=32
        ),
        "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4),
    },
    "small": {  # issue 3, item 2: exactly these sizes
        "transformer": dict(
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=64,
            num_attention_heads=4,
            joint_attention_dim=256,
            pooled_projection_dim=128,
            axes_dims_rope=[16, 24, 24],
        ),
        "vae": dict(block_out_channels=(16, 32, 64, 64), norm_num_groups=8),
        "clip": dict(
            hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, projection_dim=128
        ),
        "t5": dict(d_model=256, d_kv=32, d_ff=512, num_layers=2, num_heads=8),
    },
}
_PRESET_VOCAB = 1000


@dataclass
class FluxComponents:
    """The parts of a FLUX.1 pipeline; any may be None when not loaded (e.g. only the transformer for training)."""

    transformer: Any = None  # diffusers.FluxTransformer2DModel
    vae: Any = None  # diffusers.AutoencoderKL
    text_encoder: Any = None  # transformers.CLIPTextModel (pooled output only)
    tokenizer: Any = None  # transformers.CLIPTokenizer
    text_encoder_2: Any = None  # transformers.T5EncoderModel (hidden states)
    tokenizer_2: Any = None  # transformers.T5TokenizerFast
    scheduler: Any = None  # diffusers.FlowMatchEulerDiscreteScheduler


# ---- which model ---------------------------------------------------------------------------------------------------


def is_schnell(base_model: str) -> bool:
    """FLUX.1-schnell (timestep-distilled, no guidance embedding) rather than dev: by name, or a local folder's
    transformer config without ``guidance_embeds``."""
    if "schnell" in base_model.lower():
        return True
    config = Path(base_model).expanduser() / "transformer" / "config.json"
    if preset_name(base_model) is None and config.is_file():
        return not json.loads(config.read_text()).get("guidance_embeds", True)
    return False


def max_sequence_length(base_model: str, configured: int = 0) -> int:
    """T5 tokens: ``configured``, else 256 for schnell and 512 for dev (reference/local-trainers.md §0)."""
    return configured or (256 if is_schnell(base_model) else 512)


def transformer_gib(base_model: str) -> float:
    """The bf16 transformer's size in GiB (``train.quantize: auto`` weighs it against the GPU's memory)."""
    return transformer_bf16_gib(base_model, _TRANSFORMER_GIB)


def default_sampling(base_model: str) -> dict[str, Any]:
    """Sampling defaults per model: dev 28 steps at 1024 px, guidance 3.5 (BFL/diffusers model card); schnell 4 steps,
    guidance 0 (it ignores guidance); presets 8 steps at 256 px so CPU sampling takes seconds."""
    if preset_name(base_model) is not None:
        return {"steps": 8, "size": 256, "guidance": 3.5}
    if is_schnell(base_model):
        return {"steps": 4, "size": 1024, "guidance": 0.0}
    return {"steps": 28, "size": 1024, "guidance": 3.5}


# ---- presets -------------------------------------------------------------------------------------------------------


def _build_clip_tokenizer() -> Any:
    """A byte-level BPE in CLIP's layout (bytes, bytes+``</w>``, merges, then the two specials) under 1000 tokens."""
    from transformers import CLIPTokenizer

    alphabet = list(bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(alphabet + [ch + "</w>" for ch in alphabet])}
    merges: list[tuple[str, str]] = []
    for word in PRESET_WORDS:  # one left-to-right merge chain per word: deterministic, no trainer involved
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((left, right))
            left = merged
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) <= _PRESET_VOCAB
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def _build_t5_tokenizer() -> Any:
    """A Unigram (SentencePiece-style) vocabulary in T5's layout: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(c), -10.0) for c in range(ord("!"), ord("~") + 1)]
    pieces += [("▁" + w, -3.0 - 0.1 * len(w)) for w in PRESET_WORDS]
    assert len(pieces) <= _PRESET_VOCAB
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def build_preset(name: str, seed: int = 0) -> FluxComponents:
    """Build ``preset:<name>`` in process: the full FLUX.1 layout at toy sizes with random weights.

    The same ``name`` and ``seed`` give bitwise-equal weights; the global torch RNG is left untouched.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if name not in _PRESETS:
        choices = ", ".join("preset:" + p for p in PRESET_NAMES)
        raise FinetuneError(f"unknown preset {name!r}; choose one of: {choices}")
    spec = _PRESETS[name]
    tokenizer, tokenizer_2 = _build_clip_tokenizer(), _build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True, **spec["transformer"])
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * _VAE_BLOCKS,
            up_block_types=("UpDecoderBlock2D",) * _VAE_BLOCKS,
            layers_per_block=1,
            latent_channels=16,
            shift_factor=0.1159,  # FLUX.1 ae config (reference/local-trainers.md §0)
            scaling_factor=0.3611,
            use_quant_conv=False,
            use_post_quant_conv=False,
            **spec["vae"],
        )
        # A trained VAE's posterior is narrow (std far below the spread of the means); at random init the log-variance
        # half of the encoder output is ~0, so std ~1 and every latent would be mostly noise. Shift it to std ~0.02.
        with torch.no_grad():
            vae.encoder.conv_out.bias[16:] -= PRESET_VAE_LOGVAR_SHIFT
        torch.manual_seed(seed + 2)
        eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=_PRESET_VOCAB,
                max_position_embeddings=CLIP_MAX_LENGTH,
                bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
                eos_token_id=eos,  # the pooled output is read at the first eos token
                pad_token_id=eos,
                **spec["clip"],
            )
        )
        torch.manual_seed(seed + 3)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=_PRESET_VOCAB,
                feed_forward_proj="gated-gelu",  # T5 v1.1, as in FLUX's T5-XXL
                tie_word_embeddings=False,
                is_encoder_decoder=False,
                **spec["t5"],
            )
        )
    return FluxComponents(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
    )


def pipeline_from_components(c: FluxComponents) -> FluxPipeline:
    """Wrap components in a diffusers ``FluxPipeline`` (missing parts stay None)."""
    from diffusers import FluxPipeline

    return FluxPipeline(**{f.name: getattr(c, f.name) for f in fields(c)})


def sampling_pipeline(transformer: Any, vae: Any, scheduler: Any) -> FluxPipeline:
    """A ``FluxPipeline`` that samples from cached text embeddings (no text encoders)."""
    return pipeline_from_components(FluxComponents(transformer=transformer, vae=vae, scheduler=scheduler))


def save_preset(name: str, path: Path, seed: int = 0) -> Path:
    """Write ``preset:<name>`` as a diffusers folder that ``FluxPipeline.from_pretrained`` and ``load_components`` load
    (``common.save_preset_folder``: whole or not at all)."""
    return save_preset_folder(path, lambda: pipeline_from_components(build_preset(name, seed)))


# ---- loading -------------------------------------------------------------------------------------------------------


def load_components(
    base_model: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    parts: tuple[str, ...] = ("transformer", "vae", "text_encoder", "text_encoder_2"),
    quantize: str | None = None,
) -> FluxComponents:
    """Load the named parts of a FLUX.1 model, in eval mode, on ``device`` in ``dtype`` (None: the dtype policy).

    ``quantize="int8"`` stores every Linear weight of the transformer in int8 (see ``resolve_quantize``), on the CPU
    before it moves to ``device``, so the quantized values are the same on every device and process.

    ``base_model`` is a hub id (HF cache and ``HF_HUB_OFFLINE`` honoured), a local diffusers folder, or
    ``preset:tiny``/``preset:small``. Parts load with the classes its ``model_index.json`` names, as
    ``FluxPipeline.from_pretrained`` does. A text encoder brings its tokenizer; the scheduler always comes.

    Raises:
        FinetuneError: unknown part or preset, missing folder, or weights that cannot be had (with how to get them).
    """
    return load_flux1_parts(base_model, dtype=dtype, device=device, parts=parts, quantize=quantize, build=build_preset)


def load_flux1_parts(
    base_model: str,
    *,
    dtype: torch.dtype | None,
    device: str | torch.device,
    parts: tuple[str, ...],
    quantize: str | None,
    build: Callable[[str], FluxComponents],
    example: str = EXAMPLE,
    pipeline: str = "FluxPipeline",
) -> FluxComponents:
    """``load_components`` for any pipeline of FLUX.1's parts (FLUX.1 Kontext loads the same, models/kontext.py):
    ``build`` makes a preset; ``example`` (a hub id) and ``pipeline`` (its class) go into error messages."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise FinetuneError(f"unknown FLUX part(s) {unknown}; choose from {', '.join(PARTS)}")
    wanted = set(parts) | {"scheduler"}
    wanted |= {"tokenizer"} if "text_encoder" in parts else set()
    wanted |= {"tokenizer_2"} if "text_encoder_2" in parts else set()
    device = torch.device(device)
    dtype = dtype or resolve_dtype("auto", device)

    loaded = load_parts(
        base_model,
        tuple(p for p in PARTS if p in wanted),
        default_classes=_CLASSES,
        build_preset=lambda name: vars(build(name)),
        dtype=dtype,
        device=device,
        quantize=quantize,
        example=example,
        pipeline=pipeline,
        layout="model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/",
    )
    return FluxComponents(**loaded)


def load_pipeline(
    base_model: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> FluxPipeline:
    """A ready ``FluxPipeline`` with every part of ``base_model`` (see ``load_components``)."""
    parts = ("transformer", "vae", "text_encoder", "text_encoder_2")
    return pipeline_from_components(load_components(base_model, dtype=dtype, device=device, parts=parts))


# ---- encoding ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompts(c: FluxComponents, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
    """Text conditioning as FLUX.1 uses it: ``prompt_embeds``, T5 hidden states [B, max_sequence_length, D], and
    ``pooled_prompt_embeds``, CLIP's pooled output [B, P], each on its encoder's device and dtype. Matches
    ``FluxPipeline.encode_prompt`` (no attention masks, as every FLUX trainer by default;
    reference/local-trainers.md §0)."""
    if c.text_encoder is None or c.text_encoder_2 is None or c.tokenizer is None or c.tokenizer_2 is None:
        raise ValueError("encode_prompts needs text_encoder, tokenizer, text_encoder_2 and tokenizer_2 loaded")
    prompts = list(prompts)
    clip_ids = c.tokenizer(
        prompts, padding="max_length", max_length=c.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    pooled_prompt_embeds = c.text_encoder(clip_ids.to(c.text_encoder.device), output_hidden_states=False).pooler_output
    t5_ids = c.tokenizer_2(
        prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids
    prompt_embeds = c.text_encoder_2(t5_ids.to(c.text_encoder_2.device), output_hidden_states=False)[0]
    return {
        "prompt_embeds": prompt_embeds.to(c.text_encoder_2.dtype),
        "pooled_prompt_embeds": pooled_prompt_embeds.to(c.text_encoder.dtype),
    }


def text_bytes(c: FluxComponents, max_sequence_length: int, itemsize: int) -> int:
    """Bytes of one cached caption: T5 hidden states [seq, D] plus the CLIP pooled vector [P]."""
    return (max_sequence_length * c.text_encoder_2.config.d_model + c.text_encoder.config.projection_dim) * itemsize


@torch.no_grad()
def encode_images(vae: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE latent distribution (mean, std), each [B, 16, H/8, W/8], unscaled; ``pixel_values`` [B, 3, H, W] in
    [-1, 1]. A cache stores both so each training step can draw a fresh ``mean + std * ε`` (diffusers
    ``DiagonalGaussianDistribution.sample``)."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
    dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.mean, dist.std


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent cell: 2 ** (VAE blocks - 1), 8 for FLUX.1 (``FluxPipeline.vae_scale_factor``)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def normalize_latents(latents: torch.Tensor, vae: Any) -> torch.Tensor:
    """``(z - shift_factor) * scaling_factor`` from the VAE config (0.1159 / 0.3611 for FLUX.1; diffusers
    ``train_dreambooth_lora_flux.py``); [B, 16, h, w] stays [B, 16, h, w]. ``vae`` is the VAE or its config."""
    config = getattr(vae, "config", vae)
    return (latents - (config.shift_factor or 0.0)) * config.scaling_factor


def denormalize_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """Inverse of ``normalize_latents``, before ``vae.decode`` (diffusers ``FluxPipeline.__call__``)."""
    return latents / vae_config.scaling_factor + (vae_config.shift_factor or 0.0)


# ---- packing and ids ---------------------------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/2)*(W/2), C*4]: 2×2 patches as tokens (diffusers ``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height_px: int, width_px: int, vae_scale_factor: int = 8) -> torch.Tensor:
    """[B, (H/2)*(W/2), C*4] → [B, C, H, W] for an image of ``height_px`` × ``width_px`` pixels
    (diffusers ``FluxPipeline._unpack_latents``)."""
    b, _, channels = packed.shape
    h = 2 * (int(height_px) // (vae_scale_factor * 2))
    w = 2 * (int(width_px) // (vae_scale_factor * 2))
    latents = packed.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


def latent_image_ids(height_latent: int, width_latent: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """Positions of the packed tokens, [(H/2)*(W/2), 3]: channel 1 = row, 2 = column, 0 = 0 (for RoPE).

    ``height_latent``/``width_latent`` are the unpacked latent sides (pixels / 8)."""
    h, w = height_latent // 2, width_latent // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def text_ids(seq_len: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """Text token positions, all zeros, [seq_len, 3] (diffusers ``FluxPipeline.encode_prompt``)."""
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)


def image_seq_len(latent_shape: tuple[int, ...]) -> int:
    """Image tokens of a normalized latent [..., h, w]: one per 2×2 patch."""
    return (latent_shape[-2] // 2) * (latent_shape[-1] // 2)


def reference_ids(latent_shape: tuple[int, ...], index: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """FLUX.1 [dev]/[schnell] takes no reference images (``kontext.reference_ids`` does)."""
    raise FinetuneError(EDIT_PAIRS_UNSUPPORTED)


def image_ids(latent_shape: tuple[int, ...], device: Any, dtype: torch.dtype) -> torch.Tensor:
    """Position ids of a normalized latent [..., h, w] after packing (``latent_image_ids``)."""
    return latent_image_ids(latent_shape[-2], latent_shape[-1], device, dtype)


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
    """The transformer's velocity for noisy latents [B, 16, h, w] at ``sigmas`` [B], packed [B, tokens, 64], called
    as ``FluxPipeline`` calls it: timestep = σ (the model scales by 1000), guidance embedded when given. FLUX.1
    [dev]/[schnell] takes no reference images (``kontext.predict`` does)."""
    if references:
        raise FinetuneError(EDIT_PAIRS_UNSUPPORTED)
    return transformer_call(model, pack_latents(noisy), sigmas, text, img_ids, txt_ids, guidance)


def transformer_call(
    model: Any,
    hidden: torch.Tensor,
    sigmas: torch.Tensor,
    text: dict[str, torch.Tensor],
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    guidance: float | None,
) -> torch.Tensor:
    """One ``FluxTransformer2DModel`` call on packed tokens [B, tokens, 64], as ``FluxPipeline`` makes it."""
    return model(
        hidden_states=hidden,
        encoder_hidden_states=text["prompt_embeds"],
        pooled_projections=text["pooled_prompt_embeds"],
        timestep=sigmas.to(hidden.dtype),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=None if guidance is None else torch.full_like(sigmas, guidance),
        return_dict=False,
    )[0]


# ---- sampling ------------------------------------------------------------------------------------------------------


def sample_images(
    pipe: FluxPipeline,
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
    """Render every prompt × seed, prompt-major: ``[p0s0, p0s1, …, p1s0, …]`` (see ``common.render``).

    ``text`` (``encode_prompts`` of ``prompts``) skips the text encoders; ``negative_text`` is unused (FLUX.1-dev
    is guidance-distilled: no negative prompt). ``max_sequence_length`` defaults to 256 for schnell (no guidance
    embedding) and 512 otherwise. ``inputs`` (edits) are refused: FLUX.1 takes no reference images.
    """
    if inputs:
        raise FinetuneError(EDIT_PAIRS_UNSUPPORTED, EXIT_USAGE)
    if text is None and prompts and seeds:
        if max_sequence_length is None:
            max_sequence_length = 512 if pipe.transformer.config.guidance_embeds else 256
        components = FluxComponents(**{f.name: getattr(pipe, f.name, None) for f in fields(FluxComponents)})
        text = encode_prompts(components, prompts, max_sequence_length)
    return render(
        pipe, prompts, seeds, size, text or {}, batch_size, num_inference_steps=steps, guidance_scale=guidance
    )


def check_config(cfg: Config) -> None:
    """A local folder must hold every part training loads; dev, schnell and Krea all train (schnell unguided).

    Raises:
        FinetuneError: a folder without one of the parts.
    """
    check_folder_parts(cfg.base_model, PARTS, "FluxPipeline")
    if cfg.sample.preview_model:
        raise FinetuneError(
            f"sample.preview_model: previews on a second model are for FLUX.2 [klein]; {cfg.base_model} is FLUX.1, "
            "whose LoRAs run on the model they were trained on. Remove the key.",
            EXIT_USAGE,
        )


def default_caption_dropout(base_model: str) -> float | None:
    """None: the config's default (0.05) serves FLUX.1."""
    return None
