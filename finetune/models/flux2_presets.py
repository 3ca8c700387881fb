"""FLUX.2 presets: tiny FLUX.2 pipelines built in process with random weights, deterministic per seed.

``flux2-small`` and ``flux2-tiny`` are klein-shaped (``Flux2KleinPipeline``: ``Qwen3ForCausalLM`` +
``Qwen2TokenizerFast``, no guidance embedder, real CFG); ``flux2-dev-tiny`` is dev-shaped (``Flux2Pipeline``:
``Mistral3ForConditionalGeneration`` + a plain fast tokenizer standing in for the ``PixtralProcessor``, guidance
embedder). Tokenizers are built with the
``tokenizers`` library (byte-level BPE) and wrapped in transformers classes, with chat templates that render prompts
the way the real Qwen3 / Mistral-Small-3.1 templates do for the messages the pipelines build. A saved preset is an
ordinary diffusers folder that the pipeline class loads with ``from_pretrained``.

Determinism: each part is built under ``torch.random.fork_rng(devices=[])`` with ``torch.manual_seed(seed + k)``
(k = 0 transformer, 1 VAE incl. its BatchNorm stats, 2 text encoder); the global RNG is left untouched.
"""

from __future__ import annotations

from typing import Any

import torch

from finetune.models.common import FLUX_SCHEDULER, PRESET_VAE_LOGVAR_SHIFT, PRESET_WORDS, bytes_to_unicode
from finetune.models.flux2 import DEV_LAYERS, KLEIN_LAYERS

__all__ = ["PRESET_NAMES", "build", "build_dev_tiny", "build_klein"]

_VAE_SMALL = dict(block_out_channels=(16, 32, 64, 64), norm_num_groups=8)
_VAE_TINY = dict(block_out_channels=(8, 8, 16, 16), norm_num_groups=4)

_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "flux2-small": {  # exactly the sizes asked for; joint_attention_dim = 3 x qwen hidden
        "transformer": dict(
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=64,
            num_attention_heads=4,
            mlp_ratio=3.0,
            axes_dims_rope=(16, 16, 16, 16),
        ),
        "vae": _VAE_SMALL,
        "text": dict(
            hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32
        ),
    },
    "flux2-tiny": {
        "transformer": dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            mlp_ratio=3.0,
            axes_dims_rope=(4, 4, 4, 4),
        ),
        "vae": _VAE_TINY,
        "text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16),
    },
}
_PRESETS["flux2-dev-tiny"] = {  # flux2-tiny's sizes (guidance embedder and Mistral come from build_dev_tiny)
    **_PRESETS["flux2-tiny"],
    "vision": dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    ),
}
PRESET_NAMES = tuple(_PRESETS)
_KLEIN_NAMES = ("flux2-small", "flux2-tiny")
_QWEN_LAYERS = 28  # hidden_states has layers + 1 entries: [27] exists and is not the final (normed) output
_MISTRAL_LAYERS = 31  # the same for (10, 20, 30): [30] exists and is not the final output
_VOCAB = 1024  # embedding rows; the tokenizers below stay under it

# Words that get whole-word tokens (with and without the byte-level leading space); anything else still tokenizes.
_PRESET_WORDS = PRESET_WORDS + (
    "TOK",
    "user",
    "assistant",
    "system",
    "You",
    "are",
    "AI",
    "that",
    "image",
    "descriptions",
)


