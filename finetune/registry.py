"""The local model registry: immutable, content-addressed LoRA versions with their lineage.

Layout under the root (``$FINETUNE_HOME``, default ``~/.finetune``)::

    models/<owner>/<name>/<version id>/lora.safetensors   the weights; the version id is their sha256
                                      /model.json         lineage and the append-only eval history
                                      /README.md          model card
    .registry.lock                                        serialises writers across processes

A version folder is assembled in a temporary folder beside its final place and renamed into place, so a crash never
leaves a half version. Readers never take the lock: a version folder is either absent or complete.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from finetune import models
from finetune.errors import EXIT_USAGE, FinetuneError
from finetune.files import atomic_dir, finetune_home, sha256_file, write_atomic

__all__ = ["Registry", "RegistryError", "Version"]

MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
SHORT_ID = 12
LORA_FILE = "lora.safetensors"


class RegistryError(FinetuneError):
    """Unknown, ambiguous or corrupt reference; the message says which and what exists instead."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_USAGE)


@dataclass(frozen=True)
class Version:
    model: str
    id: str
    path: Path
    info: dict = field(compare=False, repr=False)

    @property
    def short_id(self) -> str:
        return self.id[:SHORT_ID]

    @property
    def ref(self) -> str:
        return f"{self.model}:{self.short_id}"

    @property
    def lora_path(self) -> Path:
        return self.path / LORA_FILE

    @property
    def lineage(self) -> dict:
        return self.info.get("lineage", {})


def _model_card(model: str, version_id: str, lineage: dict) -> str:
    base = lineage.get("base_model", "unknown")
    family = lineage.get("family") or _family_of(base)
    trigger = lineage.get("trigger_word", "")
    lora = lineage.get("lora", {})
    dataset = lineage.get("dataset", {})
    lines = [
        f"# {model}:{version_id[:SHORT_ID]}",
        "",
        f"A {_family_label(family, base)} LoRA made with finetune ({lineage.get('backend', 'unknown')} backend).",
        "",
        f"- Base model: `{base}`",
        f"- Trigger word: `{trigger}`" if trigger else "- Trigger word: none",
        f"- Rank / alpha: {lora.get('rank', '?')} / {lora.get('alpha', '?')}",
        f"- Dataset digest: `{dataset.get('digest', 'unknown')}`",
        f"- Version id (sha256 of `{LORA_FILE}`): `{version_id}`",
        "",
        "## Use it",
        "",
        "```python",
        *models.usage(base, family, trigger),
        "```",
        "",
    ]
    if family != "flux3":  # FLUX 3 has no documented ComfyUI mapping: its export is refused
        ref = f"{model}:{version_id[:SHORT_ID]}"
        lines += [f"ComfyUI: `finetune models export {ref} --format comfyui -o lora_comfyui.safetensors`,"]
        lines += ["then load it with LoraLoaderModelOnly.", ""]
    return "\n".join(lines)


def _family_of(base: str) -> str:
    """The family of a lineage without one (remote and imported versions), from what needs no network: a preset, a
    local folder or a BFL hub id; else "" (a generic card)."""
    if not (base.startswith(("preset:", "black-forest-labs/")) or Path(base).expanduser().is_dir()):
        return ""
    try:
        return models.family_name(base)
    except FinetuneError:  # a base this toolkit does not know
        return ""


def _family_label(family: str | None, base: str) -> str:
    return {"flux1": "FLUX.1", "kontext": "FLUX.1 Kontext", "flux2": "FLUX.2", "flux3": "FLUX 3"}.get(
        family or "", f"{base}"
    )


