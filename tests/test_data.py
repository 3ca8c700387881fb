"""finetune.data: decoding and normalizing single images, captions and the trigger word, hashing, zip safety."""

from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from prepare_fixtures import build_kitchen_sink, smooth, zip_bomb

from finetune import data
from finetune.errors import FinetuneError


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sink") / "sink"
    build_kitchen_sink(root)
    return root


def run(path: Path, workdir: Path, *, max_side: int = 2048, min_side: int = 256, background=(255, 255, 255)):
    workdir.mkdir(exist_ok=True)
    opts = data.NormalizeOptions(max_side=max_side, min_side=min_side, background=background, workdir=str(workdir))
    result = data.process_image(data.ImageTask(path.name, "file", str(path)), opts)
    if result.reason:
        return result, None
    with Image.open(workdir / result.file_name) as im:
        im.load()
    return result, im


def test_exif_orientation_is_baked_into_pixels_and_dropped(sink: Path, tmp_path: Path) -> None:
    result, im = run(sink / "rotated.jpg", tmp_path)
    with Image.open(sink / "rotated.jpg") as original:
        expected = np.asarray(ImageOps.exif_transpose(original).convert("RGB"), dtype=np.int16)
    assert im.size == (300, 400) and (result.orig_width, result.orig_height) == (300, 400)
    assert np.abs(np.asarray(im, dtype=np.int16) - expected).mean() < 3
    assert 0x0112 not in im.getexif()
    assert "EXIF orientation 6 applied" in result.flags


@pytest.mark.parametrize(
    ("name", "where", "expected"),
    [
        ("rgba.png", (10, 10), (255, 255, 255)),  # transparent black -> background, not black
        ("rgba.png", (150, 150), (255, 0, 0)),  # opaque red stays red
        ("la.png", (10, 10), (127, 127, 127)),  # black at alpha 128 over white
        ("la.png", (390, 10), (255, 255, 255)),
        ("palette.gif", (10, 10), (255, 255, 255)),  # transparent palette index
        ("palette.gif", (390, 10), (255, 0, 0)),
        ("p3ish.png", (10, 10), (255, 0, 0)),  # green pixels under a swapped-RG ICC profile are red in sRGB
    ],
)
def test_alpha_palette_and_icc_become_srgb(sink: Path, tmp_path: Path, name: str, where, expected) -> None:
    result, im = run(sink / name, tmp_path)
    assert im.mode == "RGB" and not im.info.get("icc_profile")
    assert np.abs(np.subtract(im.getpixel(where), expected)).max() <= 3, (im.getpixel(where), result.flags)


def test_background_color_is_configurable(sink: Path, tmp_path: Path) -> None:
    _, im = run(sink / "rgba.png", tmp_path, background=data.parse_background("black"))
    assert im.getpixel((10, 10)) == (0, 0, 0)
    with pytest.raises(FinetuneError, match="not a color"):
        data.parse_background("blurple")


def test_icc_conversion_is_flagged(sink: Path, tmp_path: Path) -> None:
    result, _ = run(sink / "p3ish.png", tmp_path)
    assert any("Swapped RG test profile" in f and "sRGB" in f for f in result.flags)


def test_cmyk_16bit_and_animated_become_8bit_rgb(sink: Path, tmp_path: Path) -> None:
    _, cmyk = run(sink / "cmyk.jpg", tmp_path)
    r, g, b = cmyk.getpixel((200, 150))
    assert r > 200 and g < 60 and b < 60
    result, grey = run(sink / "grey16.png", tmp_path)
    row = np.asarray(grey)[150, :, 0]
    assert row[0] < 3 and row[-1] > 252 and abs(int(row[200]) - 128) < 4  # scaled, not clipped to white
    result, anim = run(sink / "animated.gif", tmp_path)
    assert any(f.startswith("animated (2 frames)") for f in result.flags)
    first = np.asarray(smooth(70).quantize(256).convert("RGB"), dtype=np.int16)
    assert np.abs(np.asarray(anim, dtype=np.int16) - first).mean() < 8


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("truncated.jpg", "truncated"),
        ("empty.jpg", "empty file (0 bytes)"),
        ("notes.jpg", "not an image Pillow can read"),
        ("bomb.png", "decompression bomb"),
        ("tiny.png", "too small: 120x90"),
    ],
)
def test_bad_files_are_skipped_with_a_reason(sink: Path, tmp_path: Path, name: str, reason: str) -> None:
    result, _ = run(sink / name, tmp_path)
    assert reason in result.reason
    assert not any(tmp_path.iterdir())


