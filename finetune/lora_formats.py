"""LoRA key formats seen in the wild for FLUX, and the model shapes a file must fit (for ``lora_import.py``).

A key is read as ``<prefix><module><suffix>``:

- prefixes: ``transformer.`` (diffusers/peft), ``base_model.model.`` (raw peft), ``diffusion_model.`` (BFL names:
  ai-toolkit, ComfyUI, musubi's ``convert_lora.py``), ``lora_unet_`` (kohya, musubi-tuner), ``lora_transformer_``
  (OneTrainer), ``lycoris_`` (SimpleTuner's LyCORIS LoRA), or none (DiffSynth's bare diffusers names; fal's bare BFL
  names and its ``sformer_blocks`` alias of ``transformer_blocks``) — reference/flux-family-2026.md §5.1,
  reference/comfyui-lora-keys.md §2;
- modules are diffusers names or BFL names, with ``.`` or ``_`` between parts (kohya, OneTrainer and musubi write
  ``_``); both are looked up by their ``_`` form, which is unambiguous for every FLUX module;
- suffixes ``.lora_A/.lora_B.weight`` (peft, also ``.lora_A.default.weight``), ``.lora_down/.lora_up.weight``
  (kohya) and ``.alpha``. LoKr, LoHa and DoRA tensors are recognised only to be refused.

Which diffusers module a BFL module is comes from each family module's ``BFL_BLOCKS`` (inside the blocks) and
``_OUTSIDE`` below (outside them). The shapes a file must fit are those of a real model (``LAYOUTS``) or of the base
model given, read from the diffusers transformer built on the meta device (no memory, no download).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import models
from finetune.errors import EXIT_USAGE, FinetuneError

__all__ = [
    "COMPATIBILITY",
    "FORMATS",
    "Layout",
    "ParsedKey",
    "Target",
    "candidate_layouts",
    "layout_for_base",
    "parse_key",
    "resolve_module",
]

# Key prefix → the format it marks (checked longest first; "" is the bare form).
_PREFIXES = (
    ("base_model.model.transformer.", "peft"),
    ("base_model.model.", "peft"),
    ("transformer.", "diffusers"),
    ("diffusion_model.", "bfl"),
    ("lora_unet_", "kohya"),
    ("lora_transformer_", "onetrainer"),
    ("lycoris_", "lycoris"),
    ("", "bare"),
)
# Suffix → the tensor's role. A/B are peft's names: A is the down projection (rank × in), B the up one (out × rank).
_SUFFIXES = (
    (".lora_A.default.weight", "A"),
    (".lora_B.default.weight", "B"),
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_down.weight", "A"),
    (".lora_up.weight", "B"),
    (".alpha", "alpha"),
)
# Tensors of adapters that are not a LoRA: refused by name (a LoKr weight is a Kronecker product, DoRA rescales W).
_FOREIGN = re.compile(r"(\.|^)(lokr_w[12](_[ab])?|lokr_t2|hada_w[12]_[ab]|hada_t[12]|dora_scale|lora_mid\.weight)$")
FORMATS: dict[str, str] = {
    "diffusers": "diffusers/peft keys transformer.<module>.lora_A/B.weight: diffusers scripts, SimpleTuner, finetune",
    "peft": "a raw peft state dict (base_model.model.<module>.lora_A/B.weight)",
    "kohya": "kohya lora_unet_<BFL module>.lora_down/up.weight + .alpha: kohya sd-scripts, musubi-tuner",
    "bfl": "BFL names diffusion_model.<module>.lora_A/B.weight: ai-toolkit, ComfyUI, finetune --format comfyui",
    "musubi": "diffusion_model.<module>.lora_down/up.weight (+ .alpha): musubi-tuner's convert_lora.py --target other",
    "onetrainer": "OneTrainer lora_transformer_<diffusers module, . → _>.lora_down/up.weight + .alpha",
    "lycoris": "SimpleTuner LyCORIS LoRA lycoris_<diffusers module, . → _>.lora_down/up.weight + .alpha",
    "diffsynth": "bare diffusers names <module>.lora_A/B.weight: DiffSynth-Studio",
    "fal": "bare BFL names or the sformer_blocks alias (fal trainers)",
}

# BFL module outside the blocks → (diffusers module, swap the two row halves of B): reference/comfyui-lora-keys.md §3
# (FLUX.1) and diffusers 0.42.1 _convert_non_diffusers_flux2_lora_to_diffusers (FLUX.2). BFL orders adaLN rows
# [shift | scale], diffusers [scale | shift] (ComfyUI's swap_scale_shift; diffusers' checkpoint converters swap them
# too, its FLUX.2 LoRA converter does not: flux-family-2026.md §8).
_OUTSIDE: dict[str, dict[str, tuple[str, bool]]] = {
    "flux1": {
        "img_in": ("x_embedder", False),
        "txt_in": ("context_embedder", False),
        "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1", False),
        "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2", False),
        "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1", False),
        "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2", False),
        "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1", False),
        "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2", False),
        "final_layer.linear": ("proj_out", False),
        "final_layer.adaLN_modulation.1": ("norm_out.linear", True),
    },
    "flux2": {
        "img_in": ("x_embedder", False),
        "txt_in": ("context_embedder", False),
        "time_in.in_layer": ("time_guidance_embed.timestep_embedder.linear_1", False),
        "time_in.out_layer": ("time_guidance_embed.timestep_embedder.linear_2", False),
        "guidance_in.in_layer": ("time_guidance_embed.guidance_embedder.linear_1", False),
        "guidance_in.out_layer": ("time_guidance_embed.guidance_embedder.linear_2", False),
        "final_layer.linear": ("proj_out", False),
        "final_layer.adaLN_modulation.1": ("norm_out.linear", True),
        "single_stream_modulation.lin": ("single_stream_modulation.linear", False),
        "double_stream_modulation_img.lin": ("double_stream_modulation_img.linear", False),
        "double_stream_modulation_txt.lin": ("double_stream_modulation_txt.linear", False),
    },
}
_BFL_KINDS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}
_BLOCK = re.compile(
    r"^(single_transformer_blocks|transformer_blocks|sformer_blocks|double_blocks|single_blocks)_(\d+)_(.+)$"
)

# Real models by transformer config (diffusers 0.42.1 defaults plus the hub configs; flux-family-2026.md §1): the
# shapes a file without --base must fit. FLUX.1 Kontext has FLUX.1 [dev]'s shapes, so only --base or the file's
# finetune.base_model tells it apart.
_REAL: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("flux1", "FLUX.1 [dev] (same shapes: [schnell], Krea, Kontext)", "black-forest-labs/FLUX.1-dev",
     dict(guidance_embeds=True)),
    ("flux2", "FLUX.2 [klein] 4B", "black-forest-labs/FLUX.2-klein-base-4B",
     dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
          guidance_embeds=False)),
    ("flux2", "FLUX.2 [klein] 9B", "black-forest-labs/FLUX.2-klein-base-9B",
     dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
          guidance_embeds=False)),
    ("flux2", "FLUX.2 [dev]", "black-forest-labs/FLUX.2-dev", dict(guidance_embeds=True)),
)  # fmt: skip
_REAL_BY_ID = {
    "black-forest-labs/FLUX.1-schnell": 0,
    "black-forest-labs/FLUX.1-Krea-dev": 0,
    "black-forest-labs/FLUX.1-Kontext-dev": 0,
    "black-forest-labs/FLUX.2-klein-4B": 1,
    "black-forest-labs/FLUX.2-klein-9B": 2,
    **{base: i for i, (_, _, base, _) in enumerate(_REAL)},
}

# Which tool loads which form of a finetune LoRA, per family layout, and how that was checked. Keys: (layout, form).
# Each value: tool → (loads, how checked). "test:" names a test here; "doc:" a reference document and section.
COMPATIBILITY: dict[tuple[str, str], dict[str, tuple[str, str]]] = {
    ("flux1", "diffusers"): {
        "diffusers": ("yes", "test: tests/test_lora_import.py::test_pipeline_loads_every_key (FluxPipeline, "
                      "FluxKontextPipeline)"),
        "ComfyUI": ("yes (.alpha keys when alpha ≠ rank)", "doc: comfyui-lora-keys.md §3"),
        "ai-toolkit": ("yes (diffusers names)", "doc: flux-family-2026.md §5.1"),
        "Replicate": ("yes (lora_weights of black-forest-labs/flux-dev-lora)", "doc: replicate-api.md §9.4"),
    },
    ("flux1", "kohya"): {
        "diffusers": ("yes", "test: tests/test_lora_import.py::test_pipeline_loads_every_key (double blocks at tiny "
                      "dims); tests/test_lora.py (every block at FLUX.1-dev dims, through diffusers' converter)"),
        "ComfyUI": ("yes (--format comfyui writes this file)", "doc: comfyui-lora-keys.md §4"),
        "ai-toolkit": ("unverified", "no source"),
        "Replicate": ("unverified", "no source"),
    },
    ("flux2", "diffusers"): {
        "diffusers": ("yes", "test: tests/test_lora_import.py::test_pipeline_loads_every_key (Flux2KleinPipeline, "
                      "Flux2Pipeline)"),
        "ComfyUI": ("v0.10.0 and later; blocks only", "doc: flux-family-2026.md §8"),
        "ai-toolkit": ("yes (diffusers names)", "doc: flux-family-2026.md §5.1"),
        "BFL endpoints": ("yes ('trained with AI-Toolkit, Diffusers')", "doc: flux-family-2026.md §3"),
    },
    ("flux2", "comfyui"): {
        "diffusers": ("yes", "test: tests/test_lora_export.py (Flux2KleinPipeline, every key consumed)"),
        "ComfyUI": ("yes, every FLUX.2-capable version (--format comfyui)", "doc: flux-family-2026.md §8"),
        "ai-toolkit": ("yes (its own format)", "doc: flux-family-2026.md §5.1"),
        "BFL endpoints": ("yes (the ai-toolkit form)", "doc: flux-family-2026.md §3"),
    },
    ("flux2", "kohya"): {
        "diffusers": ("yes", "test: tests/test_lora_import.py::test_pipeline_loads_every_key, test_lora_export.py"),
        "ComfyUI": ("yes (generic lora_unet_ rule)", "doc: flux-family-2026.md §5.3"),
        "ai-toolkit": ("unverified", "no source"),
        "BFL endpoints": ("unverified", "no source"),
    },
}  # fmt: skip


@dataclass(frozen=True)
class ParsedKey:
    """One file key split: ``prefix`` format, the module as written, the tensor's role (A, B, alpha)."""

    key: str
    style: str
    module: str
    role: str
    updown: bool  # kohya's lora_down/lora_up names rather than peft's lora_A/lora_B


