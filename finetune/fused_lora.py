"""A peft LoRA Linear whose training step is one autograd node: fewer kernels, no per-op autograd bookkeeping.

peft's ``lora.Linear.forward`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as five ops and five
autograd nodes per module (plus the input cast and the output add's gradient accumulation). ``FusedLoraLinear`` is
that class with a forward that, when it can, runs the same math as ``lora_linear``: one GEMM with the frozen weight
and two rank-r products forward, one and four backward, and no gradient for the frozen weight. Everything else
(adapter bookkeeping, merge, state-dict names, loading) is peft's, so checkpoints and files are unchanged. It falls
back to peft's forward for what it does not cover: several or no active adapters, dropout in training, merged or
disabled adapters, LoRA variants (DoRA), a trainable base layer, and mixed dtypes outside autocast. A torchao int8
base weight (``train.quantize``) is used inside the node, forward and again backward (per-row int8 cast and scaled
on the small side, other layouts dequantized), so only its quantized form is ever kept.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear

__all__ = ["FusedLoraLinear", "lora_linear", "prepare_int8_for_compile"]


def _is_quantized(weight: torch.Tensor) -> bool:
    """A torchao quantized weight (``train.quantize``): a traceable tensor subclass that can dequantize itself."""
    return hasattr(type(weight), "__tensor_flatten__") and hasattr(weight, "dequantize")


def _is_per_row_int8(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is torchao's symmetric per-row int8 weight-only tensor (what ``train.quantize: int8``
    makes): ``W = diag(scale) · qdata`` with int8 ``qdata`` [out, in] and one ``scale`` per row."""
    values, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    if values is None or scale is None or values.dtype != torch.int8 or values.dim() != 2:
        return False
    if list(getattr(weight, "block_size", ())) != [1, values.shape[1]] or scale.numel() != values.shape[0]:
        return False
    if any(getattr(weight, name, None) is not None for name in ("act_quant_kwargs", "act_pre_scale")):
        return False  # activation quantization or pre-scaling: not weight-only
    zero_point = getattr(weight, "zero_point", None)
    return zero_point is None or not bool(zero_point.any())  # a host read: the caller asks once per weight


