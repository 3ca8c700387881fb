"""What Replicate's FLUX LoRA trainers take and give back, as pure helpers.

``ostris/flux-dev-lora-trainer`` (FLUX.1 [dev]) takes a zip of captioned images and returns a weights tar holding one
``lora.safetensors`` (reference/replicate-api.md §9); ``replicate/fast-flux-kontext-trainer`` (FLUX.1 Kontext [dev])
takes a pair zip and returns ``weights``, a URI of the LoRA (reference/flux-family-2026.md §3); a user's own trainer
returns either. Inputs are checked against the trainer version's ``TrainingInput`` schema before anything is
uploaded; log lines carry ai-toolkit/tqdm progress. A remote run's folder holds ``remote.json`` naming its training,
which is how a training id finds its run (the remote recipe and the webhook receiver both look it up).
"""

from __future__ import annotations

import difflib
import json
import re
import tarfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from finetune.config import SECRET_WORDS
from finetune.dataset import IMAGE_SUFFIXES, PAIR_STEM
from finetune.errors import EXIT_FAILURE, FinetuneError
from finetune.files import atomic_file

__all__ = [
    "KONTEXT_BASE",
    "KONTEXT_TRAINER",
    "LORA_MEMBER",
    "MAX_LORA_BYTES",
    "RUNS_ROOT",
    "SECRET_INPUTS",
    "STATE_FILE",
    "ZipLayout",
    "extract_lora",
    "find_run_dir",
    "inspect_zip",
    "is_secret_input",
    "lora_rank_of",
    "parse_progress",
    "validate_inputs",
]

MAX_LORA_BYTES = 2 * 2**30  # a FLUX LoRA at rank 128 in fp16 is ~700 MB; anything larger is not a LoRA
LORA_MEMBER = "output/flux_train_replicate/lora.safetensors"
SECRET_INPUTS = {"hf_token": "HF_TOKEN", "wandb_api_key": "WANDB_API_KEY"}
KONTEXT_TRAINER = "replicate/fast-flux-kontext-trainer"  # FLUX.1 Kontext [dev] edit LoRAs (flux-family-2026 §3)
KONTEXT_BASE = "black-forest-labs/FLUX.1-Kontext-dev"
STATE_FILE = "remote.json"  # a remote run's state in its run folder (recipes/train_remote.py)
RUNS_ROOT = Path("runs")
_PROGRESS = re.compile(
    r"(?P<step>\d+)/(?P<total>\d+)\s*\[(?P<elapsed>[\d:]+)<(?P<eta>[\d:?]+),\s*(?P<rate>[\d.]+\s*(?:s/it|it/s))"
)


def is_secret_input(name: str, prop: Mapping | None = None) -> bool:
    """An input whose value must never be printed or stored: a known secret, a name that says so, or one the schema
    marks (Cog writes ``format: password`` and ``x-cog-secret`` for a ``Secret`` input)."""
    if name in SECRET_INPUTS or any(word in name.lower() for word in SECRET_WORDS):
        return True
    return bool(prop) and (prop.get("format") == "password" or bool(prop.get("x-cog-secret")))


def validate_inputs(inputs: dict, schema: dict, trainer_ref: str, origin: Mapping[str, str] | None = None) -> None:
    """Check the inputs against the trainer version's TrainingInput schema: unknown names (with the closest input
    the trainer has), types, bounds, enums and required inputs. ``origin`` names the config key each input came
    from, so a problem names what to fix; secret values are masked before any message is built."""
    import jsonschema

    origin = origin or {}
    props = schema.get("properties") or {}

    def where(name: str) -> str:
        return f"{origin[name]} → {name}" if name in origin else name

    problems = []
    for name in sorted(k for k in inputs if k not in props):
        close = difflib.get_close_matches(name, list(props), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"  - {where(name)}: the trainer {trainer_ref} has no such input{hint}")
    probe = {k: ("***" if is_secret_input(k, props[k]) else v) for k, v in inputs.items() if k in props}
    for err in sorted(jsonschema.Draft7Validator(schema).iter_errors(probe), key=lambda e: list(e.path)):
        name = str(err.path[0]) if err.path else ""
        at = where(name) + "".join(f".{p}" for p in list(err.path)[1:]) if name else "(inputs)"
        problems.append(f"  - {at}: {err.message}")
    if problems:
        unknown = any(k not in props for k in inputs)
        names = ", ".join(f"{k}: {_schema_type(p)}" for k, p in props.items())
        raise FinetuneError(
            f"The inputs do not fit {trainer_ref}'s TrainingInput schema:\n" + "\n".join(problems) + "\n"
            "Fix the config keys that map to these inputs (see `finetune config show`)"
            + (f"; the trainer's inputs are {names}." if unknown else ".")
        )


