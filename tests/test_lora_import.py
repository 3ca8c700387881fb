"""`finetune models import`: every common LoRA form in, the project's file out, nothing dropped in silence; and the
exports read back: import(export(v)) gives v's ΔW, and each family's pipeline loads the diffusers and kohya forms."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch

from finetune import lora as L
from finetune import lora_export as LE
from finetune import lora_import as LI
from finetune.errors import FinetuneError
from finetune.registry import Registry

PRESETS = {"tiny": "flux1", "kontext-tiny": "kontext", "flux2-tiny": "flux2", "flux2-dev-tiny": "flux2"}
FORMS = {
    "flux1": ("diffusers", "kohya"),
    "kontext": ("diffusers", "kohya"),
    "flux2": ("diffusers", "kohya", "comfyui"),
}


@functools.cache
def _trained(preset: str, targets: str | tuple = "all-linear", rank: int = 4, alpha: float = 8.0):
    """(modules, state) of a LoRA on the preset's transformer with random A and B (peft's init has B = 0)."""
    from finetune import models

    family = models.family_module(PRESETS[preset])
    model = family.build_preset(preset).transformer
    modules = L.add_lora(model, rank=rank, alpha=alpha, targets=targets if isinstance(targets, str) else list(targets))
    g = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in L.lora_state_dict(model).items()}
    return modules, state


def saved(tmp_path: Path, preset: str, targets: str | tuple = "all-linear", rank: int = 4, alpha: float = 8.0):
    from finetune import models

    modules, state = _trained(preset, targets, rank, alpha)
    family = models.family_module(PRESETS[preset])
    path = L.save_lora(tmp_path / f"{preset}.safetensors", state, rank=rank, alpha=alpha,
                       base_model=f"preset:{preset}", trigger_word="TOK", targets="all-linear",
                       alpha_keys=family.LORA_ALPHA_KEYS)  # fmt: skip
    return modules, state, path


def delta(sd: dict, module: str, scale: float) -> torch.Tensor:
    a, b = sd[f"transformer.{module}.lora_A.weight"], sd[f"transformer.{module}.lora_B.weight"]
    return scale * b.float() @ a.float()


def assert_same_delta(path: Path, state: dict, modules: list[str], scale: float) -> None:
    """Every module's ΔW = scale·B·A in ``path`` (read with lora_file_settings) equals the trained one."""
    back, meta = L.load_lora_file(path)
    rank, alpha = L.lora_file_settings(back, meta)
    assert set(L.modules_of(back, "imported")) == set(modules)
    for module in modules:
        torch.testing.assert_close(delta(back, module, alpha / rank), delta(state, module, scale), rtol=8e-3,
                                   atol=1e-5, msg=module)  # fmt: skip


def export(path: Path, form: str, out: Path) -> Path:
    if form == "diffusers":
        return path
    tensors, meta = L.load_lora_file(path)
    rank, alpha = L.lora_file_settings(tensors, meta)
    save = LE.save_kohya if form == "kohya" else LE.save_comfyui
    return save(out, tensors, rank=rank, alpha=alpha, metadata=meta, family=LE.lora_family(tensors, meta))


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("preset", list(PRESETS))
def test_import_of_every_export_gives_back_the_trained_delta(tmp_path, finetune_home, preset):
    modules, state, src = saved(tmp_path, preset)
    registry = Registry()
    first = None
    for form in FORMS[PRESETS[preset]]:
        exported = export(src, form, tmp_path / f"{form}.safetensors")
        version, plan = LI.import_lora(str(exported), "me/imported", registry=registry)
        assert version.lineage["backend"] == "import" and version.lineage["base_model"] == f"preset:{preset}"
        assert plan.format == {"comfyui": "bfl"}.get(form, form) and not plan.skipped
        assert version.lineage["import"]["format"] == "diffusers"  # the first import's: equal bytes, one version
        assert_same_delta(version.lora_path, state, modules, 2.0)
        # the same LoRA in any form is the same file, so the same version id
        first = first or version.id
        assert version.id == first, form
    assert len(registry.versions("me/imported")) == 1


