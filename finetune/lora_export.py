"""LoRA exports for other tools: kohya (``lora_unet_*``) and ComfyUI forms, for every family.

Both hold block modules only, under BFL names, with fused modules (q/k/v, FLUX.1's linear1) fused losslessly:
stacked A's, block-diagonal B's. kohya (reference/comfyui-lora-keys.md §4): ``lora_unet_<name>.lora_down/up.weight``
and ``alpha = scale × rows of lora_down``. ComfyUI: for FLUX.1 the kohya file; for FLUX.2 BFL keys
``diffusion_model.<name>.lora_A/B.weight`` with the scale baked into lora_B and no ``.alpha`` keys, which diffusers'
FLUX.2 loader refuses in that form (reference/flux-family-2026.md §5). Which diffusers module is which BFL module is
a fact of the family: each family module's ``BFL_BLOCKS``.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune import models
from finetune.errors import EXIT_USAGE, FinetuneError
from finetune.files import write_atomic
from finetune.lora import check_rank, fixed_safetensors_bytes, in_blocks, modules_of

if TYPE_CHECKING:
    import torch

__all__ = ["export_comfyui", "export_kohya", "lora_family", "save_comfyui", "save_kohya", "stream_export"]

_BFL_KIND = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}
_LABEL = {"flux1": "FLUX.1", "flux2": "FLUX.2"}


def _bfl_blocks(family: str) -> dict:
    if family not in models.FAMILIES:
        raise FinetuneError(
            f"LoRA export: unknown model family {family!r}; use one of {', '.join(models.FAMILIES)}", 1
        )
    return models.family_module(family).BFL_BLOCKS


def _layout(family: str) -> str:
    """The family whose BFL names a family's export uses: the first with the same ``BFL_BLOCKS`` (FLUX.1 Kontext's
    blocks are FLUX.1's, so its LoRAs export exactly as FLUX.1's do)."""
    blocks = _bfl_blocks(family)
    return next(f for f in models.FAMILIES if models.family_module(f).BFL_BLOCKS == blocks)


def _block_groups(modules: list[str], family: str) -> dict[str, tuple[str, ...]]:
    """BFL module (``double_blocks.0.img_attn.qkv``) → the diffusers modules it fuses, in row order, for every BFL
    module that ``modules`` trains a part of; in block order, then the map's order."""
    lookup = {
        (kind, part): (position, bfl, parts)
        for kind, entries in _bfl_blocks(family).items()
        for position, (bfl, parts) in enumerate(entries)
        for part in parts
    }
    found = {}
    for module in modules:
        kind, _, rest = module.partition(".")
        index, _, part = rest.partition(".")
        if index.isdigit() and (kind, part) in lookup:
            position, bfl, parts = lookup[(kind, part)]
            group = (f"{_BFL_KIND[kind]}.{index}.{bfl}", tuple(f"{kind}.{index}.{p}" for p in parts))
            found[(kind, int(index), position)] = group
    return dict(found[k] for k in sorted(found))


_FLUX3_BLOCKS = (
    "mode_blocks.",
    "txt_mode_blocks.",
)  # FLUX 3's per-mode blocks (its single blocks share FLUX.1's name)


def _no_mapping(family: str) -> None:
    """FLUX 3 has no BFL module map (its ``BFL_BLOCKS`` is empty): no kohya or ComfyUI form to write."""
    if not _bfl_blocks(family):
        raise FinetuneError(
            f"LoRA export: {models.family_module(family).LABEL} LoRAs have no documented ComfyUI or kohya key mapping "
            "(diffusers' Flux3LoraLoaderMixin reads the diffusers file; ComfyUI's FLUX 3 LoRA keys are not "
            "documented), so there is no such form to write; use --format diffusers (the stored file), which "
            "Flux3ModularPipeline.load_lora_weights loads",
            EXIT_USAGE,
        )


