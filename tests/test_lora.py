"""LoRA injection, the diffusers-format file (loaded by diffusers itself) and the kohya/ComfyUI export."""

import copy
import io
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

from finetune import lora as L
from finetune import lora_export as LE
from finetune.errors import FinetuneError
from finetune.models import flux1 as flux

DOUBLE = [
    "norm1.linear",
    "norm1_context.linear",
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
SINGLE = ["norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v"]


def tiny_transformer(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        axes_dims_rope=[2, 2, 4],
    )


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        pooled_projections=torch.randn(1, 16, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(5, 3),
        return_dict=False,
    )


def preset_inputs(config) -> dict:
    """Transformer inputs matching a model config (packed latents of 4×4 tokens, 6 text tokens)."""
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, 16, config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 6, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.7]),
        guidance=torch.tensor([1.0]) if config.guidance_embeds else None,
        img_ids=torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1
        ).reshape(16, 3),
        txt_ids=torch.zeros(6, 3),
        return_dict=False,
    )


def trained(rank=4, alpha=4.0, targets="all-linear", seed=0, model=None):
    """A tiny transformer with a LoRA whose B is non-zero (as after training), and an untouched base copy."""
    model = model if model is not None else tiny_transformer(seed)
    base = copy.deepcopy(model)
    modules = L.add_lora(model, rank=rank, alpha=alpha, targets=targets, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in L.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model, base, modules


def save(path, model, rank=4, alpha=4.0, targets="all-linear", dtype=None):
    return L.save_lora(
        path,
        L.lora_state_dict(model),
        rank=rank,
        alpha=alpha,
        base_model="preset:tiny",
        trigger_word="TOK",
        targets=targets,
        dtype=dtype,
    )


# ------------------------------------------------------------------------------------------------------ injection


def test_presets_select_expected_modules():
    model = tiny_transformer()
    everything = {f"transformer_blocks.0.{m}" for m in DOUBLE} | {f"single_transformer_blocks.0.{m}" for m in SINGLE}
    assert set(L.resolve_target_modules(model, "all-linear")) == everything
    attention = {n for n in everything if ".attn." in n}
    assert len(attention) == 11
    assert set(L.resolve_target_modules(model, "attention")) == attention
    explicit = L.resolve_target_modules(model, ["attn.to_q", "proj_mlp", "transformer_blocks.0.ff.net.2"])
    assert set(explicit) == {
        "transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.proj_mlp",
        "transformer_blocks.0.ff.net.2",
    }


def test_unknown_targets_error_with_suggestion():
    model = tiny_transformer()
    with pytest.raises(FinetuneError, match=r"'atn\.to_q'.*did you mean 'attn\.to_q'"):
        L.resolve_target_modules(model, ["attn.to_k", "atn.to_q"])
    with pytest.raises(FinetuneError, match="did you mean 'all-linear'"):
        L.resolve_target_modules(model, "all_linear")
    with pytest.raises(FinetuneError, match="empty list"):
        L.resolve_target_modules(model, [])


def test_add_lora_freezes_base_targets_exactly_and_is_seeded():
    model = tiny_transformer()
    rng = torch.get_rng_state()
    # A suffix matches whole name components; a full name selects exactly one module.
    targets = ["proj_out", "transformer_blocks.0.attn.to_q"]
    modules = L.add_lora(model, rank=2, alpha=2, targets=targets, seed=3)
    assert torch.equal(torch.get_rng_state(), rng), "add_lora must not consume the global RNG"
    assert modules == ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out", "proj_out"]
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(modules)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{x}.default.weight" for m in modules for x in "AB"}
    assert {id(p) for p in L.lora_parameters(model)} == {id(p) for n, p in model.named_parameters() if n in trainable}

    again = tiny_transformer()
    L.add_lora(again, rank=2, alpha=2, targets=targets, seed=3)
    other = tiny_transformer()
    L.add_lora(other, rank=2, alpha=2, targets=targets, seed=4)
    sd, sd_again, sd_other = (L.lora_state_dict(m) for m in (model, again, other))
    assert all(torch.equal(sd[k], sd_again[k]) for k in sd)
    assert not torch.equal(sd["transformer.proj_out.lora_A.weight"], sd_other["transformer.proj_out.lora_A.weight"])
    with pytest.raises(FinetuneError, match="rank"):
        L.add_lora(tiny_transformer(), rank=0, alpha=1, targets="attention")


# ------------------------------------------------------------------------------------------------------------ file


@pytest.mark.parametrize("alpha", [4.0, 8.0])
def test_saved_file_contract_and_fixed_bytes(tmp_path, alpha):
    model, _, modules = trained(alpha=alpha)
    path = save(tmp_path / "a" / "lora.safetensors", model, alpha=alpha)
    tensors, meta = L.load_lora_file(path)
    assert all(k.startswith("transformer.") and "base_model" not in k for k in tensors)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight", ".alpha")) for k in tensors)
    assert sum(k.endswith(".lora_A.weight") for k in tensors) == len(modules) == 20
    assert all(t.dtype == torch.float32 for t in tensors.values())
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert meta["finetune.rank"] == "4" and float(meta["finetune.alpha"]) == alpha
    assert meta["finetune.base_model"] == "preset:tiny" and meta["finetune.trigger_word"] == "TOK"
    assert meta["finetune.targets"] == "all-linear"
    if alpha == 4.0:
        assert not alphas
        adapter = json.loads(meta["lora_adapter_metadata"])
        assert adapter["transformer.r"] == 4 and adapter["transformer.lora_alpha"] == 4.0
    else:
        assert "lora_adapter_metadata" not in meta  # diffusers refuses .alpha tensors together with it
        assert len(alphas) == len(modules) and all(v.ndim == 0 and float(v) == alpha for v in alphas.values())
    assert L.lora_file_settings(tensors, meta) == (4, alpha)

    # Same weights → same bytes, in this process and in a fresh one (safetensors orders metadata per process).
    again = save(tmp_path / "b.safetensors", model, alpha=alpha)
    assert again.read_bytes() == path.read_bytes()
    if alpha != 4.0:  # once is enough: a fresh interpreter starts ~2 s
        code = (
            "import sys; from finetune import lora as L; t, m = L.load_lora_file(sys.argv[1]); "
            "L.save_lora(sys.argv[2], t, rank=4, alpha=float(m['finetune.alpha']), base_model='preset:tiny', "
            "trigger_word='TOK', targets='all-linear')"
        )
        subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "c.safetensors")], check=True)
        assert (tmp_path / "c.safetensors").read_bytes() == path.read_bytes()
    header = path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")]
    assert list(json.loads(header)["__metadata__"]) == sorted(meta)


