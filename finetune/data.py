"""Dataset preparation components: find images and captions, decode and normalize one image, hash, caption.

Sources are folders (recursive), zip files (read in place, never extracted) and `datasets` folders written by
``save_to_disk``. :func:`scan_source` lists the images of one source with their captions (sidecar ``.txt`` /
``.caption`` files or ``metadata.jsonl`` / ``metadata.csv`` rows) and what it ignored; :func:`process_image` runs in a
worker process and turns one image into normalized 8-bit sRGB bytes in a work folder; :func:`find_duplicates`,
:func:`apply_trigger` and :class:`Captioner` finish the job. Facts behind the choices (EXIF, alpha, ICC, junk files,
zip pitfalls) are in ``reference/eval-and-data.md`` part B.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import stat
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageCms, ImageColor, UnidentifiedImageError, features

from finetune.errors import EXIT_USAGE, FinetuneError

__all__ = [
    "CAPTION_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "Captioner",
    "Ignored",
    "ImageResult",
    "ImageTask",
    "NormalizeOptions",
    "ScannedSource",
    "apply_trigger",
    "clean_caption",
    "common_word_in",
    "find_duplicates",
    "hamming",
    "parse_background",
    "perceptual_hash",
    "process_image",
    "read_zip_listing",
    "scan_source",
]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
CAPTION_EXTENSIONS = (".txt", ".caption")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
TEXT_COLUMNS = ("text", "caption", "prompt")  # `text` is the imagefolder convention; ai-toolkit's UI writes `prompt`
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini"})
LOSSY_FORMATS = frozenset({"JPEG", "MPO", "HEIF", "AVIF"})  # re-encoded as JPEG q95; everything else as PNG
JPEG_QUALITY = 95
MAX_CAPTION_BYTES = 1 << 20
MAX_METADATA_BYTES = 256 << 20  # metadata.jsonl/csv hold one row per image

# Zip sources are read in place; these bound what a hostile archive can make us read.
ZIP_MAX_MEMBERS = 100_000
ZIP_MAX_MEMBER_BYTES = 1 << 30
ZIP_MAX_TOTAL_BYTES = 32 << 30
ZIP_MAX_RATIO = 200  # deflate tops out near 1032:1; real photos compress ~1:1, flat BMPs rarely beyond 100:1
ZIP_RATIO_MIN_BYTES = 1 << 20  # the ratio is only meaningful for members that expand to something large

# A trigger that is a common word bleeds into every prompt using that word (kohya-ss/sd-scripts#1045).
COMMON_WORDS = frozenset(
    """a about after all also an and any art as at back be because but by can cat car come could day dog do even
    face first for from get girl give go good guy have he her him his house how i if in into it its just know lady
    like look make man me most my new no not now of on one only or other our out over painting people person photo
    picture portrait say see she so some style take than that the their them then there these they think this time
    to tree up us use want way we well what when which who will with woman work would year you your baby boy child
    city red blue green black white light dark sky sun water fire flower bird horse house room street car art
    anime cartoon drawing sketch model star king queen love life world home book""".split()
)


# ---------------------------------------------------------------------------------------------------------------
# Scanning sources


@dataclass(frozen=True)
class ImageTask:
    """One image to process; small and picklable, so the worker reads the bytes itself (memory stays flat).

    ``kind`` is ``file`` (``path`` is the file), ``zip`` (``member`` inside the zip at ``path``) or ``dataset``
    (row ``index`` of column ``member`` in the ``save_to_disk`` folder ``path``).
    """

    source: str
    kind: str
    path: str
    member: str = ""
    index: int = -1


@dataclass(frozen=True)
class Ignored:
    """A file that was not used, and why."""

    source: str
    reason: str


@dataclass
class ScannedSource:
    """What :func:`scan_source` found: images to process, their captions and origins, and ignored files."""

    tasks: list[ImageTask] = field(default_factory=list)
    captions: dict[str, tuple[str, str]] = field(default_factory=dict)  # task.source -> (text, origin label)
    ignored: list[Ignored] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def scan_source(src: str | Path) -> ScannedSource:
    """List the images, captions and ignored files of one source: a folder, an image, a zip or a datasets folder.

    Raises:
        FinetuneError: the source does not exist, a zip is hostile, or a caption file is not UTF-8 (exit code 2).
    """
    path = Path(src)
    if not path.exists():
        raise FinetuneError(
            f"source {str(src)!r} does not exist; pass a folder of images, a .zip or a datasets folder"
        )
    name = path.resolve().name
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return _scan_hf_dataset(path, name)
        files: list[str] = []
        for root, dirs, names in os.walk(path):
            rel_root = Path(root).relative_to(path)
            dirs.sort()
            files += [(rel_root / n).as_posix() for n in sorted(names)]
        return _scan_tree(
            files, lambda rel: _read_limited(path / rel), name, lambda rel: ImageTask("", "file", str(path / rel))
        )
    if zipfile.is_zipfile(path):
        members, ignored = read_zip_listing(path)
        with zipfile.ZipFile(path) as zf:
            scanned = _scan_tree(
                members,
                lambda rel: _read_member(zf, rel),
                name,
                lambda rel: ImageTask("", "zip", str(path), member=rel),
            )
        scanned.ignored += [Ignored(f"{name}/{m}", r) for m, r in ignored]
        return scanned
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        siblings = sorted(p.name for p in path.parent.iterdir() if p.name.lower().startswith(path.stem.lower()))
        parent = path.parent
        scanned = _scan_tree(
            [n for n in siblings if n == path.name or n.lower().endswith(CAPTION_EXTENSIONS)],
            lambda rel: _read_limited(parent / rel),
            parent.resolve().name,
            lambda rel: ImageTask("", "file", str(parent / rel)),
        )
        scanned.ignored = [i for i in scanned.ignored if "no matching image" not in i.reason]
        return scanned
    raise FinetuneError(
        f"source {str(src)!r} is neither a folder, a zip file, a datasets folder nor an image; "
        f"pass a folder of images, a .zip or a folder written by datasets' save_to_disk"
    )


def _limit(rel: str) -> int:
    return MAX_METADATA_BYTES if PurePosixPath(rel.lower()).name in METADATA_NAMES else MAX_CAPTION_BYTES


def _read_limited(path: Path) -> bytes:
    """A caption or metadata file, read only up to one byte past its size limit."""
    with open(path, "rb") as f:
        return f.read(_limit(path.name) + 1)


def _read_member(zf: zipfile.ZipFile, rel: str) -> bytes:
    with zf.open(rel) as f:
        return f.read(_limit(rel) + 1)


def _junk_reason(rel: str) -> str | None:
    parts = PurePosixPath(rel).parts
    if "__MACOSX" in parts:
        return "macOS archive metadata (__MACOSX/)"
    if parts[-1].startswith("._"):
        return "macOS AppleDouble file (._*)"
    if any(p.startswith(".") for p in parts):
        return "hidden file or folder"
    if parts[-1].lower() in JUNK_NAMES:
        return "Windows thumbnail/settings file"
    return None


def _scan_tree(
    files: Sequence[str], read: Callable[[str], bytes], name: str, make_task: Callable[[str], ImageTask]
) -> ScannedSource:
    """Pair images with captions in one folder-like listing of relative POSIX paths."""
    out = ScannedSource()
    images, captions, metadata = [], {}, []
    for rel in files:
        label = f"{name}/{rel}"
        junk = _junk_reason(rel)
        lower = rel.lower()
        if junk:
            out.ignored.append(Ignored(label, junk))
        elif PurePosixPath(lower).name in METADATA_NAMES:
            metadata.append(rel)
        elif PurePosixPath(lower).suffix in IMAGE_EXTENSIONS:
            images.append(rel)
        elif lower.endswith(CAPTION_EXTENSIONS):
            captions[lower] = rel
        else:
            out.ignored.append(
                Ignored(label, f"not an image file (extension {PurePosixPath(rel).suffix or 'none'!r})")
            )
    from_metadata: dict[str, str] = {}
    # Deeper metadata files win over ones in parent folders, as in datasets' imagefolder.
    for meta in sorted(metadata, key=lambda m: (-len(PurePosixPath(m).parts), m)):
        for rel, text in _read_metadata(meta, read(meta), name).items():
            from_metadata.setdefault(rel.lower(), text)
    used_captions: set[str] = set()
    stems: dict[str, list[str]] = {}
    for rel in images:
        task = make_task(rel)
        label = f"{name}/{rel}"
        out.tasks.append(ImageTask(label, task.kind, task.path, task.member, task.index))
        p = PurePosixPath(rel.lower())
        stem_key = str(p.with_suffix(""))
        stems.setdefault(stem_key, []).append(rel)
        caption = None
        for candidate in (f"{p}.txt", f"{p}.caption", f"{stem_key}.txt", f"{stem_key}.caption"):
            if candidate in captions:
                used_captions.add(candidate)
                text = clean_caption(_decode_caption(read(captions[candidate]), f"{name}/{captions[candidate]}"))
                if text:
                    caption = (text, f"sidecar {name}/{captions[candidate]}")
                    break
                out.warnings.append(f"caption file {name}/{captions[candidate]} is empty; using the next source")
        if caption is None and rel.lower() in from_metadata and from_metadata[rel.lower()]:
            caption = (from_metadata[rel.lower()], "metadata")
        if caption is not None:
            out.captions[label] = caption
    for key, rel in captions.items():
        if key not in used_captions:
            out.ignored.append(Ignored(f"{name}/{rel}", "caption file with no matching image"))
    for rels in stems.values():
        if len(rels) > 1:
            out.warnings.append(f"{', '.join(f'{name}/{r}' for r in rels)} share a stem, so they share a caption file")
    return out


def _decode_caption(raw: bytes, label: str) -> str:
    limit = _limit(label)
    if len(raw) > limit:
        raise FinetuneError(f"{label} is larger than {limit >> 20} MiB; captions are one line of text per image")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FinetuneError(
            f"caption file {label} is not UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8"
        ) from None


def _read_metadata(meta: str, raw: bytes, name: str) -> dict[str, str]:
    """Rows of an imagefolder ``metadata.jsonl``/``.csv`` as {image path relative to the source: caption}."""
    label = f"{name}/{meta}"
    text = _decode_caption(raw, label)
    base = PurePosixPath(meta).parent
    if meta.lower().endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FinetuneError(f"{label} line {n} is not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise FinetuneError(f"{label} line {n} is not a JSON object with file_name and text")
            rows.append(row)
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    result = {}
    for n, row in enumerate(rows, 1):
        if "file_name" not in row:
            raise FinetuneError(f"{label} row {n} has no 'file_name' column; imagefolder metadata needs one")
        column = next((c for c in TEXT_COLUMNS if isinstance(row.get(c), str)), None)
        if column is not None:
            rel = (base / PurePosixPath(str(row["file_name"]))).as_posix()
            result[rel] = clean_caption(row[column])
    return result


def read_zip_listing(path: str | Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Validate a zip source without extracting it; return (file member names, [(member, reason ignored)]).

    Raises:
        FinetuneError: a member path is absolute or climbs out with ``..``, or the archive exceeds the member
            count, size or compression-ratio bounds (a zip bomb).
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise FinetuneError(f"zip source {path} cannot be read ({e}); re-create the archive") from None
    if len(infos) > ZIP_MAX_MEMBERS:
        raise FinetuneError(f"zip source {path} has {len(infos)} members (limit {ZIP_MAX_MEMBERS}); split it")
    members, ignored, total = [], [], 0
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            raise FinetuneError(
                f"zip source {path} has member {name!r} with an absolute or '..' path; refusing to read this archive"
            )
        if info.is_dir():
            continue
        if stat.S_ISLNK(info.external_attr >> 16):
            ignored.append((name, "symlink inside a zip, not followed"))
            continue
        if info.flag_bits & 0x1:
            ignored.append((name, "encrypted zip member"))
            continue
        total += info.file_size
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > ZIP_MAX_MEMBER_BYTES or (info.file_size > ZIP_RATIO_MIN_BYTES and ratio > ZIP_MAX_RATIO):
            raise FinetuneError(
                f"zip source {path} looks like a zip bomb: member {name!r} expands to {info.file_size} bytes "
                f"({ratio:.0f}:1; limits {ZIP_MAX_MEMBER_BYTES} bytes, {ZIP_MAX_RATIO}:1); refusing to read it"
            )
        members.append(name)
    if total > ZIP_MAX_TOTAL_BYTES:
        raise FinetuneError(
            f"zip source {path} expands to {total} bytes (limit {ZIP_MAX_TOTAL_BYTES}); refusing to read it"
        )
    return sorted(members), ignored


def _scan_hf_dataset(path: Path, name: str) -> ScannedSource:
    """Rows of a ``save_to_disk`` Dataset or DatasetDict with an Image column (and optionally a text column)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for a damaged folder
        raise FinetuneError(f"datasets folder {path} cannot be loaded ({e}); re-save it with save_to_disk") from None
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    out = ScannedSource()
    for split, ds in splits:
        image_cols = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
        if not image_cols:
            raise FinetuneError(f"datasets folder {path} {split} has no Image column (columns: {list(ds.features)})")
        text_col = next((c for c in TEXT_COLUMNS if getattr(ds.features.get(c), "dtype", None) == "string"), None)
        texts = ds[text_col] if text_col else [None] * len(ds)
        split_path = str(path / split) if split else str(path)
        for i, text in enumerate(texts):
            label = f"{name}/{split}/{i:06d}" if split else f"{name}/{i:06d}"
            out.tasks.append(ImageTask(label, "dataset", split_path, member=image_cols[0], index=i))
            if text and clean_caption(text):
                out.captions[label] = (clean_caption(text), "metadata")
    return out


