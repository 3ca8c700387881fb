"""What every model family shares: devices, dtypes, int8, and loading parts from a hub id or a diffusers folder.

Parts load with the classes the model's ``model_index.json`` names (``["transformers", "T5TokenizerFast"]``), as
``DiffusionPipeline.from_pretrained`` does, so any folder the family's pipeline loads also trains; a family's own
classes are the fallback for a folder without ``model_index.json``. Hub ids go through the HF cache first (no
network round trip when the weights are there) and honour ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from finetune.errors import EXIT_USAGE, FinetuneError


def _not_torchvision_fallback(record: logging.LogRecord) -> bool:
    """False for transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to
    `CLIPImageProcessorPil`" notice (transformers ``utils/import_utils.py``, ``_LazyModule.__getattr__``).

    diffusers' FLUX pipeline modules import ``CLIPImageProcessor`` and ``SiglipImageProcessor`` (for IP-Adapter and
    Redux, which we never use), so building any pipeline prints it; the PIL backend it falls back to is the one we
    want, and torchvision is no dependency of ours. Every other message of that logger still shows.
    """
    return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_not_torchvision_fallback)

__all__ = [
    "FLUX_SCHEDULER",
    "HUB_ID_RE",
    "PRESET_VAE_LOGVAR_SHIFT",
    "PRESET_WORDS",
    "bytes_to_unicode",
    "check_folder_parts",
    "edit_size",
    "fit_inputs",
    "QUANTIZE_HEADROOM_GIB",
    "bf16_fits",
    "load_parts",
    "model_index",
    "preset_name",
    "quiet_progress",
    "render",
    "resolve_device",
    "resolve_dtype",
    "resolve_quantize",
    "save_preset_folder",
    "torchao_config",
    "transformer_bf16_gib",
]

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The FLUX.1-dev/schnell scheduler config (scheduler/scheduler_config.json of both repos). FLUX.2 folders reuse it:
# diffusers' scripts/convert_flux2_to_diffusers.py loads FLUX.1-dev's scheduler for them, and ai-toolkit and
# SimpleTuner use the same numbers; the FLUX.2 pipelines set μ themselves (compute_empirical_mu).
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
PRESET_VAE_LOGVAR_SHIFT = 8.0  # presets' VAE log-variance bias: exp(-8 / 2) ≈ 0.018, a trained VAE's posterior std
# Words that get whole-word tokens in the presets' tokenizers; anything else still tokenizes (bytes / characters).
PRESET_WORDS = tuple(
    "a an the of on in at with and by for to from is photo picture painting drawing portrait oil style art "
    "cat dog man woman person face beach sunset sunrise sky city street forest mountain river sea snow rain "
    "chair table house car tree flower red blue green yellow black white dark light studio lighting close up "
    "sitting standing wearing hat shirt tok sks ohwx detailed high quality cinematic watercolor sketch".split()
)


def preset_name(base_model: str) -> str | None:
    """``tiny`` for ``preset:tiny``; None for anything else."""
    return base_model.split(":", 1)[1] if base_model.startswith("preset:") else None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: each byte maps to a printable character (openai/CLIP simple_tokenizer.py)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# ---- devices and dtypes ----------------------------------------------------------------------------------------


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given (checked to exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise FinetuneError(f"train.device: {name!r} is not a device; use auto, cpu, cuda or cuda:N ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(f"train.device: {name!r} asked for CUDA but no CUDA GPU is visible; use cpu or auto")
    return device


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """``auto`` → bfloat16 on CUDA, float32 elsewhere (CPU bf16 matmuls are slow and imprecise); else the name."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise FinetuneError(f"dtype {name!r} is not supported; use auto, float32, bfloat16 or float16")
    return _DTYPES[name]


# What training needs beside the bf16 transformer: activations at 1024 px, the VAE decoder, LoRA weights and Adam
# state, CUDA context. FLUX.1-dev's 22.2 GiB + 14 = 36 GiB: int8 on 24 and 32 GB cards, bf16 on 40 GB and up.
QUANTIZE_HEADROOM_GIB = 14.0


def bf16_fits(memory_gib: float, weights_gib: float) -> bool:
    """Whether a GPU of ``memory_gib`` trains a transformer of ``weights_gib`` bf16 weights without int8: the rule of
    ``train.quantize: auto`` (and of ``finetune env``'s plan)."""
    return memory_gib >= weights_gib + QUANTIZE_HEADROOM_GIB


