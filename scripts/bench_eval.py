"""Benchmark `finetune eval` against a naive loop and the floor (issue 5, "Speed").

Setup: preset:small saved to disk and loaded from that folder as a user's model would be; three LoRA versions
(rank 16, all-linear, random non-zero weights) in a temporary registry; 4 prompts x 2 seeds at 256 px, 8 steps.

Measured in one process, in this order (a warm-up forward comes first so no variant pays torch's first-call costs):

- floor: the transformer forwards alone, the work no eval can avoid: 3 versions x 4 prompts x 8 steps forwards
  at batch 2 (the seeds of a prompt) on the loaded transformer, random inputs of the real shapes; measured before
  and after the eval (the smaller counts), plus once with an unfused LoRA adapter active (what fusing saves);
- eval: ``finetune.evaluate`` (sample, score, report), with the scorers' own time reported apart, and the time its
  own transformer forwards took (timed inside the run by wrapping ``FluxTransformer2DModel.forward``);
- naive: for each version, load the pipeline from disk, load its LoRA, and sample every prompt with the text
  encoders run anew (seeds still batched), no scoring.

Each figure is given as wall time and as process CPU time: on a shared machine the wall clock of one phase also
measures the neighbours' load, the CPU time much less so. Ratios are reported for both.

Usage: python scripts/bench_eval.py [--threads N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from finetune import lora, metrics
from finetune.files import sha256_file
from finetune.models import flux1 as flux
from finetune.recipes.evaluate import evaluate
from finetune.registry import Registry

PROMPTS = [
    "a photo of [trigger]",
    "a photo of [trigger] on a beach at sunset",
    "an oil painting of [trigger]",
    "a photo of a dog sitting on a chair",
]
SEEDS = (1, 2)
STEPS, SIZE, GUIDANCE = 8, 256, 3.5
VERSIONS = 3


def make_versions(base_dir: Path, work: Path, registry: Registry) -> list[str]:
    """Three rank-16 LoRAs on the saved preset, registered with a small dataset zip as their lineage."""
    import numpy as np
    from PIL import Image

    data = work / "data.zip"
    with zipfile.ZipFile(data, "w") as zf:
        rng = np.random.default_rng(0)
        for i in range(4):
            path = work / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
            zf.write(path, f"img{i}.png")
            zf.writestr(f"img{i}.txt", "a photo of TOK")
    transformer = flux.load_components(str(base_dir), parts=("transformer",)).transformer
    lora.add_lora(transformer, rank=16, alpha=16, targets="all-linear", seed=0)
    shapes = {k: v.shape for k, v in lora.lora_state_dict(transformer).items()}
    refs = []
    for v in range(VERSIONS):
        g = torch.Generator().manual_seed(v)
        state = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in shapes.items()}
        file = lora.save_lora(
            work / f"v{v}.safetensors", state, rank=16, alpha=16, base_model=str(base_dir), trigger_word="TOK",
            targets="all-linear",
        )  # fmt: skip
        lineage = {"base_model": str(base_dir), "trigger_word": "TOK", "backend": "local",
                   "dataset": {"path": str(data), "digest": sha256_file(data)}}  # fmt: skip
        refs.append(registry.add_version("bench/tok", file, lineage).ref)
    return refs


def transformer_inputs(transformer, batch: int) -> dict:
    """Random inputs with the shapes FluxPipeline gives the transformer at SIZE px and 512 T5 tokens."""
    cfg = transformer.config
    tokens = (SIZE // 16) ** 2
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(batch, tokens, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, 512, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=flux.latent_image_ids(SIZE // 8, SIZE // 8, "cpu", torch.float32),
        txt_ids=flux.text_ids(512, "cpu", torch.float32),
        guidance=torch.full((batch,), GUIDANCE),
        return_dict=False,
    )


class Clock:
    """Wall and process-CPU seconds of a ``with`` block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


