"""Train on Replicate from the same config, follow it, and import the result as a registry version.

``train_remote(cfg)`` reads top to bottom: choose the trainer for the base model → check the dataset zip's layout
→ map the config onto the trainer's inputs → list what cannot be honoured → validate against the trainer version's
``TrainingInput`` schema → ensure the destination model → upload the dataset zip → create the training (run state
written at once) → follow it → download the weights (a tar or the LoRA file) → extract ``lora.safetensors`` →
register. ``attach(training_id)`` follows any training of the account and imports it.

The trainers. FLUX.1 [dev] trains on ``ostris/flux-dev-lora-trainer`` (reference/replicate-api.md §9); FLUX.1
Kontext [dev] edit LoRAs on ``replicate/fast-flux-kontext-trainer`` (a pair zip; reference/flux-family-2026.md §3,
where a third party reports it failing on every request); Replicate has no FLUX.2 trainer, so a FLUX.2 base stops
before any request unless ``remote.trainer`` names a trainer model of the user's own. Such a trainer gets the
dataset and ``remote.inputs`` only; ``remote.inputs`` reaches every trainer, checked against its schema.

The run folder. ``train.output_dir`` when set, else ``runs/<name>-remote-<key>`` where ``key`` is the first 12 hex of
sha256(resolved config + dataset digest): the same command on the same data always finds the same folder, so a rerun
re-attaches to the training recorded there (or reports the version it already produced) instead of paying twice;
change the config or the data and you get a new folder. ``remote.json`` in it holds the run state (trainer and
version, destination, inputs without secrets and their digest, the uploaded file, the training id, status, timings);
it is rewritten atomically after every step, before the step's effect could be lost.

No duplicate paid jobs: the create request is never retried after it was sent. When its answer is lost, the recipe
lists recent trainings and matches the uploaded file's URL (unique per upload), the trainer and its version; found,
it follows that training; not found, it stops and says so, and a rerun checks again before it submits.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune import models
from finetune.config import ENV_VALUE_RE, Config, config_to_dict
from finetune.errors import EXIT_FAILURE, EXIT_USAGE, FinetuneError
from finetune.files import sha256_file, write_atomic
from finetune.replicate import (
    FAILED_STATUSES,
    MAX_UPLOAD_BYTES,
    TERMINAL_STATUSES,
    AmbiguousRequestError,
    Replicate,
    ReplicateError,
)
from finetune.replicate_trainer import (
    KONTEXT_BASE,
    KONTEXT_TRAINER,
    RUNS_ROOT,
    SECRET_INPUTS,
    STATE_FILE,
    ZipLayout,
    extract_lora,
    find_run_dir,
    inspect_zip,
    is_secret_input,
    lora_rank_of,
    parse_progress,
    validate_inputs,
)

if TYPE_CHECKING:
    from finetune.registry import Registry, Version

__all__ = [
    "POLL_INTERVAL",
    "POLL_MAX_INTERVAL",
    "attach",
    "choose_trainer",
    "find_run_dir",
    "map_inputs",
    "run_dir_for",
    "train_remote",
]

POLL_INTERVAL = 5.0  # seconds between status requests while processing (≤ 1 request / 2 s on average)
POLL_MAX_INTERVAL = 15.0  # seconds; while `starting` (queue/cold boot) the interval backs off up to this
COLD_BOOT_NOTICE_S = 60.0  # `starting` longer than this is a cold boot: say so once
LOG_TAIL_LINES = 20  # log lines shown with a failure
DEV_BASE = "black-forest-labs/FLUX.1-dev"
DEFAULT_TRAINER = "ostris/flux-dev-lora-trainer"  # the config's remote.trainer default: FLUX.1 [dev] LoRAs
# How the config maps onto a trainer's inputs: ostris' inputs, the Kontext trainer's, or (any other trainer model,
# a user's own) the dataset and remote.inputs only.
OSTRIS, KONTEXT, OWN = "ostris", "kontext", "own"
TRAINER_BASES = {DEFAULT_TRAINER: DEV_BASE, KONTEXT_TRAINER: KONTEXT_BASE}  # what each known trainer trains
REPLICATE_TRAINS = f"FLUX.1 [dev] ({DEFAULT_TRAINER}) and FLUX.1 Kontext [dev] edit LoRAs ({KONTEXT_TRAINER})"
DATASET_INPUT = "input_images"  # the zip input of Replicate's trainers (and the name a user's trainer should use)
# remote.* settings about where and how the training runs, honoured by every trainer.
REMOTE_SETTINGS = {
    "remote.trainer",
    "remote.destination",
    "remote.hardware",
    "remote.webhook",
    "remote.webhook_events",
}
PLACEHOLDER_URL = "https://example.invalid/dataset.zip"  # validates the input before the real URL exists
# Settings with no effect on the result when training remotely: never reported.
LOCAL_ONLY = {
    "train.device",
    "train.cache_dir",
    "train.output_dir",
    "train.compile",
    "train.keep_checkpoints",
    "lora.save_dtype",  # the registered file is the trainer's own
    "train.allow_distilled",  # FLUX.2 [klein] only; the remote trainer trains FLUX.1-dev
    "backend",
    "output",
    "dataset",
}
# Issue 16's training features (key prefix → what it is): no Replicate trainer has them; set, they are reported.
LOCAL_TRAINING_FEATURES = {
    "train.preservation.": "differential output preservation",
    "train.regularization.": "regularisation images",
    "train.ema.": "EMA of the LoRA weights",
    "train.validation.": "held-out validation",
    "train.flip": "horizontal flip",
}
# Settings the trainer fixes; setting them explicitly to these values is honoured (ai-toolkit train.py, ref. §9.1).
TRAINER_FIXED = {
    "train.lr_scheduler": "constant",
    "train.warmup_steps": 0,
    "train.gradient_accumulation": 1,
    "lora.dropout": 0.0,
    "lora.targets": "all-linear",
    "train.mixed_precision": "bf16",
    "train.dtype": "bfloat16",
    "train.quantize": "auto",  # flux-fine-tuner quantizes by its own GPU's memory (reference/local-trainers.md)
}


def _say(message: str = "") -> None:
    print(message, flush=True)


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _strip_secrets(inputs: dict, props: dict | None = None) -> dict:
    """The inputs without secrets: known ones, names that say so, and those the trainer's schema ``props`` marks."""
    props = props or {}
    return {k: v for k, v in (inputs or {}).items() if not is_secret_input(k, props.get(k))}