def test_save_is_atomic(tmp_path, monkeypatch):
    model, _, _ = trained()
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"previous version")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save(path, model)
    assert path.read_bytes() == b"previous version"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def test_bad_files_and_state_dicts_are_clear_errors(tmp_path):
    with pytest.raises(FinetuneError, match="does not exist"):
        L.load_lora_file(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(FinetuneError, match="junk.safetensors.*not a readable safetensors"):
        L.load_lora_file(tmp_path / "junk.safetensors")
    model, _, _ = trained()
    sd = L.lora_state_dict(model)
    with pytest.raises(FinetuneError, match="not rank 8"):
        L.save_lora(tmp_path / "x", sd, rank=8, alpha=8, base_model="b", trigger_word="t", targets="all-linear")
    peft_style = {f"base_model.model.{k.removeprefix('transformer.')}": v for k, v in sd.items()}
    with pytest.raises(FinetuneError, match="not diffusers LoRA keys"):
        L.save_lora(tmp_path / "x", peft_style, rank=4, alpha=4, base_model="b", trigger_word="t", targets="x")


# -------------------------------------------------------------------------------------------- diffusers round trip


@pytest.mark.parametrize(
    ("rank", "alpha", "dtype"), [(4, 4.0, None), (4, 8.0, None), (4, 8.0, torch.bfloat16)]
)  # float32 as trained, and bf16 as the trainer registers it (lora.save_dtype)
def test_diffusers_loads_file_and_matches_in_memory_model(tmp_path, rank, alpha, dtype):
    components = flux.build_preset("tiny", seed=0)  # the whole pipeline: transformer, VAE, CLIP, T5, scheduler
    model, _, modules = trained(rank=rank, alpha=alpha, model=copy.deepcopy(components.transformer))
    path = save(tmp_path / "lora.safetensors", model, rank=rank, alpha=alpha, dtype=dtype)
    file_tensors, _ = L.load_lora_file(path)
    pipe = flux.pipeline_from_components(components)
    x = preset_inputs(pipe.transformer.config)
    with torch.no_grad():
        base_out = pipe.transformer(**x)[0]

    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setLevel(logging.WARNING)
    logging.getLogger("diffusers").addHandler(handler)
    try:
        pipe.load_lora_weights(str(path), adapter_name="mine")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    # No unexpected/missing/unsupported keys. The one line allowed is diffusers' note, printed for every
    # transformer-only LoRA, that the file has no text-encoder keys.
    lines = [line for line in log.getvalue().splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith("No LoRA keys associated to CLIPTextModel")] == []

    layers = {n: m for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and "mine" in m.lora_A}
    assert set(layers) == set(modules)  # every file module became a LoRA layer, and nothing else did
    for name, layer in layers.items():
        for part in ("A", "B"):
            loaded = getattr(layer, f"lora_{part}")["mine"].weight
            assert torch.equal(loaded, file_tensors[f"transformer.{name}.lora_{part}.weight"].to(loaded.dtype))
        assert layer.scaling["mine"] == pytest.approx(alpha / rank)

    with torch.no_grad():
        expected = model(**x)[0]
        got = pipe.transformer(**x)[0]
    assert (expected - base_out).abs().max() > 1e-2, "the LoRA must change the output for this test to mean anything"
    tolerance = 1e-5 if dtype is None else 2e-2  # bf16 keeps 8 bits of each A and B entry
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_set_lora_state_restores_weights_and_checks_fit(tmp_path):
    model, _, _ = trained(alpha=8.0, targets="attention")
    tensors, _ = L.load_lora_file(save(tmp_path / "l.safetensors", model, alpha=8.0, targets="attention"))
    fresh = tiny_transformer()
    L.add_lora(fresh, rank=4, alpha=8.0, targets="attention", seed=99)
    L.set_lora_state(fresh, tensors)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs())[0], model(**inputs())[0], rtol=0, atol=0)
    wrong_targets = tiny_transformer()
    L.add_lora(wrong_targets, rank=4, alpha=8.0, targets="all-linear")
    with pytest.raises(FinetuneError, match="missing"):
        L.set_lora_state(wrong_targets, tensors)
    wrong_alpha = tiny_transformer()
    L.add_lora(wrong_alpha, rank=4, alpha=4.0, targets="attention")
    with pytest.raises(FinetuneError, match="alpha"):
        L.set_lora_state(wrong_alpha, tensors)


