"""FLUX.2 LoRA exports (ComfyUI/BFL and kohya), read back by diffusers' own FLUX.2 converters and pipeline."""

import functools

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_kohya_flux2_lora_to_diffusers,
    _convert_non_diffusers_flux2_lora_to_diffusers,
)
from torch import nn

from finetune import lora as L
from finetune import lora_export as LE
from finetune.errors import FinetuneError

# black-forest-labs/FLUX.2-klein-base-4B transformer/config.json (reference/flux-family-2026.md §1).
KLEIN_4B = dict(
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=7680,
    mlp_ratio=3.0,
    guidance_embeds=False,
)
H = 3072  # 24 heads × 128
DOUBLE = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
]
SINGLE = ["attn.to_qkv_mlp_proj", "attn.to_out"]
BFL_DOUBLE = ["img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2"]
BFL_DOUBLE += [n.replace("img", "txt") for n in BFL_DOUBLE]
# Every diffusers module of a fused BFL module, with its row block.
FUSED = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
}


@functools.cache
def klein_linears() -> dict[str, tuple[int, int]]:
    """Every Linear of the klein 4B transformer and its weight shape, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**KLEIN_4B)
    assert 3.8e9 < sum(p.numel() for p in model.parameters()) < 4.0e9  # "3.9B"
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_klein_4b_block_linears_are_the_mapped_modules():
    linears = klein_linears()
    blocks = {n: s for n, s in linears.items() if n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert set(blocks) == {f"transformer_blocks.{i}.{m}" for i in range(5) for m in DOUBLE} | {
        f"single_transformer_blocks.{i}.{m}" for i in range(20) for m in SINGLE
    }
    assert blocks["transformer_blocks.0.ff.linear_in"] == (2 * 9216, H)  # SwiGLU: gate and value, mlp_ratio 3
    assert blocks["transformer_blocks.0.ff.linear_out"] == (H, 9216)
    assert blocks["single_transformer_blocks.0.attn.to_qkv_mlp_proj"] == (3 * H + 2 * 9216, H)  # BFL linear1
    assert blocks["single_transformer_blocks.0.attn.to_out"] == (H, H + 9216)  # BFL linear2
    assert "norm_out.linear" in linears and "double_stream_modulation_img.linear" in linears  # outside the blocks


def klein_lora(rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random LoRA tensors at klein 4B shapes, no base weights.

    Double blocks 0 and 4 and single blocks 0 and 19 are complete; double block 2 has only attn.to_k and
    attn.add_v_proj (fused modules with untrained projections); plus two modules outside the blocks.
    """
    shapes = klein_linears()
    names = [f"transformer_blocks.{i}.{m}" for i in (0, 4) for m in DOUBLE]
    names += [f"single_transformer_blocks.{i}.{m}" for i in (0, 19) for m in SINGLE]
    names += [
        "transformer_blocks.2.attn.to_k",
        "transformer_blocks.2.attn.add_v_proj",
        "norm_out.linear",
        "x_embedder",
    ]
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names:
        out, inp = shapes[name]
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, inp, generator=g) / inp**0.5
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(out, rank, generator=g)
    return sd


def probe(inp: int) -> torch.Tensor:
    """Random input columns: comparing ΔW·X avoids materialising 85M-entry ΔW matrices."""
    return torch.randn(inp, 3, generator=torch.Generator().manual_seed(inp))


def delta(sd: dict, module: str, scale: float = 1.0) -> torch.Tensor:
    """``scale·B·A·X`` of ``module`` (``transformer.<name>``) in a diffusers-key state dict."""
    a, b = sd[f"{module}.lora_A.weight"], sd[f"{module}.lora_B.weight"]
    return scale * b @ (a @ probe(a.shape[1]))


TRAINED = {k.removesuffix(".lora_A.weight") for k in klein_lora(1) if k.endswith(".lora_A.weight")}
IN_BLOCKS = {m for m in TRAINED if m not in ("transformer.norm_out.linear", "transformer.x_embedder")}
ZERO_FILLED = {f"transformer.transformer_blocks.2.attn.{p}" for p in ("to_q", "to_v", "add_q_proj", "add_k_proj")}


def assert_reads_back(back: dict, sd: dict, scale: float) -> None:
    """Every trained block module's ΔW survives; the zero-filled projections read back as exact zeros."""
    assert {k.rsplit(".lora_", 1)[0] for k in back} == IN_BLOCKS | ZERO_FILLED
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in back)
    for module in IN_BLOCKS:
        torch.testing.assert_close(delta(back, module), delta(sd, module, scale), rtol=1e-4, atol=1e-4, msg=module)
    for module in ZERO_FILLED:
        assert not back[f"{module}.lora_B.weight"].any(), module


