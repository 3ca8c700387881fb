"""train.preservation (differential output preservation): the LoRA changes the base model's prediction on
class-word prompts less than the same run without it, measured on the transformer's velocity, fixed seed."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from test_train_local import tiny_config, work  # noqa: F401 (fixture)

from finetune import metrics
from finetune.config import parse_config
from finetune.recipes.train_local import train

pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise comparisons need one thread count


CLASS_CAPTIONS = [f"a photo of person, picture {i}" for i in range(6)]  # the dataset's captions, TOK → person


def prediction_change(base: str, lora_file, captions: list[str] = CLASS_CAPTIONS) -> float:
    return metrics.prediction_change(base, lora_file, captions, px=32, max_sequence_length=16)


@pytest.mark.parametrize("base", ["preset:tiny", "preset:flux2-tiny"])
def test_preservation_keeps_the_class_prompts_closer_to_the_base_model(work, dataset_zip, base):  # noqa: F811
    def run(name: str, class_word: str) -> float:
        data = tiny_config(dataset_zip, base, steps=10, output_dir=name)
        data["train"]["preservation"] = {"class_word": class_word}
        return prediction_change(base, train(parse_config(data)).lora_path)

    plain, preserved = run("plain", ""), run("dop", "person")
    assert preserved < 0.8 * plain, (preserved, plain)  # measured: FLUX.1 tiny < 0.5, FLUX.2 tiny 0.53


@pytest.mark.slow
def test_preservation_with_torch_compile_trains_the_eager_lora(work, dataset_zip):  # noqa: F811
    """The base-model pass flips peft's disable flag inside the compiled blocks: one more graph, the same math."""
    from safetensors.torch import load_file

    def run(name: str, **keys) -> dict:
        data = tiny_config(dataset_zip, output_dir=name, **keys) | {"lora": {"save_dtype": "float32"}}
        data["train"]["preservation"] = {"class_word": "person"}
        return load_file(str(train(parse_config(data)).lora_path))

    eager, compiled = run("eager"), run("compiled", compile=True)
    for key in eager:
        torch.testing.assert_close(eager[key], compiled[key], rtol=1e-3, atol=1e-4)


def class_images_zip(path: Path) -> Path:
    """Six class images (other drawings than the subject's) captioned with CLASS_CAPTIONS, as a dataset zip."""
    from conftest import synthetic_image

    entries, rows = {}, []
    for i, caption in enumerate(CLASS_CAPTIONS):
        buf = io.BytesIO()
        synthetic_image(10 + i, 48, 48).save(buf, format="PNG")
        digest = hashlib.sha256(buf.getvalue()).hexdigest()
        entries[f"{digest[:16]}.png"], entries[f"{digest[:16]}.txt"] = buf.getvalue(), caption.encode()
        rows.append({"file_name": f"{digest[:16]}.png", "text": caption, "width": 48, "height": 48, "sha256": digest})
    entries["metadata.jsonl"] = "".join(json.dumps(r) + "\n" for r in rows).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name in sorted(entries):
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), entries[name])
    return path


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="measured: on preset:tiny, regularisation images raise the class-prompt change (1.47x with class images "
    "unrelated to the base, 1.46x on a base first fitted to them for 300 steps) instead of lowering it. Prior "
    "preservation anchors a base that already minimises the flow loss on its class images (a trained FLUX on its "
    "own samples); a random or briefly fitted preset does not, so the class batches pull the LoRA towards them",
)
def test_regularisation_keeps_the_class_prompts_closer_to_the_base_model(work, dataset_zip):  # noqa: F811
    reg = class_images_zip(work / "reg.zip")

    def run(name: str, **reg_keys) -> float:
        data = tiny_config(dataset_zip, steps=10, output_dir=name)
        if reg_keys:
            data["train"]["regularization"] = reg_keys
        return prediction_change("preset:tiny", train(parse_config(data)).lora_path)

    plain, regularised = run("plain"), run("reg", dataset=str(reg), weight=1.0)
    assert regularised < 0.8 * plain, (regularised, plain)
