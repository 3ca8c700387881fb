"""Dataset zip checks, aspect buckets and the seed-only batch order."""

from __future__ import annotations

import hashlib
import math
import zipfile
from collections import Counter

import pytest
from conftest import write_dataset_zip
from PIL import Image

from finetune.dataset import (
    BatchOrder,
    Entry,
    assign_buckets,
    batch_at,
    batches_per_epoch,
    bucket_for,
    bucket_sizes,
    load_bucket_image,
    read_dataset,
    sample_seed,
)
from finetune.errors import FinetuneError


def _rewrite(src, dst, drop=(), add=None):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            if name not in drop:
                zout.writestr(name, zin.read(name))
        for name, data in (add or {}).items():
            zout.writestr(name, data)
    return dst


def test_valid_zip_reads_items_and_digest(dataset_zip):
    ds = read_dataset(dataset_zip, "TOK")
    assert len(ds.items) == 6
    assert ds.digest == hashlib.sha256(dataset_zip.read_bytes()).hexdigest()
    assert {(i.width, i.height) for i in ds.items} == {(48, 48), (64, 48), (48, 64), (40, 40), (56, 56)}
    assert all("TOK" in i.caption for i in ds.items)


def test_missing_caption_is_named(dataset_zip, tmp_path):
    with zipfile.ZipFile(dataset_zip) as zf:
        txt = sorted(n for n in zf.namelist() if n.endswith(".txt"))[0]
    bad = _rewrite(dataset_zip, tmp_path / "bad.zip", drop=[txt])
    with pytest.raises(FinetuneError, match=rf"caption {txt} is missing"):
        read_dataset(bad, "TOK")


def test_missing_image_is_named(dataset_zip, tmp_path):
    with zipfile.ZipFile(dataset_zip) as zf:
        png = sorted(n for n in zf.namelist() if n.endswith(".png"))[0]
    stem = png[:-4]
    bad = _rewrite(dataset_zip, tmp_path / "bad.zip", drop=[png, "metadata.jsonl"])
    with pytest.raises(FinetuneError, match=rf"{stem}.txt: image {stem}.jpg or {stem}.png is missing"):
        read_dataset(bad, "TOK")


@pytest.mark.parametrize(
    "add, message",
    [
        ({"x.png": b"not an image", "x.txt": b"TOK"}, r"x.png: not a readable image"),
        ({"sub/y.png": b"", "sub/y.txt": b"TOK"}, r"sub/y.png: entries must sit at the top level"),
        ({"z.png": b"", "z.txt": b"\xff\xfe"}, r"z.txt: caption is not UTF-8"),
        ({"notes.docx": b"x"}, r"notes.docx: unexpected file"),
    ],
)
def test_malformed_entries_are_named(dataset_zip, tmp_path, add, message):
    with pytest.raises(FinetuneError, match=message):
        read_dataset(_rewrite(dataset_zip, tmp_path / "bad.zip", add=add), "TOK")


def test_caption_without_trigger_word_is_an_error(tmp_path):
    path = write_dataset_zip(tmp_path / "d.zip", [(32, 32)], trigger_word="ZQX")
    with pytest.raises(FinetuneError, match=r"does not contain the trigger word 'TOK'"):
        read_dataset(path, "TOK")


def test_metadata_must_match_the_files(dataset_zip, tmp_path):
    with zipfile.ZipFile(dataset_zip) as zf:
        meta = zf.read("metadata.jsonl").decode().replace('"width": 48', '"width": 4800', 1)
    bad = _rewrite(dataset_zip, tmp_path / "bad.zip", drop=["metadata.jsonl"], add={"metadata.jsonl": meta})
    with pytest.raises(FinetuneError, match=r"metadata.jsonl: width of .* is 4800 but the file says 48"):
        read_dataset(bad, "TOK")


@pytest.mark.parametrize("content", [None, b"not a zip"])
def test_missing_or_non_zip_dataset(tmp_path, content):
    path = tmp_path / "data.zip"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(FinetuneError, match="does not exist" if content is None else "is not a zip file"):
        read_dataset(path, "TOK")


def test_zip_without_metadata_is_accepted(dataset_zip, tmp_path):
    ds = read_dataset(_rewrite(dataset_zip, tmp_path / "plain.zip", drop=["metadata.jsonl"]), "TOK")
    assert len(ds.items) == 6


