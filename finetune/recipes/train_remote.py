"""Train on Replicate from the same config, follow it, and import the result as a registry version.

``train_remote(cfg)`` reads top to bottom: map the config onto the trainer's inputs → list what cannot be honoured →
validate against the trainer version's ``TrainingInput`` schema → ensure the destination model → upload the dataset
zip → create the training (run state written at once) → follow it → download the weights tar → extract
``lora.safetensors`` → register. ``attach(training_id)`` follows any training of the account and imports it.

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
from finetune.config import Config, config_to_dict
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
    RUNS_ROOT,
    SECRET_INPUTS,
    STATE_FILE,
    extract_lora,
    find_run_dir,
    parse_progress,
    validate_inputs,
)

if TYPE_CHECKING:
    from finetune.registry import Registry, Version

__all__ = [
    "POLL_INTERVAL",
    "POLL_MAX_INTERVAL",
    "attach",
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


def _strip_secrets(inputs: dict) -> dict:
    return {k: v for k, v in (inputs or {}).items() if k not in SECRET_INPUTS and not _looks_secret(k)}


def _looks_secret(key: str) -> bool:
    return any(word in key.lower() for word in ("token", "api_key", "secret", "password"))


# ---- config → trainer inputs (pure) ------------------------------------------------------------------------------


def map_inputs(cfg: Config) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Map the config onto ``ostris/flux-dev-lora-trainer`` inputs (reference §9.1).

    Returns ``(inputs, origin, unmapped)``: the inputs without ``input_images`` and secrets, the config key each input
    came from, and one line per setting the user set explicitly that the trainer cannot honour. Defaults never appear
    in ``unmapped``. ``autocaption`` is always false: a ``prepare`` zip captions every image.
    """
    t, lora, explicit = cfg.train, cfg.lora, cfg.explicit
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
    wandb = bool(wandb_project)
    if wandb:
        inputs["wandb_project"] = wandb_project
        origin["wandb_project"] = wandb_key
        prompts = [p.replace("[trigger]", cfg.trigger_word) for p in cfg.sample.prompts]
        if prompts:
            inputs["wandb_sample_prompts"] = "\n".join(prompts)
            origin["wandb_sample_prompts"] = "sample.prompts"
        if cfg.sample.every:
            inputs["wandb_sample_interval"] = cfg.sample.every
            origin["wandb_sample_interval"] = "sample.every"

    mapped_keys = set(origin.values())
    unmapped = []
    for key in sorted(explicit):
        section = key.split(".", 1)[0]
        if key in mapped_keys or key in LOCAL_ONLY or section == "remote":
            continue
        value = _get(cfg, key)
        if key in TRAINER_FIXED and value == TRAINER_FIXED[key]:
            continue
        if key == "lora.alpha":
            if value != lora.rank:
                unmapped.append(f"lora.alpha={value:g}: the trainer always uses alpha = rank ({lora.rank})")
            continue
        if key == "base_model":
            if value != DEV_BASE:
                unmapped.append(f"base_model={value}: the trainer always trains {DEV_BASE}")
            continue
        if key in TRAINER_FIXED:
            unmapped.append(f"{key}={value!r}: the trainer fixes it to {TRAINER_FIXED[key]!r}")
            continue
        if section == "sample":
            unmapped.append(f"{key}={value!r}: the trainer renders no samples (only to W&B with remote.wandb_project)")
            continue
        unmapped.append(f"{key}={value!r}: the trainer has no such setting")
    return inputs, origin, unmapped


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


def _secret_values(cfg: Config) -> dict[str, str]:
    """Secrets for the trainer, read from the environment only when the config opts in. Never stored or printed."""
    wandb_key, wandb_project = _wandb_project(cfg)
    wanted = {"hf_token": bool(cfg.remote.hf_repo_id), "wandb_api_key": bool(wandb_project)}
    out = {}
    for key, on in wanted.items():
        if not on:
            continue
        var = SECRET_INPUTS[key]
        value = os.environ.get(var, "").strip()
        if not value:
            opt = "remote.hf_repo_id" if key == "hf_token" else wandb_key
            raise FinetuneError(f"{opt} is set, so the trainer needs {var}: export {var}=... or unset {opt}.")
        out[key] = value
    return out


