"""Edit-LoRA pairs: find each target, its references and its instruction in the layouts edit trainers read, and name
them as the pair zip does (DESIGN.md, Contracts: ``<stem>_start.<ext>``, ``<stem>_start_2.<ext>``, ...,
``<stem>_end.<ext>``, ``<stem>.txt``).

The layouts (reference/flux-family-2026.md §2.2):

- ``start-end``: Replicate's ``fast-flux-kontext-trainer`` and fal's klein edit trainer read a zip of
  ``NAME_start.EXT`` (the reference), ``NAME_end.EXT`` (the target) and an optional ``NAME.txt`` (the instruction).
  More references are read as ``NAME_start_2.EXT``, ``NAME_start_3.EXT``, ..., the names the pair zip writes, so a
  pair zip reads back.
- ``control``: ai-toolkit's ``folder_path`` + ``control_path`` (FLUX.2: ``multi_control_paths``) and musubi's
  ``image_directory`` + ``control_directory``: targets and their captions in one folder, reference i under the same
  stem in the i-th control folder (controls carry no captions there, so theirs are not read).
- ``columns``: diffusers' ``--image_column`` / ``--cond_image_column`` / ``--caption_column`` over a ``datasets``
  folder written by ``save_to_disk``.

A pair is a tuple of tasks, target first, then its references in order.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from finetune.data.captions import clean_caption
from finetune.data.images import ImageResult
from finetune.data.sources import (
    TEXT_COLUMNS,
    Ignored,
    ImageTask,
    is_hf_dataset,
    load_hf_splits,
    scan_source,
)
from finetune.errors import EXIT_USAGE, FinetuneError

__all__ = [
    "INSTRUCTION_COLUMNS",
    "PAIR_LAYOUTS",
    "ScannedPairs",
    "has_start_end_pairs",
    "pair_names",
    "scan_pairs",
    "start_end_role",
]

PAIR_LAYOUTS = ("auto", "none", "start-end", "control", "columns")
# Edit datasets on the hub name the instruction column `instruction` or `edit_prompt` as often as `text`/`prompt`.
INSTRUCTION_COLUMNS = (*TEXT_COLUMNS, "instruction", "edit_instruction", "edit_prompt")

# NAME_end (the target), NAME_start (reference 1), NAME_start_2 ... (reference 2 ...), any case.
_START_END = re.compile(r"^(?P<root>.+)_(?:(?P<end>end)|start(?:_(?P<n>[2-9]|[1-9][0-9]+))?)$", re.IGNORECASE)


@dataclass
class ScannedPairs:
    """What a pair scan found: complete pairs, their instructions, and the images that could not be paired."""

    pairs: list[tuple[ImageTask, ...]] = field(default_factory=list)  # target first, then its references
    captions: dict[str, tuple[str, str]] = field(default_factory=dict)  # target source -> (instruction, origin)
    unpaired: list[Ignored] = field(default_factory=list)  # a target without its reference, or the reverse
    singles: list[str] = field(default_factory=list)  # images outside the layout: single images, not pairs
    ignored: list[Ignored] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def extend(self, other: ScannedPairs) -> None:
        """Add what another source's scan found."""
        self.pairs += other.pairs
        self.captions.update(other.captions)
        self.unpaired += other.unpaired
        self.singles += other.singles
        self.ignored += other.ignored
        self.warnings += other.warnings


def start_end_role(label: str) -> tuple[str, int] | None:
    """``(NAME, 0)`` for ``NAME_end.EXT`` (the target), ``(NAME, i)`` for reference i (``NAME_start``: 1,
    ``NAME_start_2``: 2, ...), None for any other name. NAME keeps its folders."""
    return _stem_role(str(PurePosixPath(label).with_suffix("")))


def _stem_role(stem: str) -> tuple[str, int] | None:
    match = _START_END.match(stem)
    if match is None:
        return None
    return match["root"], 0 if match["end"] else int(match["n"] or 1)


def has_start_end_pairs(labels: Sequence[str]) -> bool:
    """Whether some NAME has both a ``NAME_end`` and a ``NAME_start`` image among ``labels``."""
    sides: dict[str, set[int]] = {}
    for label in labels:
        role = start_end_role(label)
        if role is not None:
            sides.setdefault(role[0].lower(), set()).add(min(role[1], 1))
    return any(s == {0, 1} for s in sides.values())