def _shown(name: str, value: Any, props: dict | None = None) -> str:
    """``name=value`` for output, the value masked when the input is a secret."""
    return f"{name}=***" if is_secret_input(name, (props or {}).get(name)) else f"{name}={value!r}"


def _config_record(cfg: Config) -> dict:
    """The resolved config as stored in the run folder and the lineage: without secret remote.inputs, and without the
    remote keys added for edit LoRAs while they are empty (so run folders made before them keep their key)."""
    record = config_to_dict(cfg)
    remote = record["remote"]
    remote["inputs"] = _strip_secrets(remote["inputs"])
    for key in ("instruction", "inputs"):
        if not remote[key]:
            del remote[key]
    return record


# ---- config → trainer inputs (pure) ------------------------------------------------------------------------------


def _trainer_kind(trainer: str) -> str:
    """``ostris``, ``kontext`` or ``own`` for a ``remote.trainer`` value (pinned or not)."""
    return {DEFAULT_TRAINER: OSTRIS, KONTEXT_TRAINER: KONTEXT}.get(trainer.split(":", 1)[0], OWN)


def choose_trainer(cfg: Config) -> tuple[str, str]:
    """``(trainer, kind)`` for the config's base model; raises (exit 2, before any request) when the trainer would
    train another model than the config names.

    ``remote.trainer`` left at its default becomes the Kontext trainer for a FLUX.1 Kontext base. A FLUX.2 or FLUX 3
    base has no Replicate trainer: only a trainer model of the user's own is let through (reference/
    flux-family-2026.md §3).
    """
    family = models.family_name(cfg.base_model)
    trainer = cfg.remote.trainer
    if family == "kontext" and trainer == DEFAULT_TRAINER:
        trainer = KONTEXT_TRAINER
    kind = _trainer_kind(trainer)
    if family in ("flux2", "flux3") and kind != OWN:
        label = {"flux2": "FLUX.2", "flux3": "FLUX 3"}[family]
        raise FinetuneError(
            f"backend: replicate: base_model {cfg.base_model} is {label}, and Replicate has no {label} LoRA trainer "
            f"today: its trainers train {REPLICATE_TRAINS} only, so {trainer.split(':', 1)[0]} would train another "
            f"model than this config names. Train {label} locally (backend: local; `finetune env` says how it fits "
            f"this machine), or set remote.trainer to a Replicate trainer model that trains {label} (your own Cog "
            "trainer, for example) and pass its settings as remote.inputs.NAME.",
            EXIT_USAGE,
        )
    if family == "kontext" and kind == OSTRIS:
        raise FinetuneError(
            f"remote.trainer: {trainer} trains FLUX.1 [dev] text-to-image LoRAs, but base_model {cfg.base_model} is "
            f"FLUX.1 Kontext. Set remote.trainer: {KONTEXT_TRAINER} (or leave it at its default, which picks it).",
            EXIT_USAGE,
        )
    if family != "kontext" and kind == KONTEXT:
        raise FinetuneError(
            f"remote.trainer: {trainer} trains FLUX.1 Kontext [dev] edit LoRAs, but base_model {cfg.base_model} is "
            f"not FLUX.1 Kontext. Set base_model: {KONTEXT_BASE} to train an edit LoRA on a pair zip, or leave "
            f"remote.trainer at its default ({DEFAULT_TRAINER}) for a FLUX.1 [dev] LoRA.",
            EXIT_USAGE,
        )
    return trainer, kind


def check_layout(cfg: Config, kind: str, layout: ZipLayout | None) -> None:
    """Stop (exit 2, before any request) when the dataset zip is not what the trainer takes: a pair zip with one
    reference per pair for the Kontext trainer, single images for ostris'. A user's own trainer is not checked."""
    if layout is None or kind == OWN:
        return
    where = f"dataset: {cfg.dataset}"
    if kind == OSTRIS and layout.pairs:
        raise FinetuneError(
            f"{where} is a pair zip (edit pairs), but {DEFAULT_TRAINER} trains FLUX.1 [dev] text-to-image LoRAs on "
            f"captioned images. Set base_model: {KONTEXT_BASE} to train a Kontext edit LoRA on Replicate "
            f"({KONTEXT_TRAINER}), or give a zip of single images (`finetune prepare IMAGES -o data.zip`).",
            EXIT_USAGE,
        )
    if kind != KONTEXT:
        return
    if not layout.pairs:
        raise FinetuneError(
            f"{where} holds single images, but {KONTEXT_TRAINER} trains edit LoRAs on pairs: <stem>_start.<ext> (the "
            "input image), <stem>_end.<ext> (the edited image) and an optional <stem>.txt instruction. Build a pair "
            "zip with `finetune prepare PAIRS --pairs start-end -o pairs.zip` (README: edit pairs).",
            EXIT_USAGE,
        )
    if layout.problems:
        raise FinetuneError(
            f"{where} is not a valid pair zip:\n"
            + "\n".join(f"  - {p}" for p in layout.problems)
            + "\nRebuild it with `finetune prepare PAIRS --pairs start-end -o pairs.zip`.",
            EXIT_USAGE,
        )
    if layout.references > 1:
        raise FinetuneError(
            f"{where} has pairs with {layout.references} references (<stem>_start_2, ...), but Replicate's Kontext "
            "trainer takes one reference per pair (<stem>_start). Keep one reference per pair, or train "
            "multi-reference edit LoRAs locally on FLUX.2 [klein] (backend: local).",
            EXIT_USAGE,
        )
    if layout.uncaptioned and not cfg.remote.instruction.strip():
        shown = ", ".join(layout.uncaptioned[:5]) + (", ..." if len(layout.uncaptioned) > 5 else "")
        raise FinetuneError(
            f"{where}: {len(layout.uncaptioned)} of {layout.count} pairs have no <stem>.txt instruction ({shown}), "
            'and remote.instruction is not set. Set remote.instruction: "<the edit, e.g. make it a watercolor>" '
            "(sent as the trainer's kontext_prompt_instruction), or add the instructions with `finetune prepare "
            'PAIRS --pairs start-end --caption-template "..."`.',
            EXIT_USAGE,
        )


