import pytest
from pathlib import Path

from polyalign.config import Config, load_config, parse_override, save_config
from polyalign.errors import ConfigError
from polyalign.losses.objective import Objective


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


def test_key_machinery_knows_no_schema_of_its_own():
    """config_tree sets keys of any dataclass tree: a key spelled like a training choice (``train.precision``) is
    checked by the tree that owns it, not by the training config's choices."""
    from dataclasses import dataclass, field

    from polyalign.config.tree import check_choices, flat_items, get_key, set_key

    @dataclass
    class Train:
        precision: str = "fp32"
        steps: int = 1

    @dataclass
    class Tree:
        train: Train = field(default_factory=Train)

    tree = Tree()
    set_key(tree, "train.precision", "fp16")  # not a training-config choice, fine for this tree
    set_key(tree, "train.steps", 3.0)
    assert get_key(tree, "train.precision") == "fp16" and flat_items(tree) == {"train.precision": "fp16", "train.steps": 3}
    with pytest.raises(ConfigError, match="train.precision.*fp32, fp16"):
        set_key(tree, "train.precision", "int8")
        check_choices(tree, {"train.precision": ("fp32", "fp16")})
    with pytest.raises(ConfigError, match="did you mean train.steps"):
        set_key(tree, "train.stesp", 2)


@pytest.mark.parametrize("override, message", [
    ("loss.weights.clipp=1", "did you mean clip"),
    ("loss.weights.image_image=1", "needs data.augment.enabled=true"),
    ("data.points_augment=true", "applies to data.name=shapes3d"),
    ("model.text.kind=hf", "not a HF-format model directory"),
])
def test_config_errors_come_before_any_work(override, message):
    """A bad key exits 2 with its message before torch, data or models are even imported."""
    import subprocess
    import sys

    code = ("import sys; from polyalign.cli import main; rc = main(['train', 'configs/shapes-clip.yaml', "
            f"{override!r}, '--out', 'runs/never']); print('torch' in sys.modules); sys.exit(rc)")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "False"  # nothing heavy was loaded: no dataset, tokenizer or model was built
    assert not (root / "runs" / "never").exists()
