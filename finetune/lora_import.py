"""Import a FLUX LoRA in any common form as a registry version in the project's own file (``lora.save_lora``'s).

``import_lora(source, model)`` reads a local ``.safetensors`` file, an ``https://`` URL (streamed, size-capped,
hashed) or ``hf://owner/repo/file.safetensors`` (the Hugging Face cache), and:

1. reads the safetensors header only (``SafetensorsFile``): a pickle is refused before a byte of it is unpickled;
2. reads every key as prefix + module + role (``lora_formats``), and finds the model it fits (``--base``, the file's
   ``finetune.base_model``, else every real FLUX model by shape): every key must land on a Linear of that model
   with the right shape, or the import stops naming the keys (``allow_partial`` skips and records them);
3. converts module by module, reading one tensor at a time: BFL modules that fuse several diffusers modules are split
   exactly (a block-diagonal up weight, as kohya and our exports write it, gives each part its own rank-r A and B;
   a dense one gives each part the whole A and its rows of B, as diffusers' converters do); adaLN rows are swapped
   from BFL's [shift | scale] to diffusers' [scale | shift];
4. keeps each module's scale: ``.alpha / rank`` per module when the file has ``.alpha`` tensors, else the metadata's
   (``finetune.alpha``, diffusers' ``lora_adapter_metadata``, kohya's ``ss_network_alpha``), else 1 (what ComfyUI
   and diffusers apply). The file gets one rank R (the largest; smaller ones padded with zeros, which changes no
   ΔW) and ``alpha = s × R`` with s the most common scale; other modules get ``s_m / s`` baked into B;
5. writes the canonical file atomically, streaming, in the same fixed byte form as ``lora.fixed_safetensors_bytes``,
   and registers it with lineage ``backend: import`` and the source's sha256 and format. The source is only read.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from finetune import lora_formats as F
from finetune.errors import EXIT_USAGE, FinetuneError
from finetune.files import atomic_file, finetune_home, sha256_file

if TYPE_CHECKING:
    import torch

    from finetune.registry import Registry, Version

__all__ = [
    "MAX_DOWNLOAD_BYTES",
    "ImportPlan",
    "SafetensorsFile",
    "fetch_source",
    "import_lora",
    "plan_import",
    "write_canonical",
]

MAX_DOWNLOAD_BYTES = 4 << 30  # 4 GiB: a FLUX.2 [dev] LoRA at rank 128 in fp32 is ~2.5 GiB
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_SHOWN = 20  # keys listed in an error before "… and N more"
_DTYPE_NAMES = ("F64", "F32", "F16", "BF16")
# The order safetensors (0.8, Rust ``Dtype``'s declaration order, largest first) lays tensors out in: dtype, then name.
_LAYOUT_ORDER = {"F64": 0, "F32": 1, "BF16": 2, "F16": 3}


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name]


def _dtype_name(dtype: torch.dtype) -> str:
    import torch

    return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]


# ---------------------------------------------------------------------------------------------------- reading


class SafetensorsFile:
    """A safetensors file read tensor by tensor with plain reads (no mmap: pages of a mapped file would stay in the
    process's RSS). The header is checked before anything else: a pickle (``torch.save``'s zip, a raw pickle) is
    refused without being loaded."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FinetuneError(f"LoRA file {self.path} does not exist", EXIT_USAGE)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            header = None
            if 2 <= n <= min(_MAX_HEADER, size - 8):
                try:
                    header = json.loads(f.read(n))
                except ValueError:
                    header = None
        if not isinstance(header, dict):
            if head[:2] == b"PK" or head[:1] == b"\x80" or self.path.suffix in _PICKLE_SUFFIXES:
                raise FinetuneError(
                    f"{self.path} is a pickle (a torch .ckpt/.pt/.bin file), not safetensors; finetune never loads "
                    "pickles (they can run code). Convert it to .safetensors with a tool you trust, or get the "
                    "safetensors file from its author",
                    EXIT_USAGE,
                )
            raise FinetuneError(f"{self.path} is not a safetensors file (no valid header)", EXIT_USAGE)
        self.data_start = 8 + n
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        self.entries: dict[str, dict] = header
        for key, entry in header.items():
            start, end = entry.get("data_offsets", (0, -1))
            if not 0 <= start <= end <= size - self.data_start:
                raise FinetuneError(f"{self.path}: tensor {key} lies outside the file (truncated?)", EXIT_USAGE)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> str:
        return self.entries[key]["dtype"]

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (a fresh CPU tensor; nothing else of the file stays in memory)."""
        import torch

        entry = self.entries[key]
        if entry["dtype"] not in _DTYPE_NAMES:
            raise FinetuneError(f"{self.path}: {key} has dtype {entry['dtype']}; a LoRA tensor is a float", EXIT_USAGE)
        start, end = entry["data_offsets"]
        buffer = bytearray(end - start)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            f.readinto(buffer)
        dtype = _torch_dtype(entry["dtype"])
        if not buffer:
            return torch.zeros(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


# ---------------------------------------------------------------------------------------------------- the plan

Thunk = Callable[[], "torch.Tensor"]


@dataclass
class _Module:
    """One diffusers module of the canonical file: lazy A and B, their rank, the module's scale and dtypes."""

    name: str
    a: Thunk
    b: Thunk
    rank: int
    columns: int
    rows: int
    scale: float
    dtype: str