def _dense(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight as a plain tensor. A quantized one is dequantized here, at each use: the autograd node keeps
    only its quantized form for backward (peft's path through torchao saves a dense copy per layer)."""
    return weight.dequantize().to(dtype) if _is_quantized(weight) else weight


class _LoraLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`` with hand-written gradients (LoRA, Hu et al. 2021, eq. 3).

    With ``g = ∂L/∂y`` and ``u = s · g B``: ``∂L/∂x = g W + u A``, ``∂L/∂A = uᵀ x``, ``∂L/∂B = s · gᵀ (x Aᵀ)``.
    W and b are frozen, so their gradients are never computed. With ``row_scale`` (per-row int8, ``W = diag(c) Q``)
    the scale goes on the small side, as torchao's weight-only kernel does: ``x Wᵀ = (x Qᵀ) diag(c)`` and
    ``g W = (g diag(c)) Q``, so Q is only cast, never multiplied out, and only Q (1 byte a weight) is kept.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, row_scale):
        x2 = x.reshape(-1, x.shape[-1])
        scaled_h = torch.mm(x2, lora_a.t()).mul_(scale)  # [N, r]: s · x Aᵀ, kept for ∂L/∂B
        if row_scale is not None:
            y = torch.mm(x2, weight.to(x.dtype).t()).mul_(row_scale.to(x.dtype))
            y = y.add_(bias) if bias is not None else y
        else:
            w = _dense(weight, x.dtype)
            y = torch.addmm(bias, x2, w.t()) if bias is not None else torch.mm(x2, w.t())
        y.addmm_(scaled_h, lora_b.t())
        ctx.save_for_backward(x2, weight, lora_a, lora_b, scaled_h, row_scale)
        ctx.scale, ctx.x_shape = scale, x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, lora_a, lora_b, scaled_h, row_scale = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        u = torch.mm(g, lora_b).mul_(ctx.scale)  # [N, r]
        grad_x = None
        if ctx.needs_input_grad[0]:
            if row_scale is not None:
                grad_x = torch.mm(g * row_scale.to(g.dtype), weight.to(g.dtype))
            else:
                grad_x = torch.mm(g, _dense(weight, g.dtype))
            grad_x = grad_x.addmm_(u, lora_a).view(ctx.x_shape)
        grad_a = torch.mm(u.t(), x2) if ctx.needs_input_grad[3] else None
        grad_b = torch.mm(g.t(), scaled_h) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_a, grad_b, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x Wᵀ + b + scale · (x Aᵀ) Bᵀ`` for a frozen ``weight``/``bias`` [out, in] and LoRA ``lora_a`` [r, in],
    ``lora_b`` [out, r]; one autograd node. All float tensors share one dtype. ``weight`` may be int8 values with
    their per-row ``row_scale`` [out] (``W = diag(row_scale) · weight``), or a torchao quantized tensor."""
    return _LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, scale, row_scale)


def prepare_int8_for_compile(module: torch.nn.Module, block_classes: list[str]) -> list[str]:
    """Work out each fused layer's int8 layout now, eagerly (its one host read cannot be traced), and return the
    Linears in ``block_classes`` blocks whose quantized weight would still reach torch.compile as a tensor subclass,
    which it cannot compile (torch 2.13, torchao 0.18): those with no LoRA, or not the per-row int8 layout."""
    fused = {
        id(layer.base_layer)
        for layer in module.modules()
        if isinstance(layer, FusedLoraLinear) and layer._per_row_int8(layer.base_layer.weight)
    }
    left = []
    for block_name, block in module.named_modules():
        if type(block).__name__ in block_classes:
            for name, linear in block.named_modules():
                if type(linear) is torch.nn.Linear and _is_quantized(linear.weight) and id(linear) not in fused:
                    left.append(f"{block_name}.{name}")
    return left


class FusedLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear, with ``lora_linear`` as its forward where that is the same math."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        tensors = self._fused_inputs(x, args, kwargs)
        if tensors is None:
            return super().forward(x, *args, **kwargs)
        weight, *tensors, scale = tensors
        row_scale = None
        if _is_quantized(weight) and self._per_row_int8(weight):
            weight, row_scale = weight.qdata, weight.scale.reshape(-1)
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return lora_linear(x, weight, *tensors, scale, row_scale)
        # What autocast does to F.linear, done once for the whole op; gradients flow back to the fp32 LoRA weights.
        # A quantized weight is cast where it is used, inside the node.
        dtype = torch.get_autocast_dtype(device)
        weight = weight.to(dtype) if weight.is_floating_point() and not _is_quantized(weight) else weight
        tensors = [t if t is None else t.to(dtype) for t in tensors]
        with torch.autocast(device, enabled=False):
            return lora_linear(x.to(dtype), weight, *tensors, scale, row_scale)

    def _per_row_int8(self, weight: torch.Tensor) -> bool:
        """``_is_per_row_int8(weight)``, worked out once per weight object (the layout never changes, even when the
        weight moves between devices; the values are read at each use)."""
        known = self.__dict__.get("_per_row_int8_of")
        if known is None or known[0] is not weight:  # a plain reference: a weakref would stop Module.to swapping it
            known = (weight, _is_per_row_int8(weight))
            self.__dict__["_per_row_int8_of"] = known
        return known[1]

    def _fused_inputs(self, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple | None:
        """(weight, bias, A, B, scale) when the fused path computes what peft's forward would, else None.

        Runs on every forward of every wrapped layer, so it reads each attribute once (10 µs a call on this CPU).
        """
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        active = self.active_adapters
        if len(active) != 1 or active[0] in self.lora_variant or active[0] not in self.scaling:
            return None
        adapter = active[0]
        base = self.base_layer
        if type(base) is not torch.nn.Linear:  # a quantized or nested base layer: peft knows how to call it
            return None
        weight, bias = base.weight, base.bias
        if type(weight) is not torch.nn.Parameter and not _is_quantized(weight):  # another subclass: peft calls it
            return None
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return None
        if self.training and type(self.lora_dropout[adapter]) is not torch.nn.Identity:
            return None  # dropout draws noise that only peft's path applies
        lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if not (x.dtype == weight.dtype == lora_a.dtype or torch.is_autocast_enabled(x.device.type)):
            return None  # mixed dtypes outside autocast: peft casts between them
        return weight, bias, lora_a, lora_b, self.scaling[adapter]
