"""`finetune prepare --masks`: loss masks stored next to their images with the images' geometry, reported by name."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prepare_fixtures import asymmetric, pair_images, rotated_jpeg, smooth
from test_train_local import tiny_config, work  # noqa: F401 (fixture)

from finetune.cli import main
from finetune.config import parse_config
from finetune.dataset import read_dataset
from finetune.errors import EXIT_USAGE, FinetuneError
from finetune.lora import load_lora_file
from finetune.recipes.prepare import prepare
from finetune.recipes.train_local import train


def half_mask(size: tuple[int, int], value: int = 255) -> Image.Image:
    """Black, with the top-left quarter ``value``: every rotation and flip of it is distinguishable."""
    mask = Image.new("L", size, 0)
    mask.paste(value, (0, 0, size[0] // 2, size[1] // 2))
    return mask


def zip_entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def rows_by_source(entries: dict[str, bytes]) -> dict[str, dict]:
    return {r["source"]: r for r in map(json.loads, entries["metadata.jsonl"].decode().splitlines())}


@pytest.fixture
def photos(tmp_path: Path) -> tuple[Path, Path]:
    """Four photos (one in a subfolder) and masks for three of them, one at half scale."""
    src, masks = tmp_path / "photos", tmp_path / "masks"
    (src / "day2").mkdir(parents=True)
    (masks / "day2").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.jpg", "day2/c.png", "plain.png"]):
        smooth(i).save(src / name)
    half_mask((400, 300)).save(masks / "a.png")
    half_mask((200, 150), 128).save(masks / "b.png")  # half scale: resized to its image's size
    half_mask((400, 300)).convert("RGB").save(masks / "day2" / "c.jpg")  # a color mask becomes its luminance
    return src, masks


def test_masks_land_next_to_their_images_and_in_the_metadata(photos, tmp_path: Path) -> None:
    src, masks = photos
    report = prepare([src], tmp_path / "out.zip", "TOK", masks=masks, progress=False, workers=2)
    entries = zip_entries(report.zip_path)
    rows = rows_by_source(entries)
    for source in ("photos/a.png", "photos/b.jpg", "photos/day2/c.png"):
        row = rows[source]
        assert row["mask"] == row["file_name"].rsplit(".", 1)[0] + "_mask.png"
        mask = Image.open(io.BytesIO(entries[row["mask"]]))
        assert mask.mode == "L" and mask.size == (row["width"], row["height"]) == (400, 300)
    assert "mask" not in rows["photos/plain.png"]
    assert np.asarray(Image.open(io.BytesIO(entries[rows["photos/b.jpg"]["mask"]]))).max() == 128
    assert any("1 of 4 images have no mask" in w for w in report.warnings)
    kept = {r["source"]: r for r in report.kept}
    assert kept["photos/a.png"]["mask_source"] == "masks/a.png" and report.options["masks"] == str(masks)
    # The trainer's reader takes every mask and trains the image without one whole.
    items = {i.name: i for i in read_dataset(report.zip_path, "TOK").items}
    assert items[rows["photos/plain.png"]["file_name"]].mask is None
    assert items[rows["photos/a.png"]["file_name"]].mask.name == rows["photos/a.png"]["mask"]


def test_the_same_inputs_give_identical_bytes(photos, tmp_path: Path) -> None:
    src, masks = photos
    first = prepare([src], tmp_path / "1.zip", "TOK", masks=masks, progress=False, workers=1)
    second = prepare([src], tmp_path / "2.zip", "TOK", masks=masks, progress=False, workers=3)
    assert first.digest == second.digest
    assert first.zip_path.read_bytes() == second.zip_path.read_bytes()


def test_a_mask_gets_its_images_orientation_and_downscale(tmp_path: Path) -> None:
    """A mask drawn on the stored pixels, on the upright view, or tagged with its own EXIF orientation: the stored
    mask ends where the image's marker ends, and all three store the same bytes."""
    src = tmp_path / "photos"
    src.mkdir()
    stored = asymmetric((400, 300))  # green top-left quarter
    (src / "rot.jpg").write_bytes(rotated_jpeg(stored, 6))  # shown upright as 300x400
    stored_mask = Image.new("L", (400, 300), 0)
    stored_mask.paste(255, (0, 0, 100, 75))  # over the marker
    upright_mask = stored_mask.transpose(Image.Transpose.ROTATE_270)
    tagged = Image.Exif()
    tagged[0x0112] = 6
    variants = {"stored": stored_mask, "upright": upright_mask, "tagged": stored_mask}
    zips = {}
    for name, mask in variants.items():
        folder = tmp_path / name
        folder.mkdir()
        if name == "tagged":  # a JPEG mask with the same EXIF tag as its image is upright once the tag is applied
            mask.save(folder / "rot.jpg", "JPEG", quality=100, exif=tagged.tobytes())
        else:
            mask.save(folder / "rot.png")
        report = prepare([src], tmp_path / f"{name}.zip", "TOK", masks=folder, max_side=200, min_side=64,
                         progress=False, workers=1)  # fmt: skip
        zips[name] = zip_entries(report.zip_path)
    row = rows_by_source(zips["stored"])["photos/rot.jpg"]
    assert (row["width"], row["height"]) == (150, 200)  # upright, downscaled to --max-side
    masks = {name: np.asarray(Image.open(io.BytesIO(e[row["mask"]]))) for name, e in zips.items()}
    image = np.asarray(Image.open(io.BytesIO(zips["stored"][row["file_name"]])).convert("RGB")).astype(int)
    green = (image[..., 1] > 128) & (image[..., 0] < 128)
    assert masks["stored"].shape == (200, 150)
    assert ((masks["stored"] > 128) == green).mean() > 0.98  # the mask covers the marker, wherever EXIF put it
    assert np.array_equal(masks["stored"], masks["upright"])
    assert np.abs(masks["tagged"].astype(int) - masks["stored"]).max() <= 8  # a JPEG mask, within its rounding


