"""Input images for evaluating edit LoRAs (``finetune eval --inputs``): what each edit starts from, its instruction,
and the target it should reach when there is one.

Three layouts are read:

- ``pair-zip``: a pair zip from ``finetune prepare`` (DESIGN.md, Contracts), read with ``dataset.read_dataset``:
  ``<stem>_start.<ext>`` (+ ``_start_2``, ...) are the inputs, ``<stem>_end.<ext>`` the target, ``<stem>.txt`` the
  instruction. A zip of plain images with ``<stem>.txt`` (a dataset zip; layout ``image-zip``) gives inputs with
  instructions and no target.
- ``pair-folder``: a flat folder in the start-end layout Replicate's and fal's edit trainers read:
  ``NAME_start.EXT`` (+ ``NAME_start_2.EXT``, ...), an optional ``NAME_end.EXT`` target and ``NAME.txt``.
- ``image-folder``: a flat folder of plain images ``NAME.EXT``, each with its instruction ``NAME.txt``.

Instructions may hold ``[trigger]``; eval replaces it per version. When prompts are given on the command line the
instruction files are not needed (``need_instructions=False``). Every problem is collected and raised at once, naming
the file, before any model loads.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.data.pairs import start_end_role
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["EDIT_IMAGE_SUFFIXES", "EditImage", "EditInput", "EditInputs", "load_rgb", "read_edit_inputs"]

EDIT_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class EditImage:
    """One image file of an edit: where it came from (``folder/NAME_start.png`` or ``pairs.zip:stem_start.png``),
    its bytes and their sha256 (the eval image cache keys on it)."""

    source: str
    data: bytes
    sha256: str

    def open(self) -> Image.Image:
        """The image as RGB, EXIF orientation applied, transparency flattened on white."""
        return load_rgb(self.data)


@dataclass(frozen=True)
class EditInput:
    """One edit: its name (the stem), its input images in order, its instruction (None when none was read) and the
    instruction's file, and the target image when the layout has one."""

    name: str
    inputs: tuple[EditImage, ...]
    instruction: str | None
    instruction_source: str | None
    target: EditImage | None = None


@dataclass(frozen=True)
class EditInputs:
    """What ``--inputs`` held: the path, the layout it was read as, and its edits sorted by name."""

    path: Path
    layout: str  # pair-zip | image-zip | pair-folder | image-folder
    items: tuple[EditInput, ...]


def load_rgb(data: bytes) -> Image.Image:
    """Decode ``data`` to RGB: EXIF orientation applied, an alpha channel composited on white (dropping it would
    turn transparent pixels black; reference/eval-and-data.md B.5)."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return flat
        return im.convert("RGB")


def _image(source: str, data: bytes, problems: list[str]) -> EditImage | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for broken files
        problems.append(f"{source}: not a readable image ({type(e).__name__}: {e})")
        return None
    return EditImage(source, data, hashlib.sha256(data).hexdigest())


def _instruction(path: Path, problems: list[str]) -> str | None:
    try:
        text = path.read_bytes().decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError:
        problems.append(f"{path}: instruction is not UTF-8 text; save it as UTF-8")
        return None
    if not text:
        problems.append(f"{path}: instruction is empty; write the edit instruction in it")
        return None
    return " ".join(text.split())  # one line for the prompt, however the file wrapped it


def read_edit_inputs(path: str | Path, *, need_instructions: bool = True) -> EditInputs:
    """Read ``path`` (a pair zip, a start-end folder, or a folder of images with ``NAME.txt`` instructions).

    Args:
        path: the zip file or folder given to ``--inputs``.
        need_instructions: a missing ``NAME.txt`` is an error (False when prompts come from the command line).

    Raises:
        FinetuneError: the path is missing or empty, an image is unreadable, an instruction is missing, empty or not
            UTF-8, a start-end folder also holds plain images, a target has no input; every problem is listed, each
            naming its file (exit code 2).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FinetuneError(f"--inputs {path} does not exist; give a pair zip from `finetune prepare` or a folder")
    if path.is_file():
        return _read_zip(path, need_instructions)
    return _read_folder(path, need_instructions)


