"""train.ema: an EMA of the LoRA weights, checkpointed and resumed exactly, registered and used for validation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_train_local import tiny_config, work  # noqa: F401 (fixture)

from finetune import lora, models
from finetune.config import parse_config
from finetune.lora import load_lora_file
from finetune.recipes.train_local import train

pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise comparisons need one thread count


def _initial_lora(base: str, seed: int) -> dict[str, torch.Tensor]:
    """The LoRA a run starts from: the preset's transformer with the adapter injected from the run's seed."""
    transformer = models.family_for(base).load_components(base, parts=("transformer",)).transformer
    lora.add_lora(transformer, rank=16, alpha=16, targets="all-linear", seed=seed)
    return lora.lora_state_dict(transformer)


@pytest.mark.parametrize("base", ["preset:tiny", "preset:flux2-tiny"])
def test_the_registered_lora_is_the_hand_computed_ema_of_the_saved_raw_weights(work, dataset_zip, base):  # noqa: F811
    decay = 0.7
    data = tiny_config(dataset_zip, base, steps=4, save_every=1, keep_checkpoints=0, output_dir="run")
    data["train"]["ema"] = {"decay": decay}
    cfg = parse_config(data | {"lora": {"save_dtype": "float32"}})
    version = train(cfg)
    expected = _initial_lora(base, cfg.train.seed)
    for step in range(1, 5):
        raw, _ = load_lora_file(work / "run" / "checkpoints" / f"step-{step:06d}" / "lora.safetensors")
        expected = {k: decay * v + (1 - decay) * raw[k] for k, v in expected.items()}
        state = torch.load(work / "run" / "checkpoints" / f"step-{step:06d}" / "training_state.pt")
        for k, v in expected.items():
            torch.testing.assert_close(state["ema"][k], v, rtol=0, atol=1e-6)
    registered, _ = load_lora_file(version.lora_path)
    assert registered.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(registered[k], v, rtol=0, atol=1e-6)
    assert not torch.equal(registered[k], raw[k])  # the raw weights stay in the checkpoint, for resuming


def test_validation_loss_uses_the_ema_weights_and_leaves_the_trained_ones(work, dataset_zip):  # noqa: F811
    def run(name: str, decay: float) -> list[float]:
        data = tiny_config(dataset_zip, steps=6, output_dir=name)
        data["train"]["ema"] = {"decay": decay, "device": "same"}
        data["sample"] = {"every": 3, "prompts": []}
        train(parse_config(data))
        rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        return [r["val_loss"] for r in rows if "val_loss" in r], [r["loss"] for r in rows if "loss" in r]

    plain_val, plain_loss = run("plain", 0.0)
    ema_val, ema_loss = run("ema", 0.9)
    assert ema_loss == plain_loss  # the EMA never feeds back into training
    assert ema_val[0] == plain_val[0] and ema_val[1:] != plain_val[1:]  # step 0: the EMA is the initial LoRA


@pytest.mark.parametrize("base", ["preset:tiny", "preset:flux2-tiny"])
def test_a_resumed_run_with_ema_and_preservation_matches_an_uninterrupted_one_bitwise(work, dataset_zip, base):  # noqa: F811
    def config(out: str):
        data = tiny_config(dataset_zip, base, save_every=3, output_dir=out)
        data["train"]["ema"] = {"decay": 0.8}
        data["train"]["preservation"] = {"class_word": "person"}
        return parse_config(data)

    full = train(config("a"))
    shutil.copytree(work / "a", work / "b")
    shutil.rmtree(work / "b" / "checkpoints" / "step-000006")
    (work / "b" / "lora.safetensors").unlink()
    resumed = train(config("b"), resume=True)
    assert resumed.id == full.id
