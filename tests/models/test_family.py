"""The model-family seam: which family a base model is, the interface every family implements, and that recipes
reach families only through it (issue 11)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from finetune import models
from finetune.errors import FinetuneError

ROOT = Path(__file__).parent.parent.parent
INTERFACE = [name for name in vars(models.Family) if not name.startswith("_")] + list(models.Family.__annotations__)


@pytest.mark.parametrize("name", models.FAMILIES)
def test_every_family_module_implements_the_whole_interface(name):
    module = models.family_module(name)
    missing = [attr for attr in INTERFACE if not hasattr(module, attr)]
    assert not missing, f"finetune.models.{name} lacks {missing}"
    assert module.NAME == name
    assert models._PRESETS[name] == module.PRESET_NAMES  # the torch-free table agrees with the module
    for cls in module.PIPELINE_CLASSES:
        assert models._PIPELINES[cls] == name


@pytest.mark.parametrize(
    "base_model, family",
    [
        ("preset:tiny", "flux1"),
        ("preset:small", "flux1"),
        ("preset:kontext-tiny", "kontext"),
        ("preset:flux2-tiny", "flux2"),
        ("preset:flux2-small", "flux2"),
        ("preset:flux2-dev-tiny", "flux2"),
        ("black-forest-labs/FLUX.1-dev", "flux1"),
        ("black-forest-labs/FLUX.1-schnell", "flux1"),
        ("black-forest-labs/FLUX.1-Krea-dev", "flux1"),
        ("black-forest-labs/FLUX.1-Kontext-dev", "kontext"),
        ("black-forest-labs/FLUX.2-dev", "flux2"),
        ("black-forest-labs/FLUX.2-klein-base-4B", "flux2"),
        ("black-forest-labs/FLUX.2-klein-base-9B", "flux2"),
        ("preset:flux3-tiny", "flux3"),
        ("preset:flux3-small", "flux3"),
        ("black-forest-labs/flux-3-image-klein-base", "flux3"),
        ("black-forest-labs/flux-3-image-klein", "flux3"),
    ],
)
def test_family_of_presets_and_hub_ids(base_model, family):
    assert models.family_name(base_model) == family


@pytest.mark.parametrize(
    "class_name, family",
    [
        ("FluxPipeline", "flux1"),
        ("FluxKontextPipeline", "kontext"),
        ("Flux2Pipeline", "flux2"),
        ("Flux2KleinPipeline", "flux2"),
        ("Flux3ModularPipeline", "flux3"),
        ("Flux3DistilledModularPipeline", "flux3"),
    ],
)
def test_family_of_a_folder_comes_from_model_index(tmp_path, class_name, family):
    # FLUX 3's modular pipelines save modular_model_index.json (ModularPipeline.save_pretrained)
    index = "modular_model_index.json" if class_name.startswith("Flux3") else "model_index.json"
    (tmp_path / index).write_text(json.dumps({"_class_name": class_name}))
    assert models.family_name(str(tmp_path)) == family


def test_unknown_pipeline_and_unknown_preset_list_the_supported_families(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(FinetuneError, match="StableDiffusionXLPipeline.*does not train.*FLUX.1.*FLUX.2") as info:
        models.family_for(str(tmp_path))
    assert info.value.exit_code == 2
    with pytest.raises(FinetuneError, match="unknown preset 'preset:huge'.*preset:flux2-small"):
        models.family_for("preset:huge")


def test_family_lookup_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys; from finetune import models; "
        "assert models.family_name('preset:flux2-tiny') == 'flux2'; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_recipe_imports_a_family_module():
    """Recipes speak to models.family_for only: a new family is one module, its presets, configs and tests."""
    families = {f"finetune.models.{name}" for name in models.FAMILIES}
    for path in (ROOT / "finetune" / "recipes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            else:
                continue
            assert not names & families, f"{path.name} imports {names & families}"


def test_a_flux1_folder_loads_parts_with_the_classes_model_index_names(tiny_preset_dir, tmp_path):
    """A FLUX.1 folder whose tokenizer_2 is a PreTrainedTokenizerFast (not T5TokenizerFast): FluxPipeline loads it,
    and so must training; the prompt embeddings are the same."""
    import shutil

    from diffusers import FluxPipeline
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "flux"
    shutil.copytree(tiny_preset_dir, folder)
    t5 = models.family_for("preset:tiny").load_components(str(folder), parts=("text_encoder_2",)).tokenizer_2
    shutil.rmtree(folder / "tokenizer_2")
    generic = PreTrainedTokenizerFast(tokenizer_object=t5.backend_tokenizer, pad_token="<pad>", eos_token="</s>")
    generic.model_max_length = t5.model_max_length
    generic.save_pretrained(folder / "tokenizer_2")
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer_2"] = ["transformers", "PreTrainedTokenizerFast"]
    (folder / "model_index.json").write_text(json.dumps(index))

    pipe = FluxPipeline.from_pretrained(folder)
    from transformers import T5TokenizerFast

    assert isinstance(pipe.tokenizer_2, PreTrainedTokenizerFast) and not isinstance(pipe.tokenizer_2, T5TokenizerFast)
    flux1 = models.family_for(str(folder))
    c = flux1.load_components(str(folder), parts=("text_encoder", "text_encoder_2"))
    assert type(c.tokenizer_2) is type(pipe.tokenizer_2)
    reference = flux1.load_components(str(tiny_preset_dir), parts=("text_encoder", "text_encoder_2"))
    prompts = ["a photo of TOK on a beach"]
    ours, theirs = flux1.encode_prompts(c, prompts, 32), flux1.encode_prompts(reference, prompts, 32)
    for key in flux1.TEXT_KEYS:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


def test_a_folder_without_a_part_is_refused_before_any_model_loads(tiny_preset_dir, tmp_path, finetune_home):
    import shutil

    from finetune.config import parse_config
    from finetune.recipes.train_local import train

    folder = tmp_path / "flux"
    shutil.copytree(tiny_preset_dir, folder)
    shutil.rmtree(folder / "text_encoder_2")
    cfg = parse_config({"base_model": str(folder), "output": "me/tok", "dataset": str(tmp_path / "missing.zip")})
    with pytest.raises(FinetuneError, match=r"has no text_encoder_2/.*FluxPipeline.save_pretrained") as info:
        train(cfg)
    assert info.value.exit_code == 2
