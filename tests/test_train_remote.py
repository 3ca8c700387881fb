"""The remote backend end to end against the Replicate stand-in: CLI, failures, re-attach, no duplicate jobs."""

from __future__ import annotations

import _thread
import io
import json
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import write_dataset_zip
from replicate_stub import LORA_MEMBER, TRAINER, TRAINER_VERSIONS

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
    for extra in ([], ["--allow-unmapped"]):  # not a setting to drop: it would train another model
        assert run_cli(["train", str(cfg_path), *extra]) == 2
        err = capsys.readouterr().err
        assert "no FLUX.2 LoRA trainer" in err and "FLUX.1 [dev] only" in err and "remote.trainer" in err
    assert replicate_stub.requests == []