@pytest.mark.parametrize("preset", ["tiny", "flux2-tiny"])
def test_canonical_file_is_byte_for_byte_what_save_lora_writes(tmp_path, preset):
    from finetune import models

    modules, state, src = saved(tmp_path, preset)
    plan = LI.plan_import(src)
    out = LI.write_canonical(plan, tmp_path / "out.safetensors", base_model=f"preset:{preset}", trigger_word="TOK")
    expected = L.save_lora(tmp_path / "expected.safetensors", state, rank=4, alpha=8.0, base_model=f"preset:{preset}",
                           trigger_word="TOK", targets=sorted(modules),
                           alpha_keys=models.family_module(PRESETS[preset]).LORA_ALPHA_KEYS)  # fmt: skip
    assert out.read_bytes() == expected.read_bytes()


@pytest.mark.parametrize("preset", ["tiny", "flux2-tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_export_is_byte_for_byte_the_in_memory_one(tmp_path, preset, dtype):
    modules, state = _trained(preset)
    family = LE._layout(PRESETS[preset])
    state = dict(state)
    state["transformer.x_embedder.lora_A.weight"] = torch.ones(
        4, state[f"transformer.{modules[0]}.lora_A.weight"].shape[1]
    )
    state["transformer.x_embedder.lora_B.weight"] = torch.ones(4 if family == "flux1" else 2, 4)  # skipped: warned
    src = L.save_lora(tmp_path / "src.safetensors", state, rank=4, alpha=6.0, base_model=f"preset:{preset}",
                      trigger_word="TOK", targets="all-linear", dtype=dtype, alpha_keys=family == "flux1")  # fmt: skip
    tensors, meta = L.load_lora_file(src)
    for form, save in (("kohya", LE.save_kohya), ("comfyui", LE.save_comfyui)):
        with pytest.warns(UserWarning, match="x_embedder"):
            expected = save(tmp_path / f"{form}.safetensors", tensors, rank=4, alpha=6.0, metadata=meta, family=family)
        with pytest.warns(UserWarning, match="x_embedder"):
            out, got_family, rank, alpha = LE.stream_export(src, tmp_path / f"{form}-s.safetensors", form=form)
        assert (got_family, rank, alpha) == (family, 4, 6.0)
        assert out.read_bytes() == expected.read_bytes(), form


PIPELINE_TARGETS = {  # FLUX.1 kohya through diffusers: double blocks only at tiny dims (its converter hard-codes
    # linear1's split at FLUX.1-dev's 3072: comfyui-lora-keys.md §7; tests/test_lora.py checks it at those dims)
    "flux1": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "ff.net.0.proj",
              "norm1.linear", "ff_context.net.2"),
}  # fmt: skip


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("form", ["diffusers", "kohya"])
def test_pipeline_loads_every_key(tmp_path, preset, form):
    """The family's diffusers pipeline loads the form with an adapter on every trained module and none else."""
    from finetune import models

    family = models.family_module(PRESETS[preset])
    layout = LE._layout(PRESETS[preset])
    targets = PIPELINE_TARGETS.get(layout, "all-linear") if form == "kohya" else "all-linear"
    if layout == "flux1" and form == "kohya":
        targets = tuple(f"transformer_blocks.0.{t}" for t in targets)
    modules, state, src = saved(tmp_path, preset, targets)
    path = export(src, form, tmp_path / f"{form}.safetensors")
    if form == "kohya":
        from diffusers.loaders import lora_conversion_utils as conv

        consumed = dict(L.load_lora_file(path)[0])
        if layout == "flux1":  # raises on a key it cannot place ("Incompatible keys")
            converted = conv._convert_kohya_flux_lora_to_diffusers(consumed)
        else:  # pops what it reads: every key consumed leaves nothing
            converted = conv._convert_kohya_flux2_lora_to_diffusers(consumed)
            assert consumed == {}
        assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted} >= set(modules)
    pipe = family.pipeline_from_components(family.build_preset(preset))
    pipe.load_lora_weights(str(path))
    loaded = {n: m.lora_B[next(iter(m.lora_B))].weight for n, m in pipe.transformer.named_modules()
              if hasattr(m, "lora_B") and m.lora_B}  # fmt: skip
    untrained = {n for n in loaded if n not in modules}  # kohya: a fused q/k/v's untrained parts, as zero adapters
    assert form == "kohya" or not untrained
    assert all(not loaded[n].any() for n in untrained)
    assert set(loaded) - untrained == set(modules)


