"""The fused LoRA Linear computes what peft's layer computes, forward and backward, and steps aside where it must."""

import copy

import pytest
import torch
from test_lora import inputs, tiny_transformer

from finetune import lora as L
from finetune.fused_lora import FusedLoraLinear, lora_linear


def pair(dropout=0.0, alpha=8.0):
    """Two copies of one tiny transformer with the same non-zero LoRA: one fused, one with peft's own layer."""
    base = tiny_transformer()
    fused, plain = base, copy.deepcopy(base)
    for model, is_fused in ((fused, True), (plain, False)):
        L.add_lora(model, rank=4, alpha=alpha, targets="all-linear", dropout=dropout, seed=0, fused=is_fused)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in L.lora_parameters(model):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return fused, plain


def loss_and_grads(model, **overrides):
    out = model(**{**inputs(), **overrides})[0]
    loss = (out**2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_layers_replace_every_target_and_keep_peft_names():
    fused, plain = pair()
    wrapped = [m for m in fused.modules() if hasattr(m, "lora_A")]
    assert wrapped and all(type(m) is FusedLoraLinear for m in wrapped)
    assert not any(isinstance(m, FusedLoraLinear) for m in plain.modules())
    assert L.lora_state_dict(fused).keys() == L.lora_state_dict(plain).keys()


def test_fused_forward_and_gradients_match_peft():
    fused, plain = pair(alpha=8.0)  # scale 2: a wrong scale on either path shows
    loss_f, grads_f = loss_and_grads(fused)
    loss_p, grads_p = loss_and_grads(plain)
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_p.keys() and len(grads_f) == 2 * 20
    for name in grads_f:
        assert grads_f[name].abs().max() > 0, name
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_linear_matches_autograd_in_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w, b = torch.randn(3, 6, dtype=torch.float64, generator=g), torch.randn(3, dtype=torch.float64, generator=g)
    a = torch.randn(2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    bb = torch.randn(3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, bb: lora_linear(x, w, b, a, bb, 0.5), (x, a, bb))
    assert torch.autograd.gradcheck(lambda x, a, bb: lora_linear(x, w, None, a, bb, 1.5), (x, a, bb))


def test_gradient_checkpointing_gives_the_same_gradients():
    fused, _ = pair()
    _, grads = loss_and_grads(fused)
    fused.zero_grad(set_to_none=True)
    fused.enable_gradient_checkpointing()
    fused.train()
    _, grads_ckpt = loss_and_grads(fused)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_falls_back_to_peft_where_the_math_differs():
    fused, _ = pair(dropout=0.5)
    layer = fused.transformer_blocks[0].attn.to_q
    x = torch.randn(1, 4, layer.in_features)
    fused.train()
    assert layer._fused_inputs(x, (), {}) is None  # dropout draws noise only peft's path applies
    fused.eval()
    assert layer._fused_inputs(x, (), {})[-1] == 2.0  # alpha 8 / rank 4
    assert layer._fused_inputs(x.double(), (), {}) is None  # mixed dtypes outside autocast: peft casts
    layer.merge()
    assert layer._fused_inputs(x, (), {}) is None
    layer.unmerge()
    fused.disable_adapters()
    assert layer._fused_inputs(x, (), {}) is None
    with torch.no_grad():  # the disabled adapter really is off: output equals the base Linear
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x))


def test_autocast_computes_in_bf16_and_keeps_fp32_gradients():
    fused, plain = pair()
    results = []
    for model in (fused, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(loss_and_grads(model))
    (loss_f, grads_f), (loss_p, grads_p) = results
    torch.testing.assert_close(loss_f.float(), loss_p.float(), rtol=3e-2, atol=1e-3)
    for name in grads_f:
        assert grads_f[name].dtype == torch.float32, name
        cos = torch.nn.functional.cosine_similarity(grads_f[name].flatten(), grads_p[name].flatten(), dim=0)
        assert cos > 0.98, name


@pytest.mark.parametrize("needs_x_grad", [True, False])
def test_input_gradient_only_when_needed(needs_x_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, requires_grad=needs_x_grad)
    a = torch.randn(2, 6, generator=g, requires_grad=True)
    b = torch.randn(3, 2, generator=g, requires_grad=True)
    lora_linear(x, torch.randn(3, 6, generator=g), None, a, b, 1.0).sum().backward()
    assert (x.grad is not None) is needs_x_grad
    assert a.grad is not None and b.grad is not None


def _dequantized(w: torch.Tensor) -> torch.Tensor:
    return w.dequantize()


def _int_values(w: torch.Tensor) -> torch.Tensor:
    return w.qdata.float()


@pytest.mark.parametrize("group_size", [None, 8])  # per row (train.quantize), per group of 8 (generic dequantize)
def test_int8_base_weights_are_used_inside_the_node_and_only_int8_is_kept(group_size):
    """A torchao int8 weight is used as int8 inside the fused node (per row: cast, scaled on the small side; other
    layouts: dequantized per use): the same loss and gradients as peft's path through torchao's kernels, but no dense
    copy of any weight is saved for backward (peft's path saves one each)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup, PerRow

    models = []
    for fused in (True, False):
        model = tiny_transformer()
        quantize_(model, Int8WeightOnlyConfig(granularity=PerRow() if group_size is None else PerGroup(group_size)))
        L.add_lora(model, rank=4, alpha=8.0, targets="all-linear", seed=0, fused=fused)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in L.lora_parameters(model):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        models.append(model)
    layer = models[0].transformer_blocks[0].attn.to_q
    assert type(layer) is FusedLoraLinear and layer._fused_inputs(torch.randn(1, 4, layer.in_features), (), {})
    assert layer._per_row_int8(layer.base_layer.weight) is (group_size is None)
    models[0].to("cpu")  # moving after the layout is cached (accelerate's prepare does): torch swaps int8 weights
    # Dense forms of each int8 weight: dequantized, or its int8 values as floats (torchao's kernel scales after the mm)
    int8 = [m.base_layer.weight for m in models[1].modules() if hasattr(m, "lora_A")]  # the LoRA layers' bases
    dense = [f(w) for w in int8 for f in (_dequantized, _int_values)]

    def is_weight_copy(t: torch.Tensor) -> bool:
        return (
            type(t) is torch.Tensor
            and t.is_floating_point()
            and any(
                torch.equal(t, w) or torch.equal(t, w.t()) for w in dense if t.numel() == w.numel() and t.dim() == 2
            )
        )

    results, copies = [], []
    for model in models:
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            results.append(loss_and_grads(model))
        copies.append(sum(map(is_weight_copy, saved)))
    (loss_f, grads_f), (loss_p, grads_p) = results
    assert copies[0] == 0 and copies[1] >= 15  # the fused node keeps none; peft's path one per layer past the first
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
    assert len(grads_f) == 2 * 20 and all(grads_f[n].abs().max() > 0 for n in grads_f)  # through every int8 layer
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)

    # Under bf16 autocast (the trainer's mode on CUDA) the int8 node casts Q to bf16 and keeps fp32 LoRA gradients.
    for model in models:
        model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (loss_f, grads_f), (loss_p, grads_p) = (loss_and_grads(m) for m in models)
    torch.testing.assert_close(loss_f.float(), loss_p.float(), rtol=3e-2, atol=1e-3)
    assert all(g.dtype == torch.float32 and g.abs().max() > 0 for g in grads_f.values())