# ---------------------------------------------------------------------------------------------------------------
# One image, in a worker process


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
        # Bicubic is Pillow's antialiasing convolution, as in thumbnail(); after a JPEG draft (a 1/2..1/8 DCT-domain
        # downscale) Lanczos costs 1.5x as much for a barely visible gain and was half of the per-image time.
        im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
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


# ---------------------------------------------------------------------------------------------------------------
# Hashing and duplicates


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return np.cos(np.pi * k * (2 * i + 1) / (2 * n))


_DCT32 = _dct_matrix(32)


def perceptual_hash(im: Image.Image) -> int:
    """64-bit DCT perceptual hash: the 8x8 lowest frequencies of a 32x32 grey thumbnail, thresholded at their median.

    Same algorithm as ``imagehash.phash`` (J. Buchner), after Zauner 2010, "Implementation and Benchmarking of
    Perceptual Image Hash Functions". The unnormalized DCT-II here differs from scipy's only by a constant factor,
    which the median threshold ignores.
    """
    grey = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8]
    bits = (low > np.median(low)).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


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
            distances = np.bitwise_count(kept_hashes[: len(kept_index)] ^ np.uint64(phash))
            j = int(np.argmin(distances))
            if distances[j] <= max_distance:
                dups[i] = (kept_index[j], "near", int(distances[j]))
                continue
        by_key[key] = i
        kept_hashes[len(kept_index)] = phash
        kept_index.append(i)
    return dups