@pytest.mark.parametrize(("rank", "alpha"), [(4, 8.0), (4, 1.0)])
def test_comfyui_export_round_trips_through_diffusers_flux2_converter(rank, alpha):
    sd = klein_lora(rank)
    scale = alpha / rank
    with pytest.warns(
        UserWarning, match=r"skipped 2 module\(s\) outside the FLUX blocks: norm_out.linear, x_embedder"
    ):
        bfl = LE.export_comfyui(sd, rank=rank, alpha=alpha, family="flux2")

    names = {f"double_blocks.{i}.{m}" for i in (0, 4) for m in BFL_DOUBLE}
    names |= {f"single_blocks.{i}.{m}" for i in (0, 19) for m in ("linear1", "linear2")}
    names |= {"double_blocks.2.img_attn.qkv", "double_blocks.2.txt_attn.qkv"}
    assert set(bfl) == {f"diffusion_model.{n}.lora_{s}.weight" for n in names for s in "AB"}  # no .alpha keys
    assert bfl["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"].shape == (3 * rank, H)
    assert bfl["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"].shape == (3 * H, 3 * rank)
    assert bfl["diffusion_model.single_blocks.19.linear1.lora_B.weight"].shape == (3 * H + 2 * 9216, rank)
    assert bfl["diffusion_model.single_blocks.0.linear2.lora_A.weight"].shape == (rank, H + 9216)

    # ComfyUI's view: no .alpha key → scale 1.0, so B @ A on the fused BFL weight stacks each scale·B_j A_j.
    for block in (0, 2, 4):
        for fused, parts in FUSED.items():
            a, b = (bfl[f"diffusion_model.double_blocks.{block}.{fused}.lora_{s}.weight"] for s in "AB")
            want = [
                delta(sd, f"transformer.transformer_blocks.{block}.{p}", scale)
                if f"transformer.transformer_blocks.{block}.{p}.lora_A.weight" in sd
                else torch.zeros(H, 3)
                for p in parts
            ]
            torch.testing.assert_close(b @ (a @ probe(H)), torch.cat(want), rtol=1e-4, atol=1e-4)

    # diffusers' converter copies a fused A to each of q/k/v and chunks B by rows: with the stacked A and the
    # block-diagonal B that is each B_j A_j exactly, at rank 3r; it applies no alpha (none is needed: it is in B).
    back = _convert_non_diffusers_flux2_lora_to_diffusers(dict(bfl))
    assert back["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"].shape == (3 * rank, H)
    assert back["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight"].shape == (rank, H)
    assert_reads_back(back, sd, scale)


@pytest.mark.parametrize(("rank", "alpha"), [(4, 8.0), (4, 1.0)])
def test_kohya_export_round_trips_through_diffusers_flux2_converter(rank, alpha):
    sd = klein_lora(rank)
    scale = alpha / rank
    with pytest.warns(UserWarning, match=r"outside the FLUX blocks: norm_out.linear, x_embedder"):
        kohya = LE.export_kohya(sd, rank=rank, alpha=alpha, family="flux2")

    names = {f"double_blocks_{i}_{m.replace('.', '_')}" for i in (0, 4) for m in BFL_DOUBLE}
    names |= {f"single_blocks_{i}_{m}" for i in (0, 19) for m in ("linear1", "linear2")}
    names |= {"double_blocks_2_img_attn_qkv", "double_blocks_2_txt_attn_qkv"}
    assert set(kohya) == {f"lora_unet_{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    for name in names:
        rows = rank * (3 if name.endswith("attn_qkv") else 1)
        assert kohya[f"lora_unet_{name}.lora_down.weight"].shape[0] == rows
        assert float(kohya[f"lora_unet_{name}.alpha"]) == pytest.approx(scale * rows)

    # The converter pops what it reads: an empty dict afterwards means every key was consumed. It bakes
    # alpha / rows into A and B, and recognises the block-diagonal lora_up as sparse, so q/k/v come back at rank r.
    consumed = dict(kohya)
    back = _convert_kohya_flux2_lora_to_diffusers(consumed)
    assert consumed == {}
    assert back["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"].shape == (rank, H)
    assert_reads_back(back, sd, scale)


def test_lora_family_from_names_then_base_model():
    flux2 = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 2),
        "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight": torch.zeros(2, 8),
        "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B.weight": torch.zeros(40, 2),
    }
    flux1 = {k.replace("attn.to_qkv_mlp_proj", "proj_mlp"): v for k, v in flux2.items()}
    both = {k: v for k, v in flux2.items() if "single" not in k}
    assert LE.lora_family(flux2) == "flux2"
    assert LE.lora_family(flux1) == "flux1"
    assert LE.lora_family(flux2, {"finetune.base_model": "preset:tiny"}) == "flux2"  # the names decide
    # Double-block attention alone fits both families: the base model decides, else FLUX.1 (same kohya file).
    assert LE.lora_family(both, {"finetune.base_model": "preset:flux2-tiny"}) == "flux2"
    assert LE.lora_family(both, {"finetune.base_model": "black-forest-labs/FLUX.2-klein-base-4B"}) == "flux2"
    assert LE.lora_family(both, {"finetune.base_model": "preset:tiny"}) == "flux1"
    assert LE.lora_family(both, {"finetune.base_model": "preset:nope"}) == "flux1"
    assert LE.lora_family(both) == "flux1"
    # FLUX.1 Kontext's blocks are FLUX.1's: its LoRAs export under FLUX.1's BFL names, byte for byte
    assert LE.lora_family(both, {"finetune.base_model": "preset:kontext-tiny"}) == "flux1"
    assert LE.lora_family(flux1, {"finetune.base_model": "black-forest-labs/FLUX.1-Kontext-dev"}) == "flux1"
    kontext, dev = (LE.export_comfyui(flux1, rank=2, alpha=2, family=f) for f in ("kontext", "flux1"))
    assert kontext.keys() == dev.keys() and all(torch.equal(kontext[k], dev[k]) for k in dev)


