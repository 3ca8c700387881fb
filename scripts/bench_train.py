"""Benchmark the local trainer on preset:small against a naive loop, the eager transformer step and the compute floor.

    python scripts/bench_train.py                    # 256 and 512 px, 2 threads, 3 rounds
    python scripts/bench_train.py --px 256 --steps 40 --rounds 1
    python scripts/bench_train.py --family flux2     # the same on preset:flux2-small (FLUX.2 [klein]-shaped)
    python scripts/bench_train.py --family flux3 --kinds trainer eager floor   # preset:flux3-small (FLUX 3 Klein)
    python scripts/bench_train.py --px 256 --kinds trainer dop ema             # issue 16's DOP and EMA beside it
    python scripts/bench_train.py --family kontext --edit --reference train_dreambooth_lora_flux_kontext.py
    python scripts/bench_train.py --family flux2 --edit --reference train_dreambooth_lora_flux2_klein_img2img.py

For each resolution, in fresh subprocesses (so peak RSS is per measurement), with 8 generated images (three aspect
buckets), batch 1, LoRA rank 16 on every block Linear, text max_sequence_length 64 (FLUX 3: 80, its window):

- ``trainer``: ``finetune.train`` itself with the default config (cache warm, no samples); median s/step of its
  logged intervals after the first (warm-up);
- ``compiled``: the same with ``train.compile=true``; the first interval's extra time is reported as compile time;
- ``int8``, ``int8-compiled`` (only when asked for with ``--kinds``): the trainer with ``train.quantize=int8`` (torchao
  int8 weights), eager and with ``train.compile=true``;
- ``dop``, ``ema`` (only when asked for with ``--kinds``): the trainer with ``train.preservation.class_word: person``
  (differential output preservation: a LoRA-off forward and the class captions in the training batch) or
  ``train.ema.decay: 0.99`` (an EMA of the LoRA after each step, on the CPU); ``dop/trainer`` and ``ema/trainer`` are
  their cost (issue 16);
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

``--edit`` benchmarks edit LoRAs (``--family kontext``: ``preset:kontext-small``, FLUX.1 Kontext-shaped; ``--family
flux2``: ``preset:flux2-small``). The data are 8 pairs built by ``finetune.prepare`` (``<stem>_start.png`` reference,
``<stem>_end.png`` target, ``<stem>.txt`` instruction), the targets in the three buckets above and each reference the
size of its target, so every step runs twice the image tokens. The rows:

- ``trainer``, ``ref-lora`` (and ``compiled``, ``int8``... when asked for): as above, on the pair zip;
- ``t2i``: the same trainer on the targets alone (a text-to-image dataset): ``trainer/t2i`` is the edit's overhead;
- ``eager`` and ``floor``: as above, with a reference latent of the target's size passed as ``references=``;
- ``reference``: the script's I2I mode (``--dataset_name`` a local parquet folder with ``image``, ``cond_image`` and
  ``caption`` columns): diffusers' ``train_dreambooth_lora_flux_kontext.py`` (its default LoRA: rank 4 on every
  double-block Linear and the single blocks' attention and ``proj_mlp``), or for FLUX.2
  ``train_dreambooth_lora_flux2_klein_img2img.py`` (the klein script's LoRA, the pipeline's text layers).
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
PRESETS = {"flux1": "small", "flux2": "flux2-small", "kontext": "kontext-small", "flux3": "flux3-small"}
FAMILY = "flux1"  # set by --family
EDIT = False  # set by --edit: train on edit pairs, every step with the target's reference
_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
# The reference scripts' LoRA: rank 4 (alpha = rank) on these modules. train_dreambooth_lora_flux.py: the double
# blocks' attention; train_dreambooth_lora_flux2_klein.py adds the single blocks' fused qkv+mlp and output Linears.
REFERENCE_LORA = {
    "flux1": {"rank": 4, "alpha": 4.0, "targets": _ATTENTION},
    "flux2": {"rank": 4, "alpha": 4.0, "targets": _ATTENTION + ["attn.to_qkv_mlp_proj", "attn.to_out"]},
    # train_dreambooth_lora_flux_kontext.py: every double-block Linear but the norms', the single blocks' attention
    # and proj_mlp (not proj_out)
    "kontext": {
        "rank": 4,
        "alpha": 4.0,
        "targets": _ATTENTION
        + ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out"]
        + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"],
    },
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sizes(px: int, square: bool) -> list[tuple[int, int]]:
    """IMAGES sizes in three aspect buckets, or all square (the reference crops every image square, so the rows
    compared with it train on squares too: the same tokens per step)."""
    if square:
        return [(px + px // 4, px + px // 4)] * IMAGES
    return [(px, px), (px + px // 4, px), (px, px + px // 4), (px, px)] * (IMAGES // 4)


def _dataset(folder: Path, px: int, square: bool = False) -> Path:
    """IMAGES generated images of ``_sizes``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_dataset_zip

    return write_dataset_zip(folder / f"bench-{px}.zip", _sizes(px, square))


