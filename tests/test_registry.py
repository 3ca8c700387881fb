import json
import multiprocessing
import os
from pathlib import Path

import pytest

from finetune.files import sha256_file
from finetune.registry import Registry, RegistryError


def make_lora(path: Path, payload: bytes) -> Path:
    path.write_bytes(payload)
    return path


def lineage() -> dict:
    return {"base_model": "preset:tiny", "trigger_word": "TOK", "backend": "local", "lora": {"rank": 4, "alpha": 4}}


def test_add_version_is_content_addressed_and_idempotent(tmp_path):
    registry = Registry(tmp_path / "home")
    src = make_lora(tmp_path / "a.safetensors", b"weights-a")
    v1 = registry.add_version("me/tok", src, lineage())
    assert v1.id == sha256_file(src)
    assert v1.ref == f"me/tok:{v1.id[:12]}"
    assert v1.lora_path.read_bytes() == b"weights-a"
    info = json.loads((v1.path / "model.json").read_text())
    assert info["lineage"]["base_model"] == "preset:tiny"
    assert info["evals"] == []
    assert "preset:tiny" in (v1.path / "README.md").read_text()
    again = registry.add_version("me/tok", src, lineage())
    assert again.id == v1.id
    assert len(registry.versions("me/tok")) == 1
    half = v1.path.parent / f".{v1.id}.x.tmp"  # another process's version still being written
    half.mkdir()
    (half / "model.json").write_text((v1.path / "model.json").read_text())
    assert [v.id for v in registry.versions("me/tok")] == [v1.id]
    assert src.read_bytes() == b"weights-a"  # the source is copied, never moved


def test_resolve_latest_prefix_and_errors(tmp_path):
    registry = Registry(tmp_path)
    a = registry.add_version("me/tok", make_lora(tmp_path / "a", b"aaa"), lineage())
    b = registry.add_version("me/tok", make_lora(tmp_path / "b", b"bbb"), lineage())
    assert registry.resolve("me/tok").id == b.id
    assert registry.resolve(f"me/tok:{a.id[:6]}").id == a.id
    with pytest.raises(RegistryError, match="Did you mean me/tok"):
        registry.resolve("me/tak")
    with pytest.raises(RegistryError, match="no version starting with"):
        registry.resolve("me/tok:ffffffffffff0")
    with pytest.raises(RegistryError, match="not a registry reference"):
        registry.resolve("nonsense")


def test_ambiguous_prefix_is_an_error(tmp_path):
    registry = Registry(tmp_path)
    ids = {}
    # Find two payloads whose hashes share the first hex digit.
    for i in range(64):
        src = make_lora(tmp_path / f"w{i}", f"w{i}".encode())
        ids.setdefault(sha256_file(src)[0], []).append(src)
    first, pair = next((k, v) for k, v in ids.items() if len(v) >= 2)
    for src in pair[:2]:
        registry.add_version("me/tok", src, lineage())
    with pytest.raises(RegistryError, match="ambiguous"):
        registry.resolve(f"me/tok:{first}")


def test_corrupt_version_is_reported_not_used(tmp_path):
    registry = Registry(tmp_path)
    version = registry.add_version("me/tok", make_lora(tmp_path / "a", b"good"), lineage())
    version.lora_path.write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="corrupt"):
        registry.resolve("me/tok")


def test_append_eval_keeps_history(tmp_path):
    registry = Registry(tmp_path)
    version = registry.add_version("me/tok", make_lora(tmp_path / "a", b"x"), lineage())
    registry.append_eval(version, {"clip_t": 0.3})
    updated = registry.append_eval(version, {"clip_t": 0.4})
    assert [e["clip_t"] for e in updated.info["evals"]] == [0.3, 0.4]
    assert updated.lora_path.read_bytes() == b"x"


def test_remove_version_and_missing_ref(tmp_path):
    registry = Registry(tmp_path)
    a = registry.add_version("me/tok", make_lora(tmp_path / "a", b"a"), lineage())
    b = registry.add_version("me/tok", make_lora(tmp_path / "b", b"b"), lineage())
    registry.remove(a.ref)
    assert [v.id for v in registry.versions("me/tok")] == [b.id]
    registry.remove("me/tok")
    assert registry.models() == []
    with pytest.raises(RegistryError):
        registry.remove("me/tok")


def test_failed_write_leaves_no_half_version(tmp_path, monkeypatch):
    registry = Registry(tmp_path)
    src = make_lora(tmp_path / "a", b"a")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError):
        registry.add_version("me/tok", src, lineage())
    monkeypatch.undo()
    assert registry.versions("me/tok") == []
    assert [p.name for p in (tmp_path / "models" / "me" / "tok").iterdir()] == []


def _add_many(root: str, worker: int, count: int) -> None:
    registry = Registry(root)
    for i in range(count):
        src = Path(root).parent / f"src-{worker}-{i}"
        src.write_bytes(f"{worker}-{i}".encode())
        registry.add_version("me/tok", src, lineage())


def test_concurrent_writers_all_succeed(tmp_path):
    root = str(tmp_path / "home")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(root, w, 5)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    versions = Registry(root).versions("me/tok")
    assert len(versions) == 15
    assert sorted(v.info["sequence"] for v in versions) == list(range(1, 16))


@pytest.mark.parametrize(
    "lineage, pipeline, label",
    [
        ({"base_model": "black-forest-labs/FLUX.1-dev", "family": "flux1"}, "FluxPipeline", "FLUX.1"),
        ({"base_model": "black-forest-labs/FLUX.1-Kontext-dev"}, "FluxKontextPipeline", "FLUX.1 Kontext"),
        ({"base_model": "black-forest-labs/FLUX.2-klein-base-4B"}, "Flux2KleinPipeline", "FLUX.2"),
        ({"base_model": "black-forest-labs/FLUX.2-dev", "family": "flux2"}, "Flux2Pipeline", "FLUX.2"),
        ({"base_model": "preset:flux3-tiny", "family": "flux3"}, "ModularPipeline", "FLUX 3"),
    ],
)
def test_the_model_card_shows_the_family_pipeline_in_valid_python(tmp_path, lineage, pipeline, label):
    import ast
    import re

    from finetune.registry import _model_card

    card = _model_card("me/tok", "a" * 64, {"trigger_word": "TOK", "backend": "local", **lineage})
    assert f"A {label} LoRA" in card
    (code,) = re.findall(r"```python\n(.*?)```", card, re.S)
    ast.parse(code)  # copy-paste ready
    assert f"from diffusers import {pipeline}" in code and 'load_lora_weights("lora.safetensors")' in code
    assert ("image=load_image" in code) == (pipeline == "FluxKontextPipeline")  # an edit LoRA edits an image
    assert code.rstrip().endswith("[0]") and (".images[0]" in code) == (label != "FLUX 3")  # one image
    assert ("--format comfyui" in card) == (label != "FLUX 3")