def _schema_type(prop: Mapping) -> str:
    if "enum" in prop:
        return " | ".join(repr(v) for v in prop["enum"])
    kind = str(prop.get("type") or ("uri" if prop.get("format") == "uri" else "any"))
    return "uri" if prop.get("format") == "uri" else kind


@dataclass(frozen=True)
class ZipLayout:
    """What a dataset zip holds, read from its entry names only (no image is decoded).

    ``pairs`` is true for a pair zip (``<stem>_start`` + ``<stem>_end``, dataset.py's contract); ``count`` is the
    number of images or pairs; ``uncaptioned`` the stems without ``<stem>.txt``; ``references`` the most
    references a pair has (``_start``, ``_start_2``, ...; 0 for single images); ``problems`` what breaks the
    contract at the name level (an end without a start, single images mixed with pairs)."""

    pairs: bool
    count: int
    uncaptioned: tuple[str, ...]
    references: int
    problems: tuple[str, ...]


def inspect_zip(path: Path) -> ZipLayout:
    """The layout of the dataset zip at ``path`` (see :class:`ZipLayout`)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
    except (zipfile.BadZipFile, OSError) as e:
        raise FinetuneError(
            f"dataset: {path} is not a readable zip ({e}); build it with `finetune prepare`."
        ) from None
    stems = {n.rsplit(".", 1)[0] for n in names if n.lower().endswith(IMAGE_SUFFIXES) and "/" not in n}
    captions = {n[: -len(".txt")] for n in names if n.endswith(".txt") and "/" not in n}
    ends, starts, singles = set(), {}, []
    for stem in sorted(stems):
        m = PAIR_STEM.match(stem)
        if m is None:
            singles.append(stem)
        elif m[2] == "end":
            ends.add(m[1])
        else:
            starts.setdefault(m[1], set()).add(int(m[3] or 1))
    if not ends & starts.keys():  # no pair at all: a zip of single images (`x_start.png` alone is an image too)
        uncaptioned = tuple(sorted(stems - captions))
        return ZipLayout(False, len(stems), uncaptioned, 0, ())
    problems = [f"{stem}_end has no {stem}_start image" for stem in sorted(ends - starts.keys())]
    problems += [f"{stem}_start has no {stem}_end image" for stem in sorted(starts.keys() - ends)]
    if singles:
        problems.append(f"single images ({', '.join(singles[:3])}{', ...' if len(singles) > 3 else ''}) are mixed "
                        "with pairs")  # fmt: skip
    pairs = sorted(ends & starts.keys())
    uncaptioned = tuple(stem for stem in pairs if stem not in captions)
    references = max(len(starts[stem]) for stem in pairs)
    return ZipLayout(True, len(pairs), uncaptioned, references, tuple(problems))


def parse_progress(line: str) -> dict | None:
    """``{"step", "total", "elapsed", "eta", "rate"}`` from an ai-toolkit/tqdm progress line, else None."""
    m = _PROGRESS.search(line)
    if not m:
        return None
    return {
        "step": int(m["step"]),
        "total": int(m["total"]),
        "elapsed": m["elapsed"],
        "eta": m["eta"],
        "rate": m["rate"].replace(" ", ""),
    }


def extract_lora(tar_path: Path, dest: Path, max_bytes: int = MAX_LORA_BYTES) -> Path:
    """Extract the single ``*.safetensors`` of a trainer's weights tar to ``dest`` (atomically) and return it; a
    trainer whose ``weights`` is the LoRA file itself (the Kontext trainer's URI) is checked and copied as is.

    Safe by construction: nothing is extracted by its member name (so ``..``/absolute names cannot escape), only
    regular files are considered, the size is bounded, and the result must parse as a safetensors file. The rule
    (exactly one ``.safetensors``, preferring ``output/flux_train_replicate/lora.safetensors``) is Replicate's own
    ``weights.py`` (reference §9.3).
    """
    if _is_safetensors(tar_path):
        size = tar_path.stat().st_size
        if size > max_bytes:
            raise FinetuneError(f"{tar_path}: the LoRA is {size} bytes (limit {max_bytes}).", EXIT_FAILURE)
        with open(tar_path, "rb") as src:
            head = _safetensors_head(src, size)
            with atomic_file(dest) as out:
                out.write(head)
                while block := src.read(1 << 20):
                    out.write(block)
        return dest
    try:
        tar = tarfile.open(tar_path, mode="r:*")
    except (tarfile.TarError, OSError) as e:
        raise FinetuneError(f"{tar_path} is not a readable tar ({e}).", EXIT_FAILURE) from None
    with tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".safetensors")]
        exact = [m for m in members if m.name == LORA_MEMBER]
        if exact:
            members = exact
        if len(members) != 1:
            names = ", ".join(m.name for m in members) or "none"
            raise FinetuneError(
                f"{tar_path}: expected exactly one .safetensors file in the weights tar, found {names}.", EXIT_FAILURE
            )
        member = members[0]
        parts = Path(member.name).parts
        if member.name.startswith("/") or ".." in parts:
            raise FinetuneError(f"{tar_path}: unsafe member path {member.name!r}; refusing it.", EXIT_FAILURE)
        if member.size > max_bytes:
            raise FinetuneError(f"{tar_path}: {member.name} is {member.size} bytes (limit {max_bytes}).", EXIT_FAILURE)
        with tar.extractfile(member) as src:
            head = _safetensors_head(src, member.size)  # checked before anything is written
            with atomic_file(dest) as out:
                out.write(head)
                written = len(head)
                while block := src.read(1 << 20):
                    written += len(block)
                    if written > max_bytes:
                        raise FinetuneError(f"{tar_path}: {member.name} exceeds {max_bytes} bytes.", EXIT_FAILURE)
                    out.write(block)
    return dest


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with the 8-byte length of a JSON header that opens with ``{`` (a tar does not)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def lora_rank_of(path: Path) -> int | None:
    """The LoRA rank of a safetensors file, from its header (the first ``lora_A`` / ``lora_down`` shape), or None."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return None
    for key in sorted(header):
        if key.endswith(("lora_A.weight", "lora_down.weight")) and isinstance(header[key], dict):
            shape = header[key].get("shape") or []
            return int(shape[0]) if shape else None
    return None


def _safetensors_head(src: IO[bytes], size: int) -> bytes:
    """The 8-byte length and JSON header of a safetensors stream, checked to hold LoRA weights."""
    head = src.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    header = None
    if 0 < n <= size - 8:
        raw = src.read(n)
        try:
            header = json.loads(raw)
        except ValueError:
            header = None
        head += raw
    if not isinstance(header, dict) or not any(k.endswith(".weight") for k in header):
        raise FinetuneError(
            f"The LoRA in the weights tar is not a valid safetensors file ({size} bytes).", EXIT_FAILURE
        )
    return head


def find_run_dir(training_id: str, root: Path | None = None) -> Path | None:
    """The run folder whose state names ``training_id`` (searched under ``runs/``), or None."""
    root = root or RUNS_ROOT
    if not root.is_dir():
        return None
    for path in sorted(root.glob(f"*/{STATE_FILE}")):
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("training_id") == training_id:
                return path.parent
        except (OSError, ValueError):
            continue
    return None
