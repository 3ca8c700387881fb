"""Bleed with and without differential output preservation, measured by `finetune eval` on the demo's run (issue 16).

    python scripts/bench_preservation.py                  # preset:tiny, the demo's settings (about 2 min, 2 cores)
    python scripts/bench_preservation.py --size small     # preset:small at 128 px
    python scripts/bench_preservation.py --json out.json  # also write the figures

The `finetune demo` data (8 images of a red ring around a yellow star on varied backgrounds, trigger word SHPZ) is
prepared once and trained twice with the demo's settings: once plain, once with ``train.preservation.class_word:
star`` (weight 1.0). ``finetune.evaluate`` then samples base, plain and DOP side by side on the same prompts and seeds
and scores them with tiny random scorers (``metrics.save_tiny_scorers``: nothing can be downloaded here), and the
script prints each column's bleed (DINO similarity to the training images on the prompts without the trigger word;
lower is less leakage) and DINO fidelity (the prompts with it) side by side, with their bootstrap 95% intervals and
the win rate against base. It also prints the mean squared change each LoRA makes to the transformer's prediction on
the class prompts (``metrics.prediction_change``, as tests/test_preservation.py measures it), the quantity DOP is
built to keep small.

The model and the scorers have random weights: the figures show the machinery and the direction of the effect on
this model, not what DOP does to a real FLUX LoRA's bleed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from finetune.config import parse_config
from finetune.demo import BACKGROUNDS, SIZES, TRIGGER, make_demo_images
from finetune.metrics import prediction_change, save_tiny_scorers
from finetune.recipes.evaluate import evaluate
from finetune.recipes.prepare import prepare
from finetune.recipes.train_local import train

CLASS_WORD = "star"
PROMPTS = [
    "a photo of [trigger]",
    f"a photo of [trigger] on {BACKGROUNDS[0]}",
    f"a photo of [trigger] on {BACKGROUNDS[2]}",
    f"a photo of {CLASS_WORD}",  # bleed: the class the subject belongs to
    f"a photo of {CLASS_WORD} on {BACKGROUNDS[1]}",
    "a photo of a cat",  # bleed: an unrelated prompt
]
SEEDS = [1, 2, 3, 4]


def train_version(dataset: Path, settings: dict, out: Path, name: str, class_word: str) -> tuple[str, Path, float]:
    """Train the demo's LoRA (``class_word`` set: with DOP); returns its ref, LoRA file and s/step."""
    cfg = parse_config(
        {
            "base_model": settings["preset"],
            "output": f"bench/{name}",
            "dataset": str(dataset),
            "trigger_word": TRIGGER,
            "lora": {"rank": settings["rank"], "alpha": float(settings["rank"])},
            "train": {
                "steps": settings["steps"],
                "resolution": [settings["resolution"]],
                "batch_size": 2,
                "learning_rate": 3e-3,
                "max_sequence_length": 32,
                "save_every": 0,
                "caption_dropout": 0.0,
                "output_dir": str(out / name),
                "device": "cpu",
                "preservation": {"class_word": class_word},
            },
            "sample": {"every": 0, "prompts": [], "seeds": [42]},
        },
        source="bench_preservation",
    )
    version = train(cfg)
    return version.ref, version.lora_path, version.lineage["timings"]["s_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="the demo size (preset and settings)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = SIZES[args.size]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-preservation-") as tmp:
        out = Path(tmp)
        images = make_demo_images(out / "images", count=8)
        report = prepare([images], out / "dataset.zip", TRIGGER, max_side=512, min_side=64, progress=False)
        os.environ["FINETUNE_HOME"] = str(out / "home")  # the versions go to a registry of their own
        runs = {
            "plain": train_version(report.zip_path, settings, out, "plain", ""),
            "dop": train_version(report.zip_path, settings, out, "dop", CLASS_WORD),
        }
        clip_model, dino_model = save_tiny_scorers(out / "scorers")
        result = evaluate(
            ["base", runs["plain"][0], runs["dop"][0]],
            clip_model=clip_model,
            dino_model=dino_model,
            prompts=PROMPTS,
            seeds=SEEDS,
            steps=settings["eval_steps"],
            size=settings["eval_size"],
            out=out / "report",
            progress=False,
        )
        class_captions = [f"a photo of {CLASS_WORD} on {b}" for b in BACKGROUNDS]
        change = {
            name: prediction_change(settings["preset"], lora_file, class_captions, px=64, max_sequence_length=32)
            for name, (_, lora_file, _) in runs.items()
        }
    aggregate = result.doc["aggregate"]
    columns = dict(zip(["base", "plain", "dop"], [c["key"] for c in result.doc["columns"]], strict=True))
    figures = {
        name: {metric: aggregate[key][metric] for metric in ("bleed", "dino", "clip_t") if metric in aggregate[key]}
        for name, key in columns.items()
    }
    for name in ("plain", "dop"):
        figures[name]["s_per_step"] = runs[name][2]
        figures[name]["class_prediction_change"] = change[name]
    print(
        f"{settings['preset']}, demo data ({len(report.kept)} images), {settings['steps']} steps at "
        f"{settings['resolution']} px, rank {settings['rank']}; eval {len(PROMPTS)} prompts x {len(SEEDS)} seeds, "
        f"{settings['eval_steps']} steps at {settings['eval_size']} px, random scorers; {args.threads} threads"
    )
    print(f"{'':34}{'base':>22}{'plain':>22}{'DOP (class word star)':>24}")
    for metric, label in (("bleed", "bleed (DINO, no trigger) lower=better"), ("dino", "DINO fidelity (trigger)")):
        cells = []
        for name in ("base", "plain", "dop"):
            s = figures[name][metric]
            cells.append(f"{s['mean']:.4f} [{s['ci95'][0]:.3f},{s['ci95'][1]:.3f}]")
        print(f"{label:<34}" + "".join(f"{c:>22}" for c in cells[:2]) + f"{cells[2]:>24}")
    for metric, label in (("win_rate", "win rate vs base"),):
        cells = [figures[n]["bleed"].get(metric) for n in ("plain", "dop")]
        print(
            f"{'bleed ' + label:<34}{'':>22}"
            + "".join(f"{c:>22.2f}" if c is not None else f"{'-':>22}" for c in cells)
        )
    print(
        f"{'class-prompt prediction change':<34}{'':>22}{change['plain']:>22.6f}{change['dop']:>24.6f}"
        f"   (DOP/plain {change['dop'] / change['plain']:.2f})"
    )
    print(f"{'train s/step':<34}{'':>22}{runs['plain'][2]:>22.3f}{runs['dop'][2]:>24.3f}")
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
