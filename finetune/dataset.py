"""Read and check a dataset zip, assign images to aspect buckets, and order batches deterministically.

The zip contract (DESIGN.md): flat ``<stem>.jpg|png`` + ``<stem>.txt`` (UTF-8, one line, contains the trigger word)
and ``metadata.jsonl`` rows ``{file_name, text, width, height, sha256, source}``. A zip not made by ``prepare`` is
checked against it before any model loads; every problem is collected and reported at once, naming the entry.
A pair zip (edit LoRAs) holds ``<stem>_start.<ext>`` (the reference; ``_start_2``, ... for more), ``<stem>_end.<ext>``
(the target) and ``<stem>.txt`` (the instruction); it is recognised by a ``_start`` + ``_end`` pair of one stem or by
``references`` in ``metadata.jsonl``, and never mixes with single images. Its items are the targets, each with its
references in order.

Buckets are by area: for each training resolution ``R`` an image goes to the bucket of area ≈ R² with the closest
aspect ratio, sides multiples of ``multiple`` (2 × the VAE scale factor: 16 for FLUX.1), scaled to cover and centre
cropped, never upscaled. The batch order depends only on the seed and the micro-batch index, never on the number
of processes: each global batch comes from one bucket and each sample's randomness from (seed, index, sample id).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from finetune.errors import FinetuneError
from finetune.files import sha256_file

__all__ = [
    "BatchOrder",
    "Dataset",
    "Entry",
    "Item",
    "RefItem",
    "assign_buckets",
    "batch_at",
    "batches_per_epoch",
    "bucket_for",
    "bucket_sizes",
    "epoch_batches",
    "load_bucket_image",
    "read_dataset",
    "read_datasets",
    "sample_seed",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
METADATA = "metadata.jsonl"
MAX_ASPECT = 4.0  # buckets span aspect ratios 1:4 … 4:1 (ai-toolkit and kohya use similar limits)
MASK_SUFFIX = "_mask.png"  # <stem>_mask.png: the loss weights of <stem>.jpg|png (white = learn), from prepare --masks
PAIR_STEM = re.compile(r"^(.+?)_(end|start(?:_([2-9]|[1-9][0-9]+))?)$")  # <stem>_end, <stem>_start, <stem>_start_N


@dataclass(frozen=True)
class RefItem:
    """A reference image of an edit pair: its zip entry name, size in pixels and content hash."""

    name: str
    width: int
    height: int
    sha256: str


@dataclass(frozen=True)
class Item:
    """One image of the dataset (the target, for a pair): its zip entry name, caption, size in pixels and content
    hash, and for an edit pair its references in order (``<stem>_start``, ``<stem>_start_2``, ...)."""

    name: str
    caption: str
    width: int
    height: int
    sha256: str
    references: tuple[RefItem, ...] = ()
    mask: RefItem | None = None  # <stem>_mask.png (grayscale, the image's size), or None: the whole image trains
    zip_path: Path | None = None  # the zip that holds it when a run reads several; None: its Dataset's path
    repeats: int = 1  # times it appears per epoch (a dataset list's {path, repeats})


@dataclass(frozen=True)
class Dataset:
    path: Path
    digest: str  # sha256 of the zip file (of the list of digests and repeats for several): the identity in lineage
    items: tuple[Item, ...]
    sources: tuple[tuple[Path, int], ...] = ()  # (zip, repeats) of each zip when read from a list

    def zip_of(self, item: Item) -> Path:
        return item.zip_path or self.path


def read_datasets(spec: str | Path | list, trigger_word: str) -> Dataset:
    """``read_dataset`` for the config's ``dataset``: one zip, or a list of zips and ``{path, repeats}`` entries
    (anything with ``.path`` and ``.repeats``), whose items are concatenated in list order, each with its zip and
    repeats. The digest of a list is the sha256 of its zips' digests and repeats, in order."""
    if isinstance(spec, (str, Path)):
        return read_dataset(spec, trigger_word)
    parts = []
    for entry in spec:
        path, repeats = (entry, 1) if isinstance(entry, (str, Path)) else (entry.path, entry.repeats)
        parts.append((read_dataset(path, trigger_word), int(repeats)))
    kinds = {any(item.references for item in d.items) for d, _ in parts}
    if len(kinds) > 1:
        raise FinetuneError(
            "dataset: the list mixes pair zips (edit LoRAs) with single-image zips; a run trains one or the other"
        )
    items = tuple(
        dataclasses.replace(item, zip_path=d.path, repeats=repeats) for d, repeats in parts for item in d.items
    )
    digest = hashlib.sha256(json.dumps([[d.digest, r] for d, r in parts]).encode()).hexdigest()
    return Dataset(path=parts[0][0].path, digest=digest, items=items, sources=tuple((d.path, r) for d, r in parts))


