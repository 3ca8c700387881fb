import io
import tarfile
from pathlib import Path

import pytest
from replicate_stub import LORA_MEMBER, lora_safetensors

from finetune.errors import FinetuneError
from finetune.replicate_trainer import extract_lora, parse_progress


def test_progress_lines_parse():
    line = "flux_train_replicate:  12%|█▏        | 120/1000 [01:23<10:12,  1.44s/it, lr: 4.0e-04 loss: 3.2e-01]"
    assert parse_progress(line) == {"step": 120, "total": 1000, "elapsed": "01:23", "eta": "10:12", "rate": "1.44s/it"}
    assert parse_progress("Loading Flux model") is None


def _tar(tmp_path: Path, members: dict[str, bytes]) -> Path:
    path = tmp_path / "w.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_lora_is_safe(tmp_path):
    lora = lora_safetensors(1)
    ok = _tar(tmp_path, {LORA_MEMBER: lora, "output/flux_train_replicate/config.yaml": b"x"})
    assert extract_lora(ok, tmp_path / "l.safetensors").read_bytes() == lora
    with pytest.raises(FinetuneError, match="unsafe"):
        extract_lora(_tar(tmp_path, {"../../evil.safetensors": lora}), tmp_path / "e.safetensors")
    with pytest.raises(FinetuneError, match="exactly one"):
        extract_lora(_tar(tmp_path, {"a.safetensors": lora, "b.safetensors": lora}), tmp_path / "e.safetensors")
    with pytest.raises(FinetuneError, match="limit"):
        extract_lora(_tar(tmp_path, {LORA_MEMBER: lora}), tmp_path / "e.safetensors", max_bytes=100)
    with pytest.raises(FinetuneError, match="not a valid safetensors"):
        extract_lora(_tar(tmp_path, {LORA_MEMBER: b"\xff" * 64}), tmp_path / "e.safetensors")
    assert not (tmp_path / "e.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.safetensors", "w.tar"]  # no temp file left behind