@pytest.mark.parametrize("res", [256, 512, 1024])
def test_bucket_sizes_are_multiples_within_area(res):
    sizes = bucket_sizes(res)
    assert (res, res) in sizes
    for w, h in sizes:
        assert w % 16 == 0 and h % 16 == 0
        assert w * h <= res * res
        assert 0.25 <= w / h <= 4


@pytest.mark.parametrize("w, h", [(4000, 3000), (3000, 4000), (1920, 1080), (5000, 1000), (2000, 2000)])
def test_bucket_has_closest_aspect(w, h):
    bw, bh = bucket_for(w, h, 512)
    best = min(abs(math.log(sw / sh) - math.log(w / h)) for sw, sh in bucket_sizes(512))
    assert abs(math.log(bw / bh) - math.log(w / h)) == pytest.approx(best)


@pytest.mark.parametrize("w, h", [(300, 200), (100, 100), (64, 400), (511, 513)])
def test_bucket_never_upscales(w, h):
    bw, bh = bucket_for(w, h, 512)
    assert bw <= w and bh <= h and bw % 16 == 0 and bh % 16 == 0


def test_small_image_lands_once_across_resolutions(dataset_zip):
    ds = read_dataset(dataset_zip, "TOK")
    entries = assign_buckets(ds.items, [32, 48, 1024])
    per_image = Counter(e.item for e in entries)
    assert all(n <= 2 for n in per_image.values())  # 48 and 1024 both cap to the image size: one entry
    assert len(set(entries)) == len(entries)


def test_load_bucket_image_covers_and_centre_crops(tmp_path):
    im = Image.new("RGB", (120, 60), (255, 0, 0))
    im.paste((0, 0, 255), (30, 0, 90, 60))  # blue centre, red left and right margins
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        import io

        buf = io.BytesIO()
        im.save(buf, format="PNG")
        zf.writestr("a.png", buf.getvalue())
    with zipfile.ZipFile(path) as zf:
        out = load_bucket_image(zf, "a.png", (32, 32))
    assert out.size == (32, 32)
    assert out.getpixel((0, 16))[2] > 200 and out.getpixel((31, 16))[2] > 200  # only the blue centre is kept


def _entries():
    return [Entry(item=i, bucket=(16, 16)) for i in range(5)] + [Entry(item=i, bucket=(32, 16)) for i in range(5, 8)]


def test_batches_come_from_one_bucket_and_cover_each_epoch():
    entries = _entries()
    per_epoch = batches_per_epoch(entries, 2)
    assert per_epoch == 3 + 2
    seen = set()
    for index in range(per_epoch):
        batch = batch_at(entries, 2, seed=7, index=index)
        assert len(batch) == 2 and len({entries[i].bucket for i in batch}) == 1
        seen |= set(batch)
    assert seen == set(range(8))


def test_batch_order_is_a_function_of_seed_and_index_only():
    entries = _entries()
    order = [batch_at(entries, 2, seed=1, index=i) for i in range(20)]
    assert order == [batch_at(entries, 2, seed=1, index=i) for i in range(20)]
    assert order[7] == batch_at(entries, 2, seed=1, index=7)
    assert order != [batch_at(entries, 2, seed=2, index=i) for i in range(20)]
    order_once = BatchOrder(entries, 2, seed=1)  # builds each epoch once; same batches as the pure function
    assert [order_once(i) for i in range(20)] == order
    assert order_once(3) == order[3]  # going back to an earlier epoch rebuilds it
    assert order[:5] != order[5:10]  # epochs are reshuffled


def test_sample_seed_separates_every_field():
    seeds = {sample_seed(s, i, j, t) for s in (0, 1) for i in (0, 1) for j in (0, 1) for t in ("a", "b")}
    assert len(seeds) == 16
    assert all(0 <= s < 2**63 for s in seeds)


# ---- pair zips (edit LoRAs) ----------------------------------------------------------------------------------


def _pair_zip(path, pairs=2, references=2, drop=(), add=None):
    """A pair zip written directly in the contract's layout (no metadata.jsonl: a hand-made zip)."""
    import io

    from conftest import synthetic_image

    entries = {}
    for p in range(pairs):
        for suffix, index in [("_end", 10 * p)] + [
            ("_start" if j == 0 else f"_start_{j + 1}", 10 * p + j + 1) for j in range(references)
        ]:
            buf = io.BytesIO()
            synthetic_image(index, 40, 32).save(buf, format="PNG")
            entries[f"pair{p}{suffix}.png"] = buf.getvalue()
        entries[f"pair{p}.txt"] = f"TOK, edit {p}".encode()
    entries.update(add or {})
    with zipfile.ZipFile(path, "w") as zf:
        for name in sorted(set(entries) - set(drop)):
            zf.writestr(name, entries[name])
    return path