def lora_family(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """``flux1``, ``flux2`` or ``flux3``: the block layout that can place more of the LoRA's modules (Kontext's is
    ``flux1``); FLUX 3 by its per-mode block names or its ``finetune.base_model``, before any placing (its joint
    single blocks carry FLUX.1's ``single_transformer_blocks.*.attn.to_q`` names).

    The names decide almost always: FLUX.2 has ``ff.linear_in`` and ``attn.to_qkv_mlp_proj``, FLUX.1 ``ff.net.*``,
    ``proj_mlp`` and the per-block ``norm*.linear``. Only a LoRA on the double blocks' attention alone fits both; then
    the ``finetune.base_model`` metadata decides (``models.family_name``, no torch), else ``flux1``, whose kohya file
    of those modules is also what FLUX.2's loaders read.
    """
    modules = list(modules_of(state_dict, "LoRA file"))
    base_model = (metadata or {}).get("finetune.base_model")
    if any(m.startswith(_FLUX3_BLOCKS) for m in modules):
        return "flux3"
    try:
        if base_model and models.family_name(base_model) == "flux3":
            return "flux3"
    except FinetuneError:
        pass
    placed = {
        family: len({p for parts in _block_groups(modules, family).values() for p in parts} & set(modules))
        for family in dict.fromkeys(_layout(f) for f in models.FAMILIES if models.family_module(f).BFL_BLOCKS)
    }
    if placed["flux1"] != placed["flux2"]:
        return max(placed, key=placed.__getitem__)
    if not base_model:
        return "flux1"
    try:
        return _layout(models.family_name(base_model))
    except FinetuneError:  # a base this toolkit no longer knows: both families' files of these modules agree
        return "flux1"


def _fused_blocks(
    state_dict: dict[str, torch.Tensor], *, rank: int, family: str, what: str
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(BFL module, A, B)`` per BFL module the LoRA trains, with ``scale·B·A`` = the module's delta (scale not
    applied). A fused module gets its projections' A's stacked and their B's block-diagonally, so ``B @ A`` stacks
    each ``B_j A_j`` in its rows: lossless, at rank r × parts (keeping one shared A, as SimpleTuner's FLUX.2 converter
    does with to_q's, is exact only when the A's are equal, which independently initialised peft adapters never
    are). An untrained projection of a fused module gets zero A rows and a zero B block, which keeps the layout the
    regular one diffusers' converters recognise (kohya: as sparse, split back exactly). Every module that cannot be
    placed (outside the blocks, e.g. embedders, ``proj_out`` and ``norm_out``, whose rows BFL orders differently; or
    a block module the family has no BFL name for) is skipped with a warning naming it.
    """
    import torch

    modules = modules_of(state_dict, what)
    check_rank(modules, rank, what)
    groups = _block_groups(list(modules), family)
    out = []
    for bfl, names in groups.items():
        a0, _ = modules[next(n for n in names if n in modules)]
        downs, ups = [], []
        for name in names:
            if name in modules:
                a, b = modules[name]
            else:  # untrained projection of a fused module: a zero block keeps the layout regular
                ratios = getattr(models.family_module(family), "BFL_ROW_RATIOS", {})
                rows = a0.shape[1] * ratios.get(name.rsplit(".", 1)[-1], 1)
                a, b = torch.zeros_like(a0), torch.zeros(rows, rank, dtype=a0.dtype, device=a0.device)
            downs.append(a)
            ups.append(b)
        down = torch.cat(downs, dim=0) if len(downs) > 1 else downs[0]
        up = torch.block_diag(*ups) if len(ups) > 1 else ups[0]
        out.append((bfl, down.contiguous(), up.contiguous()))
    used = {n for names in groups.values() for n in names}
    outside = sorted(m for m in modules if not in_blocks(m))
    unplaced = sorted(m for m in modules if in_blocks(m) and m not in used)
    if outside:
        warnings.warn(
            f"{what} holds block modules only; skipped {len(outside)} module(s) outside the FLUX blocks: "
            f"{', '.join(outside)}",
            UserWarning,
            stacklevel=3,
        )
    if unplaced:
        warnings.warn(
            f"{what}: skipped {len(unplaced)} block module(s) that have no {_LABEL[family]} BFL name: "
            f"{', '.join(unplaced)}",
            UserWarning,
            stacklevel=3,
        )
    if not out:
        raise FinetuneError(f"{what}: the LoRA has no modules inside the FLUX blocks to export", EXIT_USAGE)
    return out


def export_kohya(
    state_dict: dict[str, torch.Tensor], *, rank: int, alpha: float, family: str = "flux1"
) -> dict[str, torch.Tensor]:
    """Convert a diffusers-key LoRA to kohya keys ``lora_unet_<BFL name, . → _>.lora_down/up.weight`` + ``.alpha``.

    Block modules only, fused as in ``_fused_blocks``. Each alpha is ``scale × rows of lora_down`` (r, 3r or 4r ×
    alpha/rank), because every consumer applies ``alpha / lora_down.shape[0]`` (keeping alpha = r on a fused module
    weakens it 3-4×, kohya-ss/sd-scripts #2204): ComfyUI, and diffusers' ``_convert_kohya_flux_lora_to_diffusers`` and
    ``_convert_kohya_flux2_lora_to_diffusers``, which bake that scale into the weights they return.
    """
    import torch

    _no_mapping(family)
    scale = float(alpha) / float(rank)
    out: dict[str, torch.Tensor] = {}
    for bfl, down, up in _fused_blocks(state_dict, rank=rank, family=_layout(family), what="kohya export"):
        key = "lora_unet_" + bfl.replace(".", "_")
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)
    return out


def export_comfyui(
    state_dict: dict[str, torch.Tensor], *, rank: int, alpha: float, family: str = "flux1"
) -> dict[str, torch.Tensor]:
    """The LoRA as ComfyUI loads it: FLUX.1 the kohya file (``export_kohya``); FLUX.2 BFL keys
    ``diffusion_model.<BFL name>.lora_A/lora_B.weight`` with ``alpha / rank`` baked into lora_B and no ``.alpha``.

    The FLUX.2 form is ai-toolkit's (reference/flux-family-2026.md §5): ComfyUI maps ``diffusion_model.<name>`` to
    the model weight of that name and applies scale 1.0 without an ``.alpha`` key, and diffusers'
    ``_convert_non_diffusers_flux2_lora_to_diffusers`` raises on any ``.alpha`` key; it copies a fused qkv's A to
    each of q, k, v and splits B into three row chunks, which with the stacked A and block-diagonal B gives back each
    ``B_j A_j`` exactly (at rank 3r).
    """
    _no_mapping(family)
    family = _layout(family)
    if family == "flux1":
        return export_kohya(state_dict, rank=rank, alpha=alpha, family=family)
    scale = float(alpha) / float(rank)
    out: dict[str, torch.Tensor] = {}
    for bfl, down, up in _fused_blocks(state_dict, rank=rank, family=family, what="comfyui export"):
        out[f"diffusion_model.{bfl}.lora_A.weight"] = down
        out[f"diffusion_model.{bfl}.lora_B.weight"] = (up * scale).contiguous()
    return out


def _save_export(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, form: str
) -> Path:
    """Write an exported LoRA atomically in the fixed byte form, keeping only the ``finetune.*`` metadata.

    diffusers' ``lora_adapter_metadata`` is never carried over: it names the diffusers modules and alpha of the
    source file, and diffusers would apply that alpha again on top of the one an export bakes in.
    """
    kept = {k: v for k, v in (metadata or {}).items() if k.startswith("finetune.")}
    kept.update({"format": "pt", "finetune.format": form})
    return write_atomic(Path(path), fixed_safetensors_bytes(tensors, kept))


def save_kohya(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    metadata: dict[str, str] | None = None,
    family: str = "flux1",
) -> Path:
    """Write ``export_kohya(state_dict)`` atomically in the fixed byte form, keeping ``finetune.*`` metadata."""
    return _save_export(path, export_kohya(state_dict, rank=rank, alpha=alpha, family=family), metadata, "kohya")


def save_comfyui(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    metadata: dict[str, str] | None = None,
    family: str = "flux1",
) -> Path:
    """Write ``export_comfyui(state_dict)`` like ``save_kohya``; for FLUX.1 it is the kohya file, byte for byte."""
    tensors = export_comfyui(state_dict, rank=rank, alpha=alpha, family=family)
    return _save_export(path, tensors, metadata, "kohya" if _layout(family) == "flux1" else "comfyui")


def stream_export(source: str | Path, out: str | Path, *, form: str) -> tuple[Path, str, int, float]:
    """Export the LoRA file ``source`` to ``out`` as ``form`` (``kohya`` or ``comfyui``) reading one BFL module's
    tensors at a time: the same bytes as ``save_kohya``/``save_comfyui`` on the loaded file, at the memory of the
    largest module instead of the whole file. Returns ``(out, family, rank, alpha)``.

    The output's keys, shapes and warnings come from the export run on meta tensors (shapes only); each output
    tensor is then computed from its own BFL module's source tensors when it is written.
    """
    from finetune.lora import lora_file_settings
    from finetune.lora_import import _dtype_name, write_safetensors

    if form not in ("kohya", "comfyui"):
        raise FinetuneError(f"--format {form!r}: stream_export writes kohya or comfyui", EXIT_USAGE)
    st, shapes = _header_state(source)
    rank, alpha = lora_file_settings(shapes, st.metadata)
    family = lora_family(shapes, st.metadata)
    convert = export_kohya if form == "kohya" else export_comfyui
    planned = convert(shapes, rank=rank, alpha=alpha, family=family)  # warns about skipped modules, as on tensors
    groups = _block_groups(list(modules_of(shapes, "export")), _layout(family))
    bfl_of = {("lora_unet_" + bfl.replace(".", "_") if _is_kohya(form, family) else f"diffusion_model.{bfl}"): bfl
              for bfl in groups}  # fmt: skip

    last: dict[str, dict[str, torch.Tensor]] = {}  # the last BFL module's export: its down and up are written in turn

    def compute(key: str) -> torch.Tensor:
        if key.endswith(".alpha"):  # a scalar of the rows, already real in the shapes-only export
            return planned[key]
        base = key.rsplit(".", 2)[0]
        if base not in last:
            parts = groups[bfl_of[base]]
            sub = {
                k: st.get(k)
                for p in parts
                for k in (f"transformer.{p}.lora_A.weight", f"transformer.{p}.lora_B.weight")
                if k in shapes
            }
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                last.clear()
                last[base] = convert(sub, rank=rank, alpha=alpha, family=family)
        return last[base][key]

    tensors = {k: (_dtype_name(v.dtype), tuple(v.shape), functools.partial(compute, k)) for k, v in planned.items()}
    kept = {k: v for k, v in st.metadata.items() if k.startswith("finetune.")}
    kept.update({"format": "pt", "finetune.format": "kohya" if _is_kohya(form, family) else "comfyui"})
    return write_safetensors(out, tensors, kept), family, rank, alpha


def file_settings(source: str | Path) -> tuple[int, float]:
    """``lora.lora_file_settings`` of a LoRA file from its header (and its ``.alpha`` scalars) alone."""
    from finetune.lora import lora_file_settings

    st, shapes = _header_state(source)
    return lora_file_settings(shapes, st.metadata)


def _header_state(source: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """The file and its state dict as meta tensors (shapes and dtypes only), ``.alpha`` scalars read for real."""
    import torch

    from finetune.lora_import import SafetensorsFile, _torch_dtype

    st = SafetensorsFile(source)
    shapes = {
        k: st.get(k)
        if k.endswith(".alpha")
        else torch.empty(st.shape(k), dtype=_torch_dtype(st.dtype(k)), device="meta")
        for k in st.keys()
    }
    return st, shapes


def _is_kohya(form: str, family: str) -> bool:
    """Whether ``form`` is written as the kohya file (FLUX.1's ComfyUI form is the kohya file)."""
    return form == "kohya" or _layout(family) == "flux1"