# ------------------------------------------------------------------------------------------------ other formats


def renamed(state: dict, rename, updown: bool = False, alpha: float | None = None) -> dict:
    """A diffusers-key state dict under other names: rename(module) → new module; lora_down/up when ``updown``."""
    out = {}
    for key, value in state.items():
        module, _, suffix = key.removeprefix("transformer.").rpartition(".lora_")
        new = rename(module)
        a_or_b = suffix.removesuffix(".weight")
        name = {"A": "lora_down", "B": "lora_up"}[a_or_b] if updown else f"lora_{a_or_b}"
        out[f"{new}.{name}.weight"] = value
        if alpha is not None:
            out[f"{new}.alpha"] = torch.tensor(alpha)
    return out


def bfl_flux2(module: str) -> str:
    """FLUX.2 diffusers → BFL for the modules that are 1:1 (reference/flux-family-2026.md §5.1)."""
    table = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0",
             "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
             "attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}  # fmt: skip
    kind, index, rest = module.split(".", 2)
    return f"{ {'transformer_blocks': 'double_blocks'}.get(kind, 'single_blocks') }.{index}.{table[rest]}"


FLUX2_ONE_TO_ONE = ("attn.to_out.0", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
                    "ff_context.linear_out", "attn.to_qkv_mlp_proj", "attn.to_out")  # fmt: skip


@pytest.mark.parametrize(
    ("name", "preset", "targets", "rename", "updown", "alpha"),
    [
        ("peft", "tiny", "all-linear", lambda m: f"base_model.model.{m}", False, None),
        ("onetrainer", "tiny", "all-linear", lambda m: "lora_transformer_" + m.replace(".", "_"), True, 4.0),
        ("lycoris", "flux2-tiny", "all-linear", lambda m: "lycoris_" + m.replace(".", "_"), True, 4.0),
        ("diffsynth", "flux2-tiny", "all-linear", lambda m: m, False, None),
        ("fal", "flux2-tiny", "all-linear", lambda m: m.replace("transformer_blocks", "sformer_blocks", 1)
         if m.startswith("transformer_blocks") else m, False, None),
        ("fal", "flux2-tiny", FLUX2_ONE_TO_ONE, bfl_flux2, False, None),
        ("musubi", "flux2-tiny", FLUX2_ONE_TO_ONE,
         lambda m: "diffusion_model." + bfl_flux2(m).replace("attn.", "attn_").replace("mlp.", "mlp_"), True, 4.0),
        ("kohya", "flux2-tiny", FLUX2_ONE_TO_ONE, lambda m: "lora_unet_" + bfl_flux2(m).replace(".", "_"), True, 4.0),
        ("bfl", "flux2-tiny", FLUX2_ONE_TO_ONE, lambda m: "diffusion_model." + bfl_flux2(m), False, None),
    ],
)  # fmt: skip
def test_formats_seen_in_the_wild_import_exactly(
    tmp_path, finetune_home, name, preset, targets, rename, updown, alpha
):
    """Key examples of reference/flux-family-2026.md §5.1 and comfyui-lora-keys.md §2, built from a trained LoRA;
    with ``.alpha`` = 4 at rank 4 the scale is 1, without alpha the file's scale is 1 too (no metadata)."""
    modules, state = _trained(preset, targets if isinstance(targets, str) else tuple(targets))
    from safetensors.torch import save_file

    path = tmp_path / f"{name}.safetensors"
    save_file(renamed(state, rename, updown, alpha), str(path))
    version, plan = LI.import_lora(str(path), "me/x", base_model=f"preset:{preset}")
    assert plan.format == name and not plan.skipped
    assert_same_delta(version.lora_path, state, modules, 1.0)


