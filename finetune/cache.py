"""The on-disk cache of VAE latent distributions and text embeddings, keyed by content and settings, never by step.

Layout under the cache folder (default ``$FINETUNE_HOME/cache``, shared by all runs)::

    latents/<key>.safetensors   mean, std            [C, h, w] of one image in one bucket (unscaled VAE output)
    text/<key>.safetensors      the family's text tensors of one caption (FLUX.1: prompt_embeds [seq, D] and
                                pooled_prompt_embeds [P]; FLUX.2: prompt_embeds [seq, 3·D])

A key is the sha256 of everything that changes the tensors: the content (image sha256 or caption text), the
identity of the weights that encoded it (preset name, hub snapshot commit, or the files of a local folder), the
dtype, the bucket size or the T5 sequence length. A sample index or step never enters a key (the diffusers bug of
step-indexed caches that mismatch captions under shuffling, reference/local-trainers.md §8.5). Files are written
atomically, so an interrupted run leaves only complete entries, which the next run reuses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from finetune.errors import FinetuneError
from finetune.files import finetune_home, free_bytes, write_atomic

__all__ = [
    "cache_latents",
    "cache_texts",
    "check_free_space",
    "default_cache_dir",
    "estimate_latent_bytes",
    "latent_file",
    "latent_key",
    "read_tensors",
    "source_identity",
    "text_file",
    "text_key",
    "write_tensors",
]

SPACE_MARGIN = 1.1  # ask for 10% more than the estimate: file headers and filesystem blocks


def default_cache_dir() -> Path:
    return finetune_home() / "cache"


def source_identity(base_model: str, parts: Sequence[str]) -> str:
    """A string that changes whenever the weights of ``parts`` (subfolders such as "vae") of ``base_model`` change.

    Presets are deterministic (random weights from a fixed seed), so their name is their identity. A local folder is
    identified by the names, sizes and modification times of the files in those subfolders; a hub id by the commit
    of its snapshot in the local HF cache (the repo id alone when it is not cached yet: loading will fetch it).
    """
    if base_model.startswith("preset:"):
        return base_model
    folder = Path(base_model).expanduser()
    if folder.is_dir():
        h = hashlib.sha256(str(folder.resolve()).encode())
        for part in sorted(parts):
            for f in sorted((folder / part).rglob("*")) if (folder / part).is_dir() else []:
                if f.is_file():
                    st = f.stat()
                    h.update(f"{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return f"folder:{h.hexdigest()}"
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(base_model, allow_patterns=["model_index.json"], local_files_only=True)
        return f"hub:{base_model}@{Path(snapshot).name}"
    except Exception:  # not in the local cache yet (or offline): the repo id is the best identity we have
        return f"hub:{base_model}"


def _key(*fields: object) -> str:
    return hashlib.sha256(json.dumps([str(f) for f in fields]).encode()).hexdigest()


def latent_key(
    identity: str, image_sha256: str, bucket: tuple[int, int], dtype: torch.dtype, flipped: bool = False
) -> str:
    """Key of one image's latent distribution in one bucket (w, h), encoded by the VAE ``identity`` in ``dtype``;
    ``flipped``: of its mirror image (train.flip; unflipped keys are as they always were)."""
    fields = ("latent-v1", identity, image_sha256, f"{bucket[0]}x{bucket[1]}", dtype)
    return _key(*fields, "flipped") if flipped else _key(*fields)


def text_key(identity: str, caption: str, max_sequence_length: int, dtype: torch.dtype, family: str = "flux1") -> str:
    """Key of one caption's text embeddings at ``max_sequence_length`` tokens in ``dtype``, as ``family`` encodes
    them (FLUX.1 keys predate families and stay as they were, so existing caches remain valid)."""
    fields = ("text-v1", identity, hashlib.sha256(caption.encode()).hexdigest(), max_sequence_length, dtype)
    return _key(*fields) if family == "flux1" else _key(*fields, family)


def latent_file(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "latents" / f"{key}.safetensors"


def text_file(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "text" / f"{key}.safetensors"


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save ``tensors`` to ``path`` atomically (temp file in the same folder, then rename)."""
    write_atomic(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def estimate_latent_bytes(
    buckets: Sequence[tuple[int, int]], latent_channels: int, vae_scale_factor: int, itemsize: int
) -> int:
    """Bytes of mean + std for one latent per bucket (w, h) in pixels."""
    return sum(2 * latent_channels * (w // vae_scale_factor) * (h // vae_scale_factor) * itemsize for w, h in buckets)


def check_free_space(cache_dir: Path, needed: int) -> None:
    """Raise a FinetuneError before caching when the disk holding ``cache_dir`` cannot take ``needed`` bytes."""
    free = free_bytes(cache_dir)
    if needed * SPACE_MARGIN > free:
        raise FinetuneError(
            f"train.cache_dir {cache_dir}: the latent and text cache needs about {needed / 1e6:.1f} MB but only "
            f"{free / 1e6:.1f} MB are free there; free some space or point train.cache_dir at a larger disk"
        )


def cache_latents(
    cache_dir: Path,
    jobs: Sequence[tuple[str, Callable[[], torch.Tensor]]],
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Encode and store each missing latent. ``jobs`` are (key, load pixels [3, h, w] in [-1, 1]); ``encode`` maps
    pixels [B, 3, h, w] to the latent distribution (mean, std) [B, C, h/f, w/f]. Jobs of one size are batched."""
    by_shape: dict[tuple[int, ...], list[tuple[str, torch.Tensor]]] = {}

    def flush(group: list[tuple[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            mean, std = encode(torch.stack([px for _, px in group]))
        for i, (key, _) in enumerate(group):
            write_tensors(latent_file(cache_dir, key), {"mean": mean[i], "std": std[i]})
        if progress:
            progress(len(group))
        group.clear()

    for key, load in jobs:
        if latent_file(cache_dir, key).is_file():
            continue
        pixels = load()
        group = by_shape.setdefault(tuple(pixels.shape), [])
        group.append((key, pixels))
        if len(group) >= batch_size:
            flush(group)
    for group in by_shape.values():
        if group:
            flush(group)


def cache_texts(
    cache_dir: Path,
    jobs: Sequence[tuple[str, str]],
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    batch_size: int = 8,
) -> None:
    """Encode and store each missing caption; ``jobs`` are (key, caption), ``encode`` maps captions to the family's
    named text tensors (FLUX.1: ``prompt_embeds`` [B, seq, D] and ``pooled_prompt_embeds`` [B, P])."""
    todo = list({k: c for k, c in jobs if not text_file(cache_dir, k).is_file()}.items())
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        with torch.no_grad():
            tensors = encode([c for _, c in chunk])
        for i, (key, _) in enumerate(chunk):
            write_tensors(text_file(cache_dir, key), {name: t[i] for name, t in tensors.items()})
