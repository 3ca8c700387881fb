"""The local trainer on preset:flux3-tiny (CPU): determinism, exact resume, the LoRA in Flux3ModularPipeline, the
cache equal to the pipeline's encoder, samples, and FLUX 3's bad input (issue 15)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from finetune.config import parse_config
from finetune.errors import FinetuneError
from finetune.lora import load_lora_file
from finetune.recipes.train_local import train
from finetune.registry import Registry

BASE = "preset:flux3-tiny"


pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise comparisons need one thread count


@pytest.fixture
def work(tmp_path, finetune_home, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def config(dataset: Path, base: str = BASE, lora: dict | None = None, sample: dict | None = None, **train_keys):
    return parse_config(
        {
            "base_model": base,
            "output": "me/tok",
            "dataset": str(dataset),
            "lora": {"rank": 4, "alpha": 8, **(lora or {})},
            "train": {"steps": 4, "resolution": [32], "learning_rate": 1e-2, "max_sequence_length": 80, **train_keys},
            "sample": {"every": 0, **(sample or {})},
        }
    )


def test_same_config_gives_the_same_version_and_a_resume_is_bitwise_equal(work, dataset_zip):
    full = train(config(dataset_zip, save_every=2, output_dir=str(work / "a")))
    assert train(config(dataset_zip, save_every=2)).id == full.id  # another run folder, the same LoRA
    assert len(Registry().versions("me/tok")) == 1
    lineage = full.lineage
    assert lineage["family"] == "flux3" and lineage["config"]["train"]["caption_dropout"] == 0.1  # real CFG
    tensors, meta = load_lora_file(full.lora_path)
    assert meta["finetune.base_model"] == BASE and all(k.startswith("transformer.") for k in tensors)
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if "lora_B" in k)  # it trained
    assert not any(k.endswith(".alpha") for k in tensors)
    # a copy of the run that stopped after its step-2 checkpoint: resume reproduces steps 3-4 bitwise
    shutil.copytree(work / "a", work / "b")
    shutil.rmtree(work / "b" / "checkpoints" / "step-000004")
    (work / "b" / "lora.safetensors").unlink()
    resumed = train(config(dataset_zip, save_every=2, output_dir=str(work / "b")), resume=True)
    assert resumed.id == full.id
    assert (work / "b" / "lora.safetensors").read_bytes() == (work / "a" / "lora.safetensors").read_bytes()


def test_the_lora_loads_in_the_modular_pipeline_and_the_cache_equals_its_encoder(work, dataset_zip, finetune_home):
    """Flux3ModularPipeline.load_lora_weights (Flux3LoraLoaderMixin) consumes every key, and its transformer then
    gives the trained model's output (alpha != rank, carried in the adapter metadata). The cached caption is the
    pipeline encoder's output in its window."""
    from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep

    from finetune import cache, lora
    from finetune.models import flux3

    version = train(config(dataset_zip, lora={"rank": 4, "alpha": 12, "save_dtype": "float32"}, steps=3))
    tensors, meta = load_lora_file(version.lora_path)
    assert '"transformer.lora_alpha": 12.0' in meta["lora_adapter_metadata"]
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in tensors}
    # all-linear: the text and image per-mode blocks and the joint blocks; not the reference blocks (no edits yet)
    assert {m.split(".")[0] for m in modules} == {"txt_mode_blocks", "mode_blocks", "single_transformer_blocks"}
    assert not any(m.startswith("mode_blocks.image_cond.") for m in modules)
    assert "single_transformer_blocks.0.ff.linear_in" in modules and "txt_mode_blocks.0.attn.to_out.0" in modules

    parts = flux3.build_preset("flux3-tiny")
    pipe = flux3.pipeline_from_components(parts)
    assert type(pipe).__name__ == "Flux3ModularPipeline"
    pipe.load_lora_weights(str(version.lora_path))
    loaded = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A}
    assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in tensors} == loaded  # every key consumed

    trained = flux3.build_preset("flux3-tiny").transformer
    lora.add_lora(trained, rank=4, alpha=12, targets="all-linear", dropout=0.0, seed=0)
    lora.set_lora_state(trained, tensors)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 6, 128, generator=g),
        encoder_hidden_states=torch.randn(1, 80, 256, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=flux3.image_ids((2, 3), "cpu"),
        txt_ids=flux3.text_ids(80, "cpu"),
        return_dict=False,
    )
    with torch.no_grad():
        ours, theirs = trained(**inputs)[0], pipe.transformer(**inputs)[0]
        base = flux3.build_preset("flux3-tiny").transformer(**inputs)[0]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert float((ours - base).abs().max()) > 1e-3  # the LoRA changes the output, far above the tolerance

    caption = "a photo of TOK, picture 0"
    text_id = cache.source_identity(BASE, ["text_encoder", "tokenizer"])
    key = cache.text_key(text_id, caption, 80, torch.float32, "flux3")
    cached = cache.read_tensors(cache.text_file(finetune_home / "cache", key))
    tokenizer = parts.tokenizer
    tokenizer.tokenizer = tokenizer  # Qwen3VLProcessor's text half (tests/models/test_flux3.py says why)
    reference = Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds(parts.text_encoder, tokenizer, caption)
    torch.testing.assert_close(cached["prompt_embeds"][None], reference, rtol=0, atol=1e-6)
    assert int(cached["text_mask"].sum()) == 80


