"""`finetune eval --inputs` reads a pair zip, a start-end folder or a folder of images with instructions, and names
the file of every problem (finetune/data/edit_inputs.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image
from prepare_fixtures import PAIR_INSTRUCTIONS, smooth, write_pair_layouts

from finetune.data.edit_inputs import load_rgb, read_edit_inputs
from finetune.errors import EXIT_USAGE, FinetuneError
from finetune.recipes.prepare import prepare


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def test_a_pair_zip_from_prepare_gives_inputs_instructions_and_targets(tmp_path):
    layout = write_pair_layouts(tmp_path / "src", count=2)
    zip_path = prepare([layout["start-end"]], tmp_path / "pairs.zip", workers=1, progress=False).zip_path
    found = read_edit_inputs(zip_path)
    assert found.layout == "pair-zip" and len(found.items) == 2
    assert sorted(item.instruction for item in found.items) == sorted(PAIR_INSTRUCTIONS[:2])
    for item in found.items:
        assert len(item.inputs) == 1 and item.target is not None
        assert item.inputs[0].source == f"{zip_path}:{item.name}_start.png"
        assert item.target.source == f"{zip_path}:{item.name}_end.png"
        assert item.inputs[0].sha256 == hashlib.sha256(item.inputs[0].data).hexdigest()
        assert item.instruction_source == f"{zip_path}:{item.name}.txt"
        assert item.inputs[0].open().mode == "RGB"


def test_a_start_end_folder_with_an_optional_target_and_two_inputs(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    _save(smooth(1, (40, 32)), folder / "a_start.png")
    _save(smooth(2, (40, 32)), folder / "a_start_2.jpg")
    _save(smooth(3, (40, 32)), folder / "a_end.png")
    (folder / "a.txt").write_text("\ufeffmake it\n[trigger] blue\n", encoding="utf-8")
    _save(smooth(4, (32, 48)), folder / "b_start.png")  # no target: an input to edit, nothing to score against
    (folder / "b.txt").write_text("add a hat", encoding="utf-8")
    (folder / ".DS_Store").write_bytes(b"junk")
    found = read_edit_inputs(folder)
    assert found.layout == "pair-folder" and [item.name for item in found.items] == ["a", "b"]
    a, b = found.items
    assert [im.source for im in a.inputs] == [str(folder / "a_start.png"), str(folder / "a_start_2.jpg")]
    assert a.instruction == "make it [trigger] blue" and a.target.source == str(folder / "a_end.png")
    assert b.target is None and b.instruction == "add a hat" and b.instruction_source == str(folder / "b.txt")


def test_a_folder_of_plain_images_and_prompts_instead_of_instructions(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    _save(smooth(1), folder / "cat.png")
    (folder / "cat.txt").write_text("make the cat orange", encoding="utf-8")
    _save(smooth(2), folder / "dog.jpg")
    with pytest.raises(FinetuneError, match=r"dog\.jpg: instruction dog\.txt is missing") as info:
        read_edit_inputs(folder)
    assert info.value.exit_code == EXIT_USAGE
    found = read_edit_inputs(folder, need_instructions=False)  # prompts come from the command line
    assert found.layout == "image-folder" and [(i.name, i.instruction) for i in found.items] == [
        ("cat", "make the cat orange"),
        ("dog", None),
    ]


def test_every_problem_is_named(tmp_path):
    with pytest.raises(FinetuneError, match="does not exist"):
        read_edit_inputs(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(FinetuneError, match=f"{empty} holds no image"):
        read_edit_inputs(empty)
    (tmp_path / "not.zip").write_text("plain text", encoding="utf-8")
    with pytest.raises(FinetuneError, match="neither a folder nor a zip"):
        read_edit_inputs(tmp_path / "not.zip")

    bad = tmp_path / "bad"
    bad.mkdir()
    _save(smooth(1), bad / "a_start.png")
    (bad / "a.txt").write_bytes(b"")  # empty instruction
    _save(smooth(2), bad / "b_end.png")  # a target without an input
    _save(smooth(3), bad / "plain.png")  # a plain image among pairs
    _save(smooth(4), bad / "c_start_3.png")  # inputs 1 and 2 missing
    (bad / "c.txt").write_bytes("caf\xe9".encode("latin-1"))
    (bad / "d_start.png").write_bytes(b"not a png")
    (bad / "d.txt").write_text("x", encoding="utf-8")
    with pytest.raises(FinetuneError) as info:
        read_edit_inputs(bad)
    message = str(info.value)
    for expected in (
        f"{bad / 'a.txt'}: instruction is empty",
        f"{bad / 'b_end.png'}: target without an input",
        f"{bad / 'plain.png'}: a plain image in a folder of NAME_start/NAME_end pairs",
        f"{bad / 'c_start_3.png'}: input c_start.EXT is missing",
        "input c_start_2.EXT is missing",
        f"{bad / 'c.txt'}: instruction is not UTF-8",
        f"{bad / 'd_start.png'}: not a readable image",
    ):
        assert expected in message, (expected, message)


def test_load_rgb_flattens_transparency_on_white():
    import io

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert load_rgb(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)
