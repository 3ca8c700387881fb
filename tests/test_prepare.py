"""finetune prepare end to end: the zip contract, determinism, atomicity, sources, CLI exit codes, autocaption."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prepare_fixtures import build_kitchen_sink, smooth, write_tiny_blip, zip_bomb

from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.recipes import prepare as prepare_module
from finetune.recipes.prepare import prepare

REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under root: proves the source is never modified."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("src") / "sink"
    return root, build_kitchen_sink(root)


@pytest.fixture(scope="module")
def sink_run(sink, tmp_path_factory: pytest.TempPathFactory):
    root, cases = sink
    before = snapshot(root)
    out = tmp_path_factory.mktemp("out") / "tok.zip"
    report = prepare([root], out, "TOK", workers=2, progress=False)
    return report, cases, before


def test_every_fixture_case_lands_where_the_issue_says(sink_run) -> None:
    report, cases, _ = sink_run
    kept = {r["source"]: r for r in report.kept}
    skipped = {s["source"]: s["reason"] for s in report.skipped}
    dups = {d["source"]: d for d in report.duplicates}
    ignored = {i["source"]: i["reason"] for i in report.ignored}
    for case in ("rotated", "rgba", "la", "palette", "cmyk", "grey16", "animated", "icc", "nested", "upper", "bom"):
        assert cases[case] in kept, case
    for case in ("truncated", "empty", "text_as_jpg", "bomb", "tiny"):
        assert cases[case] in skipped, case
    assert dups[cases["exact_dup"]] == {"source": cases["exact_dup"], "kept": cases["exact_kept"], "kind": "exact",
                                        "distance": 0}  # fmt: skip
    assert dups[cases["near_dup"]]["kept"] == cases["near_kept"] and dups[cases["near_dup"]]["kind"] == "near"
    assert kept[cases["near_kept"]]["width"] == 800  # the higher-resolution copy is the one kept
    assert {r.split("/", 1)[1] for r in ignored} == {"._photo.jpg", ".DS_Store", "Thumbs.db", "__MACOSX/._rotated.jpg",
                                                     "readme.pdf"}  # fmt: skip
    assert any(f.startswith("animated") for f in kept[cases["animated"]]["flags"])
    assert kept[cases["rotated"]]["width"] == 300 and kept[cases["rotated"]]["height"] == 400
    captions = {case: (kept[cases[case]]["text"], kept[cases[case]]["caption_source"]) for case in cases if
                cases[case] in kept}  # fmt: skip
    assert captions["bom"] == ("TOK, caption with a BOM second line", "sidecar")
    assert captions["upper"] == ("uppercase caption with TOK inside", "sidecar")
    assert captions["double_ext"] == ("TOK, the double extension caption", "sidecar")
    assert captions["dot_caption"] == ("a TOK kohya caption", "sidecar")
    assert captions["metadata"] == ("from metadata TOK here", "metadata")
    assert captions["missing_caption"] == ("a photo of TOK", "template")
    assert report.caption_sources == {"metadata": 1, "sidecar": 4, "template": len(kept) - 5}


def test_zip_follows_the_contract(sink_run) -> None:
    report, _, _ = sink_run
    with zipfile.ZipFile(report.zip_path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names) and all("/" not in n for n in names)
        assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
        rows = [json.loads(line) for line in zf.read("metadata.jsonl").decode().splitlines()]
        assert [list(r) for r in rows] == [["file_name", "text", "width", "height", "sha256", "source"]] * len(rows)
        assert len(rows) == len(report.kept) and len(names) == 2 * len(rows) + 1
        for row in rows:
            payload = zf.read(row["file_name"])
            assert hashlib.sha256(payload).hexdigest() == row["sha256"]
            stem, ext = row["file_name"].rsplit(".", 1)
            assert ext in ("jpg", "png") and len(stem) == 16
            caption = zf.read(f"{stem}.txt").decode("utf-8")
            assert caption == row["text"] and "\n" not in caption and "TOK" in caption
            assert not caption.startswith("\ufeff")
            with Image.open(io.BytesIO(payload)) as im:
                assert im.mode == "RGB" and im.size == (row["width"], row["height"])
                assert 0x0112 not in im.getexif() and "icc_profile" not in im.info
    on_disk = json.loads(report.report_path.read_text())
    assert on_disk["digest"] == report.digest == hashlib.sha256(report.zip_path.read_bytes()).hexdigest()
    assert report.report_path == report.zip_path.with_suffix(".report.json")


def test_same_inputs_give_identical_bytes_and_sources_are_untouched(sink, sink_run, tmp_path: Path) -> None:
    root, _ = sink
    report, _, before = sink_run
    relative = os.path.relpath(root)  # another spelling of the same source, one worker instead of two
    again = prepare([relative], tmp_path / "again.zip", "TOK", workers=1, progress=False)
    assert again.zip_path.read_bytes() == report.zip_path.read_bytes() and again.digest == report.digest
    assert snapshot(root) == before


def test_several_sources_zip_and_datasets_folder(sink, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    root, _ = sink
    archive = tmp_path / "phone.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, name in enumerate(["DCIM/one.jpg", "DCIM/two.png"]):
            buf = io.BytesIO()
            smooth(200 + i, (500, 400)).save(buf, "JPEG" if name.endswith("jpg") else "PNG")
            zf.writestr(name, buf.getvalue())
        zf.writestr("DCIM/one.txt", "zip sidecar [trigger]")
        zf.writestr("__MACOSX/DCIM/._one.jpg", b"\0\5\26\7")
    images = [smooth(300 + i, (360, 300)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": images, "text": ["hf row zero", None, "hf row two"]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hfset"))

    report = prepare([archive, tmp_path / "hfset", root / "nested"], tmp_path / "all.zip", "ohwx", progress=False)
    kept = {r["source"]: r for r in report.kept}
    assert kept["phone.zip/DCIM/one.jpg"]["text"] == "zip sidecar ohwx"
    assert kept["phone.zip/DCIM/two.png"]["caption_source"] == "template"
    assert kept["hfset/000000"]["text"] == "ohwx, hf row zero" and kept["hfset/000000"]["caption_source"] == "metadata"
    assert kept["hfset/000001"]["text"] == "a photo of ohwx"
    assert kept["nested/meta.png"]["text"] == "from metadata ohwx here"
    assert {"source": "phone.zip/__MACOSX/DCIM/._one.jpg", "reason": "macOS archive metadata (__MACOSX/)"} in (
        report.ignored
    )

    # The same zip loads as a datasets imagefolder, captions in the text column.
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(report.zip_path).extractall(unpacked)
    loaded = datasets.load_dataset("imagefolder", data_dir=str(unpacked), split="train", cache_dir=str(tmp_path / "c"))
    assert sorted(loaded["text"]) == sorted(r["text"] for r in report.kept)


def test_hostile_and_bomb_zips_fail_cleanly(tmp_path: Path) -> None:
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../evil.txt", "owned")
    for source, message in ((evil, "'../evil.txt'"), (zip_bomb(tmp_path / "bomb.zip"), "zip bomb")):
        with pytest.raises(FinetuneError, match=message) as err:
            prepare([source], tmp_path / "out.zip", "TOK", progress=False)
        assert err.value.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.zip", "evil.zip"]


def test_warnings_common_word_small_images_and_zip_size(sink, tmp_path: Path, monkeypatch) -> None:
    root, _ = sink
    monkeypatch.setattr(prepare_module, "REPLICATE_UPLOAD_LIMIT", 1000)
    report = prepare([root / "nested"], tmp_path / "dog.zip", "dog", workers=1, progress=False)
    text = "\n".join(report.warnings)
    assert "common English word 'dog'" in text
    assert "short side below 1024" in text
    assert "over Replicate's 100 MiB Files API limit; shrink it with --max-side 1024" in text
    assert "only 3 images" in text
    assert all(len(re.findall(r"\bdog\b", r["text"])) == 1 for r in report.kept)


def test_cli_exit_codes_and_summary(sink, tmp_path: Path, capsys) -> None:
    root, _ = sink

    def cli(*args: str) -> int:
        with pytest.raises(SystemExit) as done:
            main(list(args))
        return done.value.code

    out = tmp_path / "cli.zip"
    assert cli("prepare", str(root / "nested"), "--trigger-word", "TOK", "-o", str(out), "--workers", "1") == 0
    stdout = capsys.readouterr().out
    assert "kept" in stdout and str(out) in stdout and out.is_file()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_text("not a jpeg")
    smooth(1, (100, 100)).save(bad / "small.png")
    assert cli("prepare", str(bad), "--trigger-word", "TOK", "-o", str(tmp_path / "none.zip")) == 1
    assert "no usable image left" in capsys.readouterr().err and not (tmp_path / "none.zip").exists()
    usage = [
        ("prepare", str(tmp_path / "missing"), "--trigger-word", "TOK", "-o", str(out)),
        ("prepare", str(root / "nested"), "--trigger-word", "TOK", "-o", str(tmp_path / "x.tar")),
        ("prepare", str(root / "nested"), "--trigger-word", "TOK", "-o", str(out), "--background", "nope"),
        ("prepare", str(root / "nested"), "--trigger-word", "  ", "-o", str(out)),
        ("prepare", str(root / "nested"), "-o", str(out)),
    ]
    for args in usage:
        assert cli(*args) == 2, args
    assert "does not exist" in capsys.readouterr().err


def test_missing_heif_plugin_is_a_skip_naming_the_extra(tmp_path: Path) -> None:
    import pillow_heif

    pillow_heif.register_heif_opener()
    src = tmp_path / "phone"
    src.mkdir()
    smooth(1, (320, 300)).save(src / "IMG_0001.HEIC", quality=90)
    smooth(2, (320, 300)).save(src / "ok.png")
    shim = tmp_path / "shim"
    (shim / "pillow_heif").mkdir(parents=True)
    (shim / "pillow_heif" / "__init__.py").write_text("raise ImportError('pillow_heif hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{REPO}"}
    out = tmp_path / "out.zip"
    cmd = [sys.executable, "-m", "finetune", "prepare", str(src), "--trigger-word", "TOK", "-o", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["skipped"] == [
        {
            "source": "phone/IMG_0001.HEIC",
            "reason": "HEIC/HEIF needs the optional plugin: pip install 'finetune[heif]'",
        }
    ]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_leaves_no_file_at_out(tmp_path: Path, sig: int) -> None:
    src = tmp_path / "noise"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):  # incompressible pixels make the zip ~30 MB, so the write takes long enough to hit
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(
            src / f"{i:02d}.png", compress_level=1
        )
    out = tmp_path / "out" / "set.zip"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "finetune", "prepare", str(src), "--trigger-word", "TOK", "-o", str(out)]
    proc = subprocess.Popen([*cmd, "--no-progress", "--near-dup-distance", "-1"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [p for p in out.parent.glob(".set.zip.*.tmp") if p.stat().st_size > 0]
        if partial:
            proc.send_signal(sig)
            break
        time.sleep(0.001)
    else:
        pytest.fail(f"the run ended (rc={proc.returncode}) before its zip write was seen; make the fixture bigger")
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    if sig == signal.SIGINT:  # a clean interrupt also removes its temporary zip and work folder
        assert proc.returncode == 130 and list(out.parent.iterdir()) == []


@pytest.mark.slow
def test_autocaption_fills_missing_captions_with_a_real_model(tmp_path: Path) -> None:
    model = write_tiny_blip(tmp_path / "tiny-blip")
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(3):
        smooth(400 + i, (320, 300)).save(src / f"{i}.png")
    (src / "0.txt").write_text("my own caption", encoding="utf-8")
    report = prepare([src], tmp_path / "out.zip", "TOK", autocaption=str(model), workers=1, progress=False)
    by_source = {r["source"]: r for r in report.kept}
    assert by_source["photos/0.png"]["caption_source"] == "sidecar"
    for name in ("photos/1.png", "photos/2.png"):
        row = by_source[name]
        assert row["caption_source"] == "autocaption" and row["text"].startswith("TOK, ") and len(row["text"]) > 5
    with pytest.raises(FinetuneError, match="could not be loaded") as err:
        prepare([src], tmp_path / "x.zip", "TOK", autocaption=str(tmp_path / "no-such-model"), progress=False)
    assert err.value.exit_code == 2 and not (tmp_path / "x.zip").exists()