# ---- run folder and state ------------------------------------------------------------------------------------------


def run_dir_for(cfg: Config, dataset_digest: str) -> Path:
    """The run folder of this config and dataset (see the module docstring)."""
    if cfg.train.output_dir:
        return Path(cfg.train.output_dir)
    key = _digest({"config": config_to_dict(cfg), "dataset": dataset_digest})[:12]
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
    """Download ``output.weights``, extract the LoRA, register it. Idempotent: the version id is the file's hash."""
    seen = time.monotonic()
    weights = (training.get("output") or {}).get("weights")
    if not weights:
        raise FinetuneError(f"Training {training['id']} succeeded but names no output.weights.", EXIT_FAILURE)
    t0 = time.monotonic()
    tar_path = client.download(weights, run_dir / "trained_model.tar")
    download_s = time.monotonic() - t0
    lora = extract_lora(tar_path, run_dir / "lora.safetensors")
    tar_path.unlink(missing_ok=True)
    lineage.setdefault("timings", {})["download_s"] = round(download_s, 3)
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
    timings = dict(state.get("timings") or {})
    timings.update(
        train_s=metrics.get("predict_time"),
        total_s=metrics.get("total_time"),
        queue_s=_seconds_between(training.get("created_at"), training.get("started_at")),
    )
    dataset = state.get("dataset") or {"path": inputs.get("input_images"), "digest": None}
    return {
        "base_model": DEV_BASE,
        "trigger_word": inputs.get("trigger_word"),
        "backend": "replicate",
        "dataset": dataset,
        "config": cfg_dict,
        "timings": timings,
        "lora": {"rank": rank, "alpha": rank, "targets": "all-linear"},
        "replicate": {
            "trainer": training.get("model") or state.get("trainer"),
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
    url = (state.get("file") or {}).get("url") or state.get("inputs", {}).get("input_images")
    for training in client.list_trainings(limit=100 * pages):
        same_file = (training.get("input") or {}).get("input_images") == url
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
    # 1. Map the config and stop early on what the trainer cannot honour (before any network call).
    family = models.family_name(cfg.base_model)
    if family != "flux1" and cfg.remote.trainer.split(":", 1)[0] == DEFAULT_TRAINER:
        raise FinetuneError(
            f"backend: replicate: base_model {cfg.base_model} is FLUX.2, and Replicate has no FLUX.2 LoRA trainer "
            f"today: {DEFAULT_TRAINER} trains FLUX.1 [dev] only, so it would train another model than this config "
            "names. Train FLUX.2 locally (backend: local; `finetune env` says how it fits this machine), or set "
            "remote.trainer to a Replicate trainer model that trains FLUX.2 (your own Cog trainer, for example).",
            EXIT_USAGE,
        )
    inputs, origin, unmapped = map_inputs(cfg)
    if unmapped and not allow_unmapped:
        raise FinetuneError(
            "These settings cannot be honoured by the Replicate trainer:\n"
            + "\n".join(f"  - {u}" for u in unmapped)
            + "\nRemove them from the config, or pass --allow-unmapped to train without them.",
            EXIT_USAGE,
        )
    for u in unmapped:
        _say(f"Not honoured remotely (--allow-unmapped): {u}")
    secrets = _secret_values(cfg)
    data_path, data_digest, data_url = _dataset(cfg)
    run_dir = run_dir_for(cfg, data_digest)
    cfg_dict = config_to_dict(cfg)
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
    trainer, trainer_version, schema = _resolve_trainer(client, cfg.remote.trainer)
    props = schema.get("properties") or {}
    missing = [k for k in inputs if k not in props]
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
        {**inputs, "input_images": data_url or PLACEHOLDER_URL, **secrets}, schema, f"{trainer}:{trainer_version[:12]}"
    )
    inputs_digest = _digest(inputs)
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
    inputs["input_images"] = file_url
    state["inputs"] = _strip_secrets(inputs)
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
