"""The GPU check runs end to end (its CPU dry run), so the one device call a lent GPU gets is not wasted on a bug."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run_measures_every_section(tmp_path):
    out = tmp_path / "summary.json"
    env = {**os.environ, "FINETUNE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu-dry-run", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(out.read_text())
    sections = {k: v for k, v in summary.items() if isinstance(v, dict)}
    assert not {k: v["error"] for k, v in sections.items() if "error" in v}
    for kind in ("peft", "fused", "compiled"):
        assert sections[f"eager_{kind}_64"]["s_per_step_median"] > 0
        assert sections[f"dev_blocks_{kind}_64"]["s_per_step_median"] > 0
    assert sections["trainer_64"]["steps"] == sections["trainer_compiled_64"]["steps"] == 20
    for name in ("klein_4b", "klein_9b", "dev"):
        for weights in ("bf16", "int8"):
            runs = sections[f"flux2_{name}_{weights}_64"]["runs"]
            assert all(run["s_per_step_median"] > 0 for run in runs.values())
            assert "estimated_weight_gib" in sections[f"flux2_{name}_{weights}_64"]
    for section in ("flux3_klein_bf16_64", "flux3_klein_int8_64", "flux2_edit_klein_4b_int8_64",
                    "flux2_edit_klein_9b_int8_64", "flux3_edit_klein_int8_64"):  # fmt: skip
        assert all(run["s_per_step_median"] > 0 for run in sections[section]["runs"].values())
        assert "estimated_weight_gib" in sections[section]
