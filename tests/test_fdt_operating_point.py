"""Issue 22: FDT at its operating point. T_fdt calibrated to a target active fraction on a real batch, the scaled
T_fdt, the anneal schedule (and its checkpoint round trip), the active fraction in the log and the curves, and the
max-pooled CLIP control (``model.inter_head=max``) against a hand-written reference."""
import json

import pytest
import torch
import torch.nn.functional as F

from polyalign.app.training import _calibrate_fdt
from polyalign.config import load_config
from polyalign.errors import ConfigError
from polyalign.models.build import build_model
from polyalign.models.heads.fdt import FDTHead
from polyalign.models.heads.projection import TokenMaxHead

TINY = ["model.embed_dim=16", "model.image.width=16", "model.image.layers=2", "model.text.width=16",
        "model.text.layers=1", "model.text.heads=2", "data.image_size=16", "model.fdt.chunk=3"]


def _model(extra=(), codebook=256):
    cfg = load_config(None, TINY + ["loss.weights.fdt=1", "loss.weights.clip=0",
                                    f"model.fdt.codebook_size={codebook}"] + list(extra))
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, cfg.data.image_size, vocab_size=50, loss=cfg.loss)


def _batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.rand(n, 3, 16, 16, generator=g), "text": torch.randint(1, 50, (n, 8), generator=g),
             "text_mask": torch.ones(n, 8, dtype=torch.bool)}
    batch["text_mask"][::2, 5:] = False
    return batch


@pytest.mark.parametrize("target", [0.02, 0.1, 0.3])
def test_calibration_hits_the_target_fraction_on_a_random_batch(target):
    _, model = _model()
    model.train()
    q_image, q_text, mask = model.fdt_queries(_batch())
    # the problem it solves: the authors' T = 1,000 at C = 256 keeps (nearly) every entry
    assert model.fdt.active_fraction(q_image, q_text, mask) > 0.9
    t = model.fdt.calibrate(q_image, q_text, mask, target)
    assert t == pytest.approx(model.fdt.temperature()) and t < 1000
    assert model.fdt.active_fraction(q_image, q_text, mask) == pytest.approx(target, abs=0.01)
    # and the forward pass's own weights agree (the model's stats)
    out = model(_batch())
    got = 0.5 * (out.stats["fdt_image_active_frac"] + out.stats["fdt_text_active_frac"])
    assert float(got) == pytest.approx(target, abs=0.01)


def test_calibration_is_side_effect_free():
    cfg, model = _model(["model.image.kind=cnn"])
    model.train()
    before = {k: v.clone() for k, v in model.named_buffers() if not k.endswith("t_start")}
    rng = torch.get_rng_state()
    _calibrate_fdt(model, _batch(), 0.1, torch.device("cpu"), main=False)
    assert torch.equal(torch.get_rng_state(), rng)
    after = dict(model.named_buffers())
    assert any("running_mean" in k for k in before)  # the CNN's BatchNorm: its statistics must not move
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_scaled_temperature_and_bad_auto_config():
    _, model = _model(["model.fdt.t_fdt_auto=scaled"], codebook=1024)
    assert model.fdt.temperature() == pytest.approx(1000 * 1024 / 16384)
    with pytest.raises(ConfigError, match="sparsemax"):
        load_config(None, TINY + ["loss.weights.fdt=1", "model.fdt.t_fdt_auto=active", "model.fdt.norm=softmax"])
    with pytest.raises(ConfigError, match="t_fdt_auto"):
        load_config(None, ["model.fdt.t_fdt_auto=yes"])
    with pytest.raises(ConfigError, match="active_target"):
        load_config(None, ["model.fdt.active_target=0"])


def test_anneal_schedule_and_its_checkpoint_round_trip():
    cfg = load_config(None, TINY + ["loss.weights.fdt=1", "model.fdt.anneal=0.25", "train.max_steps=8"])
    assert cfg.model.fdt.anneal_steps == 8  # written in: the saved config names the schedule
    head = FDTHead(8, 8, codebook_size=16, dim=4, t_fdt=100.0, anneal=0.25, anneal_steps=8)
    seen = []
    for _ in range(10):
        seen.append(head.temperature())
        head.advance()
    assert seen[0] == pytest.approx(100) and seen[4] == pytest.approx(50) and seen[8] == pytest.approx(25)
    assert seen[9] == pytest.approx(25)  # held after the anneal
    assert head.relevance_scale == pytest.approx(1 / (4 ** 0.5 * 25))
    other = FDTHead(8, 8, codebook_size=16, dim=4, t_fdt=7.0, anneal=0.25, anneal_steps=8)
    other.load_state_dict(head.state_dict())
    assert other.temperature() == pytest.approx(25) and int(other.step) == 10
    # a checkpoint from before the schedule existed (no t_start, no step) loads with the constructor's T
    old = {k: v for k, v in head.state_dict().items() if k not in ("t_start", "step")}
    fresh = FDTHead(8, 8, codebook_size=16, dim=4, t_fdt=3.0)
    fresh.load_state_dict(old)
    assert fresh.temperature() == pytest.approx(3.0)


