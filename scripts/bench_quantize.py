"""What ``train.quantize: int8`` does to FLUX.1-dev's transformer: weight memory and quantization time, on the CPU.

    python scripts/bench_quantize.py

Builds FLUX.1-dev's transformer at its real dimensions but with one double and one single block (of 19 and 38),
random weights in bf16, quantizes every Linear with torchao's int8 weight-only config (what the trainer does), and
counts the bytes each part holds before and after: the embedders and output layers once, each block type per
block. The full model's figures are those parts added up (19 double + 38 single blocks); the per-block figures
are measured, nothing is assumed about torchao's layout. Also prints the seconds per block to quantize here.

Then one LoRA training step (rank 16 on every block Linear, forward + backward, 256 px + 64 text tokens, no
gradient checkpointing) on the same two blocks, each kind in a fresh process: fp32 base weights; int8 base weights
with the trainer's fused LoRA layer (dequantized inside the node); int8 with peft's own layer over torchao's kernel.
It prints the parameters' bytes, the process's resident memory after building, and the step's peak resident memory
above that (activations and whatever is kept for backward), from /proc/self/status with the peak reset first.
Compute is fp32 because this CPU has no fast bf16 matmul; on a GPU in bf16 every figure but int8's weights halves.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

import finetune  # noqa: F401  (first: it quiets torchao's import-time logging, as in every finetune run)

DEV = dict(attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768)
DOUBLE, SINGLE = 19, 38  # FLUX.1-dev's block counts


def nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor; a quantized tensor subclass counted by the plain tensors it is made of."""
    if hasattr(t, "__tensor_flatten__"):
        return sum(nbytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def part_bytes(model: torch.nn.Module) -> dict[str, int]:
    parts = {"other": 0, "double": 0, "single": 0}
    for name, p in model.named_parameters():
        part = {"transformer_blocks": "double", "single_transformer_blocks": "single"}.get(name.split(".")[0], "other")
        parts[part] += nbytes(p)
    return parts


def full_model_gib(parts: dict[str, int]) -> float:
    return (parts["other"] + DOUBLE * parts["double"] + SINGLE * parts["single"]) / 2**30


def build(dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, guidance_embeds=True, **DEV
    )
    return torch.nn.Module.to(model, dtype=dtype)  # plain Module.to: diffusers' .to warns about an empty list


def status_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak since the last reset) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def step_child(kind: str) -> None:
    """One training step of ``kind`` (fp32, int8, int8-peft); prints RESULT {weights_mib, step_peak_mib, s}."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from finetune import lora
    from finetune.models import flux1 as flux

    model = build(torch.float32)
    if kind != "fp32":
        quantize_(model, Int8WeightOnlyConfig())
    lora.add_lora(model, rank=16, alpha=16.0, targets="all-linear", seed=0, fused=kind != "int8-peft")
    model.train()
    g = torch.Generator().manual_seed(0)
    side, seq = 32, 64  # 256 px: 16 x 16 packed tokens
    inputs = dict(
        hidden_states=torch.randn(1, (side // 2) ** 2, 64, generator=g),
        encoder_hidden_states=torch.randn(1, seq, DEV["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(1, DEV["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=flux.latent_image_ids(side, side, "cpu", torch.float32),
        txt_ids=flux.text_ids(seq, "cpu", torch.float32),
        guidance=torch.ones(1),
    )
    built = status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM: the peak from here on is the step's own
        f.write("5")
    t = time.perf_counter()
    model(**inputs, return_dict=False)[0].square().mean().backward()
    seconds = time.perf_counter() - t
    peak = status_mib("VmHWM") - built
    weights = sum(nbytes(p) for p in model.parameters()) / 2**20
    print("RESULT " + json.dumps({"weights_mib": weights, "rss_mib": built, "step_peak_mib": peak, "s": seconds}))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--step":
        return step_child(sys.argv[2])
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = build(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    before = part_bytes(model)
    t = time.perf_counter()
    quantize_(model, Int8WeightOnlyConfig())
    seconds = time.perf_counter() - t
    after = part_bytes(model)
    print(f"FLUX.1-dev dimensions, 1 double + 1 single block built ({params / 1e6:.0f} M parameters), torchao int8")
    print(f"  {'':14} {'bf16 MiB':>10} {'int8 MiB':>10} {'ratio':>6}")
    for part in ("other", "double", "single"):
        print(
            f"  {part:14} {before[part] / 2**20:10.1f} {after[part] / 2**20:10.1f} {after[part] / before[part]:6.3f}"
        )
    bf16, int8 = full_model_gib(before), full_model_gib(after)
    print(f"  full transformer ({DOUBLE} double + {SINGLE} single): bf16 {bf16:.2f} GiB, int8 {int8:.2f} GiB")
    print(f"  quantizing took {seconds:.1f} s here for the 2 blocks and the rest ({torch.get_num_threads()} threads)")

    print("\nOne LoRA step on the same 2 blocks (rank 16 all-linear, 256 px, no checkpointing, fp32 compute)")
    print(f"  {'':10} {'weights MiB':>12} {'resident MiB':>13} {'step peak MiB':>14} {'s':>6}")
    for kind in ("fp32", "int8", "int8-peft"):
        out = subprocess.run([sys.executable, __file__, "--step", kind], capture_output=True, text=True)
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"{kind} failed:\n{out.stderr[-3000:]}")
        r = json.loads(lines[-1][len("RESULT ") :])
        print(f"  {kind:10} {r['weights_mib']:12.0f} {r['rss_mib']:13.0f} {r['step_peak_mib']:14.0f} {r['s']:6.1f}")


if __name__ == "__main__":
    main()
