"""`finetune eval` end to end on preset:tiny saved to disk, LoRAs made with finetune.lora, and tiny scorers."""

import functools
import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from conftest import write_dataset_zip
from PIL import Image

from finetune import lora
from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.files import sha256_file
from finetune.models.flux1 import build_preset
from finetune.recipes.evaluate import evaluate, parse_size, read_prompt_file
from finetune.registry import Registry

PROMPTS = ["a photo of [trigger]", "a photo of a cat"]
FAST = dict(seeds=(1, 2), steps=1, size=32, progress=False)  # preset:tiny at 32 px: 4 image tokens


@functools.cache
def _lora_shapes() -> dict:
    transformer = build_preset("tiny").transformer
    lora.add_lora(transformer, rank=4, alpha=4, targets="all-linear", seed=0)
    return {k: v.shape for k, v in lora.lora_state_dict(transformer).items()}


def make_lora(path, *, seed: int, base_model: str, trigger: str):
    """A rank-4 LoRA on preset:tiny with random (non-zero) B, so it changes the images, saved by finetune.lora."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) * 0.3 for k, shape in _lora_shapes().items()}
    return lora.save_lora(path, state, rank=4, alpha=4, base_model=base_model, trigger_word=trigger, targets="all")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_preset_dir, tiny_scorer_dirs):
    """A registry with two versions of me/tok (triggers TOK and SKS) trained on the saved tiny preset."""
    root = tmp_path_factory.mktemp("eval")
    data = write_dataset_zip(root / "tok.zip", [(48, 48), (64, 48), (40, 56)])
    registry = Registry(root / "home")
    versions = []
    for seed, trigger in ((1, "TOK"), (2, "SKS")):
        file = make_lora(root / f"l{seed}.safetensors", seed=seed, base_model=str(tiny_preset_dir), trigger=trigger)
        dataset = {"path": str(data), "digest": sha256_file(data)}
        lineage = {"base_model": str(tiny_preset_dir), "trigger_word": trigger, "backend": "local",
                   "dataset": dataset, "config": {"lora": {"rank": 4}}}  # fmt: skip
        versions.append(registry.add_version("me/tok", file, lineage))
    clip_dir, dino_dir = tiny_scorer_dirs
    return {"root": root, "registry": registry, "versions": versions, "clip": clip_dir, "dino": dino_dir,
            "base": str(tiny_preset_dir)}  # fmt: skip


class Counters:
    """Counts base-model loads and prompts through T5 by wrapping the real diffusers/transformers entry points."""

    def __init__(self, monkeypatch):
        from diffusers import FluxTransformer2DModel
        from transformers import T5EncoderModel

        self.loads, self.t5_rows = 0, []
        load, forward = FluxTransformer2DModel.from_pretrained.__func__, T5EncoderModel.forward

        def counting_load(cls, *args, **kwargs):
            self.loads += 1
            return load(cls, *args, **kwargs)

        def counting_forward(module, input_ids=None, *args, **kwargs):
            self.t5_rows.append(input_ids.shape[0])
            return forward(module, input_ids, *args, **kwargs)

        monkeypatch.setattr(FluxTransformer2DModel, "from_pretrained", classmethod(counting_load))
        monkeypatch.setattr(T5EncoderModel, "forward", counting_forward)


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.imgs, self.best, self.text = set(), [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.add(a.get("id"))
        if tag == "img":
            self.imgs.append(a["src"])
        self.best += a.get("class") == "best"

    def handle_data(self, data):
        self.text.append(data)


def run(world, refs, out, **kwargs):
    options = dict(prompts=PROMPTS, out=out, clip_model=world["clip"], dino_model=world["dino"], **FAST)
    return evaluate(refs, registry=world["registry"], **(options | kwargs))


def test_eval_loads_once_encodes_once_and_reuses_cached_images(world, monkeypatch, tmp_path):
    from finetune import metrics

    v1, v2 = world["versions"]
    counters = Counters(monkeypatch)
    clip_texts = []
    embed_texts = metrics.ClipScorer.embed_texts
    monkeypatch.setattr(
        metrics.ClipScorer, "embed_texts", lambda self, texts: clip_texts.extend(texts) or embed_texts(self, texts)
    )
    out = tmp_path / "report"
    first = run(world, ["base", v1.ref], out)
    # CLIP-T scores every column against the prompt without the trigger word, base (which borrows TOK) included
    assert sorted(clip_texts) == ["a photo of", "a photo of a cat"]

    assert counters.loads == 1 and first.counters["pipeline_loads"] == 1
    # base and v1 share the trigger TOK, so the two prompts are two texts, encoded in one batch
    assert counters.t5_rows == [2] and first.counters["prompts_encoded"] == 2
    assert first.counters["images_sampled"] == 8 and first.counters["images_cached"] == 0
    doc = json.loads(first.metrics_path.read_text())
    assert doc == json.loads(json.dumps(first.doc))
    assert [c["label"] for c in doc["columns"]] == ["base", v1.ref]
    assert {im["prompt"] for im in doc["images"]} == {"a photo of TOK", "a photo of a cat"}
    assert set(doc["metrics"]) == {"clip_t", "clip_i", "dino", "bleed", "diversity"}
    lora_column = doc["aggregate"]["c1"]
    assert 0.0 <= lora_column["diversity"]["win_rate"] <= 1.0 and doc["aggregate"]["c0"]["dino"]["win_rate"] is None
    for summary in lora_column.values():
        assert summary["ci95"][0] <= summary["mean"] <= summary["ci95"][1]
    files = {(im["column"], im["prompt_index"], im["seed"]): out / im["file"] for im in doc["images"]}
    base_img = np.asarray(Image.open(files[("c0", 0, 1)])).astype(int)
    assert np.abs(base_img - np.asarray(Image.open(files[("c1", 0, 1)]))).mean() > 1.0  # the LoRA is applied
    assert np.abs(base_img - np.asarray(Image.open(files[("c0", 0, 2)]))).mean() > 1.0  # seeds differ
    assert Image.open(first.grid_path).size[0] > 220 + 2 * 32
    page = Page()
    page.feed(first.html_path.read_text())
    assert {"metrics", "images", "settings"} <= page.tables
    assert len(page.imgs) == 1 + 8 and all(src.startswith("data:image/png;base64,") for src in page.imgs)
    assert page.best >= 5 and "tok.zip" in " ".join(page.text)
    history = world["registry"].resolve(v1.ref).info["evals"]
    assert history[-1]["report"] == str(first.metrics_path.resolve()) and "dino" in history[-1]["lora_scales"]["1"]

    # Adding a version to the same report folder samples only the new one.
    mtimes = {p: p.stat().st_mtime_ns for p in files.values()}
    counters.loads, counters.t5_rows = 0, []
    second = run(world, ["base", v1.ref, v2.ref], out)
    assert second.counters["images_sampled"] == 4 and second.counters["images_cached"] == 8
    assert counters.loads == 1 and counters.t5_rows == [2]  # "a photo of SKS", "a photo of a cat"
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert {im["prompt"] for im in second.doc["images"] if im["column"] == "c2"} == {
        "a photo of SKS",
        "a photo of a cat",
    }

    # Nothing new: nothing is loaded at all.
    counters.loads = 0
    third = run(world, ["base", v1.ref, v2.ref], out)
    assert third.counters["images_sampled"] == 0 and counters.loads == 0


def test_int8_base_samples_nearly_the_same_images_and_caches_them_apart(world, tmp_path):
    v1, _ = world["versions"]
    out = tmp_path / "report"
    plain = run(world, ["base", v1.ref], out, quantize="none")
    int8 = run(world, ["base", v1.ref], out, quantize="int8")
    assert plain.doc["settings"]["quantize"] == "none" and int8.doc["settings"]["quantize"] == "int8"
    assert int8.counters["images_sampled"] == 8 and int8.counters["images_cached"] == 0  # not the bf16/fp32 images

    def pixels(result, column):
        return [
            np.asarray(Image.open(out / im["file"])).astype(int)
            for im in result.doc["images"]
            if im["column"] == column
        ]

    for column in ("c0", "c1"):
        differences = [np.abs(a - b).mean() for a, b in zip(pixels(plain, column), pixels(int8, column), strict=True)]
        assert 0 < max(differences) < 1.0, differences  # int8 moves pixels by ~0.1 of 255 here, not the picture
    lora_effect = np.abs(pixels(int8, "c0")[0] - pixels(int8, "c1")[0]).mean()
    assert lora_effect > 10 * max(differences)  # the LoRA still applies on the int8 base, far beyond int8's own change


def test_lora_scale_sweep_gives_one_column_per_scale(world, tmp_path):
    v1 = world["versions"][0]
    result = run(world, [v1.ref, "base"], tmp_path / "sweep", prompts=PROMPTS[:1], seeds=(3,), lora_scales=(0.0, 1.0))
    assert [c["label"] for c in result.doc["columns"]] == [f"{v1.ref} scale 0", f"{v1.ref} scale 1", "base"]
    by_column = {
        im["column"]: np.asarray(Image.open(result.out_dir / im["file"])).astype(int) for im in result.doc["images"]
    }
    assert np.abs(by_column["c0"] - by_column["c2"]).max() <= 1  # scale 0 is the base model
    assert np.abs(by_column["c1"] - by_column["c2"]).mean() > 1.0
    assert "diversity" not in result.doc["metrics"] and any("two seeds" in n for n in result.doc["notes"])


def test_bad_inputs_fail_before_sampling(world, monkeypatch, tmp_path):
    counters = Counters(monkeypatch)
    v1 = world["versions"][0]
    with pytest.raises(FinetuneError, match="(?i)did you mean me/tok"):
        run(world, ["base", "me/tk"], tmp_path / "a")
    with pytest.raises(FinetuneError, match="Did you mean base"):
        run(world, ["bse"], tmp_path / "a")
    other = make_lora(tmp_path / "other.safetensors", seed=5, base_model="someone/other-flux", trigger="TOK")
    with pytest.raises(FinetuneError, match="do not share a base model.*other-flux.*--allow-mixed-base"):
        run(world, [v1.ref, str(other)], tmp_path / "a")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FinetuneError, match="not writable"):
        run(world, ["base"], blocker / "out")
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FinetuneError, match="REPLICATE_API_TOKEN"):
        run(world, ["base", "replicate:me/tok:" + "a" * 64], tmp_path / "a")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(FinetuneError, match="holds no prompt"):
        read_prompt_file(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("a photo\nun caf\xe9 de [trigger]\n".encode("latin-1"))
    with pytest.raises(FinetuneError, match="not UTF-8.*line 2"):
        read_prompt_file(tmp_path / "latin1.txt")
    with pytest.raises(FinetuneError, match="multiples of 16"):
        parse_size("770x1024")
    assert parse_size("768x1024") == (768, 1024) and parse_size(512) == (512, 512)
    assert counters.loads == 0 and not list((tmp_path / "a").glob("images/*.png"))


def test_mixed_base_is_warned_and_an_unloadable_scorer_is_skipped(world, tmp_path):
    v1 = world["versions"][0]
    other = make_lora(tmp_path / "other.safetensors", seed=5, base_model="someone/other-flux", trigger="TOK")
    options = dict(allow_mixed_base=True, clip_model=tmp_path / "missing-clip", prompts=PROMPTS[:1], seeds=(1,))
    result = run(world, [v1.ref, str(other)], tmp_path / "m", **options)
    assert any("other-flux" in w for w in result.doc["warnings"])
    assert any("other.safetensors" in n and "no dataset" in n for n in result.doc["notes"])
    # CLIP is skipped with a note; DINO and everything else is still produced
    assert "clip_t" not in result.doc["metrics"] and "dino" in result.doc["metrics"]
    assert any("missing-clip" in n for n in result.doc["notes"])
    page = result.html_path.read_text()
    assert "Mixed base models" in page and "missing-clip" in page and result.grid_path.is_file()


def test_cli_eval_and_its_exit_codes(world, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FINETUNE_HOME", str(world["registry"].root))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# subject\na photo of {trigger}\n", encoding="utf-8")
    args = ["eval", world["versions"][0].ref, "base", "--prompts", str(prompts), "--seeds", "4,5", "--steps", "1",
            "--size", "48x32", "--lora-scale", "1.0", "--out", str(tmp_path / "cli"),
            "--clip-model", str(world["clip"]), "--dino-model", str(world["dino"])]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    doc = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert (doc["settings"]["width"], doc["settings"]["height"], doc["settings"]["seeds"]) == (48, 32, [4, 5])
    assert doc["images"][0]["prompt"] == "a photo of TOK"
    assert Image.open(tmp_path / "cli" / doc["images"][0]["file"]).size == (48, 32)

    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "base", "--prompts", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "not UTF-8" in capsys.readouterr().err


def test_remote_versions_are_sampled_with_predictions_and_cached(replicate_stub, world, tmp_path):
    from replicate_stub import predict_input_schema

    replicate_stub.add_model("alice/tok")
    vid = "b" * 64
    schema = {"components": {"schemas": {"Input": predict_input_schema()}}}
    replicate_stub.versions["alice/tok"].insert(0, {"id": vid, "created_at": "2025-01-01T00:00:00Z",
                                                    "cog_version": "0.14.0", "openapi_schema": schema})  # fmt: skip
    ref = f"replicate:alice/tok:{vid}"
    options = dict(seeds=(1, 2), steps=2, size=256, out=tmp_path / "remote", lora_scales=(0.8,))
    result = run(world, [ref], **options)
    assert replicate_stub.count("POST", r"^/v1/predictions$") == 4 and result.counters["remote_predictions"] == 4
    sent = [p["input"] for p in replicate_stub.predictions.values()]
    assert {(i["seed"], i["lora_scale"], i["output_format"], i["width"]) for i in sent} == {
        (1, 0.8, "png", 256), (2, 0.8, "png", 256)
    }  # fmt: skip
    assert all(Image.open(result.out_dir / im["file"]).format == "PNG" for im in result.doc["images"])
    assert replicate_stub.token not in result.metrics_path.read_text() + result.html_path.read_text()
    again = run(world, [ref], **options)
    assert again.counters["images_sampled"] == 0 and replicate_stub.count("POST", r"^/v1/predictions$") == 4


@pytest.mark.parametrize("preset", ["flux2-tiny", "flux2-dev-tiny"])
def test_flux2_versions_are_sampled_with_their_family_pipeline(preset, tmp_path, tiny_scorer_dirs):
    """A FLUX.2 LoRA against its base: the family's pipeline (klein: true CFG against the cached empty prompt), the
    LoRA applied, every image seeded."""
    from finetune.models import flux2

    base = flux2.save_preset(preset, tmp_path / preset)
    transformer = flux2.build_preset(preset).transformer
    lora.add_lora(transformer, rank=4, alpha=8, targets="all-linear", seed=0)
    g = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in lora.lora_state_dict(transformer).items()}
    file = lora.save_lora(tmp_path / "l.safetensors", state, rank=4, alpha=8, base_model=str(base), trigger_word="TOK",
                          targets="all-linear", alpha_keys=False)  # fmt: skip
    registry = Registry(tmp_path / "home")
    version = registry.add_version("me/k2", file, {"base_model": str(base), "trigger_word": "TOK", "backend": "local"})
    clip_dir, dino_dir = tiny_scorer_dirs
    result = evaluate(["base", version.ref], prompts=PROMPTS, out=tmp_path / "report", registry=registry,
                      clip_model=clip_dir, dino_model=dino_dir, **FAST)  # fmt: skip
    doc = result.doc
    assert doc["settings"]["guidance"] == 4.0 and doc["settings"]["max_sequence_length"] == 512
    files = {(im["column"], im["prompt_index"], im["seed"]): tmp_path / "report" / im["file"] for im in doc["images"]}
    base_img = np.asarray(Image.open(files[("c0", 0, 1)])).astype(int)
    assert np.asarray(Image.open(files[("c0", 0, 1)])).shape == (32, 32, 3)
    assert np.abs(base_img - np.asarray(Image.open(files[("c1", 0, 1)]))).mean() > 1.0  # the LoRA is applied
    assert np.abs(base_img - np.asarray(Image.open(files[("c0", 0, 2)]))).mean() > 0.5  # seeds differ


# ---- edits: --inputs on FLUX.1 Kontext ------------------------------------------------------------------------------

EDIT_METRICS = {"dino_target", "clip_i_target", "dino_input", "clip_direction"}
EDIT = dict(seeds=(1, 2), steps=1, size=32, progress=False)  # kontext-tiny at 32 px: 4 output + 4 input tokens


@pytest.fixture(scope="module")
def edit_world(tmp_path_factory, tiny_scorer_dirs):
    """A saved preset:kontext-tiny, a random rank-4 LoRA for it in a registry (trigger TOK), and a pair zip of two
    edits made by `finetune prepare` (instructions with TOK added once)."""
    from prepare_fixtures import write_pair_layouts

    from finetune.models import kontext
    from finetune.recipes.prepare import prepare

    root = tmp_path_factory.mktemp("edit")
    base = kontext.save_preset("kontext-tiny", root / "kontext-tiny")
    transformer = kontext.build_preset("kontext-tiny").transformer
    lora.add_lora(transformer, rank=4, alpha=4, targets="all-linear", seed=0)
    g = torch.Generator().manual_seed(7)
    state = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in lora.lora_state_dict(transformer).items()}
    file = lora.save_lora(root / "edit.safetensors", state, rank=4, alpha=4, base_model=str(base), trigger_word="TOK",
                          targets="all-linear")  # fmt: skip
    registry = Registry(root / "home")
    version = registry.add_version(
        "me/edit", file, {"base_model": str(base), "trigger_word": "TOK", "backend": "local"}
    )
    layout = write_pair_layouts(root / "src", count=2)
    pairs = prepare([layout["start-end"]], root / "pairs.zip", "TOK", workers=1, progress=False).zip_path
    clip_dir, dino_dir = tiny_scorer_dirs
    return {"base": base, "version": version, "registry": registry, "pairs": pairs, "lora": file,
            "clip": clip_dir, "dino": dino_dir}  # fmt: skip


def run_edit(edit_world, refs, out, **kwargs):
    options = dict(inputs=edit_world["pairs"], out=out, clip_model=edit_world["clip"], dino_model=edit_world["dino"])
    return evaluate(refs, registry=edit_world["registry"], **(options | EDIT | kwargs))


def test_edit_eval_on_a_pair_zip_samples_the_inputs_and_scores_the_edits(edit_world, monkeypatch, tmp_path):
    from diffusers import FluxKontextPipeline

    from finetune.data.edit_inputs import read_edit_inputs
    from finetune.models import kontext

    # What the pipeline got as its input image, call by call (tiny Kontext's pixels barely depend on it, so the
    # output alone cannot show that the input went in).
    given, call = [], FluxKontextPipeline.__call__

    def spy(pipe, *args, **kwargs):
        given.append(kwargs.get("image"))
        return call(pipe, *args, **kwargs)

    monkeypatch.setattr(FluxKontextPipeline, "__call__", spy)
    version = edit_world["version"]
    out = tmp_path / "report"
    result = run_edit(edit_world, ["base", version.ref], out)
    doc = json.loads(result.metrics_path.read_text())
    assert doc["edit"]["layout"] == "pair-zip" and doc["edit"]["targets"] == 2 and doc["settings"]["guidance"] == 2.5
    assert len(doc["prompts"]) == 2 and all("TOK" in row["template"] for row in doc["prompts"])
    for row in doc["prompts"]:  # input and target saved as the model saw them, at the output's size
        assert Image.open(out / row["inputs"][0]).size == Image.open(out / row["target"]).size == (32, 32)
        assert row["target_source"].endswith("_end.png") and row["input_sources"][0].endswith("_start.png")
    assert set(doc["metrics"]) == EDIT_METRICS and "clip_t" not in doc["metrics"]
    assert len(doc["images"]) == 2 * 2 * 2
    for entry in doc["images"]:
        assert set(entry["scores"]) == EDIT_METRICS
        assert all(np.isfinite(v) and -1.0 <= v <= 1.0 + 1e-9 for v in entry["scores"].values())
    for column in ("c0", "c1"):
        for summary in doc["aggregate"][column].values():
            assert summary["n"] == 4 and summary["ci95"][0] <= summary["mean"] <= summary["ci95"][1]
    assert all(0.0 <= s["win_rate"] <= 1.0 and s["pairs"] == 4 for s in doc["aggregate"]["c1"].values())

    # Each edit's input reached the pipeline as the report shows it (a call per column and edit, both seeds at once).
    fitted = {Image.open(out / row["inputs"][0]).tobytes() for row in doc["prompts"]}
    assert len(given) == 4 and {image.tobytes() for image in given} == fitted and len(fitted) == 2

    # The LoRA version's output is family.sample_images on the same input image, instruction and seed.
    item = next(
        i for i in read_edit_inputs(edit_world["pairs"]).items if i.instruction == doc["prompts"][0]["template"]
    )
    pipe = kontext.pipeline_from_components(kontext.build_preset("kontext-tiny"))
    pipe.load_lora_weights(str(edit_world["lora"]), adapter_name="v")
    direct = kontext.sample_images(pipe, [item.instruction], [1], steps=1, size=(32, 32), guidance=2.5,
                                   inputs=[[item.inputs[0].open()]])[0]  # fmt: skip
    entry = next(e for e in doc["images"] if (e["column"], e["prompt_index"], e["seed"]) == ("c1", 0, 1))
    sampled = np.asarray(Image.open(out / entry["file"])).astype(int)
    assert np.abs(sampled - np.asarray(direct)).max() <= 1  # fused in float32 by eval: equal to rounding

    page = Page()
    page.feed(result.html_path.read_text())
    # grid + per row (2 edits x 2 seeds): input, base, LoRA, target
    assert {"metrics", "images"} <= page.tables and len(page.imgs) == 1 + 4 * 4
    text = " ".join(page.text)
    assert "CLIP direction" in text and "DINO input→output" in text and "pairs.zip" in text
    assert Image.open(result.grid_path).size[0] > 220 + 4 * 32  # input | base | LoRA | target
    history = edit_world["registry"].resolve(version.ref).info["evals"][-1]
    assert history["inputs"] == str(edit_world["pairs"]) and "clip_direction" in history["lora_scales"]["1"]

    again = run_edit(edit_world, ["base", version.ref], out)
    assert again.counters["images_sampled"] == 0 and again.counters["images_cached"] == 8


def test_edit_eval_cli_on_a_folder_with_prompts_applied_to_every_input(edit_world, monkeypatch, tmp_path, capsys):
    """A start-end folder where one edit has no target, with --prompt: every prompt on every input, targets unused."""
    from prepare_fixtures import smooth

    folder = tmp_path / "pairs"
    folder.mkdir()
    smooth(1, (64, 32)).save(folder / "wide_start.png")
    smooth(2, (64, 32)).save(folder / "wide_end.png")
    smooth(3, (32, 32)).save(folder / "square_start.png")  # neither has an instruction file: --prompt gives them
    monkeypatch.setenv("FINETUNE_HOME", str(edit_world["registry"].root))
    out = tmp_path / "cli"
    args = ["eval", edit_world["version"].ref, "--inputs", str(folder), "--prompt", "make it [trigger] red",
            "--prompt", "add a hat", "--seeds", "3", "--steps", "1", "--size", "32", "--out", str(out),
            "--clip-model", str(edit_world["clip"]), "--dino-model", str(edit_world["dino"])]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["edit"]["layout"] == "pair-folder" and doc["edit"]["targets"] == 0
    assert [(row["name"], row["template"]) for row in doc["prompts"]] == [
        ("square", "make it [trigger] red"), ("square", "add a hat"), ("wide", "make it [trigger] red"),
        ("wide", "add a hat"),
    ]  # fmt: skip
    assert doc["images"][0]["prompt"] == "make it TOK red"
    # the output takes its input's aspect ratio at 32x32's area
    sizes = {row["name"]: Image.open(out / doc["images"][n]["file"]).size for n, row in enumerate(doc["prompts"])}
    assert sizes == {"square": (32, 32), "wide": (48, 16)}
    assert set(doc["metrics"]) == {"dino_input", "clip_direction"}
    assert any("targets in --inputs were not used" in w for w in doc["warnings"])


def test_edit_inputs_fail_before_any_model_loads(edit_world, world, monkeypatch, tmp_path, capsys):
    counters = Counters(monkeypatch)
    monkeypatch.setenv("FINETUNE_HOME", str(edit_world["registry"].root))

    def cli(*args):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", *args, "--out", str(tmp_path / "out"), "--steps", "1", "--size", "32"])
        return exit_info.value.code, capsys.readouterr().err

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "cat.png")
    code, err = cli(edit_world["version"].ref, "--inputs", str(folder))
    assert code == 2 and f"{folder / 'cat.png'}: instruction cat.txt is missing" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = cli(edit_world["version"].ref, "--inputs", str(empty))
    assert code == 2 and f"--inputs {empty} holds no image" in err
    # A FLUX.1 [dev] base takes no input image: the tiny FLUX.1 preset's LoRA
    (folder / "cat.txt").write_text("make it blue", encoding="utf-8")
    monkeypatch.setenv("FINETUNE_HOME", str(world["registry"].root))
    code, err = cli(world["versions"][0].ref, "--inputs", str(folder))
    assert code == 2 and "takes no input image" in err and str(folder) in err
    code, err = cli("base", "replicate:me/tok:" + "a" * 64, "--inputs", str(folder))
    assert code == 2 and "Replicate version" in err
    # Kontext takes one input per edit
    Image.new("RGB", (32, 32)).save(folder / "dog_start.png")
    Image.new("RGB", (32, 32)).save(folder / "dog_start_2.png")
    (folder / "dog.txt").write_text("make it red", encoding="utf-8")
    (folder / "cat.png").rename(folder / "cat_start.png")
    monkeypatch.setenv("FINETUNE_HOME", str(edit_world["registry"].root))
    code, err = cli(edit_world["version"].ref, "--inputs", str(folder))
    assert code == 2 and "dog_start_2.png" in err and "at most 1" in err
    assert counters.loads == 0 and not list((tmp_path / "out").glob("images/*.png"))


def test_edit_cache_key_includes_the_input_and_text_to_image_keys_are_unchanged():
    from finetune.recipes.evaluate import _cache_key

    settings = {"steps": 1, "width": 32, "height": 32, "guidance": 2.5, "base_model": "b", "max_sequence_length": 512,
                "dtype": "float32", "quantize": "none"}  # fmt: skip
    plain = _cache_key("base", None, "p", 1, settings)
    assert _cache_key("base", None, "p", 1, settings, None) == plain == _cache_key("base", None, "p", 1, settings, [])
    one, two = (
        _cache_key("base", None, "p", 1, settings, ["a" * 64]),
        _cache_key("base", None, "p", 1, settings, ["b" * 64]),
    )
    assert len({plain, one, two}) == 3


@pytest.mark.slow
def test_edit_eval_on_flux2_takes_several_references(tmp_path, tiny_scorer_dirs):
    """FLUX.2 [klein] edits with two references per input (true CFG at the default guidance 4): both references are
    shown in the page, the output takes the first one's aspect ratio, the edit metrics are finite."""
    from prepare_fixtures import smooth

    from finetune.models import flux2

    base = flux2.save_preset("flux2-tiny", tmp_path / "flux2-tiny")
    folder = tmp_path / "inputs"
    folder.mkdir()
    smooth(1, (256, 128)).save(folder / "a_start.png")
    smooth(2, (128, 128)).save(folder / "a_start_2.png")
    smooth(3, (256, 128)).save(folder / "a_end.png")
    (folder / "a.txt").write_text("put the second picture into the first", encoding="utf-8")
    clip_dir, dino_dir = tiny_scorer_dirs
    # 128 px: FLUX.2's pipeline wants both sides of every reference ≥ 64 px
    result = evaluate(["base"], base_model=str(base), inputs=folder, seeds=(1,), steps=1, size=128, progress=False,
                      out=tmp_path / "report", registry=Registry(tmp_path / "home"), clip_model=clip_dir,
                      dino_model=dino_dir)  # fmt: skip
    doc = result.doc
    (row,) = doc["prompts"]
    assert (
        len(row["inputs"]) == 2 and (row["width"], row["height"]) == Image.open(result.out_dir / row["inputs"][0]).size
    )
    assert row["width"] > row["height"] and Image.open(result.out_dir / doc["images"][0]["file"]).size == (
        row["width"], row["height"])  # fmt: skip
    assert set(doc["images"][0]["scores"]) == EDIT_METRICS
    assert all(np.isfinite(v) for v in doc["images"][0]["scores"].values())
    page = Page()
    page.feed(result.html_path.read_text())
    assert len(page.imgs) == 1 + 2 + 1 + 1  # grid, two inputs, the output, the target
