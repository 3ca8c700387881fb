"""The remote backend end to end against the Replicate stand-in: CLI, failures, re-attach, no duplicate jobs."""

from __future__ import annotations

import _thread
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import synthetic_image, write_dataset_zip
from replicate_stub import KONTEXT_TRAINER, KONTEXT_TRAINER_VERSION, LORA_MEMBER, TRAINER, TRAINER_VERSIONS

from finetune.cli import main
from finetune.config import load_config
from finetune.errors import FinetuneError
from finetune.files import sha256_file
from finetune.recipes.train_remote import attach, map_inputs, train_remote
from finetune.registry import Registry


def write_config(tmp_path: Path, **extra) -> Path:
    zip_path = write_dataset_zip(tmp_path / "data.zip", [(32, 32), (48, 32), (32, 48)])
    data = {"output": "me/tok", "dataset": str(zip_path), "trigger_word": "TOK", "backend": "replicate"}
    for dotted, value in extra.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "remote.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_happy_path_through_the_cli_registers_the_downloaded_lora(replicate_stub, tmp_path, capsys):
    cfg_path = write_config(tmp_path, train__steps=300, lora__rank=8, remote__wandb_project="")
    assert run_cli(["train", str(cfg_path)]) == 0
    out, err = capsys.readouterr()

    assert len(replicate_stub.trainings) == 1
    training = next(iter(replicate_stub.trainings.values()))
    sent = training["input"]
    assert sent["steps"] == 300 and sent["lora_rank"] == 8 and sent["autocaption"] is False
    assert sent["resolution"] == "512,768,1024" and sent["input_images"].startswith(replicate_stub.url + "/v1/files/")
    assert training["_destination"] == "alice/tok"  # created under the token's account
    assert replicate_stub.models["alice/tok"]["visibility"] == "private"

    registry = Registry()
    (version,) = registry.versions("me/tok")
    assert version.ref in out
    # The file as downloaded is the version: its id is the sha256 of the trainer's lora.safetensors.
    with tarfile.open(fileobj=io.BytesIO(replicate_stub.blobs[f"/delivery/{training['id']}/trained_model.tar"])) as t:
        original = t.extractfile(LORA_MEMBER).read()
    assert version.lora_path.read_bytes() == original and version.id == sha256_file(version.lora_path)
    rep = version.lineage["replicate"]
    assert rep["training_id"] == training["id"] and rep["trainer"] == TRAINER
    assert rep["trainer_version"] == TRAINER_VERSIONS[1]  # unpinned: resolved to the latest, then recorded
    assert rep["version"].startswith("alice/tok:") and rep["inputs"]["lora_rank"] == 8
    assert version.lineage["backend"] == "replicate" and version.lineage["dataset"]["digest"]
    assert version.lineage["timings"]["download_s"] >= 0
    assert "status: processing" in out and "status: succeeded" in out and "Training complete" in out
    assert "20/20" in err  # the progress bar parsed from the trainer's progress lines

    (run_dir,) = (tmp_path / "runs").iterdir()
    state = json.loads((run_dir / "remote.json").read_text())
    assert state["training_id"] == training["id"] and state["phase"] == "imported"
    assert state["file"]["sha256"] == version.lineage["dataset"]["digest"]

    # The token never appears in output or in any file written (run folder, registry, config).
    token = replicate_stub.token
    assert token not in out and token not in err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path

    # Same command again: the run folder already produced this version; nothing is submitted.
    assert run_cli(["train", str(cfg_path)]) == 0
    assert "already produced" in capsys.readouterr().out
    assert len(replicate_stub.trainings) == 1 and len(registry.versions("me/tok")) == 1


def test_default_config_maps_without_blocking_and_explicit_unmappable_settings_are_listed(tmp_path):
    inputs, _, unmapped = map_inputs(load_config(None))
    assert unmapped == [] and inputs["lora_rank"] == 16 and inputs["autocaption"] is False
    cfg = load_config(None, ["lora.alpha=8", "train.seed=3", "train.lr_scheduler=constant", "train.device=cpu"])
    _, _, unmapped = map_inputs(cfg)
    assert len(unmapped) == 2
    assert unmapped[0].startswith("lora.alpha=8") and unmapped[1].startswith("train.seed=3")


