"""The model-family seam: one module per family behind one small interface, and which family a base model is.

Recipes, the cache and eval speak to a ``Family`` only (``family_for(base_model)``); each family module
(``flux1``: FLUX.1 dev/schnell/Krea; ``kontext``: FLUX.1 Kontext [dev]; ``flux2``: FLUX.2 dev and klein; ``flux3``:
FLUX 3 Image Klein) implements it as module-level functions, so adding a family is one module, its presets, configs
and tests. This package imports no torch until a family is asked for, so ``finetune --help`` stays instant.

The family comes from the base model: a preset name, a known hub id, or the ``_class_name`` of the pipeline in the
model's ``model_index.json`` (``modular_model_index.json`` for FLUX 3's modular pipeline); anything else is an error
that lists the supported families.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from finetune.errors import EXIT_USAGE, FinetuneError

if TYPE_CHECKING:
    import torch

__all__ = [
    "FAMILIES",
    "Family",
    "family_for",
    "family_module",
    "family_name",
    "fit_inputs",
    "preset_names",
    "resolve_device",
    "resolve_dtype",
    "resolve_quantize",
    "usage",
]

FAMILIES = ("flux1", "kontext", "flux2", "flux3")


class Family(Protocol):
    """What a model family module provides (models/flux1.py is the reference implementation)."""

    NAME: str  # "flux1"
    LABEL: str  # for messages and the README table
    PRESET_NAMES: tuple[str, ...]  # preset:<name> built in process with random weights
    PIPELINE_CLASSES: tuple[str, ...]  # model_index.json _class_name values of this family
    HUB_IDS: tuple[str, ...]  # known base models
    TEXT_PARTS: tuple[str, ...]  # the parts encode_prompts needs (their tokenizers come along)
    TEXT_KEYS: tuple[str, ...]  # the tensors encode_prompts returns, as cached and fed to predict
    LORA_ALPHA_KEYS: bool  # the LoRA file carries .alpha tensors (lora.save_lora)
    BFL_BLOCKS: dict  # block kind → (BFL module, the diffusers modules it fuses): the kohya/ComfyUI exports
    TRUE_CFG: bool  # sampling needs the empty prompt's embedding as the negative (klein base)
    MAX_REFERENCES: int  # reference images per edit pair (a pair zip) that predict takes after the noisy ones; 0: none

    def check_config(self, cfg: Any) -> None: ...  # refuse what the family cannot train, before any model loads
    def default_caption_dropout(self, base_model: str) -> float | None: ...  # None: the config's default
    def load_components(
        self, base_model: str, *, dtype: Any = None, device: Any = "cpu", parts: tuple = ..., quantize: Any = None
    ) -> Any: ...
    def transformer_gib(self, base_model: str) -> float: ...
    def max_sequence_length(self, base_model: str, configured: int = 0) -> int: ...
    def default_sampling(self, base_model: str) -> dict[str, Any]: ...
    def encode_prompts(self, c: Any, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]: ...
    def text_bytes(self, c: Any, max_sequence_length: int, itemsize: int) -> int: ...
    def encode_images(self, vae: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def vae_scale_factor(self, vae: Any) -> int: ...
    def normalize_latents(self, latents: torch.Tensor, vae: Any) -> torch.Tensor: ...
    def image_seq_len(self, latent_shape: tuple[int, ...]) -> int: ...
    def image_ids(self, latent_shape: tuple[int, ...], device: Any, dtype: Any) -> torch.Tensor: ...
    def reference_ids(self, latent_shape: tuple[int, ...], index: int, device: Any, dtype: Any) -> torch.Tensor: ...
    def text_ids(self, seq_len: int, device: Any, dtype: Any) -> torch.Tensor: ...
    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor: ...
    def predict(
        self,
        model: Any,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        text: dict,
        img_ids: Any,
        txt_ids: Any,
        guidance: Any,
        references: list[torch.Tensor] | None = None,  # normalized reference latents, one [B, C, h, w] per index
    ) -> torch.Tensor: ...
    def sampling_pipeline(self, transformer: Any, vae: Any, scheduler: Any) -> Any: ...
    def sample_images(self, pipe: Any, prompts: list[str], seeds: list[int], **kwargs: Any) -> list: ...
    def build_preset(self, name: str, seed: int = 0) -> Any: ...
    def save_preset(self, name: str, path: Path, seed: int = 0) -> Path: ...


def family_module(name: str) -> Family:
    """The family module ``finetune.models.<name>`` (``name`` from ``FAMILIES``)."""
    return importlib.import_module(f"finetune.models.{name}")


# Without importing the family modules (and torch): preset names and hub ids per family, checked against the
# modules' own constants by tests/models/test_family.py.
_PRESETS = {
    "flux1": ("tiny", "small"),
    "kontext": ("kontext-tiny", "kontext-small"),
    "flux2": ("flux2-tiny", "flux2-small", "flux2-dev-tiny"),
    "flux3": ("flux3-tiny", "flux3-small"),
}
_PIPELINES = {
    "FluxPipeline": "flux1",
    "FluxKontextPipeline": "kontext",
    "Flux2Pipeline": "flux2",
    "Flux2KleinPipeline": "flux2",
    "Flux3ModularPipeline": "flux3",
    "Flux3DistilledModularPipeline": "flux3",
}


def preset_names() -> list[str]:
    """Every ``preset:<name>`` of every family."""
    return [f"preset:{p}" for family in FAMILIES for p in _PRESETS[family]]


def _supported() -> str:
    return (
        "supported: FLUX.1 (FluxPipeline: black-forest-labs/FLUX.1-dev, -schnell, -Krea-dev), FLUX.1 Kontext "
        "(FluxKontextPipeline: black-forest-labs/FLUX.1-Kontext-dev), FLUX.2 (Flux2Pipeline: "
        "black-forest-labs/FLUX.2-dev; Flux2KleinPipeline: black-forest-labs/FLUX.2-klein-base-4B, -base-9B), "
        "FLUX 3 Image Klein (Flux3ModularPipeline: black-forest-labs/flux-3-image-klein-base), "
        f"and the presets {', '.join(preset_names())}"
    )


def family_name(base_model: str) -> str:
    """``flux1``, ``kontext``, ``flux2`` or ``flux3`` for a base model, without loading a model (or importing torch).

    Raises:
        FinetuneError: an unknown preset, or a model whose ``model_index.json`` names an unsupported pipeline.
    """
    if base_model.startswith("preset:"):
        name = base_model.split(":", 1)[1]
        for family in FAMILIES:
            if name in _PRESETS[family]:
                return family
        raise FinetuneError(f"base_model: unknown preset {base_model!r}; choose one of: {', '.join(preset_names())}")
    folder = Path(base_model).expanduser()
    index = None
    if folder.is_dir():
        path = folder / "model_index.json"
        if not path.is_file():  # FLUX 3's modular pipelines save modular_model_index.json instead
            path = folder / "modular_model_index.json"
        if path.is_file():
            try:
                index = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise FinetuneError(f"base_model: {path} is not valid JSON ({e}); save the pipeline again") from e
        else:  # a folder of parts without model_index.json: its transformer's class says the family
            config = folder / "transformer" / "config.json"
            cls = json.loads(config.read_text(encoding="utf-8")).get("_class_name", "") if config.is_file() else ""
            return "flux2" if cls.startswith("Flux2") else "flux3" if cls.startswith("Flux3") else "flux1"
    else:
        lowered = base_model.lower()
        if "kontext" in lowered:  # BFL's FLUX.1-Kontext-dev and fine-tunes named after it
            return "kontext"
        if "flux.2" in lowered or "flux2" in lowered:  # BFL's FLUX.2 repos and their fine-tunes by name
            return "flux2"
        if "flux-3" in lowered or "flux3" in lowered or "flux.3" in lowered:  # BFL's flux-3-image-klein(-base)
            return "flux3"
        if not lowered.startswith("black-forest-labs/") and "/" in base_model:
            from finetune.models.common import model_index  # a hub id of someone's fine-tune: ask its index

            index = model_index(base_model)
        if index is None:
            return "flux1"  # FLUX.1 hub ids, and ids whose index cannot be read yet: loading says what is missing
    cls = index.get("_class_name", "") if isinstance(index, dict) else ""
    if cls not in _PIPELINES:
        raise FinetuneError(
            f"base_model: {base_model} is a {cls or 'pipeline without _class_name'} model, which finetune does not "
            f"train; {_supported()}",
            EXIT_USAGE,
        )
    return _PIPELINES[cls]


def resolve_device(name: str = "auto") -> torch.device:
    """See ``common.resolve_device`` (here so recipes need no family module)."""
    from finetune.models.common import resolve_device

    return resolve_device(name)


def resolve_dtype(name: str, device: Any) -> torch.dtype:
    """See ``common.resolve_dtype``."""
    from finetune.models.common import resolve_dtype

    return resolve_dtype(name, device)


def resolve_quantize(name: str, device: Any, setting: str = "train.quantize", *, weights_gib: float) -> str | None:
    """See ``common.resolve_quantize``."""
    from finetune.models.common import resolve_quantize

    return resolve_quantize(name, device, setting, weights_gib=weights_gib)


def fit_inputs(images: list, size: int) -> list:
    """See ``common.fit_inputs``: an edit's input images at the size the model sees them."""
    from finetune.models.common import fit_inputs

    return fit_inputs(images, size)


