"""Dataset preparation components: find images and captions, decode and normalize one image, hash, caption.

Sources are folders (recursive), zip files (read in place, never extracted) and `datasets` folders written by
``save_to_disk``. :func:`scan_source` lists the images of one source with their captions (sidecar ``.txt`` /
``.caption`` files or ``metadata.jsonl`` / ``metadata.csv`` rows) and what it ignored; :func:`process_image` runs in a
worker process and turns one image into normalized 8-bit sRGB bytes in a work folder; :func:`find_duplicates`,
:func:`apply_trigger` and :class:`Captioner` finish the job. For edit LoRAs, :func:`scan_pairs` finds each target,
its references and its instruction in the start-end, control and columns layouts, and :func:`pair_names` names them
in the pair zip; :func:`process_mask` gives a loss mask its image's geometry. Facts behind the choices (EXIF,
alpha, ICC, junk files, zip pitfalls) are in ``reference/eval-and-data.md`` part B.
"""

from __future__ import annotations

from finetune.data.captions import Captioner, apply_trigger, clean_caption, common_word_in
from finetune.data.images import (
    MASK_SUFFIX,
    ImageResult,
    MaskResult,
    NormalizeOptions,
    find_duplicates,
    hamming,
    parse_background,
    perceptual_hash,
    process_image,
    process_mask,
)
from finetune.data.pairs import (
    INSTRUCTION_COLUMNS,
    PAIR_LAYOUTS,
    ScannedPairs,
    has_start_end_pairs,
    pair_names,
    scan_pairs,
    start_end_role,
)
from finetune.data.sources import (
    CAPTION_EXTENSIONS,
    IMAGE_EXTENSIONS,
    Ignored,
    ImageTask,
    ScannedSource,
    is_hf_dataset,
    read_zip_listing,
    scan_source,
)

__all__ = [
    "CAPTION_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "INSTRUCTION_COLUMNS",
    "MASK_SUFFIX",
    "PAIR_LAYOUTS",
    "Captioner",
    "Ignored",
    "ImageResult",
    "ImageTask",
    "MaskResult",
    "NormalizeOptions",
    "ScannedPairs",
    "ScannedSource",
    "apply_trigger",
    "clean_caption",
    "common_word_in",
    "find_duplicates",
    "hamming",
    "has_start_end_pairs",
    "is_hf_dataset",
    "parse_background",
    "pair_names",
    "perceptual_hash",
    "process_image",
    "process_mask",
    "read_zip_listing",
    "scan_pairs",
    "scan_source",
    "start_end_role",
]
