"""FLUX 3 Image Klein: the model family behind diffusers' modular ``Flux3ModularPipeline`` (base) and
``Flux3DistilledModularPipeline`` (step-distilled).

What the trainer caches and feeds the transformer is what the modular pipeline computes (tests/models/test_flux3.py
holds each piece equal to diffusers 0.42.1, ``modular_pipelines/flux3``):

- Text (``Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds``): Qwen3-VL's hidden states of layers 4, 8, ..., 32,
  stacked along the features (8 × 2560 = 20480-d for the real model), for one user turn under the chat template
  with the generation prompt. The window is the prompt's length rounded up to a multiple of 80 tokens and
  right-padded; the transformer attends to the padding, so the window is part of the conditioning. Padding tokens get
  position id 1, passed explicitly: transformers 5 would give them 0 (4.57, BFL's training environment, gives 1), and
  a trainer that leaves ``position_ids`` out trains on other embeddings.
- Every caption is cached at its own window, zero-padded to ``train.max_sequence_length`` (default 480, the largest
  multiple of 80 the config allows) with ``text_mask`` marking the window; ``predict`` feeds each sample only its
  window, so the transformer sees exactly the pipeline's tokens. A caption whose window is longer is refused before
  any model loads (the pipeline would encode it whole, up to 8192 tokens, so no shorter cut is faithful).
- Latents: FLUX.2's ``AutoencoderKLFlux2``, patchified 2×2 to 128 channels and normalised with its batch-norm
  statistics (``Flux3VaeEncoderStep``); tokens are the 128-channel cells, row-major.
- Position ids (T, H, W, L), float32, shared by the batch: image tokens (0, h/2, w/2, 0) (the pipeline's
  ``image_rope_scale`` 0.5), text tokens (0, 0, 0, l) over the window.
- The transformer takes timestep = σ (it scales by 1000 itself) and no guidance input. The base checkpoint samples
  with real CFG (3.5) against the empty prompt and a constant shift of 6.93; the step-distilled checkpoint is a flow
  map that also takes the timestep each step jumps to, so it is refused as a training base (``train.allow_distilled``
  overrides) and serves as ``sample.preview_model``.
- The pipeline expands every prompt with its prompt upsampler (a Qwen3.5-9B fine-tune) first. Training never does:
  a LoRA learns the captions as written. Samples (during training and in ``finetune eval``) encode the prompt as
  given too, so they show what the LoRA learned from those words; upsample a prompt yourself to sample like the
  pipeline's default.
- Edit pairs use FLUX 3's native reference mode: each reference's normalized latent is packed into the
  ``image_cond`` tokens (their own embedder and per-mode blocks, at timestep 0), reference i at position
  (0, h/2, w/2, -(i + 1)) (``Flux3PrepareImageCondLatentsStep``); only the noisy image's tokens come out. Training
  resizes each reference to its target's bucket (a multiple of 16 under 1 MP), which the pipeline's reference
  preprocessing (one kept whole and padded to the 16-px grid, several cropped to it under 1 MP) leaves as it is.

The presets (``preset:flux3-tiny``, ``flux3-small``) are built in process with random weights; see flux3_presets.py.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune.errors import EXIT_USAGE, FinetuneError
from finetune.files import atomic_dir
from finetune.models import common
from finetune.models.common import load_parts, preset_name, resolve_dtype

if TYPE_CHECKING:
    from PIL import Image

    from finetune.config import Config

__all__ = [
    "PRESET_NAMES",
    "Flux3Components",
    "build_preset",
    "check_config",
    "default_sampling",
    "encode_images",
    "encode_prompts",
    "image_ids",
    "image_seq_len",
    "is_distilled",
    "load_components",
    "max_sequence_length",
    "normalize_latents",
    "pack_latents",
    "predict",
    "prompt_window",
    "reference_ids",
    "sample_images",
    "sampling_pipeline",
    "save_preset",
    "text_bytes",
    "text_ids",
    "transformer_gib",
]

NAME = "flux3"
LABEL = "FLUX 3 Image Klein"
PRESET_NAMES = ("flux3-tiny", "flux3-small")
PIPELINE_CLASSES = ("Flux3ModularPipeline", "Flux3DistilledModularPipeline")
BASE = "black-forest-labs/flux-3-image-klein-base"
DISTILLED = "black-forest-labs/flux-3-image-klein"
HUB_IDS = (BASE, DISTILLED)
PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
TEXT_PARTS = ("text_encoder",)
TEXT_KEYS = ("prompt_embeds", "text_mask")
LORA_ALPHA_KEYS = False  # as FLUX.2: the adapter metadata carries alpha; Flux3LoraLoaderMixin reads it
MAX_REFERENCES = 10  # image_cond references per edit pair (the pipeline's prompt upsampler takes at most 10)
TRUE_CFG = True  # the base checkpoint samples with real CFG against the empty prompt
# No BFL module map: no documented ComfyUI (or kohya) key mapping for FLUX 3 LoRAs exists (reference/
# flux-family-2026.md §5.3), so lora_export refuses FLUX 3 and the diffusers file is the only form.
BFL_BLOCKS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {}
TEXT_LAYERS = (4, 8, 12, 16, 20, 24, 28, 32)  # Flux3TextEncoderStep text_encoder_out_layers
PAD_MULTIPLE = 80  # Flux3TextEncoderStep(pad_multiple=80)
PIPELINE_MAX_SEQUENCE_LENGTH = 8192  # the encoder's own cap (max_sequence_length default)
MAX_SEQUENCE_LENGTH = 480  # training's cache length: the largest multiple of 80 under the config's 512
IMAGE_ROPE_SCALE = 0.5  # Flux3PrepareLatentsStep(image_rope_scale=0.5)
CAPTION_DROPOUT = 0.1  # real CFG needs the empty caption trained, as for FLUX.2 [klein]
GUIDANCE = 3.5  # Flux3LoopDenoiser(guidance_scale=3.5)
_TRANSFORMER_GIB = {BASE: 10.3, DISTILLED: 10.3}  # 5.54B parameters × 2 bytes (meta-device count of the class)
# The classes of a folder saved without a modular_model_index.json (and what Qwen3VLProcessor loads as: its
# tokenizer; the processor itself needs torchvision for its video half, and encoding needs the tokenizer only).
_CLASSES = {
    "transformer": ("diffusers", "Flux3Transformer2DModel"),
    "vae": ("diffusers", "AutoencoderKLFlux2"),
    "text_encoder": ("transformers", "Qwen3VLForConditionalGeneration"),
    "tokenizer": ("transformers", "AutoTokenizer"),
}
_PROCESSORS = ("AutoProcessor", "Qwen3VLProcessor", "Qwen2VLProcessor", "Qwen2_5_VLProcessor")


@dataclass
class Flux3Components:
    """The parts of a FLUX 3 pipeline; any may be None when not loaded."""

    transformer: Any = None  # diffusers.Flux3Transformer2DModel
    vae: Any = None  # diffusers.AutoencoderKLFlux2
    text_encoder: Any = None  # transformers.Qwen3VLForConditionalGeneration
    tokenizer: Any = None  # Qwen2TokenizerFast (Qwen3VLProcessor's tokenizer, with the chat template)
    scheduler: Any = None  # diffusers.FlowMatchEulerDiscreteScheduler, constant shift 6.93


# ---- which model ---------------------------------------------------------------------------------------------------


def modular_index(base_model: str) -> dict | None:
    """A folder's or a cached hub id's ``modular_model_index.json`` (what ``ModularPipeline.save_pretrained``
    writes), else None."""
    if preset_name(base_model) is not None:
        return None
    folder = Path(base_model).expanduser()
    if folder.is_dir():
        path = folder / "modular_model_index.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if not common.HUB_ID_RE.match(base_model):
        return None
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(
            base_model, "modular_model_index.json", cache_dir=common._hub_cache(), local_files_only=True
        )
    except Exception:  # not cached: the loaders report what is missing
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def is_distilled(base_model: str) -> bool:
    """The step-distilled (flow-map) checkpoint: BFL's flux-3-image-klein, or a folder whose index names
    ``Flux3DistilledModularPipeline`` or whose transformer config has ``flow_map: true``."""
    if base_model == DISTILLED:
        return True
    if preset_name(base_model) is not None or base_model == BASE:
        return False
    index = modular_index(base_model) or common.model_index(base_model, online=False) or {}
    if index.get("_class_name") == "Flux3DistilledModularPipeline":
        return True
    config = Path(base_model).expanduser() / "transformer" / "config.json"
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("flow_map", False))


def check_config(cfg: Config) -> None:
    """Settings FLUX 3 cannot train with, refused before any model loads.

    Raises:
        FinetuneError: a distilled base (unless ``train.allow_distilled``), ``train.guidance`` (no guidance embedder),
            a ``train.max_sequence_length`` that is not a multiple of 80, a caption or sample prompt whose window is
            longer than it, a folder without one of the parts, a preview model that is not FLUX 3.
    """
    base = cfg.base_model
    if is_distilled(base) and not cfg.train.allow_distilled:
        raise FinetuneError(
            f"base_model: {base} is the step-distilled FLUX 3 Image Klein, a flow map (16 steps, no CFG, an extra "
            "target-timestep input): a LoRA trained on it learns against a distillation that a few hundred steps "
            f"undo. Train on the base checkpoint, {BASE}, and use the LoRA on the distilled one (sample.preview_model"
            f": {DISTILLED}); or set train.allow_distilled=true to train on it anyway.",
            EXIT_USAGE,
        )
    if "train.guidance" in cfg.explicit:
        raise FinetuneError(
            f"train.guidance: {LABEL} ({base}) has no guidance embedder, so there is nothing to set; remove the key "
            "(sample.guidance sets the CFG scale of samples)",
            EXIT_USAGE,
        )
    configured = cfg.train.max_sequence_length
    if configured % PAD_MULTIPLE:
        raise FinetuneError(
            f"train.max_sequence_length: {configured} is not a multiple of {PAD_MULTIPLE}; {LABEL} pads each prompt "
            f"to a multiple of {PAD_MULTIPLE} tokens, so use 80, 160, ..., 480 (0: {MAX_SEQUENCE_LENGTH})",
            EXIT_USAGE,
        )
    common.check_folder_parts(base, ("transformer", "vae", "text_encoder", "tokenizer"), "Flux3ModularPipeline")
    preview = cfg.sample.preview_model
    if preview:
        from finetune.models import family_name

        if family_name(preview) != NAME:
            raise FinetuneError(
                f"sample.preview_model: {preview} is not {LABEL}; previews render a FLUX 3 LoRA on another FLUX 3 "
                f"checkpoint (e.g. the distilled {DISTILLED}); name one, or remove the key",
                EXIT_USAGE,
            )
    _check_caption_lengths(cfg, max_sequence_length(base, configured))


def _check_caption_lengths(cfg: Config, limit: int) -> None:
    """Every caption the run caches fits the cache's window: the dataset's, the validation and regularisation
    images', their class-word versions (``train.preservation``) and the sample prompts (only the tokenizer loads)."""
    from finetune.dataset import read_dataset, read_datasets

    items = list(read_datasets(cfg.dataset, cfg.trigger_word).items)
    if cfg.train.validation.dataset:
        items += read_dataset(cfg.train.validation.dataset, cfg.trigger_word).items
    captions = {item.caption for item in items}
    class_word = cfg.train.preservation.class_word.strip()
    captions |= {c.replace(cfg.trigger_word, class_word) for c in captions} if class_word else set()
    if cfg.train.regularization.dataset:
        captions |= {item.caption for item in read_dataset(cfg.train.regularization.dataset, "").items}
    prompts = [p.replace("[trigger]", cfg.trigger_word) for p in cfg.sample.prompts]
    texts = sorted(captions | set(prompts))
    tokenizer = load_components(cfg.base_model, parts=("tokenizer",)).tokenizer
    for text in texts:
        tokens, window = prompt_window(tokenizer, text)
        if window > limit:
            raise FinetuneError(
                f"caption or sample prompt {text[:60]!r}{'...' if len(text) > 60 else ''} is {tokens} tokens under "
                f"the chat template, a window of {window}; {LABEL} training caches up to train.max_sequence_length="
                f"{limit} tokens (the pipeline would encode it whole, so it is not cut). Shorten it to fit.",
                EXIT_USAGE,
            )