@dataclass(frozen=True)
class Entry:
    """A training example: image ``item`` (index into Dataset.items) resized and cropped to ``bucket`` (w, h)."""

    item: int
    bucket: tuple[int, int]


def _fail(path: Path, problems: list[str], pairs: bool = False) -> FinetuneError:
    shown = "\n".join(f"  - {p}" for p in problems[:20])
    more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
    if pairs:
        return FinetuneError(
            f"dataset {path} does not follow the pair zip contract ({len(problems)} problem(s)):\n{shown}{more}\n"
            "Each pair needs its target <stem>_end.jpg|png, its reference <stem>_start.jpg|png (more: _start_2, "
            "...) and a one-line UTF-8 instruction <stem>.txt in the zip's top level; "
            "`finetune prepare PAIRS --trigger-word WORD -o pairs.zip` builds a valid zip."
        )
    return FinetuneError(
        f"dataset {path} does not follow the dataset zip contract ({len(problems)} problem(s)):\n{shown}{more}\n"
        "Each image <stem>.jpg|png needs a one-line UTF-8 caption <stem>.txt in the zip's top level; "
        "`finetune prepare IMAGES --trigger-word WORD -o data.zip` builds a valid zip."
    )


def read_dataset(path: str | Path, trigger_word: str) -> Dataset:
    """Open the zip at ``path`` and check it against the contract; raise FinetuneError listing every problem."""
    path = Path(path).expanduser()
    if not str(path) or str(path) == ".":
        raise FinetuneError("dataset: no dataset zip given; set `dataset: path/to/data.zip` in the config")
    if not path.is_file():
        raise FinetuneError(f"dataset {path} does not exist; build one with `finetune prepare IMAGES -o {path}`")
    if not zipfile.is_zipfile(path):
        raise FinetuneError(f"dataset {path} is not a zip file; build one with `finetune prepare IMAGES -o {path}`")
    problems: list[str] = []
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        masks = {n.removesuffix(MASK_SUFFIX): n for n in names if n.endswith(MASK_SUFFIX) and "/" not in n}
        images = {
            n.rsplit(".", 1)[0]: n for n in names if n.lower().endswith(IMAGE_SUFFIXES) and n not in masks.values()
        }
        captions = {n[: -len(".txt")]: n for n in names if n.endswith(".txt")}
        for n in names:
            if "/" in n:
                problems.append(f"{n}: entries must sit at the top level of the zip (no folders)")
            elif n != METADATA and not n.lower().endswith((*IMAGE_SUFFIXES, ".txt")):
                problems.append(f"{n}: unexpected file; only images, .txt captions and {METADATA} belong here")
        metadata = _read_metadata(zf, names, problems)
        if _is_pair_zip(images, metadata):
            for name in sorted(masks.values()):
                problems.append(f"{name}: masks train single images; a pair zip takes none (remove it)")
            items = _read_pairs(path, zf, images, captions, metadata, problems)
            if problems:
                raise _fail(path, problems, pairs=True)
            return Dataset(path=path, digest=sha256_file(path), items=tuple(items))
        for stem in sorted(images.keys() - captions.keys()):
            problems.append(f"{images[stem]}: caption {stem}.txt is missing")
        for stem in sorted(captions.keys() - images.keys()):
            problems.append(f"{captions[stem]}: image {stem}.jpg or {stem}.png is missing")
        for stem in sorted(masks.keys() - images.keys()):
            problems.append(f"{masks[stem]}: a mask without its image {stem}.jpg or {stem}.png")
        if not images:
            problems.append("no images (.jpg or .png) in the zip")
        items = []
        for stem in sorted(images.keys() & captions.keys()):
            row = metadata.get(images[stem])
            item = _check_pair(zf, images[stem], captions[stem], trigger_word, row, problems)
            if row is not None and row.get("mask") not in (None, masks.get(stem)):
                problems.append(
                    f"{METADATA}: mask of {images[stem]} is {row['mask']!r} but the zip has {masks.get(stem)}"
                )
            if item is not None and stem in masks:
                item = dataclasses.replace(item, mask=_check_mask(zf, masks[stem], item, problems))
            if item is not None:
                items.append(item)
    if problems:
        raise _fail(path, problems)
    return Dataset(path=path, digest=sha256_file(path), items=tuple(items))


