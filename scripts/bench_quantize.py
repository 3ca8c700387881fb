"""What ``train.quantize: int8`` does to FLUX.1-dev's transformer: weight memory and quantization time, on the CPU.

    python scripts/bench_quantize.py

Builds FLUX.1-dev's transformer at its real dimensions but with one double and one single block (of 19 and 38),
random weights in bf16, quantizes every Linear with torchao's int8 weight-only config (what the trainer does), and
counts the bytes each part holds before and after: the embedders and output layers once, each block type per
block. The full model's figures are those parts added up (19 double + 38 single blocks); the per-block figures
are measured, nothing is assumed about torchao's layout. Also prints the seconds per block to quantize here.
"""

from __future__ import annotations

import time

import torch

import finetune.flux  # noqa: F401  (first: it quiets torchao's import-time logging, as in every finetune run)

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


def main() -> None:
    from diffusers import FluxTransformer2DModel
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, guidance_embeds=True, **DEV
    )
    torch.nn.Module.to(model, dtype=torch.bfloat16)  # plain Module.to: diffusers' .to warns about an empty list
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


if __name__ == "__main__":
    main()
