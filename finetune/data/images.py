"""Decode, verify and normalize one image (in a worker process), and find exact and near duplicates."""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageCms, ImageColor, UnidentifiedImageError, features

from finetune.data.sources import ImageTask
from finetune.errors import EXIT_USAGE, FinetuneError

__all__ = [
    "MASK_SUFFIX",
    "ImageResult",
    "MaskResult",
    "NormalizeOptions",
    "find_duplicates",
    "hamming",
    "parse_background",
    "perceptual_hash",
    "process_image",
    "process_mask",
]


MASK_SUFFIX = "_mask.png"  # <stem>_mask.png sits next to <stem>.jpg|png in the zip (the trainer reads this name)
LOSSY_FORMATS = frozenset({"JPEG", "MPO", "HEIF", "AVIF"})  # re-encoded as JPEG q95; everything else as PNG
JPEG_QUALITY = 95


@dataclass(frozen=True)
class NormalizeOptions:
    """How :func:`process_image` normalizes: long-side cap, short-side floor (pixels), background RGB."""

    max_side: int
    min_side: int
    background: tuple[int, int, int]
    workdir: str


@dataclass(frozen=True)
class ImageResult:
    """The outcome for one task: either ``reason`` (skipped) or the written file and its facts."""

    source: str
    reason: str = ""
    stem: str = ""  # first 16 hex digits of the sha256 of the output pixels (content-derived, order-free)
    file_name: str = ""
    sha256: str = ""  # of the encoded file, as stored in the zip
    nbytes: int = 0
    width: int = 0
    height: int = 0
    orig_width: int = 0
    orig_height: int = 0
    phash: int = 0
    flags: tuple[str, ...] = ()
    orientation: int = 1  # the EXIF Orientation applied (1: none); a mask in the stored frame gets the same


@dataclass(frozen=True)
class MaskResult:
    """The outcome for one mask: either ``reason`` (unusable) or ``<stem>_mask.png`` written next to its image."""

    source: str
    reason: str = ""
    file_name: str = ""
    sha256: str = ""
    flags: tuple[str, ...] = ()


_ZIPS: dict[str, zipfile.ZipFile] = {}
_DATASETS: dict[tuple[str, str], Any] = {}
_SRGB: list[Any] = []
_HEIF: list[bool] = []


def _heif_available() -> bool:
    if not _HEIF:
        try:
            from pillow_heif import register_heif_opener

            register_heif_opener()
            _HEIF.append(True)
        except ImportError:
            _HEIF.append(False)
    return _HEIF[0]


def _read_task(task: ImageTask) -> tuple[bytes, str]:
    """The raw bytes of a task and its lowercase extension."""
    if task.kind == "file":
        with open(task.path, "rb") as f:
            return f.read(), Path(task.path).suffix.lower()
    if task.kind == "zip":
        zf = _ZIPS.get(task.path) or _ZIPS.setdefault(task.path, zipfile.ZipFile(task.path))
        info = zf.getinfo(task.member)
        with zf.open(info) as f:
            data = f.read(info.file_size + 1)
        if len(data) != info.file_size:
            raise zipfile.BadZipFile(f"member size {len(data)} differs from the declared {info.file_size}")
        return data, PurePosixPath(task.member).suffix.lower()
    key = (task.path, task.member)
    if key not in _DATASETS:
        import datasets

        _DATASETS[key] = datasets.load_from_disk(task.path).cast_column(task.member, datasets.Image(decode=False))
    cell = _DATASETS[key][task.index][task.member]
    if not cell or (cell.get("bytes") is None and not cell.get("path")):
        raise OSError(f"row {task.index} has no image in column {task.member!r}")
    if cell.get("bytes") is not None:
        return cell["bytes"], PurePosixPath(cell.get("path") or "").suffix.lower()
    with open(cell["path"], "rb") as f:
        return f.read(), Path(cell["path"]).suffix.lower()