# ---------------------------------------------------------------------------------------------------------------
# Captions and the trigger word


def clean_caption(text: str) -> str:
    """One line: BOMs dropped, runs of whitespace and newlines collapsed to one space."""
    return " ".join(text.replace("\ufeff", "").split())


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def apply_trigger(caption: str, trigger: str) -> str:
    """Replace ``[trigger]``/``{trigger}`` with the trigger word; prefix it once if the caption still lacks it."""
    text = clean_caption(caption.replace("[trigger]", trigger).replace("{trigger}", trigger))
    if _has_word(text, trigger):
        return text
    return f"{trigger}, {text}" if text else trigger


def common_word_in(trigger: str) -> str | None:
    """The first word of ``trigger`` that is a common English word, if any."""
    return next((w for w in re.findall(r"\w+", trigger.lower()) if w in COMMON_WORDS), None)


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


# ---------------------------------------------------------------------------------------------------------------
# Autocaptioning

_BOILERPLATE = re.compile(r"^(the image (shows|depicts|features)|this image (shows|depicts)|arafed|there is)\s+", re.I)


class Captioner:
    """An image-to-text model from transformers (local folder or hub id) that writes one-line captions.

    Models with a chat template (Florence-2, Qwen-VL, LLaVA) get ``prompt``; plain captioners (BLIP, GIT) get the
    image alone. Raises FinetuneError (exit code 2) when the model cannot be loaded.
    """

    def __init__(self, model: str, *, prompt: str = "Describe this image in one sentence.", max_new_tokens: int = 40):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.name = model
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModelForImageTextToText.from_pretrained(model).eval()
            import torch

            if torch.cuda.is_available():
                self.model.to("cuda")
        except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
            raise FinetuneError(
                f"--autocaption model {model!r} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0]}). "
                "Pass a local folder written by save_pretrained or the hub id of an image-to-text model, e.g. "
                "Salesforce/blip-image-captioning-large",
                EXIT_USAGE,
            ) from None
        self.chat = bool(getattr(self.processor, "chat_template", None))

    def __call__(self, images: list[Image.Image]) -> list[str]:
        """Captions for a batch of RGB images, cleaned of boilerplate openers such as 'the image shows'."""
        import torch

        if self.chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        inputs = inputs.to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if self.chat:
            out = out[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [_BOILERPLATE.sub("", clean_caption(t)) for t in texts]