def _instruction_stem(stem_key: str) -> str | None:
    """``NAME`` for the target ``NAME_end``: Replicate's and fal's instruction file is ``NAME.txt``."""
    role = _stem_role(stem_key)
    return role[0] if role is not None and role[1] == 0 else None


def scan_pairs(
    sources: Sequence[str | Path],
    layout: str,
    *,
    controls: Sequence[str | Path] = (),
    image_column: str | None = None,
    control_columns: Sequence[str] = (),
    caption_column: str | None = None,
) -> ScannedPairs:
    """The pairs of ``sources`` in one layout: ``start-end``, ``control`` or ``columns`` (see the module docstring).

    Raises:
        FinetuneError: a source does not fit the layout, or a column is missing (exit code 2).
    """
    if layout == "control":
        if len(sources) != 1:
            raise FinetuneError(
                f"--control pairs one target folder or zip with its control folders; got {len(sources)} sources "
                f"({', '.join(map(str, sources))})",
                EXIT_USAGE,
            )
        return _scan_controls(sources[0], controls)
    found = ScannedPairs()
    for src in sources:
        if layout == "columns":
            found.extend(_scan_columns(src, image_column, control_columns, caption_column))
        else:
            found.extend(_scan_start_end(src))
    return found


def _scan_start_end(src: str | Path) -> ScannedPairs:
    """NAME_start / NAME_end pairs of one folder or zip; the target's own caption file, else NAME.txt, instructs."""
    scanned = scan_source(src, caption_stem=_instruction_stem)
    out = ScannedPairs(ignored=scanned.ignored, warnings=scanned.warnings)
    sides: dict[str, dict[int, list[ImageTask]]] = {}
    roots: dict[str, str] = {}
    for task in scanned.tasks:
        role = start_end_role(task.source)
        if role is None:
            out.singles.append(task.source)
            continue
        roots.setdefault(role[0].lower(), role[0])
        sides.setdefault(role[0].lower(), {}).setdefault(role[1], []).append(task)
    for key, by_index in sorted(sides.items()):
        expected = [f"{roots[key]}_{_start_end_suffix(i)}.*" for i in range(max(max(by_index), 1) + 1)]
        _pair_up(out, by_index, expected, scanned.captions)
    return out


def _start_end_suffix(index: int) -> str:
    return "end" if index == 0 else "start" if index == 1 else f"start_{index}"


def _stem_key(label: str) -> str:
    """A task label ``source name/relative path`` as its relative path without extension, lowercase."""
    return str(PurePosixPath(label.split("/", 1)[-1].lower()).with_suffix(""))


def _scan_controls(target_src: str | Path, control_srcs: Sequence[str | Path]) -> ScannedPairs:
    """ai-toolkit / musubi: targets (with their captions) in one folder or zip, reference i under the same stem in the
    i-th control folder or zip."""
    scans = [scan_source(src) for src in (target_src, *control_srcs)]
    for src, scanned in zip((target_src, *control_srcs), scans, strict=True):
        if any(t.kind == "dataset" for t in scanned.tasks):
            raise FinetuneError(
                f"{src} is a datasets folder; --control takes folders or zips of images. For a dataset with target "
                "and reference columns use --control-column COLUMN (and --image-column, --caption-column)",
                EXIT_USAGE,
            )
    names = [Path(src).resolve().name for src in (target_src, *control_srcs)]
    out = ScannedPairs(ignored=[i for s in scans for i in s.ignored], warnings=[w for s in scans for w in s.warnings])
    sides: dict[str, dict[int, list[ImageTask]]] = {}
    for index, scanned in enumerate(scans):
        for task in scanned.tasks:
            sides.setdefault(_stem_key(task.source), {}).setdefault(index, []).append(task)
    for stem, by_index in sorted(sides.items()):
        _pair_up(out, by_index, [f"{name}/{stem}.*" for name in names], scans[0].captions)
    return out