class ForwardTimer:
    """Accumulates wall/CPU time spent in ``FluxTransformer2DModel.forward`` while installed."""

    def __init__(self) -> None:
        from diffusers import FluxTransformer2DModel

        self.cls, self.original = FluxTransformer2DModel, FluxTransformer2DModel.forward
        self.wall = self.cpu = 0.0
        self.calls = 0

    def __enter__(self) -> ForwardTimer:
        original = self.original

        def timed(module, *args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original(module, *args, **kwargs)
            finally:
                self.wall += time.perf_counter() - wall
                self.cpu += time.process_time() - cpu
                self.calls += 1

        self.cls.forward = timed
        return self

    def __exit__(self, *exc: object) -> None:
        self.cls.forward = self.original


@torch.inference_mode()
def time_forwards(transformer, n: int) -> Clock:
    inputs = transformer_inputs(transformer, len(SEEDS))
    with Clock() as clock:
        for _ in range(n):
            transformer(**inputs)
    return clock


def naive(base_dir: Path, registry: Registry, refs: list[str]) -> None:
    for ref in refs:
        pipe = flux.load_pipeline(str(base_dir))
        pipe.load_lora_weights(str(registry.resolve(ref).lora_path))
        for prompt in PROMPTS:
            flux.sample_images(
                pipe, [prompt.replace("[trigger]", "TOK")], list(SEEDS), steps=STEPS, size=SIZE, guidance=GUIDANCE
            )
        del pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        work = Path(tmp)
        base_dir = flux.save_preset("small", work / "flux-small")
        registry = Registry(work / "home")
        refs = make_versions(base_dir, work, registry)
        clip_dir, dino_dir = metrics.save_tiny_scorers(work / "scorers")
        forwards = VERSIONS * len(PROMPTS) * STEPS

        transformer = flux.load_components(str(base_dir), parts=("transformer",)).transformer
        time_forwards(transformer, 2)  # warm-up
        floor_before = time_forwards(transformer, forwards)
        with ForwardTimer() as in_eval, Clock() as eval_clock:
            result = evaluate(
                refs, prompts=PROMPTS, seeds=SEEDS, steps=STEPS, size=SIZE, guidance=GUIDANCE, out=work / "report",
                clip_model=clip_dir, dino_model=dino_dir, registry=registry, progress=False,
            )  # fmt: skip
        floor_after = time_forwards(transformer, forwards)
        with Clock() as naive_clock:
            naive(base_dir, registry, refs)
        lora_path = str(registry.resolve(refs[0]).lora_path)
        transformer.load_lora_adapter(lora_path, adapter_name="v0", prefix="transformer")
        floor_lora = time_forwards(transformer, forwards)

    # The scorers run on the calling thread, so their wall time is also about their CPU time.
    score_s = result.timings["score_s"]
    eval_wall, eval_cpu = eval_clock.wall - score_s, eval_clock.cpu - score_s
    floor_wall, floor_cpu = min(floor_before.wall, floor_after.wall), min(floor_before.cpu, floor_after.cpu)
    figures = {
        "machine": f"CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "work": f"{VERSIONS} versions x {len(PROMPTS)} prompts x {len(SEEDS)} seeds, {SIZE} px, {STEPS} steps",
        "floor_wall_s": [round(floor_before.wall, 2), round(floor_after.wall, 2)],
        "floor_cpu_s": [round(floor_before.cpu, 2), round(floor_after.cpu, 2)],
        "floor_unfused_lora_wall_s": round(floor_lora.wall, 2),
        "floor_unfused_lora_cpu_s": round(floor_lora.cpu, 2),
        "eval_wall_s": round(eval_clock.wall, 2),
        "eval_cpu_s": round(eval_clock.cpu, 2),
        "eval_scorers_s": round(score_s, 2),
        "eval_transformer_forwards": in_eval.calls,
        "eval_transformer_wall_s": round(in_eval.wall, 2),
        "eval_transformer_cpu_s": round(in_eval.cpu, 2),
        "eval_timings_s": {k: round(v, 2) for k, v in result.timings.items()},
        "eval_counters": result.counters,
        "naive_wall_s": round(naive_clock.wall, 2),
        "naive_cpu_s": round(naive_clock.cpu, 2),
        "eval_less_scorers_over_floor_wall": round(eval_wall / floor_wall, 3),
        "eval_less_scorers_over_floor_cpu": round(eval_cpu / floor_cpu, 3),
        "eval_less_scorers_over_own_forwards_wall": round(eval_wall / in_eval.wall, 3),
        "eval_less_scorers_over_own_forwards_cpu": round(eval_cpu / in_eval.cpu, 3),
        "naive_over_eval_wall": round(naive_clock.wall / eval_wall, 3),
        "naive_over_eval_cpu": round(naive_clock.cpu / eval_cpu, 3),
    }
    print(json.dumps(figures, indent=2))
    print(
        f"eval (less scorers) / floor: {figures['eval_less_scorers_over_floor_cpu']:.2f} CPU, "
        f"{figures['eval_less_scorers_over_floor_wall']:.2f} wall (target <= 1.3); naive / eval: "
        f"{figures['naive_over_eval_cpu']:.2f} CPU, {figures['naive_over_eval_wall']:.2f} wall",
        file=sys.stderr,
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
