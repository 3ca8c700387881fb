"""FLUX.2 ([klein] and [dev]) equals its diffusers pipelines: what the trainer caches and feeds the transformer is
what Flux2KleinPipeline / Flux2Pipeline compute for the same input (issue 11). Presets are built in process."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.config import parse_config
from finetune.errors import FinetuneError
from finetune.models import flux2

KLEIN, DEV = "flux2-tiny", "flux2-dev-tiny"
PROMPTS = ["a photo of TOK on a beach", "", "an oil painting of a cat " * 60]  # the last is truncated at 512


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory):
    return flux2.save_preset(KLEIN, tmp_path_factory.mktemp("flux2") / "klein")


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory):
    return flux2.save_preset(DEV, tmp_path_factory.mktemp("flux2") / "dev")


def _pipeline(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder)


def test_presets_are_deterministic_and_shaped_as_the_issue_asks():
    a, b, c = flux2.build_preset(KLEIN, 0), flux2.build_preset(KLEIN, 0), flux2.build_preset(KLEIN, 1)
    sa, sb, sc = a.transformer.state_dict(), b.transformer.state_dict(), c.transformer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not all(torch.equal(sa[k], sc[k]) for k in sa)
    small = flux2.build_preset("flux2-small")
    config = small.transformer.config
    assert (config.num_layers, config.num_single_layers, config.attention_head_dim, config.num_attention_heads) == (
        2,
        4,
        64,
        4,
    )
    assert tuple(config.axes_dims_rope) == (16, 16, 16, 16) and not config.guidance_embeds
    assert config.joint_attention_dim == 3 * small.text_encoder.config.hidden_size
    assert small.text_encoder.config.num_hidden_layers == 28  # hidden_states[27] exists
    bn = small.vae.bn
    assert bn.running_mean.abs().max() > 0.1 and (bn.running_var - 1).abs().max() > 0.1  # not 0 and 1
    dev = flux2.build_preset(DEV)
    assert dev.transformer.config.guidance_embeds and dev.text_encoder.config.text_config.num_hidden_layers >= 31


@pytest.mark.parametrize("preset", [KLEIN, DEV])
def test_saved_preset_loads_in_its_pipeline_and_in_load_components(preset, klein_dir, dev_dir):
    folder = klein_dir if preset == KLEIN else dev_dir
    pipe = _pipeline(folder)
    assert type(pipe).__name__ == ("Flux2KleinPipeline" if preset == KLEIN else "Flux2Pipeline")
    c = flux2.load_components(str(folder), parts=("transformer", "vae", "text_encoder"))
    built = flux2.build_preset(preset)
    for part in ("transformer", "vae", "text_encoder"):
        ours, theirs = getattr(c, part).state_dict(), getattr(built, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), part
    assert flux2.is_klein(str(folder)) == (preset == KLEIN)


@pytest.mark.parametrize("preset", [KLEIN, DEV])
def test_encode_prompts_equals_the_pipeline_encode_prompt(preset, klein_dir, dev_dir):
    folder = klein_dir if preset == KLEIN else dev_dir
    pipe = _pipeline(folder)
    c = flux2.load_components(str(folder), parts=("text_encoder",))
    ours = flux2.encode_prompts(c, PROMPTS, 512)["prompt_embeds"]
    theirs, text_ids = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=512)
    assert ours.shape == (3, 512, 96)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert not torch.allclose(ours[0], ours[1])
    torch.testing.assert_close(flux2.text_ids(512, "cpu", torch.int64), text_ids[0], rtol=0, atol=0)
    # the bug this guards against (diffusers#13445: klein's script stacks other layers): one layer off shows
    if preset == KLEIN:
        wrong = pipe.encode_prompt(PROMPTS, device="cpu", text_encoder_out_layers=(10, 18, 27))[0]
        assert not torch.allclose(ours, wrong, atol=1e-3)


def test_latents_and_ids_equal_the_pipeline(klein_dir):
    pipe = _pipeline(klein_dir)
    c = flux2.load_components(str(klein_dir), parts=("vae",))
    pixels = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = flux2.encode_images(c.vae, pixels)
    assert mean.shape == std.shape == (2, 32, 8, 6) and bool((std > 0).all())
    z = flux2.normalize_latents(mean, c.vae)
    reference = pipe._encode_vae_image(pixels, generator=None)  # the pipeline encodes with the mean (argmax)
    assert z.shape == (2, 128, 4, 3)
    torch.testing.assert_close(z, reference, rtol=0, atol=1e-6)
    assert not torch.allclose(z, flux2.patchify_latents(mean), atol=1e-2)  # the batch norm matters here
    torch.testing.assert_close(flux2.pack_latents(z), pipe._pack_latents(z), rtol=0, atol=0)
    ids = flux2.image_ids(z.shape, "cpu", torch.int64)
    torch.testing.assert_close(ids, pipe._prepare_latent_ids(z)[0], rtol=0, atol=0)
    assert flux2.image_seq_len(z.shape) == 12


@pytest.mark.parametrize("preset", [KLEIN, DEV])
def test_one_transformer_call_equals_the_pipeline(preset, klein_dir, dev_dir):
    """The pipeline's first denoising call, recorded; ``predict`` on the same latents, σ and cached text gives the
    same velocity (timestep convention, guidance, ids, packing)."""
    folder = klein_dir if preset == KLEIN else dev_dir
    pipe = _pipeline(folder)
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output[0])), with_kwargs=True
    )
    guidance = 1.0 if preset == KLEIN else 4.0  # klein: no CFG, so the first call is the prompt's
    pipe(prompt=PROMPTS[0], height=64, width=48, num_inference_steps=2, guidance_scale=guidance, output_type="latent")
    hook.remove()
    kwargs, reference = calls[0]
    c = flux2.load_components(str(folder), parts=("text_encoder",))
    text = flux2.encode_prompts(c, PROMPTS[:1], 512)
    b, tokens, channels = kwargs["hidden_states"].shape
    noisy = kwargs["hidden_states"].permute(0, 2, 1).reshape(b, channels, 4, 3)  # unpack [B, h·w, 128]
    sigma = kwargs["timestep"]
    ours = flux2.predict(
        pipe.transformer,
        noisy,
        sigma,
        text,
        flux2.image_ids(noisy.shape, "cpu", torch.float32),
        flux2.text_ids(512, "cpu", torch.float32),
        None if preset == KLEIN else guidance,
    )
    assert 0 < float(sigma[0]) <= 1  # the pipeline passes σ, not σ·1000
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def _config(base: str, **extra) -> object:
    return parse_config({"base_model": base, "output": "me/tok", "dataset": "/nonexistent.zip", **extra})


def test_a_distilled_klein_base_is_refused_with_the_key_that_overrides_it(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": True}))
    for base in ("black-forest-labs/FLUX.2-klein-4B", str(tmp_path)):
        with pytest.raises(
            FinetuneError, match=r"step-distilled.*collapse.*klein-base-4B.*train.allow_distilled"
        ) as e:
            flux2.check_config(_config(base))
        assert e.value.exit_code == 2
    assert flux2.is_distilled("black-forest-labs/FLUX.2-klein-9B")
    assert not flux2.is_distilled("black-forest-labs/FLUX.2-klein-base-9B")


def test_guidance_is_refused_for_klein_and_kept_for_dev():
    with pytest.raises(FinetuneError, match="train.guidance: FLUX.2 \\[klein\\].*no guidance embedder"):
        flux2.check_config(_config("preset:flux2-tiny", train={"guidance": 3.0}))
    flux2.check_config(_config("preset:flux2-dev-tiny", train={"guidance": 1.0}))
    assert flux2.default_caption_dropout("black-forest-labs/FLUX.2-klein-base-4B") == 0.1
    assert flux2.default_caption_dropout("black-forest-labs/FLUX.2-dev") is None


def test_a_folder_without_its_text_encoder_is_refused(klein_dir, tmp_path):
    import shutil

    folder = tmp_path / "klein"
    shutil.copytree(klein_dir, folder)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(FinetuneError, match=r"has no text_encoder/.*save_pretrained"):
        flux2.check_config(_config(str(folder)))


def test_quantize_auto_weighs_the_model_size():
    assert flux2.transformer_gib("black-forest-labs/FLUX.2-klein-base-9B") == pytest.approx(16.8)
    assert flux2.transformer_gib("black-forest-labs/FLUX.2-dev") == pytest.approx(59.6)
    assert flux2.transformer_gib("preset:flux2-small") == 0.0


@pytest.mark.parametrize(
    "base, gib, expected",
    [
        ("black-forest-labs/FLUX.2-klein-base-4B", 16, "int8"),  # 7.2 GiB + 14 > 16
        ("black-forest-labs/FLUX.2-klein-base-4B", 24, None),
        ("black-forest-labs/FLUX.2-klein-base-9B", 24, "int8"),  # 16.8 + 14 > 24
        ("black-forest-labs/FLUX.2-klein-base-9B", 48, None),
        ("black-forest-labs/FLUX.2-dev", 48, "int8"),  # 59.6 + 14 > 48
        ("black-forest-labs/FLUX.2-dev", 80, None),
        ("black-forest-labs/FLUX.1-dev", 24, "int8"),  # FLUX.1's rule as before: under 36 GiB
        ("black-forest-labs/FLUX.1-dev", 40, None),
    ],
)
def test_quantize_auto_on_a_gpu_of_each_size(monkeypatch, base, gib, expected):
    """``train.quantize: auto`` on a CUDA device (faked properties): int8 below the family's bf16 weights + 14 GiB."""
    from types import SimpleNamespace

    from finetune import models

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=gib * 2**30))
    family = models.family_for(base)
    assert models.resolve_quantize("auto", "cuda", weights_gib=family.transformer_gib(base)) == expected