@dataclass
class ImportPlan:
    """What an import will write: the chosen model, the modules, and every key not used (with why)."""

    layout: F.Layout
    format: str
    modules: dict[str, _Module]
    skipped: dict[str, str] = field(default_factory=dict)  # key → reason
    zero_parts: list[str] = field(default_factory=list)  # untrained parts of a fused module (all-zero blocks)
    rank: int = 0
    alpha: float = 0.0


def _default_scale(metadata: dict[str, str]) -> float:
    """The scale of a module without an ``.alpha`` tensor, from the file's metadata (see the module docstring)."""
    if "finetune.format" in metadata:  # our exports: alpha is in the .alpha tensors (kohya) or baked into B
        return 1.0
    if "finetune.alpha" in metadata and "finetune.rank" in metadata:
        return float(metadata["finetune.alpha"]) / float(metadata["finetune.rank"])
    if metadata.get("lora_adapter_metadata"):
        try:
            adapter = json.loads(metadata["lora_adapter_metadata"])
        except ValueError:
            adapter = {}
        alpha = adapter.get("transformer.lora_alpha", adapter.get("lora_alpha"))
        rank = adapter.get("transformer.r", adapter.get("r"))
        if alpha and rank:
            return float(alpha) / float(rank)
    try:
        return float(metadata["ss_network_alpha"]) / float(metadata["ss_network_dim"])
    except (KeyError, ValueError, ZeroDivisionError):
        return 1.0


def _file_scale(metadata: dict[str, str]) -> float | None:
    """The scale a file of ours was trained at (``finetune.alpha / finetune.rank``; exports keep it), else None.

    The canonical file uses it as its ``alpha / rank``, so an export that baked it into B (``--format comfyui``)
    imports as the original file, not as an equal ΔW at another alpha."""
    try:
        return float(metadata["finetune.alpha"]) / float(metadata["finetune.rank"])
    except (KeyError, ValueError, ZeroDivisionError):
        return None


def _format_of(parsed: list[F.ParsedKey], layout: F.Layout) -> str:
    """The source format's name (``lora_formats.FORMATS``) from the prefixes and suffixes its keys use: BFL names
    with kohya's lora_down/up are musubi's converter's; bare names are fal's when any is a BFL name or the
    ``sformer_blocks`` alias, else DiffSynth's."""
    names = set()
    styles = {p.style for p in parsed}
    for style in styles:
        keys = [p for p in parsed if p.style == style]
        if style == "bfl":
            names.add("musubi" if any(p.updown for p in keys) else "bfl")
        elif style == "bare":
            fal = any(
                p.module.startswith("sformer_blocks") or getattr(F.resolve_module(p.module, layout), "bfl", False)
                for p in keys
            )
            names.add("fal" if fal else "diffsynth")
        else:
            names.add(style)
    return "+".join(sorted(names)) or "unknown"


