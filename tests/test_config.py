import pytest

from polyalign.config import Config, load_config, parse_override, save_config
from polyalign.errors import ConfigError
from polyalign.objective import Objective


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.max_steps=7", "train.batch_size=64", "data.num_workers=2",
                             "train.seed=3", "train.log_every=2", "train.checkpoint_every=5", "train.lr=1e-3"])
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.data.num_workers) == (7, 64, 2)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)


def test_unknown_key_names_close_match():
    with pytest.raises(ConfigError, match=r"train\.max_stesp.*did you mean train\.max_steps"):
        load_config(None, ["train.max_stesp=3"])


def test_bad_value_type_and_choice():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["train.batch_size=big"])
    with pytest.raises(ConfigError, match="train.precision.*fp32, bf16"):
        load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="train.batch_size.*positive"):
        load_config(None, ["train.batch_size=0"])


def test_yaml_round_trip_and_unknown_yaml_key(tmp_path):
    cfg = load_config(None, ["loss.weights.clip=0.5", "eval.templates={shape: ['a {}']}"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and again.loss.weights == {"clip": 0.5}
    (tmp_path / "bad.yaml").write_text("model:\n  imgae: {width: 3}\n")
    with pytest.raises(ConfigError, match="model.imgae"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_override_parsing():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_objective_rejects_unknown_and_all_zero_terms():
    with pytest.raises(ConfigError, match="clp.*did you mean clip"):
        Objective({"clp": 1.0})
    with pytest.raises(ConfigError, match="weight 0"):
        Objective({"clip": 0.0})
    assert Config().loss.weights == {"clip": 1.0}