def _read_metadata(zf: zipfile.ZipFile, names: list[str], problems: list[str]) -> dict[str, dict]:
    """Rows of metadata.jsonl by file_name; a zip without it (made by hand) is accepted, a broken one is not."""
    if METADATA not in names:
        return {}
    rows = {}
    for i, line in enumerate(zf.read(METADATA).decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{METADATA} line {i}: not valid JSON ({e.msg})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            problems.append(f"{METADATA} line {i}: needs a 'file_name' string")
            continue
        if row["file_name"] not in names:
            problems.append(f"{METADATA} line {i}: file_name {row['file_name']!r} is not in the zip")
        rows[row["file_name"]] = row
    return rows


def _check_pair(
    zf: zipfile.ZipFile, image_name: str, caption_name: str, trigger_word: str, row: dict | None, problems: list[str]
) -> Item | None:
    raw = zf.read(caption_name)
    try:
        caption = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        problems.append(f"{caption_name}: caption is not UTF-8 text")
        return None
    if not caption:
        problems.append(f"{caption_name}: caption is empty")
    elif "\n" in caption:
        problems.append(f"{caption_name}: caption must be one line")
    elif trigger_word and trigger_word not in caption:
        problems.append(f"{caption_name}: caption {caption!r} does not contain the trigger word {trigger_word!r}")
    image = _check_image(zf, image_name, row, problems, caption)
    return None if image is None else Item(image.name, caption, image.width, image.height, image.sha256)


def _check_image(
    zf: zipfile.ZipFile, image_name: str, row: dict | None, problems: list[str], caption: str | None = None
) -> RefItem | None:
    """Decode-check ``image_name`` and compare it with its metadata row (and the caption, ``text``)."""
    data = zf.read(image_name)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Exception as e:  # PIL raises many types for broken files
        problems.append(f"{image_name}: not a readable image ({type(e).__name__}: {e})")
        return None
    sha = hashlib.sha256(data).hexdigest()
    if row is not None:
        for key, value in (("width", width), ("height", height), ("sha256", sha), ("text", caption)):
            if key in row and value is not None and row[key] != value:
                problems.append(f"{METADATA}: {key} of {image_name} is {row[key]!r} but the file says {value!r}")
    if min(width, height) < 16:
        problems.append(f"{image_name}: {width}x{height} is too small to train on (at least 16 px a side)")
    return RefItem(name=image_name, width=width, height=height, sha256=sha)


def _check_mask(zf: zipfile.ZipFile, name: str, item: Item, problems: list[str]) -> RefItem | None:
    """A mask must decode and have its image's size (it weights the image's pixels one to one)."""
    mask = _check_image(zf, name, None, problems)
    if mask is not None and (mask.width, mask.height) != (item.width, item.height):
        problems.append(
            f"{name}: the mask is {mask.width}x{mask.height} but its image {item.name} is {item.width}x{item.height}; "
            "a mask must have its image's size"
        )
        return None
    return mask


def _is_pair_zip(images: dict[str, str], metadata: dict[str, dict]) -> bool:
    """A pair zip: some stem has both a ``_start`` and an ``_end`` image, or a metadata row lists ``references``."""
    ends = {m[1] for stem in images if (m := PAIR_STEM.match(stem)) and m[2] == "end"}
    starts = {m[1] for stem in images if (m := PAIR_STEM.match(stem)) and m[2] == "start"}
    return bool(ends & starts) or any("references" in row for row in metadata.values())


def _read_pairs(
    path: Path,
    zf: zipfile.ZipFile,
    images: dict[str, str],
    captions: dict[str, str],
    metadata: dict[str, dict],
    problems: list[str],
) -> list[Item]:
    """The pairs of a pair zip as items (the target, its instruction, its references), every problem collected."""
    targets: dict[str, str] = {}
    references: dict[str, dict[int, str]] = {}  # stem → {reference index: name}
    singles = []
    for stem, name in sorted(images.items()):
        m = PAIR_STEM.match(stem)
        if m is None:
            singles.append(name)
        elif m[2] == "end":
            targets[m[1]] = name
        else:
            references.setdefault(m[1], {})[int(m[3] or 1) - 1] = name
    if singles:
        shown = ", ".join(singles[:5]) + (f" and {len(singles) - 5} more" if len(singles) > 5 else "")
        raise FinetuneError(
            f"dataset {path} mixes single images ({shown}) with edit pairs (<stem>_start / <stem>_end); a zip holds "
            "single images or pairs, never both: build one zip of each with `finetune prepare`"
        )
    ref_rows = {
        r["file_name"]: r for row in metadata.values() for r in row.get("references") or () if isinstance(r, dict)
    }
    for name in sorted(ref_rows.keys() - set(zf.namelist())):
        problems.append(f"{METADATA}: reference {name!r} is not in the zip")
    for stem in sorted(references.keys() - targets.keys()):
        problems.append(f"{references[stem][min(references[stem])]}: target {stem}_end.jpg or .png is missing")
    for stem in sorted(captions.keys() - targets.keys() - references.keys()):
        problems.append(f"{captions[stem]}: target {stem}_end.jpg or .png is missing")
    if not targets:
        problems.append("no pairs (<stem>_end.jpg|png with <stem>_start.jpg|png) in the zip")
    items = []
    for stem, target in sorted(targets.items()):
        refs = references.get(stem, {})
        gaps = [i for i in range(max(refs, default=0) + 1) if i not in refs]
        for i in gaps:
            problems.append(f"{target}: reference {stem}_start{f'_{i + 1}' if i else ''}.jpg or .png is missing")
        if stem not in captions:
            problems.append(f"{target}: instruction {stem}.txt is missing")
        if gaps or stem not in captions:
            continue
        # An instruction need not name the trigger word (issue 12: optional for edit sets; prepare adds it once
        # when one is given), so it is not checked for one.
        item = _check_pair(zf, target, captions[stem], "", metadata.get(target), problems)
        checked = [_check_image(zf, refs[i], ref_rows.get(refs[i]), problems) for i in sorted(refs)]
        if item is not None and None not in checked:
            items.append(dataclasses.replace(item, references=tuple(checked)))
    counts = sorted({len(item.references) for item in items})
    if len(counts) > 1:  # a batch stacks reference i of every sample
        problems.append(f"every pair needs the same number of references; this zip has pairs with {counts}")
    return items


# ---- aspect buckets ------------------------------------------------------------------------------------------


def bucket_sizes(resolution: int, multiple: int = 16) -> list[tuple[int, int]]:
    """Buckets (w, h) of area ≤ resolution², sides multiples of ``multiple``, aspect within 1:4 … 4:1.

    For each width the height is the largest multiple that keeps the area within budget (ai-toolkit's scheme).
    """
    area = resolution * resolution
    sizes = set()
    for w in range(multiple, int(resolution * math.sqrt(MAX_ASPECT)) + 1, multiple):
        h = (area // w) // multiple * multiple
        if h >= multiple and 1 / MAX_ASPECT <= w / h <= MAX_ASPECT:
            sizes.add((w, h))
            sizes.add((h, w))
    return sorted(sizes)


def bucket_for(width: int, height: int, resolution: int, multiple: int = 16) -> tuple[int, int]:
    """The bucket (w, h) for an image: closest aspect ratio (log scale, ties to the larger area) among the buckets
    that fit inside the image, so it is never upscaled. An image smaller than resolution² uses its own area budget.
    """
    target = math.log(width / height)
    budget = min(resolution, math.isqrt(width * height))
    fits = [(w, h) for w, h in bucket_sizes(budget, multiple) if w <= width and h <= height]
    if not fits:  # a thin sliver: the largest multiples inside the image
        return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)
    return min(fits, key=lambda s: (abs(math.log(s[0] / s[1]) - target), -s[0] * s[1]))


def assign_buckets(items: tuple[Item, ...], resolutions: list[int], multiple: int = 16) -> list[Entry]:
    """One entry per (image, resolution); an image too small for several resolutions lands once per distinct size."""
    entries = []
    for i, item in enumerate(items):
        seen = set()
        for res in resolutions:
            bucket = bucket_for(item.width, item.height, res, multiple)
            if bucket not in seen:
                seen.add(bucket)
                entries.append(Entry(item=i, bucket=bucket))
    return entries


def load_bucket_image(zf: zipfile.ZipFile, name: str, bucket: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Decode ``name`` as ``mode`` (RGB; L for a mask), scale to cover ``bucket`` (w, h) and centre crop to it
    exactly."""
    with Image.open(io.BytesIO(zf.read(name))) as im:
        im = im.convert(mode)
    bw, bh = bucket
    scale = max(bw / im.width, bh / im.height)
    size = (max(bw, round(im.width * scale)), max(bh, round(im.height * scale)))
    if size != im.size:
        im = im.resize(size, Image.Resampling.LANCZOS)
    left, top = (im.width - bw) // 2, (im.height - bh) // 2
    return im.crop((left, top, left + bw, top + bh))


# ---- deterministic order and per-sample randomness -----------------------------------------------------------


def sample_seed(seed: int, index: int, sample_id: int, stream: str = "") -> int:
    """A 63-bit seed from (run seed, micro-batch index, sample id, stream), so randomness is independent of
    the process count, the step a run resumed at and the order samples are drawn in."""
    digest = hashlib.blake2b(f"{seed}:{index}:{sample_id}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_batches(entries: list[Entry], batch_size: int, seed: int, epoch: int, stream: str = "") -> list[list[int]]:
    """Every global micro-batch of ``epoch`` (lists of entry indices), each from one bucket, in a seeded order;
    ``stream`` names another order from the same seed (regularisation images)."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, e in enumerate(entries):
        by_bucket.setdefault(e.bucket, []).append(i)
    rng = random.Random(sample_seed(seed, epoch, -1, "epoch" + (f":{stream}" if stream else "")))
    batches = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        rng.shuffle(members)
        # a bucket's last partial batch is filled from the start of its own shuffled list, so no image is dropped
        n = math.ceil(len(members) / batch_size) * batch_size
        padded = [members[i % len(members)] for i in range(n)]
        batches += [padded[i : i + batch_size] for i in range(0, n, batch_size)]
    rng.shuffle(batches)
    return batches


def batches_per_epoch(entries: list[Entry], batch_size: int) -> int:
    counts: dict[tuple[int, int], int] = {}
    for e in entries:
        counts[e.bucket] = counts.get(e.bucket, 0) + 1
    return sum(math.ceil(n / batch_size) for n in counts.values())


class BatchOrder:
    """``order(index)`` = ``batch_at(entries, batch_size, seed, index)``, with each epoch's batches built once
    rather than at every step (the trainer asks for consecutive indices)."""

    def __init__(self, entries: list[Entry], batch_size: int, seed: int, stream: str = "") -> None:
        self.entries, self.batch_size, self.seed, self.stream = entries, batch_size, seed, stream
        self.per_epoch = batches_per_epoch(entries, batch_size)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def __call__(self, index: int) -> list[int]:
        epoch, pos = divmod(index, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_batches(self.entries, self.batch_size, self.seed, epoch, self.stream))
        return self._epoch[1][pos]


def batch_at(entries: list[Entry], batch_size: int, seed: int, index: int) -> list[int]:
    """Entry indices of global micro-batch ``index``: a pure function of the entries, batch size, seed and index."""
    return BatchOrder(entries, batch_size, seed)(index)