def default_caption_dropout(base_model: str) -> float | None:
    """0.1: real CFG needs a trained empty caption (as for FLUX.2 [klein])."""
    return CAPTION_DROPOUT


def max_sequence_length(base_model: str, configured: int = 0) -> int:
    """The cache's text length: ``configured``, else 480; each caption uses its own window up to it."""
    return configured or MAX_SEQUENCE_LENGTH


def transformer_gib(base_model: str) -> float:
    """The bf16 transformer's size in GiB (``train.quantize: auto`` weighs it against the GPU's memory)."""
    return common.transformer_bf16_gib(base_model, _TRANSFORMER_GIB)


def default_sampling(base_model: str) -> dict[str, Any]:
    """Sampling defaults: the base's (50 steps, CFG 3.5) at 1024 px; the distilled checkpoint 16 steps without CFG;
    presets 8 steps at 256 px."""
    size = 256 if preset_name(base_model) is not None else 1024
    if is_distilled(base_model):
        return {"steps": 16, "size": size, "guidance": 1.0}
    return {"steps": 8 if size == 256 else 50, "size": size, "guidance": GUIDANCE}


# ---- loading -------------------------------------------------------------------------------------------------------


def _scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from finetune.models.flux3_presets import SCHEDULER

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER)


def load_components(
    base_model: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    parts: tuple[str, ...] = ("transformer", "vae", "text_encoder"),
    quantize: str | None = None,
) -> Flux3Components:
    """Load the named parts of a FLUX 3 model, in eval mode, on ``device`` in ``dtype`` (None: the dtype policy),
    with the classes its ``modular_model_index.json`` names (a part the index places in another repository loads
    from there). The text encoder brings its tokenizer (a processor in the index loads as its tokenizer); the
    scheduler is FLUX 3's (constant shift 6.93), as the pipeline creates it from config.

    Raises:
        FinetuneError: unknown part or preset, missing folder, or weights that cannot be had (with how to get them).
    """
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise FinetuneError(f"unknown FLUX 3 part(s) {unknown}; choose from {', '.join(PARTS)}")
    wanted = [p for p in PARTS if p in set(parts) | ({"tokenizer"} if "text_encoder" in parts else set())]
    wanted = [p for p in wanted if p != "scheduler"]
    device = torch.device(device)
    if preset_name(base_model) in PRESET_NAMES and wanted == ["tokenizer"]:  # the length check: no model built
        from finetune.models.flux3_presets import build_tokenizer

        return Flux3Components(tokenizer=build_tokenizer(), scheduler=_scheduler())
    index = modular_index(base_model) or {}
    by_source: dict[str, dict[str, tuple[str, str]]] = {}
    for part in wanted:
        entry = index.get(part)
        library, name = (entry[0], entry[1]) if isinstance(entry, list) and entry[0] else _CLASSES[part]
        if name in _PROCESSORS:
            library, name = "transformers", "AutoTokenizer"
        spec = entry[2] if isinstance(entry, list) and len(entry) > 2 and isinstance(entry[2], dict) else {}
        source = spec.get("pretrained_model_name_or_path") or base_model
        if Path(base_model).expanduser().is_dir() and not Path(source).is_dir():  # a moved folder: its own parts
            source = base_model
        by_source.setdefault(source, {})[part] = (library, name)
    loaded: dict[str, Any] = {}
    for source, classes in by_source.items():
        loaded |= load_parts(
            source,
            tuple(classes),
            default_classes=classes,
            build_preset=lambda name: build_preset(name).__dict__,
            dtype=dtype or resolve_dtype("auto", device),
            device=device,
            quantize=quantize,
            example=BASE,
            pipeline="Flux3ModularPipeline",
            layout="modular_model_index.json, transformer/, vae/, text_encoder/, tokenizer/",
        )
    return Flux3Components(**loaded, scheduler=_scheduler())