def resolve_quantize(
    name: str, device: str | torch.device, setting: str = "train.quantize", *, weights_gib: float = 22.2
) -> str | None:
    """``train.quantize`` → ``"int8"`` or None. ``auto`` is int8 on a CUDA GPU whose memory is below the model's
    bf16 transformer (``weights_gib``) plus ``QUANTIZE_HEADROOM_GIB``, else None.

    Raises:
        FinetuneError: an unknown name, or int8 without torchao installed (checked here, before any model loads);
            ``setting`` names the option in the message (``train.quantize``, ``--quantize``).
    """
    device = torch.device(device)
    set_none = f"{setting} none" if setting.startswith("--") else f"{setting}=none"
    if name == "auto":
        small = device.type == "cuda" and not bf16_fits(
            torch.cuda.get_device_properties(device).total_memory / 2**30, weights_gib
        )
        name = "int8" if small else "none"
    if name == "none":
        return None
    if name != "int8":
        raise FinetuneError(f"{setting}: {name!r} is not supported; use auto, none or int8", EXIT_USAGE)
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        need = weights_gib + QUANTIZE_HEADROOM_GIB
        raise FinetuneError(
            f"{setting}: int8 needs torchao, which is not installed; run `pip install 'finetune[quantize]'`, "
            f"or set {set_none} (this model in bf16 needs a GPU with about {need:.0f} GiB or more)",
            EXIT_USAGE,
        ) from e
    return name


def torchao_config(quantize: str) -> Any:
    """torchao's int8 weight-only config: one int8 per weight plus one scale per output channel; activations and
    the matmul stay in the compute dtype (torchao ``Int8WeightOnlyConfig``)."""
    from torchao.quantization import Int8WeightOnlyConfig

    assert quantize == "int8", quantize
    return Int8WeightOnlyConfig()


def transformer_bf16_gib(base_model: str, known: Mapping[str, float]) -> float:
    """The transformer's size in bf16, GiB: from a local folder's safetensors headers (parameter count × 2 bytes),
    else ``known`` (hub id → GiB, from the model cards), else the largest known figure (the safe side)."""
    folder = Path(base_model).expanduser() / "transformer"
    if preset_name(base_model) is not None:
        return 0.0
    if folder.is_dir():
        count = 0
        for f in folder.glob("*.safetensors"):
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            count += sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
        if count:
            return count * 2 / 2**30
    return known.get(base_model, max(known.values(), default=0.0))


# ---- loading -------------------------------------------------------------------------------------------------------


@contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' and diffusers' own progress bars off inside the block, then back as they were.

    Reading or writing local weights draws "Loading weights" / "Writing model shards" / "Loading checkpoint shards"
    bars (transformers ``utils/logging.py`` and diffusers ``utils/logging.py``, ``disable_progress_bar``) that tell a
    user nothing they can act on. transformers' switch also turns off huggingface_hub's bars, so call this around
    cache and folder loads, not downloads. Warnings and our own bars are untouched, and so is everything when
    ``HF_HUB_DISABLE_PROGRESS_BARS=0`` asks for bars (the hub would warn that it cannot turn them off).
    """
    import huggingface_hub.utils as hub
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import constants
    from transformers.utils import logging as transformers_logging

    if constants.HF_HUB_DISABLE_PROGRESS_BARS is False:
        yield
        return
    before = (
        transformers_logging.is_progress_bar_enabled(),
        diffusers_logging.is_progress_bar_enabled(),
        hub.are_progress_bars_disabled(),
    )
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before[0]:
            transformers_logging.enable_progress_bar()
        if before[1]:
            diffusers_logging.enable_progress_bar()
        if before[2] and not hub.are_progress_bars_disabled():  # transformers' switch flips the hub's too
            hub.disable_progress_bars()
        elif not before[2] and hub.are_progress_bars_disabled():
            hub.enable_progress_bars()


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache() -> str:
    """The hub cache folder, read now (huggingface_hub reads HF_HUB_CACHE/HF_HOME once, at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def _chain_text(error: BaseException) -> str:
    texts, seen = [], set()
    while error is not None and id(error) not in seen:  # hub errors arrive wrapped in OSError by the loaders
        seen.add(id(error))
        texts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


def _missing_weights_error(base_model: str, part: str, error: Exception, layout: str) -> FinetuneError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    chain = _chain_text(error)
    if any(s in chain for s in ("GatedRepoError", "gated", " 401 ", " 403 ", "401 Client", "403 Client")):
        cause = f"{base_model} is a gated repository and this machine has no access to it yet"
    elif _offline():
        cause = f"{base_model} ({part}) is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    elif any(s in chain for s in ("RepositoryNotFoundError", "404 Client", "Repository Not Found")):
        cause = f"there is no repository {base_model} on the Hugging Face Hub (check the spelling)"
    elif any(s in chain for s in ("Name or service not known", "name resolution", "ConnectError", "ConnectionError")):
        cause = f"{base_model} ({part}) is not in the Hugging Face cache and huggingface.co cannot be reached"
    else:
        cause = f"{base_model} ({part}) is not in the Hugging Face cache and could not be downloaded"
    return FinetuneError(
        f"base_model: cannot load '{part}' of {base_model}: {cause} ({type(error).__name__}: {reason}).\n"
        f"To fix: accept the licence on https://huggingface.co/{base_model}, run `hf auth login` (or set HF_TOKEN) "
        "and run again with network access once to fill the cache; or set base_model to a local folder in diffusers "
        f"layout ({layout}), or to a preset: for random-weight test models.",
        EXIT_USAGE,
    )


def model_index(base_model: str, *, online: bool = True) -> dict | None:
    """The model's ``model_index.json`` (a folder's, or a hub id's from the HF cache, fetched when ``online`` and
    not offline); None for a preset or when it cannot be had (the loaders then say why)."""
    if preset_name(base_model) is not None:
        return None
    folder = Path(base_model).expanduser()
    if folder.is_dir():
        path = folder / "model_index.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if not HUB_ID_RE.match(base_model):
        return None
    from huggingface_hub import hf_hub_download

    for local_only in (True, False) if online and not _offline() else (True,):
        try:
            path = hf_hub_download(base_model, "model_index.json", cache_dir=_hub_cache(), local_files_only=local_only)
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except Exception:  # not cached, gated, offline, no such repo: the part loaders report it precisely
            continue
    return None


def _source(base_model: str, parts: tuple[str, ...], example: str, pipeline: str) -> tuple[str, bool, bool]:
    """(source, local files only, is a folder) for a hub id or folder; bad names are errors that say what to pass."""
    folder = Path(base_model).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file() and not all((folder / p).is_dir() for p in parts):
            raise FinetuneError(
                f"base_model: {folder} is not a diffusers {pipeline} folder (no model_index.json and no "
                f"{'/, '.join(parts)}/ subfolders); save one with {pipeline}.save_pretrained",
            )
        return str(folder), True, True
    if base_model.startswith((".", "/", "~")) or base_model.count("/") > 1 or "\\" in base_model:
        raise FinetuneError(
            f"base_model: folder {base_model} does not exist; pass an existing diffusers folder, a hub id such "
            f"as {example}, or a preset: name"
        )
    if not HUB_ID_RE.match(base_model):
        raise FinetuneError(
            f"base_model: {base_model!r} is neither a folder nor a hub id (owner/name); e.g. {example}, a local "
            "folder, or a preset: name"
        )
    return base_model, _offline(), False


def check_folder_parts(base_model: str, parts: tuple[str, ...], pipeline: str) -> None:
    """A local folder must hold every subfolder training loads; said before any model loads.

    Raises:
        FinetuneError: naming the missing subfolders and how to write a complete folder.
    """
    folder = Path(base_model).expanduser()
    if preset_name(base_model) is not None or not folder.is_dir():
        return
    missing = [p for p in parts if not (folder / p).is_dir()]
    if missing:
        raise FinetuneError(
            f"base_model: {folder} has no {', '.join(p + '/' for p in missing)} (a {pipeline} folder has "
            f"{', '.join(p + '/' for p in parts)}); save the whole pipeline with {pipeline}.save_pretrained",
            EXIT_USAGE,
        )


def _class(library: str, name: str) -> type:
    try:
        return getattr(importlib.import_module(library), name)
    except (ImportError, AttributeError) as e:
        raise FinetuneError(
            f"base_model: model_index.json names {library}.{name}, which cannot be imported ({e})"
        ) from e


def _load_part(source: str, part: str, cls: type, dtype: torch.dtype, local_only: bool, quantize: str | None) -> Any:
    kwargs: dict[str, Any] = {"subfolder": part, "local_files_only": local_only}
    if not Path(source).is_dir():
        kwargs["cache_dir"] = _hub_cache()
    if not issubclass(cls, torch.nn.Module):  # tokenizers, processors, schedulers: config only
        return cls.from_pretrained(source, **kwargs)
    if cls.__module__.startswith("diffusers"):
        if quantize and part == "transformer":  # quantized tensor by tensor as it loads: never all of it in bf16
            from diffusers import TorchAoConfig

            kwargs["quantization_config"] = TorchAoConfig(torchao_config(quantize))
        return cls.from_pretrained(source, torch_dtype=dtype, **kwargs)
    return cls.from_pretrained(source, dtype=dtype, **kwargs)


def load_parts(
    base_model: str,
    wanted: tuple[str, ...],
    *,
    default_classes: Mapping[str, tuple[str, str]],
    build_preset: Callable[[str], Mapping[str, Any]],
    dtype: torch.dtype,
    device: torch.device,
    quantize: str | None,
    example: str,
    pipeline: str,
    layout: str,
    substitutes: Mapping[str, tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Load ``wanted`` parts of a preset, hub id or folder: modules in eval mode, frozen, on ``device`` in ``dtype``.

    Classes come from ``model_index.json`` (``default_classes`` when a folder has none). ``quantize="int8"`` stores
    the transformer's Linear weights in int8 on the CPU before it moves to ``device``, so the values are the same on
    every device and process. ``example`` (a hub id), ``pipeline`` (its class) and ``layout`` (subfolders) go into
    error messages. ``substitutes`` maps a class name in ``model_index.json`` to the class that loads instead
    (FLUX.2 [dev]'s ``PixtralProcessor`` needs torchvision for its image half; training needs the tokenizer only).
    """
    preset = preset_name(base_model)
    if preset is not None:
        built = build_preset(preset)
        loaded = {p: built[p] for p in wanted}
    else:
        source, local_only, is_folder = _source(base_model, wanted, example, pipeline)
        index = model_index(base_model) or {}
        loaded = {}
        for part in wanted:
            library, name = index.get(part) or default_classes[part]
            library, name = (substitutes or {}).get(name, (library, name))
            cls = _class(library, name)
            try:
                try:  # the cache first: no network round trips (and no retries) when the weights are already here
                    with quiet_progress():  # a local read; a download (below) keeps its progress bars
                        loaded[part] = _load_part(source, part, cls, dtype, True, quantize)
                except Exception:
                    if local_only:
                        raise
                    loaded[part] = _load_part(source, part, cls, dtype, False, quantize)
            except Exception as e:  # hub, cache and file errors come in many types; all mean "weights missing"
                if is_folder:
                    raise FinetuneError(f"base_model: cannot load '{part}' from {source}: {e}") from e
                raise _missing_weights_error(base_model, part, e, layout) from e

    for part, module in loaded.items():
        if isinstance(module, torch.nn.Module):
            if preset is not None:  # built in float32; loaded parts already came in ``dtype`` (fp32-pinned parts kept)
                torch.nn.Module.to(module, dtype=dtype)  # plain Module.to: diffusers' .to warns about an empty list
                if quantize and part == "transformer":  # a loaded transformer came quantized by from_pretrained
                    from torchao.quantization import quantize_

                    quantize_(module, torchao_config(quantize))
            module.to(device).eval().requires_grad_(False)
    return loaded


def save_preset_folder(path: str | Path, pipeline: Callable[[], Any]) -> Path:
    """Write a preset's pipeline (``pipeline()``, built once the folder is known to be free) as a diffusers folder that
    the family's pipeline and ``load_components`` load. The folder appears whole (written beside it, then renamed); an
    existing preset folder is replaced, anything else at ``path`` is refused."""
    from finetune.files import atomic_dir

    path = Path(path)
    if path.exists() and not (path / "model_index.json").is_file():
        raise FinetuneError(f"{path} exists and is not a saved pipeline; choose an empty or new folder")
    pipe = pipeline()
    with atomic_dir(path) as tmp, quiet_progress():  # no "Writing model shards" bar per text encoder
        pipe.save_pretrained(tmp, safe_serialization=True)
        if path.exists():
            shutil.rmtree(path)
    return path


# ---- sampling ------------------------------------------------------------------------------------------------------


def edit_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The output (w, h) for an input image of ``width`` × ``height``: the bucket of area ≤ ``size``² whose aspect
    ratio is closest to the input's (``dataset.bucket_sizes``), up- or downscaled, as training resizes a reference to
    its target's bucket."""
    from finetune.dataset import bucket_sizes

    target = math.log(width / height)
    return min(bucket_sizes(size), key=lambda s: (abs(math.log(s[0] / s[1]) - target), -s[0] * s[1]))


def fit_inputs(images: list, size: int) -> list:
    """Input images for one edit: RGB, scaled to cover the first image's ``edit_size`` and centre-cropped to it
    (``dataset.load_bucket_image``), every reference at that size as in training."""
    from PIL import Image, ImageOps

    w, h = edit_size(*images[0].size, size)
    return [ImageOps.fit(im.convert("RGB"), (w, h), Image.Resampling.LANCZOS) for im in images]


def render(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    size: int | tuple[int, int],
    text: Mapping[str, torch.Tensor],
    batch_size: int | None,
    inputs: list[list] | None = None,
    input_call: Callable[[list], dict[str, Any]] | None = None,
    **call: Any,
) -> list:
    """Render every prompt × seed with ``pipe``, prompt-major: ``[p0s0, p0s1, …, p1s0, …]``, as PIL images.

    ``text`` maps the pipeline's embedding arguments (``prompt_embeds``, ...) to [len(prompts), ...] tensors; a
    ``negative_*`` entry holds one row, shared by every image. Start noise comes from a CPU ``torch.Generator`` seeded
    per image, so a seed gives the same noise on any device and in any batch. ``batch_size`` images go through the
    transformer together (default: all seeds of one prompt). ``call`` goes to the pipeline as is (steps, guidance).

    Edits: ``inputs[i]`` are prompt i's input images (PIL). They are fitted to the edit size (``fit_inputs``: their
    aspect ratio at ``size``'s area), the output takes that size, and ``input_call(images)`` gives the pipeline's
    arguments for them (``image=...``); a batch then never mixes prompts.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise FinetuneError(f"sample size {height}x{width} must be positive multiples of 16 (VAE ×8, 2×2 packing)")
    if not prompts or not seeds:
        return []
    if inputs is not None and (len(inputs) != len(prompts) or not all(inputs) or input_call is None):
        raise ValueError(f"inputs: need a non-empty list of images for each of the {len(prompts)} prompts")
    transformer = pipe.transformer
    for name, tensor in text.items():
        rows = 1 if name.startswith("negative_") else len(prompts)
        if tensor.shape[0] != rows:
            raise ValueError(f"got {name} for {tensor.shape[0]} prompts, expected {rows}")
    text = {k: v.to(device=transformer.device, dtype=transformer.dtype) for k, v in text.items()}

    jobs = [(i, seed) for i in range(len(prompts)) for seed in seeds]
    batch_size = batch_size or len(seeds)
    # an edit's batch holds one prompt's seeds: its inputs and output size are that prompt's
    groups = [jobs[i * len(seeds) : (i + 1) * len(seeds)] for i in range(len(prompts))] if inputs else [jobs]
    fitted = [fit_inputs(images, math.isqrt(height * width)) for images in inputs] if inputs else []
    pipe.set_progress_bar_config(disable=True)
    images: list = []
    for group in groups:
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            index = torch.tensor([i for i, _ in chunk], device=transformer.device)
            embeds = {
                k: v.expand(len(chunk), *v.shape[1:]) if k.startswith("negative_") else v[index]
                for k, v in text.items()
            }
            edit: dict[str, Any] = {}
            if inputs:
                refs = fitted[chunk[0][0]]
                edit = {**input_call(refs), "width": refs[0].width, "height": refs[0].height}
            out = pipe(
                **embeds,
                **({"height": height, "width": width} | call | edit),
                generator=[torch.Generator("cpu").manual_seed(int(seed)) for _, seed in chunk],
                output_type="pil",
            )
            images.extend(out.images)
    return images