def test_flux1_kohya_import_equals_diffusers_converter_at_flux1_dev_dims(tmp_path):
    """diffusers' _convert_kohya_flux_lora_to_diffusers is the ground truth for kohya files (alpha baked in)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    h, r = 3072, 2
    kohya = {}
    modules = [
        ("double_blocks_0_img_attn_qkv", 3 * h, h, 3 * r),
        ("double_blocks_3_txt_mlp_2", h, 4 * h, r),
        ("single_blocks_37_linear1", 7 * h, h, 4 * r),
        ("single_blocks_2_modulation_lin", 3 * h, h, r),
    ]
    for name, rows, cols, rank in modules:
        kohya[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, cols, generator=g)
        kohya[f"lora_unet_{name}.lora_up.weight"] = torch.randn(rows, rank, generator=g)  # dense: not block-diagonal
        kohya[f"lora_unet_{name}.alpha"] = torch.tensor(float(rank) * 0.5)
    path = tmp_path / "k.safetensors"
    save_file(kohya, str(path))
    truth = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    plan = LI.plan_import(path, base_model="black-forest-labs/FLUX.1-dev")
    assert plan.format == "kohya" and plan.layout.family == "flux1"
    out = LI.write_canonical(plan, tmp_path / "c.safetensors", base_model="black-forest-labs/FLUX.1-dev")
    ours, meta = L.load_lora_file(out)
    rank, alpha = L.lora_file_settings(ours, meta)
    assert {k.rsplit(".lora_", 1)[0] for k in truth} == {f"transformer.{m}" for m in plan.modules}
    for module in plan.modules:
        torch.testing.assert_close(delta(ours, module, alpha / rank), delta(truth, module, 1.0), rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------------------------------------ refusals


def lora_file(tmp_path: Path, extra: dict, name: str = "x.safetensors") -> Path:
    from safetensors.torch import save_file

    _, state = _trained("tiny")
    path = tmp_path / name
    save_file({**state, **extra}, str(path), metadata={"finetune.base_model": "preset:tiny"})
    return path


def test_unknown_keys_are_an_error_naming_them_and_nothing_is_registered(tmp_path, finetune_home):
    extra = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
             "transformer.transformer_blocks.0.attn.to_q.hada_w1_a": torch.zeros(2, 2)}  # fmt: skip
    extra.pop("transformer.transformer_blocks.0.attn.to_q.hada_w1_a")
    extra["transformer.transformer_blocks.0.attn.to_q.magic"] = torch.zeros(1)
    path = lora_file(tmp_path, extra)
    before = path.read_bytes()
    with pytest.raises(FinetuneError, match="2 of .* key") as e:
        LI.import_lora(str(path), "me/x")
    message = str(e.value)
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight has no matching lora_B" in message
    assert "transformer.transformer_blocks.0.attn.to_q.magic is not a LoRA tensor" in message
    assert e.value.exit_code == 2 and Registry().models() == []
    version, plan = LI.import_lora(str(path), "me/x", allow_partial=True)
    assert sorted(version.lineage["import"]["skipped_keys"]) == sorted(extra)
    assert path.read_bytes() == before  # the source is never modified


def test_wrong_shapes_lokr_dora_and_pickles_are_refused(tmp_path, finetune_home):
    bad = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 33)}
    _, state = _trained("tiny")
    from safetensors.torch import save_file

    path = tmp_path / "shape.safetensors"
    save_file({**state, **bad}, str(path), metadata={"finetune.base_model": "preset:tiny"})
    with pytest.raises(FinetuneError, match=r"to_q.lora_A.weight has shapes A \(4, 33\), B \(32, 4\); preset:tiny"):
        LI.import_lora(str(path), "me/x")
    for key, kind in [("diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1", "LoKr"),
                      ("transformer.transformer_blocks.0.attn.to_q.dora_scale", "DoRA")]:  # fmt: skip
        path = lora_file(tmp_path, {key: torch.zeros(2, 2)}, f"{kind}.safetensors")
        for partial in (False, True):
            with pytest.raises(FinetuneError, match=f"is a {kind}.*{key}"):
                LI.import_lora(str(path), "me/x", allow_partial=partial)
    pickle = tmp_path / "evil.safetensors"
    torch.save({"a": torch.zeros(1)}, pickle)  # a zip pickle, named like safetensors
    with pytest.raises(FinetuneError, match="is a pickle"):
        LI.import_lora(str(pickle), "me/x")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(FinetuneError, match="not a safetensors file"):
        LI.import_lora(str(tmp_path / "junk.safetensors"), "me/x")
    assert Registry().models() == []


def test_a_lora_that_fits_two_families_needs_base(tmp_path, finetune_home):
    from safetensors.torch import load_file, save_file

    h = 3072  # FLUX.1 [dev] and FLUX.2 [klein] 4B: both 3072 wide, the same q/k/v names
    path = tmp_path / "q.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, h),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(h, 2)}, str(path))  # fmt: skip
    with pytest.raises(FinetuneError, match=r"fits FLUX.1 \[dev\].* and FLUX.2 \[klein\] 4B alike.*--base"):
        LI.plan_import(path)
    assert LI.plan_import(path, base_model="black-forest-labs/FLUX.2-klein-base-4B").layout.family == "flux2"
    plan = LI.plan_import(path, base_model="black-forest-labs/FLUX.1-Kontext-dev")
    assert plan.layout.family == "kontext" and plan.format == "diffusers"
    with pytest.raises(FinetuneError, match="importing FLUX 3 Image Klein LoRAs is not supported yet") as info:
        LI.plan_import(path, base_model="preset:flux3-tiny")
    assert info.value.exit_code == 2
    named = tmp_path / "flux3.safetensors"  # the base named in the file's metadata says so too
    save_file(load_file(str(path)), str(named), metadata={"finetune.base_model": "preset:flux3-tiny"})
    with pytest.raises(FinetuneError, match="importing FLUX 3 Image Klein LoRAs is not supported yet"):
        LI.plan_import(named)


# ------------------------------------------------------------------------------------------------ sources and CLI


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


def test_url_and_hf_sources(tmp_path, finetune_home, monkeypatch):
    _, _, src = saved(tmp_path, "tiny")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Files, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{src.name}"
        version, _ = LI.import_lora(url, "me/url")
        origin = version.lineage["import"]
        assert origin["source"] == url and origin["bytes"] == src.stat().st_size
        assert origin["sha256"] == __import__("hashlib").sha256(src.read_bytes()).hexdigest()
        with pytest.raises(FinetuneError, match="over the 100-byte limit"):
            LI.import_lora(url, "me/url2", max_bytes=100)
        with pytest.raises(FinetuneError, match="HTTP 404"):
            LI.import_lora(url + ".missing", "me/url2")
    finally:
        server.shutdown()
    with pytest.raises(FinetuneError, match="use https://"):
        LI.import_lora("http://example.com/x.safetensors", "me/url2")

    # hf://: the real hf_hub_download path with the download itself replaced by a file in a snapshot folder
    snapshot = tmp_path / "hub" / "models--o--r" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "lora.safetensors").write_bytes(src.read_bytes())
    calls = []

    def fake_download(repo_id, filename, revision=None):
        calls.append((repo_id, filename, revision))
        return str(snapshot / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    version, _ = LI.import_lora("hf://o/r/lora.safetensors", "me/hf")
    assert calls == [("o/r", "lora.safetensors", None)]
    assert version.lineage["import"]["hf_revision"] == "abc123" and version.lineage["import"]["hf_repo"] == "o/r"
    assert Registry().versions("me/hf")[0].id == Registry().versions("me/url")[0].id


def test_models_import_and_show_cli(tmp_path, finetune_home, capsys):
    from finetune.cli import main

    _, _, src = saved(tmp_path, "flux2-tiny")
    kohya = export(src, "kohya", tmp_path / "k.safetensors")
    with pytest.raises(SystemExit) as e:
        main(["models", "import", str(kohya), "--as", "me/k"])
    out = capsys.readouterr()
    assert e.value.code == 0, out.err
    assert "Imported me/k:" in out.out and "(kohya, preset:flux2-tiny" in out.out
    with pytest.raises(SystemExit) as e:
        main(["models", "show", "me/k"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "Loads in" in out and "--format comfyui" in out
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"foo.bar": torch.zeros(1)}, str(bad))
    with pytest.raises(SystemExit) as e:
        main(["models", "import", str(bad), "--as", "me/bad"])
    assert e.value.code == 2 and "holds no LoRA weights: foo.bar" in capsys.readouterr().err
    assert Registry().models() == ["me/k"]
    assert json.loads((Registry().resolve("me/k").path / "model.json").read_text())["lineage"]["backend"] == "import"
