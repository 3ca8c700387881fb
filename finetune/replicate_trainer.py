"""What Replicate's FLUX LoRA trainer (ostris/flux-dev-lora-trainer) takes and gives back, as pure helpers.

Its inputs are checked against the trainer version's ``TrainingInput`` schema before anything is uploaded; its log
lines carry ai-toolkit/tqdm progress; its result is a weights tar holding one ``lora.safetensors``
(reference/replicate-api.md §9). A remote run's folder holds ``remote.json`` naming its training, which is how a
training id finds its run (the remote recipe and the webhook receiver both look it up).
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import IO

from finetune.errors import EXIT_FAILURE, FinetuneError
from finetune.files import atomic_file

__all__ = [
    "LORA_MEMBER",
    "MAX_LORA_BYTES",
    "RUNS_ROOT",
    "SECRET_INPUTS",
    "STATE_FILE",
    "extract_lora",
    "find_run_dir",
    "parse_progress",
    "validate_inputs",
]

MAX_LORA_BYTES = 2 * 2**30  # a FLUX LoRA at rank 128 in fp16 is ~700 MB; anything larger is not a LoRA
LORA_MEMBER = "output/flux_train_replicate/lora.safetensors"
SECRET_INPUTS = {"hf_token": "HF_TOKEN", "wandb_api_key": "WANDB_API_KEY"}
STATE_FILE = "remote.json"  # a remote run's state in its run folder (recipes/train_remote.py)
RUNS_ROOT = Path("runs")
_PROGRESS = re.compile(
    r"(?P<step>\d+)/(?P<total>\d+)\s*\[(?P<elapsed>[\d:]+)<(?P<eta>[\d:?]+),\s*(?P<rate>[\d.]+\s*(?:s/it|it/s))"
)


def validate_inputs(inputs: dict, schema: dict, trainer_ref: str) -> None:
    """Check the inputs against the trainer version's TrainingInput schema: unknown keys, types, bounds, enums."""
    import jsonschema

    props = schema.get("properties") or {}
    problems = [f"  - {k}: the trainer {trainer_ref} has no such input" for k in sorted(inputs) if k not in props]
    probe = {k: ("***" if k in SECRET_INPUTS else v) for k, v in inputs.items() if k in props}
    for err in sorted(jsonschema.Draft7Validator(schema).iter_errors(probe), key=lambda e: list(e.path)):
        where = ".".join(str(p) for p in err.path) or "(inputs)"
        problems.append(f"  - {where}: {err.message}")
    if problems:
        raise FinetuneError(
            f"The inputs do not fit {trainer_ref}'s TrainingInput schema:\n" + "\n".join(problems) + "\n"
            "Fix the config keys that map to these inputs (see `finetune config show`)."
        )


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
    """Extract the single ``*.safetensors`` of a trainer's weights tar to ``dest`` (atomically) and return it.

    Safe by construction: nothing is extracted by its member name (so ``..``/absolute names cannot escape), only
    regular files are considered, the size is bounded, and the result must parse as a safetensors file. The rule
    (exactly one ``.safetensors``, preferring ``output/flux_train_replicate/lora.safetensors``) is Replicate's own
    ``weights.py`` (reference §9.3).
    """
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
