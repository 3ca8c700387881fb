"""Issue 16's data features on preset:tiny: dataset lists with repeats, held-out validation, flip, masked loss and
regularisation images."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import write_dataset_zip
from PIL import Image
from test_train_local import tiny_config, work  # noqa: F401 (fixture)

from finetune import models
from finetune.config import parse_config
from finetune.dataset import BatchOrder, assign_buckets, read_datasets
from finetune.errors import FinetuneError
from finetune.lora import load_lora_file
from finetune.recipes.train_local import _Batch, _flow_loss, mask_to_latent_grid, train

pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise comparisons need one thread count


def with_masks(src: Path, dst: Path, value: int | None = None) -> Path:
    """A copy of ``src`` with ``<stem>_mask.png`` per image (constant ``value``, or white left half when None)."""
    with zipfile.ZipFile(src) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    rows = [json.loads(line) for line in entries["metadata.jsonl"].decode().splitlines()]
    for row in rows:
        w, h = row["width"], row["height"]
        mask = Image.new("L", (w, h), 0 if value is None else value)
        if value is None:
            mask.paste(255, (0, 0, w // 2, h))
        buf = io.BytesIO()
        mask.save(buf, format="PNG")
        name = row["file_name"].rsplit(".", 1)[0] + "_mask.png"
        entries[name] = buf.getvalue()
        row["mask"] = name
    entries["metadata.jsonl"] = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
    with zipfile.ZipFile(dst, "w") as zf:
        for name in sorted(entries):
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), entries[name])
    return dst


def test_a_dataset_list_repeats_its_entries_and_orders_batches_by_the_seed_only(tmp_path, dataset_zip):
    other = write_dataset_zip(tmp_path / "other.zip", [(32, 32), (40, 40)])
    from finetune.config import DatasetEntry

    ds = read_datasets([str(dataset_zip), DatasetEntry(path=str(other), repeats=3)], "TOK")
    assert len(ds.items) == 8 and [i.repeats for i in ds.items] == [1] * 6 + [3, 3]
    assert ds.zip_of(ds.items[-1]) == other and ds.sources == ((dataset_zip, 1), (other, 3))
    again = read_datasets([str(dataset_zip), DatasetEntry(path=str(other), repeats=3)], "TOK")
    assert again.digest == ds.digest != read_datasets([str(dataset_zip), str(other)], "TOK").digest
    entries = [e for e in assign_buckets(ds.items, [32]) for _ in range(ds.items[e.item].repeats)]
    assert len(entries) == 12
    first, second = BatchOrder(entries, 2, 7), BatchOrder(list(entries), 2, 7)
    assert [first(i) for i in range(12)] == [second(i) for i in range(12)]


def test_a_dataset_list_trains_and_its_zips_and_repeats_are_in_the_lineage(work, dataset_zip):  # noqa: F811
    other = write_dataset_zip(work / "other.zip", [(32, 32), (40, 40)])
    data = tiny_config(dataset_zip, steps=2) | {"dataset": [str(dataset_zip), {"path": str(other), "repeats": 2}]}
    version = train(parse_config(data))
    assert version.lineage["dataset"]["path"] == [
        {"path": str(dataset_zip), "repeats": 1},
        {"path": str(other), "repeats": 2},
    ]


def test_held_out_validation_never_trains_on_the_held_out_images(work, dataset_zip, monkeypatch):  # noqa: F811
    import finetune.recipes.train_local as tl

    seen = {}
    real = tl._Examples.plan

    def plan(dataset, items, **kw):
        ex = real(dataset, items, **kw)
        seen.setdefault("train" if kw.get("repeats") else "val", {i.sha256 for i in items})
        return ex

    monkeypatch.setattr(tl._Examples, "plan", plan)
    data = tiny_config(dataset_zip, steps=2)
    data["train"]["validation"] = {"split": 0.34}
    train(parse_config(data))
    assert len(seen["val"]) == 2 and len(seen["train"]) == 4 and not seen["val"] & seen["train"]
    one = write_dataset_zip(work / "one.zip", [(32, 32)])
    data = tiny_config(one, steps=1)
    data["train"]["validation"] = {"split": 0.5}
    with pytest.raises(FinetuneError, match="train.validation.split: 0.5 of 1 image"):
        train(parse_config(data))


def test_a_validation_dataset_feeds_the_validation_loss(work, dataset_zip):  # noqa: F811
    val = write_dataset_zip(work / "val.zip", [(32, 32)])
    runs = {}
    for name, extra in (("a", {}), ("b", {"validation": {"dataset": str(val)}})):
        data = tiny_config(dataset_zip, steps=2, output_dir=name)
        data["train"].update(extra)
        train(parse_config(data))
        rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r["val_loss"] for r in rows if "val_loss" in r]
    assert runs["a"][0] != runs["b"][0]


def test_flip_caches_the_mirrored_latents_once_and_trains(work, dataset_zip, finetune_home):  # noqa: F811
    plain = train(parse_config(tiny_config(dataset_zip, steps=2, output_dir="a")))
    latents = len(list((finetune_home / "cache" / "latents").iterdir()))
    flipped = train(parse_config(tiny_config(dataset_zip, steps=2, output_dir="b", flip=True)))
    assert len(list((finetune_home / "cache" / "latents").iterdir())) == 2 * latents
    assert flipped.id != plain.id


def test_a_mask_becomes_the_mean_of_each_block_the_vae_downsamples():
    mask = torch.zeros((1, 16, 32))
    mask[..., :, :12] = 1.0  # 12 white columns: 1.5 blocks of 8
    grid = mask_to_latent_grid(mask, (2, 4))
    assert grid.shape == (1, 2, 4)
    assert grid[0, 0].tolist() == [1.0, 0.5, 0.0, 0.0]


def test_masked_out_pixels_contribute_nothing_to_the_gradient():
    family = models.family_for("preset:tiny")
    c = family.load_components("preset:tiny", parts=("transformer",))
    from finetune import lora

    lora.add_lora(c.transformer, rank=4, alpha=4, targets="all-linear", seed=0)
    for p in lora.lora_parameters(c.transformer):
        torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    channels = c.transformer.config.in_channels // 4
    latents = torch.randn((1, channels, 4, 4), generator=g)
    mask = torch.zeros((1, 32, 32))
    mask[..., :16] = 1.0  # the left half learns
    weights = mask_to_latent_grid(mask, (4, 4)).expand_as(latents)

    def grads(target_noise: torch.Tensor) -> list[torch.Tensor]:
        b = _Batch(
            latents=latents,
            noise=target_noise,
            sigmas=torch.tensor([0.0]),  # x_σ = latents whatever the noise: only the target sees it
            text={"prompt_embeds": torch.randn((1, 8, 32), generator=torch.Generator().manual_seed(2)),
                  "pooled_prompt_embeds": torch.randn((1, 32), generator=torch.Generator().manual_seed(3))},
            img_ids=family.image_ids(latents.shape[1:], "cpu", torch.float32),
            txt_ids=family.text_ids(8, "cpu", torch.float32),
            loss_weights=family.pack_latents(weights),
        )  # fmt: skip
        c.transformer.zero_grad()
        _flow_loss(family, c.transformer, b, 1.0).backward()
        return [p.grad.clone() for p in lora.lora_parameters(c.transformer)]

    noise = torch.randn(latents.shape, generator=g)
    changed = noise.clone()
    changed[..., 2:] += 5.0  # the masked-out (right) half of the target
    for a, b in zip(grads(noise), grads(changed), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    changed[..., :2] += 5.0  # the learned half does move the gradient
    assert any(not torch.equal(a, b) for a, b in zip(grads(noise), grads(changed), strict=True))


def test_black_masks_train_nothing_and_a_half_mask_trains(work, dataset_zip):  # noqa: F811
    black = with_masks(dataset_zip, work / "black.zip", value=0)
    version = train(parse_config(tiny_config(black, steps=2, output_dir="black")))
    weights, _ = load_lora_file(version.lora_path)
    assert all(float(t.abs().max()) == 0 for k, t in weights.items() if "lora_B" in k)
    half = with_masks(dataset_zip, work / "half.zip")
    weights, _ = load_lora_file(train(parse_config(tiny_config(half, steps=2, output_dir="half"))).lora_path)
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_B" in k)


def test_regularisation_images_change_the_lora_deterministically(work, dataset_zip):  # noqa: F811
    reg = write_dataset_zip(work / "reg.zip", [(32, 32), (48, 48)], trigger_word="person")

    def run(name: str, **reg_keys) -> str:
        data = tiny_config(dataset_zip, steps=3, output_dir=name)
        if reg_keys:
            data["train"]["regularization"] = reg_keys
        return train(parse_config(data)).id

    plain = run("plain")
    first, second = run("reg1", dataset=str(reg)), run("reg2", dataset=str(reg))
    assert first == second != plain
