"""Issue 23, item 1: the fusion teacher's momentum and the α warm-up given as shares of the run, so that a short run
keeps ALBEF's proportions (its teacher is not left near its random initialisation)."""
import math

import pytest
import torch

from polyalign.config import load_config
from polyalign.config.fusion import fusion_schedules
from polyalign.config.schema import FusionConfig
from polyalign.errors import ConfigError
from polyalign.models.fusion import FusionModel
from tests.test_albef import SIZE, SPECIAL, VOCAB, tiny_batch, total_loss
from polyalign.models.encoders.image import ViT
from polyalign.models.encoders.text import TextTransformer


def test_schedules_resolve_from_the_run_length():
    f = FusionConfig()  # the defaults: ALBEF's horizon (0.085 % of the run) and α ramp (1/30 of it)
    assert fusion_schedules(f, 300) == (0.0, 10)  # horizon 0.26 steps: the teacher follows the student
    m, ramp = fusion_schedules(f, 100_000)
    assert m == pytest.approx(1 - 1 / 85) and ramp == 3333
    assert fusion_schedules(FusionConfig(momentum=0.995, alpha_ramp_steps=100), 300) == (0.995, 100)  # as given
    assert fusion_schedules(FusionConfig(alpha_ramp_steps=0), 300)[1] == 0  # no ramp
    assert fusion_schedules(f, 0) == (0.0, 0)  # a model built for evaluation: no run length
    with pytest.raises(ConfigError, match="alpha_ramp_steps"):
        load_config(None, ["model.fusion.alpha_ramp_steps=-2"])
    with pytest.raises(ConfigError, match="momentum_horizon"):
        load_config(None, ["model.fusion.momentum_horizon=2"])


def _teacher_share(cfg: FusionConfig, steps: int) -> tuple[float, float]:
    """Train a tiny fusion model ``steps`` SGD steps; return how far the teacher moved from the initialisation as a
    share of the student's move, and the teacher–student gap as a share of it (image encoder weights)."""
    torch.manual_seed(0)
    model = FusionModel(ViT(SIZE, 8, 32, 1, 2), TextTransformer(VOCAB, 12, 32, 1, 2), cfg, VOCAB, SPECIAL)
    init = torch.cat([p.detach().flatten().clone() for p in model.image_encoder.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(steps):
        out = model(tiny_batch(seed=step))
        opt.zero_grad()
        total_loss(out).backward()
        opt.step()
        model.after_step(out)
    flat = lambda ps: torch.cat([p.detach().flatten() for p in ps])
    student, teacher = flat(model.image_encoder.parameters()), flat(model.momentum.image_encoder.parameters())
    moved = (student - init).norm()
    return float((teacher - init).norm() / moved), float((teacher - student).norm() / moved)


def test_teacher_keeps_up_at_the_end_of_a_short_run():
    steps = 30
    base = dict(fusion_layers=1, fusion_heads=2, embed_dim=16, queue_size=8)
    # a tenth of the run as the horizon (3 steps): m = 2/3
    m, ramp = fusion_schedules(FusionConfig(momentum_horizon=0.1), steps)
    assert m == pytest.approx(2 / 3) and ramp == 1
    share, gap = _teacher_share(FusionConfig(**base, momentum=m, alpha_ramp_steps=ramp), steps)
    assert share > 0.85 and gap < 0.3
    # the stale teacher the issue found: ALBEF's per-step 0.995 in a 30-step run is still mostly its initialisation
    # (1 − 0.995^30 = 14 % of the way)
    stale, stale_gap = _teacher_share(FusionConfig(**base, momentum=0.995, alpha_ramp_steps=ramp), steps)
    assert stale < 0.3 and stale_gap > 0.7
    assert math.isclose(1 - 0.995 ** steps, 0.14, abs_tol=0.01)


def test_training_resolves_and_reports_the_schedules(tmp_path, tiny_overrides, capsys):
    from polyalign.app.training import train

    over = tiny_overrides + ["loss.weights.clip=0", "loss.weights.itc=1", "loss.weights.itm=1", "train.max_steps=3",
                             "train.checkpoint_every=3", "eval.n_examples=0", "model.fusion.fusion_layers=1",
                             "model.fusion.fusion_heads=2", "model.fusion.queue_size=16",
                             "model.fusion.momentum_horizon=0.5"]
    train(load_config(None, over), tmp_path / "run", show_progress=False)
    said = capsys.readouterr().out
    # horizon 0.5 · 3 steps = 1.5 steps: m = 1 − 1/1.5 = 1/3; α ramp round(3/30) = 0 steps
    assert "fusion teacher: momentum 0.3333 per step (EMA horizon 1.5 steps of 3), α ramp over 0 steps" in said
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.model.fusion.momentum == 0 and saved.model.fusion.momentum_horizon == 0.5  # the rule, not its value