def test_token_max_head_equals_a_hand_written_reference():
    torch.manual_seed(0)
    head = TokenMaxHead(12, 6, "mean")
    tokens, mask = torch.randn(3, 5, 12), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    ln1, lin1, _, ln2, lin2 = head.proj
    rows = []
    for b in range(3):
        best = None
        for n in range(5):
            if not mask[b, n]:
                continue
            x = tokens[b, n]
            x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + ln1.eps) * ln1.weight + ln1.bias
            x = lin1.weight @ x + lin1.bias
            x = 0.5 * x * (1 + torch.erf(x / 2 ** 0.5))
            x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + ln2.eps) * ln2.weight + ln2.bias
            x = lin2.weight @ x + lin2.bias
            best = x if best is None else torch.maximum(best, x)
        rows.append(best / best.norm())
    assert torch.allclose(head(tokens, mask), torch.stack(rows), atol=1e-6)
    # padding never wins: huge values at masked positions change nothing
    spiked = tokens.clone()
    spiked[~mask] = 1e4
    assert torch.allclose(head(spiked, mask), head(tokens, mask), atol=1e-6)
    # a ViT's [CLS] (token 0) is not a patch: with skip_first it never takes part
    skip = TokenMaxHead(12, 6, "cls", skip_first=True)
    skip.load_state_dict(head.state_dict())
    assert torch.allclose(skip(tokens), head(tokens[:, 1:]), atol=1e-6)
    assert torch.allclose(head.features(tokens, mask), (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))


def test_max_pool_control_is_built_and_trains():
    cfg = load_config(None, TINY + ["model.inter_head=max", "model.image.kind=vit", "model.image.patch_size=8",
                                    "model.image.heads=2"])
    model = build_model(cfg.model, cfg.data.image_size, vocab_size=50, loss=cfg.loss)
    assert isinstance(model.image_head, TokenMaxHead) and model.image_head.skip_first
    assert isinstance(model.text_head, TokenMaxHead) and not model.text_head.skip_first
    out = model(_batch(6))
    assert out.first_emb.shape == (6, 16) and torch.allclose(out.first_emb.norm(dim=-1), torch.ones(6))
    loss = F.cross_entropy(out.first_emb @ out.second_emb.T * 10, torch.arange(6))
    loss.backward()
    assert model.image_head.proj[1].weight.grad.abs().sum() > 0


def test_training_calibrates_logs_and_keeps_t_on_resume(tmp_path, tiny_overrides, capsys):
    from polyalign.app.training import train

    over = tiny_overrides + ["loss.weights.fdt=1", "loss.weights.clip=0", "train.max_steps=2",
                             "train.checkpoint_every=1", "eval.n_examples=0", "model.fdt.codebook_size=128",
                             "model.fdt.t_fdt_auto=active", "model.fdt.active_target=0.1"]
    run = tmp_path / "run"
    train(load_config(None, over), run, show_progress=False)
    said = capsys.readouterr().out
    assert "FDT: T_fdt = " in said and "target 10%" in said
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    first = steps[0]
    assert 0.5 * (first["fdt_image_active_frac"] + first["fdt_text_active_frac"]) == pytest.approx(0.1, abs=0.02)
    assert first["fdt_t"] < 1000 and first["fdt_image_active"] == pytest.approx(128 * first["fdt_image_active_frac"])
    from safetensors.torch import load_file
    weights = load_file(run / "checkpoints" / "step-000002.safetensors")
    assert float(weights["fdt.t_start"]) == pytest.approx(first["fdt_t"]) and int(weights["fdt.step"]) == 2
    # resumed with more steps: no new calibration, the same T
    train(load_config(None, over + ["train.max_steps=3"]), run, resume=True, show_progress=False)
    assert "FDT: T_fdt" not in capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r for r in rows if "loss" in r][-1]["fdt_t"] == pytest.approx(first["fdt_t"])
    assert (run / "loss.png").stat().st_size > 5000
