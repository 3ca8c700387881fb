"""`finetune prepare`: images -> a clean, captioned, deterministic dataset zip, top to bottom.

scan sources -> (load the autocaption model, so a bad name fails before any work) -> decode and normalize every image
in a process pool (verify, EXIF-transpose, ICC -> sRGB, alpha onto a background, 8-bit RGB, downscale; workers write
the encoded image to a work folder and return only facts, so memory stays flat in the number of images) -> remove
exact and near duplicates -> captions with the trigger word -> write the zip (sorted entries, fixed timestamps,
content-derived names) to a temporary file and rename it into place -> ``OUT.report.json``.

The zip contract (DESIGN.md): flat ``<stem>.jpg|png`` + ``<stem>.txt`` + ``metadata.jsonl`` rows
``{file_name, text, width, height, sha256, source}``; the same inputs and options give byte-identical bytes.
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
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

from finetune import data
from finetune.errors import EXIT_FAILURE, EXIT_USAGE, FinetuneError
from finetune.files import atomic_file, sha256_file, write_atomic

__all__ = ["DEFAULT_NEAR_DUPLICATE_DISTANCE", "REPLICATE_UPLOAD_LIMIT", "PrepareReport", "format_summary", "prepare"]

log = logging.getLogger(__name__)

# Resaved, resized or recompressed copies land at 0-4 bits; distinct photos of one subject rarely below 10
# (imagededup's default threshold is 10). 6 removes copies and bursts without merging different shots.
DEFAULT_NEAR_DUPLICATE_DISTANCE = 6
REPLICATE_UPLOAD_LIMIT = 100 * 2**20  # bytes; Replicate's Files API limit for one upload
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest DOS timestamp: no clock in the bytes
RECOMMENDED_SHORT_SIDE = 1024  # FLUX LoRAs train at 1024 px
RECOMMENDED_MIN_IMAGES = 10  # Replicate's trainer: "minimum of 10 images recommended"
SIZE_BINS = (256, 512, 768, 1024, 1536, 2048)  # short-side histogram edges, pixels


@dataclass
class PrepareReport:
    """What :func:`prepare` did; also written as ``OUT.report.json``.

    ``kept`` rows: file_name, text, caption_source (sidecar | metadata | autocaption | template), width, height,
    orig_width, orig_height, sha256, source, flags. ``skipped``/``ignored`` rows: source, reason. ``duplicates`` rows:
    source, kept (the source that was kept instead), kind (exact | near), distance (bits).
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        d = asdict(self)
        d["zip_path"], d["report_path"] = str(self.zip_path), str(self.report_path)
        return d


