"""One GPU check in one call: preset:small on CUDA in bf16, timed and summarised as JSON.

Measures, each section independent (an error is recorded, the others still run):
  build       building preset:small on the GPU;
  eager       the transformer-only LoRA step (forward + backward + fused AdamW, rank 16, all-linear) at 256/512 px,
              with peft's layer, the fused layer, and the fused layer with regional torch.compile (``warmup_s``
              holds the compile);
  sampling    ``flux.sample_images`` for 4 seeds of one prompt in one batch, 8 steps, at 256/512 px;
  dev_blocks  the same three steps on FLUX.1-dev's dimensions (1 double + 2 single blocks) at 1024 px, and the
              fused step with the blocks' weights in int8 (``train.quantize: int8``; torchao), eager and compiled,
              with the weights' GiB;
  trainer     the real ``finetune.recipes.train_local.train`` at 256/512 px on 8 generated images, compile off and
              on (median s/step after the first log interval, from the run's metrics.jsonl), when it imports;
  flux2       FLUX.2 [klein] 4B, [klein] 9B and [dev] dimensions at 1024 px, fused LoRA step with gradient
              checkpointing, bf16 and int8 base weights: s/step, weights and peak GiB at three small depths
              ((1, 1), (2, 1), (1, 2) double/single blocks), and from their differences the peak of the whole model
              (``estimated_peak_gib``: per-block cost × the real block counts). Targets (issue 11): klein 9B ≤ 16 GB
              and klein 4B ≤ 12 GB with int8 and checkpointing; [dev] ≤ 48 GB per GPU.
  flux3       the same for FLUX 3 Image Klein's dimensions (5 per-mode + 28 joint blocks, 80 text tokens).
  *_edit      the klein 4B, 9B and FLUX 3 int8 steps with one reference latent, placed as each family places it
              (edit LoRAs, issue 12: twice the image tokens), for what an edit LoRA needs on a 16/24 GB card.
Peak GPU memory is reported per section. T5 ``max_sequence_length`` is 64, as in issue 3's speed figures.

    python scripts/gpu_check.py [--out summary.json]      # on a CUDA machine
    python scripts/gpu_check.py --cpu-dry-run             # preset:tiny at 64 px on CPU: checks this script only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

SEQ = 64  # T5 tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def _build(preset: str, device: torch.device, dtype: torch.dtype) -> dict:
    from finetune.models import flux1 as flux

    t = time.perf_counter()
    c = flux.load_components(f"preset:{preset}", dtype=dtype, device=device)
    _sync(device)
    return {"s": time.perf_counter() - t, "transformer_params": sum(p.numel() for p in c.transformer.parameters())}


def _dev_blocks(device: torch.device, dtype: torch.dtype, dry: bool):
    """FLUX.1-dev's own dimensions with 1 double and 2 single blocks (of 19 and 38): real GEMM and attention shapes."""
    from diffusers import FluxTransformer2DModel

    dims = dict(attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768)
    if dry:
        dims = dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16)
        dims["axes_dims_rope"] = (4, 6, 6)  # sums to the head dim, as dev's (16, 56, 56) does to 128
    with torch.device(device):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, guidance_embeds=True, **dims
        )
    return model.to(dtype)


# FLUX.2 transformer dimensions (diffusers Flux2Transformer2DModel configs; reference/flux-family-2026.md):
# heads × 128 hidden, text width = 3 × the encoder's hidden size, real double/single block counts.
FLUX2_SIZES = {
    "klein_4b": dict(num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False, blocks=(5, 20)),
    "klein_9b": dict(num_attention_heads=32, joint_attention_dim=12288, guidance_embeds=False, blocks=(8, 24)),
    "dev": dict(num_attention_heads=48, joint_attention_dim=15360, guidance_embeds=True, blocks=(8, 48)),
}


# FLUX 3 Image Klein: Flux3Transformer2DModel's defaults are the real model (5 per-mode blocks, 28 joint single
# blocks, 24 heads × 128, joint dim 20480 = 8 Qwen3-VL layers × 2560); 80 text tokens, its window unit.
FLUX3_SIZES = {"klein": dict(blocks=(5, 28))}
FLUX3_TEXT = 80