def _scan_columns(
    src: str | Path, image_column: str | None, control_columns: Sequence[str], caption_column: str | None
) -> ScannedPairs:
    """diffusers-style edit datasets: a target, reference and instruction column per row of a save_to_disk folder.

    A row whose target or reference cell is empty is reported as unpaired (checked on the Arrow table, no decoding).
    """
    import datasets

    path = Path(src)
    if not is_hf_dataset(path):
        raise FinetuneError(
            f"--control-column reads a datasets folder written by save_to_disk, and {str(src)!r} is not one; for "
            "folders of images use --control DIR or NAME_start/NAME_end file names",
            EXIT_USAGE,
        )
    name = path.resolve().name
    out = ScannedPairs()
    for split, ds in load_hf_splits(path):
        where = f"datasets folder {path}" + (f" split {split!r}" if split else "")
        images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
        for column in (*control_columns, *([image_column] if image_column else [])):
            if column not in images:
                raise FinetuneError(f"{where} has no Image column {column!r}; its Image columns: {images}", EXIT_USAGE)
        columns = (image_column or _default_target(images, control_columns, where), *control_columns)
        strings = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        text_column = caption_column or next((c for c in INSTRUCTION_COLUMNS if c in strings), None)
        if text_column is not None and text_column not in strings:
            raise FinetuneError(f"{where} has no text column {text_column!r}; its text columns: {strings}", EXIT_USAGE)
        texts = ds[text_column] if text_column else [None] * len(ds)
        empty = {c: ds.data.column(c).is_null().to_pylist() for c in columns}
        split_path = str(path / split) if split else str(path)
        captions: dict[str, tuple[str, str]] = {}
        for i, text in enumerate(texts):
            row = f"{name}/{split}/{i:06d}" if split else f"{name}/{i:06d}"
            tasks = [ImageTask(f"{row}/{c}", "dataset", split_path, member=c, index=i) for c in columns]
            if text and clean_caption(text):
                captions[tasks[0].source] = (clean_caption(text), "metadata")
            by_index = {k: [t] for k, t in enumerate(tasks) if not empty[t.member][i]}
            _pair_up(out, by_index, [t.source for t in tasks], captions)
    return out


def _default_target(images: list[str], control_columns: Sequence[str], where: str) -> str:
    """``image`` if it is not a reference column, else the one Image column left; otherwise ask for --image-column."""
    left = [c for c in images if c not in control_columns]
    if "image" in left:
        return "image"
    if len(left) == 1:
        return left[0]
    raise FinetuneError(
        f"{where}: which Image column is the target? Pass --image-column (Image columns: {images}, references: "
        f"{list(control_columns)})",
        EXIT_USAGE,
    )


def _pair_up(
    out: ScannedPairs,
    by_index: dict[int, list[ImageTask]],
    expected: Sequence[str],
    captions: dict[str, tuple[str, str]],
) -> None:
    """Add the pair made of ``by_index`` (0: the target, then its references) to ``out``, or report each of its images
    as unpaired, naming the images that are missing (``expected[i]`` describes side i) or the ones that clash."""
    tasks = [t for i in sorted(by_index) for t in by_index[i]]
    clash = next((ts for _, ts in sorted(by_index.items()) if len(ts) > 1), None)
    if clash is not None:
        reason = f"{len(clash)} images claim one place in a pair ({', '.join(t.source for t in clash)}); keep one"
        out.unpaired += [Ignored(t.source, reason) for t in tasks]
        return
    missing = [i for i in range(len(expected)) if i not in by_index]
    if missing:
        lacking = ", ".join(expected[i] for i in missing)
        for i, [task] in sorted(by_index.items()):
            if i == 0:
                reason = f"target without its reference (no {lacking})"
            elif 0 in missing:
                reason = f"reference without its target (no {expected[0]})"
            else:
                reason = f"reference of an incomplete pair (no {lacking})"
            out.unpaired.append(Ignored(task.source, reason))
        return
    pair = tuple(by_index[i][0] for i in range(len(expected)))
    out.pairs.append(pair)
    if pair[0].source in captions:
        out.captions[pair[0].source] = captions[pair[0].source]


def pair_names(target: ImageResult, references: Sequence[ImageResult]) -> tuple[str, list[str], str]:
    """Zip names of one pair: ``<stem>_end.<ext>``, ``[<stem>_start.<ext>, <stem>_start_2.<ext>, ...]``,
    ``<stem>.txt``.

    The stem is the first 16 hex digits of the sha256 over the sides' pixel stems, target first: derived from the
    content, so it depends neither on file names nor on the order in which pairs were found.
    """
    stem = hashlib.sha256(" ".join(r.stem for r in (target, *references)).encode()).hexdigest()[:16]
    starts = [f"{stem}_{_start_end_suffix(i)}.{r.file_name.rsplit('.', 1)[1]}" for i, r in enumerate(references, 1)]
    return f"{stem}_end.{target.file_name.rsplit('.', 1)[1]}", starts, f"{stem}.txt"