def prepare(
    sources: Sequence[str | Path],
    out: str | Path,
    trigger_word: str,
    *,
    max_side: int = 2048,
    min_side: int = 256,
    background: str = "white",
    caption_template: str = "a photo of [trigger]",
    near_duplicate_distance: int | None = DEFAULT_NEAR_DUPLICATE_DISTANCE,
    autocaption: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Turn folders, zips and datasets folders of images into one captioned dataset zip at ``out``.

    Args:
        sources: folders (recursive), zip files, image files, or folders written by datasets' ``save_to_disk``.
        out: the ``.zip`` to write; ``<out stem>.report.json`` is written next to it.
        trigger_word: the token every caption will contain exactly once (e.g. ``TOK``).
        max_side: long side cap in pixels; larger images are downscaled (never upscaled).
        min_side: images whose short side is below this are skipped.
        background: color that transparent pixels are composited onto.
        caption_template: caption for images with no sidecar/metadata caption; ``[trigger]`` is replaced.
        near_duplicate_distance: perceptual-hash Hamming distance (bits of 64) at or under which two images are
            near duplicates; None disables near-duplicate removal (exact duplicates are always removed).
        autocaption: a transformers image-to-text model (folder or hub id) that fills missing captions.
        workers: processes to decode with; default all cores available to this process.
        progress: show a progress bar with images/s on stderr for runs longer than a second.

    Returns:
        The report; the zip is at ``report.zip_path`` and its sha256 is ``report.digest``.

    Raises:
        FinetuneError: bad options or sources (exit code 2), or no usable image left (exit code 1).
    """
    out = Path(out)
    trigger = trigger_word.strip() if isinstance(trigger_word, str) else ""
    if not trigger or "\n" in trigger:
        raise FinetuneError("--trigger-word must be a non-empty single line, e.g. TOK", EXIT_USAGE)
    if out.suffix.lower() != ".zip":
        raise FinetuneError(f"output {str(out)!r} must end with .zip, e.g. -o data/{trigger}.zip", EXIT_USAGE)
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
    options = {
        "max_side": max_side,
        "min_side": min_side,
        "background": "#{:02x}{:02x}{:02x}".format(*rgb),
        "caption_template": caption_template,
        "near_duplicate_distance": near_duplicate_distance,
        "autocaption": autocaption,
    }

    # Scan: cheap, in this process; nothing is decoded yet.
    tasks, captions, ignored, warnings = [], {}, [], []
    for src in sources:
        scanned = data.scan_source(src)
        tasks += scanned.tasks
        captions.update(scanned.captions)
        ignored += scanned.ignored
        warnings += scanned.warnings
    tasks.sort(key=lambda t: t.source)
    if not tasks:
        raise FinetuneError(
            f"no image files found in {', '.join(map(str, sources))} ({len(ignored)} other files ignored); "
            f"supported extensions: {' '.join(sorted(data.IMAGE_EXTENSIONS))}",
            EXIT_FAILURE,
        )
    captioner = None
    if autocaption and any(t.source not in captions for t in tasks):
        captioner = data.Captioner(autocaption)

    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.work-"))
    try:
        opts = data.NormalizeOptions(max_side=max_side, min_side=min_side, background=rgb, workdir=str(workdir))
        results = _process_all(tasks, opts, workers, progress)
        ok = [r for r in results if not r.reason]
        skipped = [{"source": r.source, "reason": r.reason} for r in results if r.reason]
        dups = data.find_duplicates(
            [(r.source, r.stem, r.phash, r.orig_width * r.orig_height) for r in ok], near_duplicate_distance
        )
        duplicates = [
            {"source": ok[i].source, "kept": ok[k].source, "kind": kind, "distance": dist}
            for i, (k, kind, dist) in sorted(dups.items(), key=lambda kv: ok[kv[0]].source)
        ]
        kept = sorted((r for i, r in enumerate(ok) if i not in dups), key=lambda r: r.file_name)
        if not kept:
            reasons = Counter(s["reason"].split(":")[0] for s in skipped).most_common(3)
            raise FinetuneError(
                f"no usable image left: {len(skipped)} skipped ({'; '.join(f'{n}x {r}' for r, n in reasons)}), "
                f"{len(duplicates)} duplicates, {len(ignored)} files ignored; nothing written to {out}",
                EXIT_FAILURE,
            )
        rows = _caption_rows(kept, captions, trigger, caption_template, captioner, workdir, warnings)
        zip_bytes = _write_zip_atomic(out, rows, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    digest = sha256_file(out)
    short_sides = [min(r["orig_width"], r["orig_height"]) for r in rows]
    warnings += _warnings(trigger, rows, short_sides, zip_bytes, max_side)
    report = PrepareReport(
        zip_path=out,
        report_path=out.with_suffix(".report.json"),
        digest=digest,
        trigger_word=trigger,
        kept=rows,
        skipped=skipped,
        ignored=[{"source": i.source, "reason": i.reason} for i in sorted(ignored, key=lambda i: i.source)],
        duplicates=duplicates,
        caption_sources=dict(sorted(Counter(r["caption_source"] for r in rows).items())),
        size_histogram=_histogram(short_sides),
        warnings=warnings,
        options=options,
        zip_bytes=zip_bytes,
    )
    write_atomic(report.report_path, json.dumps(report.to_dict(), indent=2, ensure_ascii=False).encode() + b"\n")
    for w in warnings:
        log.warning(w)
    return report


def _process_all(
    tasks: list[data.ImageTask], opts: data.NormalizeOptions, workers: int | None, progress: bool
) -> list[data.ImageResult]:
    """Run :func:`data.process_image` over all tasks on a process pool; results in task order."""
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(workers, len(tasks)))
    results = []
    if workers == 1:
        with _progress_bar(len(tasks), progress) as bar:
            for task in tasks:
                results.append(data.process_image(task, opts))
                bar.update()
        return results
    # fork on Linux: workers need no re-import of __main__, so scripts without a main guard, `python -` and
    # notebooks work; they only run Pillow/numpy, never the parent's torch threads. spawn elsewhere.
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx)
    try:
        # map submits every task now, which starts the workers before the progress bar starts its thread.
        # Tasks and results are a few hundred bytes; the pixels go to opts.workdir, so memory stays flat.
        outcomes = pool.map(data.process_image, tasks, repeat(opts), chunksize=1)
        with _progress_bar(len(tasks), progress) as bar:
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


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=FIXED_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED  # images are compressed already; STORED bytes don't depend on zlib
    info.create_system = 3  # Unix, whatever OS writes it
    info.external_attr = 0o644 << 16
    return info


def _write_zip_atomic(out: Path, rows: list[dict[str, Any]], workdir: Path) -> int:
    """Stream the zip contract to a temporary file next to ``out``, then rename; returns the size in bytes."""
    metadata_keys = ("file_name", "text", "width", "height", "sha256", "source")
    metadata = "".join(json.dumps({k: r[k] for k in metadata_keys}, ensure_ascii=False) + "\n" for r in rows)
    entries: dict[str, bytes | Path] = {"metadata.jsonl": metadata.encode()}
    for r in rows:
        entries[r["file_name"]] = workdir / r["file_name"]
        entries[r["file_name"].rsplit(".", 1)[0] + ".txt"] = r["text"].encode()
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


def _warnings(trigger: str, rows: list[dict], short_sides: list[int], zip_bytes: int, max_side: int) -> list[str]:
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
            f"{small} of {len(rows)} images have a short side below {RECOMMENDED_SHORT_SIDE} px; "
            f"FLUX trains at {RECOMMENDED_SHORT_SIDE} px, so they will train at lower resolution"
        )
    if len(rows) < RECOMMENDED_MIN_IMAGES:
        found.append(f"only {len(rows)} images; at least {RECOMMENDED_MIN_IMAGES} are recommended for a LoRA")
    if zip_bytes > REPLICATE_UPLOAD_LIMIT:
        smaller = 1024 if max_side > 1024 else max(256, max_side // 2)
        found.append(
            f"the zip is {zip_bytes / 2**20:.1f} MiB, over Replicate's 100 MiB Files API limit; "
            f"shrink it with --max-side {smaller} (or use fewer images)"
        )
    return found


def format_summary(report: PrepareReport) -> str:
    """A plain-text summary table: kept, skipped by reason, duplicates, caption sources, size histogram."""
    lines = [f"{'kept':<28}{len(report.kept):>6}"]
    reasons = Counter(s["reason"] for s in report.skipped)
    lines.append(f"{'skipped':<28}{len(report.skipped):>6}")
    lines += [f"  {reason[:60]:<60}{n:>6}" for reason, n in sorted(reasons.items())]
    kinds = Counter(d["kind"] for d in report.duplicates)
    lines.append(f"{'duplicates removed':<28}{len(report.duplicates):>6}")
    lines += [f"  {kind:<26}{n:>6}" for kind, n in sorted(kinds.items())]
    lines.append(f"{'files ignored':<28}{len(report.ignored):>6}")
    lines.append("captions")
    lines += [f"  {kind:<26}{n:>6}" for kind, n in report.caption_sources.items()]
    lines.append("short side (original px)")
    lines += [f"  {label:<26}{n:>6}" for label, n in report.size_histogram.items() if n]
    lines.append(f"zip {report.zip_path}  {report.zip_bytes / 2**20:.1f} MiB  sha256 {report.digest}")
    lines.append(f"report {report.report_path}")
    return "\n".join(lines)
