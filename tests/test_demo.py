import json
import os
import re
import subprocess
import sys
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


# What the demo prints itself: its stage headers and indented details (demo.py), the closing summary, and the
# progress bars of prepare, train and eval, whose units are img and step; libraries count in it/s.
OUR_LINES = re.compile(
    r"\[\d/\d\] \S.*"  # a stage
    r"|  \S.*"  # a detail under a stage or in the summary
    r"|Done in \d+ s\. .*"
    r"|The model has random weights: .*"
    r"|(?:prepare|sampling)?:? *\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*(?:[\d.?]+(?:img|step)/s|s/(?:img|step))[^\]]*\]"
)
# Never ours, even where a line fits a pattern above.
FOREIGN = re.compile(r"transformers|diffusers|torchvision|torchao|_pytree|Warning|warn\(|deprecat|it/s|s/it|\.so\b")
LOG_PREFIX = "finetune log: "


def _ours(line: str) -> bool:
    """Whether ``line`` is blank, one of our log records, or fits ``OUR_LINES``, and names nothing ``FOREIGN``."""
    if FOREIGN.search(line):
        return False
    return not line.strip() or line.startswith(LOG_PREFIX) or OUR_LINES.fullmatch(line.rstrip()) is not None


@pytest.mark.slow
def test_demo_prints_nothing_from_a_library(tmp_path):
    """Every line `finetune demo` prints, on stdout and stderr, is ours: no library notice, warning or progress bar.

    The demo runs in a fresh process, so import-time output (torchao, transformers' torchvision notice) counts too.
    Our loggers get a prefix there, so our warnings (prepare's "only 8 images ...") are known without listing them.
    """
    script = (
        "import logging, sys\n"
        "handler = logging.StreamHandler(sys.stderr)\n"
        "handler.setLevel(logging.WARNING)\n"  # what Python prints when no handler is set (logging.lastResort)
        f"handler.setFormatter(logging.Formatter({LOG_PREFIX!r} + '%(message)s'))\n"
        "logging.getLogger('finetune').addHandler(handler)\n"
        "logging.getLogger('finetune').propagate = False\n"
        "from finetune.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    env = {**os.environ, "FINETUNE_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-c", script, "demo", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # A bar redraws after \r and a log line can follow it on the same line: split there too.
    lines = re.split(rf"[\r\n]|(?={LOG_PREFIX})", done.stdout + "\n" + done.stderr)
    foreign = [line for line in lines if not _ours(line)]
    assert foreign == [], "\n".join(foreign)
    assert any(line.startswith("[4/4] ") for line in lines) and any(line.startswith(LOG_PREFIX) for line in lines)
    assert any(re.search(r"\d+/\d+ \[.*step/s", line) for line in lines), "the training bar is recognised as ours"
