"""FLUX.1 Kontext [dev] equals FluxKontextPipeline: the reference latents and ids the trainer feeds the transformer
and one transformer call with them are what the pipeline computes for the same image (issue 12). The preset is built
in process."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch
from conftest import synthetic_image

from finetune import models
from finetune.dataset import load_bucket_image
from finetune.errors import FinetuneError
from finetune.models import common, flux1, kontext

PROMPT = "make TOK a pencil sketch"


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory):
    return kontext.save_preset("kontext-tiny", tmp_path_factory.mktemp("kontext") / "kontext")


def _pipeline(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder)


def _pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()[None] / 127.5 - 1


def test_saved_preset_loads_in_flux_kontext_pipeline_and_in_load_components(kontext_dir):
    pipe = _pipeline(kontext_dir)
    assert type(pipe).__name__ == "FluxKontextPipeline"
    assert models.family_name(str(kontext_dir)) == "kontext"
    c = kontext.load_components(str(kontext_dir))
    built = kontext.build_preset("kontext-tiny")
    for ours, theirs in ((c.transformer, pipe.transformer), (built.transformer, pipe.transformer)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert c.transformer.config.guidance_embeds  # Kontext [dev] is guidance-distilled
    with pytest.raises(FinetuneError, match="preset:kontext-tiny"):
        kontext.build_preset("tiny")


def test_cached_captions_equal_flux_kontext_pipeline_encode_prompt(kontext_dir):
    pipe = _pipeline(kontext_dir)
    c = kontext.load_components(str(kontext_dir), parts=("text_encoder", "text_encoder_2"))
    ours = kontext.encode_prompts(c, [PROMPT, ""], kontext.max_sequence_length(str(kontext_dir)))
    embeds, pooled, _ = pipe.encode_prompt([PROMPT, ""], None, max_sequence_length=512)
    # the same token ids and weights (the text parts are FLUX.1's); only float summation order differs between the
    # two call paths: 2.4e-5 at most on embeddings up to 2.8 in size
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=5e-5)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=0, atol=5e-5)
    assert not torch.allclose(ours["prompt_embeds"][0], ours["prompt_embeds"][1], atol=1e-3)


def test_reference_latents_ids_and_one_call_equal_the_pipeline(kontext_dir, tmp_path):
    """The reference as the trainer prepares it (resized to the target's bucket, VAE mean, normalized, packed, ids
    with channel 0 = 1) equals ``prepare_latents``; one ``predict`` equals the pipeline's first denoising call with
    ``image=`` (reference tokens after the noisy ones), cut to the noisy tokens."""
    bucket = (64, 80)  # (w, h): the target's bucket, which the trainer resizes the reference to
    with zipfile.ZipFile(tmp_path / "refs.zip", "w") as zf:
        buf = io.BytesIO()
        synthetic_image(3, 90, 110).save(buf, format="PNG")
        zf.writestr("ref.png", buf.getvalue())
    with zipfile.ZipFile(tmp_path / "refs.zip") as zf:
        image = load_bucket_image(zf, "ref.png", bucket)
    pipe = _pipeline(kontext_dir)
    c = kontext.load_components(str(kontext_dir), parts=("vae", "text_encoder", "text_encoder_2"))
    ref = kontext.normalize_latents(kontext.encode_images(c.vae, _pixels(image))[0], c.vae)
    processed = pipe.image_processor.preprocess(image, 80, 64)
    _, latents, _, ids = pipe.prepare_latents(processed, 1, 16, 80, 64, torch.float32, "cpu")
    torch.testing.assert_close(kontext.pack_latents(ref), latents, rtol=0, atol=1e-5)
    our_ids = kontext.reference_ids(ref.shape, 0, "cpu", torch.float32)
    torch.testing.assert_close(our_ids, ids, rtol=0, atol=0)
    assert set(our_ids[:, 0].tolist()) == {1.0}
    with pytest.raises(FinetuneError, match="one reference"):
        kontext.reference_ids(ref.shape, 1, "cpu", torch.float32)

    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output[0])), with_kwargs=True
    )
    pipe(prompt=PROMPT, image=image, height=80, width=64, num_inference_steps=2, guidance_scale=2.5,
         output_type="latent", _auto_resize=False, max_area=80 * 64)  # fmt: skip
    hook.remove()
    kwargs, reference = calls[0]
    tokens = 5 * 4  # (80 / 8 / 2) × (64 / 8 / 2)
    assert kwargs["hidden_states"].shape[1] == 2 * tokens  # the reference follows the noisy tokens
    torch.testing.assert_close(kwargs["hidden_states"][:, tokens:], kontext.pack_latents(ref), rtol=0, atol=1e-5)
    noisy = flux1.unpack_latents(kwargs["hidden_states"][:, :tokens], 80, 64)
    img_ids = kontext.image_ids(noisy.shape, "cpu", torch.float32)
    text = kontext.encode_prompts(c, [PROMPT], 512)
    txt_ids = kontext.text_ids(512, "cpu", torch.float32)
    pred = kontext.predict(pipe.transformer, noisy, kwargs["timestep"], text, img_ids, txt_ids, 2.5, [ref])
    assert pred.shape == (1, tokens, 64)
    torch.testing.assert_close(pred, reference[:, :tokens], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([img_ids, our_ids]), kwargs["img_ids"], rtol=0, atol=0)
    without = kontext.predict(pipe.transformer, noisy, kwargs["timestep"], text, img_ids, txt_ids, 2.5)
    assert not torch.allclose(without, pred, atol=1e-3)  # the reference matters to the prediction
    with pytest.raises(FinetuneError, match="takes no reference"):  # FLUX.1 [dev] refuses references
        flux1.predict(pipe.transformer, noisy, kwargs["timestep"], text, img_ids, txt_ids, 2.5, [ref])


def test_sample_images_with_an_input_equal_the_pipeline_called_on_the_fitted_image(kontext_dir):
    """``sample_images(inputs=)`` renders each prompt on its input at the input's aspect ratio (sample size's area),
    exactly as the pipeline does when given that fitted image with ``_auto_resize=False``."""
    pipe = _pipeline(kontext_dir)
    wide = synthetic_image(1, 120, 60)
    images = kontext.sample_images(
        pipe, [PROMPT, "a photo of TOK"], [7, 8], steps=2, size=64, guidance=2.5, inputs=[[wide], [wide]]
    )
    assert len(images) == 4
    w, h = common.edit_size(120, 60, 64)
    assert all(im.size == (w, h) for im in images) and w > h
    fitted = common.fit_inputs([wide], 64)[0]
    seed = torch.Generator("cpu").manual_seed(8)
    direct = pipe(prompt=PROMPT, image=fitted, height=h, width=w, num_inference_steps=2, guidance_scale=2.5,
                  generator=seed, _auto_resize=False, max_area=w * h).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(images[1]), np.asarray(direct))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # seeds differ
    with pytest.raises(FinetuneError, match="one input image"):
        kontext.sample_images(pipe, [PROMPT], [0], steps=1, size=64, guidance=2.5, inputs=[[wide, wide]])
