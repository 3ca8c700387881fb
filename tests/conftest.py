"""Shared fixtures. Each block says who uses it; append new blocks, don't reformat others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# ---- eval scorers (tests/test_metrics.py, tests/test_report.py, tests/test_evaluate.py) --------------------------


@pytest.fixture(scope="session")
def tiny_scorer_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(clip_dir, dino_dir): tiny random scorer models saved to disk once per session (loaded back by path)."""
    from finetune.metrics import save_tiny_scorers

    return save_tiny_scorers(tmp_path_factory.mktemp("scorers"))


# ---- dataset zips and FINETUNE_HOME (tests/test_dataset.py, test_cache.py, test_train_local.py) -------------------


def synthetic_image(index: int, width: int, height: int):
    """A deterministic, structured RGB image (a coloured disc on a gradient), different for each ``index``."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = width * (0.3 + 0.4 * ((index * 37) % 10) / 10), height * (0.3 + 0.4 * ((index * 53) % 10) / 10)
    disc = ((x - cx) ** 2 + (y - cy) ** 2) < (min(width, height) / 4) ** 2
    rgb = np.stack([x / width, y / height, np.full_like(x, (index % 5) / 5)], axis=-1) * 255
    rgb[disc] = [(index * 70) % 256, 200, (255 - index * 40) % 256]
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def write_dataset_zip(
    path: Path, sizes: list[tuple[int, int]], trigger_word: str = "TOK", extra: dict[str, bytes] | None = None
) -> Path:
    """Write a dataset zip following the contract (flat image + .txt + metadata.jsonl, sorted, fixed timestamps)."""
    import hashlib
    import io
    import zipfile

    entries: dict[str, bytes] = {}
    rows = []
    for i, (w, h) in enumerate(sizes):
        buf = io.BytesIO()
        synthetic_image(i, w, h).save(buf, format="PNG")
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        caption = f"a photo of {trigger_word}, picture {i}"
        entries[f"{digest[:16]}.png"] = data
        entries[f"{digest[:16]}.txt"] = caption.encode()
        rows.append(
            {"file_name": f"{digest[:16]}.png", "text": caption, "width": w, "height": h, "sha256": digest,
             "source": f"img{i}.png"}
        )  # fmt: skip
    rows.sort(key=lambda r: r["file_name"])
    entries["metadata.jsonl"] = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
    entries.update(extra or {})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(entries):
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), entries[name])
    return path


@pytest.fixture
def dataset_zip(tmp_path: Path) -> Path:
    """Six small images in three aspect ratios."""
    return write_dataset_zip(tmp_path / "data.zip", [(48, 48), (64, 48), (48, 64), (40, 40), (64, 48), (56, 56)])


@pytest.fixture
def finetune_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty $FINETUNE_HOME (registry and cache) for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("FINETUNE_HOME", str(home))
    return home


# ---- FLUX presets (tests/test_flux.py and every test that needs a tiny FLUX on disk) ------------------------------


@pytest.fixture(scope="session")
def tiny_preset_dir(tmp_path_factory) -> Path:
    """preset:tiny (seed 0) saved once per session as a diffusers folder; load it by path (read-only: don't edit)."""
    from finetune.models.flux1 import save_preset

    return save_preset("tiny", tmp_path_factory.mktemp("flux") / "tiny")


# ---- Replicate stand-in (tests/test_replicate.py, test_train_remote.py, test_webhooks.py, remote eval, notebooks) ---


@pytest.fixture
def replicate_stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The Replicate stand-in (tests/replicate_stub.py) serving on 127.0.0.1 for one test.

    REPLICATE_API_TOKEN and REPLICATE_BASE_URL point at it, the remote recipe polls every 20 ms, FINETUNE_HOME is
    empty and the working directory is ``tmp_path`` (run folders land in ``tmp_path/runs``).
    """
    from replicate_stub import ReplicateStub

    import finetune.recipes.train_remote as train_remote_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(train_remote_module, "POLL_INTERVAL", 0.02)
    monkeypatch.setattr(train_remote_module, "POLL_MAX_INTERVAL", 0.05)
    with ReplicateStub() as stub:
        monkeypatch.setenv("REPLICATE_API_TOKEN", stub.token)
        monkeypatch.setenv("REPLICATE_BASE_URL", stub.url)
        yield stub


# ---- tests that train (test_train_local, test_train_flux3, test_ema, test_preservation, test_training_data) -------


@pytest.fixture
def one_thread():
    """One torch thread for the test: bitwise comparisons need one thread count, and one is also fastest for the
    presets' toy sizes on a busy box. Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