# ---- encoding ------------------------------------------------------------------------------------------------------


def _tokenizer(tokenizer: Any) -> Any:
    return getattr(tokenizer, "tokenizer", tokenizer)  # a Qwen3VLProcessor's own, or the tokenizer itself


def _chat(tokenizer: Any, prompt: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def prompt_window(tokenizer: Any, prompt: str) -> tuple[int, int]:
    """(tokens, window): the prompt's length under the chat template and that length rounded up to a multiple of 80,
    the window the pipeline encodes it in (below its cap of 8192)."""
    tokens = len(_tokenizer(tokenizer)(_chat(tokenizer, prompt))["input_ids"])
    return tokens, math.ceil(tokens / PAD_MULTIPLE) * PAD_MULTIPLE


@torch.no_grad()
def _encode(c: Flux3Components, prompts: list[str], cap: int, length: int | None) -> dict[str, torch.Tensor]:
    """Each prompt in its own window (capped at ``cap``, cut there as the pipeline does), zero-padded to ``length``
    (None: the longest window)."""
    if c.text_encoder is None or c.tokenizer is None:
        raise ValueError("encode_prompts needs text_encoder and tokenizer loaded")
    tok, device = _tokenizer(c.tokenizer), c.text_encoder.device
    rows = []
    for prompt in prompts:
        text = _chat(c.tokenizer, prompt)
        tokens = tok(text, return_tensors="pt", truncation=True, max_length=cap)["input_ids"].shape[1]
        window = min(math.ceil(tokens / PAD_MULTIPLE) * PAD_MULTIPLE, cap)
        inputs = tok(
            text, return_tensors="pt", padding="max_length", padding_side="right", truncation=True, max_length=window
        )
        ids, mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
        # padding at position 1, as transformers 4.57 (BFL's training environment) and the pipeline have it
        position_ids = torch.arange(window, device=device)[None].masked_fill(mask == 0, 1)
        out = c.text_encoder(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True, use_cache=False
        )
        stacked = torch.stack([out.hidden_states[k] for k in TEXT_LAYERS], dim=1)  # [1, 8, window, hidden]
        rows.append(stacked.permute(0, 2, 1, 3).reshape(window, -1).to(c.text_encoder.dtype))
    length = length or max(r.shape[0] for r in rows)
    embeds = torch.zeros(len(rows), length, rows[0].shape[1], dtype=rows[0].dtype, device=device)
    mask = torch.zeros(len(rows), length, dtype=rows[0].dtype, device=device)
    for i, row in enumerate(rows):
        embeds[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
    return {"prompt_embeds": embeds, "text_mask": mask}


def encode_prompts(c: Flux3Components, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` [B, max_sequence_length, 8·hidden] and ``text_mask`` [B, max_sequence_length]: each prompt
    encoded in its own window, as the pipeline encodes it (``Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds``),
    zeros after the window, the mask 1 inside it.

    Raises:
        FinetuneError: a prompt whose window is longer than ``max_sequence_length`` (it would be cut, and the
            pipeline would not cut it).
    """
    for prompt in prompts:
        tokens, window = prompt_window(c.tokenizer, prompt)
        if window > max_sequence_length:
            raise FinetuneError(
                f"prompt {prompt[:60]!r} is {tokens} tokens under the chat template, a window of {window}; {LABEL} "
                f"encodes up to {max_sequence_length} here and would have to cut it. Shorten it.",
                EXIT_USAGE,
            )
    return _encode(c, prompts, max_sequence_length, max_sequence_length)


def text_bytes(c: Flux3Components, max_sequence_length: int, itemsize: int) -> int:
    """Bytes of one cached caption: [seq, 8·hidden] + its mask (480 × 20480 in bf16 ≈ 19.7 MB for the real model)."""
    config = c.text_encoder.config
    hidden = getattr(config, "text_config", config).hidden_size
    return max_sequence_length * (len(TEXT_LAYERS) * hidden + 1) * itemsize


@torch.no_grad()
def encode_images(vae: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE latent distribution (mean, std), each [B, 32, H/8, W/8], before patchifying and normalising (FLUX.2's
    VAE; the pipeline encodes references with the mode, training draws ``mean + std·ε``)."""
    from finetune.models import flux2

    return flux2.encode_images(vae, pixel_values)


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent cell before patchifying: 8."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def normalize_latents(latents: torch.Tensor, vae: Any) -> torch.Tensor:
    """Raw VAE latents [B, 32, H, W] → [B, 128, H/2, W/2]: patchify, then the batch-norm normalisation
    (``Flux3VaeEncoderStep``, the same as FLUX.2's)."""
    from finetune.models import flux2

    return flux2.normalize_latents(latents, vae)


# ---- packing and ids -----------------------------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, 128, h, w] → [B, h·w, 128], row-major (``latents.flatten(2).transpose(1, 2)`` in the pipeline)."""
    return latents.flatten(2).transpose(1, 2)


def image_seq_len(latent_shape: tuple[int, ...]) -> int:
    """Image tokens of a normalized latent [..., h, w]: one per cell."""
    return latent_shape[-2] * latent_shape[-1]


def image_ids(latent_shape: tuple[int, ...], device: Any, dtype: Any = None, l: int = 0) -> torch.Tensor:  # noqa: E741
    """Positions (T, H, W, L) of a normalized latent [..., h, w], [h·w, 4] in float32 whatever ``dtype`` (the
    pipeline's; bf16 would round text positions above 256): (0, row·0.5, column·0.5, l) (``_prepare_image_ids``)."""
    h, w = latent_shape[-2], latent_shape[-1]
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.tensor([l])).float()
    ids[:, 1:3] *= IMAGE_ROPE_SCALE
    return ids.to(device)


def reference_ids(latent_shape: tuple[int, ...], index: int, device: Any, dtype: torch.dtype | None = None) -> Any:
    """Positions of reference ``index`` (0-based): l = -(index + 1) (``Flux3PrepareImageCondLatentsStep``)."""
    return image_ids(latent_shape, device, dtype, l=-(index + 1))


def text_ids(seq_len: int, device: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Text token positions (0, 0, 0, l), [seq_len, 4] in float32 (``Flux3TextRoPEInputsStep``)."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(seq_len)).float()
    return ids.to(device)


def _rows(tensor: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor | None:
    return tensor if index is None or tensor is None else tensor.index_select(0, index)


def predict(
    model: Any,
    noisy: torch.Tensor,
    sigmas: torch.Tensor,
    text: dict[str, torch.Tensor],
    img_ids: torch.Tensor,
    txt_ids: Any,
    guidance: float | None,
    references: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The transformer's velocity for noisy latents [B, 128, h, w] at ``sigmas`` [B], packed [B, h·w, 128], called
    as the pipeline's denoiser calls it: timestep = σ, no guidance. Each sample's text is its window (``text_mask``),
    with text ids over the window (``txt_ids`` is not used); samples of one window share a call, so a batch of
    captions with different windows costs one call per window.

    ``references`` (edit pairs): normalized reference latents [B, 128, h_i, w_i], one tensor per reference index,
    packed one after another into the ``image_cond`` tokens with ``reference_ids``; the model returns the noisy
    image's tokens only."""
    hidden = pack_latents(noisy)
    cond = cond_ids = None
    if references:
        cond = torch.cat([pack_latents(r.to(hidden.dtype)) for r in references], dim=1)
        cond_ids = torch.cat([reference_ids(r.shape, i, hidden.device) for i, r in enumerate(references)])
    embeds = text["prompt_embeds"]
    windows = text["text_mask"].sum(dim=1).round().long().tolist()
    timestep = sigmas.to(noisy.dtype)
    outs, order = [], []
    for window in sorted(set(windows)):
        rows = [i for i, w in enumerate(windows) if w == window]
        index = None if len(rows) == len(windows) else torch.tensor(rows, device=hidden.device)
        pick = functools.partial(_rows, index=index)
        outs.append(
            model(
                hidden_states=pick(hidden),
                encoder_hidden_states=pick(embeds)[:, :window],
                timestep=pick(timestep),
                img_ids=img_ids,
                txt_ids=text_ids(window, hidden.device),
                image_cond_hidden_states=pick(cond),
                image_cond_ids=cond_ids,
                return_dict=False,
            )[0]
        )
        order += rows
    if len(outs) == 1:
        return outs[0]
    return torch.cat(outs).index_select(0, torch.tensor(order, device=hidden.device).argsort())


# ---- pipelines and sampling ----------------------------------------------------------------------------------------


def _blocks(distilled: bool, text_encoder: bool) -> Any:
    """The modular pipeline's blocks without the prompt upsampler (prompts are encoded as given; see the module
    docstring) and, for sampling from cached embeddings, without the text encoder."""
    from diffusers import Flux3AutoBlocks, Flux3DistilledAutoBlocks

    blocks = Flux3DistilledAutoBlocks() if distilled else Flux3AutoBlocks()
    blocks.sub_blocks.pop("prompt_upsampler")
    if not text_encoder:
        blocks.sub_blocks.pop("text_encoder")
    return blocks


def pipeline_from_components(c: Flux3Components, *, text_encoder: bool | None = None) -> Any:
    """``Flux3ModularPipeline`` (``Flux3DistilledModularPipeline`` for a flow-map transformer) holding ``c``'s
    parts, without the prompt upsampler; with the text encoder step when ``c`` has a text encoder."""
    distilled = c.transformer is not None and bool(c.transformer.config.flow_map)
    with_text = c.text_encoder is not None if text_encoder is None else text_encoder
    pipe = _blocks(distilled, with_text).init_pipeline()
    skip = () if with_text else ("text_encoder", "tokenizer")
    parts = {k: v for k, v in vars(c).items() if v is not None and k not in skip}
    pipe.update_components(**parts)
    return pipe


def sampling_pipeline(transformer: Any, vae: Any, scheduler: Any) -> Any:
    """A FLUX 3 modular pipeline that samples from cached text embeddings (no text encoder, no upsampler)."""
    return pipeline_from_components(Flux3Components(transformer=transformer, vae=vae, scheduler=scheduler))


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
    """Render every prompt × seed, prompt-major, as PIL images. ``text``/``negative_text`` (``encode_prompts`` of
    ``prompts`` and of ``""``) skip the text encoder; each prompt goes in its own window. The base checkpoint applies
    real CFG against ``negative_text`` when ``guidance`` > 1; the distilled one takes no guidance. Start noise comes
    from a CPU generator per image (a seed gives the same image in any batch); ``batch_size`` images of one prompt
    share a call (default: all its seeds). ``inputs[i]``: prompt i's reference images (edits), fitted to the edit
    size (``common.fit_inputs``) and passed as the pipeline's ``image``; the output takes their size."""
    height, width = (size, size) if isinstance(size, int) else size
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise FinetuneError(f"sample size {height}x{width} must be positive multiples of 16 (VAE ×8, 2×2 packing)")
    if not prompts or not seeds:
        return []
    distilled = type(pipe).__name__ == "Flux3DistilledModularPipeline"
    cfg = not distilled and guidance > 1
    if text is None or (cfg and negative_text is None):
        components = Flux3Components(text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        cap = max_sequence_length or PIPELINE_MAX_SEQUENCE_LENGTH
        text = text if text is not None else _encode(components, prompts, cap, None)
        negative_text = negative_text or _encode(components, [""], cap, None)
    if not distilled:
        from diffusers import ClassifierFreeGuidance

        pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=guidance))
    device, dtype = pipe.transformer.device, pipe.transformer.dtype

    def window(embeds: dict[str, torch.Tensor], i: int) -> torch.Tensor:
        w = int(embeds["text_mask"][i].sum().round().item())
        return embeds["prompt_embeds"][i : i + 1, :w].to(device=device, dtype=dtype)

    pipe.set_progress_bar_config(disable=True)
    batch_size = batch_size or len(seeds)
    images: list = []
    for i in range(len(prompts)):
        embeds = {"prompt_embeds": window(text, i)}
        if cfg:
            embeds["negative_prompt_embeds"] = window(negative_text, 0)
        edit: dict[str, Any] = {"height": height, "width": width}
        if inputs:
            refs = common.fit_inputs(inputs[i], math.isqrt(height * width))
            edit = {"image": refs[0] if len(refs) == 1 else refs, "height": refs[0].height, "width": refs[0].width}
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start : start + batch_size]
            images += pipe(
                **embeds,
                **edit,
                num_inference_steps=steps,
                num_images_per_prompt=len(chunk),
                generator=[torch.Generator("cpu").manual_seed(int(s)) for s in chunk],
                output="images",
            )
    return images


# ---- presets -------------------------------------------------------------------------------------------------------


def build_preset(name: str, seed: int = 0) -> Flux3Components:
    """Build ``preset:<name>`` in process with random weights (see flux3_presets.py)."""
    from finetune.models import flux3_presets

    if name not in PRESET_NAMES:
        choices = ", ".join("preset:" + p for p in PRESET_NAMES)
        raise FinetuneError(f"unknown FLUX 3 preset {name!r}; choose one of: {choices}")
    return Flux3Components(**flux3_presets.build(name, seed))


def save_preset(name: str, path: Path, seed: int = 0) -> Path:
    """Write ``preset:<name>`` as a modular pipeline folder (``Flux3ModularPipeline.save_pretrained``: a
    ``modular_model_index.json`` and one subfolder per part) that ``ModularPipeline.from_pretrained`` and
    ``load_components`` load. The index names each part's folder by absolute path, so it is written for the final
    path; the folder appears whole (written beside it, then renamed); an existing preset folder is replaced."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not (path / "modular_model_index.json").is_file():
        raise FinetuneError(f"{path} exists and is not a saved modular pipeline; choose an empty or new folder")
    components = build_preset(name, seed)
    components.scheduler = None  # created from config by the pipeline (Flux3SetTimestepsStep's spec)
    with atomic_dir(path) as tmp, common.quiet_progress():
        pipeline_from_components(components).save_pretrained(str(tmp), overwrite_modular_index=True)
        index_file = Path(tmp) / "modular_model_index.json"
        index = json.loads(index_file.read_text(encoding="utf-8"))
        for entry in index.values():
            if isinstance(entry, list) and len(entry) > 2 and isinstance(entry[2], dict):
                entry[2]["pretrained_model_name_or_path"] = str(path)
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if path.exists():
            shutil.rmtree(path)
    return path
