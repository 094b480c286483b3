"""The README's commands run as printed. Every command line of its ``bash`` blocks parses; the recipe, keys and
files each one names pass every config check; the cheap ones (shapes data, re-evaluating a run) run in a temporary
folder, and the documented error example prints what the README shows."""
import re
import shlex
import shutil
from pathlib import Path

import pytest

from polyalign.cli import build_parser, main
from polyalign.config import Config, load_config, parse_override, set_key
from polyalign.config.connect import ConnectConfig, load_connect_config
from polyalign.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TINY_RUN = ["data.train_size=64", "data.val_size=32", "data.test_size=32", "data.cache_dir=", "model.embed_dim=16",
            "model.image.width=32", "model.image.layers=1", "model.text.width=32", "model.text.layers=1",
            "model.text.heads=2", "model.text.vocab_size=200", "model.text.context_length=16", "train.batch_size=16",
            "train.max_steps=4", "train.warmup_steps=1", "train.checkpoint_every=2", "train.threads=1",
            "eval.probe_max_train=32", "eval.n_examples=1"]


def readme_commands() -> list[list[str]]:
    """Each command of the README as words, from ``polyalign``/``make``/``python`` on: every line of its bash blocks
    (``\\`` continuations joined, comments dropped; ``python -m polyalign`` and ``torchrun ... -m polyalign`` count as
    ``polyalign``), and the inline ones of the text that are more than a command's name (``polyalign demo
    train.seed=1``, ``make bench``; not ``polyalign sweep`` in a sentence, nor the documented error example)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:3] == ["python", "-m", "polyalign"] or words[:1] == ["torchrun"]:
                words = ["polyalign", *words[words.index("polyalign") + 1:]]
            if words:
                assert words[0] in ("polyalign", "make"), f"README command not understood: {line}"
                commands.append(words)
    names = {"train", "eval", "demo", "sweep", "table", "connect", "embed", "inspect", "fdt", "gradcam", "data", "index",
             "search", "serve", "export"}
    for span in re.findall(r"`((?:polyalign|make|python) [^`]*)`(?!\s*→)", README):  # `cmd` → `its error`: below
        words = shlex.split(span)
        if words[0] != "polyalign" or not (set(words[1:]) <= names or "|" in span or words[1].endswith(":")):
            commands.append(words)
    return [list(c) for c in dict.fromkeys(map(tuple, commands))]


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding configs/ and the README's connect.yaml, as a user's checkout would."""
    d = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "configs", d / "configs")
    (d / "connect.yaml").write_text(re.search(r"```yaml\n(# connect\.yaml.*?)```", README, re.S)[1])
    return d


def _load_recipe(config: str, overrides: list[str]):
    """``load_config`` with the manifests a recipe names created (empty) when missing: their data comes from commands
    that download (``data emoji``); only that they exist is checked before work."""
    for _ in range(4):
        try:
            return load_config(config, overrides)
        except ConfigError as e:
            missing = re.match(r"data\.\w+_manifest: (\S+) does not exist", str(e))
            if not missing:
                raise
            Path(missing[1]).parent.mkdir(parents=True, exist_ok=True)
            Path(missing[1]).touch()
    raise AssertionError(f"{config} names more than three missing manifests")


def test_the_readme_has_commands():
    assert len(COMMANDS) >= 25 and ["polyalign", "eval", "runs/clip", "--which", "best", "eval.max_captions=1"] in COMMANDS


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(c)[:80] for c in COMMANDS])
def test_readme_command_parses_and_its_config_validates(words, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    if words[0] == "make":
        assert re.search(rf"^{words[1]}:", (ROOT / "Makefile").read_text(), re.M), f"no make target {words[1]}"
        return
    if words[0] == "python":
        assert (ROOT / words[1]).is_file(), f"no script {words[1]}"
        return
    args = build_parser().parse_args(words[1:])  # argparse exits (fails the test) on a form it rejects
    overrides = getattr(args, "overrides", [])
    if args.command in ("train", "sweep"):
        _load_recipe(args.config, overrides)
    elif args.command == "demo":
        load_config(None, overrides)
    elif args.command == "connect":
        load_connect_config(args.config, overrides)
    elif args.command in ("eval", "embed"):  # a training run's keys, or (eval of a connect run) the connect config's
        for key, value in map(parse_override, overrides):
            try:
                set_key(Config(), key, value)
            except ConfigError:
                set_key(ConnectConfig(), key, value)


def _readme(*prefix: str) -> list[list[str]]:
    found = [c[1:] for c in COMMANDS if c[1:1 + len(prefix)] == list(prefix)]
    assert found, f"the README has no `polyalign {' '.join(prefix)}` command any more: update this test"
    return found


def test_cheap_readme_commands_run_as_printed(tmp_path, monkeypatch, capsys):
    """``data shapes`` as printed (then the manifest recipe that trains on it validates against real files), and
    ``eval runs/clip ...`` as printed on a small stand-in for the README's ``runs/clip``."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    [shapes] = _readme("data", "shapes")
    assert main(shapes) == 0 and Path("data/shapes-manifest/test.jsonl").is_file()
    [manifest_run] = _readme("train", "configs/manifest-example.yaml")
    args = build_parser().parse_args(manifest_run)
    load_config(args.config, args.overrides)  # its manifests exist now: nothing created for it
    assert main(["train", "configs/shapes-clip.yaml", *TINY_RUN, "--out", "runs/clip"]) == 0
    for command in _readme("eval", "runs/clip"):
        capsys.readouterr()
        assert main(command) == 0, command
        assert '"retrieval/t2i_R@1"' in capsys.readouterr().out


def test_the_documented_error_example_prints_what_the_readme_shows(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    command, shown = re.search(r"`(polyalign train [^`]*train\.max_stesp=3)` →\s*`([^`]*)`", README).groups()
    assert main(shlex.split(command)[1:]) == 2
    assert capsys.readouterr().err.startswith(shown.split("...")[0])