@dataclass(frozen=True)
class Target:
    """Where a file module goes: diffusers modules in row order (several for a fused BFL module), their row counts
    and the input width; ``swap`` for adaLN's halves; ``bfl`` whether the file used BFL names."""

    modules: tuple[str, ...]
    rows: tuple[int, ...]
    columns: int
    swap: bool = False
    bfl: bool = False


@dataclass(frozen=True)
class Layout:
    """A model a LoRA can fit: its family, a label, the base model recorded on import, and its Linear shapes."""

    family: str
    label: str
    base_model: str
    shapes: dict[str, tuple[int, int]]  # diffusers module → (out, in)

    @property
    def layout(self) -> str:
        """The BFL-name family (Kontext's is FLUX.1's)."""
        from finetune.lora_export import _layout

        return _layout(self.family)


def parse_key(key: str) -> ParsedKey | None:
    """Split a key into prefix style, module and role; None when the suffix is not a LoRA tensor's."""
    found = next(((suffix, role) for suffix, role in _SUFFIXES if key.endswith(suffix)), None)
    if found is None:
        return None
    suffix, role = found
    rest = key.removesuffix(suffix)
    updown = suffix.startswith((".lora_down", ".lora_up"))
    for prefix, style in _PREFIXES:
        if rest.startswith(prefix):
            return ParsedKey(key, style, rest[len(prefix) :], role, updown)
    raise AssertionError("the bare prefix matches everything")  # pragma: no cover