def _place(
    st: SafetensorsFile, groups: dict[tuple[str, str], dict[str, str]], layout: F.Layout
) -> tuple[dict[tuple[str, str], F.Target], dict[str, str]]:
    """Each module group's target in ``layout``, and the problem keys (key → reason). Shapes only; no tensor read."""
    placed: dict[tuple[str, str], F.Target] = {}
    problems: dict[str, str] = {}
    for (style, module), roles in groups.items():
        keys = sorted(roles.values())
        if "A" not in roles or "B" not in roles:
            missing = "lora_B/lora_up" if "A" in roles else "lora_A/lora_down"
            problems.update({k: f"has no matching {missing} weight" for k in keys})
            continue
        target = F.resolve_module(module, layout)
        if target is None:
            problems.update({k: f"is not a module of {layout.label}" for k in keys})
            continue
        a, b = st.shape(roles["A"]), st.shape(roles["B"])
        want_b_rows = sum(target.rows)
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[1] != target.columns or b[0] != want_b_rows:
            problems.update(
                {
                    k: f"has shapes A {a}, B {b}; {layout.label} needs A (r, {target.columns}), B ({want_b_rows}, r)"
                    for k in keys
                }
            )
            continue
        if "alpha" in roles and st.shape(roles["alpha"]) not in ((), (1,)):
            problems[roles["alpha"]] = f"is not a scalar (shape {st.shape(roles['alpha'])})"
            continue
        placed[(style, module)] = target
    return placed, problems


def _choose_layout(
    st: SafetensorsFile, groups: dict, unparsed: dict[str, str], base_model: str | None
) -> tuple[F.Layout, dict, dict[str, str]]:
    """The model the file fits best (fewest keys it cannot place), with its placements and problem keys.

    ``base_model`` (--base) restricts the candidates to its shapes; else the file's ``finetune.base_model`` comes
    first, then the real models. Two exact fits of different families (a double-block attention LoRA fits FLUX.1
    [dev] and FLUX.2 [klein] 4B alike: both 3072 wide) is an error asking for --base.
    """
    if base_model:
        candidates = F.layout_for_base(base_model)
    else:
        candidates = []
        hint = st.metadata.get("finetune.base_model")
        if hint:
            try:
                candidates = F.layout_for_base(hint)
            except F.UnsupportedFamily:
                raise
            except FinetuneError:  # a base this toolkit does not know: the file's shapes decide
                candidates = []
        # a base named in the file comes first, so it wins whenever it fits as well as any other
        candidates += [c for c in F.candidate_layouts() if c.base_model not in {h.base_model for h in candidates}]
    results = []
    for layout in candidates:
        placed, problems = _place(st, groups, layout)
        results.append((len(problems), layout, placed, problems))
    best = min(r[0] for r in results)
    fits = [r for r in results if r[0] == best]
    if best == 0 and not base_model and not st.metadata.get("finetune.base_model"):
        families = {r[1].layout for r in fits}
        if len(families) > 1:
            raise FinetuneError(
                f"{st.path}: the LoRA fits {' and '.join(r[1].label for r in fits)} alike (same module names and "
                "shapes); pass --base with the model it was trained on, e.g. --base black-forest-labs/FLUX.1-dev",
                EXIT_USAGE,
            )
    _, layout, placed, problems = fits[0]
    return layout, placed, {**unparsed, **problems}