def map_inputs(
    cfg: Config, trainer: str | None = None, *, layout: ZipLayout | None = None
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Map the config onto the inputs of ``trainer`` (default: :func:`choose_trainer`'s), then add ``remote.inputs``.

    Returns ``(inputs, origin, unmapped)``: the inputs without the dataset and secrets from the environment, the
    config key each input came from, and one line per setting the user set explicitly that the trainer cannot
    honour. Defaults never appear in ``unmapped``. ``layout`` is the dataset zip's (None: not inspected, e.g. a URL).
    """
    inputs, origin, unmapped = _mapped_inputs(cfg, _trainer_kind(trainer or choose_trainer(cfg)[0]), layout)
    _add_extra_inputs(cfg, inputs, origin)
    return inputs, origin, unmapped


def _mapped_inputs(
    cfg: Config, kind: str, layout: ZipLayout | None
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """The config mapped onto a trainer kind's inputs, without remote.inputs (see map_inputs)."""
    if kind == OSTRIS:
        inputs, origin = _ostris_inputs(cfg)
    elif kind == KONTEXT:
        inputs, origin = _kontext_inputs(cfg, layout)
    else:
        inputs, origin = {}, {}
    return inputs, origin, _unhonoured(cfg, kind, set(origin.values()))


def _ostris_inputs(cfg: Config) -> tuple[dict[str, Any], dict[str, str]]:
    """``ostris/flux-dev-lora-trainer`` inputs (reference §9.1). ``autocaption`` is always false: a ``prepare`` zip
    captions every image."""
    t, lora = cfg.train, cfg.lora
    inputs: dict[str, Any] = {
        "trigger_word": cfg.trigger_word,
        "autocaption": False,
        "steps": t.steps,
        "learning_rate": t.learning_rate,
        "batch_size": t.batch_size,
        "resolution": ",".join(str(r) for r in t.resolution),
        "lora_rank": lora.rank,
        "caption_dropout_rate": t.caption_dropout,
        "optimizer": t.optimizer,
        "gradient_checkpointing": t.gradient_checkpointing,
    }
    origin = {
        "trigger_word": "trigger_word",
        "steps": "train.steps",
        "learning_rate": "train.learning_rate",
        "batch_size": "train.batch_size",
        "resolution": "train.resolution",
        "lora_rank": "lora.rank",
        "caption_dropout_rate": "train.caption_dropout",
        "optimizer": "train.optimizer",
        "gradient_checkpointing": "train.gradient_checkpointing",
    }
    if cfg.remote.hf_repo_id:
        inputs["hf_repo_id"] = cfg.remote.hf_repo_id
        origin["hf_repo_id"] = "remote.hf_repo_id"
    wandb_key, wandb_project = _wandb_project(cfg)
    if wandb_project:
        inputs["wandb_project"] = wandb_project
        origin["wandb_project"] = wandb_key
        prompts = [p.replace("[trigger]", cfg.trigger_word) for p in cfg.sample.prompts]
        if prompts:
            inputs["wandb_sample_prompts"] = "\n".join(prompts)
            origin["wandb_sample_prompts"] = "sample.prompts"
        if cfg.sample.every:
            inputs["wandb_sample_interval"] = cfg.sample.every
            origin["wandb_sample_interval"] = "sample.every"
    return inputs, origin


def _kontext_inputs(cfg: Config, layout: ZipLayout | None) -> tuple[dict[str, Any], dict[str, str]]:
    """``replicate/fast-flux-kontext-trainer`` inputs (flux-family-2026.md §3). ``learning_rate`` and ``lora_rank``
    are what its model cards report; train_remote drops them when the trainer version's schema lacks them (and
    reports them when they were set explicitly). The instruction goes only with pairs that have no ``.txt``."""
    inputs: dict[str, Any] = {
        "training_steps": cfg.train.steps,
        "seed": cfg.train.seed,
        "learning_rate": cfg.train.learning_rate,
        "lora_rank": cfg.lora.rank,
    }
    origin = {
        "training_steps": "train.steps",
        "seed": "train.seed",
        "learning_rate": "train.learning_rate",
        "lora_rank": "lora.rank",
    }
    instruction = cfg.remote.instruction.strip()
    if instruction and (layout is None or layout.uncaptioned):  # a URL dataset cannot be looked into: send it
        inputs["kontext_prompt_instruction"] = instruction
        origin["kontext_prompt_instruction"] = "remote.instruction"
    if cfg.remote.hf_repo_id:
        inputs["hf_repo_id"] = cfg.remote.hf_repo_id
        origin["hf_repo_id"] = "remote.hf_repo_id"
    return inputs, origin


def _add_extra_inputs(cfg: Config, inputs: dict[str, Any], origin: dict[str, str]) -> list[str]:
    """Add ``remote.inputs`` (each replaces a mapped input of its name); returns one line per replaced input."""
    replaced = []
    for name, value in cfg.remote.inputs.items():
        value = _from_environment(name, value)
        if name in inputs and not is_secret_input(name):
            replaced.append(f"remote.inputs.{name}={value!r} replaces {origin[name]} ({name}={inputs[name]!r})")
        elif name in inputs:
            replaced.append(f"remote.inputs.{name} replaces {origin[name]}")
        inputs[name] = value
        origin[name] = f"remote.inputs.{name}"
    return replaced


def _from_environment(name: str, value: Any) -> Any:
    """``env:VAR`` → the environment variable's value (how secrets reach a trainer without entering the config)."""
    match = ENV_VALUE_RE.match(value) if isinstance(value, str) else None
    if match is None:
        return value
    if not os.environ.get(match[1]):
        raise FinetuneError(
            f"remote.inputs.{name}: {value} names environment variable {match[1]}, which is not set; export it "
            "before training",
            EXIT_USAGE,
        )
    return os.environ[match[1]]


def _unhonoured(cfg: Config, kind: str, mapped_keys: set[str]) -> list[str]:
    """One line per explicit setting the trainer kind cannot honour (settings that only concern this machine, and
    values a trainer fixes itself when set to that value, are honoured)."""
    lora = cfg.lora
    base = DEV_BASE if kind == OSTRIS else KONTEXT_BASE
    trainer = cfg.remote.trainer.split(":", 1)[0] if kind == OWN else "the trainer"
    unmapped = []
    for key in sorted(cfg.explicit):
        section = key.split(".", 1)[0]
        if key in mapped_keys or key in LOCAL_ONLY or key in REMOTE_SETTINGS or key.startswith("remote.inputs."):
            continue
        value = _get(cfg, key)
        if key == "trigger_word" and kind != OSTRIS:
            continue  # an edit set's instructions (or a user's captions) carry it; recorded in the lineage
        if key in ("remote.hf_repo_id", "remote.wandb_project", "train.wandb_project", "remote.instruction"):
            if value and key == "remote.instruction" and kind != KONTEXT:
                unmapped.append(
                    f"remote.instruction={value!r}: only {KONTEXT_TRAINER} takes an instruction; pass your trainer's "
                    "own input as remote.inputs.NAME"
                )
            elif value and key != "remote.instruction":  # an empty one is off: nothing to honour
                unmapped.append(f"{key}={value!r}: {trainer} has no input for it; pass it as remote.inputs.NAME")
            continue
        if kind == OWN:
            if key == "base_model":
                continue  # a trainer of the user's own trains what the user says it trains
            unmapped.append(
                f"{key}={value!r}: {trainer} gets only the dataset and remote.inputs; pass the setting as "
                "remote.inputs.<its input name>"
            )
            continue
        if key == "lora.alpha":
            if kind == KONTEXT:
                unmapped.append(f"lora.alpha={value:g}: the trainer has no alpha input (it chooses alpha itself)")
            elif value != lora.rank:
                unmapped.append(f"lora.alpha={value:g}: the trainer always uses alpha = rank ({lora.rank})")
            continue
        if key == "base_model":
            if value != base:
                unmapped.append(f"base_model={value}: the trainer always trains {base}")
            continue
        if key in TRAINER_FIXED:
            fixed = TRAINER_FIXED[key]
            if kind == OSTRIS and value == fixed:
                continue
            if kind == OSTRIS:
                unmapped.append(f"{key}={value!r}: the trainer fixes it to {fixed!r}")
            elif not (key == "train.quantize" and value == "auto"):  # auto: whatever the trainer's GPU needs
                unmapped.append(f"{key}={value!r}: the trainer has no such setting")
            continue
        feature = next((v for k, v in LOCAL_TRAINING_FEATURES.items() if key.startswith(k)), None)
        if feature is not None:  # issue 16: the local trainer's alone; off (empty, 0, false) needs no honouring
            if value not in ("", 0, False) or key.endswith((".weight", ".device")):
                unmapped.append(f"{key}={value!r}: {trainer} has no {feature}; it trains locally (backend: local)")
            continue
        if section == "sample":
            if kind == OSTRIS:
                unmapped.append(
                    f"{key}={value!r}: the trainer renders no samples (only to W&B with remote.wandb_project)"
                )
            else:
                unmapped.append(f"{key}={value!r}: the trainer renders its own validation images (not imported)")
            continue
        unmapped.append(f"{key}={value!r}: the trainer has no such setting")
    return unmapped


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _wandb_project(cfg: Config) -> tuple[str, str]:
    """(config key, project): one W&B setting serves both backends, ``remote.wandb_project`` else
    ``train.wandb_project``."""
    if cfg.remote.wandb_project:
        return "remote.wandb_project", cfg.remote.wandb_project
    return "train.wandb_project", cfg.train.wandb_project


def _secret_values(inputs: dict[str, Any], origin: dict[str, str]) -> dict[str, str]:
    """Secrets for the trainer, read from the environment only when an input that needs one is sent (and
    remote.inputs does not give it). Never stored or printed."""
    needs = {"hf_token": "hf_repo_id", "wandb_api_key": "wandb_project"}  # secret input -> the input that needs it
    out = {}
    for key, needed_by in needs.items():
        if needed_by not in inputs or key in inputs:
            continue
        var = SECRET_INPUTS[key]
        value = os.environ.get(var, "").strip()
        if not value:
            opt = origin[needed_by]
            raise FinetuneError(f"{opt} is set, so the trainer needs {var}: export {var}=... or unset {opt}.")
        out[key] = value
    return out


# ---- run folder and state ------------------------------------------------------------------------------------------


def run_dir_for(cfg: Config, dataset_digest: str) -> Path:
    """The run folder of this config and dataset (see the module docstring)."""
    if cfg.train.output_dir:
        return Path(cfg.train.output_dir)
    key = _digest({"config": _config_record(cfg), "dataset": dataset_digest})[:12]
    return RUNS_ROOT / f"{cfg.output.rsplit('/', 1)[-1]}-remote-{key}"


def _read_state(run_dir: Path) -> dict:
    path = run_dir / STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise FinetuneError(f"{path} is not valid JSON ({e}); fix or remove it.") from None


def _write_state(run_dir: Path, state: dict) -> None:
    write_atomic(run_dir / STATE_FILE, json.dumps(state, indent=2, sort_keys=True, default=str) + "\n")


# ---- following -------------------------------------------------------------------------------------------------


class _Display:
    """Prints new log lines and status changes; progress lines drive a tqdm bar on stderr instead."""

    def __init__(self) -> None:
        self.printed = 0
        self.status: str | None = None
        self.bar: Any = None
        self.cold_noticed = False

    def update(self, training: dict, *, final: bool = False) -> None:
        status = training.get("status")
        if status != self.status:
            self._close_bar()
            _say(f"[{time.strftime('%H:%M:%S')}] status: {status}")
            self.status = status
        logs = training.get("logs") or ""
        if len(logs) < self.printed:
            self.printed = 0
        new = logs[self.printed :]
        if not final and "\n" in new:
            new = new[: new.rindex("\n") + 1]
        elif not final:
            new = ""
        self.printed += len(new)
        for line in re.split(r"[\r\n]+", new):
            if not line.strip():
                continue
            progress = parse_progress(line)
            if progress:
                self._progress(progress)
            else:
                self._close_bar()
                _say(line)

    def _progress(self, p: dict) -> None:
        from tqdm import tqdm

        if self.bar is None or self.bar.total != p["total"]:
            self._close_bar()
            self.bar = tqdm(total=p["total"], unit="step", file=sys.stderr, dynamic_ncols=True, leave=True)
        self.bar.n = p["step"]
        self.bar.set_postfix_str(f"{p['rate']}, ETA {p['eta']}", refresh=True)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close_bar()


def _follow(client: Replicate, training_id: str, on_update: Callable[[dict], None] | None = None) -> dict:
    """Poll ``GET /v1/trainings/{id}`` until a terminal status; print logs/progress; return the final object."""
    display = _Display()
    interval = POLL_INTERVAL
    t0 = time.monotonic()
    try:
        while True:
            training = client.get_training(training_id)
            status = training.get("status")
            terminal = status in TERMINAL_STATUSES
            display.update(training, final=terminal)
            if on_update:
                on_update(training)
            if terminal:
                return training
            if status == "starting":
                if not display.cold_noticed and time.monotonic() - t0 > COLD_BOOT_NOTICE_S:
                    _say(
                        "Still starting: a cold boot (Replicate is loading the trainer onto a GPU); "
                        "this can take minutes."
                    )
                    display.cold_noticed = True
                interval = min(POLL_MAX_INTERVAL, interval * 1.5)
            elif status == "processing":
                interval = POLL_INTERVAL
            else:  # an unknown, non-terminal status: keep polling, gently
                interval = min(POLL_MAX_INTERVAL, max(interval, POLL_INTERVAL))
            time.sleep(interval)
    finally:
        display.close()


def _log_tail(training: dict, n: int = LOG_TAIL_LINES) -> str:
    lines = [ln for ln in re.split(r"[\r\n]+", training.get("logs") or "") if ln.strip()]
    return "\n".join(f"    {ln}" for ln in lines[-n:])


# ---- import ------------------------------------------------------------------------------------------------------


def _import(
    client: Replicate, training: dict, run_dir: Path, *, model: str, lineage: dict, registry: Any, state: dict
) -> Any:
    """Download ``output.weights`` (a tar, or the LoRA file itself), extract the LoRA, register it. Idempotent: the
    version id is the file's hash."""
    seen = time.monotonic()
    weights = (training.get("output") or {}).get("weights")
    if not weights:
        raise FinetuneError(f"Training {training['id']} succeeded but names no output.weights.", EXIT_FAILURE)
    t0 = time.monotonic()
    downloaded = client.download(weights, run_dir / "weights.download")
    download_s = time.monotonic() - t0
    lora = extract_lora(downloaded, run_dir / "lora.safetensors")
    downloaded.unlink(missing_ok=True)
    lineage.setdefault("timings", {})["download_s"] = round(download_s, 3)
    if "lora_rank" not in lineage["replicate"]["inputs"]:  # a trainer without a rank input: the file says it
        rank = lora_rank_of(lora) or lineage["lora"]["rank"]
        lineage["lora"].update(rank=rank, alpha=rank)
    if registry is None:
        from finetune.registry import Registry

        registry = Registry()
    register_start = time.monotonic()
    # Time from seeing `succeeded` to registration start, without the download (the speed promise).
    state.setdefault("timings", {})["import_overhead_s"] = round(register_start - seen - download_s, 4)
    version = registry.add_version(model=model, lora_file=lora, lineage=lineage)
    state.update(phase="imported", version=version.ref, version_id=version.id)
    _write_state(run_dir, state)
    return version


def _lineage_from(training: dict, *, state: dict | None, cfg_dict: dict | None) -> dict:
    state = state or {}
    inputs = _strip_secrets(state.get("inputs") or training.get("input") or {})
    metrics = training.get("metrics") or {}
    rank = inputs.get("lora_rank", 16)
    trainer = training.get("model") or state.get("trainer")
    # A run of this recipe recorded its base; a training found elsewhere has the base its trainer trains (a trainer
    # of someone's own: unknown, None).
    base = state["base_model"] if "base_model" in state else TRAINER_BASES.get(trainer or "")
    timings = dict(state.get("timings") or {})
    timings.update(
        train_s=metrics.get("predict_time"),
        total_s=metrics.get("total_time"),
        queue_s=_seconds_between(training.get("created_at"), training.get("started_at")),
    )
    dataset = state.get("dataset") or {"path": inputs.get(state.get("dataset_input", DATASET_INPUT)), "digest": None}
    lora = {"rank": rank, "alpha": rank}
    if _trainer_kind(trainer or "") == OSTRIS:
        lora["targets"] = "all-linear"  # ai-toolkit's FLUX default (reference §9.1); other trainers do not say
    return {
        "base_model": base,
        "trigger_word": state.get("trigger_word", inputs.get("trigger_word")),
        "backend": "replicate",
        "dataset": dataset,
        "config": cfg_dict,
        "timings": timings,
        "lora": lora,
        "replicate": {
            "trainer": trainer,
            "trainer_version": training.get("version") or state.get("trainer_version"),
            "training_id": training["id"],
            "version": (training.get("output") or {}).get("version"),
            "inputs": inputs,
            "metrics": metrics,
        },
    }


def _seconds_between(a: str | None, b: str | None) -> float | None:
    if not a or not b:
        return None
    try:
        t0 = _dt.datetime.fromisoformat(a.replace("Z", "+00:00"))
        t1 = _dt.datetime.fromisoformat(b.replace("Z", "+00:00"))
    except ValueError:
        return None
    return round((t1 - t0).total_seconds(), 3)


def _finish(
    client: Replicate,
    training_id: str,
    run_dir: Path,
    state: dict,
    *,
    model: str | None,
    cfg_dict: dict | None,
    registry: Any,
    cancel_on_interrupt: bool,
) -> Any:
    """Follow a training to its end and import it (or report the failure). Shared by train_remote and attach."""

    def record(training: dict) -> None:
        if training.get("status") != state.get("status"):
            state["status"] = training.get("status")
            _write_state(run_dir, state)

    try:
        training = _follow(client, training_id, on_update=record)
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            client.cancel_training(training_id)
            _say(f"Canceled training {training_id}.")
            raise FinetuneError(
                f"Training {training_id} was canceled on interrupt; nothing registered.", 130
            ) from None
        _say(f"\nDetached; training {training_id} keeps running on Replicate. Re-attach with:")
        _say(f"  finetune trainings attach {training_id}")
        raise
    except ReplicateError as e:
        raise FinetuneError(
            f"{e}\nLost track of training {training_id}; it may still be running. Re-attach with: "
            f"finetune trainings attach {training_id}",
            EXIT_FAILURE,
        ) from None
    status = training.get("status")
    if status in FAILED_STATUSES:
        error = training.get("error") or "(no error message)"
        tail = _log_tail(training)
        raise FinetuneError(
            f"Training {training_id} {status}: {error}\nLast log lines:\n{tail or '    (no logs)'}\n"
            "Nothing was registered.",
            EXIT_FAILURE,
        )
    lineage = _lineage_from(training, state=state, cfg_dict=cfg_dict)
    # A training started elsewhere is imported under its Replicate destination's name unless a model was given.
    model = model or (lineage["replicate"]["version"] or "").split(":", 1)[0]
    if not model:
        raise FinetuneError(f"Training {training_id} names no destination version; pass --model owner/name.")
    state.setdefault("training_id", training_id)
    version = _import(client, training, run_dir, model=model, lineage=lineage, registry=registry, state=state)
    _say(f"Registered {version.ref} (Replicate version {lineage['replicate']['version']}).")
    return version


# ---- the recipe ------------------------------------------------------------------------------------------------


def _resolve_trainer(client: Replicate, trainer: str) -> tuple[str, str, dict]:
    """``(owner/name, version id, TrainingInput schema)``; an unpinned trainer resolves to its latest version."""
    model, _, vid = trainer.partition(":")
    if not vid:
        latest = client.get_model(model).get("latest_version") or {}
        vid = latest.get("id") or next(iter(client.list_versions(model)), {}).get("id")
        if not vid:
            raise FinetuneError(f"remote.trainer: {model} has no versions to train with.")
    version = client.get_version(model, vid)
    schema = ((version.get("openapi_schema") or {}).get("components") or {}).get("schemas", {}).get("TrainingInput")
    if not schema:
        raise FinetuneError(f"remote.trainer: {model}:{vid} has no TrainingInput schema; it is not a trainer.")
    return model, vid, schema


def _reconcile(client: Replicate, state: dict, *, pages: int = 3) -> str | None:
    """The id of a training created from this run's upload (same file URL, trainer and version), else None."""
    dataset_input = state.get("dataset_input", DATASET_INPUT)
    url = (state.get("file") or {}).get("url") or state.get("inputs", {}).get(dataset_input)
    for training in client.list_trainings(limit=100 * pages):
        same_file = (training.get("input") or {}).get(dataset_input) == url
        if (
            same_file
            and training.get("model") == state["trainer"]
            and training.get("version") == state["trainer_version"]
        ):
            return training["id"]
    return None


def _dataset(cfg: Config) -> tuple[Path | None, str, str]:
    """``(path or None, digest, url or "")`` of the configured dataset."""
    if not cfg.dataset:
        raise FinetuneError("dataset: not set; give a zip from `finetune prepare` (or an https:// URL you host).")
    if cfg.dataset.startswith("https://"):
        return None, _digest(cfg.dataset), cfg.dataset
    if cfg.dataset.startswith("http://"):
        raise FinetuneError(f"dataset: {cfg.dataset} must be an https:// URL for Replicate to fetch it.")
    path = Path(cfg.dataset)
    if not path.is_file():
        raise FinetuneError(f"dataset: {path} does not exist; run `finetune prepare IMAGES -o {path}` first.")
    size = path.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise FinetuneError(
            f"dataset: {path} is {size / 2**20:.1f} MiB but Replicate's Files API takes at most 100 MiB. "
            "Shrink it with `finetune prepare ... --max-side 1024`, or upload it yourself and set dataset: https://..."
        )
    return path, sha256_file(path), ""


def train_remote(
    cfg: Config,
    *,
    allow_unmapped: bool = False,
    detach: bool = False,
    cancel_on_interrupt: bool = False,
    webhook: str | None = None,
    registry: Registry | None = None,
    client: Replicate | None = None,
) -> Version | None:
    """Train ``cfg`` on Replicate and register the result; returns the Version (None when detached)."""
    # 1. Choose the trainer, check the dataset's layout, map the config and stop early on what the trainer cannot
    #    honour (before any network call).
    trainer_ref, kind = choose_trainer(cfg)
    if trainer_ref != cfg.remote.trainer:
        _say(
            f"base_model {cfg.base_model} is FLUX.1 Kontext: training on {trainer_ref} (remote.trainer's default, "
            f"{DEFAULT_TRAINER}, trains FLUX.1 [dev] text-to-image LoRAs)."
        )
    if kind == KONTEXT:
        _say(
            f"Note: a third party reported {KONTEXT_TRAINER} failing on every request; if it fails here, its error "
            "and last log lines are shown and nothing is registered."
        )
    data_path, data_digest, data_url = _dataset(cfg)
    layout = inspect_zip(data_path) if data_path else None
    check_layout(cfg, kind, layout)
    inputs, origin, unmapped = _mapped_inputs(cfg, kind, layout)
    replaced = _add_extra_inputs(cfg, inputs, origin)
    if unmapped and not allow_unmapped:
        raise FinetuneError(
            "These settings cannot be honoured by the Replicate trainer:\n"
            + "\n".join(f"  - {u}" for u in unmapped)
            + "\nRemove them from the config, or pass --allow-unmapped to train without them.",
            EXIT_USAGE,
        )
    for u in unmapped:
        _say(f"Not honoured remotely (--allow-unmapped): {u}")
    if kind == KONTEXT and cfg.remote.instruction.strip() and "kontext_prompt_instruction" not in inputs:
        _say("remote.instruction is not sent: every pair of the dataset has its own instruction (<stem>.txt).")
    secrets = _secret_values(inputs, origin)
    run_dir = run_dir_for(cfg, data_digest)
    cfg_dict = _config_record(cfg)
    client = client or Replicate()
    state = _read_state(run_dir)

    # 2. This run folder already holds a training: re-attach to it (or report what it produced).
    if state.get("training_id"):
        tid = state["training_id"]
        if state.get("phase") == "imported" and state.get("version"):
            from finetune.registry import Registry, RegistryError

            try:
                version = (registry or Registry()).resolve(state["version"])
                _say(f"{run_dir} already produced {version.ref} (training {tid}); nothing to do.")
                return version
            except RegistryError:  # removed from the registry since: import it again (same bytes, same id)
                _say(f"{state['version']} is no longer in the registry; importing training {tid} again.")
        _say(f"Re-attaching to training {tid} from {run_dir}.")
        _drop_inputs(cfg_dict, state.get("secret_inputs") or [])
        return _finish(
            client,
            tid,
            run_dir,
            state,
            model=cfg.output,
            cfg_dict=cfg_dict,
            registry=registry,
            cancel_on_interrupt=cancel_on_interrupt,
        )

    # 3. Resolve the trainer (pinned or latest) and validate the inputs against its TrainingInput schema.
    trainer, trainer_version, schema = _resolve_trainer(client, trainer_ref)
    trainer_at = f"{trainer}:{trainer_version[:12]}"
    props = schema.get("properties") or {}
    dataset_input = _dataset_input(schema, trainer_at)
    if dataset_input in cfg.remote.inputs:
        raise FinetuneError(
            f"remote.inputs.{dataset_input}: the dataset is sent as {dataset_input}; set dataset: (a zip, or an "
            "https:// URL you host) instead.",
            EXIT_USAGE,
        )
    # A mapped input this trainer version lacks is dropped when it was a default, reported when it was set;
    # remote.inputs are never dropped: an unknown one fails validation below.
    extra = {f"remote.inputs.{name}" for name in cfg.remote.inputs}
    missing = [k for k in inputs if k not in props and origin.get(k) not in extra]
    blocked = [
        f"{origin[k]} → {k}: trainer version {trainer_version[:12]} has no such input"
        for k in missing
        if origin.get(k) in cfg.explicit
    ]
    if blocked and not allow_unmapped:
        raise FinetuneError(
            "These settings cannot be honoured by the Replicate trainer:\n"
            + "\n".join(f"  - {b}" for b in blocked)
            + "\nRemove them from the config, or pass --allow-unmapped to train without them."
        )
    for k in missing:
        inputs.pop(k)
    validate_inputs(
        {**inputs, dataset_input: data_url or PLACEHOLDER_URL, **secrets},
        schema,
        trainer_at,
        origin={**origin, dataset_input: "dataset"},
    )
    for line in replaced:
        _say(line)
    if cfg.remote.inputs:
        shown = ", ".join(_shown(k, v, props) for k, v in cfg.remote.inputs.items())
        _say(f"Passing remote.inputs to {trainer_at}: {shown}")
    inputs_digest = _digest(_strip_secrets(inputs, props))
    # remote.inputs the schema marks secret under a name that does not say so: kept out of every record too.
    secret_inputs = sorted(k for k in cfg.remote.inputs if is_secret_input(k, props.get(k)))
    _drop_inputs(cfg_dict, secret_inputs)
    if state.get("inputs_digest") and state["inputs_digest"] != inputs_digest:
        raise FinetuneError(
            f"{run_dir} holds a run with different trainer inputs; set another train.output_dir or remove the folder."
        )

    # 4. The destination model: reuse it, or create it private with remote.hardware.
    account = client.account()["username"]
    destination = cfg.remote.destination or f"{account}/{cfg.output.rsplit('/', 1)[-1]}"
    if client.find_model(destination) is None:
        _say(f"Creating private model {destination} on Replicate (hardware {cfg.remote.hardware}).")
        try:
            client.create_model(
                destination, hardware=cfg.remote.hardware, description=f"FLUX LoRA trained by finetune ({cfg.output})"
            )
        except ReplicateError:
            if client.find_model(destination) is None:  # a lost answer may still have created it
                raise
    state.update(
        schema=1,
        model=cfg.output,
        trainer=trainer,
        trainer_version=trainer_version,
        destination=destination,
        inputs_digest=inputs_digest,
        dataset={"path": cfg.dataset, "digest": data_digest},
        dataset_input=dataset_input,
        secret_inputs=secret_inputs,
        # What the version is a LoRA of: the trainer's base (a trainer of the user's own: the config's base).
        base_model=TRAINER_BASES.get(trainer, cfg.base_model),
        trigger_word=cfg.trigger_word if kind == OSTRIS or "trigger_word" in cfg.explicit else None,
    )
    _write_state(run_dir, state)
    (run_dir / "config.yaml").write_text(json.dumps(cfg_dict, indent=2, sort_keys=False) + "\n", encoding="utf-8")

    # 5. Upload the dataset (reusing this run's upload while it is still valid).
    timings = state.setdefault("timings", {})
    if data_url:
        file_url = data_url
    else:
        file_url = _reuse_upload(client, state, data_digest)
        if not file_url:
            _say(f"Uploading {data_path} ({data_path.stat().st_size / 2**20:.1f} MiB) to Replicate.")
            t0 = time.monotonic()
            f = client.upload_file(data_path, sha256=data_digest, metadata={"finetune_dataset_sha256": data_digest})
            timings["upload_s"] = round(time.monotonic() - t0, 3)
            file_url = f["urls"]["get"]
            state["file"] = {"id": f["id"], "url": file_url, "sha256": data_digest, "expires_at": f.get("expires_at")}
    inputs[dataset_input] = file_url
    state["inputs"] = _strip_secrets(inputs, props)
    _write_state(run_dir, state)

    # 6. Create the training, exactly once.
    if state.get("phase") == "creating":
        found = _reconcile(client, state)
        if found:
            _say(f"Found training {found} from an earlier attempt; following it instead of submitting again.")
            state.update(training_id=found, phase="created")
            _write_state(run_dir, state)
            return _finish(
                client,
                found,
                run_dir,
                state,
                model=cfg.output,
                cfg_dict=cfg_dict,
                registry=registry,
                cancel_on_interrupt=cancel_on_interrupt,
            )
        _say("No training from the earlier attempt exists on Replicate; submitting now.")
    state.update(phase="creating", create_attempted_at=_now_iso())
    _write_state(run_dir, state)
    hook = webhook or cfg.remote.webhook or None
    try:
        training = client.create_training(
            trainer,
            trainer_version,
            destination=destination,
            input={**inputs, **secrets},
            webhook=hook,
            webhook_events_filter=list(cfg.remote.webhook_events) if hook else None,
        )
    except AmbiguousRequestError as e:
        _say(f"The create request got no clear answer ({e.__class__.__name__}); checking Replicate for the training.")
        found = _reconcile(client, state)
        if not found:
            raise FinetuneError(
                f"{e}\nNo training using this upload exists on Replicate, so none was created. Run the same command "
                f"again to retry: it checks once more before it submits (run folder {run_dir}).",
                EXIT_FAILURE,
            ) from None
        training = {"id": found}
    except ReplicateError:
        state["phase"] = "create_failed"
        _write_state(run_dir, state)
        raise
    tid = training["id"]
    state.update(training_id=tid, phase="created", created_at=_now_iso(), webhook=bool(hook))
    _write_state(run_dir, state)
    _say(f"Training {tid} created ({trainer}:{trainer_version[:12]} → {destination}); state in {run_dir}.")
    if detach:
        _say(f"Detached. Follow and import it later with:\n  finetune trainings attach {tid}")
        return None
    return _finish(
        client,
        tid,
        run_dir,
        state,
        model=cfg.output,
        cfg_dict=cfg_dict,
        registry=registry,
        cancel_on_interrupt=cancel_on_interrupt,
    )


def _drop_inputs(cfg_dict: dict, names: list[str]) -> None:
    """Remove ``names`` from the config record's remote.inputs (secrets: never stored)."""
    stored = cfg_dict["remote"].get("inputs") or {}
    for name in names:
        stored.pop(name, None)


def _dataset_input(schema: dict, trainer_at: str) -> str:
    """The trainer input that takes the dataset zip: ``input_images`` (Replicate's trainers), else the one file
    input (Cog's ``format: uri``) of a user's trainer, preferring one that says it takes a zip."""
    props = schema.get("properties") or {}
    if DATASET_INPUT in props:
        return DATASET_INPUT
    files = [k for k, p in props.items() if p.get("format") == "uri"]
    zips = [k for k in files if "zip" in f"{k} {props[k].get('description', '')}".lower()]
    if len(zips) == 1:
        return zips[0]
    if len(files) == 1:
        return files[0]
    raise FinetuneError(
        f"remote.trainer: {trainer_at} has no {DATASET_INPUT} input, and its file inputs "
        f"({', '.join(files) or 'none'}) do not say which one takes the dataset zip. Name the zip input of your "
        f"trainer {DATASET_INPUT}, as Replicate's trainers do.",
        EXIT_USAGE,
    )


def _reuse_upload(client: Replicate, state: dict, digest: str) -> str | None:
    f = state.get("file") or {}
    if f.get("sha256") != digest or not f.get("id"):
        return None
    expires = f.get("expires_at")
    try:
        left = _dt.datetime.fromisoformat(expires.replace("Z", "+00:00")) - _dt.datetime.now(_dt.timezone.utc)
    except (AttributeError, ValueError):
        return None
    if left.total_seconds() < 3600:  # the training must start before the file expires
        return None
    try:
        client.get_file(f["id"])
    except ReplicateError:
        return None
    return f["url"]


def attach(
    training_id: str,
    *,
    model: str | None = None,
    registry: Registry | None = None,
    client: Replicate | None = None,
    cancel_on_interrupt: bool = False,
    runs_root: Path | None = None,
) -> Version:
    """Follow any training of the account and import its result once; returns the Version.

    A training started by ``train_remote`` is found in its run folder (its lineage then carries the config and
    dataset digest); any other training is imported with the lineage its training object allows, into ``model``
    (default: the Replicate destination's ``owner/name``). Importing twice is a no-op (content-addressed versions).
    """
    client = client or Replicate()
    run_dir = find_run_dir(training_id, runs_root)
    state = _read_state(run_dir) if run_dir else {}
    cfg_dict = None
    if run_dir and (run_dir / "config.yaml").is_file():
        cfg_dict = json.loads((run_dir / "config.yaml").read_text(encoding="utf-8"))
    if run_dir is None:
        run_dir = (runs_root or RUNS_ROOT) / f"attach-{training_id}"
        state = {"training_id": training_id, "phase": "attached"}
        _write_state(run_dir, state)
    return _finish(
        client,
        training_id,
        run_dir,
        state,
        model=model or state.get("model"),
        cfg_dict=cfg_dict,
        registry=registry,
        cancel_on_interrupt=cancel_on_interrupt,
    )
