"""Benchmark LoRA import and export at real model sizes: time and peak RSS per direction, random tensors.

    python scripts/bench_formats.py                  # FLUX.1 [dev] and FLUX.2 [klein] 4B, rank 16, every direction
    python scripts/bench_formats.py --models flux1-dev --rank 16 --json out.json

For each model a rank-R LoRA on every Linear of its blocks (the ``all-linear`` target) is written with random
tensors in the model's real shapes (fp32, the dtype finetune trains and stores them in: FLUX.1 [dev] at rank 16 is
344 MB), then each
direction runs in a fresh subprocess so its peak RSS is its own:

- ``export-kohya``, ``export-comfyui``: ``lora_export.stream_export`` of the diffusers file;
- ``import-diffusers``, ``import-kohya``, ``import-comfyui``: ``lora_import.plan_import`` + ``write_canonical`` of
  that file or the exports (the import's registry copy is a plain file copy and is left out).

``baseline`` is the child's RSS after its imports (torch, diffusers), before the conversion; the peak RSS is
Linux's ``VmHWM`` reset to that point (``/proc/self/clear_refs``), so ``peak - baseline`` is what the conversion
itself holds. The promise (issue 13): under 2 × the largest tensor + 100 MB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "flux1-dev": ("flux1", "black-forest-labs/FLUX.1-dev"),
    "klein-4b": ("flux2", "black-forest-labs/FLUX.2-klein-base-4B"),
}
DIRECTIONS = ("export-kohya", "export-comfyui", "import-diffusers", "import-kohya", "import-comfyui")


def _status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_source(model: str, rank: int, path: Path) -> dict:
    """A random bf16 LoRA on every block Linear of ``model``, written tensor by tensor; returns its figures."""
    import torch

    from finetune import lora_formats as F
    from finetune.lora import _exact_pattern
    from finetune.lora_import import write_safetensors

    family, base = MODELS[model]
    layout = F.layout_for_base(base)[0]
    modules = sorted(m for m in layout.shapes if m.startswith(("transformer_blocks.", "single_transformer_blocks.")))

    def rand(shape: tuple[int, int], seed: int):
        g = torch.Generator().manual_seed(seed)
        return lambda: torch.randn(shape, generator=g) * 0.01

    tensors = {}
    for i, m in enumerate(modules):
        out, inp = layout.shapes[m]
        tensors[f"transformer.{m}.lora_A.weight"] = ("F32", (rank, inp), rand((rank, inp), 2 * i))
        tensors[f"transformer.{m}.lora_B.weight"] = ("F32", (out, rank), rand((out, rank), 2 * i + 1))
    metadata = {
        "format": "pt",
        "finetune.rank": str(rank),
        "finetune.alpha": str(rank),
        "finetune.base_model": base,
        "finetune.trigger_word": "",
        "finetune.targets": "all-linear",
        "lora_adapter_metadata": json.dumps(
            {"transformer.r": rank, "transformer.lora_alpha": float(rank),
             "transformer.target_modules": _exact_pattern(modules)}, sort_keys=True),
    }  # fmt: skip
    write_safetensors(path, tensors, metadata)
    largest = max(4 * (s[0] * s[1]) for _, s, _ in tensors.values())
    return {"modules": len(modules), "bytes": path.stat().st_size, "largest_tensor_bytes": largest}


def child(direction: str, source: Path, work: Path) -> dict:
    """One measurement (runs in its own process)."""
    import diffusers  # noqa: F401 - the imports are the baseline, not the conversion
    import torch  # noqa: F401

    from finetune import lora_export, lora_import

    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    baseline = _status_mb("VmRSS")
    t0 = time.perf_counter()
    kind, form = direction.split("-")
    if kind == "export":
        out, *_ = lora_export.stream_export(source, work / f"{form}.safetensors", form=form)
    else:
        path = source if form == "diffusers" else work / f"{form}.safetensors"
        plan = lora_import.plan_import(path)
        out = lora_import.write_canonical(plan, work / f"canonical-{form}.safetensors", base_model="bench")
    seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(baseline, 1),
            "out_bytes": out.stat().st_size}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="Comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json", help="Also write the figures here.")
    parser.add_argument("--child", nargs=3, metavar=("DIRECTION", "SOURCE", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            work = Path(tmp) / model
            work.mkdir()
            source = work / "lora.safetensors"
            info = write_source(model, args.rank, source)
            rows = {}
            for direction in DIRECTIONS:  # exports first: the imports read them
                cmd = [sys.executable, __file__, "--child", direction, str(source), str(work)]
                run = subprocess.run(cmd, capture_output=True, text=True)
                if run.returncode:
                    raise SystemExit(f"{model} {direction} failed:\n{run.stderr[-3000:]}")
                rows[direction] = json.loads(run.stdout.strip().splitlines()[-1])
            limit_mb = (2 * info["largest_tensor_bytes"] + 100e6) / 2**20
            results[model] = {**info, "rank": args.rank, "limit_mb": round(limit_mb, 1), "directions": rows}
            mb = info["largest_tensor_bytes"] / 1e6
            print(f"{model}: {info['bytes'] / 1e6:.0f} MB, {info['modules']} modules, rank {args.rank}, largest "
                  f"tensor {mb:.2f} MB; limit 2×largest + 100 MB = {limit_mb:.0f} MiB")  # fmt: skip
            print(f"  {'direction':<18}{'seconds':>9}{'peak RSS MiB':>14}{'baseline':>10}{'conversion':>12}")
            for direction, r in rows.items():
                held = r["peak_rss_mb"] - r["baseline_rss_mb"]
                print(f"  {direction:<18}{r['seconds']:>9.2f}{r['peak_rss_mb']:>14.0f}{r['baseline_rss_mb']:>10.0f}"
                      f"{held:>12.0f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
