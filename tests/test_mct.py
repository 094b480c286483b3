"""MCT's intra-modal terms: NT-Xent, MoCo queue and momentum update, tag head, views, and switching terms off."""
import math

import pytest
import torch
import torch.nn.functional as F

from polyalign.config import load_config
from polyalign.data.base import Views, second_caption
from polyalign.data.build import build_datasets
from polyalign.data.loader import Collator
from polyalign.errors import ConfigError
from polyalign.models.heads.momentum import MomentumEncoder
from polyalign.losses.intra import local_nt_xent, moco_info_nce, nt_xent, tag_bce
from polyalign.models.build import build_model
from polyalign.losses.objective import Objective
from polyalign.app.runs import prepare_views
from polyalign.tokenizer import Tokenizer
from polyalign.data.loader import to_model_inputs


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def naive_nt_xent(z1, z2, t):
    z = torch.cat([z1, z2])
    n2, total = z.shape[0], 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        sims = [math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i]
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / sum(sims))
    return total / n2


def test_nt_xent_matches_naive_loop():
    z1, z2 = _unit(6, 5, 0), _unit(6, 5, 1)
    assert nt_xent(z1, z2, 0.2).item() == pytest.approx(naive_nt_xent(z1, z2, 0.2), rel=1e-5)


def test_nt_xent_closed_form_orthogonal_views():
    """Identical views, all pairs of items orthogonal: each row sees its positive at cos 1 and 2B-2 negatives at 0."""
    b, t = 4, 0.5
    z = torch.eye(b)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + (2 * b - 2)))
    assert nt_xent(z, z, t).item() == pytest.approx(expected, rel=1e-6)


def test_local_nt_xent_averages_to_the_global_loss():
    z1, z2, t = _unit(8, 4, 2), _unit(8, 4, 3), 0.1
    shares = [local_nt_xent(z1[r * 4:(r + 1) * 4], z2[r * 4:(r + 1) * 4], z1, z2, t, r * 4) for r in range(2)]
    assert (sum(shares) / 2).item() == pytest.approx(nt_xent(z1, z2, t).item(), rel=1e-6)


def test_moco_info_nce_matches_naive_and_ignores_key_gradients():
    q, k, queue, t = _unit(3, 4, 4).requires_grad_(), _unit(3, 4, 5).requires_grad_(), _unit(7, 4, 6), 0.2
    loss = moco_info_nce(q, k, queue, t)
    expected = 0.0
    for i in range(3):
        pos = math.exp(float(q[i].detach() @ k[i].detach()) / t)
        expected += -math.log(pos / (pos + sum(math.exp(float(q[i].detach() @ n) / t) for n in queue)))
    assert loss.item() == pytest.approx(expected / 3, rel=1e-5)
    loss.backward()
    assert q.grad is not None and k.grad is None


def test_queue_enqueue_wraps_and_ema_update():
    enc, head = torch.nn.Linear(3, 3), torch.nn.Identity()
    m = MomentumEncoder(enc, head, dim=2, queue_size=5, momentum=0.9)
    assert all(not p.requires_grad for p in m.parameters())
    m.enqueue(torch.ones(3, 2))
    assert int(m.queue_ptr) == 3 and torch.equal(m.queue[:3], torch.ones(3, 2))
    m.enqueue(torch.full((4, 2), 2.0))  # rows 3, 4, then wraps to 0, 1
    assert int(m.queue_ptr) == 2
    assert torch.equal(m.queue, torch.tensor([[2.0] * 2, [2.0] * 2, [1.0] * 2, [2.0] * 2, [2.0] * 2]))
    before = m.encoder.weight.clone()
    with torch.no_grad():
        enc.weight.add_(1.0)
    m.update(enc, head)
    assert torch.allclose(m.encoder.weight, 0.9 * before + 0.1 * enc.weight)