def is_foreign(key: str) -> bool:
    """A LoKr, LoHa, DoRA or LoCon tensor (not a plain LoRA)."""
    return bool(_FOREIGN.search(key))


@functools.cache
def _tables(family: str) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, tuple[str, ...]]]]:
    """``(diffusers, bfl)`` lookups by ``_`` form: kind → {suffix_ → dotted suffix} for diffusers block modules
    (from a one-block meta model of the family), and kind → {bfl suffix_ → diffusers suffixes} from ``BFL_BLOCKS``,
    plus kind ``""`` for the modules outside the blocks."""
    shapes = _meta_shapes(family, _one_block_config(family))
    diffusers: dict[str, dict[str, str]] = {"transformer_blocks": {}, "single_transformer_blocks": {}, "": {}}
    for name in shapes:
        kind, _, rest = name.partition(".")
        if kind in diffusers and rest.startswith("0."):
            suffix = rest[2:]
            diffusers[kind][suffix.replace(".", "_")] = suffix
        else:
            diffusers[""][name.replace(".", "_")] = name
    bfl: dict[str, dict[str, tuple[str, ...]]] = {"double_blocks": {}, "single_blocks": {}, "": {}}
    for kind, entries in models.family_module(family).BFL_BLOCKS.items():
        bfl_kind = {v: k for k, v in _BFL_KINDS.items()}[kind]
        for name, parts in entries:
            bfl[bfl_kind][name.replace(".", "_")] = parts
    for name in _OUTSIDE[family]:
        bfl[""][name.replace(".", "_")] = (name,)
    return diffusers, bfl


