"""`finetune prepare`: images (or edit pairs) -> a clean, captioned, deterministic dataset zip, top to bottom.

scan sources (single images, or pairs: a target, its references and an instruction) -> (load the autocaption model,
so a bad name fails before any work) -> decode and normalize every image in a process pool (verify, EXIT-transpose,
ICC -> sRGB, alpha onto a background, 8-bit RGB, downscale; workers write the encoded image to a work folder and
return only facts, so memory stays flat in the number of images) -> drop pairs with an unusable side -> remove exact
and near duplicates (of the targets) -> give each kept image's mask (``--masks``) its image's geometry -> captions
with the trigger word -> write the zip (sorted entries, fixed
timestamps, content-derived names) to a temporary file and rename it into place -> ``OUT.report.json``.

The zip contracts (DESIGN.md): flat ``<stem>.jpg|png`` + ``<stem>.txt`` + ``metadata.jsonl`` rows
``{file_name, text, width, height, sha256, source}``, plus ``mask`` (``<stem>_mask.png``, grayscale, the image's size,
white = learn) for an image given a mask; for pairs ``<stem>_start.<ext>`` (``_start_2``, ...) +
``<stem>_end.<ext>`` + ``<stem>.txt`` + rows that add ``references: [{file_name, width, height, sha256, source}]``.
The same inputs and options give byte-identical bytes.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path, PurePosixPath
from typing import Any

from finetune import data
from finetune.errors import EXIT_FAILURE, EXIT_USAGE, FinetuneError
from finetune.files import atomic_file, sha256_file, write_atomic

__all__ = ["DEFAULT_NEAR_DUPLICATE_DISTANCE", "REPLICATE_UPLOAD_LIMIT", "PrepareReport", "format_summary", "prepare"]

log = logging.getLogger(__name__)

# Resaved, resized or recompressed copies land at 0-4 bits; distinct photos of one subject rarely below 10
# (imagededup's default threshold is 10). 6 removes copies and bursts without merging different shots.
DEFAULT_NEAR_DUPLICATE_DISTANCE = 6
DEFAULT_CAPTION_TEMPLATE = "a photo of [trigger]"  # single images only: a pair without an instruction is dropped
REPLICATE_UPLOAD_LIMIT = 100 * 2**20  # bytes; Replicate's Files API limit for one upload
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest DOS timestamp: no clock in the bytes
RECOMMENDED_SHORT_SIDE = 1024  # FLUX LoRAs train at 1024 px
RECOMMENDED_MIN_IMAGES = 10  # Replicate's trainer: "minimum of 10 images recommended"
SIZE_BINS = (256, 512, 768, 1024, 1536, 2048)  # short-side histogram edges, pixels
METADATA_KEYS = ("file_name", "text", "width", "height", "sha256", "source")
NAMES_SHOWN = 20  # per list in the printed summary; the report has them all


@dataclass
class PrepareReport:
    """What :func:`prepare` did; also written as ``OUT.report.json``.

    ``kept`` rows: file_name, text, caption_source (sidecar | metadata | autocaption | template), width, height,
    orig_width, orig_height, sha256, source, flags; for pairs these describe the target and ``references`` lists the
    same facts (less text and caption_source) per reference. ``skipped``/``ignored``/``unpaired`` rows: source,
    reason; a pair's ``skipped`` rows add ``pair`` (its target), an image skipped for its mask adds ``mask`` (the
    mask's source), and ``unpaired`` also lists masks without an image. With masks, a kept row adds ``mask`` (its zip
    name) and ``mask_source``. ``duplicates`` rows: source, kept (the source that was
    kept instead), kind (exact | near), distance (bits). ``layout``: ``none`` for single images, else the pair layout.
    """

    zip_path: Path
    report_path: Path
    digest: str  # sha256 of the zip: the dataset digest recorded in lineage
    trigger_word: str
    kept: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    ignored: list[dict[str, str]] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    caption_sources: dict[str, int] = field(default_factory=dict)
    size_histogram: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    zip_bytes: int = 0
    layout: str = "none"
    unpaired: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        d = asdict(self)
        d["zip_path"], d["report_path"] = str(self.zip_path), str(self.report_path)
        return d


@dataclass
class _Scan:
    """What the sources hold: examples (a target, then its references; none for single images) and their captions."""

    layout: str
    examples: list[tuple[data.ImageTask, ...]]
    captions: dict[str, tuple[str, str]]
    ignored: list[data.Ignored]
    unpaired: list[data.Ignored]
    warnings: list[str]


def prepare(
    sources: Sequence[str | Path],
    out: str | Path,
    trigger_word: str | None = None,
    *,
    max_side: int = 2048,
    min_side: int = 256,
    background: str = "white",
    caption_template: str | None = None,
    near_duplicate_distance: int | None = DEFAULT_NEAR_DUPLICATE_DISTANCE,
    autocaption: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    pairs: str = "auto",
    controls: Sequence[str | Path] = (),
    image_column: str | None = None,
    control_columns: Sequence[str] = (),
    caption_column: str | None = None,
    masks: str | Path | None = None,
) -> PrepareReport:
    """Turn folders, zips and datasets folders of images, or of edit pairs, into one captioned dataset zip at ``out``.

    Args:
        sources: folders (recursive), zip files, image files, or folders written by datasets' ``save_to_disk``.
        out: the ``.zip`` to write; ``<out stem>.report.json`` is written next to it.
        trigger_word: the token every caption will contain exactly once (e.g. ``TOK``); required for single images,
            optional for pairs (their captions are instructions).
        max_side: long side cap in pixels; larger images are downscaled (never upscaled).
        min_side: images whose short side is below this are skipped (a pair with such a side is dropped).
        background: color that transparent pixels are composited onto.
        caption_template: caption for images with no sidecar/metadata caption (default ``a photo of [trigger]``);
            for pairs, the instruction of pairs that have none (default: such pairs are dropped and reported).
            ``[trigger]`` is replaced.
        near_duplicate_distance: perceptual-hash Hamming distance (bits of 64) at or under which two images (for
            pairs: two targets) are near duplicates; None disables near-duplicate removal (exact duplicates are
            always removed).
        autocaption: a transformers image-to-text model (folder or hub id) that fills missing captions; single
            images only (it describes an image, it does not write edit instructions).
        workers: processes to decode with; default all cores available to this process.
        progress: show a progress bar with images/s on stderr for runs longer than a second.
        pairs: ``auto`` (pairs when ``controls`` or ``control_columns`` are given or a folder or zip holds a
            ``NAME_start`` + ``NAME_end`` pair, else single images), ``none`` (single images), ``start-end``,
            ``control`` or ``columns``; the layouts are described in :mod:`finetune.data.pairs`.
        controls: the ``control`` layout's reference folders or zips, reference 1 first; ``sources`` is then the one
            folder or zip of targets, matched by stem.
        image_column: the ``columns`` layout's target column (default ``image``, or the one Image column left).
        control_columns: the ``columns`` layout's reference columns, reference 1 first.
        caption_column: the ``columns`` layout's instruction column (default the first of
            ``data.INSTRUCTION_COLUMNS`` present).
        masks: a folder or zip of grayscale loss masks (white = learn) named like the images (``photo.png`` for
            ``photo.jpg``; subfolders as in the source). Each is given its image's geometry and stored as
            ``<stem>_mask.png``; an image without one trains unmasked, an image whose mask is unusable (unreadable,
            or not its image's size or aspect ratio) is skipped with the mask named, and a mask without an image is
            listed in ``unpaired``. Single images only.

    Returns:
        The report; the zip is at ``report.zip_path`` and its sha256 is ``report.digest``.

    Raises:
        FinetuneError: bad options or sources, or single images mixed with pairs, or masks for pairs (exit code 2),
            or no usable image or pair left (exit code 1).
    """
    out = Path(out)
    trigger = trigger_word.strip() if isinstance(trigger_word, str) else ""
    if trigger_word is not None and (not trigger or "\n" in trigger):
        raise FinetuneError("--trigger-word must be a non-empty single line, e.g. TOK", EXIT_USAGE)
    if out.suffix.lower() != ".zip":
        raise FinetuneError(f"output {str(out)!r} must end with .zip, e.g. -o data/{trigger or 'set'}.zip", EXIT_USAGE)
    if not sources:
        raise FinetuneError("no source given; pass one or more folders, zips or datasets folders", EXIT_USAGE)
    if max_side < 1 or min_side < 1 or min_side > max_side:
        raise FinetuneError(
            f"--min-side {min_side} and --max-side {max_side} must be positive with min <= max", EXIT_USAGE
        )
    if near_duplicate_distance is not None and not 0 <= near_duplicate_distance <= 64:
        raise FinetuneError(
            f"--near-dup-distance {near_duplicate_distance} must be between 0 and 64 bits (negative disables)",
            EXIT_USAGE,
        )
    rgb = data.parse_background(background)
    if masks is not None:
        masks = Path(masks)
        if not (masks.is_dir() and not data.is_hf_dataset(masks)) and not zipfile.is_zipfile(masks):
            raise FinetuneError(
                f"--masks {str(masks)!r} is not a folder or zip of masks; pass the folder that holds a grayscale "
                "mask per image, named like the image (photo.png for photo.jpg)",
                EXIT_USAGE,
            )
    layout = _requested_layout(pairs, controls, image_column, control_columns, caption_column)

    # Scan: cheap, in this process; nothing is decoded yet. A zip holds single images or pairs, never both.
    scan = _scan(sources, layout, controls, image_column, control_columns, caption_column)
    is_pairs = scan.layout != "none"
    if not is_pairs and not trigger:
        raise FinetuneError(
            "--trigger-word is required for single images, e.g. --trigger-word TOK (edit pairs may go without)",
            EXIT_USAGE,
        )
    if is_pairs and masks is not None:
        raise FinetuneError(
            "--masks weights the loss of single images; edit pairs take none (a pair's target is learned whole). "
            "Drop --masks, or prepare the images as single images with --pairs none",
            EXIT_USAGE,
        )
    if is_pairs and autocaption:
        raise FinetuneError(
            "--autocaption writes descriptions, not edit instructions; give the pairs NAME.txt files, a caption "
            "column or --caption-template",
            EXIT_USAGE,
        )
    if not is_pairs and caption_template is None:
        caption_template = DEFAULT_CAPTION_TEMPLATE
    _check_trigger_placeholders(scan.captions, caption_template, trigger)
    options = {
        "max_side": max_side,
        "min_side": min_side,
        "background": "#{:02x}{:02x}{:02x}".format(*rgb),
        "caption_template": caption_template,
        "near_duplicate_distance": near_duplicate_distance,
        "autocaption": autocaption,
    }
    if is_pairs:
        options |= {
            "pairs": scan.layout,
            "controls": [str(c) for c in controls],
            "image_column": image_column,
            "control_columns": list(control_columns),
            "caption_column": caption_column,
        }
    mask_tasks: dict[str, data.ImageTask] = {}
    if masks is not None:
        options["masks"] = str(masks)
        mask_tasks = _match_masks(scan, masks)
    # A pair without an instruction teaches nothing: drop it by name, unless --caption-template gives it one.
    skipped = _drop_uninstructed(scan) if is_pairs and caption_template is None else []
    captioner = None
    if autocaption and any(ex[0].source not in scan.captions for ex in scan.examples):
        captioner = data.Captioner(autocaption)

    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.work-"))
    warnings = scan.warnings
    try:
        opts = data.NormalizeOptions(max_side=max_side, min_side=min_side, background=rgb, workdir=str(workdir))
        tasks = [task for ex in scan.examples for task in ex]
        results = _process_all(data.process_image, [(task,) for task in tasks], opts, workers, progress)
        # A pair stays a pair: an unusable side drops it (with that side's reason).
        ok, failed = _join_sides(scan.examples, results)
        skipped = sorted(skipped + failed, key=lambda s: s["source"]) if is_pairs else failed
        # Duplicates are judged on the target; a reference may rightly serve several pairs.
        targets = [sides[0] for sides in ok]
        dups = data.find_duplicates(
            [(r.source, r.stem, r.phash, r.orig_width * r.orig_height) for r in targets], near_duplicate_distance
        )
        duplicates = [
            {"source": targets[i].source, "kept": targets[k].source, "kind": kind, "distance": dist}
            for i, (k, kind, dist) in sorted(dups.items(), key=lambda kv: targets[kv[0]].source)
        ]
        kept = sorted((sides for i, sides in enumerate(ok) if i not in dups), key=lambda sides: sides[0].file_name)
        mask_results: dict[str, data.MaskResult] = {}
        if mask_tasks:
            # An image whose mask is unusable is left out: training it whole would learn what the mask hides.
            kept, mask_results, failed = _process_masks(kept, mask_tasks, opts, workers, progress)
            skipped = sorted(skipped + failed, key=lambda s: s["source"])
        if not kept:
            reasons = Counter(s["reason"].split(":")[0] for s in skipped).most_common(3)
            raise FinetuneError(
                f"no usable {'pair' if is_pairs else 'image'} left: {len(skipped)} skipped "
                f"({'; '.join(f'{n}x {r}' for r, n in reasons)}), {len(duplicates)} duplicates, "
                + (f"{len(scan.unpaired)} unpaired, " if is_pairs else "")
                + f"{len(scan.ignored)} files ignored; nothing written to {out}",
                EXIT_FAILURE,
            )
        if is_pairs:
            rows, files = _pair_rows(kept, scan.captions, trigger, caption_template, workdir)
        else:
            targets = [sides[0] for sides in kept]
            rows = _caption_rows(targets, scan.captions, trigger, caption_template, captioner, workdir, warnings)
            files = _image_files(rows, workdir)
            if masks is not None:
                _add_masks(rows, files, mask_results, workdir, warnings)
        zip_bytes = _write_zip_atomic(out, [_metadata_row(r) for r in rows], files)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    digest = sha256_file(out)
    short_sides = [min(r["orig_width"], r["orig_height"]) for r in rows]
    warnings += _warnings(trigger, rows, short_sides, zip_bytes, max_side, "pairs" if is_pairs else "images")
    report = PrepareReport(
        zip_path=out,
        report_path=out.with_suffix(".report.json"),
        digest=digest,
        trigger_word=trigger,
        kept=rows,
        skipped=skipped,
        ignored=[{"source": i.source, "reason": i.reason} for i in sorted(scan.ignored, key=lambda i: i.source)],
        duplicates=duplicates,
        caption_sources=dict(sorted(Counter(r["caption_source"] for r in rows).items())),
        size_histogram=_histogram(short_sides),
        warnings=warnings,
        options=options,
        zip_bytes=zip_bytes,
        layout=scan.layout,
        unpaired=[{"source": u.source, "reason": u.reason} for u in sorted(scan.unpaired, key=lambda u: u.source)],
    )
    write_atomic(report.report_path, json.dumps(report.to_dict(), indent=2, ensure_ascii=False).encode() + b"\n")
    for w in warnings:
        log.warning(w)
    return report


def _requested_layout(
    pairs: str,
    controls: Sequence[str | Path],
    image_column: str | None,
    control_columns: Sequence[str],
    caption_column: str | None,
) -> str:
    """The layout the options ask for; ``auto`` is left for the files to decide (NAME_start/NAME_end names)."""
    if pairs not in data.PAIR_LAYOUTS:
        raise FinetuneError(f"--pairs {pairs!r}: use one of {', '.join(data.PAIR_LAYOUTS)}", EXIT_USAGE)
    if controls and control_columns:
        raise FinetuneError(
            "--control (folders of references) and --control-column (a datasets column) are two layouts; give one",
            EXIT_USAGE,
        )
    if (image_column or caption_column) and not control_columns:
        raise FinetuneError(
            "--image-column and --caption-column name the columns of a dataset of pairs; add --control-column "
            "REFERENCE_COLUMN",
            EXIT_USAGE,
        )
    given = "control" if controls else "columns" if control_columns else None
    if pairs == "auto":
        return given or "auto"
    if pairs in ("control", "columns") and given != pairs:
        flag = "--control DIR" if pairs == "control" else "--control-column COLUMN"
        raise FinetuneError(f"--pairs {pairs} needs {flag} (one per reference)", EXIT_USAGE)
    if given is not None and pairs != given:
        raise FinetuneError(f"--pairs {pairs} takes no {'--control' if controls else '--control-column'}", EXIT_USAGE)
    return pairs


def _scan(
    sources: Sequence[str | Path],
    layout: str,
    controls: Sequence[str | Path],
    image_column: str | None,
    control_columns: Sequence[str],
    caption_column: str | None,
) -> _Scan:
    """Single images, or the pairs of one layout; ``auto`` means pairs once a NAME_start + NAME_end pair is seen."""
    if layout in ("auto", "none"):
        scan = _scan_images(sources)
        if layout == "none" or not data.has_start_end_pairs([example[0].source for example in scan.examples]):
            if not scan.examples:
                raise FinetuneError(
                    f"no image files found in {', '.join(map(str, sources))} ({len(scan.ignored)} other files "
                    f"ignored); supported extensions: {' '.join(sorted(data.IMAGE_EXTENSIONS))}",
                    EXIT_FAILURE,
                )
            return scan
        layout = "start-end"  # scanned again below, where NAME.txt is the instruction of NAME_end
    return _scan_pairs(sources, layout, controls, image_column, control_columns, caption_column)


def _scan_images(sources: Sequence[str | Path]) -> _Scan:
    """Single images of every source, sorted by source label; each is an example without references."""
    tasks, captions, ignored, warnings = [], {}, [], []
    for src in sources:
        scanned = data.scan_source(src)
        tasks += scanned.tasks
        captions.update(scanned.captions)
        ignored += scanned.ignored
        warnings += scanned.warnings
    tasks.sort(key=lambda t: t.source)
    return _Scan("none", [(t,) for t in tasks], captions, ignored, [], warnings)


def _scan_pairs(
    sources: Sequence[str | Path],
    layout: str,
    controls: Sequence[str | Path],
    image_column: str | None,
    control_columns: Sequence[str],
    caption_column: str | None,
) -> _Scan:
    """The pairs of every source, sorted by target; refuses single images among them (a zip holds one kind)."""
    found = data.scan_pairs(
        sources,
        layout,
        controls=controls,
        image_column=image_column,
        control_columns=control_columns,
        caption_column=caption_column,
    )
    if found.singles:
        shown = ", ".join(found.singles[:NAMES_SHOWN]) + (" ..." if len(found.singles) > NAMES_SHOWN else "")
        lead = (
            f"a zip holds single images or edit pairs, never both: {len(found.pairs)} NAME_start/NAME_end pairs "
            f"and {len(found.singles)} single images"
            if found.pairs
            else f"--pairs {layout} found no NAME_start/NAME_end pair, only {len(found.singles)} single images"
        )
        raise FinetuneError(
            f"{lead} ({shown}). Move the single images out (or name them NAME_start/NAME_end), or pass "
            "--pairs none to prepare every image as a single image; nothing written",
            EXIT_USAGE,
        )
    if not found.pairs:
        raise FinetuneError(
            f"no complete pair in {', '.join(map(str, sources))}: {len(found.unpaired)} images without their other "
            f"side ({', '.join(u.source for u in found.unpaired[:5])}), {len(found.ignored)} files ignored",
            EXIT_FAILURE,
        )
    if found.unpaired:
        found.warnings.append(
            f"{len(found.unpaired)} images could not be paired and were left out: "
            + ", ".join(u.source for u in found.unpaired[:NAMES_SHOWN])
            + (" ..." if len(found.unpaired) > NAMES_SHOWN else "")
        )
    examples = sorted(found.pairs, key=lambda pair: pair[0].source)
    return _Scan(layout, examples, found.captions, found.ignored, found.unpaired, found.warnings)


def _drop_uninstructed(scan: _Scan) -> list[dict[str, str]]:
    """Take the pairs without an instruction out of ``scan``; their skipped rows name them."""
    reason = "no instruction (no NAME.txt, caption or --caption-template)"
    dropped = [ex[0].source for ex in scan.examples if ex[0].source not in scan.captions]
    scan.examples = [ex for ex in scan.examples if ex[0].source in scan.captions]
    return [{"source": source, "reason": reason, "pair": source} for source in dropped]


def _check_trigger_placeholders(captions: dict[str, tuple[str, str]], template: str | None, trigger: str) -> None:
    """Without a trigger word, a ``[trigger]`` in an instruction would train literally: refuse it before any work."""
    if trigger:
        return
    holders = [s for s, (text, _) in sorted(captions.items()) if "[trigger]" in text or "{trigger}" in text]
    if template is not None and ("[trigger]" in template or "{trigger}" in template):
        holders.insert(0, "--caption-template")
    if holders:
        raise FinetuneError(
            f"{', '.join(holders[:5])}{' ...' if len(holders) > 5 else ''} use [trigger], but no --trigger-word "
            "was given; pass one (e.g. --trigger-word TOK) or remove the placeholder",
            EXIT_USAGE,
        )


def _process_all(
    fn: Callable[..., Any],
    jobs: list[tuple[Any, ...]],
    opts: data.NormalizeOptions,
    workers: int | None,
    progress: bool,
) -> list[Any]:
    """Run ``fn(*job, opts)`` (:func:`data.process_image`, :func:`data.process_mask`) over all jobs on a process pool;
    results in job order."""
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(workers, len(jobs)))
    results = []
    if workers == 1:
        with _progress_bar(len(jobs), progress) as bar:
            for job in jobs:
                results.append(fn(*job, opts))
                bar.update()
        return results
    # fork on Linux: workers need no re-import of __main__, so scripts without a main guard, `python -` and
    # notebooks work; they only run Pillow/numpy, never the parent's torch threads. spawn elsewhere.
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx)
    try:
        # map submits every task now, which starts the workers before the progress bar starts its thread.
        # Tasks and results are a few hundred bytes; the pixels go to opts.workdir, so memory stays flat.
        outcomes = pool.map(fn, *zip(*jobs, strict=True), repeat(opts), chunksize=1)
        with _progress_bar(len(jobs), progress) as bar:
            for result in outcomes:
                results.append(result)
                bar.update()
    except BrokenProcessPool:
        raise FinetuneError(
            "a decoding worker died (out of memory or killed); rerun with --workers 1 to see which file",
            EXIT_FAILURE,
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _join_sides(
    examples: list[tuple[data.ImageTask, ...]], results: list[data.ImageResult]
) -> tuple[list[tuple[data.ImageResult, ...]], list[dict[str, str]]]:
    """Results (in task order) back into examples; an example with an unusable side is left out, with a skipped row
    per unusable side (a pair's rows name the side and add ``pair``, the target's source)."""
    ok, skipped, at = [], [], 0
    for example in examples:
        sides = tuple(results[at : at + len(example)])
        at += len(example)
        bad = [(i, r) for i, r in enumerate(sides) if r.reason]
        if not bad:
            ok.append(sides)
        elif len(sides) == 1:
            skipped.append({"source": sides[0].source, "reason": sides[0].reason})
        else:
            skipped += [
                {"source": r.source, "reason": f"{_side_name(i, len(sides))}: {r.reason}", "pair": sides[0].source}
                for i, r in bad
            ]
    return ok, skipped


def _mask_key(source: str) -> str:
    """The name a mask matches an image by: its path inside its source, less the extension, lowercase."""
    return str(PurePosixPath(source.split("/", 1)[-1].lower()).with_suffix(""))


def _match_masks(scan: _Scan, masks: Path) -> dict[str, data.ImageTask]:
    """{image source: its mask's task}; a mask without an image (or a second mask of one) goes to ``unpaired``.

    Files of the masks folder found inside a source folder are masks, not images: they leave the scan as ignored.
    """
    root = masks.resolve()
    inside = {
        ex[0].source for ex in scan.examples if ex[0].kind == "file" and root in Path(ex[0].path).resolve().parents
    }
    if inside:
        scan.examples = [ex for ex in scan.examples if ex[0].source not in inside]
        scan.ignored += [data.Ignored(source, "a mask (inside the --masks folder)") for source in sorted(inside)]
    found = data.scan_source(masks)
    scan.ignored += [i for i in found.ignored if "no matching image" not in i.reason]
    by_key: dict[str, data.ImageTask] = {}
    for task in sorted(found.tasks, key=lambda t: t.source):
        key = _mask_key(task.source)
        if key in by_key:
            scan.unpaired.append(data.Ignored(task.source, f"a second mask for {key} (kept {by_key[key].source})"))
        else:
            by_key[key] = task
    images = {_mask_key(ex[0].source): ex[0].source for ex in scan.examples}
    for key, task in by_key.items():
        if key not in images:
            scan.unpaired.append(data.Ignored(task.source, f"a mask without an image named {key}.*"))
    return {ex[0].source: by_key[key] for ex in scan.examples if (key := _mask_key(ex[0].source)) in by_key}


def _process_masks(
    kept: list[tuple[data.ImageResult, ...]],
    mask_tasks: dict[str, data.ImageTask],
    opts: data.NormalizeOptions,
    workers: int | None,
    progress: bool,
) -> tuple[list[tuple[data.ImageResult, ...]], dict[str, data.MaskResult], list[dict[str, str]]]:
    """Give the kept images' masks their geometry; an image with an unusable mask leaves ``kept`` with a skipped row
    that names the mask. Returns the images left, {image source: mask result} and the skipped rows."""
    jobs = [(mask_tasks[sides[0].source], sides[0]) for sides in kept if sides[0].source in mask_tasks]
    outcomes = _process_all(data.process_mask, jobs, opts, workers, progress)
    results = {image.source: r for (_, image), r in zip(jobs, outcomes, strict=True)}
    failed = [
        {"source": source, "reason": f"mask {r.source}: {r.reason}", "mask": r.source}
        for source, r in results.items()
        if r.reason
    ]
    bad = {row["source"] for row in failed}
    return [sides for sides in kept if sides[0].source not in bad], results, failed


def _add_masks(
    rows: list[dict[str, Any]],
    files: dict[str, bytes | Path],
    masks: dict[str, data.MaskResult],
    workdir: Path,
    warnings: list[str],
) -> None:
    """Each masked row's ``mask`` and ``mask_source`` (and the mask's flags), and ``<stem>_mask.png`` in the zip."""
    for row in rows:
        mask = masks.get(row["source"])
        if mask is None:
            continue
        row["mask"], row["mask_source"] = mask.file_name, mask.source
        row["flags"] += list(mask.flags)
        files[mask.file_name] = workdir / mask.file_name
    unmasked = sum("mask" not in row for row in rows)
    if unmasked:
        warnings.append(f"{unmasked} of {len(rows)} images have no mask in --masks; they train unmasked (whole)")


def _side_name(index: int, count: int) -> str:
    """'target', 'reference' (the only one) or 'reference N'."""
    return "target" if index == 0 else "reference" if count == 2 else f"reference {index}"


def _progress_bar(total: int, enabled: bool) -> Any:
    """tqdm on stderr in images/s; it appears only once a run has taken more than a second."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="prepare", file=sys.stderr, disable=not enabled, delay=1.0)


def _caption_rows(
    kept: list[data.ImageResult],
    captions: dict[str, tuple[str, str]],
    trigger: str,
    template: str,
    captioner: data.Captioner | None,
    workdir: Path,
    warnings: list[str],
) -> list[dict[str, Any]]:
    """metadata.jsonl rows (plus report fields) with the caption precedence: sidecar, metadata, model, template."""
    generated: dict[str, str] = {}
    missing = [r for r in kept if r.source not in captions]
    if captioner is not None and missing:
        from PIL import Image

        batch_size = 8
        for start in range(0, len(missing), batch_size):
            batch = missing[start : start + batch_size]
            images = []
            for r in batch:
                with Image.open(workdir / r.file_name) as im:
                    images.append(im.convert("RGB"))
            for r, text in zip(batch, captioner(images), strict=True):
                if text:
                    generated[r.source] = text
        empty = len(missing) - len(generated)
        if empty:
            warnings.append(
                f"--autocaption {captioner.name} returned empty text for {empty} images; used the template"
            )
    rows = []
    for r in kept:
        if r.source in captions:
            text, origin = captions[r.source]
            kind = "metadata" if origin == "metadata" else "sidecar"
        elif r.source in generated:
            text, kind = generated[r.source], "autocaption"
        else:
            text, kind = template, "template"
        rows.append(
            {
                "file_name": r.file_name,
                "text": data.apply_trigger(text, trigger),
                "width": r.width,
                "height": r.height,
                "sha256": r.sha256,
                "source": r.source,
                "caption_source": kind,
                "orig_width": r.orig_width,
                "orig_height": r.orig_height,
                "flags": list(r.flags),
            }
        )
    return rows


def _pair_rows(
    kept: list[tuple[data.ImageResult, ...]],
    captions: dict[str, tuple[str, str]],
    trigger: str,
    template: str | None,
    workdir: Path,
) -> tuple[list[dict[str, Any]], dict[str, bytes | Path]]:
    """Report rows (the target's facts plus ``references``) and zip entries of the pairs, named by their content.

    The instruction is the pair's caption, else ``template``; the trigger word, when given, goes in once.
    """
    rows, files = [], {}
    for target, *references in kept:
        end_name, start_names, txt_name = data.pair_names(target, references)
        if target.source in captions:
            text, origin = captions[target.source]
            kind = "metadata" if origin == "metadata" else "sidecar"
        else:
            text, kind = template or "", "template"
        text = data.apply_trigger(text, trigger) if trigger else data.clean_caption(text)
        rows.append(
            {
                "file_name": end_name,
                "text": text,
                "width": target.width,
                "height": target.height,
                "sha256": target.sha256,
                "source": target.source,
                "caption_source": kind,
                "orig_width": target.orig_width,
                "orig_height": target.orig_height,
                "flags": list(target.flags),
                "references": [
                    {
                        "file_name": name,
                        "width": r.width,
                        "height": r.height,
                        "sha256": r.sha256,
                        "source": r.source,
                        "orig_width": r.orig_width,
                        "orig_height": r.orig_height,
                        "flags": list(r.flags),
                    }
                    for name, r in zip(start_names, references, strict=True)
                ],
            }
        )
        files[end_name] = workdir / target.file_name
        files.update({name: workdir / r.file_name for name, r in zip(start_names, references, strict=True)})
        files[txt_name] = text.encode()
    rows.sort(key=lambda r: r["file_name"])
    return rows, files


def _image_files(rows: list[dict[str, Any]], workdir: Path) -> dict[str, bytes | Path]:
    """Zip entries of single images: each image (from the work folder) and its ``<stem>.txt`` caption."""
    files: dict[str, bytes | Path] = {}
    for r in rows:
        files[r["file_name"]] = workdir / r["file_name"]
        files[r["file_name"].rsplit(".", 1)[0] + ".txt"] = r["text"].encode()
    return files


def _metadata_row(row: dict[str, Any]) -> dict[str, Any]:
    """The ``metadata.jsonl`` row of a report row: the contract's keys, and for pairs each reference's."""
    meta = {k: row[k] for k in METADATA_KEYS}
    if "mask" in row:
        meta["mask"] = row["mask"]
    if "references" in row:
        meta["references"] = [{k: ref[k] for k in METADATA_KEYS if k != "text"} for ref in row["references"]]
    return meta


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=FIXED_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED  # images are compressed already; STORED bytes don't depend on zlib
    info.create_system = 3  # Unix, whatever OS writes it
    info.external_attr = 0o644 << 16
    return info


def _write_zip_atomic(out: Path, metadata: list[dict[str, Any]], files: dict[str, bytes | Path]) -> int:
    """Stream ``metadata.jsonl`` and ``files`` (zip name -> bytes, or a file in the work folder), sorted by name, to a
    temporary file next to ``out``, then rename; returns the size in bytes."""
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in metadata)
    entries: dict[str, bytes | Path] = {"metadata.jsonl": lines.encode(), **files}
    with atomic_file(out) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(entries):
            payload = entries[name]
            zf.writestr(_zip_info(name), payload.read_bytes() if isinstance(payload, Path) else payload)
    return out.stat().st_size


