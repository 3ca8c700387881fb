"""FLUX 3 Image Klein presets: tiny FLUX 3 models built in process with random weights, deterministic per seed.

Every part is the class the real checkpoint uses: ``Flux3Transformer2DModel`` (per-mode blocks for the image, the
references and the text, then joint single blocks), ``AutoencoderKLFlux2`` (FLUX.2's VAE, built as flux2_presets
does), ``Qwen3VLForConditionalGeneration`` with 36 text layers (Qwen3-VL-4B's count, so the eight layers the encoder
stacks, 4, 8, ..., 32, exist and none is the final normed output) and a one-layer vision tower, a byte-level BPE
tokenizer built with the ``tokenizers`` library and wrapped in ``Qwen2TokenizerFast`` (Qwen3-VL's tokenizer class)
with a chat template that renders prompts as Qwen3-VL-Instruct's does, and the scheduler with FLUX 3's constant
shift. Qwen3-VL's processor (``Qwen3VLProcessor``, what the pipeline loads as ``tokenizer``) cannot be built without
torchvision (its video processor), which is no dependency of ours; its text path is its tokenizer and chat template,
which is what the preset saves (see flux3.py).

Determinism: each part is built under ``torch.random.fork_rng(devices=[])`` with ``torch.manual_seed(seed + k)``
(k = 0 transformer, 1 VAE incl. its BatchNorm stats, 2 text encoder); the global RNG is left untouched.
"""

from __future__ import annotations

from typing import Any

import torch

from finetune.models.flux2_presets import _VAE_SMALL, _VAE_TINY, _build_vae, build_qwen_tokenizer

__all__ = ["PRESET_NAMES", "SCHEDULER", "build", "build_tokenizer"]

# The base checkpoint's sampling schedule: a constant shift of 6.93, no resolution-dependent shift
# (diffusers modular_pipelines/flux3/before_denoise.py Flux3SetTimestepsStep).
SCHEDULER = dict(num_train_timesteps=1000, shift=6.93, use_dynamic_shifting=False)
_LAYERS = 36  # Qwen3-VL-4B's text layers; hidden_states has 37 entries and [32] is not the final (normed) one
_VOCAB = 1024

_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "flux3-small": {  # the benchmark shape: flux2-small's widths
        "transformer": dict(
            num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4, axes_dims_rope=(16,) * 4
        ),
        "vae": _VAE_SMALL,
        "text": dict(
            hidden_size=128,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [8, 4, 4]},
        ),
    },
    "flux3-tiny": {  # as small as the classes allow
        "transformer": dict(
            num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4,) * 4
        ),
        "vae": _VAE_TINY,
        "text": dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [4, 2, 2]},
        ),
    },
}
PRESET_NAMES = tuple(_PRESETS)

# Renders like Qwen3-VL-Instruct's template for the messages FLUX 3's encoder builds (one user turn, then the
# generation prompt): `<|im_start|>role\n...<|im_end|>\n`, `<|im_start|>assistant\n`; no thinking block. Content may
# be a string or a list of parts; image parts become `<|vision_start|><|image_pad|><|vision_end|>`.
_QWEN3_VL_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part.type == 'text' -%}{{- part.text -}}"
    "{%- elif part.type == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + render(message.content) + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def build_tokenizer() -> Any:
    """Qwen3-VL's tokenizer: a byte-level BPE with its specials at the end of the vocabulary and the chat template
    above (``flux2_presets.build_qwen_tokenizer``); pads with ``<|endoftext|>`` on the right, as the encoder asks."""
    return build_qwen_tokenizer(
        list(_SPECIALS),
        [],
        _QWEN3_VL_TEMPLATE,
        model_max_length=262144,  # Qwen3-VL's context; the encoder passes its own max_length
        vocab_limit=_VOCAB,
    )


def _text_encoder(spec: dict[str, Any], tokenizer: Any) -> Any:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    hidden = spec["hidden_size"]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _SPECIALS}
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=_VOCAB,
            num_hidden_layers=_LAYERS,
            max_position_embeddings=4096,
            tie_word_embeddings=True,  # as Qwen3-VL-4B
            pad_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            **spec,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            patch_size=16,
            out_hidden_size=hidden,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    return Qwen3VLForConditionalGeneration(config)


def build(name: str, seed: int = 0) -> dict[str, Any]:
    """Components for ``flux3-tiny`` / ``flux3-small``: transformer (joint_attention_dim = 8 × the text width), vae,
    text_encoder, tokenizer, scheduler; the same name and seed give bitwise-equal weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux3Transformer2DModel

    from finetune.models.flux3 import TEXT_LAYERS

    if name not in _PRESETS:
        raise ValueError(f"unknown FLUX 3 preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    spec = _PRESETS[name]
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Flux3Transformer2DModel(
            in_channels=128,
            cond_in_channels=128,
            joint_attention_dim=len(TEXT_LAYERS) * spec["text"]["hidden_size"],
            mlp_ratio=3.0,
            **spec["transformer"],
        )
        torch.manual_seed(seed + 1)
        vae = _build_vae(spec["vae"])
        torch.manual_seed(seed + 2)
        text_encoder = _text_encoder(spec["text"], tokenizer)
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER),
    }