def _split(
    st: SafetensorsFile, roles: dict[str, str], target: F.Target, scale: float, plan: ImportPlan
) -> list[_Module]:
    """The diffusers modules of one file module: as is, rows swapped (adaLN), or a fused module split exactly.

    Fused split (reference/comfyui-lora-keys.md §4, diffusers' ``_convert_kohya_flux_lora_to_diffusers``): with n
    parts and rank R, a B whose off-diagonal (rows of part j) × (columns of part k ≠ j, R/n each) blocks are all
    zero is block-diagonal: part j is A rows j·R/n… and that B block, rank R/n. Otherwise every part takes all of
    A and its rows of B (rank R). A part whose B block is all zero (an untrained projection) is left out.
    """
    import torch

    a_key, b_key = roles["A"], roles["B"]
    rank = st.shape(a_key)[0]
    dtype = st.dtype(b_key)
    n = len(target.modules)
    if n == 1:
        name = target.modules[0]
        if target.swap:
            half = target.rows[0] // 2

            def b_swapped() -> torch.Tensor:
                b = st.get(b_key)
                return torch.cat([b[half:], b[:half]])

            b_thunk: Thunk = b_swapped
        else:
            b_thunk = lambda: st.get(b_key)  # noqa: E731
        return [_Module(name, lambda: st.get(a_key), b_thunk, rank, target.columns, target.rows[0], scale, dtype)]
    starts = [sum(target.rows[:j]) for j in range(n)]
    up = st.get(b_key)
    sparse = rank % n == 0
    if sparse:
        r = rank // n
        for j in range(n):
            rows = up[starts[j] : starts[j] + target.rows[j]]
            off = torch.cat([rows[:, : j * r], rows[:, (j + 1) * r :]], dim=1)
            if off.any():
                sparse = False
                break
    out = []
    for j, name in enumerate(target.modules):
        lo, hi = starts[j], starts[j] + target.rows[j]
        if sparse:
            r = rank // n
            if not up[lo:hi, j * r : (j + 1) * r].any():
                plan.zero_parts.append(name)
                continue
            a = lambda j=j, r=r: st.get(a_key)[j * r : (j + 1) * r].clone()  # noqa: E731
            b = lambda lo=lo, hi=hi, j=j, r=r: st.get(b_key)[lo:hi, j * r : (j + 1) * r].clone()  # noqa: E731
            out.append(_Module(name, a, b, r, target.columns, hi - lo, scale, dtype))
        else:
            b = lambda lo=lo, hi=hi: st.get(b_key)[lo:hi].clone()  # noqa: E731
            out.append(_Module(name, lambda: st.get(a_key), b, rank, target.columns, hi - lo, scale, dtype))
    del up
    return out