def test_a_pair_zip_reads_targets_with_their_references_in_order(tmp_path):
    ds = read_dataset(_pair_zip(tmp_path / "p.zip"), "TOK")
    assert [i.name for i in ds.items] == ["pair0_end.png", "pair1_end.png"]
    assert [r.name for r in ds.items[1].references] == ["pair1_start.png", "pair1_start_2.png"]
    assert ds.items[0].caption == "TOK, edit 0" and (ds.items[0].references[0].width, ds.items[0].height) == (40, 32)


@pytest.mark.parametrize(
    "drop, add, message",
    [
        (["pair1_start.png"], None, r"pair1_end.png: reference pair1_start.jpg or .png is missing"),
        (["pair0.txt"], None, r"pair0_end.png: instruction pair0.txt is missing"),
        (["pair0_end.png"], None, r"pair0_start.png: target pair0_end.jpg or .png is missing"),
        ([], {"pair2_start.png": b"x"}, r"pair2_start.png: target pair2_end.jpg or .png is missing"),
        (["pair1_start_2.png"], None, r"same number of references; this zip has pairs with \[1, 2\]"),
    ],
)
def test_pair_zip_problems_are_named(tmp_path, drop, add, message):
    with pytest.raises(FinetuneError, match=rf"pair zip contract(.|\n)*{message}"):
        read_dataset(_pair_zip(tmp_path / "p.zip", drop=drop, add=add), "TOK")


def test_a_zip_mixing_single_images_and_pairs_is_refused(dataset_zip, tmp_path):
    with zipfile.ZipFile(_pair_zip(tmp_path / "p.zip")) as zf:
        pairs = {n: zf.read(n) for n in zf.namelist()}
    mixed = _rewrite(dataset_zip, tmp_path / "mixed.zip", drop=["metadata.jsonl"], add=pairs)
    with pytest.raises(FinetuneError, match=r"mixes single images \(.*\.png.*\) with edit pairs.*never both"):
        read_dataset(mixed, "TOK")


def test_instructions_of_a_pair_zip_need_no_trigger_word(tmp_path):
    """Edit sets: the trigger word is optional (issue 12); an instruction without it is read as it is."""
    import io
    import zipfile

    from PIL import Image

    from finetune.dataset import read_dataset

    def png(color):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), color).save(buf, format="PNG")
        return buf.getvalue()

    path = tmp_path / "pairs.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a_start.png", png("red"))
        zf.writestr("a_end.png", png("blue"))
        zf.writestr("a.txt", "make it blue")
        zf.writestr("metadata.jsonl", "")
    dataset = read_dataset(path, "TOK")
    assert [(i.caption, len(i.references)) for i in dataset.items] == [("make it blue", 1)]


def test_masks_attach_to_their_images_and_a_stray_or_wrong_size_mask_is_named(tmp_path):
    import io

    def png(size):
        buf = io.BytesIO()
        Image.new("L", size, 255).save(buf, format="PNG")
        return buf.getvalue()

    plain = write_dataset_zip(tmp_path / "plain.zip", [(48, 48), (64, 48)])
    stem = sorted(n for n in zipfile.ZipFile(plain).namelist() if n.endswith(".png"))[0].removesuffix(".png")
    size = read_dataset(plain, "TOK").items[0].width, read_dataset(plain, "TOK").items[0].height
    good = write_dataset_zip(tmp_path / "good.zip", [(48, 48), (64, 48)], extra={f"{stem}_mask.png": png(size)})
    items = read_dataset(good, "TOK").items
    assert len(items) == 2 and items[0].mask is not None and items[0].mask.name == f"{stem}_mask.png"
    assert items[1].mask is None
    stray = write_dataset_zip(tmp_path / "stray.zip", [(48, 48)], extra={"nothing_mask.png": png((8, 8))})
    with pytest.raises(FinetuneError, match="nothing_mask.png: a mask without its image nothing"):
        read_dataset(stray, "TOK")
    wrong = write_dataset_zip(tmp_path / "wrong.zip", [(48, 48), (64, 48)], extra={f"{stem}_mask.png": png((10, 10))})
    with pytest.raises(FinetuneError, match=f"{stem}_mask.png: the mask is 10x10 but its image"):
        read_dataset(wrong, "TOK")