def usage(base_model: str, family: str, trigger: str = "") -> list[str]:
    """Python lines that load ``base_model`` with a LoRA of ``family`` in diffusers and run it once (the registry's
    model card); torch-free. The calls use each pipeline's documented defaults."""
    prompt = f"a photo of {trigger}".strip()
    klein = "klein" in base_model.lower() or base_model in ("preset:flux2-tiny", "preset:flux2-small")
    pipeline, call = {
        "flux1": ("FluxPipeline", f'pipe("{prompt}", num_inference_steps=28, guidance_scale=3.5)'),
        "kontext": (
            "FluxKontextPipeline",
            'pipe(image=load_image("input.png"), prompt="<the instruction>", guidance_scale=2.5)',
        ),
        "flux2": (
            "Flux2KleinPipeline" if klein else "Flux2Pipeline",
            f'pipe("{prompt}", num_inference_steps=50, guidance_scale=4.0)',
        ),
        "flux3": ("ModularPipeline", f'pipe(prompt="{prompt}", output="images")'),
    }.get(family, ("DiffusionPipeline", f'pipe("{prompt}")'))
    imports = ["import torch", f"from diffusers import {pipeline}"]
    imports += ["from diffusers.utils import load_image"] if family == "kontext" else []
    if family == "flux3":  # a modular pipeline: its parts load after the blocks (Flux3ModularPipeline)
        load = [
            f'pipe = ModularPipeline.from_pretrained("{base_model}")',
            "pipe.load_components(torch_dtype=torch.bfloat16)",
            'pipe.to("cuda")',
        ]
    else:
        load = [f'pipe = {pipeline}.from_pretrained("{base_model}", torch_dtype=torch.bfloat16).to("cuda")']
    first = "[0]" if family == "flux3" else ".images[0]"  # output="images" returns the list itself
    return [*imports, "", *load, 'pipe.load_lora_weights("lora.safetensors")', f"image = {call}{first}"]


def family_for(base_model: str) -> Family:
    """The family module that trains ``base_model`` (see ``family_name``)."""
    return family_module(family_name(base_model))