def _pairs(folder: Path, px: int, square: bool = False) -> Path:
    """IMAGES edit pairs prepared into a pair zip by ``finetune.prepare``: the targets are ``_dataset``'s pictures,
    each reference another picture of its target's size."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import synthetic_image

    from finetune import prepare

    source = folder / f"pairs-{px}"
    source.mkdir()
    for i, (w, h) in enumerate(_sizes(px, square)):
        synthetic_image(IMAGES + i, w, h).save(source / f"pair{i}_start.png")
        synthetic_image(i, w, h).save(source / f"pair{i}_end.png")
        (source / f"pair{i}.txt").write_text(f"turn picture {IMAGES + i} into picture {i}")
    out = folder / f"pairs-{px}.zip"
    # near_duplicate_distance=None: the generated pictures are simple enough to count as near duplicates
    prepare([source], out, pairs="auto", min_side=px, near_duplicate_distance=None, progress=False)
    return out


def _pair_columns(folder: Path, px: int) -> Path:
    """The square pair zip as a local datasets folder (one parquet file) with ``image`` (target), ``cond_image``
    (reference) and ``caption`` columns: what the reference scripts' I2I mode loads with ``--dataset_name``."""
    import zipfile

    import datasets

    columns = {"image": [], "cond_image": [], "caption": []}
    with zipfile.ZipFile(_pairs(folder, px, square=True)) as zf:
        for target in sorted(n for n in zf.namelist() if n.rsplit(".", 1)[0].endswith("_end")):
            stem, suffix = target.rsplit("_end", 1)
            columns["image"].append({"bytes": zf.read(target), "path": None})
            columns["cond_image"].append({"bytes": zf.read(f"{stem}_start{suffix}"), "path": None})
            columns["caption"].append(zf.read(f"{stem}.txt").decode())
    image = datasets.Image()
    features = datasets.Features(image=image, cond_image=image, caption=datasets.Value("string"))
    out = folder / "pair-columns"
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(out / "train.parquet"))
    return out


def _config(dataset: Path, px: int, steps: int, out: Path, train_keys: dict | None = None):
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
                **(train_keys or {}),
            },
            "sample": {"every": 0},
        }
    )


