"""`finetune demo`: the whole job end to end on the CPU, with no download.

Generates a small deterministic image set (a "subject" drawn with Pillow on varied backgrounds), prepares it with a
trigger word, trains a LoRA on a random-weight FLUX-shaped preset, registers the version, and evaluates ``base``
against it. This module sits at the CLI's layer: it only strings the three recipes together.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from finetune.config import parse_config
from finetune.metrics import save_tiny_scorers
from finetune.recipes.evaluate import evaluate
from finetune.recipes.prepare import prepare
from finetune.recipes.train_local import train

__all__ = ["DemoResult", "make_demo_images", "run_demo"]

TRIGGER = "SHPZ"
BACKGROUNDS = ["a blue wall", "green grass", "a sandy beach", "a grey street", "a wooden table", "snow"]
BACKGROUND_COLORS = [(70, 110, 200), (60, 150, 70), (225, 200, 140), (120, 120, 125), (150, 100, 60), (240, 240, 245)]
# Per size: preset, training settings, eval settings. "tiny" takes about 20 s on 2 CPU cores (the promise: < 3 min).
SIZES = {
    "tiny": {"preset": "preset:tiny", "steps": 100, "resolution": 64, "rank": 8, "eval_steps": 4, "eval_size": 64},
    "small": {
        "preset": "preset:small",
        "steps": 150,
        "resolution": 128,
        "rank": 16,
        "eval_steps": 8,
        "eval_size": 128,
    },
}


@dataclass
class DemoResult:
    images_dir: Path
    dataset: Path
    run_dir: Path
    version_ref: str
    report_dir: Path
    first_loss: float
    last_loss: float
    first_val_loss: float
    last_val_loss: float
    seconds: float


def make_demo_images(folder: Path, count: int = 8, seed: int = 0, size: int = 320) -> Path:
    """Draw ``count`` images of one subject (a red ring around a yellow star) with a caption file each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        bg = i % len(BACKGROUNDS)
        image = Image.new("RGB", (size, size + 32 * (i % 3)), BACKGROUND_COLORS[bg])
        draw = ImageDraw.Draw(image)
        for _ in range(12):  # texture, so the images are not near duplicates of each other
            x, y = rng.randrange(image.width), rng.randrange(image.height)
            shade = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in BACKGROUND_COLORS[bg])
            draw.rectangle((x, y, x + rng.randint(8, 40), y + rng.randint(8, 40)), fill=shade)
        cx, cy, r = rng.randint(110, size - 110), rng.randint(110, size - 110), rng.randint(60, 90)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(210, 30, 30), width=max(6, r // 5))
        draw.polygon(_star(cx, cy, outer=r * 0.6, inner=r * 0.25), fill=(250, 210, 40))
        image.save(folder / f"subject_{i:02d}.png")
        (folder / f"subject_{i:02d}.txt").write_text(f"a photo of [trigger] on {BACKGROUNDS[bg]}\n", encoding="utf-8")
    return folder


def _star(cx: float, cy: float, outer: float, inner: float) -> list[tuple[float, float]]:
    """Vertices of a five-pointed star, point up, alternating outer and inner radius."""
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else inner
        angle = math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy - radius * math.sin(angle)))
    return points


def _stage(index: int, total: int, title: str) -> None:
    print(f"\n[{index}/{total}] {title}", flush=True)


def run_demo(out: str | Path = "demo", size: str = "tiny", progress: bool = True) -> DemoResult:
    """Run prepare → train → register → eval in ``out`` and return where everything is."""
    settings = SIZES[size]
    out = Path(out).resolve()
    start = time.perf_counter()

    _stage(1, 4, "Generating demo images")
    images_dir = make_demo_images(out / "images", count=8)
    print(f"  8 images with captions in {images_dir}")

    _stage(2, 4, f"Preparing the dataset (trigger word {TRIGGER})")
    report = prepare([images_dir], out / "dataset.zip", TRIGGER, max_side=512, min_side=64, progress=progress)
    print(f"  {len(report.kept)} images kept, digest {report.digest[:12]}")

    _stage(3, 4, f"Training a LoRA on {settings['preset']} ({settings['steps']} steps)")
    cfg = parse_config(
        {
            "base_model": settings["preset"],
            "output": f"demo/shapes-{size}",
            "dataset": str(report.zip_path),
            "trigger_word": TRIGGER,
            "lora": {"rank": settings["rank"], "alpha": float(settings["rank"])},
            "train": {
                "steps": settings["steps"],
                "resolution": [settings["resolution"]],
                "batch_size": 2,
                "learning_rate": 3e-3,  # high for a random-weight model: the loss falls ~25% in 100 steps
                "max_sequence_length": 32,
                "save_every": 0,
                "caption_dropout": 0.0,
                "output_dir": str(out / "run"),
                "device": "cpu",
            },
            "sample": {"every": 0, "prompts": [], "seeds": [42]},
        },
        source="demo",
    )
    version = train(cfg)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    val_losses = [row["val_loss"] for row in rows if "val_loss" in row]
    fifth = max(1, len(losses) // 5)
    first_loss, last_loss = sum(losses[:fifth]) / fifth, sum(losses[-fifth:]) / fifth
    print(f"  validation loss (fixed σ and noise): {val_losses[0]:.4f} at step 0 → {val_losses[-1]:.4f}")

    _stage(4, 4, f"Evaluating base against {version.ref}")
    # Random-weight scorers, like the model: they exercise CLIP-T, CLIP-I, DINO and diversity without a download.
    # For real scores, `finetune eval` defaults to openai/clip-vit-large-patch14 and facebook/dino-vits16.
    clip_model, dino_model = save_tiny_scorers(out / "scorers")
    result = evaluate(
        ["base", version.ref],
        clip_model=clip_model,
        dino_model=dino_model,
        prompts=["a photo of [trigger]", f"a photo of [trigger] on {BACKGROUNDS[0]}", "a photo of a cat"],
        seeds=[1, 2],
        steps=settings["eval_steps"],
        size=settings["eval_size"],
        out=out / "report",
        progress=progress,
    )
    seconds = time.perf_counter() - start
    print(
        f"\nDone in {seconds:.0f} s. Training loss (mean of first/last fifth): {first_loss:.4f} → {last_loss:.4f}\n"
        f"  images   {images_dir}\n"
        f"  dataset  {report.zip_path}\n"
        f"  run      {out / 'run'}\n"
        f"  version  {version.ref}  (finetune models show {version.ref})\n"
        f"  report   {result.html_path}\n"
        "The model has random weights: the pictures are noise. What the demo shows is every stage working; "
        "see the README to train on real FLUX weights."
    )
    return DemoResult(
        images_dir=images_dir,
        dataset=report.zip_path,
        run_dir=out / "run",
        version_ref=version.ref,
        report_dir=result.out_dir,
        first_loss=first_loss,
        last_loss=last_loss,
        first_val_loss=val_losses[0],
        last_val_loss=val_losses[-1],
        seconds=seconds,
    )
