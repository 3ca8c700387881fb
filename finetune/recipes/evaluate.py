"""`finetune eval`: resolve versions → check inputs → sample (cached) → score → report → append to the registry.

Local versions share one base pipeline, loaded once; each LoRA is a named adapter switched with ``set_adapters``
(scale per call) and ``base`` runs with adapters disabled. Text encoders are frozen, so every distinct prompt is
encoded once per run, then the encoders are freed before any image is drawn; the seeds of one prompt go through the
transformer as one batch. Remote versions (``replicate:owner/name:<version>``) are sampled with Replicate
predictions and downloaded at once. Every image is cached under ``<out>/images/`` by a hash of (version, prompt,
seed, settings), so re-running with the same ``--out`` after adding a version samples only the new one.

Every input problem (unknown ref, mixed base models, bad prompt file, unwritable folder, missing token) is raised
before the first image is sampled.

Edit LoRAs (``inputs=``, ``--inputs``): each version edits the same input images with their instructions (FLUX.1
Kontext: one input; FLUX.2: up to ten references). A report row is one edit × seed: the input as the model saw it,
each version's output, and the target when the inputs are pairs. The edit metrics replace the text-to-image ones:
similarity to the target (DINO, CLIP-I), how much of the input survives (DINO input→output) and instruction
following (CLIP directional similarity), aggregated with the same paired bootstrap intervals and win rates.
"""

from __future__ import annotations

import difflib
import gc
import hashlib
import json
import logging
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune import metrics, models, report
from finetune.errors import EXIT_FAILURE, FinetuneError
from finetune.files import sha256_file, write_atomic
from finetune.registry import Registry, RegistryError

__all__ = ["DEFAULT_PROMPTS", "EvalResult", "evaluate", "parse_size", "read_prompt_file"]

log = logging.getLogger(__name__)

# Subject alone, subject in new contexts, subject in a style, and prompts without the trigger (bleed: a LoRA that
# leaks its subject into unrelated prompts scores high DINO there).
DEFAULT_PROMPTS = (
    "a photo of [trigger]",
    "a close up portrait photo of [trigger], studio lighting",
    "a photo of [trigger] on a beach at sunset",
    "a photo of [trigger] in a busy city street at night",
    "an oil painting of [trigger]",
    "a watercolor sketch of [trigger]",
    "a photo of a dog sitting on a chair",
    "a photo of a red car in a forest",
)
TRIGGER_RE = re.compile(r"\[trigger\]|\{trigger\}")
CACHE_VERSION = 1  # bump when the cache key's meaning changes
METRIC_INFO = {
    "clip_t": ("CLIP-T", True, "Prompt alignment: CLIP cosine of image and prompt, trigger word removed."),
    "clip_i": ("CLIP-I", True, "Subject fidelity: mean pairwise CLIP image cosine to the training images "
               "(prompts with the trigger)."),
    "dino": ("DINO", True, "Subject fidelity: mean pairwise DINO ViT-S/16 CLS cosine to the training images "
             "(prompts with the trigger)."),
    "bleed": ("Bleed", False, "DINO similarity to the training images on prompts without the trigger "
              "(lower = less leakage)."),
    "diversity": ("Diversity", True, "1 - mean pairwise DINO cosine between seeds of one prompt (low = memorising)."),
}  # fmt: skip
# CLIP directional similarity needs a "before" text; we have only the instruction (the "after" side), so the before
# side is a neutral caption: the text direction is what the instruction adds to a plain photo (metrics.clip_direction).
EDIT_SOURCE_CAPTION = "a photo"
EDIT_METRIC_INFO = {
    "dino_target": ("DINO to target", True, "DINO ViT-S/16 CLS cosine of the output and the pair's target."),
    "clip_i_target": ("CLIP-I to target", True, "CLIP image cosine of the output and the pair's target."),
    "dino_input": ("DINO input→output", True, "DINO cosine of the output and its (first) input: how much of the "
                   "input survives. Trades off against the edit's strength; 1 = unchanged."),
    "clip_direction": ("CLIP direction", True, "Instruction following: cosine of the CLIP image change (output - "
                       f"input) and the text change (instruction - {EDIT_SOURCE_CAPTION!r}); InstructPix2Pix §4."),
}  # fmt: skip


@dataclass
class EvalResult:
    """What one eval run produced: the report folder and files, the document, and what it cost."""

    out_dir: Path
    metrics_path: Path
    grid_path: Path
    html_path: Path
    doc: dict
    counters: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Target:
    """One REF resolved: how to sample it and what we know about it."""

    ref: str
    kind: str  # base | registry | file | replicate
    label: str
    id: str | None = None
    lora_path: Path | None = None
    trigger_word: str = ""
    base_model: str | None = None
    lineage: dict = field(default_factory=dict)
    version: Any = None  # registry Version, for append_eval
    replicate_version: str | None = None