def test_never_upscaled_and_large_jpeg_draft_matches_full_decode(tmp_path: Path) -> None:
    small = tmp_path / "small.png"
    smooth(11, (300, 280)).save(small)
    _, im = run(small, tmp_path / "w")
    assert im.size == (300, 280)
    big = tmp_path / "big.jpg"
    smooth(12, (2400, 1800)).save(big, quality=92)
    result, drafted = run(big, tmp_path / "w", max_side=600)
    assert drafted.size == (600, 450) and (result.orig_width, result.orig_height) == (2400, 1800)
    with Image.open(big) as full:
        reference = full.convert("RGB").resize((600, 450), Image.Resampling.LANCZOS)
    diff = np.abs(np.asarray(drafted, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    assert diff.mean() < 2.5


def test_heic_and_avif_open(tmp_path: Path) -> None:
    import pillow_heif

    pillow_heif.register_heif_opener()
    for ext in ("heic", "avif"):
        smooth(13, (320, 300)).save(tmp_path / f"phone.{ext}", quality=90)
        result, im = run(tmp_path / f"phone.{ext}", tmp_path / "w")
        assert result.reason == "" and im.size == (320, 300) and result.file_name.endswith(".jpg")


def test_perceptual_hash_separates_copies_from_other_images() -> None:
    base = smooth(20, (640, 480))
    buf = io.BytesIO()
    base.resize((320, 240), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=70)
    copy = Image.open(buf)
    assert data.hamming(data.perceptual_hash(base), data.perceptual_hash(copy)) <= 4
    others = [data.hamming(data.perceptual_hash(base), data.perceptual_hash(smooth(s, (640, 480)))) for s in range(30)]
    assert min(others[:20] + others[21:]) > data.hamming(data.perceptual_hash(base), data.perceptual_hash(copy)) + 4
    assert data.hamming(0b1011, 0b0110) == 3


def test_find_duplicates_keeps_highest_resolution_then_first_path() -> None:
    items = [
        ("b/small.jpg", "k1", 0b1111, 100),
        ("a/big.jpg", "k2", 0b1110, 400),  # 1 bit from small: near duplicate, and larger -> kept
        ("c/same.png", "k2", 0b1110, 400),  # same pixels as a/big.jpg; 'a' sorts first -> a kept
        ("d/other.png", "k3", 0xFFFF0000, 400),
    ]
    dups = data.find_duplicates(items, 2)
    assert dups == {0: (1, "near", 1), 2: (1, "exact", 0)}
    assert data.find_duplicates(items, None) == {2: (1, "exact", 0)}


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a photo of [trigger]", "a photo of TOK"),
        ("{trigger} on a beach", "TOK on a beach"),
        ("a dog on a beach", "TOK, a dog on a beach"),
        ("TOK already here, TOK", "TOK already here, TOK"),
        ("a TOKEN is not the trigger", "TOK, a TOKEN is not the trigger"),
        ("  two\nlines  ", "TOK, two lines"),
        ("", "TOK"),
    ],
)
def test_trigger_is_present_exactly_as_written_or_prefixed_once(caption: str, expected: str) -> None:
    assert data.apply_trigger(caption, "TOK") == expected
    assert data.apply_trigger(data.apply_trigger(caption, "TOK"), "TOK") == expected


def test_common_word_triggers_are_detected() -> None:
    assert data.common_word_in("dog") == "dog"
    assert data.common_word_in("TOK woman") == "woman"
    assert data.common_word_in("ohwx") is None


