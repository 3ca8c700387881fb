"""Find the images of a source (folder, zip, image file, datasets folder), their captions, and what to ignore.

Zip sources are read in place, never extracted, within bounds on member count, size and compression ratio.
Caption files and metadata pair with images as in reference/eval-and-data.md part B.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from finetune.data.captions import clean_caption
from finetune.errors import FinetuneError

__all__ = [
    "CAPTION_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "Ignored",
    "ImageTask",
    "ScannedSource",
    "is_hf_dataset",
    "load_hf_splits",
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
MAX_CAPTION_BYTES = 1 << 20
MAX_METADATA_BYTES = 256 << 20  # metadata.jsonl/csv hold one row per image

# Zip sources are read in place; these bound what a hostile archive can make us read.
ZIP_MAX_MEMBERS = 100_000
ZIP_MAX_MEMBER_BYTES = 1 << 30
ZIP_MAX_TOTAL_BYTES = 32 << 30
ZIP_MAX_RATIO = 200  # deflate tops out near 1032:1; real photos compress ~1:1, flat BMPs rarely beyond 100:1
ZIP_RATIO_MIN_BYTES = 1 << 20  # the ratio is only meaningful for members that expand to something large


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


def scan_source(src: str | Path, *, caption_stem: Callable[[str], str | None] | None = None) -> ScannedSource:
    """List the images, captions and ignored files of one source: a folder, an image, a zip or a datasets folder.

    ``caption_stem`` maps an image's lowercase relative path without extension to one more caption stem to try after
    the image's own, or to None (edit pairs: ``x_end`` -> ``x``, whose ``x.txt`` holds the instruction).

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
        if is_hf_dataset(path):
            return _scan_hf_dataset(path, name)
        files: list[str] = []
        for root, dirs, names in os.walk(path):
            rel_root = Path(root).relative_to(path)
            dirs.sort()
            files += [(rel_root / n).as_posix() for n in sorted(names)]
        return _scan_tree(
            files,
            lambda rel: _read_limited(path / rel),
            name,
            lambda rel: ImageTask("", "file", str(path / rel)),
            caption_stem,
        )
    if zipfile.is_zipfile(path):
        members, ignored = read_zip_listing(path)
        with zipfile.ZipFile(path) as zf:
            scanned = _scan_tree(
                members,
                lambda rel: _read_member(zf, rel),
                name,
                lambda rel: ImageTask("", "zip", str(path), member=rel),
                caption_stem,
            )
        scanned.ignored += [Ignored(f"{name}/{m}", r) for m, r in ignored]
        return scanned
    if path.suffix.lower() == ".zip":
        raise FinetuneError(f"source {str(src)!r} ends in .zip but is not a readable zip archive; re-create it")
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
    files: Sequence[str],
    read: Callable[[str], bytes],
    name: str,
    make_task: Callable[[str], ImageTask],
    caption_stem: Callable[[str], str | None] | None = None,
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
        candidates = [f"{p}.txt", f"{p}.caption", f"{stem_key}.txt", f"{stem_key}.caption"]
        extra = caption_stem(stem_key) if caption_stem is not None else None
        if extra:
            candidates += [f"{extra}.txt", f"{extra}.caption"]
        for candidate in candidates:
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


def is_hf_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by datasets' ``save_to_disk``."""
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def load_hf_splits(path: Path) -> list[tuple[str, Any]]:
    """The ``(split name, Dataset)`` pairs of a ``save_to_disk`` folder; a lone Dataset is the split ``""``."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for a damaged folder
        raise FinetuneError(f"datasets folder {path} cannot be loaded ({e}); re-save it with save_to_disk") from None
    return list(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]


def _scan_hf_dataset(path: Path, name: str) -> ScannedSource:
    """Rows of a ``save_to_disk`` Dataset or DatasetDict with an Image column (and optionally a text column)."""
    import datasets

    out = ScannedSource()
    for split, ds in load_hf_splits(path):
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
