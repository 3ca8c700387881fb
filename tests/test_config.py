import datetime
from pathlib import Path

import pytest

from finetune.config import Config, ConfigError, dump_config, load_config, parse_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = load_config()
    assert cfg == Config()
    assert cfg.lora.rank == 16 and cfg.train.resolution == [512, 768, 1024]
    assert load_config(write(tmp_path, dump_config(cfg))) == cfg


def test_values_are_coerced_by_declared_type(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  learning_rate: 1e-4\n  steps: '200'\n  resolution: 512\n"))
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.train.steps == 200
    assert cfg.train.resolution == [512]


def test_dotted_overrides_and_explicit_keys(tmp_path):
    cfg = load_config(write(tmp_path, "lora:\n  rank: 8\n"), ["lora.rank=32", "train.resolution=[256,512]"])
    assert cfg.lora.rank == 32
    assert cfg.train.resolution == [256, 512]
    assert cfg.explicit == {"lora.rank", "train.resolution"}


def test_unknown_keys_suggest_the_closest(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "lora:\n  rnak: 3\nrank: 4\n"))
    assert "unknown key 'lora.rnak' (did you mean 'lora.rank'?)" in str(e.value)
    assert "unknown key 'rank' (did you mean 'lora.rank'?)" in str(e.value)


def test_all_errors_are_collected_with_key_value_and_range():
    with pytest.raises(ConfigError) as e:
        parse_config({"lora": {"rank": 0}, "train": {"resolution": [500], "optimizer": "adamw9", "steps": "many"}})
    errors = e.value.errors
    assert len(errors) == 4
    assert "lora.rank: 0 is out of range; allowed [1, 256]" in errors
    assert any("train.resolution: 500" in msg and "496" in msg for msg in errors)
    assert any("train.optimizer" in msg and "did you mean 'adamw'" in msg for msg in errors)
    assert any("train.steps: 'many' must be an integer" in msg for msg in errors)


def test_bad_yaml_and_missing_file_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "lora: [\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- 1\n"))


def test_sigma_sampling_modes():
    assert parse_config({"train": {"sigma_sampling": "shift=3.0"}}).train.sigma_sampling == "shift=3.0"
    with pytest.raises(ConfigError, match="train.sigma_sampling"):
        parse_config({"train": {"sigma_sampling": "cosine"}})


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_configs_folder_is_not_empty():
    assert CONFIGS, "configs/ ships at least one config"


def test_remote_inputs_is_a_mapping_set_in_yaml_or_by_dotted_overrides(tmp_path):
    path = write(tmp_path, "remote:\n  inputs:\n    max_train_steps: 50\n    note: hi\n")
    cfg = load_config(path, ["remote.inputs.rank=4", "remote.inputs.flag=true", "remote.inputs.sizes=[512, 768]"])
    assert cfg.remote.inputs == {"max_train_steps": 50, "note": "hi", "rank": 4, "flag": True, "sizes": [512, 768]}
    assert {"remote.inputs.rank", "remote.inputs.max_train_steps"} <= cfg.explicit
    assert load_config(write(tmp_path, dump_config(cfg))) == cfg  # round trip
    assert load_config(write(tmp_path, "remote:\n  inputs:\n")).remote.inputs == {}  # empty: nothing to pass
    assert Config().remote.inputs == {} and Config().remote.inputs is not Config().remote.inputs


def test_remote_inputs_and_instruction_errors_name_the_key():
    with pytest.raises(ConfigError) as e:
        parse_config(
            {
                "remote": {
                    "inputs": {"ok": 1, "bad-name": 2, "when": datetime.date(2026, 1, 1)},
                    "instruction": "two\nlines",
                }
            }
        )
    errors = e.value.errors
    assert len(errors) == 3
    assert any(msg.startswith("remote.inputs: 'bad-name' is not an input name") for msg in errors)
    assert any(msg.startswith("remote.inputs.when: datetime.date(2026, 1, 1) is a date") for msg in errors)
    assert any(msg.startswith("remote.instruction: must be one line") for msg in errors)
    with pytest.raises(ConfigError, match=r"remote.inputs: \[1\] must be a mapping of str to any value"):
        parse_config({"remote": {"inputs": [1]}})
    with pytest.raises(ConfigError, match="did you mean 'remote.inputs'"):
        parse_config({"remote": {"input": {"a": 1}}})


def test_issue16_training_sections_default_off_and_round_trip(tmp_path):
    cfg = Config()
    assert cfg.train.preservation.class_word == "" and cfg.train.preservation.weight == 1.0
    assert cfg.train.regularization.dataset == "" and cfg.train.ema.decay == 0.0 and cfg.train.ema.device == "cpu"
    assert cfg.train.validation.split == 0.0 and cfg.train.validation.dataset == "" and cfg.train.flip is False
    cfg = load_config(
        write(tmp_path, "train:\n  preservation: {class_word: person, weight: '0.5'}\n  ema: {decay: 0.99}\n"),
        ["train.validation.split=0.25", "train.flip=yes", "train.regularization.dataset=reg.zip"],
    )
    assert cfg.train.preservation.weight == 0.5 and cfg.train.ema.decay == 0.99 and cfg.train.flip is True
    assert "train.preservation.class_word" in cfg.explicit and "train.validation.split" in cfg.explicit
    assert load_config(write(tmp_path, dump_config(cfg))) == cfg


def test_dataset_is_a_zip_or_a_list_of_zips_and_path_repeats_entries(tmp_path):
    from finetune.config import DatasetEntry

    cfg = load_config(write(tmp_path, "dataset:\n  - a.zip\n  - {path: b.zip, repeats: 3}\n"))
    assert cfg.dataset == ["a.zip", DatasetEntry(path="b.zip", repeats=3)]
    assert load_config(write(tmp_path, dump_config(cfg))) == cfg
    assert load_config(None, ["dataset=one.zip"]).dataset == "one.zip"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"dataset": [{"path": "b.zip", "repeat": 2}]}, "unknown key 'repeat' (did you mean 'repeats'?)"),
        ({"dataset": [{"path": "b.zip", "repeats": 0}]}, "repeats: 0 is out of range"),
        ({"dataset": [{"repeats": 2}]}, "dataset[0]: needs a path"),
        ({"dataset": []}, "dataset: an empty list trains nothing"),
        ({"dataset": ["a.zip", "b.zip"], "backend": "replicate"}, "trains locally only"),
        ({"train": {"ema": {"device": "gpu"}}}, "train.ema.device: 'gpu' must be one of 'cpu', 'same'"),
        ({"train": {"ema": {"decay": 1.0}}}, "train.ema.decay: 1.0 is out of range"),
        ({"train": {"validation": {"split": 0.2, "dataset": "v.zip"}}}, "not both"),
        ({"train": {"validation": {"split": 0.9}}}, "train.validation.split: 0.9 is out of range"),
        ({"train": {"preservation": {"class_word": "TOK"}}}, "is the trigger word"),
        ({"train": {"preservation": {"weight": -1}}}, "train.preservation.weight: -1.0 is out of range"),
        ({"train": {"ema": 0.99}}, "train.ema: must be a mapping of decay, device"),
    ],
)
def test_issue16_keys_are_checked_and_named(data, message):
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert any(message in error for error in e.value.errors), e.value.errors