def _histogram(short_sides: list[int]) -> dict[str, int]:
    """Counts of original short sides per bin: '<256', '256-511', ..., '>=2048'."""
    labels = (
        [f"<{SIZE_BINS[0]}"]
        + [f"{a}-{b - 1}" for a, b in zip(SIZE_BINS, SIZE_BINS[1:], strict=False)]
        + [f">={SIZE_BINS[-1]}"]
    )
    counts = dict.fromkeys(labels, 0)
    for s in short_sides:
        counts[labels[sum(s >= edge for edge in SIZE_BINS)]] += 1
    return counts


def _warnings(
    trigger: str, rows: list[dict], short_sides: list[int], zip_bytes: int, max_side: int, noun: str = "images"
) -> list[str]:
    found = []
    word = data.common_word_in(trigger)
    if word:
        found.append(
            f"trigger word {trigger!r} contains the common English word {word!r}; it will bleed into every prompt "
            "using it. Prefer a rare token such as TOK, ohwx or a made-up string"
        )
    small = sum(s < RECOMMENDED_SHORT_SIDE for s in short_sides)
    if small:
        found.append(
            f"{small} of {len(rows)} {noun} have a short side below {RECOMMENDED_SHORT_SIDE} px; "
            f"FLUX trains at {RECOMMENDED_SHORT_SIDE} px, so they will train at lower resolution"
        )
    if len(rows) < RECOMMENDED_MIN_IMAGES:
        found.append(f"only {len(rows)} {noun}; at least {RECOMMENDED_MIN_IMAGES} are recommended for a LoRA")
    if zip_bytes > REPLICATE_UPLOAD_LIMIT:
        smaller = 1024 if max_side > 1024 else max(256, max_side // 2)
        found.append(
            f"the zip is {zip_bytes / 2**20:.1f} MiB, over Replicate's 100 MiB Files API limit; "
            f"shrink it with --max-side {smaller} (or use fewer {noun})"
        )
    return found


def format_summary(report: PrepareReport) -> str:
    """A plain-text summary table: kept, skipped by reason, duplicates, caption sources, size histogram; for pairs
    also every dropped pair and unpaired image by name."""
    pairs = report.layout != "none"
    lines = [f"{'pairs kept' if pairs else 'kept':<28}{len(report.kept):>6}"]
    reasons = Counter(s["reason"] for s in report.skipped)
    dropped = len({s["pair"] for s in report.skipped}) if pairs else len(report.skipped)
    lines.append(f"{'pairs dropped' if pairs else 'skipped':<28}{dropped:>6}")
    lines += [f"  {reason[:60]:<60}{n:>6}" for reason, n in sorted(reasons.items())]
    if pairs:
        lines += _names(report.skipped)
    kinds = Counter(d["kind"] for d in report.duplicates)
    lines.append(f"{'duplicates removed':<28}{len(report.duplicates):>6}")
    lines += [f"  {kind:<26}{n:>6}" for kind, n in sorted(kinds.items())]
    if pairs:
        lines.append(f"{'unpaired images':<28}{len(report.unpaired):>6}")
        lines += _names(report.unpaired)
    if "masks" in report.options:
        lines.append(f"{'masked images':<28}{sum('mask' in r for r in report.kept):>6}")
        lines += _names([s for s in report.skipped if "mask" in s])
        lines.append(f"{'masks without an image':<28}{len(report.unpaired):>6}")
        lines += _names(report.unpaired)
    lines.append(f"{'files ignored':<28}{len(report.ignored):>6}")
    lines.append("instructions" if pairs else "captions")
    lines += [f"  {kind:<26}{n:>6}" for kind, n in report.caption_sources.items()]
    lines.append("short side (original px)")
    lines += [f"  {label:<26}{n:>6}" for label, n in report.size_histogram.items() if n]
    lines.append(f"zip {report.zip_path}  {report.zip_bytes / 2**20:.1f} MiB  sha256 {report.digest}")
    lines.append(f"report {report.report_path}")
    return "\n".join(lines)


def _names(rows: list[dict[str, str]]) -> list[str]:
    """``source: reason`` lines, the first NAMES_SHOWN of them; the report lists them all."""
    lines = [f"    {r['source']}: {r['reason']}" for r in rows[:NAMES_SHOWN]]
    if len(rows) > NAMES_SHOWN:
        lines.append(f"    ... and {len(rows) - NAMES_SHOWN} more in the report")
    return lines
