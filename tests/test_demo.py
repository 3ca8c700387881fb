import json
import zipfile

import pytest

from finetune.cli import main
from finetune.registry import Registry


@pytest.mark.slow
def test_demo_produces_every_artefact_and_the_loss_falls(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(out)])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out

    images = sorted(p.name for p in (out / "images").iterdir())
    assert len([n for n in images if n.endswith(".png")]) == 8
    with zipfile.ZipFile(out / "dataset.zip") as zf:
        names = zf.namelist()
        assert "metadata.jsonl" in names
        captions = [zf.read(n).decode() for n in names if n.endswith(".txt")]
    assert len(captions) == 8 and all("SHPZ" in c for c in captions)

    version = Registry().resolve("demo/shapes-tiny")
    assert version.ref in printed
    assert version.lineage["dataset"]["digest"]
    assert (out / "run" / "metrics.jsonl").is_file()

    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    fifth = len(losses) // 5
    assert sum(losses[-fifth:]) / fifth < 0.9 * sum(losses[:fifth]) / fifth
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < 0.9 * val[0]

    report = out / "report"
    for name in ("grid.png", "index.html", "metrics.json"):
        assert (report / name).is_file(), name
    doc = json.loads((report / "metrics.json").read_text())
    assert len(doc["versions"]) == 2
    assert Registry().resolve("demo/shapes-tiny").info["evals"], "the eval summary is appended to the version"