# ---- tokenizers ----------------------------------------------------------------------------------------------------


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE on one pre-token: merge the lowest-ranked adjacent pair until none applies."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:], strict=False))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def _byte_bpe(vocab: dict[str, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Extend ``vocab`` (the specials) with the byte alphabet and merges that make each preset word one token, bare
    and with the byte-level space ``Ġ``: the word is split with the merges so far, then its pieces are joined left
    to right by new (later-ranked) merges, so earlier words keep their tokens. Deterministic, no trainer involved."""
    vocab = dict(vocab)
    byte_chars = bytes_to_unicode()
    for ch in byte_chars.values():
        vocab.setdefault(ch, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in _PRESET_WORDS:
        for text in (" " + word, word):
            pieces = _bpe([byte_chars[b] for b in text.encode()], ranks)
            left = pieces[0]
            for right in pieces[1:]:
                ranks[(left, right)] = len(ranks)
                left += right
                vocab.setdefault(left, len(vocab))
    return vocab, list(ranks)


# Renders like Qwen3's template for system/user/assistant turns (no tools): `<|im_start|>role\n...<|im_end|>\n`,
# add_generation_prompt → `<|im_start|>assistant\n`, plus the empty think block when enable_thinking is False.
# Content may be a string or a list of {"type": "text", "text": ...} parts. Past assistant turns drop their
# `<think>...</think>` part, as Qwen3's template does.
_QWEN3_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}{%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- set content = render(message.content) | string -%}"
    "{%- if message.role == 'assistant' and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# Renders like Mistral-Small-3.1's template for what Flux2Pipeline's `format_input` builds:
# `<s>[SYSTEM_PROMPT]sys[/SYSTEM_PROMPT][INST]text[/INST]`; image parts become `[IMG]`, assistant turns end in `</s>`.
_MISTRAL_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part.type == 'text' -%}{{- part.text -}}"
    "{%- elif part.type in ['image', 'image_url'] -%}{{- '[IMG]' -}}"
    "{%- else -%}{{- raise_exception('Only text and image blocks are supported in message content!') -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{{- '[SYSTEM_PROMPT]' + render(message.content) + '[/SYSTEM_PROMPT]' -}}"
    "{%- elif message.role == 'user' -%}{{- '[INST]' + render(message.content) + '[/INST]' -}}"
    "{%- elif message.role == 'assistant' -%}{{- render(message.content) + eos_token -}}"
    "{%- else -%}{{- raise_exception('Only user, system and assistant roles are supported!') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def _build_qwen_tokenizer() -> Any:
    """Qwen3's tokenizer: specials `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (eos), and `<think>`,
    `</think>` (not special, but atomic), with Qwen3's chat template."""
    return build_qwen_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        ["<think>", "</think>"],
        _QWEN3_TEMPLATE,
        model_max_length=131072,  # Qwen3's; the pipeline passes max_length=512 itself
        vocab_limit=_VOCAB,
    )


def build_qwen_tokenizer(
    specials: list[str], atomic: list[str], chat_template: str, *, model_max_length: int, vocab_limit: int
) -> Any:
    """Qwen2TokenizerFast (in transformers 5 the same class as Qwen2Tokenizer, tokenizers-backed) over a byte-level
    BPE: Qwen's pre-tokenizer regex + ByteLevel, NFC, byte-level decoder (built by the class from vocab + merges).
    ``specials`` then ``atomic`` tokens (kept whole, not special) at the end of the vocabulary, as in Qwen's;
    `<|endoftext|>` pads on the right and `<|im_end|>` ends, as Qwen3 and Qwen3-VL."""
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast

    vocab, merges = _byte_bpe({})
    for tok in [*specials, *atomic]:
        vocab[tok] = len(vocab)
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
        padding_side="right",
        chat_template=chat_template,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in atomic])
    assert len(tokenizer) == len(vocab) <= vocab_limit, (len(tokenizer), len(vocab))
    return tokenizer


_MISTRAL_SPECIALS = [  # Tekken's first ids (Mistral-Small-3.1): <unk> 0, <s> 1, </s> 2, ..., [IMG] 10, <pad> 11
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
]  # fmt: skip