def test_caption_precedence_bom_case_and_double_extension(tmp_path: Path) -> None:
    root = tmp_path / "set"
    root.mkdir()
    for name in ("a.jpg", "b.JPEG", "c.png", "d.png", "e.png"):
        smooth(1).save(root / name, format="PNG")
    (root / "a.jpg.txt").write_text("double extension wins", encoding="utf-8")
    (root / "a.txt").write_text("plain stem loses", encoding="utf-8")
    (root / "B.TXT").write_bytes("\ufeffupper-case sidecar with BOM".encode())
    (root / "c.caption").write_text("kohya style", encoding="utf-8")
    (root / "d.txt").write_text("   \n", encoding="utf-8")  # empty: falls through to metadata
    (root / "metadata.csv").write_text("file_name,text\nd.png,from csv\nc.png,sidecar beats this\n", encoding="utf-8")
    (root / "orphan.txt").write_text("no image", encoding="utf-8")
    scanned = data.scan_source(root)
    got = {label.split("/", 1)[1]: caption for label, caption in scanned.captions.items()}
    assert got["a.jpg"] == ("double extension wins", "sidecar set/a.jpg.txt")
    assert got["b.JPEG"] == ("upper-case sidecar with BOM", "sidecar set/B.TXT")
    assert got["c.png"][0] == "kohya style"
    assert got["d.png"] == ("from csv", "metadata")
    assert "e.png" not in got
    assert any("d.txt is empty" in w for w in scanned.warnings)
    assert data.Ignored("set/orphan.txt", "caption file with no matching image") in scanned.ignored


def test_non_utf8_caption_is_an_error_naming_the_file(tmp_path: Path) -> None:
    smooth(1).save(tmp_path / "x.png")
    (tmp_path / "x.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(FinetuneError, match=r"x\.txt is not UTF-8") as err:
        data.scan_source(tmp_path)
    assert err.value.exit_code == 2


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return path


@pytest.mark.parametrize("evil", ["../evil.txt", "/etc/evil.txt", "photos/../../evil.png", "C:/evil.png"])
def test_hostile_zip_paths_are_rejected(tmp_path: Path, evil: str) -> None:
    path = _zip(tmp_path / "evil.zip", {"ok.txt": b"fine", evil: b"owned"})
    with pytest.raises(FinetuneError, match="absolute or '..' path") as err:
        data.scan_source(path)
    assert evil in str(err.value) and err.value.exit_code == 2
    assert not (tmp_path.parent / "evil.txt").exists()


def test_broken_zip_source_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "photos.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(FinetuneError, match="not a readable zip archive") as err:
        data.scan_source(tmp_path / "photos.zip")
    assert err.value.exit_code == 2


def test_zip_bomb_is_rejected_before_reading(tmp_path: Path) -> None:
    with pytest.raises(FinetuneError, match="zip bomb"):
        data.read_zip_listing(zip_bomb(tmp_path / "bomb.zip"))


def test_zip_listing_skips_symlinks_and_junk(tmp_path: Path) -> None:
    png = io.BytesIO()
    smooth(1).save(png, "PNG")
    path = _zip(tmp_path / "set.zip", {"top/a.png": png.getvalue(), "__MACOSX/top/._a.png": b"junk"})
    with zipfile.ZipFile(path, "a") as zf:
        link = zipfile.ZipInfo("top/link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    scanned = data.scan_source(path)
    assert [t.member for t in scanned.tasks] == ["top/a.png"]
    reasons = {i.source: i.reason for i in scanned.ignored}
    assert reasons == {"set.zip/__MACOSX/top/._a.png": "macOS archive metadata (__MACOSX/)",
                       "set.zip/top/link.png": "symlink inside a zip, not followed"}  # fmt: skip


def test_caption_size_limits_allow_big_metadata_but_not_big_captions(tmp_path: Path) -> None:
    smooth(1).save(tmp_path / "x.png")
    rows = [{"file_name": "x.png", "text": "from metadata"}] + [
        {"file_name": f"{i}.png", "text": "y" * 100} for i in range(12000)
    ]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert data.scan_source(tmp_path).captions[f"{tmp_path.name}/x.png"] == ("from metadata", "metadata")
    (tmp_path / "x.txt").write_bytes(b"a" * ((1 << 20) + 1))
    with pytest.raises(FinetuneError, match=r"x\.txt is larger than 1 MiB"):
        data.scan_source(tmp_path)
