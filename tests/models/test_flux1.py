"""FLUX components: presets, save/load, error paths, and equality with diffusers' FluxPipeline helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from finetune.errors import FinetuneError
from finetune.models import common
from finetune.models import flux1 as flux


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_build_preset_is_deterministic_per_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = flux.build_preset("tiny", seed=0), flux.build_preset("tiny", seed=0), flux.build_preset("tiny", seed=1)
    assert torch.equal(before, torch.random.get_rng_state())
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert _state_equal(getattr(a, part), getattr(b, part)), part
        assert not _state_equal(getattr(a, part), getattr(c, part)), part
    assert a.tokenizer.get_vocab() == c.tokenizer.get_vocab()


def test_small_preset_has_exactly_the_issue_sizes():
    c = flux.build_preset("small")
    t = c.transformer.config
    assert (t.patch_size, t.in_channels, t.num_layers, t.num_single_layers) == (1, 64, 2, 4)
    assert (t.attention_head_dim, t.num_attention_heads, t.joint_attention_dim, t.pooled_projection_dim) == (
        64,
        4,
        256,
        128,
    )
    assert list(t.axes_dims_rope) == [16, 24, 24] and t.guidance_embeds
    v = c.vae.config
    assert list(v.down_block_types) == ["DownEncoderBlock2D"] * 4
    assert list(v.up_block_types) == ["UpDecoderBlock2D"] * 4
    assert list(v.block_out_channels) == [16, 32, 64, 64]
    assert (v.latent_channels, v.norm_num_groups, v.layers_per_block) == (16, 8, 1)
    assert (v.use_quant_conv, v.use_post_quant_conv) == (False, False)
    assert (v.shift_factor, v.scaling_factor) == (0.1159, 0.3611)
    e = c.text_encoder.config
    assert (e.hidden_size, e.num_hidden_layers, e.num_attention_heads, e.intermediate_size) == (128, 2, 4, 256)
    assert (e.projection_dim, e.vocab_size) == (128, 1000)
    e2 = c.text_encoder_2.config
    assert (e2.d_model, e2.d_kv, e2.d_ff, e2.num_layers, e2.num_heads, e2.vocab_size) == (256, 32, 512, 2, 8, 1000)


def test_unknown_preset_names_the_choices():
    with pytest.raises(FinetuneError, match="preset:tiny, preset:small"):
        flux.load_components("preset:huge")


def test_saved_preset_loads_with_flux_pipeline_and_load_components(tiny_preset_dir):
    from diffusers import FluxPipeline

    index = json.loads((tiny_preset_dir / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["tokenizer_2"][1] in ("T5Tokenizer", "T5TokenizerFast")
    pipe = FluxPipeline.from_pretrained(tiny_preset_dir)
    built = flux.build_preset("tiny", seed=0)
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert _state_equal(getattr(pipe, part), getattr(built, part)), part
    prompt = "a photo of TOK on a beach, sunset!"
    assert pipe.tokenizer(prompt).input_ids == built.tokenizer(prompt).input_ids
    assert pipe.tokenizer_2(prompt).input_ids == built.tokenizer_2(prompt).input_ids
    assert (pipe.tokenizer.model_max_length, pipe.tokenizer_2.model_max_length) == (77, 512)
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(prompt).input_ids[-1]) == "<|endoftext|>"

    c = flux.load_components(str(tiny_preset_dir), parts=("transformer",))
    assert c.vae is None and c.text_encoder is None and c.tokenizer is None
    assert c.scheduler.config.use_dynamic_shifting and c.scheduler.config.max_shift == 1.15
    assert _state_equal(c.transformer, built.transformer)
    assert not any(p.requires_grad for p in c.transformer.parameters())
    half = flux.load_components(str(tiny_preset_dir), dtype=torch.bfloat16, parts=("text_encoder",))
    assert half.text_encoder.dtype == torch.bfloat16 and half.tokenizer is not None


def test_save_preset_refuses_a_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FinetuneError, match="not a saved pipeline"):
        flux.save_preset("tiny", tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FinetuneError, match="does not exist") as info:
        flux.load_components(str(tmp_path / "no-such-model"))
    assert info.value.exit_code == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match="not a diffusers FluxPipeline folder"):
        flux.load_components(str(tmp_path / "empty"))


def test_uncached_hub_id_offline_says_how_to_get_the_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(FinetuneError) as info:
        flux.load_components("no-such-owner/FLUX.1-fake", parts=("transformer",))
    message = str(info.value)
    assert "no-such-owner/FLUX.1-fake" in message and "HF_HUB_OFFLINE" in message
    assert "hf auth login" in message and "accept the licence" in message and "local folder" in message
    assert info.value.exit_code == 2


def test_bad_names_are_rejected():
    with pytest.raises(FinetuneError, match="unknown FLUX part"):
        flux.load_components("preset:tiny", parts=("unet",))
    with pytest.raises(FinetuneError, match="neither a folder nor a hub id"):
        flux.load_components("not a model id")
    with pytest.raises(FinetuneError, match="dtype 'int8'"):
        common.resolve_dtype("int8", "cpu")


def test_dtype_and_device_policy():
    assert common.resolve_dtype("auto", "cpu") == torch.float32
    assert common.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert common.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert common.resolve_device("cpu") == torch.device("cpu")
    assert common.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(FinetuneError, match="no CUDA GPU"):
            common.resolve_device("cuda")


def test_sampling_defaults_and_schnell_detection(tmp_path):
    assert flux.default_sampling("black-forest-labs/FLUX.1-dev") == {"steps": 28, "size": 1024, "guidance": 3.5}
    assert flux.default_sampling("black-forest-labs/FLUX.1-schnell") == {"steps": 4, "size": 1024, "guidance": 0.0}
    assert flux.default_sampling("preset:tiny") == {"steps": 8, "size": 256, "guidance": 3.5}
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": False}))
    assert flux.is_schnell(str(tmp_path)) and not flux.is_schnell("black-forest-labs/FLUX.1-dev")


def test_pack_unpack_and_ids_equal_flux_pipeline_helpers():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(0))  # a 48x80 px image
    packed = flux.pack_latents(latents)
    assert packed.shape == (2, 15, 64)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10), rtol=0, atol=0)
    unpacked = flux.unpack_latents(packed, 48, 80, 8)
    torch.testing.assert_close(unpacked, FluxPipeline._unpack_latents(packed, 48, 80, 8), rtol=0, atol=0)
    torch.testing.assert_close(unpacked, latents, rtol=0, atol=0)
    ids = flux.latent_image_ids(6, 10, "cpu", torch.float32)
    torch.testing.assert_close(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    assert flux.text_ids(7, "cpu", torch.float32).shape == (7, 3)


def test_encode_prompts_equals_flux_pipeline_encode_prompt():
    c = flux.build_preset("tiny")
    pipe = flux.pipeline_from_components(c)
    prompts = ["a photo of TOK on a beach", "", "an oil painting of a cat " * 20]  # the last one is truncated
    text = flux.encode_prompts(c, prompts, max_sequence_length=48)
    prompt_embeds, pooled = text["prompt_embeds"], text["pooled_prompt_embeds"]
    ref_embeds, ref_pooled, _ = pipe.encode_prompt(prompts, prompts, device="cpu", max_sequence_length=48)
    assert prompt_embeds.shape == (3, 48, 32) and pooled.shape == (3, 32)
    # same token ids and weights; only float summation order may differ between the two call paths
    torch.testing.assert_close(prompt_embeds, ref_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-5)
    assert not torch.allclose(pooled[0], pooled[1])


def test_encode_images_and_normalize_latents():
    c = flux.build_preset("tiny")
    pixels = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = flux.encode_images(c.vae, pixels)
    assert mean.shape == std.shape == (2, 16, 8, 6) and bool((std > 0).all())
    with torch.no_grad():
        ref = c.vae.encode(pixels).latent_dist
    torch.testing.assert_close(mean, ref.mean)
    torch.testing.assert_close(std, ref.std)
    z = flux.normalize_latents(mean, c.vae)
    torch.testing.assert_close(z, (mean - 0.1159) * 0.3611)
    torch.testing.assert_close(flux.denormalize_latents(z, c.vae.config), mean)


def test_sample_images_is_seeded_per_image_and_batch_independent():
    c = flux.build_preset("tiny")
    pipe = flux.pipeline_from_components(c)
    prompts = ["a photo of TOK", "a red car"]
    kw = dict(steps=2, size=(32, 48), guidance=3.5)
    images = flux.sample_images(pipe, prompts, [1, 2], **kw)
    assert len(images) == 4 and images[0].size == (48, 32)
    arrays = [np.asarray(im, dtype=np.int16) for im in images]
    assert np.abs(arrays[0] - arrays[1]).max() > 0  # different seeds
    assert np.abs(arrays[0] - arrays[2]).max() > 0  # different prompts
    # precomputed embeddings, another batch layout, a lone seed: the same pixels (up to uint8 rounding)
    embeds = flux.encode_prompts(c, prompts, max_sequence_length=512)
    alone = flux.sample_images(pipe, prompts[1:], [2], text={k: v[1:] for k, v in embeds.items()}, **kw)
    assert np.abs(np.asarray(alone[0], dtype=np.int16) - arrays[3]).max() <= 1
    single_batches = flux.sample_images(pipe, prompts, [1, 2], batch_size=1, **kw)
    for image, reference in zip(single_batches, arrays, strict=True):
        assert np.abs(np.asarray(image, dtype=np.int16) - reference).max() <= 1
    with pytest.raises(FinetuneError, match="multiples of 16"):
        flux.sample_images(pipe, prompts, [1], steps=1, size=40, guidance=1.0)


def test_cached_hub_id_loads_offline_from_the_hf_cache(tiny_preset_dir, tmp_path, monkeypatch):
    import shutil

    # the standard hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}
    repo = tmp_path / "hub" / "models--someone--tiny-flux"
    commit = "0" * 40
    shutil.copytree(tiny_preset_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    c = flux.load_components("someone/tiny-flux", parts=("transformer", "text_encoder_2"))
    assert _state_equal(c.transformer, flux.build_preset("tiny").transformer)
    assert c.tokenizer_2 is not None and c.vae is None


def _quantized_linears(module: torch.nn.Module) -> list[str]:
    return [
        n
        for n, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and type(m.weight).__name__ != "Parameter"
    ]


def _forward(transformer: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    config = transformer.config
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 16, config.in_channels, generator=g),
            encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
            timestep=torch.tensor([0.5]),
            img_ids=flux.latent_image_ids(8, 8, "cpu", torch.float32),
            txt_ids=flux.text_ids(8, "cpu", torch.float32),
            guidance=torch.ones(1),
            return_dict=False,
        )[0]


def test_int8_quantizes_every_transformer_linear_the_same_from_a_preset_or_a_folder(tiny_preset_dir):
    plain = flux.load_components("preset:tiny", parts=("transformer",)).transformer
    preset = flux.load_components("preset:tiny", parts=("transformer",), quantize="int8").transformer
    folder = flux.load_components(str(tiny_preset_dir), parts=("transformer",), quantize="int8").transformer
    linears = [n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)]
    assert _quantized_linears(preset) == _quantized_linears(folder) == linears
    assert not any(p.requires_grad for p in preset.parameters())
    exact, from_preset, from_folder = _forward(plain), _forward(preset), _forward(folder)
    torch.testing.assert_close(from_preset, from_folder, rtol=0, atol=0)  # one quantizer, one result
    error = float((from_preset - exact).norm() / exact.norm())
    assert 0 < error < 0.02  # int8 per channel: about 0.5 % here; quantized, so not exact


def test_quantize_policy_and_a_missing_torchao(monkeypatch):
    assert common.resolve_quantize("auto", "cpu", weights_gib=22.2) is None  # auto quantizes only small CUDA GPUs
    assert common.resolve_quantize("none", "cpu") is None
    assert common.resolve_quantize("int8", "cpu") == "int8"
    with pytest.raises(FinetuneError, match="'nf4' is not supported"):
        common.resolve_quantize("nf4", "cpu")
    monkeypatch.setitem(__import__("sys").modules, "torchao", None)  # what `import torchao` sees when it is absent
    with pytest.raises(FinetuneError, match=r"needs torchao.*finetune\[quantize\].*train.quantize=none"):
        common.resolve_quantize("int8", "cpu")


def test_a_folder_transformer_size_is_counted_from_its_safetensors_headers(tiny_preset_dir):
    """train.quantize: auto weighs a local folder by its parameter count × 2 bytes, read without loading it."""
    params = sum(p.numel() for p in flux.build_preset("tiny").transformer.parameters())
    assert flux.transformer_gib(str(tiny_preset_dir)) == params * 2 / 2**30
    assert flux.transformer_gib("black-forest-labs/FLUX.1-dev") == 22.2