def _transformer(family: str, name: str, double: int, single: int, dry: bool) -> tuple:
    """A FLUX.2 or FLUX 3 transformer with ``name``'s dimensions (toy ones for a dry run) and ``double``/``single``
    blocks; with its joint attention width, text length and guidance."""
    if family == "flux3":
        from diffusers import Flux3Transformer2DModel

        dims = dict(num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4,) * 4, joint_attention_dim=24)
        model = Flux3Transformer2DModel(num_layers=double, num_single_layers=single, **(dims if dry else {}))
        return model, model.config.joint_attention_dim, FLUX3_TEXT, None
    from diffusers import Flux2Transformer2DModel

    spec = dict(FLUX2_SIZES[name])
    spec.pop("blocks")
    dims = dict(attention_head_dim=128, axes_dims_rope=(32, 32, 32, 32))
    if dry:
        spec.update(num_attention_heads=2, joint_attention_dim=24)
        dims = dict(attention_head_dim=16, axes_dims_rope=(4, 4, 4, 4))
    model = Flux2Transformer2DModel(num_layers=double, num_single_layers=single, **dims, **spec)
    return model, spec["joint_attention_dim"], SEQ, 1.0 if spec["guidance_embeds"] else None


def _block_step(
    family: str, name: str, double: int, single: int, size: int, device, dtype, steps, quantize, dry, refs: int = 0
):
    """One fused LoRA step (rank 16, all-linear, gradient checkpointing) on a ``family`` (flux2, flux3) transformer
    with ``name``'s dimensions and ``double``/``single`` blocks, through the family interface; s/step, weights and
    peak GiB. ``refs`` reference latents of the target's size go in as the family places them (edit LoRAs)."""
    from finetune import lora, models

    fam = models.family_module(family)
    with torch.device(device):
        model, joint_dim, text_len, guidance = _transformer(family, name, double, single, dry)
        model = model.to(dtype)
    model.requires_grad_(False)
    if quantize:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
    weight_gib = _weight_gib(model)
    lora.add_lora(model, rank=16, alpha=16.0, targets="all-linear", seed=0)
    model.enable_gradient_checkpointing()
    model.train()
    optimizer = torch.optim.AdamW(lora.lora_parameters(model), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(1, 128, size // 16, size // 16, generator=g, device=device, dtype=dtype)
    text = {"prompt_embeds": torch.randn(1, text_len, joint_dim, generator=g, device=device, dtype=dtype)}
    if family == "flux3":
        text["text_mask"] = torch.ones(1, text_len, device=device)  # the whole window is the prompt
    img_ids, txt_ids = fam.image_ids(latents.shape, device, dtype), fam.text_ids(text_len, device, dtype)
    references = [torch.randn(latents.shape, generator=g, device=device, dtype=dtype) for _ in range(refs)] or None
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        noise = torch.randn_like(latents)
        sigma = torch.full((1,), 0.5, device=device, dtype=dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            noisy = (1 - sigma) * latents + sigma * noise
            pred = fam.predict(model, noisy, sigma, text, img_ids, txt_ids, guidance, references)
        loss = torch.nn.functional.mse_loss(pred.float(), fam.pack_latents(noise - latents).float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t)
    return {"s_per_step_median": statistics.median(times[2:]), "weight_gib": weight_gib, "peak_gib": _peak_gib(device)}


def _blocks(family: str, name: str, size: int, device, dtype, steps: int, quantize: bool, dry: bool, refs: int = 0):
    """``_block_step`` at depths (1, 1), (2, 1), (1, 2); the whole model's peak and weights extrapolated from the
    per-double-block and per-single-block differences."""
    runs = {}
    for double, single in ((1, 1), (2, 1), (1, 2)):
        _peak_reset(device)
        call = (family, name, double, single, size, device, dtype, steps, quantize, dry, refs)
        runs[f"{double}x{single}"] = _block_step(*call)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    one, d2, s2 = runs["1x1"], runs["2x1"], runs["1x2"]
    n_double, n_single = (FLUX3_SIZES if family == "flux3" else FLUX2_SIZES)[name]["blocks"]
    out = {"runs": runs}
    for key in ("peak_gib", "weight_gib"):
        if one[key] is not None:
            per_double, per_single = d2[key] - one[key], s2[key] - one[key]
            whole = one[key] + (n_double - 1) * per_double + (n_single - 1) * per_single
            out[f"estimated_{key}"] = round(whole, 2)
    return out


def _weight_gib(module: torch.nn.Module) -> float:
    """GiB held by the parameters, a quantized tensor counted by the plain tensors it is made of."""
    from bench_quantize import nbytes  # a sibling script: this folder is on sys.path when a script runs

    return round(sum(nbytes(p) for p in module.parameters()) / 2**30, 3)


def _eager(
    build,
    size: int,
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    fused: bool,
    compile: bool = False,
    quantize: bool = False,
) -> dict:
    """Transformer-only LoRA steps: peft's layer (``fused=False``) or the trainer's, optionally regional-compiled or
    with int8 base weights (as ``train.quantize: int8`` loads them)."""
    from finetune import lora
    from finetune.models import flux1 as flux

    transformer = build()
    if quantize:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(transformer, Int8WeightOnlyConfig())
    weight_gib = _weight_gib(transformer)
    lora.add_lora(transformer, rank=16, alpha=16.0, targets="all-linear", seed=0, fused=fused)
    if compile:
        if quantize:  # as the trainer does: int8 layouts worked out eagerly, before tracing
            from finetune.fused_lora import prepare_int8_for_compile

            assert not prepare_int8_for_compile(transformer, transformer._repeated_blocks)
        transformer.compile_repeated_blocks(fullgraph=True)
    params = lora.lora_parameters(transformer)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    g = torch.Generator(device).manual_seed(0)
    side = size // 8
    latents = torch.randn(1, 16, side, side, generator=g, device=device, dtype=dtype)
    width = transformer.config.joint_attention_dim
    prompt_embeds = torch.randn(1, SEQ, width, generator=g, device=device, dtype=dtype)
    pooled = torch.randn(1, transformer.config.pooled_projection_dim, generator=g, device=device, dtype=dtype)
    img_ids, txt_ids = flux.latent_image_ids(side, side, device, dtype), flux.text_ids(SEQ, device, dtype)
    times = []
    t_first = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        noise = torch.randn_like(latents)
        sigma = torch.full((1,), 0.5, device=device, dtype=dtype)
        x_t = flux.pack_latents((1 - sigma) * latents + sigma * noise)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            pred = transformer(
                hidden_states=x_t,
                timestep=sigma,
                guidance=torch.ones(1, device=device),
                pooled_projections=pooled,
                encoder_hidden_states=prompt_embeds,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
        loss = torch.nn.functional.mse_loss(pred.float(), flux.pack_latents(noise - latents).float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t)
        if len(times) == 3:
            warmup_s = time.perf_counter() - t_first
    return {
        "s_per_step_median": statistics.median(times[3:]),
        "steps_timed": len(times) - 3,
        "warmup_s": warmup_s,
        "weight_gib": weight_gib,
    }


def _sampling(preset: str, size: int, device: torch.device, dtype: torch.dtype, steps: int) -> dict:
    from finetune.models import flux1 as flux

    pipe = flux.load_pipeline(f"preset:{preset}", dtype=dtype, device=device)
    kw = dict(steps=steps, size=size, guidance=3.5, max_sequence_length=SEQ)
    flux.sample_images(pipe, ["warm up"], [0], **kw)
    _sync(device)
    t = time.perf_counter()
    images = flux.sample_images(pipe, ["a photo of TOK on a beach"], [1, 2, 3, 4], **kw)
    _sync(device)
    seconds = time.perf_counter() - t
    return {"images": len(images), "steps": steps, "s_total": seconds, "s_per_image": seconds / len(images)}


def _dataset(folder: Path, side: int) -> Path:
    import numpy as np
    from PIL import Image

    from finetune.recipes.prepare import prepare

    photos = folder / "photos"
    photos.mkdir(parents=True)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    for i in range(8):  # distinct structured images: a gradient and a disc that moves with i
        rgb = np.stack([x, y, np.full_like(x, i / 8)], axis=-1)
        rgb[((x - 0.2 - 0.08 * i) ** 2 + (y - 0.5) ** 2) < 0.04] = [1.0 - i / 8, 0.8, i / 8]
        Image.fromarray((rgb * 255).astype(np.uint8)).save(photos / f"img{i}.png")
    out = folder / "data.zip"
    prepare([photos], out, "TOK", min_side=min(side, 256), progress=False, workers=1)
    return out


def _trainer(preset: str, size: int, device: torch.device, steps: int, work: Path, compile: bool = False) -> dict:
    from finetune.config import parse_config
    from finetune.recipes import train_local
    from finetune.registry import Registry

    data = work / "data.zip" if (work / "data.zip").exists() else _dataset(work, 512 if size > 64 else 64)
    cfg = parse_config(
        {
            "base_model": f"preset:{preset}",
            "output": f"gpucheck/{preset}-{size}",
            "dataset": str(data),
            "trigger_word": "TOK",
            "lora": {"rank": 16, "alpha": 16.0},
            "train": {
                "steps": steps,
                "resolution": [size],
                "batch_size": 1,
                "save_every": 0,
                "max_sequence_length": SEQ,
                "cache_dir": str(work / "cache"),
                "output_dir": str(work / f"run-{size}-{'compiled' if compile else 'eager'}"),
                "device": device.type,
                "compile": compile,
            },
            "sample": {"every": 0},
        },
        source="gpu_check",
    )
    t = time.perf_counter()
    version = train_local.train(cfg, registry=Registry(work / "registry"))
    total = time.perf_counter() - t
    run_dir = Path(version.lineage["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_interval = sorted({(r["step"] // 10, r["s_per_it"]) for r in rows if "s_per_it" in r})
    warm = [s for _, s in per_interval[1:]] or [s for _, s in per_interval]  # the first interval holds warm-up
    timings = version.lineage.get("timings")
    return {"steps": steps, "s_total": total, "s_per_step_median": statistics.median(warm), "timings": timings}


def _section(summary: dict, name: str, device: torch.device, fn, *args) -> None:
    _peak_reset(device)
    try:
        summary[name] = fn(*args)
    except Exception as e:  # record and go on: one broken section must not hide the other figures
        summary[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
    if isinstance(summary[name], dict):
        summary[name]["peak_gib"] = _peak_gib(device)
    print(f"[gpu_check] {name}: {json.dumps(summary[name], default=str)[:400]}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON summary to this file")
    parser.add_argument("--cpu-dry-run", action="store_true", help="preset:tiny at 64 px on CPU (tests the script)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("gpu_check: no CUDA device visible; nothing to measure (run it on a GPU machine, or --cpu-dry-run)")
        return 0
    dry = args.cpu_dry_run
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    preset, sizes = ("tiny", [64]) if dry else ("small", [256, 512])
    summary: dict = {
        "device": "cpu (dry run)" if dry else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "preset": preset,
        "dtype": str(dtype),
        "max_sequence_length": SEQ,
    }
    _section(summary, "build", device, _build, preset, device, dtype)

    def small():
        from finetune.models import flux1 as flux

        return flux.load_components(f"preset:{preset}", dtype=dtype, device=device, parts=("transformer",)).transformer

    steps = 8 if dry else 30
    for size in sizes:
        for name, fused, compile in (("peft", False, False), ("fused", True, False), ("compiled", True, True)):
            call = (small, size, device, dtype, steps, fused, compile)
            _section(summary, f"eager_{name}_{size}", device, _eager, *call)
        _section(summary, f"sampling_{size}", device, _sampling, preset, size, device, dtype, 2 if dry else 8)
    dev_size = 64 if dry else 1024  # 4096 image tokens + 64 text tokens
    kinds = (("peft", False, False, False), ("fused", True, False, False), ("compiled", True, True, False))
    for name, fused, compile, quantize in kinds + (("int8", True, False, True), ("int8_compiled", True, True, True)):
        call = (lambda: _dev_blocks(device, dtype, dry), dev_size, device, dtype, steps, fused, compile, quantize)
        _section(summary, f"dev_blocks_{name}_{dev_size}", device, _eager, *call)
    few = 4 if dry else 8
    for family, sizes_of in (("flux2", FLUX2_SIZES), ("flux3", FLUX3_SIZES)):
        for name in sizes_of:
            for quantize in (False, True):
                call = (family, name, dev_size, device, dtype, few, quantize, dry)
                section = f"{family}_{name}_{'int8' if quantize else 'bf16'}_{dev_size}"
                _section(summary, section, device, _blocks, *call)
    for family, name in (("flux2", "klein_4b"), ("flux2", "klein_9b"), ("flux3", "klein")):  # edit LoRAs: one
        call = (family, name, dev_size, device, dtype, few, True, dry, 1)  # reference, int8 as on 16-24 GB cards
        _section(summary, f"{family}_edit_{name}_int8_{dev_size}", device, _blocks, *call)
    try:
        import finetune.recipes.train_local  # noqa: F401
    except Exception as e:
        summary["trainer"] = {"skipped": f"finetune.recipes.train_local does not import: {e}"}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["FINETUNE_HOME"] = str(Path(tmp) / "home")  # never touch the user's registry or cache
            for size in sizes:
                for compile in (False, True):
                    name = f"trainer_{'compiled_' if compile else ''}{size}"
                    call = (preset, size, device, 20 if dry else 60, Path(tmp), compile)
                    _section(summary, name, device, _trainer, *call)
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
