"""Benchmark the local trainer on preset:small against a naive loop, the eager transformer step and the compute floor.

    python scripts/bench_train.py                    # 256 and 512 px, 2 threads, 3 rounds
    python scripts/bench_train.py --px 256 --steps 40 --rounds 1
    python scripts/bench_train.py --family flux2     # the same on preset:flux2-small (FLUX.2 [klein]-shaped)

For each resolution, in fresh subprocesses (so peak RSS is per measurement), with 8 generated images (three aspect
buckets), batch 1, LoRA rank 16 on every block Linear, text max_sequence_length 64:

- ``trainer``: ``finetune.train`` itself with the default config (cache warm, no samples); median s/step of its
  logged intervals after the first (warm-up);
- ``compiled``: the same with ``train.compile=true``; the first interval's extra time is reported as compile time;
- ``int8``, ``int8-compiled`` (only when asked for with ``--kinds``): the trainer with ``train.quantize=int8`` (torchao
  int8 weights), eager and with ``train.compile=true``;
- ``ref-lora``: the trainer at the LoRA settings of the reference script (below): for FLUX.1 rank 4 on
  ``attn.to_q/to_k/to_v/to_out.0`` only; for FLUX.2 the same plus the single blocks' ``attn.to_qkv_mlp_proj`` and
  ``attn.to_out``; ``ref-compiled`` the same compiled. Both train on square images, as the reference (which crops
  to squares) does;
- ``naive``: what trainers without caching do: every step encodes the image with the VAE and the caption with CLIP
  and T5, then the eager step below;
- ``eager``: the transformer forward + backward + fused AdamW step alone in eager PyTorch with peft's own LoRA layer,
  inputs ready in memory;
- ``reference`` (with ``--reference SCRIPT``): diffusers' ``train_dreambooth_lora_flux.py`` (FLUX.2:
  ``train_dreambooth_lora_flux2_klein.py`` with ``--text_encoder_out_layers 9 18 27``, the pipeline's layers) on the
  same preset and images, at its default LoRA with ``--cache_latents``;
- ``floor``: the trainer's step FLOPs (matmuls and attention, counted from the op shapes by
  ``torch.utils.flop_counter``) divided by the matmul rate measured here on this step's widest GEMM.

This VM's speed drifts by 10-30 % over minutes, so the kinds run in ``--rounds`` rounds, each in a rotated order,
and every figure is the median over rounds. Prints a table and the ratios; ``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEQ = 64
RANK = 16
IMAGES = 8
PRESETS = {"flux1": "small", "flux2": "flux2-small"}
FAMILY = "flux1"  # set by --family
_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
# The reference scripts' LoRA: rank 4 (alpha = rank) on these modules. train_dreambooth_lora_flux.py: the double
# blocks' attention; train_dreambooth_lora_flux2_klein.py adds the single blocks' fused qkv+mlp and output Linears.
REFERENCE_LORA = {
    "flux1": {"rank": 4, "alpha": 4.0, "targets": _ATTENTION},
    "flux2": {"rank": 4, "alpha": 4.0, "targets": _ATTENTION + ["attn.to_qkv_mlp_proj", "attn.to_out"]},
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dataset(folder: Path, px: int, square: bool = False) -> Path:
    """IMAGES generated images in three aspect buckets, or all square (the reference crops every image square, so
    the rows compared with it train on squares too: the same tokens per step)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_dataset_zip

    sizes = [(px, px), (px + px // 4, px), (px, px + px // 4), (px, px)] * (IMAGES // 4)
    if square:
        sizes = [(px + px // 4, px + px // 4)] * IMAGES
    return write_dataset_zip(folder / f"bench-{px}.zip", sizes)


def _config(dataset: Path, px: int, steps: int, out: Path):
    from finetune.config import parse_config

    return parse_config(
        {
            "base_model": f"preset:{PRESETS[FAMILY]}",
            "output": "bench/small",
            "dataset": str(dataset),
            "lora": {"rank": RANK, "alpha": RANK},
            "train": {
                "steps": steps,
                "resolution": [px],
                "batch_size": 1,
                "max_sequence_length": SEQ,
                "learning_rate": 1e-4,
                "save_every": 0,
                "output_dir": str(out),
            },
            "sample": {"every": 0},
        }
    )


def _trainer(
    px: int, steps: int, work: Path, compile: bool = False, lora: dict | None = None, quantize: str = "none"
) -> dict:
    from dataclasses import replace

    from finetune.recipes.train_local import LOG_EVERY, train

    data = _dataset(work, px, square=lora is not None)
    train(_config(data, px, 2, work / "warm"))  # fills the cache: the measured run is a second run, as in practice
    cfg = _config(data, px, steps, work / "run")
    cfg = replace(
        cfg, train=replace(cfg.train, compile=compile, quantize=quantize), lora=replace(cfg.lora, **(lora or {}))
    )
    version = train(cfg)
    rows = [json.loads(x) for x in (Path(version.lineage["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    intervals = list(dict.fromkeys(r["s_per_it"] for r in rows if "s_per_it" in r))  # one value per interval
    median = statistics.median(intervals[1:] or intervals)
    return {"s_per_step": median, "intervals": intervals, "warmup_s": (intervals[0] - median) * LOG_EVERY}


def _setup(px: int, fused: bool = False):
    """The family's small preset with a rank-16 LoRA (peft's layer, or the trainer's fused one), its optimizer, and
    one bucket's inputs in the trainer's shapes, through the family interface."""
    import torch

    from finetune import flow, lora, models

    family = models.family_for(f"preset:{PRESETS[FAMILY]}")
    c = family.build_preset(PRESETS[FAMILY])
    lora.add_lora(c.transformer, rank=RANK, alpha=RANK, targets="all-linear", seed=0, fused=fused)
    c.transformer.train()
    params = lora.lora_parameters(c.transformer)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(1, c.vae.config.latent_channels, px // 8, px // 8, generator=g)
    latents = family.normalize_latents(raw, c.vae)
    noise = torch.randn(latents.shape, generator=g)
    sigmas = flow.sample_sigmas("flux_shift", 1, family.image_seq_len(latents.shape), g)
    text = {k: torch.randn(v.shape, generator=g) for k, v in family.encode_prompts(c, ["TOK"], SEQ).items()}
    inputs = dict(
        text=text,
        img_ids=family.image_ids(latents.shape, "cpu", torch.float32),
        txt_ids=family.text_ids(SEQ, "cpu", torch.float32),
        guidance=1.0 if c.transformer.config.guidance_embeds else None,
    )
    return family, c, params, opt, latents, noise, sigmas, inputs


def _transformer_step(family, c, params, opt, latents, noise, sigmas, inputs) -> None:
    import torch.nn.functional as F

    from finetune import flow

    noisy = flow.add_noise(latents, noise, sigmas)
    pred = family.predict(c.transformer, noisy, sigmas, **inputs)
    loss = F.mse_loss(pred, family.pack_latents(flow.flow_target(latents, noise)))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _timed(fn, steps: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _eager(px: int, steps: int) -> dict:
    args = _setup(px)
    times = _timed(lambda: _transformer_step(*args), steps)
    return {"s_per_step": statistics.median(times)}


def _naive(px: int, steps: int, work: Path) -> dict:
    """Encode image and caption every step (no cache), then the same transformer step."""
    import torch

    family, c, params, opt, _, noise, sigmas, inputs = _setup(px)
    pixels = torch.rand(1, 3, px, px) * 2 - 1
    caption = ["a photo of TOK, picture 0"]

    def step():
        mean, std = family.encode_images(c.vae, pixels)
        latents = family.normalize_latents(mean + std * torch.randn_like(std), c.vae)
        fresh = {**inputs, "text": family.encode_prompts(c, caption, SEQ)}
        _transformer_step(family, c, params, opt, latents, noise, sigmas, fresh)

    return {"s_per_step": statistics.median(_timed(step, steps))}


def _cpu_attention_flops() -> dict:
    """FLOP formulas for the CPU flash-attention kernels, which torch's counter leaves uncounted (zero FLOPs)."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *a, **kw: (
            sdpa_backward_flop_count(g, q, k, v)
        ),
    }


def _floor(px: int, steps: int) -> dict:
    """FLOPs of one step from op shapes, over the matmul rate of this machine measured on the step's biggest GEMM."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    args = _setup(px, fused=True)  # the trainer's own step: its FLOPs are the work that cannot be skipped
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
    with counter:
        _transformer_step(*args)
    flops = counter.get_total_flops()
    tokens = (px // 16) ** 2 + SEQ
    widest = max(
        (m for m in args[1].transformer.modules() if isinstance(m, torch.nn.Linear)),
        key=lambda m: m.in_features * m.out_features,
    )  # preset:small's MLP in (256 -> 1024), flux2-small's fused qkv+mlp (256 -> 2304)
    n_in, n_out = widest.in_features, widest.out_features
    a, b = torch.randn(tokens, n_in), torch.randn(n_in, n_out)
    times = _timed(lambda: torch.mm(a, b), max(50, steps * 5))
    rate = 2 * tokens * n_in * n_out / statistics.median(times)
    return {"s_per_step": flops / rate, "flops": flops, "matmul_flops_per_s": rate}


def _reference(px: int, steps: int, work: Path, script: Path) -> dict:
    """diffusers' reference script on the same preset (saved as a diffusers folder) and images, with its default LoRA
    (``REFERENCE_LORA``) and ``--cache_latents``; s/step from two warm runs of different lengths, so setup cancels.
    FLUX.2 [klein]: ``--text_encoder_out_layers 9 18 27``, the layers the pipeline uses (the script's default
    10 20 30 trains on embeddings the pipeline never produces, diffusers#13445)."""
    import zipfile

    from finetune import models

    preset = PRESETS[FAMILY]
    family = models.family_for(f"preset:{preset}")
    model, images = family.save_preset(preset, work / f"preset-{preset}"), work / "images"
    images.mkdir()
    with zipfile.ZipFile(_dataset(work, px, square=True)) as zf:
        for name in zf.namelist():
            if name.endswith(".png"):
                (images / name).write_bytes(zf.read(name))
    args = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images)]
    args += ["--instance_prompt", "a photo of TOK", "--resolution", str(px), "--train_batch_size", "1"]
    args += ["--max_sequence_length", str(SEQ), "--cache_latents", "--mixed_precision", "no", "--seed", "0"]
    args += ["--learning_rate", "1e-4", "--checkpointing_steps", "1000000", "--dataloader_num_workers", "0"]
    args += ["--text_encoder_out_layers", "9", "18", "27"] if FAMILY == "flux2" else []
    seconds = {}
    for n in (2, 10, 10 + steps):  # the first run only warms the file and import caches, so both timed runs are warm
        cmd = [sys.executable, str(script), *args, "--max_train_steps", str(n), "--output_dir", str(work / f"out{n}")]
        t = time.perf_counter()
        # offline: the script's model card step would otherwise retry the hub for ~25 s at the end of every run
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        seconds[n] = time.perf_counter() - t
        if out.returncode:
            sys.exit(f"the reference script failed:\n{out.stderr[-3000:]}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    seconds.pop(2)
    return {"s_per_step": (seconds[10 + steps] - seconds[10]) / steps, "runs_s": seconds, "child_rss_mb": rss}


def _child(kind: str, px: int, steps: int, threads: int, reference: Path | None = None) -> None:
    import torch

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FINETUNE_HOME"] = str(Path(tmp) / "home")
        os.chdir(tmp)
        work = Path(tmp)
        result = {
            "trainer": lambda: _trainer(px, steps, work),
            "compiled": lambda: _trainer(px, steps, work, compile=True),
            "int8": lambda: _trainer(px, steps, work, quantize="int8"),
            "int8-compiled": lambda: _trainer(px, steps, work, compile=True, quantize="int8"),
            "ref-lora": lambda: _trainer(px, steps, work, lora=REFERENCE_LORA[FAMILY]),
            "ref-compiled": lambda: _trainer(px, steps, work, compile=True, lora=REFERENCE_LORA[FAMILY]),
            "naive": lambda: _naive(px, steps, work),
            "eager": lambda: _eager(px, steps),
            "floor": lambda: _floor(px, steps),
            "reference": lambda: _reference(px, steps, work, reference),
        }[kind]()
    result["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(result))


KINDS = ("trainer", "compiled", "naive", "eager", "floor", "ref-lora", "ref-compiled")


def _run_child(kind: str, px: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--child", kind, str(px), "--steps", str(args.steps), "--family", args.family]
    cmd += ["--reference", str(args.reference)] if args.reference else []
    out = subprocess.run(cmd + ["--threads", str(args.threads)], capture_output=True, text=True, env=env)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"{kind} at {px} px failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--px", type=int, nargs="*", default=[256, 512])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--family", choices=tuple(PRESETS), default="flux1", help="flux1: preset:small; flux2: preset:flux2-small"
    )
    parser.add_argument(
        "--reference",
        type=Path,
        help="diffusers' examples/dreambooth/train_dreambooth_lora_flux.py (--family flux2: "
        "train_dreambooth_lora_flux2_klein.py), from the release installed (needs torchvision): measured side by "
        "side as the row 'reference'",
    )
    parser.add_argument(
        "--kinds",
        nargs="*",
        choices=KINDS + ("int8", "int8-compiled"),
        default=list(KINDS),
        help="rows to measure (all but the int8 ones)",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global FAMILY
    FAMILY = args.family
    if args.child:
        _child(args.child[0], int(args.child[1]), args.steps, args.threads, args.reference)
        return
    figures = {}
    for px in args.px:
        kinds = tuple(args.kinds) + (("reference",) if args.reference else ())
        runs = {kind: [] for kind in kinds}
        for r in range(args.rounds):
            for kind in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:  # rotated, so no kind always runs first
                runs[kind].append(_run_child(kind, px, args))
        row = {
            kind: {
                "s_per_step": statistics.median(x["s_per_step"] for x in rs),
                "rounds": [x["s_per_step"] for x in rs],
                "peak_rss_mb": max(x.get("child_rss_mb", x["peak_rss_mb"]) for x in rs),
                **({"warmup_s": statistics.median(x["warmup_s"] for x in rs)} if "warmup_s" in rs[0] else {}),
            }
            for kind, rs in runs.items()
        }
        figures[px] = row
        print(
            f"\npreset:{PRESETS[FAMILY]} {px} px, batch 1, rank {RANK}, {SEQ} text tokens, {args.threads} threads, "
            f"median of {args.rounds} rounds"
        )
        print(f"  {'':13} {'s/step':>8} {'rounds':>26} {'peak RSS MB':>12}")
        for kind in kinds:
            spread = " ".join(f"{x:.3f}" for x in row[kind]["rounds"])
            print(f"  {kind:13} {row[kind]['s_per_step']:8.4f} {spread:>26} {row[kind]['peak_rss_mb']:12.0f}")
        for kind in ("compiled", "ref-compiled", "int8-compiled"):
            if kind in row:
                print(f"  {kind} warm-up {row[kind]['warmup_s']:.0f} s")
        ratios = [(x, "eager") for x in ("trainer", "compiled", "ref-lora", "ref-compiled", "reference")]
        ratios += [("int8", "trainer"), ("int8-compiled", "compiled"), ("int8-compiled", "int8")]
        ratios += [(x, "floor") for x in ("trainer", "compiled")] + [("naive", "trainer")]
        ratios += [(x, "reference") for x in ("trainer", "compiled", "ref-lora", "ref-compiled")]
        for a, b in ratios:
            if a not in row or b not in row:
                continue
            print(f"  {a}/{b} {row[a]['s_per_step'] / row[b]['s_per_step']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
