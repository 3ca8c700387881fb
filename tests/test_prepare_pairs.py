"""finetune prepare for edit pairs: three input layouts, one pair zip contract, pairs kept whole, mixing refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from prepare_fixtures import (
    PAIR_INSTRUCTIONS,
    pair_images,
    rotated_jpeg,
    smooth,
    write_pair_dataset,
    write_pair_layouts,
)

from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.recipes.prepare import format_summary, prepare

PAIR_NAME = re.compile(r"^([0-9a-f]{16})(_end|_start|_start_[2-9]|)\.(png|jpg|txt)$")


def cli(*args: str) -> int:
    with pytest.raises(SystemExit) as done:
        main(list(args))
    return done.value.code


def entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def metadata(path: Path) -> list[dict]:
    return [json.loads(line) for line in entries(path)["metadata.jsonl"].decode().splitlines()]


def without_sources(rows: list[dict]) -> list[dict]:
    """metadata rows with every ``source`` blanked: what stays when the same pairs come in another layout."""
    return [{**r, "source": None, "references": [{**x, "source": None} for x in r["references"]]} for r in rows]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("pairs")
    found = write_pair_layouts(root / "one")
    two = write_pair_layouts(root / "two", count=2, references=2)
    return {"one": found, "two": two, "root": root}


@pytest.fixture(scope="module")
def start_end_run(layouts, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("out") / "pairs.zip"
    return prepare([layouts["one"]["start-end"]], out, workers=2, progress=False)


def test_three_layouts_give_the_same_pair_zip(layouts, start_end_run, tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    dataset = write_pair_dataset(tmp_path / "hfset")
    one = layouts["one"]
    control = prepare([one["control"]], tmp_path / "c.zip", controls=one["controls"], workers=1, progress=False)
    # The instruction column edit_prompt is found by name; the target column is named.
    columns = prepare(
        [dataset], tmp_path / "d.zip", image_column="edited_image", control_columns=["input_image"], progress=False
    )
    assert (start_end_run.layout, control.layout, columns.layout) == ("start-end", "control", "columns")
    want = entries(start_end_run.zip_path)
    for report in (control, columns):
        got = entries(report.zip_path)
        assert sorted(got) == sorted(want)
        assert all(got[name] == want[name] for name in want if name != "metadata.jsonl")
        # Only the sources differ: where each side came from.
        assert without_sources(metadata(report.zip_path)) == without_sources(metadata(start_end_run.zip_path))
    assert sorted(r["source"] for r in control.kept) == ["targets/pair0.png", "targets/pair1.png", "targets/pair2.png"]
    assert sorted(r["references"][0]["source"] for r in columns.kept) == [
        f"hfset/{i:06d}/input_image" for i in range(3)
    ]
    assert {r["caption_source"] for r in columns.kept} == {"metadata"}


def test_pair_zip_follows_the_contract(start_end_run) -> None:
    report = start_end_run
    with zipfile.ZipFile(report.zip_path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names) and {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
        rows = [json.loads(line) for line in zf.read("metadata.jsonl").decode().splitlines()]
        assert len(rows) == 3 and len(names) == 3 * len(rows) + 1
        # With one reference: exactly Replicate's Kontext trainer input, NAME_start + NAME_end + NAME.txt, flat.
        stems = {PAIR_NAME.match(n).group(1) for n in names if n != "metadata.jsonl"}
        assert set(names) == {"metadata.jsonl"} | {
            f"{s}{x}" for s in stems for x in ("_start.png", "_end.png", ".txt")
        }
        for row in rows:
            assert list(row) == ["file_name", "text", "width", "height", "sha256", "source", "references"]
            assert [list(ref) for ref in row["references"]] == [["file_name", "width", "height", "sha256", "source"]]
            stem = row["file_name"][: -len("_end.png")]
            assert row["references"][0]["file_name"] == f"{stem}_start.png"
            assert zf.read(f"{stem}.txt").decode() == row["text"] and row["text"] in PAIR_INSTRUCTIONS
            for side in (row, *row["references"]):
                payload = zf.read(side["file_name"])
                assert hashlib.sha256(payload).hexdigest() == side["sha256"]
                with Image.open(io.BytesIO(payload)) as im:
                    assert im.mode == "RGB" and im.size == (side["width"], side["height"])
            assert row["source"].endswith("_end.png") and row["references"][0]["source"].endswith("_start.png")
    assert report.trigger_word == "" and report.skipped == report.unpaired == report.duplicates == []
    on_disk = json.loads(report.report_path.read_text())
    assert on_disk["layout"] == "start-end" and on_disk["digest"] == report.digest


def test_reruns_are_byte_identical_and_a_pair_zip_reads_back(layouts, start_end_run, tmp_path: Path) -> None:
    relative = os.path.relpath(layouts["one"]["start-end"])
    again = prepare([relative], tmp_path / "again.zip", workers=1, progress=False)
    assert again.zip_path.read_bytes() == start_end_run.zip_path.read_bytes()
    # Our own pair zip is a start-end source: the same pairs come out under the same names.
    back = prepare([start_end_run.zip_path], tmp_path / "back.zip", workers=1, progress=False)
    first, second = entries(start_end_run.zip_path), entries(back.zip_path)
    assert sorted(first) == sorted(second)
    assert all(first[n] == second[n] for n in first if n != "metadata.jsonl")


def test_start_end_names_match_any_case_and_dotted_names(tmp_path: Path) -> None:
    src = tmp_path / "names"
    src.mkdir()
    for i, (start, end, txt) in enumerate([("a.v2_start.png", "a.v2_end.png", "a.v2.txt"),
                                           ("B_Start.png", "B_END.png", "B.txt")]):  # fmt: skip
        target, [ref] = pair_images(i)
        target.save(src / end)
        ref.save(src / start)
        (src / txt).write_text(f"edit {i}")
    report = prepare([src], tmp_path / "out.zip", workers=1, progress=False)
    assert sorted((r["source"], r["text"]) for r in report.kept) == [("names/B_END.png", "edit 1"),
                                                                     ("names/a.v2_end.png", "edit 0")]  # fmt: skip
    assert report.ignored == report.unpaired == []


def test_several_references_are_numbered_from_start_2(layouts, tmp_path: Path) -> None:
    two = layouts["two"]
    report = prepare([two["start-end"]], tmp_path / "two.zip", workers=1, progress=False)
    via_control = prepare([two["control"]], tmp_path / "two_c.zip", controls=two["controls"], progress=False)
    assert entries(report.zip_path).keys() == entries(via_control.zip_path).keys()
    for row in report.kept:
        stem = row["file_name"][: -len("_end.png")]
        assert [r["file_name"] for r in row["references"]] == [f"{stem}_start.png", f"{stem}_start_2.png"]
        assert [r["source"].rsplit("_", 1)[-1] for r in row["references"]] == ["start.png", "2.png"]


def test_both_sides_are_normalized_and_a_bad_side_drops_the_pair(tmp_path: Path) -> None:
    src = tmp_path / "edits"
    src.mkdir()
    target, [ref] = pair_images(0)
    (src / "rot_start.jpg").write_bytes(rotated_jpeg(ref))  # stored sideways, EXIF says rotate
    rgba = target.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(src / "rot_end.png")
    (src / "rot.txt").write_text("make it pop")
    for i in (1, 2, 3):
        target, [ref] = pair_images(i)
        (target.resize((100, 80)) if i in (2, 3) else target).save(src / f"bad{i}_end.png")  # 2, 3: too small
        ref.save(src / f"bad{i}_start.png")
        (src / f"bad{i}.txt").write_text("make it pop")
    (src / "bad1_start.png").write_bytes(b"")
    (src / "bad3_start.png").write_bytes(b"GIF89a, then nothing")
    report = prepare([src], tmp_path / "out.zip", workers=2, progress=False)
    [row] = report.kept
    assert row["source"] == "edits/rot_end.png" and any(f.startswith("alpha composited") for f in row["flags"])
    [ref_row] = row["references"]
    assert (ref_row["width"], ref_row["height"]) == (300, 360)  # the rotation is baked into the pixels
    assert any(f.startswith("EXIF orientation 6") for f in ref_row["flags"])
    assert ref_row["file_name"].endswith("_start.jpg")
    skipped = {(s["source"], s["pair"]): s["reason"] for s in report.skipped}
    assert skipped[("edits/bad1_start.png", "edits/bad1_end.png")] == "reference: empty file (0 bytes)"
    assert skipped[("edits/bad2_end.png", "edits/bad2_end.png")].startswith("target: too small: 100x80")
    # Both sides of pair 3 are unusable: each is named.
    assert skipped[("edits/bad3_start.png", "edits/bad3_end.png")].startswith("reference: ")
    assert skipped[("edits/bad3_end.png", "edits/bad3_end.png")].startswith("target: too small")
    summary = format_summary(report)
    assert re.search(r"^pairs kept +1$", summary, re.M) and re.search(r"^pairs dropped +3$", summary, re.M)
    assert "edits/bad1_start.png: reference: empty file (0 bytes)" in summary


def test_unpaired_images_are_reported_by_name(tmp_path: Path) -> None:
    found = write_pair_layouts(tmp_path, count=2)
    start_end, targets, [control] = found["start-end"], found["control"], found["controls"]
    smooth(700).save(start_end / "lonely_start.png")
    smooth(701).save(start_end / "orphan_end.png")
    smooth(702).save(start_end / "gap_end.png")
    smooth(703).save(start_end / "gap_start_2.png")  # reference 2 without reference 1
    report = prepare([start_end], tmp_path / "a.zip", workers=1, progress=False)
    assert len(report.kept) == 2
    assert report.unpaired == [
        {"source": "start_end/gap_end.png", "reason": "target without its reference (no start_end/gap_start.*)"},
        {
            "source": "start_end/gap_start_2.png",
            "reason": "reference of an incomplete pair (no start_end/gap_start.*)",
        },
        {"source": "start_end/lonely_start.png", "reason": "reference without its target (no start_end/lonely_end.*)"},
        {"source": "start_end/orphan_end.png", "reason": "target without its reference (no start_end/orphan_start.*)"},
    ]
    assert "start_end/lonely_start.png: reference without its target" in format_summary(report)
    assert any("4 images could not be paired" in w and "start_end/orphan_end.png" in w for w in report.warnings)

    smooth(704).save(targets / "no_control.png")
    smooth(705).save(control / "no_target.jpg")
    report = prepare([targets], tmp_path / "b.zip", controls=[control], workers=1, progress=False)
    assert len(report.kept) == 2
    assert report.unpaired == [
        {"source": "control_1/no_target.jpg", "reason": "reference without its target (no targets/no_target.*)"},
        {"source": "targets/no_control.png", "reason": "target without its reference (no control_1/no_control.*)"},
    ]


def test_duplicate_targets_are_removed_and_shared_references_kept(tmp_path: Path) -> None:
    src = tmp_path / "dups"
    src.mkdir()
    target, [ref] = pair_images(0)
    other_target, _ = pair_images(1)
    target.save(src / "a_end.png")
    ref.save(src / "a_start.png")
    target.save(src / "b_end.bmp")  # the same target pixels with another reference: a duplicate
    smooth(800, (360, 300)).save(src / "b_start.png")
    other_target.save(src / "c_end.png")  # another target with the same reference as pair a: kept
    ref.save(src / "c_start.png")
    for name in "abc":
        (src / f"{name}.txt").write_text(f"edit {name}")
    report = prepare([src], tmp_path / "out.zip", workers=1, progress=False)
    assert sorted(r["source"] for r in report.kept) == ["dups/a_end.png", "dups/c_end.png"]
    assert report.duplicates == [
        {"source": "dups/b_end.bmp", "kept": "dups/a_end.png", "kind": "exact", "distance": 0}
    ]
    refs = {r["source"]: r["references"][0]["sha256"] for r in report.kept}
    assert refs["dups/a_end.png"] == refs["dups/c_end.png"]


def test_trigger_word_is_optional_and_added_once(layouts, tmp_path: Path) -> None:
    src = layouts["one"]["start-end"]
    plain = prepare([src], tmp_path / "plain.zip", workers=1, progress=False)
    assert sorted(r["text"] for r in plain.kept) == sorted(PAIR_INSTRUCTIONS)
    tok = prepare([src], tmp_path / "tok.zip", "TOK", workers=1, progress=False)
    assert sorted(r["text"] for r in tok.kept) == sorted(f"TOK, {t}" for t in PAIR_INSTRUCTIONS)
    zipped = entries(tok.zip_path)
    assert all(zipped[r["file_name"][: -len("_end.png")] + ".txt"].decode() == r["text"] for r in tok.kept)

    marked = tmp_path / "marked"
    marked.mkdir()
    for i, text in enumerate(["make it [trigger] style", "TOK: make it glow"]):
        target, [ref] = pair_images(i)
        target.save(marked / f"p{i}_end.png")
        ref.save(marked / f"p{i}_start.png")
        (marked / f"p{i}.txt").write_text(text)
    report = prepare([marked], tmp_path / "marked.zip", "TOK", workers=1, progress=False)
    assert sorted(r["text"] for r in report.kept) == ["TOK: make it glow", "make it TOK style"]
    with pytest.raises(FinetuneError, match=r"marked/p0_end.png use \[trigger\], but no --trigger-word") as err:
        prepare([marked], tmp_path / "none.zip", progress=False)
    assert err.value.exit_code == 2 and not (tmp_path / "none.zip").exists()


def test_a_pair_without_instruction_is_dropped_unless_a_template_is_given(layouts, tmp_path: Path) -> None:
    src = tmp_path / "mute"
    src.mkdir()
    for i in range(2):
        target, [ref] = pair_images(i)
        target.save(src / f"p{i}_end.png")
        ref.save(src / f"p{i}_start.png")
    (src / "p0.txt").write_text("make it brighter")
    report = prepare([src], tmp_path / "a.zip", workers=1, progress=False)
    assert [r["source"] for r in report.kept] == ["mute/p0_end.png"]
    assert report.skipped == [
        {
            "source": "mute/p1_end.png",
            "reason": "no instruction (no NAME.txt, caption or --caption-template)",
            "pair": "mute/p1_end.png",
        }
    ]
    assert "mute/p1_end.png: no instruction" in format_summary(report)
    report = prepare([src], tmp_path / "b.zip", "TOK", caption_template="[trigger] edit", workers=1, progress=False)
    texts = {r["source"]: (r["text"], r["caption_source"]) for r in report.kept}
    assert texts == {
        "mute/p0_end.png": ("TOK, make it brighter", "sidecar"),
        "mute/p1_end.png": ("TOK edit", "template"),
    }


def test_mixing_single_images_and_pairs_is_refused(layouts, tmp_path: Path, capsys) -> None:
    src = tmp_path / "mixed"
    src.mkdir()
    for path in layouts["one"]["start-end"].iterdir():
        (src / path.name).write_bytes(path.read_bytes())
    smooth(900).save(src / "holiday.png")
    out = tmp_path / "out" / "mixed.zip"
    assert cli("prepare", str(src), "-o", str(out), "--trigger-word", "TOK") == 2
    err = capsys.readouterr().err
    assert "never both" in err and "mixed/holiday.png" in err and "--pairs none" in err
    assert not out.exists() and not out.parent.exists()
    # Across sources too: a pair folder and a folder of single images.
    singles = tmp_path / "singles"
    singles.mkdir()
    smooth(901).save(singles / "one.png")
    assert cli("prepare", str(layouts["one"]["start-end"]), str(singles), "-o", str(out)) == 2
    assert "singles/one.png" in capsys.readouterr().err and not out.parent.exists()
    # --pairs none prepares every image as a single image, as before this feature.
    assert cli("prepare", str(src), "-o", str(out), "--trigger-word", "TOK", "--pairs", "none", "--workers", "1") == 0
    assert len(metadata(out)) == 7 and "pairs kept" not in capsys.readouterr().out


def test_cli_flags_end_to_end(layouts, tmp_path: Path, capsys) -> None:
    two = layouts["two"]
    out = tmp_path / "control.zip"
    args = ["prepare", str(two["control"]), "-o", str(out), "--workers", "1", "--no-progress"]
    assert cli(*args, "--control", str(two["controls"][0]), "--control", str(two["controls"][1])) == 0
    stdout = capsys.readouterr().out
    assert re.search(r"^pairs kept +2$", stdout, re.M) and str(out) in stdout
    names = sorted(entries(out))
    assert sum(n.endswith("_start_2.png") for n in names) == 2 and len(names) == 2 * 4 + 1

    pytest.importorskip("datasets")
    dataset = write_pair_dataset(tmp_path / "hfset", count=2, references=2)
    out2 = tmp_path / "columns.zip"
    columns = ["--image-column", "edited_image", "--control-column", "input_image", "--control-column",
               "input_image_2", "--caption-column", "edit_prompt"]  # fmt: skip
    assert cli("prepare", str(dataset), "-o", str(out2), "--trigger-word", "TOK", "--pairs", "columns", *columns) == 0
    report = json.loads(out2.with_suffix(".report.json").read_text())
    assert report["layout"] == "columns" and report["options"]["control_columns"] == ["input_image", "input_image_2"]
    assert sorted(entries(out2)) == names  # the same two pairs, whichever layout they came in
    assert sorted(r["text"] for r in report["kept"]) == sorted(f"TOK, {t}" for t in PAIR_INSTRUCTIONS[:2])

    usage = [
        ("--pairs", "sideways"),
        ("--pairs", "control"),
        ("--pairs", "columns"),
        ("--image-column", "edited_image"),
        ("--control", str(two["controls"][0]), "--control-column", "input_image"),
        ("--pairs", "start-end", "--control", str(two["controls"][0])),
        ("--autocaption", "some/model"),
    ]
    for extra in usage:
        assert cli("prepare", str(two["start-end"]), "-o", str(tmp_path / "x.zip"), *extra) == 2, extra
    assert cli("prepare", str(two["control"]), str(two["start-end"]), "--control", str(two["controls"][0]),
               "-o", str(tmp_path / "x.zip")) == 2  # fmt: skip
    assert cli("prepare", str(dataset), "--control-column", "nope", "-o", str(tmp_path / "x.zip")) == 2
    assert "no Image column 'nope'" in capsys.readouterr().err
    assert cli("prepare", str(two["start-end"]), "--control-column", "input_image", "-o", str(tmp_path / "x.zip")) == 2
    assert not (tmp_path / "x.zip").exists()


def test_dataset_rows_with_an_empty_side_are_unpaired_and_the_zip_loads_as_imagefolder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [pair_images(i) for i in range(3)]
    table = {
        "image": [rows[0][0], rows[1][0], None],
        "control": [rows[0][1][0], None, rows[2][1][0]],
        "instruction": ["make it brighter", "add a red border", "turn the sky purple"],
    }
    features = datasets.Features(
        {"image": datasets.Image(), "control": datasets.Image(), "instruction": datasets.Value("string")}
    )
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(tmp_path / "edits"))
    report = prepare([tmp_path / "edits"], tmp_path / "out.zip", control_columns=["control"], progress=False)
    assert [(r["source"], r["text"]) for r in report.kept] == [("edits/000000/image", "make it brighter")]
    assert [(u["source"], u["reason"]) for u in report.unpaired] == [
        ("edits/000001/image", "target without its reference (no edits/000001/control)"),
        ("edits/000002/control", "reference without its target (no edits/000002/image)"),
    ]
    # The rows name the target as file_name and the references as a list: datasets reads both as images.
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(report.zip_path).extractall(unpacked)
    loaded = datasets.load_dataset("imagefolder", data_dir=str(unpacked), split="train", cache_dir=str(tmp_path / "c"))
    assert loaded[0]["text"] == "make it brighter" and loaded[0]["image"].size == (360, 300)
    assert [ref["image"].size for ref in loaded[0]["references"]] == [(360, 300)]
