"""Latent/text cache: keys change with every setting that changes the tensors, writes are atomic, hits are reused."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import torch

from finetune.cache import (
    cache_latents,
    cache_texts,
    check_free_space,
    default_cache_dir,
    estimate_latent_bytes,
    latent_file,
    latent_key,
    read_tensors,
    source_identity,
    text_file,
    text_key,
)
from finetune.errors import FinetuneError


def test_latent_key_changes_with_each_setting():
    base = latent_key("preset:tiny", "ab" * 32, (32, 48), torch.float32)
    assert base == latent_key("preset:tiny", "ab" * 32, (32, 48), torch.float32)
    variants = [
        latent_key("preset:small", "ab" * 32, (32, 48), torch.float32),
        latent_key("preset:tiny", "cd" * 32, (32, 48), torch.float32),
        latent_key("preset:tiny", "ab" * 32, (48, 32), torch.float32),
        latent_key("preset:tiny", "ab" * 32, (32, 48), torch.bfloat16),
    ]
    assert len({base, *variants}) == 5


def test_text_key_changes_with_each_setting():
    base = text_key("preset:tiny", "a photo of TOK", 64, torch.float32)
    variants = [
        text_key("preset:small", "a photo of TOK", 64, torch.float32),
        text_key("preset:tiny", "a photo of TOK ", 64, torch.float32),
        text_key("preset:tiny", "a photo of TOK", 128, torch.float32),
        text_key("preset:tiny", "a photo of TOK", 64, torch.bfloat16),
    ]
    assert len({base, *variants}) == 5


def test_folder_identity_follows_its_files(tmp_path):
    (tmp_path / "vae").mkdir()
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"1234")
    first = source_identity(str(tmp_path), ["vae"])
    assert first == source_identity(str(tmp_path), ["vae"])
    assert first == source_identity(str(tmp_path), ["vae", "text_encoder"])  # a part without files adds nothing
    weights.write_bytes(b"123456")
    assert source_identity(str(tmp_path), ["vae"]) != first
    assert source_identity("preset:tiny", ["vae"]) == "preset:tiny"


def test_default_cache_dir_lives_under_finetune_home(finetune_home):
    assert default_cache_dir() == finetune_home / "cache"


def test_cache_latents_encodes_only_missing_and_leaves_no_temp_files(tmp_path):
    calls = []

    def encode(pixels):
        calls.append(pixels.shape[0])
        mean = pixels[:, :2, ::4, ::4] * 2
        return mean, torch.ones_like(mean)

    images = {f"k{i}": torch.full((3, 16, 24 if i % 2 else 16), float(i)) for i in range(5)}
    jobs = [(k, lambda v=v: v) for k, v in images.items()]
    cache_latents(tmp_path, jobs, encode, batch_size=2)
    assert sum(calls) == 5 and max(calls) <= 2  # batched by shape, never more than batch_size
    stored = read_tensors(latent_file(tmp_path, "k3"))
    assert stored["mean"].shape == (2, 4, 6) and torch.all(stored["mean"] == 6.0)
    calls.clear()
    cache_latents(tmp_path, jobs + [("k9", lambda: torch.zeros(3, 16, 16))], encode)
    assert calls == [1]  # the second run reuses the five cached entries
    assert not list(tmp_path.rglob(".*"))  # no temp files left behind


def test_cache_texts_dedupes_and_reuses(tmp_path):
    seen = []

    def encode(captions):
        seen.extend(captions)
        n = len(captions)
        return {"prompt_embeds": torch.arange(n * 6, dtype=torch.float32).view(n, 3, 2), "pooled": torch.zeros(n, 4)}

    keys = {c: text_key("x", c, 3, torch.float32) for c in ["", "a TOK", "b TOK"]}
    cache_texts(tmp_path, [(keys[c], c) for c in ["a TOK", "b TOK", "a TOK", ""]], encode)
    assert sorted(seen) == ["", "a TOK", "b TOK"]
    assert read_tensors(text_file(tmp_path, keys["b TOK"]))["prompt_embeds"].shape == (3, 2)
    seen.clear()
    cache_texts(tmp_path, [(keys["a TOK"], "a TOK")], encode)
    assert seen == []


def test_estimates_count_bytes():
    assert estimate_latent_bytes([(32, 16), (16, 16)], latent_channels=16, vae_scale_factor=8, itemsize=4) == (
        2 * 16 * (4 * 2 + 2 * 2) * 4
    )


def test_no_free_space_is_a_clear_error(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(FinetuneError, match=r"train.cache_dir .*needs about .* MB but only .* MB are free"):
        check_free_space(tmp_path / "not" / "yet", 10_000)
    check_free_space(tmp_path, 100)