def _trainer(
    px: int,
    steps: int,
    work: Path,
    compile: bool = False,
    lora: dict | None = None,
    quantize: str = "none",
    edit: bool = False,
    train_keys: dict | None = None,
) -> dict:
    from dataclasses import replace

    from finetune.recipes.train_local import LOG_EVERY, train

    data = (_pairs if edit else _dataset)(work, px, square=lora is not None)
    train(_config(data, px, 2, work / "warm", train_keys))  # fills the cache: the measured run is a second run
    cfg = _config(data, px, steps, work / "run", train_keys)
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
    one bucket's inputs in the trainer's shapes, through the family interface (with ``--edit``, a reference latent
    of the target's size)."""
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
    text = {  # random embeddings; FLUX 3's text_mask (its window) stays as encoded
        k: v if k == "text_mask" else torch.randn(v.shape, generator=g)
        for k, v in family.encode_prompts(c, ["TOK"], SEQ).items()
    }
    inputs = dict(
        text=text,
        img_ids=family.image_ids(latents.shape, "cpu", torch.float32),
        txt_ids=family.text_ids(SEQ, "cpu", torch.float32),
        guidance=1.0 if c.transformer.config.get("guidance_embeds") else None,
    )
    if EDIT:  # drawn last, so the other inputs are the text-to-image ones
        inputs["references"] = [family.normalize_latents(torch.randn(raw.shape, generator=g), c.vae)]
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
    tokens = (px // 16) ** 2 * (2 if EDIT else 1) + SEQ  # an edit's reference doubles the image tokens
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
    10 20 30 trains on embeddings the pipeline never produces, diffusers#13445; the img2img script has no such
    option and encodes with the pipeline's). ``--edit``: the square pairs in the script's I2I columns."""
    import zipfile

    from finetune import models

    preset = PRESETS[FAMILY]
    family = models.family_for(f"preset:{preset}")
    model = family.save_preset(preset, work / f"preset-{preset}")
    args = ["--pretrained_model_name_or_path", str(model)]
    if EDIT:
        args += ["--dataset_name", str(_pair_columns(work, px)), "--image_column", "image"]
        args += ["--cond_image_column", "cond_image", "--caption_column", "caption"]
    else:
        images = work / "images"
        images.mkdir()
        with zipfile.ZipFile(_dataset(work, px, square=True)) as zf:
            for name in zf.namelist():
                if name.endswith(".png"):
                    (images / name).write_bytes(zf.read(name))
        args += ["--instance_data_dir", str(images), "--instance_prompt", "a photo of TOK"]
        args += ["--text_encoder_out_layers", "9", "18", "27"] if FAMILY == "flux2" else []
    args += ["--resolution", str(px), "--train_batch_size", "1"]
    args += ["--max_sequence_length", str(SEQ), "--cache_latents", "--mixed_precision", "no", "--seed", "0"]
    args += ["--learning_rate", "1e-4", "--checkpointing_steps", "1000000", "--dataloader_num_workers", "0"]
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
            "trainer": lambda: _trainer(px, steps, work, edit=EDIT),
            "t2i": lambda: _trainer(px, steps, work),
            "compiled": lambda: _trainer(px, steps, work, compile=True, edit=EDIT),
            "int8": lambda: _trainer(px, steps, work, quantize="int8", edit=EDIT),
            "int8-compiled": lambda: _trainer(px, steps, work, compile=True, quantize="int8", edit=EDIT),
            "ref-lora": lambda: _trainer(px, steps, work, lora=REFERENCE_LORA[FAMILY], edit=EDIT),
            "ref-compiled": lambda: _trainer(px, steps, work, compile=True, lora=REFERENCE_LORA[FAMILY], edit=EDIT),
            "dop": lambda: _trainer(px, steps, work, train_keys={"preservation": {"class_word": "person"}}),
            "ema": lambda: _trainer(px, steps, work, train_keys={"ema": {"decay": 0.99}}),
            "naive": lambda: _naive(px, steps, work),
            "eager": lambda: _eager(px, steps),
            "floor": lambda: _floor(px, steps),
            "reference": lambda: _reference(px, steps, work, reference),
        }[kind]()
    result["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(result))


KINDS = ("trainer", "compiled", "naive", "eager", "floor", "ref-lora", "ref-compiled")
EDIT_KINDS = ("trainer", "t2i", "eager", "floor", "ref-lora")


def _run_child(kind: str, px: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--child", kind, str(px), "--steps", str(args.steps), "--family", args.family]
    cmd += ["--edit"] if args.edit else []
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
        "--family",
        choices=tuple(PRESETS),
        default="flux1",
        help="flux1: preset:small; flux2: preset:flux2-small; kontext: preset:kontext-small; flux3: "
        "preset:flux3-small (no reference or ref-lora row: there is no FLUX 3 trainer to compare with)",
    )
    parser.add_argument(
        "--edit", action="store_true", help="edit pairs (--family kontext or flux2), rows " + " ".join(EDIT_KINDS)
    )
    parser.add_argument(
        "--reference",
        type=Path,
        help="diffusers' examples/dreambooth/train_dreambooth_lora_flux.py (--family flux2: "
        "train_dreambooth_lora_flux2_klein.py; --edit: train_dreambooth_lora_flux_kontext.py or "
        "train_dreambooth_lora_flux2_klein_img2img.py), from the release installed (needs torchvision): measured "
        "side by side as the row 'reference'",
    )
    parser.add_argument(
        "--kinds",
        nargs="*",
        choices=KINDS + ("t2i", "int8", "int8-compiled", "dop", "ema"),
        help="rows to measure (default: all but t2i and the int8 ones; --edit: " + " ".join(EDIT_KINDS) + ")",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.edit and args.family == "flux1":
        parser.error("--edit trains on pairs: use --family kontext or flux2")
    if args.edit and "naive" in (args.kinds or ()):
        parser.error("--edit has no naive row: it would encode the target but not its reference")
    args.kinds = args.kinds or list(EDIT_KINDS if args.edit else KINDS)
    global FAMILY, EDIT, SEQ
    FAMILY, EDIT = args.family, args.edit
    SEQ = 80 if FAMILY == "flux3" else SEQ  # FLUX 3 pads each prompt to a multiple of 80 tokens
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
            f"\npreset:{PRESETS[FAMILY]} {px} px{', edit pairs' if EDIT else ''}, batch 1, rank {RANK}, {SEQ} text "
            f"tokens, {args.threads} threads, median of {args.rounds} rounds"
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
        ratios += [("dop", "trainer"), ("ema", "trainer")]
        ratios += [(x, "floor") for x in ("trainer", "compiled")] + [("naive", "trainer"), ("trainer", "t2i")]
        ratios += [(x, "reference") for x in ("trainer", "compiled", "ref-lora", "ref-compiled")]
        for a, b in ratios:
            if a not in row or b not in row:
                continue
            print(f"  {a}/{b} {row[a]['s_per_step'] / row[b]['s_per_step']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