# ---- input parsing -------------------------------------------------------------------------------------------------


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a text file: one per line, ``#`` starts a comment line, blank lines skipped.

    Raises:
        FinetuneError: the file is missing, not UTF-8, or holds no prompt.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FinetuneError(f"prompt file {path} does not exist") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise FinetuneError(
            f"prompt file {path} is not UTF-8 (invalid byte at line {line}); save it as UTF-8 and run again"
        ) from None
    prompts = [line.strip() for line in text.lstrip("\ufeff").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise FinetuneError(f"prompt file {path} holds no prompt; write one prompt per line ('#' lines are comments)")
    return prompts


def parse_size(value: int | str | tuple[int, int]) -> tuple[int, int]:
    """``1024`` → (1024, 1024); ``"768x1024"`` → width 768, height 1024. Returns ``(width, height)``."""
    if isinstance(value, tuple):
        width, height = value
    elif isinstance(value, int):
        width = height = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(?:[x×]\s*(\d+))?\s*", str(value))
        if not m:
            raise FinetuneError(f"--size {value!r}: use one number (1024) or WIDTHxHEIGHT (768x1024)")
        width, height = int(m.group(1)), int(m.group(2) or m.group(1))
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise FinetuneError(f"--size {width}x{height}: width and height must be positive multiples of 16")
    return width, height


# ---- resolving references ------------------------------------------------------------------------------------------


def _lora_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise FinetuneError(f"{path} is not a readable safetensors file ({e})") from e


def _resolve(ref: str, registry: Registry, index: int) -> _Target:
    if ref == "base":
        return _Target(ref=ref, kind="base", label="base")
    if ref.startswith("replicate:"):
        spec = ref[len("replicate:") :]
        if not re.fullmatch(r"[\w.-]+/[\w.-]+:[0-9a-f]{8,64}", spec):
            raise FinetuneError(f"'{ref}' is not a Replicate version; use replicate:owner/name:<version id>")
        version_id = spec.split(":")[1]
        target = _Target(ref=ref, kind="replicate", label=ref, id=version_id, replicate_version=spec)
        # A version trained with `finetune train --backend replicate` is in the registry with its lineage.
        for model in registry.models():
            for v in registry.versions(model):
                if (v.lineage.get("replicate") or {}).get("version", "").split(":")[-1] == version_id:
                    target.lineage, target.version = v.lineage, v
                    target.trigger_word = v.lineage.get("trigger_word", "")
                    target.base_model = v.lineage.get("base_model")
        return target
    if ref.endswith(".safetensors"):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise FinetuneError(f"LoRA file {ref} does not exist")
        meta = _lora_metadata(path)
        file_id = sha256_file(path)
        return _Target(
            ref=ref, kind="file", label=f"{path.name}:{file_id[:8]}", id=file_id, lora_path=path.resolve(),
            trigger_word=meta.get("finetune.trigger_word", ""), base_model=meta.get("finetune.base_model") or None,
        )  # fmt: skip
    if "/" not in ref:
        close = difflib.get_close_matches(ref, ["base", *registry.models()], n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise FinetuneError(
            f"REF #{index + 1} '{ref}' is not a version reference: use owner/name[:<id>], base, a .safetensors "
            f"file, or replicate:owner/name:<version>.{hint}"
        )
    version = registry.resolve(ref)
    lineage = version.lineage
    return _Target(
        ref=ref, kind="registry", label=version.ref, id=version.id, lora_path=version.lora_path,
        trigger_word=lineage.get("trigger_word", ""), base_model=lineage.get("base_model"), lineage=lineage,
        version=version,
    )  # fmt: skip


def _same_base(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.is_dir() and pb.is_dir():
        return pa.resolve() == pb.resolve()
    return a == b


# ---- references images (training set) ------------------------------------------------------------------------------


def _training_images(lineage: dict) -> tuple[list[Any] | None, str | None]:
    """The version's training images from its dataset zip, or (None, why not)."""
    from PIL import Image

    dataset = lineage.get("dataset") or {}
    path, digest = dataset.get("path"), dataset.get("digest")
    if not path:
        return None, "its lineage names no dataset"
    if str(path).startswith(("http://", "https://")):
        return None, f"its dataset {path} is remote"
    zip_path = Path(path).expanduser()
    if not zip_path.is_file():
        return None, f"its dataset {path} is not on this machine"
    if digest and sha256_file(zip_path) != digest:
        return None, f"{path} changed since training (sha256 differs from the lineage's dataset digest)"
    images = []
    with zipfile.ZipFile(zip_path) as zf:
        for name in sorted(zf.namelist()):
            if name.lower().endswith((".png", ".jpg", ".jpeg", ".webp")) and "/" not in name:
                with zf.open(name) as f:
                    images.append(Image.open(f).convert("RGB"))
    return (images, None) if images else (None, f"its dataset {path} holds no image")


# ---- sampling ------------------------------------------------------------------------------------------------------


def _cache_key(
    identity: str, scale: float | None, prompt: str, seed: int, settings: dict, inputs: list[str] | None = None
) -> str:
    """sha256 naming one image: the version's identity (``base``, the LoRA's sha256, or the Replicate version), scale,
    prompt, seed, every setting that changes pixels, and for an edit the sha256 of each input image's file. A remote
    image does not depend on the local base or dtype."""
    payload = {"v": CACHE_VERSION, "version": identity, "lora_scale": scale, "prompt": prompt, "seed": seed}
    if inputs:  # only for edits, so text-to-image keys stay as they were
        payload["inputs"] = list(inputs)
    payload |= {k: settings[k] for k in ("steps", "width", "height", "guidance")}
    if not identity.startswith("replicate:"):
        payload |= {k: settings[k] for k in ("base_model", "max_sequence_length", "dtype")}
        if settings.get("quantize", "none") != "none":  # only then: the keys of unquantized images stay as they were
            payload["quantize"] = settings["quantize"]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _save_png(image: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def _sample_local(
    family: Any, jobs: list[dict], targets: list[_Target], settings: dict, device: Any, dtype: Any, bar: Any
) -> dict:
    """Draw every local job with one pipeline; returns counters. Each job: column, target index, prompt, seeds."""
    import torch

    counters = {"pipeline_loads": 0, "prompts_encoded": 0, "encode_calls": 0}
    base, quantize = settings["base_model"], None if settings["quantize"] == "none" else settings["quantize"]

    # Text encoders first, alone: encode each distinct prompt once, free them, then load the transformer. So T5-XXL
    # (9.5 GB in bf16) and the transformer never share the GPU.
    texts = sorted({job["prompt"] for job in jobs})
    encoders = family.load_components(base, dtype=dtype, device=device, parts=family.TEXT_PARTS)
    negative = [""] if family.TRUE_CFG else []  # true CFG's negative prompt, encoded with the rest
    text = family.encode_prompts(encoders, texts + negative, settings["max_sequence_length"])
    counters["encode_calls"] += 1
    counters["prompts_encoded"] += len(texts)
    row = {t: i for i, t in enumerate(texts)}
    del encoders
    if device.type == "cuda":  # on CPU the references dropped above free the memory; a full gc pass costs ~0.5 s
        gc.collect()
        torch.cuda.empty_cache()

    parts = family.load_components(base, dtype=dtype, device=device, parts=("transformer", "vae"), quantize=quantize)
    pipe = family.sampling_pipeline(parts.transformer, parts.vae, parts.scheduler)
    counters["pipeline_loads"] += 1
    pipe.set_progress_bar_config(disable=True)
    adapters: dict[int, str] = {}
    from diffusers.utils import logging as diffusers_logging

    # Our LoRAs are transformer-only: diffusers' "no LoRA keys for CLIPTextModel" notice on each load is noise here.
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        for t in sorted({job["target"] for job in jobs if targets[job["target"]].lora_path is not None}):
            adapters[t] = f"v{t}"
            try:
                pipe.load_lora_weights(str(targets[t].lora_path), adapter_name=adapters[t])
            except Exception as e:  # diffusers/peft raise ValueError/KeyError/RuntimeError on foreign/mismatched files
                raise FinetuneError(
                    f"{targets[t].ref}: its LoRA does not fit {settings['base_model']} ({type(e).__name__}: {e})"
                ) from e
    finally:
        diffusers_logging.set_verbosity(level)

    # In float32 the active adapter is fused into the weights for its column and unfused after (exact to ~1e-7):
    # unfused, the LoRA matmuls cost ~15-25% of a small model's forward. In bf16/fp16 adapters stay unfused, since
    # fuse/unfuse rounding would drift the base weights; there the LoRA path is ~1% of FLUX.1's forward. Int8 weights
    # are never fused into: each fuse would re-quantize them.
    fuse = dtype == torch.float32 and quantize is None
    size = (settings["height"], settings["width"])
    active, fused = None, False
    for job in jobs:  # grouped by column, so adapters switch once per column
        target = targets[job["target"]]
        if adapters and active != (job["target"], job["scale"]):
            if fused:
                pipe.unfuse_lora(components=["transformer"])
                fused = False
            if target.lora_path is None:
                pipe.disable_lora()
            else:
                pipe.enable_lora()
                pipe.set_adapters([adapters[job["target"]]], adapter_weights=[job["scale"]])
                if fuse:
                    pipe.fuse_lora(components=["transformer"], adapter_names=[adapters[job["target"]]])
                    fused = True
            active = (job["target"], job["scale"])
        i = row[job["prompt"]]
        images = family.sample_images(
            pipe, [job["prompt"]], job["seeds"], steps=settings["steps"], size=size, guidance=settings["guidance"],
            text={k: v[i : i + 1] for k, v in text.items()},
            negative_text={k: v[-1:] for k, v in text.items()} if negative else None,
            **({"inputs": [job["inputs"]]} if job.get("inputs") else {}),
        )  # fmt: skip
        for image, path in zip(images, job["paths"], strict=True):
            _save_png(image, path)
        bar.update(len(images))
    return counters


def _remote_input(prompt: str, seed: int, scale: float, settings: dict) -> dict:
    """Prediction input of a trained FLUX LoRA version (cog-flux predictor; reference/replicate-api.md §9.4)."""
    payload = {
        "prompt": prompt, "seed": int(seed), "num_inference_steps": settings["steps"],
        "guidance_scale": settings["guidance"], "lora_scale": scale, "output_format": "png", "num_outputs": 1,
    }  # fmt: skip
    if (settings["width"], settings["height"]) == (1024, 1024):
        payload["aspect_ratio"] = "1:1"
    else:
        payload |= {"aspect_ratio": "custom", "width": settings["width"], "height": settings["height"]}
    return payload


def _sample_remote(jobs: list[dict], targets: list[_Target], settings: dict, client: Any, bar: Any) -> int:
    """One prediction per image, each downloaded as soon as it succeeds (Replicate deletes outputs after an hour)."""
    from PIL import Image

    count = 0
    for job in jobs:
        target = targets[job["target"]]
        for seed, path in zip(job["seeds"], job["paths"], strict=True):
            prediction = client.create_prediction(
                target.replicate_version, _remote_input(job["prompt"], seed, job["scale"], settings), wait=60
            )
            prediction = client.wait_prediction(prediction)
            count += 1
            output = prediction.get("output")
            urls = [output] if isinstance(output, str) else list(output or [])
            if prediction.get("status") != "succeeded" or not urls:
                raise FinetuneError(
                    f"{target.ref}: prediction {prediction.get('id')} {prediction.get('status')} for prompt "
                    f"{job['prompt']!r} seed {seed}: {prediction.get('error') or 'no output'}",
                    EXIT_FAILURE,
                )
            raw = path.with_name(f".{path.stem}.download")
            client.download(urls[0], raw)
            try:
                with Image.open(raw) as im:
                    _save_png(im.convert("RGB"), path)
            finally:
                raw.unlink(missing_ok=True)
            bar.update(1)
    return count


# ---- edits ---------------------------------------------------------------------------------------------------------


def _save_fitted(folder: Path, sha256: str, image: Any) -> str:
    """Save an input or target as the model saw it (fitted to the edit size) under ``inputs/``, named by the file's
    hash and that size, so a re-run finds it; returns its path in the report folder."""
    name = hashlib.sha256(f"{sha256}:{image.width}x{image.height}".encode()).hexdigest()[:24] + ".png"
    path = folder / "inputs" / name
    if not path.is_file():
        _save_png(image, path)
    return f"inputs/{name}"


def _edit_rows(
    edits: list[tuple[Any, str]], prompt_rows: list[dict], folder: Path, settings: dict, use_targets: bool
) -> list[list[Any]]:
    """Add each edit's input (and target) to its report row, saved at the size the model sees; returns each row's
    decoded input images for ``family.sample_images(inputs=...)``.

    The inputs are fitted as sampling fits them (``models.common.fit_inputs``: the first input's aspect ratio at the
    area of ``--size``); the target is fitted to that same size the same way, so every image scored against the output
    has its size."""
    import math

    from PIL import Image, ImageOps

    from finetune.models.common import fit_inputs

    side = math.isqrt(settings["width"] * settings["height"])
    (folder / "inputs").mkdir(exist_ok=True)
    decoded: dict[str, Any] = {}  # by sha256: with every prompt on every input, an input is decoded once
    row_inputs = []
    for row, (item, _) in zip(prompt_rows, edits, strict=True):
        for im in item.inputs:
            if im.sha256 not in decoded:
                decoded[im.sha256] = im.open()
        raw = [decoded[im.sha256] for im in item.inputs]
        fitted = fit_inputs(raw, side)
        width, height = fitted[0].size
        target = item.target if use_targets else None
        target_file = None
        if target is not None:
            fitted_target = ImageOps.fit(target.open(), (width, height), Image.Resampling.LANCZOS)
            target_file = _save_fitted(folder, target.sha256, fitted_target)
        row |= {
            "name": item.name,
            "inputs": [_save_fitted(folder, im.sha256, f) for im, f in zip(item.inputs, fitted, strict=True)],
            "input_sources": [im.source for im in item.inputs],
            "input_sha256": [im.sha256 for im in item.inputs],
            "instruction_source": item.instruction_source if use_targets else None,
            "target": target_file,
            "target_source": target.source if target is not None else None,
            "width": width,
            "height": height,
        }
        row_inputs.append(raw)
    return row_inputs


def _score_edits(doc: dict, targets: list[_Target], folder: Path, scorers: metrics.Scorers) -> None:
    """Fill each output's edit scores: ``clip_direction`` and ``clip_i_target`` (CLIP), ``dino_input`` and
    ``dino_target`` (DINO). Target scores only where the row has a target; the input is the first one, as fitted."""
    from PIL import Image

    def load(name: str) -> Any:
        with Image.open(folder / name) as im:
            return im.convert("RGB")

    images, rows = doc["images"], doc["prompts"]
    outputs = [load(e["file"]) for e in images]
    inputs = [load(r["inputs"][0]) for r in rows]
    with_target = [p for p, r in enumerate(rows) if r.get("target")]
    target_images = [load(rows[p]["target"]) for p in with_target]
    input_of = [e["prompt_index"] for e in images]
    scored = [n for n, e in enumerate(images) if rows[e["prompt_index"]].get("target")]
    target_of = [with_target.index(images[n]["prompt_index"]) for n in scored]
    column_target = {c["key"]: c["version"] for c in doc["columns"]}
    default_trigger = next((t.trigger_word for t in targets if t.trigger_word), "")

    def put(metric: str, which: list[int], values: list[float]) -> None:
        for n, value in zip(which, values, strict=True):
            images[n]["scores"][metric] = value

    everything = list(range(len(images)))
    clip = scorers.clip
    if clip is not None:
        out_embeds = scorers.timed(clip.embed_images, outputs)
        in_embeds = scorers.timed(clip.embed_images, inputs)
        # The instruction as CLIP reads it: the trigger word the version's prompt got (base: the default) removed.
        texts = [
            metrics.remove_trigger(e["prompt"], targets[column_target[e["column"]]].trigger_word or default_trigger)
            for e in images
        ]
        unique = sorted(set(texts))
        text_embeds = scorers.timed(clip.embed_texts, [*unique, EDIT_SOURCE_CAPTION])
        after = text_embeds[[unique.index(t) for t in texts]]
        before = text_embeds[-1:].expand(len(images), -1)
        put("clip_direction", everything, metrics.clip_direction(out_embeds, in_embeds[input_of], after, before))
        if scored:
            target_embeds = scorers.timed(clip.embed_images, target_images)
            put("clip_i_target", scored, metrics.paired_cosine(out_embeds[scored], target_embeds[target_of]))
    dino = scorers.dino
    if dino is not None:
        out_embeds = scorers.timed(dino.embed_images, outputs)
        in_embeds = scorers.timed(dino.embed_images, inputs)
        put("dino_input", everything, metrics.paired_cosine(out_embeds, in_embeds[input_of]))
        if scored:
            target_embeds = scorers.timed(dino.embed_images, target_images)
            put("dino_target", scored, metrics.paired_cosine(out_embeds[scored], target_embeds[target_of]))


# ---- scoring -------------------------------------------------------------------------------------------------------


def _score(doc: dict, targets: list[_Target], folder: Path, scorers: metrics.Scorers, notes: list[str]) -> None:
    """Fill ``doc["images"][*]["scores"]`` and ``doc["diversity"]``; skipped scorers and references become notes."""
    from PIL import Image

    images = doc["images"]
    pil = []
    for entry in images:
        with Image.open(folder / entry["file"]) as im:
            pil.append(im.convert("RGB"))
    column_target = {c["key"]: c["version"] for c in doc["columns"]}

    # Which training images each version is compared with; base borrows the first versioned REF's.
    first_versioned = next((i for i, t in enumerate(targets) if t.kind != "base"), None)
    refs_for: dict[int, tuple[list[Any] | None, str | None]] = {}
    for i, target in enumerate(targets):
        source = targets[first_versioned] if target.kind == "base" and first_versioned is not None else target
        if target.kind == "base" and first_versioned is None:
            refs_for[i] = (None, "there is no versioned REF to compare it with")
        else:
            refs_for[i] = _training_images(source.lineage)
        if refs_for[i][0] is None:
            notes.append(f"CLIP-I, DINO and bleed skipped for {target.label}: {refs_for[i][1]}.")

    clip = scorers.clip
    if clip is not None:
        image_embeds = scorers.timed(clip.embed_images, pil)
        # base's prompts got the first versioned REF's trigger word (see evaluate): remove that one from them too, so
        # every column is scored against the same text
        default_trigger = next((t.trigger_word for t in targets if t.trigger_word), "")
        trigger_of = [targets[column_target[e["column"]]].trigger_word or default_trigger for e in images]
        texts = [metrics.remove_trigger(e["prompt"], trig) for e, trig in zip(images, trigger_of, strict=True)]
        unique = sorted(set(texts))
        text_embeds = scorers.timed(clip.embed_texts, unique)
        rows = [unique.index(t) for t in texts]
        for entry, score in zip(images, metrics.clip_text_score(image_embeds, text_embeds[rows]), strict=True):
            entry["scores"]["clip_t"] = score
        _reference_scores(images, image_embeds, refs_for, column_target, "clip_i", clip, scorers)
    dino = scorers.dino
    if dino is not None:
        image_embeds = scorers.timed(dino.embed_images, pil)
        _reference_scores(images, image_embeds, refs_for, column_target, "dino", dino, scorers)
        groups: dict[tuple[str, int], list[int]] = {}
        for n, entry in enumerate(images):
            groups.setdefault((entry["column"], entry["prompt_index"]), []).append(n)
        for (column, prompt_index), members in groups.items():
            value = metrics.diversity(image_embeds[members])
            if value is not None:
                doc["diversity"].append({"column": column, "prompt_index": prompt_index, "value": value})
        if len(doc["settings"]["seeds"]) < 2:
            notes.append("Diversity skipped: it needs at least two seeds.")


def _reference_scores(images, image_embeds, refs_for, column_target, metric, scorer, scorers) -> None:
    """Per image: mean pairwise cosine to its version's training images (``metric`` = clip_i or dino)."""
    embedded: dict[int, Any] = {}
    for n, entry in enumerate(images):
        t = column_target[entry["column"]]
        reference_images = refs_for[t][0]
        if reference_images is None:
            continue
        key = id(reference_images)
        if key not in embedded:
            embedded[key] = scorers.timed(scorer.embed_images, reference_images)
        entry["scores"][metric] = metrics.mean_pairwise_cosine(image_embeds[n : n + 1], embedded[key])


def _aggregate(doc: dict) -> None:
    """Fill ``doc["metrics"]`` and ``doc["aggregate"]``: per column and metric, the mean with a bootstrap 95% CI and
    the paired win rate against the reference column. CLIP-I and DINO count only prompts with the trigger (they ask
    for the subject); DINO on the other prompts is reported as bleed. Edit metrics count every row (edit × seed)."""
    info = EDIT_METRIC_INFO if "edit" in doc else METRIC_INFO
    has_trigger = [p["has_trigger"] for p in doc["prompts"]]
    per_column: dict[str, dict[str, dict]] = {c["key"]: {} for c in doc["columns"]}
    for entry in doc["images"]:
        item = (entry["prompt_index"], entry["seed"])
        subject = has_trigger[entry["prompt_index"]]
        for metric, value in entry["scores"].items():
            if metric in ("clip_i", "dino") and not subject:
                if metric == "dino":
                    per_column[entry["column"]].setdefault("bleed", {})[item] = value
                continue
            per_column[entry["column"]].setdefault(metric, {})[item] = value
    for d in doc["diversity"]:
        per_column[d["column"]].setdefault("diversity", {})[d["prompt_index"]] = d["value"]
    present = {m for by_metric in per_column.values() for m in by_metric}
    doc["metrics"] = {
        m: {"label": label, "higher_is_better": better, "description": desc}
        for m, (label, better, desc) in info.items()
        if m in present
    }
    reference = per_column[doc["reference_column"]]
    for column, by_metric in per_column.items():
        doc["aggregate"][column] = {
            metric: metrics.paired_summary(
                values,
                None if column == doc["reference_column"] else reference.get(metric),
                higher_is_better=info[metric][1],
            )
            for metric, values in by_metric.items()
        }


# ---- the recipe ----------------------------------------------------------------------------------------------------


def evaluate(
    refs: list[str],
    *,
    prompts: list[str] | None = None,
    inputs: str | Path | None = None,
    seeds: tuple[int, ...] | list[int] = (1, 2),
    steps: int | None = None,
    size: int | str | tuple[int, int] | None = None,
    guidance: float | None = None,
    lora_scales: tuple[float, ...] | list[float] = (1.0,),
    out: str | Path | None = None,
    allow_mixed_base: bool = False,
    clip_model: str | Path | None = metrics.DEFAULT_CLIP_MODEL,
    dino_model: str | Path | None = metrics.DEFAULT_DINO_MODEL,
    registry: Registry | str | Path | None = None,
    progress: bool = True,
    base_model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str = "auto",
) -> EvalResult:
    """Sample ``refs`` side by side on the same prompts, seeds and settings, score them and write a report.

    Args:
        refs: ``owner/name[:<id>]`` (registry), ``base``, a ``.safetensors`` path, or
            ``replicate:owner/name:<version>``. The first is the reference for win rates.
        prompts: prompt templates; ``[trigger]``/``{trigger}`` become each version's trigger word (``base``: the
            first versioned REF's). None: ``DEFAULT_PROMPTS``, or with ``inputs`` each edit's own instruction.
        inputs: edit LoRAs: a pair zip from ``finetune prepare``, a folder of ``NAME_start.EXT`` (+ ``NAME_end.EXT``)
            + ``NAME.txt``, or a folder of ``NAME.EXT`` + ``NAME.txt`` (``finetune.data.edit_inputs``). Each version
            edits every input with its instruction; a pair's target is shown and scored against. With ``prompts``
            too, every prompt is applied to every input instead and the instruction files are neither needed nor
            used (nor the targets, which show other edits). The base model must take input images (FLUX.1 Kontext,
            FLUX.2); remote versions cannot be sampled on inputs.
        seeds, steps, size, guidance: sampling settings, equal for every version; None = the base model's defaults
            (the family's ``default_sampling``). ``size`` is ``1024`` or ``"768x1024"`` (width x height).
        lora_scales: every LoRA version is sampled at each scale (one report column each).
        out: report folder (default ``reports/<timestamp>``); images cached there are reused.
        allow_mixed_base: sample LoRAs trained on another base anyway (with a warning in the report).
        clip_model, dino_model: scorer models (hub id or folder); one that cannot be loaded skips its metrics.
        registry: a Registry or its root; None = ``$FINETUNE_HOME``.
        base_model: the base to sample on; None = the first versioned REF's (``base`` alone: FLUX.1-dev).
        device, dtype: ``auto`` = CUDA + bfloat16 when available, else CPU + float32.
        quantize: the base transformer's weights: ``int8`` (torchao), ``none``, or ``auto`` = int8 on CUDA GPUs under
            36 GiB (as ``train.quantize``). Images are cached per setting.

    Raises:
        FinetuneError: bad input (exit code 2) before sampling; a failed remote prediction (exit code 1).
    """
    start = time.perf_counter()
    if not refs:
        raise FinetuneError("give at least one REF to evaluate (owner/name, base, a .safetensors file, ...)")
    registry = registry if isinstance(registry, Registry) else Registry(registry)
    targets = [_resolve(ref, registry, i) for i, ref in enumerate(refs)]
    seeds = [int(s) for s in seeds]
    lora_scales = [float(s) for s in lora_scales]
    if not seeds or len(set(seeds)) != len(seeds):
        raise FinetuneError(f"--seeds {seeds}: give one or more distinct seeds, e.g. --seeds 1,2,3")
    if not lora_scales or len(set(lora_scales)) != len(lora_scales):
        raise FinetuneError(f"--lora-scale {lora_scales}: give one or more distinct scales, e.g. 0.5,0.8,1.0")

    # The base pipeline: every local LoRA must have been trained on it (or --allow-mixed-base).
    warnings: list[str] = []
    local = [t for t in targets if t.kind in ("registry", "file")]
    named = [t for t in local if t.base_model]
    remote_bases = [t.base_model for t in targets if t.kind == "replicate" and t.base_model]
    base = base_model or (named[0].base_model if named else next(iter(remote_bases), "black-forest-labs/FLUX.1-dev"))
    mixed = [t for t in named if not _same_base(t.base_model, base)]
    if mixed:
        listing = "; ".join(f"{t.label} was trained on {t.base_model}" for t in mixed)
        if not allow_mixed_base:
            raise FinetuneError(
                f"the versions do not share a base model: sampling on {base}, but {listing}. Compare versions of "
                "one base, or pass --allow-mixed-base to sample them all on the first one anyway."
            )
        warnings.append(f"Mixed base models: every local version was sampled on {base}, but {listing}.")
    edit_set = None
    if inputs is not None:
        from finetune.data.edit_inputs import read_edit_inputs

        remote = [t.ref for t in targets if t.kind == "replicate"]
        if remote:
            raise FinetuneError(
                f"--inputs: {remote[0]} is a Replicate version; eval samples edits on local versions only (a registry "
                "version, a .safetensors file or base). Leave it out, or download its LoRA and pass the file."
            )
        edit_set = read_edit_inputs(inputs, need_instructions=prompts is None)
    if any(t.kind == "replicate" for t in targets):
        from finetune.replicate import load_token

        if not load_token():
            raise FinetuneError(
                "a replicate: REF needs a Replicate API token: set REPLICATE_API_TOKEN in the environment or in a "
                ".env file in this folder (https://replicate.com/account/api-tokens)"
            )

    # Prompts, with each version's trigger word; base (and versions without one) use the first versioned REF's.
    edits: list[tuple[Any, str]] = []  # (EditInput, instruction template) per report row, input-major
    if edit_set is not None:
        if prompts is not None:  # every prompt on every input: the files' instructions are not read
            edits = [(item, p) for item in edit_set.items for p in prompts]
        else:
            edits = [(item, item.instruction) for item in edit_set.items]
        templates = [template for _, template in edits]
    else:
        templates = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    for n, template in enumerate(templates):
        if not isinstance(template, str) or not template.strip():
            raise FinetuneError(f"prompt #{n + 1} is empty; every prompt needs text")
    default_trigger = next((t.trigger_word for t in targets if t.trigger_word), "")
    if any(TRIGGER_RE.search(p) for p in templates) and not default_trigger:
        warnings.append("No REF has a trigger word: [trigger] was replaced by an empty string.")

    family = models.family_for(base)
    if edit_set is not None:
        most = max(edit_set.items, key=lambda item: len(item.inputs))
        if family.MAX_REFERENCES == 0:
            raise FinetuneError(
                f"--inputs {edit_set.path}: the base model {base} is {family.LABEL}, which takes no input image. "
                "Edits are evaluated on FLUX.1 Kontext or FLUX.2: give a version trained on one (or set base_model in "
                "--config), or drop --inputs to compare text-to-image."
            )
        if len(most.inputs) > family.MAX_REFERENCES:
            raise FinetuneError(
                f"--inputs: {most.inputs[-1].source}: edit {most.name!r} has {len(most.inputs)} input images, but "
                f"{family.LABEL} takes at most {family.MAX_REFERENCES}; remove the extra NAME_start_N images"
            )
    defaults = family.default_sampling(base)
    width, height = parse_size(size if size is not None else defaults["size"])
    device_ = models.resolve_device(device)
    dtype_ = models.resolve_dtype(dtype, device_)
    settings = {
        "base_model": base,
        "steps": int(steps if steps is not None else defaults["steps"]),
        "width": width,
        "height": height,
        "guidance": float(guidance if guidance is not None else defaults["guidance"]),
        "seeds": seeds,
        "lora_scales": lora_scales,
        "max_sequence_length": family.max_sequence_length(base),
        "device": str(device_),
        "dtype": str(dtype_).removeprefix("torch."),
        "quantize": (
            models.resolve_quantize(quantize, device_, "--quantize", weights_gib=family.transformer_gib(base))
            or "none"
            if any(t.kind != "replicate" for t in targets)
            else "none"
        ),
        "scheduler": "FlowMatchEulerDiscreteScheduler (the base model's)",
        "noise": "seeded CPU torch.Generator per image",
        "clip_model": str(clip_model) if clip_model else None,
        "dino_model": str(dino_model) if dino_model else None,
    }
    if settings["steps"] < 1 or settings["guidance"] < 0:
        raise FinetuneError(f"--steps must be ≥ 1 and --guidance ≥ 0 (got {settings['steps']}, {guidance})")

    folder = Path(out) if out is not None else Path("reports") / time.strftime("%Y%m%d-%H%M%S")
    try:
        (folder / "images").mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FinetuneError(
            f"output folder {folder} is not writable ({e.strerror or e}); choose another with --out"
        ) from None

    # The report's columns (version × scale) and its images; anything already cached is reused.
    columns, jobs, images = [], [], []
    prompt_rows = [{"template": p, "has_trigger": bool(TRIGGER_RE.search(p))} for p in templates]
    row_inputs: list[list[Any] | None] = [None] * len(templates)  # an edit's decoded input images, shared by columns
    if edit_set is not None:
        use_targets = prompts is None
        row_inputs = _edit_rows(edits, prompt_rows, folder, settings, use_targets)
        if not use_targets and any(item.target is not None for item in edit_set.items):
            warnings.append(
                "The targets in --inputs were not used: --prompt/--prompts replaced the pairs' instructions, so the "
                "targets do not show those edits."
            )
    for t_index, target in enumerate(targets):
        scales = [None] if target.kind == "base" else lora_scales
        trigger = target.trigger_word or default_trigger
        identity = f"replicate:{target.replicate_version}" if target.kind == "replicate" else (target.id or "base")
        for scale in scales:
            key = f"c{len(columns)}"
            label = target.label if scale is None or len(lora_scales) == 1 else f"{target.label} scale {scale:g}"
            columns.append({"key": key, "label": label, "version": t_index, "lora_scale": scale})
            for p_index, template in enumerate(templates):
                prompt = TRIGGER_RE.sub(trigger, template)
                missing = {
                    "column": key,
                    "target": t_index,
                    "scale": scale,
                    "prompt": prompt,
                    "seeds": [],
                    "paths": [],
                }
                if row_inputs[p_index] is not None:
                    missing["inputs"] = row_inputs[p_index]
                input_hashes = prompt_rows[p_index].get("input_sha256")
                for seed in seeds:
                    digest = _cache_key(identity, scale, prompt, seed, settings, input_hashes)
                    path = folder / "images" / f"{digest[:24]}.png"
                    cached = path.is_file()
                    images.append(
                        {"column": key, "prompt_index": p_index, "seed": seed, "prompt": prompt,
                         "file": f"images/{path.name}", "cached": cached, "scores": {}}
                    )  # fmt: skip
                    if not cached:
                        missing["seeds"].append(seed)
                        missing["paths"].append(path)
                if missing["seeds"]:
                    jobs.append(missing)

    counters = {
        "pipeline_loads": 0, "prompts_encoded": 0, "encode_calls": 0, "remote_predictions": 0,
        "images_sampled": sum(len(j["seeds"]) for j in jobs), "images_cached": sum(im["cached"] for im in images),
    }  # fmt: skip
    timings: dict[str, float] = {"setup_s": time.perf_counter() - start}
    from tqdm.auto import tqdm

    local_jobs = [j for j in jobs if targets[j["target"]].kind != "replicate"]
    remote_jobs = [j for j in jobs if targets[j["target"]].kind == "replicate"]
    client = None
    if remote_jobs:
        from finetune.replicate import Replicate

        client = Replicate()
    t0 = time.perf_counter()
    with tqdm(total=counters["images_sampled"], unit="img", desc="sampling", disable=not progress) as bar:
        if local_jobs:
            counters |= _sample_local(family, local_jobs, targets, settings, device_, dtype_, bar)
        if remote_jobs:
            with client:
                counters["remote_predictions"] = _sample_remote(remote_jobs, targets, settings, client, bar)
    timings["sample_s"] = time.perf_counter() - t0

    notes: list[str] = []
    doc = {
        "schema": report.SCHEMA,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": settings,
        "versions": [
            {
                "ref": t.ref,
                "label": t.label,
                "kind": t.kind,
                "id": t.id,
                "trigger_word": t.trigger_word or None,
                "base_model": t.base_model or (base if t.kind == "base" else None),
                "lineage": t.lineage,
            }
            for t in targets
        ],  # fmt: skip
        "columns": columns,
        "prompts": prompt_rows,
        "images": images,
        "diversity": [],
        "metrics": {},
        "aggregate": {},
        "reference_column": columns[0]["key"],
        "notes": notes,
        "warnings": warnings,
        "timings": timings,
        "counters": counters,
    }
    if edit_set is not None:
        doc["edit"] = {
            "inputs": str(edit_set.path),
            "layout": edit_set.layout,
            "instructions": "files" if prompts is None else "prompts (each applied to every input)",
            "targets": sum(bool(row.get("target")) for row in prompt_rows),
            "direction_source_caption": EDIT_SOURCE_CAPTION,
            "output_size": "each output takes its first input's aspect ratio at the area of width x height",
        }
    scorers = metrics.Scorers(clip_model, dino_model, device=device_)
    if edit_set is not None:
        _score_edits(doc, targets, folder, scorers)
    else:
        _score(doc, targets, folder, scorers, notes)
    for line in warnings + notes:  # the scorers logged their own notes when a model failed to load
        log.warning(line)
    notes[:0] = scorers.notes
    _aggregate(doc)
    timings["score_s"] = scorers.seconds

    timings["total_before_report_s"] = time.perf_counter() - start
    doc["timings"] = dict(timings)
    t0 = time.perf_counter()
    paths = report.write_report(folder, doc)
    timings["report_s"] = time.perf_counter() - t0

    _append_history(registry, doc, targets, paths["metrics"])
    timings["total_s"] = time.perf_counter() - start
    return EvalResult(folder, paths["metrics"], paths["grid"], paths["html"], doc, counters, timings)


def _append_history(registry: Registry, doc: dict, targets: list[_Target], metrics_path: Path) -> None:
    """Append each registry version's summary to its model.json (the eval history is append-only)."""
    compared = [t.label for t in targets]
    settings = {k: doc["settings"][k] for k in ("base_model", "steps", "width", "height", "guidance", "seeds")}
    reference = next(c["label"] for c in doc["columns"] if c["key"] == doc["reference_column"])
    for t_index, target in enumerate(targets):
        if target.version is None:
            continue
        results = {}
        for column in doc["columns"]:
            if column["version"] == t_index:
                results[f"{column['lora_scale']:g}" if column["lora_scale"] is not None else "base"] = {
                    m: {k: s[k] for k in ("mean", "ci95", "win_rate")}
                    for m, s in doc["aggregate"][column["key"]].items()
                }
        summary = {
            "created_at": doc["created_at"], "report": str(metrics_path.resolve()), "compared": compared,
            "reference": reference, "prompts": [p["template"] for p in doc["prompts"]], "settings": settings,
            "lora_scales": results, "notes": doc["notes"],
        }  # fmt: skip
        if "edit" in doc:  # which inputs the edit metrics are about
            summary["inputs"] = doc["edit"]["inputs"]
        try:
            registry.append_eval(target.version, summary)
        except (OSError, RegistryError) as e:
            log.warning("could not append the eval to %s: %s", target.label, e)