# ------------------------------------------------------------------------------------------------- kohya / ComfyUI

H = 3072  # FLUX.1 hidden size; diffusers' kohya converter hard-codes it (and 19 double / 38 single blocks)
DOUBLE_SHAPES = {  # diffusers module → (out, in) at FLUX.1 dims
    "attn.to_q": (H, H),
    "attn.to_k": (H, H),
    "attn.to_v": (H, H),
    "attn.to_out.0": (H, H),
    "attn.add_q_proj": (H, H),
    "attn.add_k_proj": (H, H),
    "attn.add_v_proj": (H, H),
    "attn.to_add_out": (H, H),
    "ff.net.0.proj": (4 * H, H),
    "ff.net.2": (H, 4 * H),
    "ff_context.net.0.proj": (4 * H, H),
    "ff_context.net.2": (H, 4 * H),
    "norm1.linear": (6 * H, H),
    "norm1_context.linear": (6 * H, H),
}
SINGLE_SHAPES = {
    "attn.to_q": (H, H),
    "attn.to_k": (H, H),
    "attn.to_v": (H, H),
    "proj_mlp": (4 * H, H),
    "proj_out": (H, 5 * H),
    "norm.linear": (3 * H, H),
}


def flux_dev_lora(rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random LoRA tensors at FLUX.1-dev dims on a subset of blocks, no base weights.

    Double blocks 0 and 18 and single blocks 0 and 37 are complete; single block 5 has only attn.to_q and double
    block 3 only attn.add_k_proj (fused modules with untrained projections); plus one module outside the blocks.
    """
    g = torch.Generator().manual_seed(seed)
    modules = {f"transformer_blocks.{i}.{m}": s for i in (0, 18) for m, s in DOUBLE_SHAPES.items()}
    modules |= {f"single_transformer_blocks.{i}.{m}": s for i in (0, 37) for m, s in SINGLE_SHAPES.items()}
    modules |= {"single_transformer_blocks.5.attn.to_q": (H, H), "transformer_blocks.3.attn.add_k_proj": (H, H)}
    modules["proj_out"] = (64, H)
    sd = {}
    for name, (out, inp) in modules.items():
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, inp, generator=g) / inp**0.5
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(out, rank, generator=g)
    return sd


@pytest.mark.parametrize(("rank", "alpha"), [(2, 2.0), (4, 2.0)])
def test_kohya_export_round_trips_through_diffusers_converter(rank, alpha):
    sd = flux_dev_lora(rank)
    with pytest.warns(UserWarning, match=r"skipped 1 module\(s\) outside the FLUX blocks: proj_out"):
        kohya = LE.export_kohya(sd, rank=rank, alpha=alpha)
    scale = alpha / rank

    # Exact names and alphas: r, 3r (qkv) and 4r (linear1) rows, alpha = scale × rows.
    double = [
        "img_attn_qkv",
        "img_attn_proj",
        "img_mlp_0",
        "img_mlp_2",
        "img_mod_lin",
        "txt_attn_qkv",
        "txt_attn_proj",
        "txt_mlp_0",
        "txt_mlp_2",
        "txt_mod_lin",
    ]
    names = {f"lora_unet_double_blocks_{i}_{m}" for i in (0, 18) for m in double}
    names |= {f"lora_unet_single_blocks_{i}_{m}" for i in (0, 37) for m in ("linear1", "linear2", "modulation_lin")}
    names |= {"lora_unet_single_blocks_5_linear1", "lora_unet_double_blocks_3_txt_attn_qkv"}
    assert set(kohya) == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    for name in names:
        rows = rank * (4 if name.endswith("linear1") else 3 if name.endswith("attn_qkv") else 1)
        assert kohya[f"{name}.lora_down.weight"].shape[0] == rows
        assert kohya[f"{name}.alpha"].ndim == 0 and kohya[f"{name}.alpha"].dtype == torch.float32
        assert float(kohya[f"{name}.alpha"]) == pytest.approx(scale * rows)
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * H, 4 * rank)
    assert kohya["lora_unet_double_blocks_0_img_mod_lin.lora_up.weight"].shape == (6 * H, rank)

    # ComfyUI's view: (alpha / rows) · up @ down on the fused BFL weight stacks each scale·B_j A_j in its rows.
    probe = torch.randn(H, 5, generator=torch.Generator().manual_seed(7))
    key = "lora_unet_single_blocks_0_linear1"
    down, up, a = (kohya[f"{key}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    fused = (float(a) / down.shape[0]) * up @ (down @ probe)
    parts = [
        f"transformer.single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    ]
    truth = torch.cat([scale * sd[f"{p}.lora_B.weight"] @ (sd[f"{p}.lora_A.weight"] @ probe) for p in parts])
    torch.testing.assert_close(fused, truth, rtol=1e-4, atol=1e-4)

    # diffusers' kohya converter splits the fused modules back; every module's ΔW = scale·B·A must survive.
    back = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    originals = {k.removesuffix(".lora_A.weight") for k in sd if k.endswith(".lora_A.weight")} - {
        "transformer.proj_out"
    }
    zero_filled = {f"transformer.single_transformer_blocks.5.{p}" for p in ("attn.to_k", "attn.to_v", "proj_mlp")} | {
        f"transformer.transformer_blocks.3.attn.{p}" for p in ("add_q_proj", "add_v_proj")
    }
    assert {k.removesuffix(".lora_A.weight") for k in back if k.endswith(".lora_A.weight")} == originals | zero_filled
    for module in originals:
        want = scale * sd[f"{module}.lora_B.weight"] @ (sd[f"{module}.lora_A.weight"] @ probe_for(sd, module))
        got = back[f"{module}.lora_B.weight"] @ (back[f"{module}.lora_A.weight"] @ probe_for(sd, module))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=module)
    for module in zero_filled:
        assert not back[f"{module}.lora_B.weight"].any(), module


def probe_for(sd: dict, module: str) -> torch.Tensor:
    """Random input columns for ``module``: comparing ΔW·X avoids materialising 56M-entry ΔW matrices."""
    inp = sd[f"{module}.lora_A.weight"].shape[1]
    return torch.randn(inp, 4, generator=torch.Generator().manual_seed(inp))


def test_kohya_export_of_tiny_model_and_save(tmp_path):
    model, _, _ = trained(rank=2, alpha=4.0, targets="attention")
    sd = L.lora_state_dict(model)
    path = LE.save_kohya(tmp_path / "k.safetensors", sd, rank=2, alpha=4.0, metadata={"finetune.rank": "2", "x": "y"})
    tensors, meta = L.load_lora_file(path)
    assert meta == {"finetune.rank": "2", "finetune.format": "kohya", "format": "pt"}
    # attention preset on single blocks: q, k, v trained, proj_mlp zero-filled → 4r rows, alpha 4r·scale.
    assert tensors["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (8, 16)
    assert float(tensors["lora_unet_single_blocks_0_linear1.alpha"]) == 16.0
    assert not tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"][48:].any()
    assert sorted({k.split(".")[0] for k in tensors}) == [
        "lora_unet_double_blocks_0_img_attn_proj",
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_0_txt_attn_proj",
        "lora_unet_double_blocks_0_txt_attn_qkv",
        "lora_unet_single_blocks_0_linear1",
    ]
    assert LE.save_kohya(tmp_path / "k2.safetensors", sd, rank=2, alpha=4.0).read_bytes() != b""
    with pytest.raises(FinetuneError, match="no modules inside the FLUX blocks"), pytest.warns(UserWarning):
        LE.export_kohya(
            {k: v for k, v in flux_dev_lora(2).items() if k.startswith("transformer.proj_out.")}, rank=2, alpha=2
        )


def test_models_export_cli(tmp_path, monkeypatch, capsys):
    from finetune.cli import main
    from finetune.registry import Registry

    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    model, _, _ = trained(rank=2, alpha=4.0, targets=["attn.to_q", "x_embedder"])
    src = save(tmp_path / "lora.safetensors", model, rank=2, alpha=4.0, targets=["attn.to_q", "x_embedder"])
    version = Registry().add_version("me/tok", src, {"base_model": "preset:tiny", "backend": "local"})

    with pytest.raises(SystemExit) as e:
        main(["models", "export", version.ref, "--format", "kohya", "-o", str(tmp_path / "out" / "k.safetensors")])
    captured = capsys.readouterr()
    assert e.value.code == 0, captured.err
    assert "rank 2, alpha 4" in captured.out
    assert "skipped 1 module(s) outside the FLUX blocks: x_embedder" in captured.err
    tensors, meta = L.load_lora_file(tmp_path / "out" / "k.safetensors")
    assert meta["finetune.trigger_word"] == "TOK" and meta["finetune.format"] == "kohya"
    assert sorted({k.split(".")[0] for k in tensors}) == [
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_single_blocks_0_linear1",
    ]
    assert float(tensors["lora_unet_single_blocks_0_linear1.alpha"]) == 2.0 * 4 * 2  # scale 2 × 4 projections × r 2

    # --format comfyui for FLUX.1 is the kohya file, byte for byte (ComfyUI reads lora_unet_* keys with .alpha).
    with pytest.raises(SystemExit) as e:
        main(["models", "export", version.ref, "--format", "comfyui", "-o", str(tmp_path / "c.safetensors")])
    captured = capsys.readouterr()
    assert e.value.code == 0, captured.err
    assert "(comfyui, FLUX.1, rank 2, alpha 4)" in captured.out and "x_embedder" in captured.err
    assert (tmp_path / "c.safetensors").read_bytes() == (tmp_path / "out" / "k.safetensors").read_bytes()

    with pytest.raises(SystemExit) as e:
        main(["models", "export", "me/tok", "--format", "diffusers", "-o", str(tmp_path / "d.safetensors")])
    assert e.value.code == 0
    assert (tmp_path / "d.safetensors").read_bytes() == src.read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["models", "export", "me/tok", "--format", "onnx", "-o", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2 and "use comfyui, kohya or diffusers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["models", "export", "me/nope", "-o", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2 and not (tmp_path / "x.safetensors").exists()
