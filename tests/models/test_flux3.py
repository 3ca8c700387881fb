"""FLUX 3 Image Klein equals its diffusers modular pipeline: what the trainer caches and feeds the transformer is what
Flux3ModularPipeline computes for the same input (issue 15). Presets are built in process.

Qwen3VLProcessor (what the pipeline loads as ``tokenizer``) cannot be built here: its video processor needs
torchvision, no dependency of ours. Its text path is its tokenizer under the chat template, so the pipeline's encoder
is handed that tokenizer with a ``.tokenizer`` attribute, which is all ``_get_qwen3_vl_prompt_embeds`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune import models
from finetune.config import load_config, parse_config
from finetune.errors import FinetuneError
from finetune.models import flux3

ROOT = Path(__file__).parent.parent.parent
TINY = "flux3-tiny"
PROMPTS = ["a photo of TOK on a beach", "", "an oil painting of a cat " * 20]  # windows 80, 80, 160


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return flux3.save_preset(TINY, tmp_path_factory.mktemp("flux3") / "tiny")


@pytest.fixture(scope="module")
def pipe(folder):
    """The saved preset in the base pipeline's blocks, without the prompt upsampler (whose weights a preset lacks;
    the trainer never upsamples)."""
    from diffusers import Flux3AutoBlocks

    blocks = Flux3AutoBlocks()
    blocks.sub_blocks.pop("prompt_upsampler")
    pipe = blocks.init_pipeline(str(folder))
    pipe.load_components(dtype=torch.float32)
    return pipe


def _processor(tokenizer):
    return SimpleNamespace(tokenizer=tokenizer, apply_chat_template=tokenizer.apply_chat_template)


def _pipeline_embeds(pipe, prompt, **kwargs):
    from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep

    return Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds(
        pipe.text_encoder, _processor(pipe.tokenizer), prompt, device=torch.device("cpu"), **kwargs
    )


def test_presets_are_deterministic_and_have_every_real_class():
    a, b, c = flux3.build_preset(TINY, 0), flux3.build_preset(TINY, 0), flux3.build_preset(TINY, 1)
    sa, sb, sc = a.transformer.state_dict(), b.transformer.state_dict(), c.transformer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert [type(getattr(a, p)).__name__ for p in ("transformer", "vae", "text_encoder", "tokenizer")] == [
        "Flux3Transformer2DModel",
        "AutoencoderKLFlux2",
        "Qwen3VLForConditionalGeneration",
        "Qwen2Tokenizer",  # Qwen2TokenizerFast in transformers 5
    ]
    text = a.text_encoder.config.text_config
    assert text.num_hidden_layers > max(flux3.TEXT_LAYERS)  # hidden_states[32] exists and is not the final norm
    assert a.transformer.config.joint_attention_dim == 8 * text.hidden_size
    assert not a.transformer.config.flow_map and a.scheduler.config.shift == 6.93
    assert not a.scheduler.config.use_dynamic_shifting


def test_saved_preset_loads_in_the_modular_pipeline_and_in_load_components(folder, pipe):
    from diffusers import ModularPipeline

    loaded = ModularPipeline.from_pretrained(str(folder))  # the class and blocks come from the folder's index
    assert type(loaded).__name__ == type(pipe).__name__ == "Flux3ModularPipeline"
    assert type(loaded.blocks).__name__ == "Flux3AutoBlocks"
    assert json.loads((folder / "modular_model_index.json").read_text())["_class_name"] == "Flux3ModularPipeline"
    c = flux3.load_components(str(folder), parts=("transformer", "vae", "text_encoder"))
    built = flux3.build_preset(TINY)
    for part in ("transformer", "vae", "text_encoder"):
        ours, theirs, piped = (getattr(x, part).state_dict() for x in (c, built, pipe))
        assert all(torch.equal(ours[k], theirs[k]) and torch.equal(piped[k], theirs[k]) for k in theirs), part
    assert c.tokenizer("a cat")["input_ids"] == built.tokenizer("a cat")["input_ids"]
    assert pipe.scheduler.config.shift == c.scheduler.config.shift == 6.93
    assert not flux3.is_distilled(str(folder))


def test_encode_prompts_equals_the_pipeline_encoder(folder, pipe):
    c = flux3.load_components(str(folder), parts=("text_encoder",))
    text = flux3.encode_prompts(c, PROMPTS, 480)
    assert text["prompt_embeds"].shape == (3, 480, 8 * 32) and text["text_mask"].shape == (3, 480)
    for i, prompt in enumerate(PROMPTS):
        theirs = _pipeline_embeds(pipe, prompt)
        window = theirs.shape[1]
        assert window % 80 == 0 and int(text["text_mask"][i].sum()) == window
        torch.testing.assert_close(text["prompt_embeds"][i : i + 1, :window], theirs, rtol=0, atol=1e-6)
        assert not text["prompt_embeds"][i, window:].any()
    assert [int(m.sum()) for m in text["text_mask"]] == [80, 80, 160]
    # what the trainer must not do: leave position_ids out (transformers 5 gives the padding 0, not 1) or stack
    # another layer; either changes the embeddings
    inputs = c.tokenizer(flux3._chat(c.tokenizer, PROMPTS[0]), return_tensors="pt", padding="max_length",
                         max_length=80)  # fmt: skip
    out = c.text_encoder(**inputs, output_hidden_states=True, use_cache=False)
    no_positions = torch.stack([out.hidden_states[k] for k in flux3.TEXT_LAYERS], 1).permute(0, 2, 1, 3).flatten(2)
    assert not torch.allclose(no_positions, text["prompt_embeds"][:1, :80], atol=1e-4)
    off_by_one = _pipeline_embeds(pipe, PROMPTS[0], hidden_states_layers=(4, 8, 12, 16, 20, 24, 28, 31))
    assert not torch.allclose(off_by_one, text["prompt_embeds"][:1, :80], atol=1e-4)


def test_a_prompt_longer_than_the_window_is_refused(folder):
    c = flux3.load_components(str(folder), parts=("text_encoder",))
    with pytest.raises(FinetuneError, match="window of 160"):
        flux3.encode_prompts(c, [PROMPTS[2]], 80)


def test_latents_and_ids_equal_the_pipeline(folder, pipe):
    from diffusers.modular_pipelines import PipelineState
    from diffusers.modular_pipelines.flux3.before_denoise import Flux3PrepareLatentsStep
    from diffusers.modular_pipelines.flux3.encoders import Flux3VaeEncoderStep

    c = flux3.load_components(str(folder), parts=("vae",))
    pixels = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = flux3.encode_images(c.vae, pixels)
    z = flux3.normalize_latents(mean, c.vae)
    state = PipelineState()
    state.set("condition_images", [pixels])
    _, state = Flux3VaeEncoderStep()(pipe, state)
    reference = state.get("image_cond_latents")[0]  # the pipeline encodes with the mode (= mean)
    assert z.shape == (1, 128, 4, 3)
    torch.testing.assert_close(z, reference, rtol=0, atol=1e-6)
    state = PipelineState()
    for key, value in dict(height=64, width=48, batch_size=1, num_images_per_prompt=1, dtype=torch.float32).items():
        state.set(key, value)
    state.set("latents", z)
    _, state = Flux3PrepareLatentsStep()(pipe, state)
    torch.testing.assert_close(flux3.pack_latents(z), state.get("latents"), rtol=0, atol=0)
    torch.testing.assert_close(flux3.image_ids(z.shape, "cpu", torch.bfloat16), state.get("img_ids"), rtol=0, atol=0)
    assert flux3.image_ids(z.shape, "cpu")[:, 1:3].max() == 1.5  # rows 0..3 at scale 0.5
    from diffusers.modular_pipelines.flux3.before_denoise import Flux3TextRoPEInputsStep

    text_ids = Flux3TextRoPEInputsStep._prepare_text_ids(torch.zeros(1, 400, 8))
    torch.testing.assert_close(flux3.text_ids(400, "cpu", torch.bfloat16), text_ids, rtol=0, atol=0)


def test_one_transformer_call_equals_the_pipeline(folder, pipe):
    """The pipeline's first denoising call (real CFG: the prompt's, then the empty prompt's), recorded; ``predict``
    on the same latents, σ and cached text, as one batch of two windows, gives the same velocities."""
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output[0])), with_kwargs=True
    )
    pipe.tokenizer.tokenizer = pipe.tokenizer  # the processor's text half (see the module docstring)
    try:
        pipe(prompt=PROMPTS[2], height=64, width=48, num_inference_steps=2, output="latents")
    finally:
        hook.remove()
        del pipe.tokenizer.tokenizer
    (cond, cond_out), (uncond, uncond_out) = calls[0], calls[1]
    assert cond["encoder_hidden_states"].shape[1] == 160 and uncond["encoder_hidden_states"].shape[1] == 80
    c = flux3.load_components(str(folder), parts=("text_encoder",))
    text = flux3.encode_prompts(c, [PROMPTS[2], ""], 480)
    b, tokens, channels = cond["hidden_states"].shape
    noisy = cond["hidden_states"].transpose(1, 2).reshape(b, channels, 4, 3).expand(2, -1, -1, -1)
    sigma = cond["timestep"].expand(2)
    assert 0 < float(sigma[0]) <= 1  # the pipeline passes σ, not σ·1000
    ids = flux3.image_ids(noisy.shape, "cpu")
    ours = flux3.predict(pipe.transformer, noisy, sigma, text, ids, None, None)
    torch.testing.assert_close(ours, torch.cat([cond_out, uncond_out]), rtol=0, atol=1e-5)
    torch.testing.assert_close(ids, cond["img_ids"], rtol=0, atol=0)


def test_one_image_conditioned_call_equals_the_pipeline(folder, pipe):
    """An edit with two references: the pipeline's first call (``image=[a, b]``) against ``predict`` with the
    references encoded as training encodes them (the latent mean, normalized): the same image_cond tokens, ids at
    l = -1, -2, and the same velocities."""
    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    images = [Image.fromarray((torch.rand(64, 48, 3, generator=g) * 255).byte().numpy()) for _ in range(2)]
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output[0])), with_kwargs=True
    )
    pipe.tokenizer.tokenizer = pipe.tokenizer
    try:
        pipe(prompt=PROMPTS[0], image=images, num_inference_steps=2, output="latents")
    finally:
        hook.remove()
        del pipe.tokenizer.tokenizer
    kwargs, reference = calls[0]
    c = flux3.load_components(str(folder), parts=("text_encoder", "vae"))
    pixels = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1 for im in images]
    refs = [flux3.normalize_latents(flux3.encode_images(c.vae, px)[0], c.vae) for px in pixels]
    torch.testing.assert_close(
        torch.cat([flux3.pack_latents(r) for r in refs], 1), kwargs["image_cond_hidden_states"], rtol=0, atol=1e-5
    )
    ids = torch.cat([flux3.reference_ids(r.shape, i, "cpu") for i, r in enumerate(refs)])
    torch.testing.assert_close(ids, kwargs["image_cond_ids"], rtol=0, atol=0)
    assert set(ids[:, 3].tolist()) == {-1.0, -2.0}
    b, tokens, channels = kwargs["hidden_states"].shape
    noisy = kwargs["hidden_states"].transpose(1, 2).reshape(b, channels, 4, 3)
    text = flux3.encode_prompts(c, PROMPTS[:1], 480)
    ours = flux3.predict(pipe.transformer, noisy, kwargs["timestep"], text, kwargs["img_ids"], None, None, refs)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def _config(base: str, dataset: str = "/nonexistent.zip", **extra) -> object:
    return parse_config({"base_model": base, "output": "me/tok", "dataset": dataset, **extra})


def test_the_distilled_checkpoint_is_refused_as_a_base_with_the_key_that_overrides_it(tmp_path):
    with pytest.raises(FinetuneError, match="train.allow_distilled=true") as e:
        flux3.check_config(_config(flux3.DISTILLED))
    assert flux3.BASE in str(e.value)
    (tmp_path / "modular_model_index.json").write_text(json.dumps({"_class_name": "Flux3DistilledModularPipeline"}))
    assert flux3.is_distilled(str(tmp_path))
    assert flux3.default_sampling(flux3.DISTILLED) == {"steps": 16, "size": 1024, "guidance": 1.0}
    assert flux3.default_sampling(flux3.BASE) == {"steps": 50, "size": 1024, "guidance": 3.5}


def test_keys_that_do_not_apply_are_refused_before_any_model_loads():
    with pytest.raises(FinetuneError, match="no guidance embedder"):
        flux3.check_config(_config("preset:flux3-tiny", train={"guidance": 2.0}))
    with pytest.raises(FinetuneError, match="multiple of 80"):
        flux3.check_config(_config("preset:flux3-tiny", train={"max_sequence_length": 500}))
    with pytest.raises(FinetuneError, match="is not FLUX 3"):
        flux3.check_config(_config("preset:flux3-tiny", sample={"preview_model": "preset:flux2-tiny"}))


def test_the_shipped_config_trains_the_base_checkpoint_within_the_window():
    cfg = load_config(ROOT / "configs" / "flux3-klein-lora.yaml")
    assert models.family_name(cfg.base_model) == "flux3" and not flux3.is_distilled(cfg.base_model)
    assert cfg.train.max_sequence_length == flux3.MAX_SEQUENCE_LENGTH and cfg.train.sigma_sampling == "shift=6.93"
    assert "train.guidance" not in cfg.explicit and cfg.sample.guidance == flux3.GUIDANCE
    assert flux3.transformer_gib(cfg.base_model) == 10.3