def plan_import(path: str | Path, *, base_model: str | None = None, allow_partial: bool = False) -> ImportPlan:
    """Read ``path``'s header, choose the model it fits and plan every module (tensors are read only to split fused
    modules). Raises FinetuneError (exit 2) naming every key that cannot be imported, unless ``allow_partial``."""
    st = SafetensorsFile(path)
    foreign = sorted(k for k in st.keys() if F.is_foreign(k))
    if foreign:
        kind = "DoRA" if any(k.endswith("dora_scale") for k in foreign) else "LoKr/LoHa/LoCon (LyCORIS)"
        raise FinetuneError(
            f"{st.path} is a {kind} file, not a plain LoRA: {_listing(foreign)}\nfinetune imports LoRAs only "
            "(ΔW = B·A); these adapters change the weight another way, so importing their LoRA part alone would "
            "not be the trained model. --allow-partial does not apply; convert it to a LoRA (e.g. extract one "
            "from the merged weights) first",
            EXIT_USAGE,
        )
    groups: dict[tuple[str, str], dict[str, str]] = collections.defaultdict(dict)
    unparsed: dict[str, str] = {}
    parsed = []
    for key in st.keys():
        p = F.parse_key(key)
        if p is None:
            unparsed[key] = "is not a LoRA tensor (expected .lora_A/.lora_B/.lora_down/.lora_up.weight or .alpha)"
            continue
        parsed.append(p)
        groups[(p.style, p.module)][p.role] = key
    if not groups:
        raise FinetuneError(f"{st.path} holds no LoRA weights: {_listing(sorted(unparsed))}", EXIT_USAGE)
    layout, placed, problems = _choose_layout(st, groups, unparsed, base_model)
    if problems and not allow_partial:
        raise FinetuneError(
            f"{st.path}: {len(problems)} of {len(st.keys())} key(s) cannot be imported as a {layout.label} LoRA:\n"
            + _listing([f"{k} {why}" for k, why in sorted(problems.items())], sep="\n  ", head="  ")
            + "\nNothing was registered. If the model is wrong, pass --base; --allow-partial imports the other keys "
            "and records these in the lineage",
            EXIT_USAGE,
        )
    used = [p for p in parsed if (p.style, p.module) in placed]
    plan = ImportPlan(
        layout=layout, format=_format_of(used, layout), modules={}, skipped=dict(sorted(problems.items()))
    )
    default = _default_scale(st.metadata)
    for group, target in placed.items():
        roles = groups[group]
        scale = default
        if "alpha" in roles:
            scale = float(st.get(roles["alpha"]).reshape(())) / st.shape(roles["A"])[0]
        for module in _split(st, roles, target, scale, plan):
            if module.name in plan.modules:
                raise FinetuneError(
                    f"{st.path}: module {module.name} is given twice (e.g. as a diffusers module and inside a fused "
                    f"BFL one: {', '.join(sorted(roles.values()))}); keep one",
                    EXIT_USAGE,
                )
            plan.modules[module.name] = module
    if not plan.modules:
        raise FinetuneError(f"{st.path}: no LoRA module is left to import (all skipped or zero)", EXIT_USAGE)
    plan.rank = max(m.rank for m in plan.modules.values())
    common = (
        _file_scale(st.metadata) or collections.Counter(m.scale for m in plan.modules.values()).most_common(1)[0][0]
    )
    plan.alpha = common * plan.rank
    for m in plan.modules.values():
        m.scale = m.scale / common  # the factor still to bake into B (1 for most modules)
    return plan


def _listing(items: list[str], sep: str = ", ", head: str = "") -> str:
    shown = items[:_SHOWN]
    more = f"{sep}… and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return head + sep.join(shown) + more


# ---------------------------------------------------------------------------------------------------- writing


def _canonical_tensors(plan: ImportPlan, alpha_keys: bool) -> dict[str, tuple[str, tuple[int, ...], Thunk]]:
    """key → (dtype name, shape, thunk) of the canonical file: A/B padded to the plan's rank, factor baked into B."""
    import torch

    rank = plan.rank
    out: dict[str, tuple[str, tuple[int, ...], Thunk]] = {}
    for name, m in plan.modules.items():

        def a(m: _Module = m) -> torch.Tensor:
            t = m.a()
            return t if m.rank == rank else torch.cat([t, t.new_zeros(rank - m.rank, t.shape[1])])

        def b(m: _Module = m) -> torch.Tensor:
            t = m.b()
            if m.scale != 1.0:
                t = (t.float() * m.scale).to(t.dtype)
            return t if m.rank == rank else torch.cat([t, t.new_zeros(t.shape[0], rank - m.rank)], dim=1)

        out[f"transformer.{name}.lora_A.weight"] = (m.dtype, (rank, m.columns), a)
        out[f"transformer.{name}.lora_B.weight"] = (m.dtype, (m.rows, rank), b)
        if alpha_keys:
            out[f"transformer.{name}.alpha"] = ("F32", (), lambda: torch.tensor(plan.alpha, dtype=torch.float32))
    return out