def _build_mistral_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` (transformers 5: ``TokenizersBackend``) over a Tekken-like byte-level BPE built
    with the ``tokenizers`` library, with Mistral-Small-3.1's special ids and a chat template for ``format_input``'s
    messages. It stands in for the ``PixtralProcessor`` (which needs torchvision); it loads from tokenizer.json as
    is (``LlamaTokenizerFast`` would rebuild it with a metaspace pre-tokenizer and lose the spaces)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _byte_bpe({t: i for i, t in enumerate(_MISTRAL_SPECIALS)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # Tekken's split pattern (tiktoken-style: case runs, single digits, punctuation, whitespace), then bytes.
    pattern = (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
        r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
        r"\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _MISTRAL_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=131072,
        padding_side="right",
        chat_template=_MISTRAL_TEMPLATE,
    )
    assert len(tokenizer) == len(vocab) <= _VOCAB, (len(tokenizer), len(vocab))
    return tokenizer


# ---- models --------------------------------------------------------------------------------------------------------


def _build_vae(spec: dict[str, Any]) -> Any:
    """AutoencoderKLFlux2 at toy width: FLUX.2's layout (4 blocks = ×8, 32 latent channels, quant convs, BatchNorm
    over the 2×2-patchified 128 channels), with BN running stats that are not 0/1 and a narrow posterior."""
    from diffusers import AutoencoderKLFlux2

    latent_channels = 32
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=latent_channels,
        sample_size=64,
        use_quant_conv=True,  # FLUX.2's ae has encoder.quant_conv / decoder.post_quant_conv
        use_post_quant_conv=True,
        **spec,
    )
    with torch.no_grad():
        # The moments (mean ‖ logvar) come out of quant_conv when there is one, else encoder.conv_out (FLUX.1 preset);
        # shift the log-variance half there so the posterior std is ~0.02 instead of ~1.
        last = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
        last.bias[latent_channels:] -= PRESET_VAE_LOGVAR_SHIFT
        # The pipelines (de)normalise the 128-ch patchified latents with bn.running_mean / running_var; make them
        # visibly non-trivial so a path that skips the normalisation shows up in tests.
        n = vae.bn.running_mean.numel()
        vae.bn.running_mean.copy_(torch.randn(n) * 0.5)
        vae.bn.running_var.copy_(0.5 + 1.5 * torch.rand(n))
    return vae


def _build_transformer(spec: dict[str, Any], joint_attention_dim: int, guidance_embeds: bool) -> Any:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        guidance_embeds=guidance_embeds,
        joint_attention_dim=joint_attention_dim,
        **spec,
    )


def _scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)


def build_klein(name: str, seed: int = 0) -> dict[str, Any]:
    """Components of ``Flux2KleinPipeline`` for ``flux2-small`` / ``flux2-tiny``: scheduler, vae, text_encoder
    (Qwen3ForCausalLM, 28 layers), tokenizer (Qwen2TokenizerFast), transformer (joint_attention_dim = 3 × hidden).
    Wrap with ``Flux2KleinPipeline(**components, is_distilled=False)`` (the default)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if name not in _KLEIN_NAMES:
        raise ValueError(f"unknown klein preset {name!r}; choose one of {', '.join(_KLEIN_NAMES)}")
    spec = _PRESETS[name]
    hidden = spec["text"]["hidden_size"]
    tokenizer = _build_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _build_transformer(spec["transformer"], len(KLEIN_LAYERS) * hidden, guidance_embeds=False)
        torch.manual_seed(seed + 1)
        vae = _build_vae(spec["vae"])
        torch.manual_seed(seed + 2)
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=_VOCAB,
                num_hidden_layers=_QWEN_LAYERS,
                max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},  # Qwen3-4B's theta
                tie_word_embeddings=True,  # as Qwen3-4B
                bos_token_id=None,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id,
                **spec["text"],
            )
        )
    return {
        "scheduler": _scheduler(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "transformer": transformer.eval(),
    }


def build_dev_tiny(seed: int = 0) -> dict[str, Any]:
    """Components of ``Flux2Pipeline`` for ``flux2-dev-tiny``: a tiny Mistral3ForConditionalGeneration (31 text
    layers, 1-layer Pixtral vision tower) and a plain fast tokenizer in the processor's place; guidance_embeds=True."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    spec = _PRESETS["flux2-dev-tiny"]
    hidden = spec["text"]["hidden_size"]
    tokenizer = _build_mistral_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "[IMG]")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _build_transformer(spec["transformer"], len(DEV_LAYERS) * hidden, guidance_embeds=True)
        torch.manual_seed(seed + 1)
        vae = _build_vae(spec["vae"])
        torch.manual_seed(seed + 2)
        config = Mistral3Config(
            text_config=dict(
                model_type="mistral",
                vocab_size=_VOCAB,
                num_hidden_layers=_MISTRAL_LAYERS,
                max_position_embeddings=1024,
                rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000_000.0},  # Mistral-Small-3.x
                sliding_window=None,
                bos_token_id=ids["<s>"],
                eos_token_id=ids["</s>"],
                pad_token_id=ids["<pad>"],
                **spec["text"],
            ),
            vision_config=dict(model_type="pixtral", num_channels=3, **spec["vision"]),
            image_token_index=ids["[IMG]"],
            spatial_merge_size=2,
            vision_feature_layer=-1,
            multimodal_projector_bias=False,
            tie_word_embeddings=False,
        )
        text_encoder = Mistral3ForConditionalGeneration(config)
    return {
        "scheduler": _scheduler(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "transformer": transformer.eval(),
    }


def build(name: str, seed: int = 0) -> dict[str, Any]:
    """Components for any preset name in ``PRESET_NAMES``; the same name and seed give bitwise-equal weights."""
    if name == "flux2-dev-tiny":
        return build_dev_tiny(seed)
    return build_klein(name, seed)