def process_image(task: ImageTask, opts: NormalizeOptions) -> ImageResult:
    """Read, verify, fully decode and normalize one image, write it to ``opts.workdir`` and describe it.

    Never raises for a bad image: the result carries the skip reason instead.
    """
    _heif_available()
    try:
        data, ext = _read_task(task)
    except (OSError, zipfile.BadZipFile, zlib.error, KeyError) as e:
        return ImageResult(task.source, reason=f"cannot be read: {e}")
    if not data:
        return ImageResult(task.source, reason="empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x MAX_IMAGE_PIXELS Pillow only warns; beyond it raises DecompressionBombError.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _normalize(task.source, data, opts)
    except Image.DecompressionBombError as e:
        return ImageResult(task.source, reason=f"decompression bomb, not decoded: {e}")
    except UnidentifiedImageError:
        if ext in (".heic", ".heif") and not _heif_available():
            reason = "HEIC/HEIF needs the optional plugin: pip install 'finetune[heif]'"
        elif ext == ".avif" and not features.check("avif"):
            reason = "AVIF needs a Pillow built with AVIF support: pip install -U pillow"
        else:
            reason = "not an image Pillow can read"
        return ImageResult(task.source, reason=reason)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        return ImageResult(task.source, reason=f"corrupt or truncated image: {e}")


def _normalize(source: str, data: bytes, opts: NormalizeOptions) -> ImageResult:
    with Image.open(io.BytesIO(data)) as probe:
        probe.verify()
    im = Image.open(io.BytesIO(data))
    fmt = im.format or ""
    w, h = im.size
    if min(w, h) < opts.min_side:
        return ImageResult(source, reason=f"too small: {w}x{h}, short side below --min-side {opts.min_side}")
    flags = []
    if getattr(im, "n_frames", 1) > 1 and fmt != "MPO":  # MPO: phone JPEG + depth/preview frame, not animation
        flags.append(f"animated ({im.n_frames} frames): first frame used")
    if fmt in ("JPEG", "MPO") and max(w, h) > opts.max_side:
        # Reduced-scale DCT decoding: the draft is never smaller than the size we resize to below.
        scale = opts.max_side / max(w, h)
        im.draft(im.mode, (math.ceil(w * scale), math.ceil(h * scale)))
    im.load()
    icc = im.info.get("icc_profile")
    orientation = im.getexif().get(0x0112, 1)
    im, mode_flag = _working_mode(im)
    if mode_flag:
        flags.append(mode_flag)
    # Resize in the stored orientation, then rotate the (smaller) result: same pixels as exif_transpose first.
    scale = min(1.0, opts.max_side / max(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != im.size:
        # After a JPEG draft (a 1/2..1/8 DCT-domain downscale) what is left is a reduction below 2x, where Pillow's
        # antialiased bilinear filter is what diffusers' FLUX training script resizes with (torchvision's default);
        # bicubic cost 1.3x and Lanczos 2x as much, for the largest share of the per-image time. The trainer resamples
        # to its bucket with Lanczos anyway.
        im = im.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    if orientation in _EXIF_TRANSPOSE:
        im = im.transpose(_EXIF_TRANSPOSE[orientation])
        flags.append(f"EXIF orientation {orientation} applied")
    ow, oh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    if min(im.size) < opts.min_side:
        return ImageResult(
            source, reason=f"short side {min(im.size)} px after downscaling to --max-side (aspect ratio too extreme)"
        )
    if icc and im.mode in ("RGB", "RGBA", "CMYK"):
        im, icc_flag = _to_srgb(im, icc)
        if icc_flag:
            flags.append(icc_flag)
    if im.mode == "CMYK":
        im = im.convert("RGB")
    if im.mode in ("RGBA", "LA"):
        alpha = im.getchannel("A")
        if alpha.getextrema()[0] < 255:
            background = Image.new("RGB", im.size, opts.background)
            background.paste(im.convert("RGB"), mask=alpha)
            im = background
            flags.append("alpha composited onto #{:02x}{:02x}{:02x}".format(*opts.background))
    if im.mode != "RGB":
        im = im.convert("RGB")
    im.info = {}  # no EXIF, no ICC (the pixels are sRGB now; lcms profiles carry a creation date), no text chunks
    pixels = im.tobytes()
    stem = hashlib.sha256(b"%dx%d:" % im.size + pixels).hexdigest()[:16]
    ext = "jpg" if fmt in LOSSY_FORMATS else "png"
    buf = io.BytesIO()
    if ext == "jpg":
        im.save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
        im.save(buf, "PNG")
    encoded = buf.getvalue()
    file_name = f"{stem}.{ext}"
    target = Path(opts.workdir) / file_name
    part = target.with_name(f"{file_name}.{os.getpid()}.part")
    part.write_bytes(encoded)
    os.replace(part, target)
    return ImageResult(
        source,
        stem=stem,
        file_name=file_name,
        sha256=hashlib.sha256(encoded).hexdigest(),
        nbytes=len(encoded),
        width=im.width,
        height=im.height,
        orig_width=ow,
        orig_height=oh,
        phash=perceptual_hash(im),
        flags=tuple(flags),
        orientation=orientation if orientation in _EXIF_TRANSPOSE else 1,
    )


def process_mask(task: ImageTask, image: ImageResult, opts: NormalizeOptions) -> MaskResult:
    """Give the mask of ``image`` its image's geometry, as grayscale, and write it as ``<stem>_mask.png``.

    The mask covers the image's pixels as stored in its file, and then gets the image's EXIF orientation and
    downscale; or, where the mask has its own EXIF orientation or only the upright size fits (orientations 5-8 swap
    the sides), it covers the image as shown upright. Either way it may be any scale of that size (within a pixel of
    its aspect ratio) and is resized to the image's final size. Where the stored and upright sizes are the same
    (orientations 2-4), the stored frame is assumed. Colors become their luminance, transparency counts as black
    (not learned). Never raises for a bad mask: the result carries the reason instead.
    """
    try:
        data, _ = _read_task(task)
    except (OSError, zipfile.BadZipFile, zlib.error, KeyError) as e:
        return MaskResult(task.source, reason=f"mask cannot be read: {e}")
    if not data:
        return MaskResult(task.source, reason="mask is an empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _normalize_mask(task.source, data, image, opts)
    except Image.DecompressionBombError as e:
        return MaskResult(task.source, reason=f"mask is a decompression bomb, not decoded: {e}")
    except UnidentifiedImageError:
        return MaskResult(task.source, reason="mask is not an image Pillow can read")
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        return MaskResult(task.source, reason=f"mask is corrupt or truncated: {e}")


def _normalize_mask(source: str, data: bytes, image: ImageResult, opts: NormalizeOptions) -> MaskResult:
    with Image.open(io.BytesIO(data)) as probe:
        probe.verify()
    im = Image.open(io.BytesIO(data))
    im.load()
    own_orientation = im.getexif().get(0x0112, 1)
    im, _ = _working_mode(im)
    flags = []
    if im.mode in ("RGBA", "LA") and im.getchannel("A").getextrema()[0] < 255:
        alpha = im.getchannel("A")
        im = Image.composite(im.convert("L"), Image.new("L", im.size, 0), alpha)
        flags.append("transparent mask pixels count as black")
    im = im.convert("L")
    upright = (image.orig_width, image.orig_height)
    swapped = image.orientation in (5, 6, 7, 8)
    stored = upright[::-1] if swapped else upright
    final = (image.width, image.height)
    if own_orientation in _EXIF_TRANSPOSE:
        im = im.transpose(_EXIF_TRANSPOSE[own_orientation])
        flags.append(f"mask EXIF orientation {own_orientation} applied")
        frames = [(upright, final, None)]
    else:
        frames = [(stored, final[::-1] if swapped else final, _EXIF_TRANSPOSE.get(image.orientation))]
        if swapped:
            frames.append((upright, final, None))
    # The first frame with the mask's aspect ratio (within a pixel): its size, the size to resize to, the transpose.
    fits = [frame for frame in frames if abs(im.width * frame[0][1] - im.height * frame[0][0]) < max(frame[0])]
    if not fits:
        return MaskResult(
            source,
            reason=f"mask is {im.width}x{im.height} but its image {image.source} is {upright[0]}x{upright[1]}; a "
            "mask needs its image's size or aspect ratio",
        )
    _, size, transpose = fits[0]
    if im.size != size:
        flags.append(f"mask resized from {im.width}x{im.height}")
        im = im.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)  # the image's downscale filter
    if transpose is not None:
        im = im.transpose(transpose)
        flags.append(f"its image's EXIF orientation {image.orientation} applied to the mask")
    if im.getextrema()[1] == 0:
        flags.append("mask is all black: its image teaches nothing")
    im.info = {}
    buf = io.BytesIO()
    im.save(buf, "PNG")
    encoded = buf.getvalue()
    file_name = f"{image.stem}{MASK_SUFFIX}"
    target = Path(opts.workdir) / file_name
    part = target.with_name(f"{file_name}.{os.getpid()}.part")
    part.write_bytes(encoded)
    os.replace(part, target)
    return MaskResult(source, file_name=file_name, sha256=hashlib.sha256(encoded).hexdigest(), flags=tuple(flags))


# EXIF Orientation tag value -> the transpose that shows the image upright (as PIL.ImageOps.exif_transpose).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _working_mode(im: Image.Image) -> tuple[Image.Image, str]:
    """Bring any Pillow mode to one of RGB, RGBA, L, LA, CMYK (8 bits), keeping transparency as alpha."""
    mode = im.mode
    if "transparency" in im.info and mode in ("P", "L", "RGB", "1"):
        return im.convert("RGBA"), f"{mode} with transparency converted to RGBA"
    if mode in ("RGB", "RGBA", "L", "LA", "CMYK"):
        return im, ""
    if mode.startswith("I"):
        # 16-bit grey: Pillow's convert("L") clips at 255 (white image); scale 0..65535 to 0..255 instead.
        arr = np.asarray(im.convert("I"), dtype=np.int64)
        return Image.fromarray(np.clip(arr // 257, 0, 255).astype(np.uint8)), f"{mode} (16-bit) scaled to 8-bit"
    target = {"P": "RGB", "PA": "RGBA", "La": "LA", "RGBa": "RGBA", "1": "L"}.get(mode, "RGB")
    return im.convert(target), f"{mode} converted to {target}"


def _to_srgb(im: Image.Image, icc: bytes) -> tuple[Image.Image, str]:
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        description = ImageCms.getProfileDescription(profile).strip()
    except (ImageCms.PyCMSError, OSError, TypeError):
        return im, "unreadable ICC profile ignored (pixels kept as if sRGB)"
    if im.mode != "CMYK" and "srgb" in description.lower().replace(" ", ""):
        return im, ""
    if not _SRGB:
        _SRGB.append(ImageCms.createProfile("sRGB"))
    try:
        converted = ImageCms.profileToProfile(im, profile, _SRGB[0], outputMode="RGBA" if im.mode == "RGBA" else "RGB")
    except ImageCms.PyCMSError as e:
        return im, f"ICC profile {description!r} could not be applied ({e}); pixels kept as if sRGB"
    return converted, f"ICC profile {description!r} converted to sRGB"


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return np.cos(np.pi * k * (2 * i + 1) / (2 * n))


_DCT32 = _dct_matrix(32)


def perceptual_hash(im: Image.Image) -> int:
    """64-bit DCT perceptual hash: the 8x8 lowest frequencies of a 32x32 grey thumbnail, thresholded at their median.

    Same algorithm as ``imagehash.phash`` (J. Buchner), after Zauner 2010, "Implementation and Benchmarking of
    Perceptual Image Hash Functions". The unnormalized DCT-II here differs from scipy's only by a constant factor,
    which the median threshold ignores. The 32x32 thumbnail is box-reduced first (``reducing_gap``), which is 3x
    cheaper than Lanczos over the whole image and can move a bit or two against imagehash.
    """
    grey = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=4.0), dtype=np.float64)
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8]
    bits = (low > np.median(low)).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (np.bitwise_count needs numpy >= 2.0)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return np.unpackbits(x.view(np.uint8)).reshape(len(x), 64).sum(axis=1)


def find_duplicates(
    items: Sequence[tuple[str, str, int, int]], max_distance: int | None
) -> dict[int, tuple[int, str, int]]:
    """Greedy duplicate removal over ``(source, pixel_key, phash, pixel_count)`` rows.

    Rows are visited from the highest resolution down (ties: source path); a row is a duplicate of the first kept
    row with the same pixel key (exact) or, unless ``max_distance`` is None, of the closest kept row whose hash is
    within ``max_distance`` bits (near). Returns {duplicate index: (kept index, "exact" | "near", distance)}.
    """
    order = sorted(range(len(items)), key=lambda i: (-items[i][3], items[i][0]))
    kept_hashes = np.zeros(len(items), dtype=np.uint64)
    kept_index: list[int] = []
    by_key: dict[str, int] = {}
    dups: dict[int, tuple[int, str, int]] = {}
    for i in order:
        source, key, phash, _ = items[i]
        if key in by_key:
            dups[i] = (by_key[key], "exact", 0)
            continue
        if max_distance is not None and kept_index:
            distances = _popcount(kept_hashes[: len(kept_index)] ^ np.uint64(phash))
            j = int(np.argmin(distances))
            if distances[j] <= max_distance:
                dups[i] = (kept_index[j], "near", int(distances[j]))
                continue
        by_key[key] = i
        kept_hashes[len(kept_index)] = phash
        kept_index.append(i)
    return dups


def parse_background(color: str) -> tuple[int, int, int]:
    """A Pillow color name or hex string as an RGB triple.

    Raises:
        FinetuneError: the color is unknown (exit code 2).
    """
    try:
        return ImageColor.getrgb(color)[:3]
    except ValueError:
        raise FinetuneError(
            f"--background {color!r} is not a color; use a name (white, black, gray) or hex like '#7f7f7f'",
            EXIT_USAGE,
        ) from None