def _canonical_metadata(plan: ImportPlan, *, base_model: str, trigger_word: str, alpha_keys: bool) -> dict:
    """The metadata ``lora.save_lora`` writes for this rank, alpha and module list."""
    from finetune.lora import _exact_pattern, _format_number

    metadata = {
        "format": "pt",
        "finetune.rank": str(plan.rank),
        "finetune.alpha": _format_number(plan.alpha),
        "finetune.base_model": base_model,
        "finetune.trigger_word": trigger_word,
        "finetune.targets": json.dumps(sorted(plan.modules)),
    }
    if not alpha_keys:
        metadata["lora_adapter_metadata"] = json.dumps(
            {
                "transformer.r": plan.rank,
                "transformer.lora_alpha": plan.alpha,
                "transformer.target_modules": _exact_pattern(list(plan.modules)),
            },
            sort_keys=True,
        )
    return metadata


def write_safetensors(
    path: str | Path, tensors: dict[str, tuple[str, tuple[int, ...], Thunk]], metadata: dict
) -> Path:
    """Write a safetensors file tensor by tensor (each thunk called once, in layout order), atomically, in the fixed
    byte form of ``lora.fixed_safetensors_bytes``: safetensors' own layout (dtype, then name), sorted metadata, a
    compact JSON header padded with spaces to 8 bytes. Peak memory: one tensor."""
    import math

    order = sorted(tensors, key=lambda k: (_LAYOUT_ORDER[tensors[k][0]], k))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for key in order:
        dtype, shape, _ = tensors[key]
        n = math.prod(shape) * (8 if dtype == "F64" else 4 if dtype == "F32" else 2)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with atomic_file(path) as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for key in order:
            dtype, shape, thunk = tensors[key]
            _write_tensor(f, thunk(), key, dtype, shape)
    return Path(path)


def _write_tensor(f: BinaryIO, tensor: torch.Tensor, key: str, dtype: str, shape: tuple[int, ...]) -> None:
    import torch

    if _dtype_name(tensor.dtype) != dtype or tuple(tensor.shape) != tuple(shape):  # a bug here, never a user error
        raise AssertionError(f"{key}: planned {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
    f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def write_canonical(plan: ImportPlan, path: str | Path, *, base_model: str, trigger_word: str = "") -> Path:
    """Write ``plan`` as the project's LoRA file (diffusers keys; ``.alpha`` tensors or adapter metadata as the
    family's ``LORA_ALPHA_KEYS`` says, exactly as ``lora.save_lora`` decides)."""
    from finetune import models

    family_alpha_keys = models.family_module(plan.layout.family).LORA_ALPHA_KEYS
    alpha_keys = family_alpha_keys and float(plan.alpha) != float(plan.rank)
    tensors = _canonical_tensors(plan, alpha_keys)
    metadata = _canonical_metadata(plan, base_model=base_model, trigger_word=trigger_word, alpha_keys=alpha_keys)
    return write_safetensors(path, tensors, metadata)


# ---------------------------------------------------------------------------------------------------- sources

_HF = re.compile(r"^hf://(?P<repo>[^/]+/[^/@]+)(?:@(?P<rev>[^/]+))?/(?P<file>.+\.safetensors)$")


def fetch_source(source: str, folder: Path, *, max_bytes: int = MAX_DOWNLOAD_BYTES) -> tuple[Path, dict[str, Any]]:
    """A local path for ``source`` and what to record of it: a path as is; ``https://…`` downloaded into ``folder``
    (streamed, at most ``max_bytes``, sha256 while it arrives); ``hf://owner/repo[@revision]/file.safetensors``
    through ``huggingface_hub.hf_hub_download`` (the HF cache; offline when ``HF_HUB_OFFLINE=1``)."""
    if source.startswith(("https://", "http://")):
        return _download(source, folder, max_bytes)
    if source.startswith("hf://"):
        match = _HF.match(source)
        if not match:
            raise FinetuneError(
                f"{source}: use hf://owner/repo/path/file.safetensors (optionally hf://owner/repo@revision/…)",
                EXIT_USAGE,
            )
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(match["repo"], match["file"], revision=match["rev"]))
        except Exception as e:  # the hub client raises many types: offline, 404, gated, auth
            raise FinetuneError(
                f"{source}: could not get it from the Hugging Face hub or cache ({e})", EXIT_USAGE
            ) from e
        parts = path.parts
        revision = parts[parts.index("snapshots") + 1] if "snapshots" in parts else match["rev"]
        return path, {"source": source, "hf_repo": match["repo"], "hf_file": match["file"], "hf_revision": revision}
    path = Path(source).expanduser()
    if not path.is_file():
        raise FinetuneError(
            f"LoRA file {source} does not exist (a path, https://… or hf://owner/repo/file)", EXIT_USAGE
        )
    return path, {"source": str(path.resolve())}