def test_a_mask_without_an_image_and_a_mask_of_the_wrong_size_are_named(photos, tmp_path: Path, capsys) -> None:
    src, masks = photos
    Image.new("L", (400, 300), 255).save(masks / "orphan.png")
    Image.new("L", (300, 300), 255).save(masks / "plain.png")  # square: its image is 400x300
    out = tmp_path / "out.zip"
    with pytest.raises(SystemExit) as done:
        main(["prepare", str(src), "-o", str(out), "--trigger-word", "TOK", "--masks", str(masks), "--no-progress"])
    assert done.value.code == 0  # like an unreadable image: named in the report, the rest is written
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["unpaired"] == [{"source": "masks/orphan.png", "reason": "a mask without an image named orphan.*"}]
    [skipped] = report["skipped"]
    assert skipped["source"] == "photos/plain.png" and skipped["mask"] == "masks/plain.png"
    assert "300x300" in skipped["reason"] and "400x300" in skipped["reason"]
    assert "photos/plain.png" not in {r["source"] for r in report["kept"]}  # never trained on what it hides
    printed = capsys.readouterr().out
    assert "masks/orphan.png" in printed and "masks/plain.png" in printed


def test_masks_for_pairs_and_a_missing_masks_folder_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "pairs"
    src.mkdir()
    end, [start] = pair_images(0)
    start.save(src / "x_start.png")
    end.save(src / "x_end.png")
    (src / "x.txt").write_text("make it red")
    with pytest.raises(FinetuneError, match="edit pairs take none") as e:
        prepare([src], tmp_path / "p.zip", masks=src, progress=False)
    assert e.value.exit_code == EXIT_USAGE
    with pytest.raises(FinetuneError, match="not a folder or zip of masks") as e:
        prepare([src], tmp_path / "p.zip", "TOK", masks=tmp_path / "nowhere", progress=False)
    assert e.value.exit_code == EXIT_USAGE


def test_a_masks_folder_inside_the_source_is_not_read_as_images(photos, tmp_path: Path) -> None:
    src, masks = photos
    inner = src / "masks"
    masks.rename(inner)
    report = prepare([src], tmp_path / "out.zip", "TOK", masks=inner, progress=False, workers=1)
    assert len(report.kept) == 4 and sum("mask" in r for r in report.kept) == 3
    assert {i["reason"] for i in report.ignored} == {"a mask (inside the --masks folder)"}


def test_a_prepared_zip_with_masks_trains_with_them(work, tmp_path: Path) -> None:  # noqa: F811
    src, masks = tmp_path / "photos", tmp_path / "masks"
    src.mkdir()
    masks.mkdir()
    for i in range(3):
        smooth(i, (48, 40)).save(src / f"p{i}.png")
        Image.new("L", (48, 40), 0).save(masks / f"p{i}.png")
    black = prepare([src], tmp_path / "black.zip", "TOK", masks=masks, min_side=16, progress=False, workers=1)
    plain = prepare([src], tmp_path / "plain.zip", "TOK", min_side=16, progress=False, workers=1)

    def lora_b_max(zip_path: Path, name: str) -> float:
        version = train(parse_config(tiny_config(zip_path, steps=2, output_dir=name)))
        weights, _ = load_lora_file(version.lora_path)
        return max(float(t.abs().max()) for k, t in weights.items() if "lora_B" in k)

    assert lora_b_max(black.zip_path, "black") == 0  # all-black masks: the trainer read them, nothing was learned
    assert lora_b_max(plain.zip_path, "plain") > 0