def test_modules_without_a_bfl_place_are_warned_by_name():
    sd = klein_lora(2)
    odd = {  # FLUX.1 names in a FLUX.2 file
        "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.zeros(2, H),
        "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": torch.zeros(4 * H, 2),
        "transformer.transformer_blocks.0.norm1.linear.lora_A.weight": torch.zeros(2, H),
        "transformer.transformer_blocks.0.norm1.linear.lora_B.weight": torch.zeros(6 * H, 2),
    }
    for export in (LE.export_comfyui, LE.export_kohya):
        with pytest.warns(UserWarning) as caught:
            out = export(sd | odd, rank=2, alpha=2.0, family="flux2")
        messages = [str(w.message) for w in caught]
        assert any("outside the FLUX blocks: norm_out.linear, x_embedder" in m for m in messages), messages
        assert any(
            "skipped 2 block module(s) that have no FLUX.2 BFL name: single_transformer_blocks.0.proj_mlp, "
            "transformer_blocks.0.norm1.linear" in m
            for m in messages
        ), messages
        assert not any("proj_mlp" in k or "mod_lin" in k or "mod.lin" in k for k in out)
    only_norm_out = {k: v for k, v in sd.items() if ".norm_out." in k}
    with (
        pytest.raises(FinetuneError, match="no modules inside the FLUX blocks"),
        pytest.warns(UserWarning, match="norm"),
    ):
        LE.export_comfyui(only_norm_out, rank=2, alpha=2.0, family="flux2")
    with pytest.raises(FinetuneError, match="unknown model family 'flux9'"):
        LE.export_kohya(sd, rank=2, alpha=2.0, family="flux9")


# ----------------------------------------------------------------------------------------------- diffusers pipeline


def trained_tiny(targets, rank: int = 4, alpha: float = 8.0):
    """The flux2-tiny transformer with a LoRA whose A and B are both random (peft's init has B = 0)."""
    from finetune.models import flux2

    model = flux2.build_preset("flux2-tiny").transformer
    modules = L.add_lora(model, rank=rank, alpha=alpha, targets=targets, seed=0)
    g = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in L.lora_state_dict(model).items()}
    L.set_lora_state(model, state)
    return model, modules, state


def tiny_inputs() -> dict:
    from finetune.models import flux2

    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 6, 128, generator=g),
        encoder_hidden_states=torch.randn(1, 16, 96, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=flux2.image_ids((2, 3), "cpu", torch.float32),
        txt_ids=flux2.text_ids(16, "cpu", torch.float32),
        return_dict=False,
    )