class Registry:
    """Versioned LoRA store. ``Registry().add_version(...)`` is safe to call from several processes at once."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else finetune_home()

    # ---- paths and locking -----------------------------------------------------------------------------------

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def _model_dir(self, model: str) -> Path:
        return self.models_dir / model

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".registry.lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # ---- reading ----------------------------------------------------------------------------------------------

    def models(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        found = []
        for owner in sorted(p for p in self.models_dir.iterdir() if p.is_dir()):
            found += [f"{owner.name}/{m.name}" for m in sorted(owner.iterdir()) if m.is_dir() and any(m.iterdir())]
        return found

    def _load(self, model: str, folder: Path) -> Version:
        info = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        return Version(model=model, id=folder.name, path=folder, info=info)

    def versions(self, model: str) -> list[Version]:
        """All versions of ``model``, oldest first."""
        folder = self._model_dir(model)
        if not folder.is_dir():
            return []
        found = [
            self._load(model, p)
            for p in folder.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / "model.json").is_file()  # not a version being added
        ]
        return sorted(found, key=lambda v: (v.info.get("sequence", 0), v.info.get("created_at", "")))

    def resolve(self, ref: str, *, verify: bool = True) -> Version:
        """Resolve ``owner/name`` (latest version) or ``owner/name:<id prefix>``.

        Raises:
            RegistryError: unknown model or version (with the closest names), an ambiguous prefix, or a version
                whose weights no longer match its id (corrupt: never silently used).
        """
        model, _, prefix = ref.partition(":")
        if not MODEL_RE.match(model):
            raise RegistryError(f"'{ref}' is not a registry reference; use owner/name or owner/name:<version id>")
        versions = self.versions(model)
        if not versions:
            known = self.models()
            close = difflib.get_close_matches(model, known, n=3)
            hint = (
                f" Did you mean {', '.join(close)}?"
                if close
                else (f" Known models: {', '.join(known)}." if known else " The registry is empty.")
            )
            raise RegistryError(f"no model '{model}' in the registry at {self.root}.{hint}")
        if not prefix:
            version = versions[-1]
        else:
            matches = [v for v in versions if v.id.startswith(prefix.lower())]
            if not matches:
                ids = ", ".join(v.short_id for v in versions[-5:])
                raise RegistryError(f"model '{model}' has no version starting with '{prefix}'. Its versions: {ids}")
            if len(matches) > 1:
                ids = ", ".join(v.short_id for v in matches)
                raise RegistryError(f"'{ref}' is ambiguous: it matches {ids}; give more characters of the id")
            version = matches[0]
        if verify:
            self.verify(version)
        return version

    def verify(self, version: Version) -> None:
        """Raise RegistryError when the version's weights file is missing or no longer hashes to its id."""
        if not version.lora_path.is_file():
            raise RegistryError(f"version {version.ref} is corrupt: {version.lora_path} is missing")
        actual = sha256_file(version.lora_path)
        if actual != version.id:
            raise RegistryError(
                f"version {version.ref} is corrupt: {version.lora_path} hashes to {actual[:SHORT_ID]}, not its id. "
                f"Remove it with `finetune models rm {version.ref}` and import or train it again."
            )

    # ---- writing ----------------------------------------------------------------------------------------------

    def add_version(self, model: str, lora_file: str | Path, lineage: dict, card: str | None = None) -> Version:
        """Copy ``lora_file`` in as a new immutable version of ``model`` and return it.

        The version id is the sha256 of the file, so adding identical bytes again returns the existing version.
        """
        if not MODEL_RE.match(model):
            raise RegistryError(
                f"'{model}' is not a valid model name; use owner/name (letters, digits, '-', '_', '.')"
            )
        lora_file = Path(lora_file)
        if not lora_file.is_file():
            raise RegistryError(f"LoRA file {lora_file} does not exist")
        version_id = sha256_file(lora_file)
        folder = self._model_dir(model)
        final = folder / version_id
        with self._lock():
            if final.is_dir():
                return self._load(model, final)
            folder.mkdir(parents=True, exist_ok=True)
            sequence = max((v.info.get("sequence", 0) for v in self.versions(model)), default=0) + 1
            info = {
                "model": model,
                "id": version_id,
                "sequence": sequence,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "lineage": lineage,
                "evals": [],
            }
            with atomic_dir(final) as tmp:
                shutil.copyfile(lora_file, tmp / LORA_FILE)
                if sha256_file(tmp / LORA_FILE) != version_id:
                    raise RegistryError(f"{lora_file} changed while it was being copied; try again")
                (tmp / "model.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
                (tmp / "README.md").write_text(card or _model_card(model, version_id, lineage), encoding="utf-8")
        return self._load(model, final)

    def append_eval(self, version: Version, summary: dict) -> Version:
        """Append an eval summary to the version's history; the weights and lineage never change."""
        with self._lock():
            current = self._load(version.model, version.path)
            info = dict(current.info)
            info["evals"] = [*info.get("evals", []), summary]
            write_atomic(version.path / "model.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
        return self._load(version.model, version.path)

    def remove(self, ref: str) -> Version:
        """Delete one version (``owner/name:<id>``) or, for a bare ``owner/name``, the model with all its versions."""
        model, _, prefix = ref.partition(":")
        targets = [self.resolve(ref, verify=False)] if prefix else self.versions(model)
        if not targets:
            self.resolve(ref, verify=False)  # raises the "no model" error with suggestions
        with self._lock():
            for version in targets:
                trash = Path(tempfile.mkdtemp(dir=version.path.parent, prefix=".rm-"))
                os.rename(version.path, trash / version.id)  # atomic: readers see it gone at once
                shutil.rmtree(trash, ignore_errors=True)
            model_dir = self._model_dir(model)
            if model_dir.is_dir() and not any(p for p in model_dir.iterdir() if not p.name.startswith(".")):
                shutil.rmtree(model_dir, ignore_errors=True)
        return targets[-1]
