from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from fadrm.config import Config, available_presets, load_config, parse_override, read_preset
from fadrm.errors import ConfigError
from fadrm.tracker import flatten

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_is_the_default_configuration():
    assert load_config(ROOT / "params.yaml") == Config()


def test_params_yaml_lists_every_setting():
    # the single source of configuration shows every knob, so `dvc params diff` and a reader see them all
    written = flatten(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert sorted(set(flatten(Config().model_dump())) - set(written)) == []


def test_every_preset_validates_and_leaves_out_dir_alone():
    names = available_presets()
    assert {"smoke", "tiny", "default", "cifar10-cpu", "cifar100", "tiny-imagenet", "imagenet-1k"} <= set(names)
    for name in names:
        cfg = load_config(None, name)
        assert cfg.preset == name
        # dvc.yaml names outputs by params.yaml's out_dir; a preset that moved them would desync DVC
        assert "out_dir" not in read_preset(name)


def test_unknown_key_is_named_with_the_valid_ones(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"squeeze": {"epoch": 5}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "squeeze.epoch" in message
    assert "did you mean 'squeeze.epochs'" in message
    assert "batch_size" in message  # lists the valid keys


def test_unknown_top_level_key_and_bad_type():
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        load_config(None, overrides=["colour=red"])
    with pytest.raises(ConfigError, match="'squeeze.epochs'.*integer"):
        load_config(None, overrides=["squeeze.epochs=abc"])
    with pytest.raises(ConfigError, match="'recover.alpha'"):
        load_config(None, overrides=["recover.alpha=1.5"])
    with pytest.raises(ConfigError, match="'recover.alpha"):
        load_config(None, overrides=["recover.alpha=[0.7, 1.5, 0.3]"])  # each weight of a schedule, too


def test_recover_alpha_takes_one_weight_or_one_per_merge():
    assert load_config(None, overrides=["recover.alpha=0.7"]).recover.alpha == 0.7
    assert load_config(None, overrides=["recover.alpha=[0.7, 0.5, 0.3]"]).recover.alpha == (0.7, 0.5, 0.3)


@pytest.mark.parametrize(
    "text, keys, value",
    [
        ("squeeze.epochs=5", ["squeeze", "epochs"], 5),
        ("recover.alpha=0.7", ["recover", "alpha"], 0.7),
        ("method=fadrm+", ["method"], "fadrm+"),
        ("recover.schedule=[[16, 10], [32, 10]]", ["recover", "schedule"], [[16, 10], [32, 10]]),
        ("data.path=null", ["data", "path"], None),
    ],
)
def test_override_parsing(text, keys, value):
    assert parse_override(text) == (keys, value)


def test_overrides_apply_over_preset_over_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"ipc": 7, "squeeze": {"epochs": 3, "lr": 0.3}}))
    cfg = load_config(path, "tiny", ["squeeze.epochs=9", "squeeze.teachers.0.arch=resnet18"])
    assert cfg.ipc == 2  # the preset beats the file
    assert cfg.squeeze.lr == 0.05  # the preset sets lr too
    assert cfg.squeeze.epochs == 9  # -S beats both
    assert cfg.squeeze.teachers[0].arch == "resnet18"  # list items by index


def test_preset_key_in_file_and_override_of_preset(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("preset: tiny\n")
    assert load_config(path).ipc == 2
    assert load_config(path, overrides=["preset=default"]).ipc == 10


def test_bad_overrides_and_presets():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, overrides=["squeeze.epochs"])
    with pytest.raises(ConfigError, match="unknown preset 'fast'.*smoke"):
        load_config(None, "fast")
    with pytest.raises(ConfigError, match="not an index"):
        load_config(None, overrides=["squeeze.teachers.3.arch=resnet18"])
    with pytest.raises(ConfigError, match="unknown architecture 'resnet19'"):
        load_config(None, overrides=["evaluate.student=resnet19"])
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(None, overrides=["data.source=tar"])


def test_missing_params_file_only_fails_when_named(tmp_path):
    assert load_config(tmp_path / "absent.yaml") == Config()
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml", params_required=True)


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.ipc = 3  # type: ignore[misc]