# ---- edit pairs: references as the pipeline encodes and places them (issue 12) -----------------------------------


@pytest.mark.parametrize("preset, count", [(KLEIN, 1), (KLEIN, 2), (DEV, 2)])
def test_reference_latents_ids_and_one_call_with_references_equal_the_pipeline(
    klein_dir, dev_dir, tmp_path, preset, count
):
    """References as the trainer prepares them (resized to the target's bucket, VAE mean, normalized) equal
    ``prepare_image_latents`` for the same resized images, with reference i at T = 10·(i + 1); one ``predict`` with
    them equals the pipeline's first denoising call with ``image=`` (reference tokens after the noisy ones), cut to
    the noisy tokens. [klein] and [dev] (guidance embedded) alike."""
    import io
    import zipfile

    import numpy as np
    from conftest import synthetic_image

    from finetune.dataset import load_bucket_image

    bucket = (64, 80)  # (w, h): the target's bucket, which the trainer resizes each reference to
    with zipfile.ZipFile(tmp_path / "refs.zip", "w") as zf:
        for i in range(count):
            buf = io.BytesIO()
            synthetic_image(i, 90 + 10 * i, 110).save(buf, format="PNG")
            zf.writestr(f"ref{i}.png", buf.getvalue())
    with zipfile.ZipFile(tmp_path / "refs.zip") as zf:
        images = [load_bucket_image(zf, f"ref{i}.png", bucket) for i in range(count)]
    folder = klein_dir if preset == KLEIN else dev_dir
    guidance = None if preset == KLEIN else 4.0
    pipe = _pipeline(folder)
    c = flux2.load_components(str(folder), parts=("vae", "text_encoder"))
    pixels = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float()[None] / 127.5 - 1 for im in images]
    refs = [flux2.normalize_latents(flux2.encode_images(c.vae, px)[0], c.vae) for px in pixels]
    processed = [pipe.image_processor.preprocess(im, height=80, width=64, resize_mode="crop") for im in images]
    latents, ids = pipe.prepare_image_latents(processed, 1, None, "cpu", torch.float32)
    ours = torch.cat([flux2.pack_latents(r) for r in refs], dim=1)
    torch.testing.assert_close(ours, latents, rtol=1e-5, atol=1e-5)  # float order varies with the thread count
    our_ids = torch.cat([flux2.reference_ids(r.shape, i, "cpu", torch.int64) for i, r in enumerate(refs)])
    torch.testing.assert_close(our_ids, ids[0], rtol=0, atol=0)
    assert sorted({int(t) for t in our_ids[:, 0]}) == [10 * (i + 1) for i in range(count)]

    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output[0])), with_kwargs=True
    )
    pipe(prompt=PROMPTS[0], image=images, height=80, width=64, num_inference_steps=2,
         guidance_scale=guidance or 1.0, output_type="latent")  # fmt: skip
    hook.remove()
    kwargs, reference = calls[0]
    tokens = 5 * 4
    assert kwargs["hidden_states"].shape[1] == tokens * (1 + count)  # the references follow the noisy tokens
    torch.testing.assert_close(kwargs["hidden_states"][:, tokens:], ours, rtol=1e-5, atol=1e-5)
    noisy = kwargs["hidden_states"][:, :tokens].permute(0, 2, 1).reshape(1, 128, 5, 4)
    img_ids = flux2.image_ids(noisy.shape, "cpu", torch.float32)
    text = flux2.encode_prompts(c, PROMPTS[:1], 512)
    txt_ids = flux2.text_ids(512, "cpu", torch.float32)
    pred = flux2.predict(pipe.transformer, noisy, kwargs["timestep"], text, img_ids, txt_ids, guidance, refs)
    assert pred.shape == (1, tokens, 128)
    torch.testing.assert_close(pred, reference[:, :tokens], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([img_ids.long(), our_ids]), kwargs["img_ids"][0], rtol=0, atol=0)
    without = flux2.predict(pipe.transformer, noisy, kwargs["timestep"], text, img_ids, txt_ids, guidance)
    assert not torch.allclose(without, pred, atol=1e-3)  # the references matter to the prediction


