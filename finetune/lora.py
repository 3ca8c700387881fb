"""LoRA on the FLUX transformer: target presets, peft injection, the diffusers-format file (exports: lora_export.py).

The file this module writes (``lora.safetensors``) is the project's LoRA contract:

- keys ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` (diffusers/peft names, no ``base_model.model.``
  prefix, which ComfyUI and diffusers both ignore for FLUX), tensors in the trained parameters' dtype (fp32 under
  peft's default adapter-dtype policy, even on a bf16 base), so a resumed run continues from exactly what was trained;
- when ``alpha != rank``, one ``transformer.<module>.alpha`` float32 scalar per module: loaders that ignore
  safetensors metadata (ComfyUI) then apply the trained scale ``alpha / rank`` instead of 1.0, and diffusers reads
  them as ``network_alphas``;
- safetensors metadata: ``finetune.rank``, ``finetune.alpha``, ``finetune.base_model``, ``finetune.trigger_word``,
  ``finetune.targets``, ``format``, and diffusers' own ``lora_adapter_metadata`` only when no ``.alpha`` tensors are
  written (diffusers 0.42.1 ``PeftAdapterMixin.load_lora_adapter`` raises "Both `network_alphas` and `metadata`
  cannot be specified." when it gets both);
- a fixed byte form: tensors and metadata keys sorted, no timestamps or paths, so equal weights give equal bytes and
  thus equal registry version ids.

Exports to kohya and ComfyUI forms live in ``lora_export.py``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import EXIT_USAGE, FinetuneError
from finetune.files import write_atomic

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "ADAPTER_NAME",
    "TARGET_PRESETS",
    "add_lora",
    "check_rank",
    "fixed_safetensors_bytes",
    "ema_weights",
    "in_blocks",
    "load_lora_file",
    "lora_disabled",
    "lora_file_settings",
    "lora_parameters",
    "lora_state_dict",
    "modules_of",
    "resolve_target_modules",
    "save_lora",
    "set_lora_state",
    "update_ema",
]

ADAPTER_NAME = "default"
# FLUX.1/FLUX.2 double and single blocks; FLUX 3's per-mode blocks of the text and the noisy image, and its joint
# single blocks (its reference blocks, mode_blocks.image_cond, only run for edits, which FLUX 3 does not train yet)
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.", "txt_mode_blocks.", "mode_blocks.image.")
TARGET_PRESETS: dict[str, str] = {
    "all-linear": "every nn.Linear inside transformer_blocks and single_transformer_blocks (attention q/k/v/out, "
    "add_*_proj, to_add_out, ff/ff_context, proj_mlp, proj_out, norm*.linear); embedders and final layer excluded",
    "attention": "the attention projections inside the blocks only (attn.to_q/k/v, attn.to_out.0, attn.add_*_proj, "
    "attn.to_add_out)",
}
_PREFIX = "transformer."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".alpha")


# ---------------------------------------------------------------------------------------------------------- targets


def _linear_names(transformer: nn.Module) -> list[str]:
    """Names of the model's Linear layers in model order; a peft-wrapped layer counts under its wrapper's name."""
    from torch import nn

    names = []
    for name, module in transformer.named_modules():
        if not isinstance(module, nn.Linear) or ".lora_" in f".{name}":
            continue
        names.append(name.removesuffix(".base_layer"))
    return names


def in_blocks(name: str) -> bool:
    return name.startswith(BLOCK_PREFIXES)


def _did_you_mean(entry: str, names: list[str]) -> str:
    """A close suffix of a real module name, e.g. 'attn.to_q' for 'atn.to_q'."""
    candidates = set()
    for name in names:
        parts = name.split(".")
        candidates |= {".".join(parts[i:]) for i in range(len(parts)) if not parts[i].isdigit()}
    match = difflib.get_close_matches(entry, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def resolve_target_modules(transformer: nn.Module, targets: str | list[str]) -> list[str]:
    """The concrete Linear module names that ``targets`` selects, in model order.

    ``targets`` is a preset name from ``TARGET_PRESETS`` or a list of module-name suffixes (``"attn.to_q"``,
    ``"proj_mlp"``, or a full name such as ``"transformer_blocks.0.ff.net.2"``); a suffix matches whole name
    components only. An entry that matches no Linear layer is an error naming it, with a did-you-mean.
    """
    names = _linear_names(transformer)
    if isinstance(targets, str):
        if targets == "all-linear":
            return [n for n in names if in_blocks(n)]
        if targets == "attention":
            return [n for n in names if in_blocks(n) and ".attn." in n]
        hint = difflib.get_close_matches(targets, list(TARGET_PRESETS), n=1)
        hint_text = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise FinetuneError(
            f"lora.targets: unknown preset {targets!r}{hint_text}; use one of {', '.join(TARGET_PRESETS)} "
            "or a list of module-name suffixes such as ['attn.to_q', 'attn.to_k']",
            EXIT_USAGE,
        )
    if not targets:
        raise FinetuneError("lora.targets: an empty list trains nothing; name at least one module", EXIT_USAGE)
    chosen: set[str] = set()
    unknown = []
    for entry in targets:
        suffix = entry.removeprefix(_PREFIX)
        hits = [n for n in names if n == suffix or n.endswith(f".{suffix}")]
        if not hits:
            unknown.append(f"{entry!r}{_did_you_mean(suffix, names)}")
        chosen.update(hits)
    if unknown:
        raise FinetuneError(
            f"lora.targets: {', '.join(unknown)} matches no Linear layer of the transformer; list module-name "
            "suffixes such as 'attn.to_q' or 'ff.net.2', or use the preset 'all-linear' or 'attention'",
            EXIT_USAGE,
        )
    return [n for n in names if n in chosen]


def _exact_pattern(modules: list[str]) -> str:
    """A peft ``target_modules`` regex that matches exactly these names (peft fullmatches a string target).

    A list would also match by suffix, so a top-level ``proj_out`` would silently pull in every
    ``single_transformer_blocks.N.proj_out`` too.
    """
    return "^(?:" + "|".join(re.escape(m) for m in sorted(modules)) + ")$"


# -------------------------------------------------------------------------------------------------------- injection


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and type(model).__name__ == "DistributedDataParallel":
            inner = model.module
        if inner is None:
            return model
        model = inner


def add_lora(
    transformer: nn.Module,
    *,
    rank: int,
    alpha: float,
    targets: str | list[str],
    dropout: float = 0.0,
    seed: int | None = None,
    fused: bool = True,
) -> list[str]:
    """Inject a peft LoRA (adapter ``"default"``) into ``transformer``, freeze everything else, return the modules.

    ``fused`` makes each wrapped Linear a ``fused_lora.FusedLoraLinear`` (peft's layer with a one-node forward and
    backward); ``False`` keeps peft's own layer class. Either way the parameters, names and files are peft's.

    With ``seed`` the LoRA init (peft's default: kaiming-uniform A, zero B) is drawn from a forked CPU RNG seeded
    with it, so it is the same on every device and leaves the global RNG untouched.
    """
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from torch import nn

    if not 1 <= int(rank) <= 256:
        raise FinetuneError(f"lora.rank: {rank} is out of range; use 1 to 256 (16 is the default)", EXIT_USAGE)
    if alpha <= 0:
        raise FinetuneError(f"lora.alpha: {alpha} must be > 0 (the scale is alpha / rank)", EXIT_USAGE)
    if not 0.0 <= dropout < 1.0:
        raise FinetuneError(f"lora.dropout: {dropout} must be in [0, 1)", EXIT_USAGE)
    if ADAPTER_NAME in (getattr(transformer, "peft_config", None) or {}):
        raise FinetuneError("the transformer already has a LoRA adapter; build a fresh model for a new one", 1)
    modules = resolve_target_modules(transformer, targets)
    config = PeftLoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=_exact_pattern(modules),
        init_lora_weights=True,
    )
    if fused:
        from finetune.fused_lora import FusedLoraLinear

        config._register_custom_module({nn.Linear: FusedLoraLinear})  # peft's extension point for layer classes
    transformer.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if hasattr(transformer, "add_adapter"):  # diffusers' PeftAdapterMixin: also enables (disable_)adapters()
            transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, transformer, adapter_name=ADAPTER_NAME)
    for name, param in transformer.named_parameters():
        param.requires_grad_(f".lora_A.{ADAPTER_NAME}." in name or f".lora_B.{ADAPTER_NAME}." in name)
    return modules


def lora_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA parameters, in model order."""
    params = [
        p
        for name, p in _unwrap(transformer).named_parameters()
        if p.requires_grad and (f".lora_A.{ADAPTER_NAME}." in name or f".lora_B.{ADAPTER_NAME}." in name)
    ]
    if not params:
        raise FinetuneError("the transformer has no trainable LoRA parameters; call add_lora first", 1)
    return params


def _lora_params_by_key(transformer: nn.Module) -> dict[str, nn.Parameter]:
    """File key (``transformer.<module>.lora_A.weight``) → the model's LoRA parameter."""
    out = {}
    for name, p in _unwrap(transformer).named_parameters():
        for part in ("lora_A", "lora_B"):
            tag = f".{part}.{ADAPTER_NAME}.weight"
            if name.endswith(tag):
                out[f"{_PREFIX}{name.removesuffix(tag)}.{part}.weight"] = p
    return out


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor: gathered from every process), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def lora_state_dict(transformer: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The LoRA weights under diffusers keys, as contiguous CPU tensors in the parameter dtype (or ``dtype``).

    Under FSDP the parameters are shards: every process must call this (it gathers them), as FSDP's own
    state-dict calls require."""
    params = _lora_params_by_key(transformer)
    if not params:
        raise FinetuneError("the transformer has no LoRA adapter; call add_lora first", 1)
    return {
        k: _full(p.detach()).to(device="cpu", dtype=dtype or p.dtype, copy=True).contiguous()
        for k, p in params.items()
    }


def set_lora_state(transformer: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a LoRA state dict (as written by ``save_lora``) into an injected model; every key must match.

    ``.alpha`` tensors are checked against the model's adapter alpha, so a file is never resumed at another scale.
    """
    import torch

    model = _unwrap(transformer)
    params = _lora_params_by_key(model)
    if not params:
        raise FinetuneError("the transformer has no LoRA adapter; call add_lora with the file's rank first", 1)
    weights = {k: v for k, v in state_dict.items() if not k.endswith(".alpha")}
    missing = sorted(set(params) - set(weights))
    extra = sorted(set(weights) - set(params))
    if missing or extra:
        raise FinetuneError(
            f"LoRA weights do not match the model's adapter: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(extra)} unexpected (e.g. {extra[:3]}); inject with the same lora.targets as the file was trained "
            "with",
            EXIT_USAGE,
        )
    for key, tensor in weights.items():
        if tuple(tensor.shape) != tuple(params[key].shape):
            raise FinetuneError(
                f"LoRA weight {key} has shape {tuple(tensor.shape)}, the model expects {tuple(params[key].shape)}; "
                "inject with the file's rank",
                EXIT_USAGE,
            )
    modules = dict(model.named_modules())
    for key in (k for k in state_dict if k.endswith(".alpha")):
        layer = modules.get(key.removeprefix(_PREFIX).removesuffix(".alpha"))
        if layer is None or not hasattr(layer, "lora_alpha"):
            raise FinetuneError(f"LoRA file has {key} but the model has no such LoRA module", EXIT_USAGE)
        if abs(float(state_dict[key]) - float(layer.lora_alpha[ADAPTER_NAME])) > 1e-6:
            raise FinetuneError(
                f"{key} is {float(state_dict[key])} but the model's adapter has alpha "
                f"{layer.lora_alpha[ADAPTER_NAME]}; inject with the file's lora.alpha",
                EXIT_USAGE,
            )
    with torch.no_grad():
        for key, tensor in weights.items():
            param = params[key]
            tensor = tensor.to(device=param.device, dtype=param.dtype)
            if hasattr(param, "device_mesh"):  # an FSDP2 shard: every process keeps its part of the whole tensor
                from torch.distributed.tensor import distribute_tensor

                tensor = distribute_tensor(tensor, param.device_mesh, param.placements)
            param.copy_(tensor)


# ---------------------------------------------------------------------------------------------- EMA and disabling


def ema_weights(transformer: nn.Module, device: str | torch.device) -> dict[str, torch.Tensor]:
    """A float32 copy of the whole LoRA weights under their file keys, on ``device``: the start of an EMA. Under FSDP
    every process must call it (the shards are gathered) and holds the whole EMA."""
    import torch

    return {
        k: _full(p.detach()).to(device=device, dtype=torch.float32, copy=True)
        for k, p in _lora_params_by_key(transformer).items()
    }


def update_ema(ema: dict[str, torch.Tensor], transformer: nn.Module, decay: float) -> None:
    """``ema ← decay · ema + (1 − decay) · w`` for every LoRA weight ``w``, in place, after an optimizer step.

    The EMA of ai-toolkit's ``ema_config`` and SimpleTuner's ``--use_ema`` (reference/local-trainers.md §1, §4),
    without warm-up, started from the initial LoRA. ``torch.lerp(ema, w, 1 − decay)`` is the same update.
    """
    import torch

    with torch.no_grad():
        for key, param in _lora_params_by_key(transformer).items():  # FSDP: every process gathers, as for a save
            e = ema[key]
            e.lerp_(_full(param.detach()).to(device=e.device, dtype=e.dtype), 1.0 - decay)


@contextlib.contextmanager
def lora_disabled(transformer: nn.Module) -> Iterator[None]:
    """Run ``transformer`` as the base model: every LoRA layer skips its adapter (peft's ``disable_adapters``).

    peft's own switch (``enable_adapters(False)``) also sets ``requires_grad=False`` on the adapter and turning it
    back on sets it again, which DDP and the optimizer must not see mid-step; this sets only the flag peft's forward
    reads. ``fused_lora.FusedLoraLinear`` then takes peft's path, which calls the base layer alone.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in _unwrap(transformer).modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, was in zip(layers, before, strict=True):
            m._disable_adapters = was


# ------------------------------------------------------------------------------------------------------------ files


def modules_of(state_dict: dict[str, torch.Tensor], what: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``module → (A, B)`` from a diffusers-key LoRA state dict; malformed keys are an error naming them."""
    bad = [k for k in state_dict if not (k.startswith(_PREFIX) and k.endswith(_SUFFIXES))]
    if bad:
        raise FinetuneError(
            f"{what}: keys {bad[:3]} are not diffusers LoRA keys (transformer.<module>.lora_A.weight / "
            ".lora_B.weight / .alpha)",
            EXIT_USAGE,
        )
    out = {}
    for key in sorted(k for k in state_dict if k.endswith(".lora_A.weight")):
        module = key.removeprefix(_PREFIX).removesuffix(".lora_A.weight")
        b_key = f"{_PREFIX}{module}.lora_B.weight"
        if b_key not in state_dict:
            raise FinetuneError(f"{what}: {key} has no matching {b_key}", EXIT_USAGE)
        out[module] = (state_dict[key], state_dict[b_key])
    orphans = [
        k for k in state_dict if k.endswith(".lora_B.weight") and k.replace("lora_B", "lora_A") not in state_dict
    ]
    if orphans:
        raise FinetuneError(f"{what}: {orphans[:3]} have no matching lora_A weight", EXIT_USAGE)
    if not out:
        raise FinetuneError(f"{what}: no LoRA weights (transformer.<module>.lora_A.weight) found", EXIT_USAGE)
    return out


def check_rank(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, what: str) -> None:
    for module, (a, b) in modules.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise FinetuneError(
                f"{what}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which is not rank {rank}",
                EXIT_USAGE,
            )


def _format_number(x: float) -> str:
    """``16`` for 16.0, ``0.5`` for 0.5: the shortest exact text for a metadata value."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def fixed_safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes in one fixed form: tensors sorted by name, metadata keys sorted, compact JSON header.

    safetensors (0.8) serialises ``__metadata__`` from a Rust HashMap, whose order differs between processes
    (measured: three runs, three byte strings), so the header is re-emitted here with sorted keys. The tensor
    part is the library's own (deterministic for a given dict), and the header keeps its format: a little-endian
    u64 length, UTF-8 JSON, space padding to a multiple of 8 bytes.
    """
    import safetensors.torch

    raw = safetensors.torch.save(dict(sorted(tensors.items())))
    n = int.from_bytes(raw[:8], "little")
    entries = json.loads(raw[8 : 8 + n])
    header = {"__metadata__": dict(sorted(metadata.items())), **entries}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


def save_lora(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    base_model: str,
    trigger_word: str,
    targets: str | list[str],
    dtype: torch.dtype | None = None,
    alpha_keys: bool = True,
) -> Path:
    """Write the LoRA file (the contract in this module's docstring) atomically, in a fixed byte form.

    ``.alpha`` tensors already in ``state_dict`` are dropped and re-derived from ``alpha`` (always float32).
    ``dtype`` casts the A/B tensors (None keeps theirs). ``alpha_keys=False`` never writes ``.alpha`` tensors and
    always writes diffusers' adapter metadata instead: diffusers' FLUX.2 loader refuses ``transformer.*.alpha`` keys
    ("Invalid adapter checkpoint") and reads the trained scale from the metadata.
    """
    import torch

    modules = modules_of(state_dict, "save_lora")
    check_rank(modules, rank, "save_lora")
    tensors = {
        k: v.detach().to(device="cpu", dtype=dtype or v.dtype).contiguous()
        for k, v in state_dict.items()
        if not k.endswith(".alpha")
    }
    metadata = {
        "format": "pt",
        "finetune.rank": str(int(rank)),
        "finetune.alpha": _format_number(alpha),
        "finetune.base_model": str(base_model),
        "finetune.trigger_word": str(trigger_word),
        "finetune.targets": targets if isinstance(targets, str) else json.dumps(list(targets)),
    }
    if alpha_keys and float(alpha) != float(rank):
        for module in modules:
            tensors[f"{_PREFIX}{module}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    else:
        # diffusers builds the adapter from this instead of inferring it; an exact-name regex, as in add_lora.
        metadata["lora_adapter_metadata"] = json.dumps(
            {
                f"{_PREFIX}r": int(rank),
                f"{_PREFIX}lora_alpha": float(alpha),
                f"{_PREFIX}target_modules": _exact_pattern(list(modules)),
            },
            sort_keys=True,
        )
    return write_atomic(Path(path), fixed_safetensors_bytes(tensors, metadata))


def load_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA safetensors file: ``(tensors, metadata)``; a missing or unreadable file is a clear error."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"LoRA file {path} does not exist", EXIT_USAGE)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise FinetuneError(f"LoRA file {path} is not a readable safetensors file ({e})", EXIT_USAGE) from e
    return tensors, metadata


def lora_file_settings(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[int, float]:
    """``(rank, alpha)`` of a diffusers-key LoRA file, also for files this toolkit did not write.

    Sources in order: ``finetune.rank``/``finetune.alpha`` metadata; the lora_A row count; ``.alpha`` tensors;
    diffusers' ``lora_adapter_metadata``; else alpha = rank (what diffusers assumes for a file without alphas).
    """
    modules = modules_of(state_dict, "LoRA file")
    ranks = {a.shape[0] for a, _ in modules.values()}
    if "finetune.rank" in metadata:
        rank = int(metadata["finetune.rank"])
    elif len(ranks) == 1:
        rank = ranks.pop()
    else:
        raise FinetuneError(f"LoRA file mixes ranks {sorted(ranks)}; only a single rank is supported", EXIT_USAGE)
    if "finetune.alpha" in metadata:
        return rank, float(metadata["finetune.alpha"])
    alphas = {float(v) for k, v in state_dict.items() if k.endswith(".alpha")}
    if len(alphas) > 1:
        raise FinetuneError(f"LoRA file mixes alphas {sorted(alphas)}; only a single alpha is supported", EXIT_USAGE)
    if alphas:
        return rank, alphas.pop()
    adapter = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    return rank, float(adapter.get(f"{_PREFIX}lora_alpha", rank))
