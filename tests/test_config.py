from pathlib import Path

import pytest
import yaml

from pipeline.core.config import ConfigError, from_dict, load_config, save_config, to_dict, with_overrides


def test_overrides_are_typed():
    cfg = load_config(None, ["train.learning_rate=2e-4", "run=exp1", "infer.tta=4", "ablate.tiles=[0, 128/64]",
                             "train.max_minutes=3", "infer.runs=a"])
    assert cfg.train.learning_rate == pytest.approx(2e-4)
    assert cfg.run == "exp1" and cfg.infer.tta == 4
    assert cfg.ablate.tiles == ("0", "128/64")
    assert isinstance(cfg.train.max_minutes, float) and cfg.train.max_minutes == 3.0
    assert cfg.infer.runs == ("a",)


@pytest.mark.parametrize("override, message", [
    ("train.lr=1", "unknown config key 'train.lr'"),
    ("nosuch=1", "unknown config key 'nosuch'"),
    ("infer.tta=3", "infer.tta: 3 is not one of"),
    ("train.batch_size=abc", "train.batch_size: expected int"),
    ("train.augment=7", "train.augment: expected bool"),
    ("train=3", "train: expected a mapping"),
    ("novalue", "must look like key=value"),
])
def test_bad_overrides_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_then_overrides_and_round_trip(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("run: fromfile\ntrain:\n  batch_size: 4\n  learning_rate: 1.0e-3\n")
    cfg = load_config(f, ["train.batch_size=8"])
    assert (cfg.run, cfg.train.batch_size, cfg.train.learning_rate) == ("fromfile", 8, 1e-3)
    saved = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert from_dict(yaml.safe_load(saved.read_text())) == cfg
    assert with_overrides(cfg, **{"infer.tta": 1}).infer.tta == 1


def test_bad_yaml_names_the_file(tmp_path: Path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  learning_rat: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'train\.learning_rat'"):
        load_config(f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_to_dict_is_plain():
    values = to_dict(load_config(None, ["infer.runs=[a, b]"]))
    assert values["infer"]["runs"] == ["a", "b"]
    assert yaml.safe_load(yaml.safe_dump(values)) == values
