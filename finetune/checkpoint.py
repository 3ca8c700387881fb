"""Training checkpoints: one folder per step with the full state, written atomically, and finding one to resume.

A checkpoint ``<run>/checkpoints/step-000250/`` holds ``lora.safetensors`` (the LoRA contract, loadable on its own,
in the trained dtype, so it is also what a resume continues from), ``training_state.pt`` (optimizer, LR scheduler,
RNG states, step and data position) and the resolved ``config.yaml``. It is assembled in a hidden temporary folder
and renamed into place, so a run killed at any moment (ai-toolkit corrupts checkpoints on Ctrl-C,
reference/local-trainers.md §9) leaves either the whole checkpoint or none of it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from finetune.errors import FinetuneError
from finetune.files import atomic_dir
from finetune.lora import load_lora_file

__all__ = [
    "STATE_FILE",
    "checkpoint_dir",
    "latest_checkpoint",
    "load_training_state",
    "newest_run_with_checkpoint",
    "prune_checkpoints",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

STATE_FILE = "training_state.pt"
_STEP_RE = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def rng_state() -> dict[str, Any]:
    """Every global RNG a training step may touch (LoRA dropout draws from torch's)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path, step: int, state: dict[str, Any], write_lora: Callable[[Path], Any], config_text: str
) -> Path:
    """Write checkpoint ``step`` of ``run_dir`` atomically; ``write_lora(path)`` writes the LoRA file. Returns it."""
    final = checkpoint_dir(run_dir, step)
    if final.is_dir():  # a resumed run reaching a step it had already saved: the content is the same
        return final
    with atomic_dir(final) as tmp:
        write_lora(tmp / "lora.safetensors")
        torch.save({**state, "step": step}, tmp / STATE_FILE)
        (tmp / "config.yaml").write_text(config_text, encoding="utf-8")
        for f in tmp.iterdir():
            _fsync(f)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``run_dir`` (temporary folders are ignored)."""
    steps = _complete_checkpoints(run_dir)
    return steps[-1][1] if steps else None


def _complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in ``run_dir``, oldest first; temporary folders are skipped."""
    folder = Path(run_dir) / "checkpoints"
    return sorted(
        (int(m.group(1)), p)
        for p in (folder.iterdir() if folder.is_dir() else [])
        if (m := _STEP_RE.match(p.name)) and (p / STATE_FILE).is_file()
    )


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints of ``run_dir`` (0 keeps all); return the deleted folders.

    Each is renamed to a hidden name first, so a run killed mid-deletion never leaves a partial ``step-*`` folder
    that ``latest_checkpoint`` could pick; leftovers of an earlier interrupted deletion are removed too.
    """
    if keep <= 0:
        return []
    folder = Path(run_dir) / "checkpoints"
    removed = []
    for _, path in _complete_checkpoints(run_dir)[:-keep]:
        doomed = folder / f".del-{path.name}"
        os.replace(path, doomed)
        removed.append(path)
    for leftover in folder.glob(".del-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return removed


def newest_run_with_checkpoint(runs_root: Path, name: str) -> Path | None:
    """The newest ``<runs_root>/<name>-<timestamp>`` folder that holds a checkpoint (timestamps sort by time)."""
    root = Path(runs_root)
    candidates = sorted(root.glob(f"{name}-*")) if root.is_dir() else []
    for run in reversed(candidates):
        if latest_checkpoint(run) is not None:
            return run
    return None


def load_training_state(ckpt: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read checkpoint folder ``ckpt``: ``training_state.pt`` plus its LoRA under ``"lora"``; tensors land on
    ``device`` (RNG states on CPU)."""
    path = Path(ckpt) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file from another tool or version: say which one and what to do
        raise FinetuneError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); resume another run") from e
    if "lora" not in state:  # stored once, as the checkpoint's LoRA file (older checkpoints also held a copy here)
        state["lora"], _ = load_lora_file(Path(ckpt) / "lora.safetensors")
    if device != "cpu":
        state["lora"] = {k: v.to(device) for k, v in state["lora"].items()}
    return state


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, sharded: bool) -> dict:
    """The optimizer's state for a checkpoint. Under FSDP every process calls this: each LoRA parameter's state is
    gathered whole, keyed by parameter name (torch.distributed.checkpoint's full state dict), so a checkpoint does
    not depend on the process count; otherwise ``optimizer.state_dict()``."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, *, sharded: bool):
    """Load what ``optimizer_state`` wrote; under FSDP every process takes its shard of the whole state."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