@pytest.mark.parametrize("targets", ["all-linear", ["attn.to_q"]], ids=["all-linear", "to_q"])
@pytest.mark.parametrize("form", ["comfyui", "kohya"])
def test_exported_file_loads_in_flux2_klein_pipeline_at_the_trained_scale(tmp_path, form, targets):
    """Flux2KleinPipeline.load_lora_weights takes each export with every key consumed, puts an adapter on every
    trained Linear (and zero ones on the untrained projections of a fused q/k/v), and gives the trained output."""
    from diffusers import Flux2KleinPipeline

    from finetune.models import flux2

    rank, alpha = 4, 8.0
    trained, modules, state = trained_tiny(targets, rank, alpha)
    src = L.save_lora(
        tmp_path / "lora.safetensors",
        state,
        rank=rank,
        alpha=alpha,
        base_model="preset:flux2-tiny",
        trigger_word="TOK",
        targets=targets,
        alpha_keys=False,
    )
    tensors, meta = L.load_lora_file(src)
    assert LE.lora_family(tensors, meta) == "flux2"  # to_q alone fits both families: the base model decides
    save = LE.save_comfyui if form == "comfyui" else LE.save_kohya
    path = save(tmp_path / f"{form}.safetensors", tensors, rank=rank, alpha=alpha, metadata=meta, family="flux2")
    exported, exported_meta = L.load_lora_file(path)
    assert exported_meta["finetune.format"] == form and exported_meta["finetune.base_model"] == "preset:flux2-tiny"
    assert "lora_adapter_metadata" not in exported_meta  # the source's alpha must not be applied a second time
    if form == "comfyui":
        assert all(k.startswith("diffusion_model.") and not k.endswith(".alpha") for k in exported)
        converted = _convert_non_diffusers_flux2_lora_to_diffusers(dict(exported))  # raises on a key left over
    else:
        consumed = dict(exported)
        converted = _convert_kohya_flux2_lora_to_diffusers(consumed)
        assert consumed == {}

    pipe = flux2.pipeline_from_components(flux2.build_preset("flux2-tiny"))
    assert isinstance(pipe, Flux2KleinPipeline)
    pipe.load_lora_weights(str(path))
    loaded = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A}
    assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted} == loaded
    siblings = {f"transformer_blocks.0.attn.{p}" for p in ("to_k", "to_v")}
    assert loaded == set(modules) | (siblings if targets != "all-linear" else set())

    inputs = tiny_inputs()
    with torch.no_grad():
        ours, theirs = trained(**inputs)[0], pipe.transformer(**inputs)[0]
        base = flux2.build_preset("flux2-tiny").transformer(**inputs)[0]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert float((ours - base).abs().max()) > 1e-2  # the LoRA changes the output, far above the tolerance


def test_models_export_cli_for_flux2(tmp_path, monkeypatch, capsys):
    from safetensors import safe_open

    from finetune.cli import main
    from finetune.registry import Registry

    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    _, _, state = trained_tiny("all-linear", rank=2, alpha=6.0)
    state |= {  # a module outside the blocks: skipped, and said so
        "transformer.norm_out.linear.lora_A.weight": torch.ones(2, 32),
        "transformer.norm_out.linear.lora_B.weight": torch.ones(64, 2),
    }
    src = L.save_lora(tmp_path / "lora.safetensors", state, rank=2, alpha=6.0, base_model="preset:flux2-tiny",
                      trigger_word="TOK", targets="all-linear", alpha_keys=False)  # fmt: skip
    version = Registry().add_version("me/tok2", src, {"base_model": "preset:flux2-tiny", "backend": "local"})

    with pytest.raises(SystemExit) as e:
        main(["models", "export", version.ref, "--format", "comfyui", "-o", str(tmp_path / "c.safetensors")])
    captured = capsys.readouterr()
    assert e.value.code == 0, captured.err
    assert "(comfyui, FLUX.2, rank 2, alpha 6)" in captured.out
    assert "outside the FLUX blocks: norm_out.linear" in captured.err
    tensors, meta = L.load_lora_file(tmp_path / "c.safetensors")
    assert meta["finetune.format"] == "comfyui" and meta["finetune.trigger_word"] == "TOK"
    assert sorted({k.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0] for k in tensors}) == [
        "double_blocks.0.img_attn.proj",
        "double_blocks.0.img_attn.qkv",
        "double_blocks.0.img_mlp.0",
        "double_blocks.0.img_mlp.2",
        "double_blocks.0.txt_attn.proj",
        "double_blocks.0.txt_attn.qkv",
        "double_blocks.0.txt_mlp.0",
        "double_blocks.0.txt_mlp.2",
        "single_blocks.0.linear1",
        "single_blocks.0.linear2",
    ]
    baked = tensors["diffusion_model.single_blocks.0.linear2.lora_B.weight"]
    torch.testing.assert_close(baked, 3.0 * state["transformer.single_transformer_blocks.0.attn.to_out.lora_B.weight"])
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        assert "lora_adapter_metadata" not in f.metadata()

    with pytest.raises(SystemExit) as e:
        main(["models", "export", "me/tok2", "-o", str(tmp_path / "k.safetensors")])  # default: kohya
    assert e.value.code == 0 and "(kohya, FLUX.2, rank 2, alpha 6)" in capsys.readouterr().out
    tensors, meta = L.load_lora_file(tmp_path / "k.safetensors")
    assert meta["finetune.format"] == "kohya"
    assert float(tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 3.0 * 3 * 2  # scale × 3 parts × r
    assert float(tensors["lora_unet_single_blocks_0_linear1.alpha"]) == 3.0 * 2  # to_qkv_mlp_proj is linear1 as is