def test_one_wandb_setting_serves_both_backends():
    inputs, origin, unmapped = map_inputs(load_config(None, ["train.wandb_project=tok-runs", "train.quantize=auto"]))
    assert inputs["wandb_project"] == "tok-runs" and origin["wandb_project"] == "train.wandb_project"
    assert unmapped == []  # quantize auto is what the trainer does itself
    inputs, origin, _ = map_inputs(load_config(None, ["train.wandb_project=a", "remote.wandb_project=b"]))
    assert inputs["wandb_project"] == "b" and origin["wandb_project"] == "remote.wandb_project"
    _, _, unmapped = map_inputs(load_config(None, ["train.quantize=none"]))
    assert unmapped == ["train.quantize='none': the trainer fixes it to 'auto'"]


def test_unmapped_settings_stop_before_anything_is_sent(replicate_stub, tmp_path, capsys):
    cfg_path = write_config(tmp_path, lora__alpha=4, train__sigma_sampling="uniform")
    assert run_cli(["train", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "lora.alpha=4" in err and "train.sigma_sampling='uniform'" in err and "--allow-unmapped" in err
    assert replicate_stub.requests == []
    replicate_stub.outcome = "succeeded"
    assert run_cli(["train", str(cfg_path), "--allow-unmapped", "--detach"]) == 0
    assert len(replicate_stub.trainings) == 1


def test_inputs_are_validated_against_the_trainer_schema_before_upload(replicate_stub, tmp_path, capsys):
    cfg_path = write_config(tmp_path, lora__rank=200)
    assert run_cli(["train", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "lora_rank" in err and "128" in err
    assert replicate_stub.count("POST", "/v1/files") == 0 and not replicate_stub.trainings


@pytest.mark.parametrize("outcome", ["failed", "aborted", "canceled"])
def test_a_training_that_does_not_succeed_fails_with_its_error_and_registers_nothing(
    replicate_stub, tmp_path, capsys, outcome
):
    replicate_stub.outcome = outcome
    cfg_path = write_config(tmp_path)
    assert run_cli(["train", str(cfg_path)]) == 1
    err = capsys.readouterr().err
    assert f" {outcome}" in err and "Nothing was registered" in err and "Last log lines" in err
    if outcome == "failed":
        assert "CUDA out of memory" in err and "flux_train_replicate" in err
    assert Registry().models() == []


def test_ctrl_c_detaches_and_attach_imports_exactly_once(replicate_stub, tmp_path, capsys):
    cfg = load_config(write_config(tmp_path))
    polls = []

    def interrupt_on_third_poll(method, path):
        if method == "GET" and path.startswith("/v1/trainings/"):
            polls.append(path)
            if len(polls) == 3:
                _thread.interrupt_main()

    replicate_stub.on_request = interrupt_on_third_poll
    with pytest.raises(KeyboardInterrupt):
        train_remote(cfg)
    replicate_stub.on_request = None
    (tid,) = replicate_stub.trainings
    assert f"finetune trainings attach {tid}" in capsys.readouterr().out
    assert Registry().models() == []

    assert run_cli(["trainings", "attach", tid]) == 0
    v1 = Registry().resolve("me/tok")
    assert v1.lineage["config"]["output"] == "me/tok"  # found its run folder: full lineage
    # A second import (e.g. after a crash between success and registration) is a no-op.
    v2 = attach(tid)
    assert v2.id == v1.id and len(Registry().versions("me/tok")) == 1
    assert len(replicate_stub.trainings) == 1


def test_cancel_on_interrupt_cancels_the_training(replicate_stub, tmp_path):
    cfg = load_config(write_config(tmp_path))
    replicate_stub.on_request = lambda m, p: p.startswith("/v1/trainings/") and m == "GET" and _thread.interrupt_main()
    with pytest.raises(FinetuneError) as e:
        train_remote(cfg, cancel_on_interrupt=True)
    replicate_stub.on_request = None
    assert e.value.exit_code == 130
    (t,) = replicate_stub.trainings.values()
    assert replicate_stub._render(t)["status"] == "canceled" and Registry().models() == []


def test_rerun_reattaches_to_the_in_flight_training(replicate_stub, tmp_path, capsys):
    replicate_stub.boot_s = 0.5
    cfg = load_config(write_config(tmp_path))
    webhook = "http://127.0.0.1:9/hook"
    assert train_remote(cfg, detach=True, webhook=webhook) is None
    (t,) = replicate_stub.trainings.values()
    assert t["webhook"] == webhook and t["webhook_events_filter"] == ["start", "completed"]
    version = train_remote(cfg)  # the same command again: follows the first training
    assert "Re-attaching" in capsys.readouterr().out
    assert len(replicate_stub.trainings) == 1 and version.lineage["replicate"]["training_id"] == t["id"]
    assert replicate_stub.count("POST", "/v1/files") == 1


def test_connection_dropped_after_an_accepted_create_leaves_exactly_one_training(replicate_stub, tmp_path):
    replicate_stub.fault("POST", r".*/trainings", mode="drop_after")
    version = train_remote(load_config(write_config(tmp_path)))
    assert len(replicate_stub.trainings) == 1 and replicate_stub.count("POST", r".*/trainings") == 1
    assert version.lineage["replicate"]["training_id"] == next(iter(replicate_stub.trainings))


def test_create_lost_before_reaching_replicate_stops_then_a_rerun_submits_once(replicate_stub, tmp_path, capsys):
    cfg = load_config(write_config(tmp_path))
    replicate_stub.fault("POST", r".*/trainings", mode="drop")
    with pytest.raises(FinetuneError, match="none was created") as e:
        train_remote(cfg)
    assert e.value.exit_code == 1 and not replicate_stub.trainings
    version = train_remote(cfg)
    assert "No training from the earlier attempt exists on Replicate; submitting now." in capsys.readouterr().out
    assert len(replicate_stub.trainings) == 1 and version is not None
    assert replicate_stub.count("POST", "/v1/files") == 1  # the upload was reused, so reconciling stays exact


def test_413_upload_stops_with_the_prepare_option(replicate_stub, tmp_path, capsys):
    replicate_stub.max_file_bytes = 100
    assert run_cli(["train", str(write_config(tmp_path))]) == 2
    assert "--max-side" in capsys.readouterr().err and not replicate_stub.trainings


def test_trainings_list_show_and_cancel_commands(replicate_stub, tmp_path, capsys):
    replicate_stub.boot_s = 5.0  # stays `starting` for the whole test
    assert run_cli(["train", str(write_config(tmp_path)), "--detach"]) == 0
    (tid,) = replicate_stub.trainings
    assert f"finetune trainings attach {tid}" in capsys.readouterr().out
    assert run_cli(["trainings", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:2] == ["ID", "STATUS"] and listing[1].split()[:3] == [tid, "starting", TRAINER]
    assert run_cli(["trainings", "show", tid]) == 0
    assert json.loads(capsys.readouterr().out.split("\nlogs:")[0])["status"] == "starting"
    assert run_cli(["trainings", "cancel", tid]) == 0
    assert capsys.readouterr().out.strip() == f"{tid}: canceled"
    assert run_cli(["trainings", "show", "nope"]) == 2
    assert "404" in capsys.readouterr().err


def test_a_flux2_base_stops_before_any_request_and_says_where_it_trains(replicate_stub, tmp_path, capsys):
    cfg_path = write_config(tmp_path, base_model="black-forest-labs/FLUX.2-klein-base-4B")
    for extra in ([], ["--allow-unmapped"], [f"remote.trainer={KONTEXT_TRAINER}"]):  # each would train another model
        assert run_cli(["train", str(cfg_path), *extra]) == 2
        err = capsys.readouterr().err
        assert "no FLUX.2 LoRA trainer" in err and "remote.trainer" in err and "remote.inputs" in err
        assert (
            "FLUX.1 [dev] (ostris/flux-dev-lora-trainer)" in err
            and f"FLUX.1 Kontext [dev] edit LoRAs ({KONTEXT_TRAINER})" in err
        )
    assert replicate_stub.requests == []


# ---- edit LoRAs (Kontext), remote.inputs and trainers of one's own (issue 12) ---------------------------------------

KONTEXT_BASE = "black-forest-labs/FLUX.1-Kontext-dev"


def write_pair_zip(path: Path, pairs: int = 3, *, captions: bool = True, references: int = 1) -> Path:
    """A pair zip as `finetune prepare --pairs` writes it: <stem>_start(_N).png, <stem>_end.png, <stem>.txt."""
    entries: dict[str, bytes] = {}
    for i in range(pairs):
        stem = f"pair{i}"
        for r in range(references):
            entries[f"{stem}_start{f'_{r + 1}' if r else ''}.png"] = _png(10 * i + r, 48, 32)
        entries[f"{stem}_end.png"] = _png(10 * i + 9, 48, 32)
        if captions:
            entries[f"{stem}.txt"] = f"make shape {i} red".encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name in sorted(entries):
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), entries[name])
    return path


def _png(index: int, width: int, height: int) -> bytes:
    buf = io.BytesIO()
    synthetic_image(index, width, height).save(buf, format="PNG")
    return buf.getvalue()


def write_kontext_config(tmp_path: Path, zip_path: Path | None = None, **extra) -> Path:
    """A Kontext edit config: no trigger word (the instructions are the captions), nothing else set."""
    zip_path = zip_path or write_pair_zip(tmp_path / "pairs.zip")
    data: dict = {"base_model": KONTEXT_BASE, "output": "me/edit", "dataset": str(zip_path), "backend": "replicate"}
    for dotted, value in extra.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "kontext.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_map_inputs_follows_the_trainer_the_base_model_gets():
    cfg = load_config(None, [f"base_model={KONTEXT_BASE}", "train.steps=300", "remote.instruction=make it red"])
    inputs, origin, unmapped = map_inputs(cfg)  # remote.trainer at its default: the Kontext trainer's inputs
    assert inputs == {
        "training_steps": 300,
        "seed": 0,
        "learning_rate": cfg.train.learning_rate,
        "lora_rank": 16,
        "kontext_prompt_instruction": "make it red",  # no zip looked into (layout None): sent
    }
    assert origin["training_steps"] == "train.steps" and unmapped == []
    inputs, origin, _ = map_inputs(load_config(None, ["remote.inputs.steps=5", "remote.inputs.extra=x"]))
    assert inputs["steps"] == 5 and inputs["extra"] == "x" and origin["steps"] == "remote.inputs.steps"


def test_a_kontext_base_trains_its_pair_zip_on_the_kontext_trainer_and_registers_a_kontext_lora(
    replicate_stub, tmp_path, capsys
):
    zip_path = write_pair_zip(tmp_path / "pairs.zip")
    assert run_cli(["train", str(write_kontext_config(tmp_path, zip_path, train__steps=300))]) == 0
    out = capsys.readouterr().out
    assert f"training on {KONTEXT_TRAINER}" in out  # remote.trainer left at its default: chosen for the base

    (training,) = replicate_stub.trainings.values()
    assert training["model"] == KONTEXT_TRAINER and training["version"] == KONTEXT_TRAINER_VERSION
    sent = training["input"]
    # Exactly the mapped inputs its schema has: every pair has its .txt, so no instruction; the schema has no
    # learning_rate or lora_rank, and they were not set, so they are dropped.
    assert set(sent) == {"input_images", "training_steps", "seed"}
    assert sent["training_steps"] == 300 and sent["seed"] == 0
    assert replicate_stub.uploaded(sent["input_images"]) == zip_path.read_bytes()  # the pair zip, as is

    (version,) = Registry().versions("me/edit")
    assert version.ref in out
    weights = replicate_stub.blobs[f"/delivery/{training['id']}/lora.safetensors"]  # the weights URI is the LoRA
    assert version.lora_path.read_bytes() == weights
    lineage = version.lineage
    assert lineage["base_model"] == KONTEXT_BASE and lineage["trigger_word"] is None
    assert lineage["lora"] == {"rank": 8, "alpha": 8}  # read from the file: the trainer has no rank input
    assert lineage["replicate"]["trainer"] == KONTEXT_TRAINER
    assert lineage["replicate"]["version"].startswith("alice/edit:")
    assert lineage["replicate"]["inputs"]["training_steps"] == 300


def test_kontext_instruction_is_required_for_pairs_without_txt_and_sent_only_for_them(
    replicate_stub, tmp_path, capsys
):
    bare = write_pair_zip(tmp_path / "bare.zip", captions=False)
    cfg_path = write_kontext_config(tmp_path, bare)
    assert run_cli(["train", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "3 of 3 pairs have no <stem>.txt instruction (pair0, pair1, pair2)" in err
    assert "remote.instruction" in err and "kontext_prompt_instruction" in err
    assert replicate_stub.requests == []  # stopped before any request

    assert run_cli(["train", str(cfg_path), "remote.instruction=make it red", "--detach"]) == 0
    (training,) = replicate_stub.trainings.values()
    assert training["input"]["kontext_prompt_instruction"] == "make it red"

    captioned = write_pair_zip(tmp_path / "captioned.zip")
    cfg_path = write_kontext_config(tmp_path, captioned, remote__instruction="make it red")
    assert run_cli(["train", str(cfg_path), "--detach"]) == 0
    assert "remote.instruction is not sent: every pair" in capsys.readouterr().out
    newest = list(replicate_stub.trainings.values())[-1]
    assert "kontext_prompt_instruction" not in newest["input"]


def test_kontext_learning_rate_and_rank_are_sent_only_when_the_trainer_version_has_them(
    replicate_stub, tmp_path, capsys
):
    cfg_path = write_kontext_config(tmp_path, lora__rank=8, train__learning_rate=1e-3)
    assert run_cli(["train", str(cfg_path)]) == 2  # set explicitly, and this version cannot take them
    err = capsys.readouterr().err
    assert f"lora.rank → lora_rank: trainer version {KONTEXT_TRAINER_VERSION[:12]} has no such input" in err
    assert "train.learning_rate → learning_rate" in err
    assert replicate_stub.count("POST", "/v1/files") == 0 and not replicate_stub.trainings

    schema = replicate_stub.training_input(KONTEXT_TRAINER)
    schema["properties"]["learning_rate"] = {"type": "number", "default": 0.001}
    schema["properties"]["lora_rank"] = {"type": "integer", "default": 16, "minimum": 1, "maximum": 128}
    assert run_cli(["train", str(cfg_path), "--detach"]) == 0
    (training,) = replicate_stub.trainings.values()
    assert training["input"]["lora_rank"] == 8 and training["input"]["learning_rate"] == pytest.approx(1e-3)


def test_a_kontext_base_refuses_single_images_and_several_references_before_any_request(
    replicate_stub, tmp_path, capsys
):
    singles = write_dataset_zip(tmp_path / "singles.zip", [(32, 32), (48, 32)])
    assert run_cli(["train", str(write_kontext_config(tmp_path, singles))]) == 2
    err = capsys.readouterr().err
    assert "holds single images" in err and "finetune prepare PAIRS --pairs start-end" in err

    two_refs = write_pair_zip(tmp_path / "two.zip", references=2)
    assert run_cli(["train", str(write_kontext_config(tmp_path, two_refs))]) == 2
    assert "takes one reference per pair" in capsys.readouterr().err

    # And the other way round: a pair zip on FLUX.1 [dev] would train the pairs' images as single images.
    assert run_cli(["train", str(write_config(tmp_path)), f"dataset={two_refs}"]) == 2
    assert "is a pair zip" in capsys.readouterr().err
    assert replicate_stub.requests == []


def test_a_failed_kontext_training_shows_its_error_and_logs_and_registers_nothing(replicate_stub, tmp_path, capsys):
    replicate_stub.outcomes[KONTEXT_TRAINER] = "failed"  # the third-party report: it fails on every request
    cfg_path = write_kontext_config(tmp_path)
    assert run_cli(["train", str(cfg_path)]) == 1
    captured = capsys.readouterr()
    assert "a third party reported" in captured.out
    err = captured.err
    assert "failed: Prediction failed: 500 Internal Server Error" in err
    assert "Last log lines:" in err and "RuntimeError: upstream returned 500 Internal Server Error" in err
    assert "Nothing was registered" in err and Registry().models() == []

    # A 500 on the create request itself: never retried, nothing created, nothing registered.
    replicate_stub.fault("POST", r".*/trainings", status=500, body={"detail": "Internal Server Error", "status": 500})
    assert run_cli(["train", str(write_kontext_config(tmp_path, train__steps=200))]) == 1
    assert "none was created" in capsys.readouterr().err
    assert len(replicate_stub.trainings) == 1 and Registry().models() == []


def test_remote_inputs_pass_through_replace_mapped_inputs_and_keep_secrets_out(
    replicate_stub, tmp_path, capsys, monkeypatch
):
    secret = "hf_remoteINPUTSsecret0123456789"
    monkeypatch.setenv("MY_HF_TOKEN", secret)  # a secret input names its environment variable, never its value
    cfg_path = write_config(
        tmp_path,
        train__steps=300,
        remote__inputs={"steps": 500, "cache_latents_to_disk": True, "hf_token": "env:MY_HF_TOKEN"},
    )
    assert run_cli(["train", str(cfg_path), "remote.inputs.layers_to_optimize_regex=transformer.single"]) == 0
    out, err = capsys.readouterr()
    (training,) = replicate_stub.trainings.values()
    sent = training["input"]
    assert sent["steps"] == 500 and sent["cache_latents_to_disk"] is True and sent["hf_token"] == secret
    assert sent["layers_to_optimize_regex"] == "transformer.single"  # a --set style override, parsed as YAML
    assert "remote.inputs.steps=500 replaces train.steps (steps=300)" in out
    assert "hf_token=***" in out
    assert secret not in out and secret not in err
    for path in tmp_path.rglob("*"):  # run state, config record, registry lineage and card (the user's YAML aside)
        if path.is_file() and path != cfg_path:
            assert secret.encode() not in path.read_bytes(), path
    (version,) = Registry().versions("me/tok")
    assert version.lineage["replicate"]["inputs"]["steps"] == 500
    assert "hf_token" not in version.lineage["config"]["remote"]["inputs"]


def test_a_secret_input_must_come_from_the_environment(replicate_stub, tmp_path, capsys, monkeypatch):
    literal = write_config(tmp_path, remote__inputs={"hf_token": "hf_literalSECRET"})
    assert run_cli(["config", "show", str(literal)]) == 2
    err = capsys.readouterr().err
    assert "remote.inputs.hf_token: a secret never goes into a config" in err and "hf_token: env:HF_TOKEN" in err
    assert "hf_literalSECRET" not in err
    monkeypatch.delenv("UNSET_TOKEN_VAR", raising=False)
    unset = write_config(tmp_path, remote__inputs={"hf_token": "env:UNSET_TOKEN_VAR"})
    assert run_cli(["train", str(unset)]) == 2
    assert "environment variable UNSET_TOKEN_VAR, which is not set" in capsys.readouterr().err
    assert replicate_stub.trainings == {} and replicate_stub.count("POST", r"/v1/files") == 0


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"stpes": 5}, "remote.inputs.stpes → stpes: the trainer ostris/flux-dev-lora-trainer:"),
        ({"stpes": 5}, "has no such input (did you mean 'steps'?)"),
        ({"batch_size": "many"}, "remote.inputs.batch_size → batch_size: 'many' is not of type 'integer'"),
        ({"input_images": "https://example.com/x.zip"}, "set dataset: (a zip"),
    ],
)
def test_remote_inputs_are_checked_against_the_trainer_schema_before_upload(
    replicate_stub, tmp_path, capsys, inputs, message
):
    assert run_cli(["train", str(write_config(tmp_path, remote__inputs=inputs)), "--allow-unmapped"]) == 2
    assert message in capsys.readouterr().err
    assert replicate_stub.count("POST", "/v1/files") == 0 and not replicate_stub.trainings


def own_trainer(stub) -> str:
    """A FLUX.2 trainer of the user's own (a Cog trainer): its zip input is called `dataset`."""
    schema = {
        "type": "object",
        "title": "TrainingInput",
        "required": ["dataset"],
        "properties": {
            "dataset": {"type": "string", "format": "uri", "description": "Training images (zip)."},
            "max_train_steps": {"type": "integer", "default": 1000, "minimum": 1},
            "rank": {"type": "integer", "default": 16},
            "push_key": {"type": "string", "format": "password", "x-cog-secret": True},  # a Cog Secret
        },
    }
    stub.add_trainer("alice/flux2-klein-trainer", schema, weights="safetensors")
    return "alice/flux2-klein-trainer"


def test_a_flux2_base_trains_on_a_trainer_of_ones_own_with_remote_inputs(replicate_stub, tmp_path, capsys):
    trainer = own_trainer(replicate_stub)
    base = "black-forest-labs/FLUX.2-klein-base-4B"
    secret = "pk-ownTRAINERsecret-987"
    cfg_path = write_config(
        tmp_path,
        base_model=base,
        remote__trainer=trainer,
        remote__inputs={"max_train_steps": 50, "rank": 4, "push_key": secret},
    )
    # Config settings reach only ostris' and the Kontext trainer; for this one they go through remote.inputs.
    assert run_cli(["train", str(cfg_path), "train.steps=50"]) == 2
    err = capsys.readouterr().err
    assert "train.steps=50: alice/flux2-klein-trainer gets only the dataset and remote.inputs" in err
    assert replicate_stub.requests == []

    assert run_cli(["train", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    (training,) = replicate_stub.trainings.values()
    assert training["model"] == trainer
    assert training["input"] == {
        "dataset": training["input"]["dataset"],
        "max_train_steps": 50,
        "rank": 4,
        "push_key": secret,
    }
    assert replicate_stub.uploaded(training["input"]["dataset"]) == (tmp_path / "data.zip").read_bytes()
    assert "Passing remote.inputs to alice/flux2-klein-trainer" in out and "push_key=***" in out
    assert secret not in out
    for path in tmp_path.rglob("*"):  # the schema marks it secret: kept out of the run folder and the registry
        if path.is_file() and path != cfg_path:
            assert secret.encode() not in path.read_bytes(), path
    (version,) = Registry().versions("me/tok")
    assert version.lineage["base_model"] == base and version.lineage["replicate"]["trainer"] == trainer


def test_the_local_training_features_are_reported_when_set_and_not_when_off():
    on = [
        "train.preservation.class_word=person",
        "train.regularization.dataset=reg.zip",
        "train.ema.decay=0.99",
        "train.validation.split=0.2",
        "train.flip=true",
    ]
    _, _, unmapped = map_inputs(load_config(None, on))
    assert len(unmapped) == len(on)
    for key, line in zip(sorted(on), unmapped, strict=True):
        assert line.startswith(key.split("=")[0]) and "trains locally (backend: local)" in line
    assert "differential output preservation" in " ".join(unmapped)
    _, _, unmapped = map_inputs(load_config(None, ["train.ema.decay=0", "train.flip=false"]))
    assert unmapped == []
