"""`finetune env`: the machine's figures and what trains on it, on this CPU and with faked GPUs (issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from finetune import env, models

GIB = 2**30


def fake_gpus(monkeypatch, *memories_gib: float, name: str = "NVIDIA GeForce RTX 4060 Ti") -> None:
    """CUDA as torch would report these GPUs: only the device-property calls ``env`` and ``resolve_quantize`` make."""
    props = [SimpleNamespace(name=name, total_memory=int(m * GIB), major=8, minor=9) for m in memories_gib]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(props))
    index = lambda d: d if isinstance(d, int) else (torch.device(d).index or 0)  # noqa: E731
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props[index(d)])


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    return tmp_path


def test_cpu_machine_figures_and_plan(clean_env):
    info = env.collect()
    assert info["packages"]["torch"] == torch.__version__ and info["packages"]["diffusers"]
    assert info["gpus"] == [] and not info["hf_logged_in"] and not info["replicate_token_set"]
    assert info["disk_free_gib"]["FINETUNE_HOME"]["free_gib"] > 0
    assert set(info["extras"]) == {"quantize", "tensorboard", "wandb", "prodigy", "bnb", "heif"}
    lines = env.plan(info["gpus"], env.transformer_sizes())
    assert [line["fits"] for line in lines] == ["no"] * len(env.BASE_MODELS)
    assert [line["base_model"] for line in lines[:3]] == [m for m, _ in env.BASE_MODELS[:3]]
    # Replicate trains FLUX.1 [dev] and Kontext, not FLUX.2
    assert ["Replicate" in line["how"] for line in lines[:3]] == [True, True, False]
    text = env.format_report(info, lines)
    assert "GPU: none visible" in text and "FLUX.2 [klein] 9B" in text


def test_logins_and_cached_repos_are_reported_but_never_the_secrets(clean_env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_secret_value_456")
    (clean_env / "hf" / "models--black-forest-labs--FLUX.2-klein-base-4B").mkdir(parents=True)
    info = env.collect()
    assert info["hf_logged_in"] and info["replicate_token_set"]
    assert info["black_forest_labs_cached"] == ["black-forest-labs/FLUX.2-klein-base-4B"]
    out = json.dumps(info) + env.format_report(info, env.plan(info["gpus"], env.transformer_sizes()))
    assert "secret_value" not in out


@pytest.mark.parametrize(
    "memories, expected",
    [
        # one 16 GB card: both klein fit in int8 with checkpointing; FLUX.1 and FLUX.2 [dev] do not
        ((16,), {"FLUX.1 [dev]": "no", "FLUX.2 [klein] 4B": "int8", "FLUX.2 [klein] 9B": "int8",
                 "FLUX.2 [dev]": "no"}),
        ((24,), {"FLUX.1 [dev]": "int8", "FLUX.2 [klein] 4B": "bf16", "FLUX.2 [klein] 9B": "int8",
                 "FLUX.2 [dev]": "no"}),
        ((48,), {"FLUX.1 [dev]": "bf16", "FLUX.2 [klein] 4B": "bf16", "FLUX.2 [klein] 9B": "bf16",
                 "FLUX.2 [dev]": "int8"}),
        ((80,), {"FLUX.1 [dev]": "bf16", "FLUX.2 [klein] 4B": "bf16", "FLUX.2 [klein] 9B": "bf16",
                 "FLUX.2 [dev]": "bf16"}),
        ((24,) * 8, {"FLUX.1 [dev]": "int8", "FLUX.2 [klein] 4B": "bf16", "FLUX.2 [klein] 9B": "int8",
                     "FLUX.2 [dev]": "sharded"}),
    ],
)  # fmt: skip
def test_gpu_plan_follows_the_quantize_rule(clean_env, monkeypatch, memories, expected):
    fake_gpus(monkeypatch, *memories)
    info = env.collect()
    assert [g["memory_gib"] for g in info["gpus"]] == list(memories)
    assert info["gpus"][0]["compute_capability"] == "8.9"
    lines = {line["label"]: line for line in env.plan(info["gpus"], env.transformer_sizes())}
    for label, how in expected.items():
        line = lines[label]
        if how in ("bf16", "int8"):
            assert line["fits"] == "yes" and line["how"].startswith(how), line
            # the same choice train.quantize: auto makes on this GPU
            family = models.family_for(line["base_model"])
            auto = models.resolve_quantize("auto", "cuda:0", weights_gib=family.transformer_gib(line["base_model"]))
            assert (auto or "bf16") == how
        else:
            assert line["fits"] == how, line
    assert "int8 + gradient checkpointing on this 16 GiB" in env.format_report(info, list(lines.values())) or (
        memories != (16,)
    )


def test_cli_env_and_json(clean_env):
    text = subprocess.run([sys.executable, "-m", "finetune", "env"], capture_output=True, text=True, check=True)
    assert "What trains here" in text.stdout and text.stderr == ""
    out = subprocess.run([sys.executable, "-m", "finetune", "env", "--json"], capture_output=True, text=True)
    doc = json.loads(out.stdout)
    assert out.returncode == 0 and {"packages", "gpus", "plan", "extras"} <= set(doc)
