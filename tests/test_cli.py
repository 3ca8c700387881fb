import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.cli import main

ROOT = Path(__file__).parent.parent


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_help_is_fast_and_never_imports_torch():
    # CPU time of the whole process, not wall time: other jobs on a shared 2-core machine must not flake this.
    code = (
        "import sys, time; from finetune.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'; print(time.process_time())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "torch imported" not in proc.stderr
    assert float(proc.stdout.strip().splitlines()[-1]) < 0.5


def test_config_error_exits_2_without_torch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rnak: 3\n")
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from finetune.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "finally:\n    assert 'torch' not in sys.modules",
            "config",
            "show",
            str(bad),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "did you mean 'lora.rank'" in proc.stderr
    assert "AssertionError" not in proc.stderr
    assert time.perf_counter() - start < 5


def test_python_dash_m_and_config_show():
    proc = run("config", "show", str(ROOT / "configs" / "tiny-cpu.yaml"), "lora.rank=8")
    assert proc.returncode == 0, proc.stderr
    assert "rank: 8" in proc.stdout


def test_models_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    main_exit = pytest.raises(SystemExit)
    with main_exit as e:
        main(["models", "list"])
    assert e.value.code == 0
    assert "No models yet" in capsys.readouterr().out

    from finetune.registry import Registry

    src = tmp_path / "w.safetensors"
    src.write_bytes(b"abc")
    version = Registry().add_version("me/tok", src, {"base_model": "preset:tiny", "backend": "local"})
    with pytest.raises(SystemExit) as e:
        main(["models", "list"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "me/tok" in out and version.short_id in out
    with pytest.raises(SystemExit) as e:
        main(["models", "show", "me/tok"])
    assert e.value.code == 0 and version.id in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["models", "rm", "me/nope"])
    assert e.value.code == 2
    assert "no model 'me/nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["models", "rm", version.ref])
    assert e.value.code == 0
    assert Registry().models() == []