def _download(url: str, folder: Path, max_bytes: int) -> tuple[Path, dict[str, Any]]:
    """Stream ``url`` into a file in ``folder`` with its sha256; over ``max_bytes`` stops and deletes it."""
    import httpx

    host = httpx.URL(url).host
    if url.startswith("http://") and host not in ("127.0.0.1", "localhost", "::1"):
        raise FinetuneError(f"{url}: use https:// (plain http only for this machine)", EXIT_USAGE)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / "download.safetensors"
    digest = hashlib.sha256()
    size = 0
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=60.0) as response:
            if response.status_code != 200:
                raise FinetuneError(f"{url}: the server answered HTTP {response.status_code}", EXIT_USAGE)
            declared = int(response.headers.get("content-length") or 0)
            if declared > max_bytes:
                raise FinetuneError(f"{url} is {declared} bytes, over the {max_bytes}-byte limit", EXIT_USAGE)
            with open(dest, "wb") as f:
                for chunk in response.iter_bytes(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FinetuneError(f"{url} is over the {max_bytes}-byte limit; stopped", EXIT_USAGE)
                    digest.update(chunk)
                    f.write(chunk)
    except httpx.HTTPError as e:
        dest.unlink(missing_ok=True)
        raise FinetuneError(f"{url}: download failed ({e})", EXIT_USAGE) from None
    except FinetuneError:
        dest.unlink(missing_ok=True)
        raise
    return dest, {"source": url, "sha256": digest.hexdigest(), "bytes": size}


# ---------------------------------------------------------------------------------------------------- import


def import_lora(
    source: str,
    model: str,
    *,
    base_model: str | None = None,
    allow_partial: bool = False,
    registry: Registry | None = None,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
) -> tuple[Version, ImportPlan]:
    """Import ``source`` (a path, URL or hf:// reference) as a new version of ``model`` (owner/name).

    Raises:
        FinetuneError: exit 2 for anything the file or arguments get wrong; nothing is registered then.
    """
    from finetune.registry import MODEL_RE, Registry, RegistryError

    if not MODEL_RE.match(model):
        raise RegistryError(
            f"--as {model!r} is not a valid model name; use owner/name (letters, digits, '-', '_', '.')"
        )
    registry = registry or Registry()
    work = finetune_home() / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work, prefix="import-") as tmp:
        path, origin = fetch_source(source, Path(tmp), max_bytes=max_bytes)
        origin.setdefault("sha256", sha256_file(path))
        origin.setdefault("bytes", path.stat().st_size)
        plan = plan_import(path, base_model=base_model, allow_partial=allow_partial)
        metadata = SafetensorsFile(path).metadata
        base = base_model or metadata.get("finetune.base_model") or plan.layout.base_model
        trigger = metadata.get("finetune.trigger_word", "")
        out = write_canonical(plan, Path(tmp) / "lora.safetensors", base_model=base, trigger_word=trigger)
        lineage = {
            "base_model": base,
            "trigger_word": trigger,
            "backend": "import",
            "dataset": {"path": None, "digest": None},
            "config": None,
            "lora": {"rank": plan.rank, "alpha": plan.alpha, "targets": sorted(plan.modules)},
            "import": {
                **origin,
                "format": plan.format,
                "model": plan.layout.label,
                "modules": len(plan.modules),
                "skipped_keys": plan.skipped,
                "zero_parts": plan.zero_parts,
            },
        }
        version = registry.add_version(model, out, lineage)
    return version, plan