def test_sample_images_with_inputs_equal_the_pipeline_called_on_the_fitted_references(klein_dir):
    """``sample_images(inputs=)`` renders each prompt on its references (fitted to the first one's aspect ratio at the
    sample size's area) exactly as ``Flux2KleinPipeline`` does when given them as ``image=``."""
    import numpy as np
    from conftest import synthetic_image

    from finetune.models import common

    pipe = _pipeline(klein_dir)
    refs = [synthetic_image(1, 60, 120), synthetic_image(2, 50, 50)]
    images = flux2.sample_images(pipe, PROMPTS[:1], [3], steps=2, size=128, guidance=1.0, inputs=[refs])
    w, h = common.edit_size(60, 120, 128)  # the pipeline wants references of 64 px and more
    assert len(images) == 1 and images[0].size == (w, h) and h > w
    fitted = common.fit_inputs(refs, 128)
    assert [im.size for im in fitted] == [(w, h), (w, h)]
    direct = pipe(prompt=PROMPTS[0], image=fitted, height=h, width=w, num_inference_steps=2, guidance_scale=1.0,
                  generator=torch.Generator("cpu").manual_seed(3)).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(images[0]), np.asarray(direct))
    plain = flux2.sample_images(pipe, PROMPTS[:1], [3], steps=2, size=(h, w), guidance=1.0)[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(direct))  # the references change the image
    with pytest.raises(FinetuneError, match="60×120 px samples at 48×80 at size 64, and FLUX.2 takes references of"):
        flux2.sample_images(pipe, PROMPTS[:1], [3], steps=2, size=64, guidance=1.0, inputs=[refs])
