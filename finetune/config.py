"""The run schema: every setting of `finetune train` (both backends), its default, type and allowed range.

One YAML file drives a run. Values are coerced by their declared type (PyYAML reads ``1e-4`` as a string), unknown
keys fail with a "did you mean", and every error is collected before any is raised, so a user fixes a config in one
pass. This module imports nothing from ``finetune`` and no torch: config errors are reported in milliseconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DatasetEntry",
    "EmaConfig",
    "LoraConfig",
    "PreservationConfig",
    "RegularizationConfig",
    "RemoteConfig",
    "SampleConfig",
    "TrainConfig",
    "ValidationConfig",
    "apply_overrides",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_config",
]

DEFAULT_PROMPTS = (
    "a photo of [trigger]",
    "a photo of [trigger] on a beach at sunset",
    "an oil painting of [trigger]",
    "a photo of a cat sitting on a chair",
)
SIGMA_SAMPLING_RE = re.compile(r"^(flux_shift|flux2_shift|logit_normal|uniform|shift=\d+(\.\d+)?)$")
OUTPUT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
INPUT_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # a Cog input is a Python parameter name
ENV_VALUE_RE = re.compile(r"^env:([A-Za-z_][A-Za-z0-9_]*)$")  # remote.inputs.NAME: env:VAR, read when submitting
SECRET_WORDS = ("token", "api_key", "apikey", "secret", "password")  # input names that hold a secret


def _meta(doc: str, *, ge: float | None = None, le: float | None = None, pattern: re.Pattern | None = None) -> dict:
    return {"doc": doc, "ge": ge, "le": le, "pattern": pattern}


def _field(default: Any, doc: str, **bounds: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=_meta(doc, **bounds))
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=_meta(doc, **bounds))
    return field(default=default, metadata=_meta(doc, **bounds))


@dataclass
class LoraConfig:
    rank: int = _field(16, "LoRA rank r; trainable parameters grow linearly with it.", ge=1, le=256)
    alpha: float = _field(16.0, "Adapter scale is alpha / rank; keep equal to rank unless sweeping.", ge=0.0)
    targets: str | list[str] = _field(
        "all-linear",
        "'all-linear' (every Linear in the transformer blocks), 'attention', or a list of module-name suffixes.",
    )
    dropout: float = _field(0.0, "LoRA dropout probability.", ge=0.0, le=1.0)
    save_dtype: Literal["bfloat16", "float16", "float32"] = _field(
        "bfloat16", "dtype of the registered LoRA file (half of float32's size); checkpoints always keep float32."
    )


@dataclass
class PreservationConfig:
    class_word: str = _field(
        "",
        "Differential output preservation (ai-toolkit's DOP), e.g. person: each caption with the trigger word "
        "replaced by this word is also trained towards the base model's own prediction (LoRA off); empty = off.",
    )
    weight: float = _field(1.0, "Weight of the preservation loss beside the training loss.", ge=0.0)


@dataclass
class RegularizationConfig:
    dataset: str = _field(
        "",
        "Prior preservation: a zip from `finetune prepare` of class images (captions without the trigger word); "
        "each training micro-batch is followed by one of these; empty = off.",
    )
    weight: float = _field(1.0, "Weight of the regularisation images' loss.", ge=0.0)


@dataclass
class EmaConfig:
    decay: float = _field(
        0.0,
        "EMA of the LoRA weights after each optimizer step (0 = off; 0.99 typical); the registered file, "
        "samples and validation loss then use the EMA weights.",
        ge=0.0,
        le=0.99999,
    )
    device: Literal["cpu", "same"] = _field("cpu", "Where the EMA copy lives: cpu (no device memory) or same.")


@dataclass
class ValidationConfig:
    split: float = _field(
        0.0,
        "Share of the images held out of training for the fixed-σ validation loss (0 = validate on training "
        "images, as before).",
        ge=0.0,
        le=0.5,
    )
    dataset: str = _field("", "A zip from `finetune prepare` used only for the validation loss; empty = none.")


@dataclass
class DatasetEntry:
    path: str = _field("", "Dataset zip from `finetune prepare`.")
    repeats: int = _field(1, "How many times each image of this zip appears per epoch.", ge=1, le=1000)


@dataclass
class TrainConfig:
    steps: int = _field(1000, "Optimizer steps.", ge=1)
    seed: int = _field(0, "Seeds noise, sigmas, caption dropout, data order and LoRA init.", ge=0)
    resolution: list[int] = _field([512, 768, 1024], "Bucket resolutions in pixels (area res²); multiples of 16.")
    batch_size: int = _field(1, "Images per optimizer step across all processes, before accumulation.", ge=1)
    gradient_accumulation: int = _field(1, "Micro-batches accumulated per optimizer step.", ge=1)
    learning_rate: float = _field(1e-4, "Peak learning rate.", ge=0.0, le=1.0)
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = _field("adamw", "adamw8bit needs CUDA + bitsandbytes.")
    weight_decay: float = _field(1e-4, "Decoupled weight decay.", ge=0.0)
    lr_scheduler: Literal["constant", "cosine"] = _field("constant", "Schedule after warm-up.")
    warmup_steps: int = _field(0, "Linear warm-up steps.", ge=0)
    max_grad_norm: float = _field(1.0, "Gradient clipping norm; 0 disables clipping.", ge=0.0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _field("auto", "auto: bf16 on CUDA, none on CPU.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _field(
        "auto", "Base weights dtype; auto: bfloat16 on CUDA, float32 on CPU."
    )
    gradient_checkpointing: bool = _field(False, "Trade ~30% speed for much less activation memory.")
    quantize: Literal["auto", "none", "int8"] = _field(
        "auto",
        "int8: frozen transformer weights in int8 (torchao), half of bf16, so FLUX.1 trains on 24 GB; "
        "auto: int8 on CUDA GPUs under 36 GiB.",
    )
    caption_dropout: float = _field(
        0.05, "Probability of training on the empty caption; FLUX.2 [klein] uses 0.1 unless set.", ge=0.0, le=1.0
    )
    sigma_sampling: str = _field(
        "flux_shift",
        "flux_shift (logit-normal + resolution shift; flux2_shift is the same), logit_normal, uniform, or shift=N.",
        pattern=SIGMA_SAMPLING_RE,
    )
    guidance: float = _field(
        1.0, "Guidance embedding while training FLUX.1-dev and FLUX.2-dev (schnell and klein have none).", ge=0.0
    )
    max_sequence_length: int = _field(
        0, "Text tokens; 0 = the family's: 512 (FLUX.1-dev, FLUX.2), 256 (FLUX.1-schnell).", ge=0, le=512
    )
    allow_distilled: bool = _field(
        False, "Train on a step-distilled FLUX.2 [klein] or FLUX 3 checkpoint anyway (LoRAs trained on it collapse)."
    )
    save_every: int = _field(250, "Checkpoint every N steps; 0 saves only at the end.", ge=0)
    keep_checkpoints: int = _field(3, "Keep the newest N checkpoints of a run, delete older ones; 0 keeps all.", ge=0)
    cache_dir: str = _field("", "Latent/text cache; empty = $FINETUNE_HOME/cache, shared by all runs.")
    output_dir: str = _field("", "Run folder; empty = runs/<name>-<timestamp>.")
    compile: bool = _field(
        False, "torch.compile the transformer blocks: faster steps after a one-off compile (about a minute)."
    )
    device: str = _field("auto", "auto, cpu, cuda, cuda:N.")
    wandb_project: str = _field(
        "",
        "Opt in: also log metrics and samples to this W&B project (needs wandb and WANDB_API_KEY or `wandb login`).",
    )
    flip: bool = _field(
        False,
        "Train on horizontally flipped copies too (cached, half the draws); off: text and asymmetric subjects "
        "(a parting, a logo) learn both ways.",
    )
    preservation: PreservationConfig = field(
        default_factory=PreservationConfig, metadata=_meta("Differential output preservation.")
    )
    regularization: RegularizationConfig = field(
        default_factory=RegularizationConfig, metadata=_meta("Regularisation (prior preservation) images.")
    )
    ema: EmaConfig = field(default_factory=EmaConfig, metadata=_meta("EMA of the LoRA weights."))
    validation: ValidationConfig = field(default_factory=ValidationConfig, metadata=_meta("Held-out validation."))


@dataclass
class SampleConfig:
    prompts: list[str] = _field(list(DEFAULT_PROMPTS), "Prompts rendered during training; [trigger] is replaced.")
    seeds: list[int] = _field([42], "One image per prompt and seed.")
    every: int = _field(250, "Render samples every N steps (and at step 0); 0 disables.", ge=0)
    steps: int = _field(0, "Sampling steps; 0 = the base model's default.", ge=0)
    guidance: float = _field(0.0, "Guidance scale; 0 = the base model's default.", ge=0.0)
    size: int = _field(0, "Square sample size in pixels; 0 = the base model's default.", ge=0)
    inputs: list[str] = _field(
        [],
        "Edit LoRAs: one input image per prompt, a path or dataset:<stem> (that pair of the dataset zip is held out "
        "of training; its instruction is the prompt unless sample.prompts is set). Empty with a pair zip: its first "
        "two pairs' references and instructions, kept in training.",
    )
    preview_model: str = _field(
        "",
        "FLUX.2 [klein] only: also render every sample on this model with the trained LoRA (e.g. the distilled "
        "black-forest-labs/FLUX.2-klein-4B at its 4 steps, CFG 1: the model people deploy).",
    )


@dataclass
class RemoteConfig:
    trainer: str = _field(
        "ostris/flux-dev-lora-trainer",
        "Replicate trainer, owner/name or owner/name:version. The default trains FLUX.1 [dev]; with a FLUX.1 Kontext "
        "base it becomes replicate/fast-flux-kontext-trainer. Any other trainer model (your own Cog trainer) gets "
        "the dataset and remote.inputs only.",
    )
    destination: str = _field("", "Replicate model that receives the version; empty = the config's output.")
    hardware: str = _field("cpu", "Hardware of the destination model when it is created.")
    hf_repo_id: str = _field("", "Opt in: the trainer pushes the LoRA to this Hugging Face repo (needs HF_TOKEN).")
    wandb_project: str = _field("", "Opt in: the trainer logs to this W&B project (needs WANDB_API_KEY).")
    webhook: str = _field("", "URL Replicate posts training events to.")
    webhook_events: list[str] = _field(
        ["start", "completed"], "Events sent to the webhook: any of start, output, logs, completed."
    )
    instruction: str = _field(
        "",
        "Kontext trainer: the edit instruction for pairs without <stem>.txt, sent as kontext_prompt_instruction.",
    )
    inputs: dict[str, Any] = _field(
        {},
        "Extra trainer inputs by name (remote.inputs.NAME=VALUE), checked against the trainer version's "
        "TrainingInput schema; one that the config also maps replaces the mapped value.",
    )


@dataclass
class Config:
    base_model: str = _field(
        "black-forest-labs/FLUX.1-dev",
        "Hub id, local diffusers folder, or a random-weight preset: preset:tiny|small (FLUX.1), "
        "preset:kontext-tiny|kontext-small (FLUX.1 Kontext), preset:flux2-tiny|flux2-small|flux2-dev-tiny (FLUX.2), "
        "preset:flux3-tiny|flux3-small (FLUX 3 Image Klein).",
    )
    output: str = _field("local/flux-lora", "Registry model (owner/name) that receives the new version.")
    dataset: str | list[str | DatasetEntry] = _field(
        "",
        "Dataset zip from `finetune prepare` (or an https:// URL for the remote backend); local training also takes "
        "a list of zips or {path, repeats} entries.",
    )
    trigger_word: str = _field("TOK", "Word that names the subject or style in captions and prompts.")
    backend: Literal["local", "replicate"] = _field("local", "Where training runs.")
    lora: LoraConfig = field(default_factory=LoraConfig, metadata=_meta("LoRA adapter."))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=_meta("Local training."))
    sample: SampleConfig = field(default_factory=SampleConfig, metadata=_meta("Samples during training."))
    remote: RemoteConfig = field(default_factory=RemoteConfig, metadata=_meta("Replicate backend."))
    explicit: frozenset[str] = field(default=frozenset(), compare=False, repr=False, metadata={"internal": True})
    """Dotted keys the user set (in the file or as overrides); the remote backend reports those it cannot honour."""


class ConfigError(ValueError):
    """One or more problems in a config; ``errors`` holds one message per problem."""

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = errors
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"{len(errors)} problem(s){where}:\n" + "\n".join(f"  - {e}" for e in errors))


# ---- schema walking -------------------------------------------------------------------------------------------


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. ``lora.rank``."""
    keys = []
    hints = _hints(cls)
    for name in _fields(cls):
        if dataclasses.is_dataclass(hints[name]):
            keys += all_keys(hints[name], f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _did_you_mean(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not match:  # a key placed in the wrong section: `rank` for `lora.rank`
        tail = key.rsplit(".", 1)[-1]
        match = [c for c in candidates if c.rsplit(".", 1)[-1] == tail][:1]
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        return f"mapping of {_type_name(key_tp)} to {_type_name(value_tp)}"
    if tp is Any:
        return "any value"
    if dataclasses.is_dataclass(tp):
        return "{" + ", ".join(_fields(tp)) + "} mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Convert ``value`` to the declared type ``tp`` or raise ValueError with a short reason."""
    if tp is Any:  # passed as YAML gave it (remote.inputs values: the trainer's schema checks them)
        return value
    if dataclasses.is_dataclass(tp):  # a mapping inside a list (dataset: [{path, repeats}])
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"must be a mapping of {', '.join(_fields(tp))}")
        errors: list[str] = []
        built = _build(tp, value, "", errors, candidates=list(_fields(tp)))
        if errors:
            raise ValueError("; ".join(errors))
        return built
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"must be one of {', '.join(repr(c) for c in choices)}{hint}")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except ValueError as e:
                if arg not in (str, int, float, bool):  # a list or mapping says which part is wrong: keep that
                    errors.append(str(e))
        detail = next((e for e in errors if not e.startswith("must be")), "")
        raise ValueError(detail or f"must be {_type_name(tp)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item_tp is not str:
            value = [v for v in str(value).split(",") if v.strip()] if isinstance(value, str) else [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be a {_type_name(tp)}")
        return [_coerce(v, item_tp) for v in value]
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if value is None:  # `inputs:` with nothing under it
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"must be a {_type_name(tp)}, e.g. {{name: value}}")
        return {_coerce(k, key_tp): _coerce(v, value_tp) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        raise ValueError("must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError("must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
            try:
                as_float = float(value)
            except ValueError:
                pass
            else:
                if as_float.is_integer():
                    return int(as_float)
        raise ValueError("must be an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError("must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ValueError("must be a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError("must be a string")
    raise TypeError(f"unsupported config type {tp!r}")


def _check_bounds(key: str, value: Any, meta: dict, errors: list[str]) -> None:
    ge, le, pattern = meta.get("ge"), meta.get("le"), meta.get("pattern")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (ge is not None and value < ge) or (le is not None and value > le):
            lo = "-inf" if ge is None else f"{ge:g}"
            hi = "inf" if le is None else f"{le:g}"
            errors.append(f"{key}: {value!r} is out of range; allowed [{lo}, {hi}]")
    if pattern is not None and isinstance(value, str) and not pattern.match(value):
        errors.append(f"{key}: {value!r} is not valid; {meta['doc']}")


def _build(cls: type, data: dict, prefix: str, errors: list[str], candidates: list[str] | None = None) -> Any:
    fields = _fields(cls)
    hints = _hints(cls)
    candidates = all_keys(Config) if candidates is None else candidates
    kwargs = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in fields:
            errors.append(f"unknown key '{dotted}'{_did_you_mean(dotted, candidates)}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if value is None:
                continue
            if not isinstance(value, dict):
                errors.append(f"{dotted}: must be a mapping of {', '.join(_fields(tp))}")
                continue
            kwargs[key] = _build(tp, value, dotted + ".", errors)
            continue
        try:
            coerced = _coerce(value, tp)
        except ValueError as e:
            errors.append(f"{dotted}: {value!r} {e}")
            continue
        _check_bounds(dotted, coerced, fields[key].metadata, errors)
        kwargs[key] = coerced
    return cls(**kwargs)


def _validate(cfg: Config, errors: list[str]) -> None:
    """Cross-field checks that a single field's type and range cannot express."""
    for res in cfg.train.resolution:
        if res <= 0 or res % 16:
            errors.append(
                f"train.resolution: {res} is not a positive multiple of 16 (FLUX: VAE ×8 then 2×2 packing); "
                f"try {max(16, round(res / 16) * 16)}"
            )
    if not cfg.train.resolution:
        errors.append("train.resolution: needs at least one resolution, e.g. [512]")
    if not OUTPUT_RE.match(cfg.output):
        errors.append(f"output: {cfg.output!r} must look like owner/name (letters, digits, '-', '_', '.')")
    if not cfg.trigger_word.strip():
        errors.append("trigger_word: must not be empty")
    if isinstance(cfg.lora.targets, str) and cfg.lora.targets not in ("all-linear", "attention"):
        errors.append(f"lora.targets: {cfg.lora.targets!r} must be 'all-linear', 'attention' or a list of modules")
    if isinstance(cfg.lora.targets, list) and not cfg.lora.targets:
        errors.append("lora.targets: an empty list trains nothing")
    _validate_training_data(cfg, errors)
    bad_events = sorted(set(cfg.remote.webhook_events) - {"start", "output", "logs", "completed"})
    if bad_events:
        errors.append(f"remote.webhook_events: {bad_events} not allowed; use start, output, logs, completed")
    if cfg.remote.destination and not OUTPUT_RE.match(cfg.remote.destination):
        errors.append(f"remote.destination: {cfg.remote.destination!r} must look like owner/name")
    if "\n" in cfg.remote.instruction.strip():
        errors.append("remote.instruction: must be one line (it is the instruction of every uncaptioned pair)")
    for name, value in cfg.remote.inputs.items():
        if not INPUT_NAME_RE.match(name):
            errors.append(f"remote.inputs: {name!r} is not an input name (letters, digits and '_', as Cog names them)")
        elif any(word in name.lower() for word in SECRET_WORDS) and not ENV_VALUE_RE.match(str(value)):
            errors.append(
                f"remote.inputs.{name}: a secret never goes into a config (`finetune config show`, run folders and "
                f"lineage would hold it); export it and write `{name}: env:{name.upper()}`, read when submitting"
            )
        elif not _json_value(value):
            errors.append(
                f"remote.inputs.{name}: {value!r} is a {type(value).__name__}, which JSON cannot carry; quote it "
                "to send it as a string"
            )


def _validate_training_data(cfg: Config, errors: list[str]) -> None:
    """The dataset list and the issue-16 sections (preservation, regularisation, EMA, validation)."""
    if isinstance(cfg.dataset, list):
        if not cfg.dataset:
            errors.append("dataset: an empty list trains nothing; give a zip or a list of zips")
        for i, entry in enumerate(cfg.dataset):
            path = entry if isinstance(entry, str) else entry.path
            if not path.strip():
                errors.append(f"dataset[{i}]: needs a path, e.g. {{path: data/tok.zip, repeats: 2}}")
            elif path.startswith(("https://", "http://")):
                errors.append(f"dataset[{i}]: {path} is a URL; a dataset list takes local zips (local training)")
        if cfg.backend == "replicate":
            errors.append(
                "dataset: a list of zips (with repeats) trains locally only; Replicate's trainers take one zip: "
                "set backend: local, or merge the folders with one `finetune prepare A B -o all.zip`"
            )
    pres = cfg.train.preservation
    word = pres.class_word.strip()
    if pres.class_word and (not word or "\n" in word or "[trigger]" in word):
        errors.append(f"train.preservation.class_word: {pres.class_word!r} must be a word or phrase, e.g. person")
    elif word and word == cfg.trigger_word.strip():
        errors.append(
            f"train.preservation.class_word: {word!r} is the trigger word; name the class the subject belongs to "
            "(person, dog, style), which the LoRA must leave as the base model draws it"
        )
    if cfg.train.ema.decay >= 1.0:
        errors.append("train.ema.decay: must be below 1 (1 would never move); 0.99 is typical, 0 turns EMA off")
    val = cfg.train.validation
    if val.split and val.dataset:
        errors.append(
            "train.validation: set split (hold out a share of the training images) or dataset (a separate zip), "
            "not both"
        )


def _json_value(value: Any) -> bool:
    """True for what a JSON request body carries as is (YAML also reads dates and timestamps)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, list):
        return all(_json_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_value(v) for k, v in value.items())
    return False


def _flatten(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in data.items():
        if isinstance(v, dict):
            keys |= _flatten(v, f"{prefix}{k}.")
        else:
            keys.add(f"{prefix}{k}")
    return keys


# ---- public API ----------------------------------------------------------------------------------------------


def parse_config(data: dict | None, source: str | None = None) -> Config:
    """Build and validate a Config from a plain mapping (as read from YAML). Raises ConfigError with every problem."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping of keys, got {type(data).__name__}"], source)
    errors: list[str] = []
    cfg = _build(Config, data, "", errors)  # a field with a bad value keeps its default, so cross-checks still run
    _validate(cfg, errors)
    if errors:
        raise ConfigError(errors, source)
    return dataclasses.replace(cfg, explicit=frozenset(_flatten(data)))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides (``lora.rank=32``) to a raw mapping; values are parsed as YAML scalars."""
    data = dict(data)
    errors = []
    for item in overrides:
        if "=" not in item:
            errors.append(f"override {item!r} must look like key=value, e.g. lora.rank=32")
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    if errors:
        raise ConfigError(errors, "overrides")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    data: dict = {}
    source = str(path) if path else "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist"], str(path))
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError([f"not valid YAML: {e}"], str(path)) from None
        if not isinstance(data, dict):
            raise ConfigError([f"the top level must be a mapping of keys, got {type(data).__name__}"], str(path))
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides"
    return parse_config(data, source)


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as a plain mapping (every default written out), without internal fields."""
    out = {}
    for name in _fields(type(cfg)):
        value = getattr(cfg, name)
        if isinstance(value, list):
            value = [config_to_dict(v) if dataclasses.is_dataclass(v) else v for v in value]
        out[name] = config_to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def dump_config(cfg: Config) -> str:
    """YAML text of the resolved config; loading it back gives an equal Config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