def test_tag_bce_matches_formula():
    logits, targets = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    expected = -(math.log(torch.sigmoid(torch.tensor(2.0))) + math.log(1 - torch.sigmoid(torch.tensor(-1.0)))) / 2
    assert tag_bce(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_second_caption_is_another_caption_or_a_word_dropped_view():
    import numpy as np

    rng = np.random.default_rng(0)
    assert all(second_caption(["a b", "c d", "e"], 1, rng, 0.5) in ("a b", "e") for _ in range(20))
    views = {second_caption(["one two three four"], 0, rng, 0.5) for _ in range(30)}
    assert len(views) > 1 and all(v and set(v.split()) <= {"one", "two", "three", "four"} for v in views)


def _setup(tiny_overrides, tmp_path, extra):
    cfg = load_config(None, tiny_overrides + extra)
    datasets = build_datasets(cfg.data, 0, show_progress=False)
    tags = prepare_views(cfg, datasets, tmp_path)
    tok = Tokenizer.train(datasets["train"].all_captions(), cfg.model.text.vocab_size, cfg.model.text.context_length)
    model = build_model(cfg.model, cfg.data.image_size, tok.vocab_size, cfg.loss, tags)
    batch = to_model_inputs(Collator(tok)([datasets["train"][(0, i)] for i in range(8)]))
    return cfg, model, batch


MCT = ["data.augment.enabled=true", "loss.weights.image_image=1", "loss.weights.text_text=0.5",
       "loss.weights.tags=1", "data.tag_min_count=2"]


def test_every_term_is_computed_and_backpropagates(tiny_overrides, tmp_path):
    cfg, model, batch = _setup(tiny_overrides, tmp_path, MCT)
    assert batch["image_view2"].shape == batch["image"].shape and batch["tags"].shape[1] == len(model.tag_names)
    assert (tmp_path / "tags.json").exists()
    losses = Objective(cfg.loss)(model(batch))
    assert set(losses) == {"clip_loss", "image_image_loss", "text_text_loss", "tags_loss", "loss"}
    losses["loss"].backward()
    for head in (model.image_intra_head, model.text_intra_head, model.tag_head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_weight_zero_builds_and_computes_nothing(tiny_overrides, tmp_path):
    cfg, model, batch = _setup(tiny_overrides, tmp_path, ["loss.weights.image_image=0", "loss.weights.tags=0"])
    assert model.image_intra_head is None and model.tag_head is None and model.momentum is None
    assert "image_view2" not in batch and "tags" not in batch  # the loader does not even make the views
    calls = []
    model.image_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    assert model(batch).fields_set() == {"first_emb", "second_emb", "logit_scale"} and calls == [8]  # one view, once


def test_image_intra_only_skips_the_text_tower(tiny_overrides, tmp_path):
    cfg, model, batch = _setup(tiny_overrides, tmp_path, ["data.augment.enabled=true", "loss.weights.clip=0",
                                                          "loss.weights.image_image=1"])
    calls = []
    model.text_encoder.register_forward_hook(lambda m, i, o: calls.append(1))
    out = model(batch)
    assert calls == [] and out.first_emb is None and set(Objective(cfg.loss)(out)) == {"image_image_loss", "loss"}


def test_moco_mode_outputs_keys_and_queue_moves(tiny_overrides, tmp_path):
    cfg, model, batch = _setup(tiny_overrides, tmp_path, ["data.augment.enabled=true", "loss.weights.image_image=1",
                                                          "loss.image_image=moco", "model.moco.queue_size=16"])
    out = model(batch)
    assert out.moco_key1_emb.shape == (8, cfg.model.intra_dim) and out.moco_queue.shape[0] == 16
    assert not out.moco_key1_emb.requires_grad
    Objective(cfg.loss)(out)["loss"].backward()
    assert all(p.grad is None for p in model.momentum.parameters())
    model.after_step(out)
    assert int(model.momentum.queue_ptr) == 0  # 2 views × 8 keys = 16: wrapped around exactly once
    assert torch.allclose(model.momentum.queue[:8], out.moco_key1_emb)


def test_image_image_without_augmentation_is_a_config_error(tiny_overrides, tmp_path):
    with pytest.raises(ConfigError, match="data.augment.enabled"):
        _setup(tiny_overrides, tmp_path, ["loss.weights.image_image=1"])


def test_views_are_a_function_of_seed_epoch_index(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + MCT)
    a, b = (build_datasets(cfg.data, 0, show_progress=False) for _ in range(2))
    for ds in (a, b):
        prepare_views(cfg, ds, tmp_path)
    x, y = a["train"][(3, 5)], b["train"][(3, 5)]
    assert torch.equal(x["image_view2"], y["image_view2"]) and x["caption_view2"] == y["caption_view2"]
    assert not torch.equal(x["image"], x["image_view2"])
    assert isinstance(a["train"].views, Views)


def test_mct_moco_run_reloads_for_eval_with_tag_head(tiny_overrides, tmp_path):
    from polyalign.app.runs import load_run
    from polyalign.app.training import train

    over = tiny_overrides + MCT + ["loss.image_image=moco", "model.moco.queue_size=64", "train.max_steps=4",
                                   "train.checkpoint_every=4", "eval.n_examples=0"]
    metrics = train(load_config(None, over), tmp_path / "run", show_progress=False)
    assert 0 <= metrics["tagging/head_mAP"] <= 1 and 0 <= metrics["tagging/probe_mAP"] <= 1
    cfg, model, _ = load_run(tmp_path / "run")  # tags.json and the MoCo state come back with the weights
    assert model.tag_names and model.momentum is not None and int(model.momentum.queue_ptr) == (4 * 2 * 32) % 64
