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
    "ImageResult",
    "NormalizeOptions",
    "find_duplicates",
    "hamming",
    "parse_background",
    "perceptual_hash",
    "process_image",
]


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
    )


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