def _read_zip(path: Path, need_instructions: bool) -> EditInputs:
    from finetune.dataset import read_dataset

    if not zipfile.is_zipfile(path):
        raise FinetuneError(
            f"--inputs {path} is neither a folder nor a zip file; give a pair zip from `finetune prepare --pairs` or "
            "a folder of NAME_start.png (+ NAME_end.png) + NAME.txt, or NAME.png + NAME.txt"
        )
    dataset = read_dataset(path, "")  # the instruction need not hold a trigger word; read_dataset names bad entries
    items = []
    with zipfile.ZipFile(path) as zf:
        for item in dataset.items:
            stem = item.name.rsplit(".", 1)[0]
            if item.references:
                name = stem[: -len("_end")] if stem.endswith("_end") else stem
                inputs = tuple(EditImage(f"{path}:{r.name}", zf.read(r.name), r.sha256) for r in item.references)
                target = EditImage(f"{path}:{item.name}", zf.read(item.name), item.sha256)
            else:
                name, target = stem, None
                inputs = (EditImage(f"{path}:{item.name}", zf.read(item.name), item.sha256),)
            items.append(EditInput(name, inputs, item.caption, f"{path}:{name}.txt", target))
    layout = "pair-zip" if any(i.target is not None for i in items) else "image-zip"
    return EditInputs(path, layout, tuple(items))


def _read_folder(path: Path, need_instructions: bool) -> EditInputs:
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in EDIT_IMAGE_SUFFIXES]
    texts = {p.stem: p for p in files if p.suffix == ".txt"}
    if not images:
        raise FinetuneError(
            f"--inputs {path} holds no image ({', '.join(EDIT_IMAGE_SUFFIXES)}); put NAME_start.png (+ NAME_end.png) "
            "+ NAME.txt, or NAME.png + NAME.txt, directly in it"
        )
    roles = {p: start_end_role(p.name) for p in images}
    problems: list[str] = []
    if any(role is not None for role in roles.values()):
        layout = "pair-folder"
        plain = [p for p, role in roles.items() if role is None]
        for p in plain:
            problems.append(
                f"{p}: a plain image in a folder of NAME_start/NAME_end pairs; rename it NAME_start{p.suffix} "
                "(with NAME.txt) or move it out"
            )
        groups: dict[str, dict[int, Path]] = {}
        for p, role in roles.items():
            if role is not None:
                sides = groups.setdefault(role[0], {})
                if role[1] in sides:
                    problems.append(f"{p}: {sides[role[1]].name} has the same role; keep one of them")
                sides[role[1]] = p
    else:
        layout = "image-folder"
        groups = {}
        for p in images:
            if 1 in groups.get(p.stem, {}):
                problems.append(f"{p}: {groups[p.stem][1].name} has the same name; keep one of them")
            groups.setdefault(p.stem, {})[1] = p

    items = []
    for name, sides in sorted(groups.items()):
        refs = sorted(i for i in sides if i > 0)
        if not refs:
            problems.append(f"{sides[0]}: target without an input; add {name}_start{sides[0].suffix} beside it")
            continue
        missing = [i for i in range(1, refs[-1] + 1) if i not in sides]
        for i in missing:
            numbered = f"{name}_start{'' if i == 1 else f'_{i}'}.EXT"
            problems.append(f"{sides[refs[-1]]}: input {numbered} is missing (inputs are _start, _start_2, …)")
        instruction, txt = None, path / f"{name}.txt"
        if name in texts:
            instruction = _instruction(texts[name], problems)
        elif need_instructions:
            first = sides[refs[0]]
            problems.append(
                f"{first}: instruction {txt.name} is missing; write the edit instruction in {txt} (one line), or "
                "pass --prompt/--prompts to apply the same instructions to every input"
            )
        inputs = [_image(str(sides[i]), sides[i].read_bytes(), problems) for i in refs]
        target = _image(str(sides[0]), sides[0].read_bytes(), problems) if 0 in sides else None
        if not missing and None not in inputs and (target is not None or 0 not in sides):
            items.append(EditInput(name, tuple(inputs), instruction, str(txt) if name in texts else None, target))
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise FinetuneError(f"--inputs {path}: {len(problems)} problem(s):\n{shown}{more}")
    return EditInputs(path, layout, tuple(items))