def test_samples_render_through_the_modular_pipeline(work, dataset_zip):
    version = train(config(dataset_zip, steps=1, sample={"every": 1, "prompts": ["a photo of TOK"], "seeds": [0, 1]}))
    folder = Path(version.lineage["run_dir"]) / "samples" / "step-000001"
    assert sorted(p.name for p in folder.glob("*.png")) == ["prompt0-seed0.png", "prompt0-seed1.png"]


@pytest.mark.parametrize(
    "base, keys, message",
    [
        ("black-forest-labs/flux-3-image-klein", {}, "step-distilled FLUX 3.*train.allow_distilled=true"),
        (BASE, {"guidance": 2.0}, "no guidance embedder"),
        (BASE, {"max_sequence_length": 100}, "not a multiple of 80"),
    ],
)
def test_bad_input_stops_before_any_model_loads(work, dataset_zip, base, keys, message):
    with pytest.raises(FinetuneError, match=message) as info:
        train(config(dataset_zip, base, **keys))
    assert info.value.exit_code == 2
    assert not (work / "runs").exists() and not Registry().versions("me/tok")


def test_a_caption_longer_than_the_window_stops_before_any_model_loads(work, tmp_path, monkeypatch):
    from conftest import write_dataset_zip

    from finetune.models import flux3

    long = write_dataset_zip(tmp_path / "long.zip", [(32, 32)], trigger_word="TOK " + "sunset beach " * 40)
    monkeypatch.setattr(flux3, "build_preset", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(FinetuneError, match="a window of 160; FLUX 3 Image Klein training caches up to") as info:
        train(config(long))
    assert info.value.exit_code == 2 and not (work / "runs").exists()


def test_edit_pairs_train_through_the_native_reference_mode_and_sample_their_inputs(work, tmp_path):
    """A pair zip on FLUX 3: each reference goes in as image_cond tokens; samples render the first two pairs'
    inputs through the pipeline's image-conditioned workflow (input, then outputs, per row)."""
    import io
    import zipfile

    from conftest import synthetic_image

    pairs = tmp_path / "pairs.zip"
    with zipfile.ZipFile(pairs, "w") as zf:
        for n, stem in enumerate(("a", "b", "c")):
            for part, index in (("start", 2 * n), ("end", 2 * n + 1)):
                buf = io.BytesIO()
                synthetic_image(index, 48, 32).save(buf, format="PNG")
                zf.writestr(f"{stem}_{part}.png", buf.getvalue())
            zf.writestr(f"{stem}.txt", "make it TOK")
        rows = [{"file_name": f"{s}_end.png", "text": "make it TOK"} for s in ("a", "b", "c")]
        zf.writestr("metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    version = train(config(pairs, steps=2, sample={"every": 2, "seeds": [0], "size": 32}))
    assert version.lineage["family"] == "flux3"
    folder = Path(version.lineage["run_dir"]) / "samples" / "step-000002"
    names = sorted(p.name for p in folder.glob("*.png"))
    assert names == ["grid.png", "prompt0-input.png", "prompt0-seed0.png", "prompt1-input.png", "prompt1-seed0.png"]


def test_export_refuses_flux3_loras_for_lack_of_a_documented_comfyui_mapping(work, dataset_zip, tmp_path):
    from finetune.lora_export import lora_family, stream_export

    version = train(config(dataset_zip, steps=1))
    tensors, meta = load_lora_file(version.lora_path)
    assert lora_family(tensors, meta) == "flux3"  # by its base model: its single blocks carry FLUX.1's names
    key = "transformer.txt_mode_blocks.0.attn.to_q"
    named = {f"{key}.lora_A.weight": torch.zeros(4, 8), f"{key}.lora_B.weight": torch.zeros(8, 4)}
    assert lora_family(named, {}) == "flux3"  # by its per-mode block names
    for form in ("comfyui", "kohya"):
        with pytest.raises(FinetuneError, match="no documented ComfyUI or kohya key mapping.*--format diffusers"):
            stream_export(version.lora_path, tmp_path / f"{form}.safetensors", form=form)
        assert not (tmp_path / f"{form}.safetensors").exists()


def _distilled_folder(path: Path) -> Path:
    """preset:flux3-tiny with a flow-map transformer (the distilled checkpoint's class), saved as its pipeline."""
    from diffusers import Flux3Transformer2DModel

    from finetune.models import flux3

    parts = flux3.build_preset("flux3-tiny", seed=7)
    torch.manual_seed(7)
    parts.transformer = Flux3Transformer2DModel(**{**parts.transformer.config, "flow_map": True}).eval()
    parts.scheduler = None
    pipe = flux3.pipeline_from_components(parts)
    assert type(pipe).__name__ == "Flux3DistilledModularPipeline"
    pipe.save_pretrained(str(path), overwrite_modular_index=True)
    return path


def test_samples_are_also_rendered_on_the_distilled_preview_model(work, dataset_zip, tmp_path):
    from finetune.models import flux3

    distilled = _distilled_folder(tmp_path / "distilled")
    assert flux3.is_distilled(str(distilled)) and flux3.default_sampling(str(distilled))["steps"] == 16
    sample = {"every": 1, "prompts": ["a photo of TOK"], "seeds": [0], "preview_model": str(distilled), "size": 32}
    version = train(config(dataset_zip, steps=1, sample=sample))
    folder = Path(version.lineage["run_dir"]) / "samples" / "step-000001"
    assert (folder / "prompt0-seed0.png").is_file() and (folder / "preview" / "prompt0-seed0.png").is_file()


def test_eval_samples_a_flux3_lora_against_its_base(work, dataset_zip, tmp_path, tiny_scorer_dirs):
    """finetune eval on FLUX 3: the sampling pipeline with adapters switched, real CFG, every image seeded."""
    import numpy as np
    from PIL import Image

    from finetune.recipes.evaluate import evaluate

    version = train(config(dataset_zip, steps=2, learning_rate=0.5))
    clip_dir, dino_dir = tiny_scorer_dirs
    result = evaluate(["base", version.ref], prompts=["a photo of [trigger]"], out=tmp_path / "report", seeds=(1, 2),
                      steps=2, size=32, progress=False, clip_model=clip_dir, dino_model=dino_dir)  # fmt: skip
    doc = result.doc
    assert doc["settings"]["guidance"] == 3.5 and doc["settings"]["max_sequence_length"] == 480
    files = {(im["column"], im["seed"]): tmp_path / "report" / im["file"] for im in doc["images"]}
    base = np.asarray(Image.open(files[("c0", 1)])).astype(int)
    assert base.shape == (32, 32, 3)
    assert np.abs(base - np.asarray(Image.open(files[("c1", 1)]))).mean() > 0.5  # the LoRA is applied
    assert np.abs(base - np.asarray(Image.open(files[("c0", 2)]))).mean() > 0.5  # seeds differ


def test_replicate_has_no_flux3_trainer_so_the_remote_backend_refuses_it(dataset_zip):
    from finetune.recipes.train_remote import choose_trainer

    cfg = parse_config({"base_model": "black-forest-labs/flux-3-image-klein-base", "output": "me/tok",
                        "dataset": str(dataset_zip), "backend": "replicate"})  # fmt: skip
    with pytest.raises(FinetuneError, match="is FLUX 3, and Replicate has no FLUX 3 LoRA trainer") as info:
        choose_trainer(cfg)
    assert info.value.exit_code == 2