def resolve_module(module: str, layout: Layout) -> Target | None:
    """The diffusers module(s) a file's module name is in ``layout`` (None: not a module of it), shapes included.

    Raises nothing: a name that fits no module, or a block index past the model's depth, gives None.
    """
    family = layout.layout
    diffusers, bfl = _tables(family)
    flat = module.replace(".", "_")
    match = _BLOCK.match(flat)
    names: tuple[str, ...] = ()
    swap = is_bfl = False
    if match:
        kind, index, rest = match.groups()
        kind = "transformer_blocks" if kind == "sformer_blocks" else kind
        if kind in diffusers and rest in diffusers[kind]:
            names = (f"{kind}.{index}.{diffusers[kind][rest]}",)
        elif kind in bfl and rest in bfl[kind]:
            names = tuple(f"{_BFL_KINDS[kind]}.{index}.{p}" for p in bfl[kind][rest])
            is_bfl = True
    elif flat in diffusers[""]:
        names = (diffusers[""][flat],)
    elif flat in bfl[""]:
        name, swap = _OUTSIDE[family][bfl[""][flat][0]]
        names, is_bfl = (name,), True
    if not names or any(n not in layout.shapes for n in names):
        return None
    columns = {layout.shapes[n][1] for n in names}
    if len(columns) != 1:
        return None
    return Target(names, tuple(layout.shapes[n][0] for n in names), columns.pop(), swap, is_bfl)


# ---------------------------------------------------------------------------------------------------- shapes


def _one_block_config(family: str) -> dict[str, Any]:
    """The first real model's config of the family's layout, cut to one block of each kind."""
    layout = "flux1" if family == "kontext" else family
    config = next(c for f, _, _, c in _REAL if f == layout)
    return {**config, "num_layers": 1, "num_single_layers": 1}


def _meta_shapes(family: str, config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """diffusers module → (out, in) of every Linear of the family's transformer built from ``config`` on meta."""
    import torch
    from torch import nn

    layout = "flux1" if family == "kontext" else family
    if layout == "flux1":
        from diffusers import FluxTransformer2DModel as cls
    else:
        from diffusers import Flux2Transformer2DModel as cls
    keep = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(keep)
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@functools.cache
def _layout(family: str, label: str, base_model: str, config_json: str) -> Layout:
    return Layout(family, label, base_model, _meta_shapes(family, json.loads(config_json)))


def _make(family: str, label: str, base_model: str, config: dict[str, Any]) -> Layout:
    return _layout(family, label, base_model, json.dumps(config, sort_keys=True, default=list))


class UnsupportedFamily(FinetuneError):
    """A base model of a family whose module shapes the importer does not know (FLUX 3)."""


def candidate_layouts() -> list[Layout]:
    """The real models a file without ``--base`` (or a base in its metadata) may fit, in preference order."""
    return [_make(*entry) for entry in _REAL]


def layout_for_base(base_model: str) -> list[Layout]:
    """The layouts ``base_model`` may have: one when its shapes are known (a preset, a folder with a transformer
    config, a known hub id), else every real model of its family (the file's shapes decide)."""
    family = models.family_name(base_model)
    if ("flux1" if family == "kontext" else family) not in {f for f, *_ in _REAL}:
        raise UnsupportedFamily(
            f"{base_model}: importing {models.family_module(family).LABEL} LoRAs is not supported yet (the "
            "importer knows FLUX.1, FLUX.1 Kontext and FLUX.2 module shapes); a diffusers-key file of it loads as is "
            "with the pipeline's load_lora_weights",
            EXIT_USAGE,
        )
    if base_model.startswith("preset:"):
        config = dict(models.family_module(family).build_preset(base_model.split(":", 1)[1]).transformer.config)
        return [_make(family, base_model, base_model, config)]
    config_path = Path(base_model).expanduser() / "transformer" / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        return [_make(family, base_model, base_model, config)]
    if base_model in _REAL_BY_ID:
        _, label, _, config = _REAL[_REAL_BY_ID[base_model]]
        return [_make(family, label, base_model, config)]
    layout = "flux1" if family == "kontext" else family
    found = [_make(family, label, base_model, config) for f, label, _, config in _REAL if f == layout]
    if not found:  # pragma: no cover - every family has a real model
        raise FinetuneError(f"--base {base_model}: no known shapes for family {family}", EXIT_USAGE)
    return found


def tool_lines(family: str) -> list[str]:
    """For ``finetune models show``: per form a family's LoRA can be written in, which tools load it and how that was
    checked (``COMPATIBILITY``)."""
    from finetune.lora_export import _layout

    layout = _layout(family)
    lines = []
    for (fam, form), tools in COMPATIBILITY.items():
        if fam != layout:
            continue
        how = "the stored file" if form == "diffusers" else f"--format {form}"
        lines.append(f"  {form} ({how}):")
        lines += [f"    {tool}: {loads}  [{checked}]" for tool, (loads, checked) in tools.items()]
    return lines
