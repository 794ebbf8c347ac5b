from pathlib import Path

import pytest
import yaml

from pipeline.config import PredictJobConfig, TrainJobConfig, flatten, load_config, to_dict
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIG_CLASSES = {"train.yaml": TrainJobConfig, "predict.yaml": PredictJobConfig}


@pytest.mark.parametrize("path", sorted((REPO / "conf").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_validates(path):
    assert path.name in CONFIG_CLASSES, f"add {path.name} to CONFIG_CLASSES with its config class"
    cfg = load_config(CONFIG_CLASSES[path.name], path)
    # The shipped YAML spells out every key, with its default: what users read is what runs.
    written = flatten(yaml.safe_load(path.read_text()))
    defaults = flatten(to_dict(CONFIG_CLASSES[path.name]()))
    assert sorted(set(defaults) - set(written)) == [], f"{path.name} leaves out these keys"
    assert written == defaults and to_dict(cfg) == to_dict(CONFIG_CLASSES[path.name]())


def test_overrides_are_typed_and_dotted():
    cfg = load_config(TrainJobConfig, REPO / "conf" / "train.yaml",
                      ["model.hidden_size=128", "model.bidirectional=true", "train.lr=1e-2",
                       "data.val_path=null", "data.val_fraction=0.2", "data.train_path=[a, b]"])
    assert cfg.model.hidden_size == 128 and cfg.model.bidirectional is True
    assert cfg.train.lr == pytest.approx(0.01)
    assert cfg.data.val_path is None and cfg.data.train_path == ["a", "b"]
    assert flatten(to_dict(cfg))["model.hidden_size"] == 128


@pytest.mark.parametrize("overrides, expected", [
    (["model.hidden_sise=3"], "unknown config key model.hidden_sise"),
    (["modle.hidden_size=3"], "unknown config key modle"),
    (["model.hidden_size=abc"], "model.hidden_size must be an integer"),
    (["train.lr=fast"], "train.lr must be a number"),
    (["scaling.use_gpu=maybe"], "scaling.use_gpu must be true or false"),
    (["scaling.placement_strategy=EVERYWHERE"], "scaling.placement_strategy must be one of"),
    (["model.hidden_size"], "bad override 'model.hidden_size'"),
    (["=3"], "bad override"),
    (["model.dropout=1.5"], "model.dropout must be in [0, 1)"),
    (["tracking.alias=latest"], "'latest' is reserved"),
    (["data.val_path=null"], "data.val_fraction must be between 0 and 1"),
])
def test_bad_config_names_the_dotted_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TrainJobConfig, None, overrides)
    assert expected in str(err.value)


def test_all_problems_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden_size: x\n  layers: 2\ntrain:\n  epochs: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(TrainJobConfig, path)
    problems = err.value.problems
    assert any("model.hidden_size must be an integer" in p for p in problems)
    assert any("unknown config key model.layers" in p for p in problems)
    assert any("train.epochs must be >= 1" in p for p in problems)


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainJobConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainJobConfig, bad)
