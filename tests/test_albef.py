"""The ALBEF-style fusion model with soft masks, focal ITC and text-mask augmentation (arXiv 2107.07651,
arXiv 2304.00719): Grad-CAM against its formula, momentum state, ITM re-ranking, and the model end to end at a tiny
size (its pure losses: test_albef_losses.py)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from polyalign.config import FusionConfig, check_fusion_config
from polyalign.models.fusion import FusionModel
from polyalign.models.heads.momentum import ema_update, enqueue
from polyalign.models.encoders.image import ConvNet, ViT
from polyalign.models.encoders.text import TextTransformer
from polyalign.errors import ConfigError
from polyalign.eval.rerank import first_hit, itm_rerank_metrics
from polyalign.models.heads.fusion import FusionEncoder
from polyalign.models.heads.gradcam import apply_soft_mask, gradcam, pick_words, word_masks
from polyalign.losses.objective import itc_term, itm_term, mlm_term

SPECIAL = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
VOCAB, SIZE = 40, 16


def tiny_batch(b=6, length=10, seed=0):
    """Captions [CLS] w… [SEP] [PAD]… of different lengths, random images, distinct item ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    for i in range(b):
        n = 3 + i % (length - 4)  # position of [SEP]
        ids[i, 0], ids[i, n], ids[i, n + 1:], mask[i, n + 1:] = 2, 3, 0, False
    return {"image": torch.rand(b, 3, SIZE, SIZE, generator=g), "text": ids, "text_mask": mask,
            "index": torch.arange(b)}


def tiny_model(image="vit", image_width=32, **kw):
    torch.manual_seed(0)
    kw = {"fusion_layers": 2, "fusion_heads": 2, "embed_dim": 16, "queue_size": 8, "alpha_ramp_steps": 2, **kw}
    enc = ViT(SIZE, 8, image_width, 1, 2) if image == "vit" else ConvNet(image_width, 2)
    return FusionModel(enc, TextTransformer(VOCAB, 12, 32, 1, 2), FusionConfig(**kw), VOCAB, SPECIAL)


def total_loss(out):
    return sum(term(out, None) for term, key in ((itc_term, "itc_image"), (itm_term, "itm_logits"),
                                                  (mlm_term, "mlm_logits")) if getattr(out, key) is not None)


# --- Grad-CAM and soft masks ---
def test_gradcam_of_a_hand_built_attention_equals_the_formula():
    g = torch.Generator().manual_seed(3)
    attn = torch.softmax(torch.randn(2, 3, 4, 6, generator=g), -1).requires_grad_()  # (B, H, L, 1+N)
    weight = torch.randn(2, 3, 4, 6, generator=g)
    score = (attn * weight).sum() + (attn ** 2).sum()  # ∂s/∂A = W + 2A
    grad = weight + 2 * attn.detach()
    expected = (attn.detach()[..., 1:] * grad[..., 1:].clamp_min(0)).mean(1)  # (B, L, N)
    assert torch.allclose(gradcam(attn, score), expected, atol=1e-6)
    no_cls = gradcam(attn, (attn * weight).sum(), has_cls=False)
    assert no_cls.shape == (2, 4, 6) and torch.allclose(no_cls, (attn.detach() * weight.clamp_min(0)).mean(1))


def test_gradcam_leaves_parameter_grads_untouched():
    layer = nn.Linear(6, 6)
    attn = torch.softmax(layer(torch.randn(2, 2, 3, 6)), -1)
    gradcam(attn, attn[..., 0].sum() * 3 + (attn ** 3).sum())
    assert layer.weight.grad is None and layer.bias.grad is None
    model = tiny_model(soft_mask=True)  # training forward: the soft mask runs Grad-CAM inside the graph
    model(tiny_batch())
    assert all(p.grad is None for p in model.parameters())


def test_fusion_attention_path_equals_fused_kernel():
    torch.manual_seed(4)
    enc = FusionEncoder(16, 24, 2, 2)
    text, image = torch.randn(3, 5, 16), torch.randn(3, 7, 24)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    fused, attn = enc.forward_with_attention(text, mask, image, 0)
    assert torch.allclose(fused, enc(text, mask, image), atol=1e-5)
    assert attn.shape == (3, 2, 5, 7) and torch.allclose(attn.sum(-1), torch.ones(3, 2, 5), atol=1e-5)


def test_soft_masks_lie_in_unit_interval_and_leave_cls_untouched():
    g = torch.Generator().manual_seed(5)
    maps = torch.rand(4, 6, 9, generator=g) * 3
    masks = word_masks(maps, torch.tensor([1, 4, -1, 0]))
    assert masks.min() >= 0 and masks.max() <= 1 and (masks[2] == 0).all()  # -1: no valid word, nothing masked
    assert torch.allclose(masks[[0, 1, 3]].amin(1), torch.zeros(3)) and torch.allclose(masks[[0, 1, 3]].amax(1), torch.ones(3))
    v = torch.randn(4, 10, 8, requires_grad=True)
    g_req = masks.clone().requires_grad_()
    soft = apply_soft_mask(v, g_req, lam=0.7)
    assert torch.equal(soft[:, 0], v[:, 0]) and torch.allclose(soft[:, 1:], v[:, 1:] * (1 - 0.7 * masks)[..., None])
    soft.sum().backward()
    assert g_req.grad is None and v.grad is not None  # no gradient through the mask


def test_pick_words_draws_only_real_non_special_tokens():
    ids = torch.tensor([[2, 9, 4, 11, 3, 0], [2, 3, 0, 0, 0, 0]])  # [CLS] w [MASK] w [SEP] [PAD]; an empty caption
    mask = ids != 0
    g = torch.Generator().manual_seed(6)
    picks = torch.stack([pick_words(ids, mask, SPECIAL.values(), g) for _ in range(400)])  # (400, 2)
    assert set(picks[:, 0].tolist()) == {1, 3} and (picks[:, 1] == -1).all()


# --- momentum state ---
def test_ema_update_formula_and_buffers():
    torch.manual_seed(9)
    student, teacher = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    student[1].running_mean.fill_(2.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(student, teacher, 0.9)
    for t0, s, t in zip(before, student.parameters(), teacher.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s)
    assert torch.equal(teacher[1].running_mean, student[1].running_mean)


def test_model_after_step_moves_teacher_by_ema_and_ramps_alpha():
    model = tiny_model(momentum=0.8)
    out = model(tiny_batch())
    total_loss(out).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    teacher0 = [p.clone() for p in model.momentum.image_encoder.parameters()]
    assert model.alpha() == 0.0
    model.after_step(out)
    for t0, s, t in zip(teacher0, model.image_encoder.parameters(), model.momentum.image_encoder.parameters()):
        assert torch.allclose(t, 0.8 * t0 + 0.2 * s, atol=1e-6)
    assert math.isclose(model.alpha(), 0.2) and int(model.step) == 1  # α·step/ramp = 0.4·1/2


def test_enqueue_wraps_around():
    queue, ids, ptr = torch.zeros(5, 2), torch.full((5,), -1), torch.tensor(3)
    rows = torch.arange(8.0).view(4, 2)
    enqueue([queue, ids], ptr, [rows, torch.tensor([10, 11, 12, 13])])
    assert queue.tolist() == [[4, 5], [6, 7], [0, 0], [0, 1], [2, 3]] and ids.tolist() == [12, 13, -1, 10, 11]
    assert int(ptr) == 2
    enqueue([queue], ptr, [torch.arange(14.0).view(7, 2)])  # more rows than the queue: the last 5 are kept
    assert queue[:, 0].tolist() == [10, 12, 4, 6, 8] and int(ptr) == 2


def test_model_enqueues_the_steps_momentum_features():
    model = tiny_model()
    out = model(tiny_batch())
    model.after_step(out)
    assert torch.allclose(model.image_queue[:6], out.momentum_image_emb)
    assert torch.allclose(model.text_queue[:6], out.momentum_text_emb)
    assert model.index_queue.tolist() == [0, 1, 2, 3, 4, 5, -1, -1] and int(model.queue_ptr) == 6


# --- the model end to end ---
@pytest.mark.parametrize("soft_mask,focal_gamma,text_mask_aug", list(itertools.product([False, True], [0.0, 2.0],
                                                                                          [False, True])))
def test_forward_backward_is_finite_for_every_switch(soft_mask, focal_gamma, text_mask_aug):
    model = tiny_model(soft_mask=soft_mask, focal_gamma=focal_gamma, text_mask_aug=text_mask_aug)
    for step in range(2):  # the second step has a non-zero α and a filled queue
        out = model(tiny_batch(seed=step))
        losses = [itc_term(out, None), itm_term(out, None), mlm_term(out, None)]
        assert all(torch.isfinite(x) for x in losses)
        sum(losses).backward()
        assert out.itm_logits.shape[0] == (4 if soft_mask else 3) * 6
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        model.after_step(out)
        model.zero_grad()


@pytest.mark.parametrize("kw", [{"image": "cnn", "image_width": 48, "soft_mask": True},  # no [CLS], other width
                                {"itc_weight": 0.0, "soft_mask": True}, {"itm_weight": 0.0}, {"mlm_weight": 0.0},
                                {"alpha": 0.0, "text_mask_aug": True}])
def test_other_encoders_and_subsets_of_losses(kw):
    model = tiny_model(**kw)
    out = model(tiny_batch())
    loss = total_loss(out)
    loss.backward()
    assert torch.isfinite(loss) and (out.itc_image is not None) == bool(model.cfg.itc_weight)
    assert (model.mlm_head is None) == (not model.cfg.mlm_weight) and model.clip_on == bool(model.cfg.itc_weight)
    model.after_step(out)


def test_eval_forward_without_grad_keeps_the_soft_mask_pairs():
    model = tiny_model(soft_mask=True).eval()
    with torch.no_grad():
        out = model(tiny_batch())
    assert out.itm_logits.shape == (24, 2) and torch.isfinite(total_loss(out))
    assert (out.index_queue == -1).all()  # the queue's (training) ids are not compared with another split's


def test_state_dict_round_trip_holds_queues_and_momentum():
    model = tiny_model(soft_mask=True)
    for step in range(3):
        out = model(tiny_batch(seed=step))
        model.after_step(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for key in ("image_queue", "text_queue", "index_queue", "queue_ptr", "step", "momentum.fusion.ln.weight"):
        assert key in state
    path = pytest.importorskip("tempfile").mktemp(suffix=".safetensors")
    save_file(state, path)  # as checkpoints are written
    fresh = tiny_model(soft_mask=True)
    fresh.load_state_dict(load_file(path))
    assert int(fresh.queue_ptr) == int(model.queue_ptr) and torch.equal(fresh.image_queue, model.image_queue)
    torch.manual_seed(11)
    a = model(tiny_batch(seed=9))
    torch.manual_seed(11)
    b = fresh(tiny_batch(seed=9))
    for key in ("itc_image", "momentum_text_emb", "text_queue", "itm_logits", "mlm_logits"):
        assert torch.equal(getattr(a, key), getattr(b, key))
    assert a.itc_alpha == b.itc_alpha > 0


def test_config_checks():
    check_fusion_config(FusionConfig())
    for bad in ({"soft_mask": True, "gradcam_layer": 1}, {"soft_mask": True, "gradcam_layer": -1},
                {"soft_mask": True, "itm_weight": 0.0}, {"alpha": 1.5}, {"init_temperature": 1.0},
                {"itc_weight": 0.0, "itm_weight": 0.0, "mlm_weight": 0.0}):
        with pytest.raises(ConfigError):
            check_fusion_config(FusionConfig(**bad))


def test_encode_and_itm_scores_shapes():
    model = tiny_model().eval()
    batch = tiny_batch()
    with torch.no_grad():
        img, txt = model.encode_image(batch["image"]), model.encode_text(batch["text"], batch["text_mask"])
        scores = model.itm_scores(batch["image"], batch["text"], batch["text_mask"])
    assert img.shape == txt.shape == (6, 16) and torch.allclose(img.norm(dim=1), torch.ones(6))
    assert scores.shape == (6,)


# --- ITM re-ranking ---
def test_first_hit():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1], [1.0, 1.0, 0.0]])
    positive = torch.tensor([[True, False, False], [False, False, False], [False, True, True]])
    assert first_hit(scores, positive).tolist() == [2, 3, 1]


class _OracleITM(nn.Module):
    """ITC embeddings that rank badly; an ITM that knows which image each caption describes."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def image_encoder(self, images):  # (B, 3, H, W) → tokens carrying the image's id (pixel [0, 0, 0] · 100)
        return images[:, :1, :1, :1].flatten(1)[:, None, :].expand(-1, 2, -1) * 100

    def text_encoder(self, ids, mask):
        return ids[..., None].float()

    def image_proj(self, v):
        return F.normalize(torch.stack([torch.cos(v[:, 0, 0]), torch.sin(v[:, 0, 0])], 1), dim=1)

    def text_proj(self, w, mask):
        return F.normalize(torch.stack([torch.sin(w[:, 1, 0]), torch.cos(w[:, 1, 0])], 1), dim=1)

    def match_logits(self, v, w, mask):
        return -(v[:, 0, 0].round() - w[:, 1, 0]).abs()


def test_itm_rerank_recovers_the_oracle_ranking_and_real_model_gives_fractions():
    n = 12
    images = torch.zeros(n, 3, 4, 4)
    images[:, 0, 0, 0] = torch.arange(n) / 100
    txt_to_img = torch.arange(n).repeat(2)  # two captions per image, token 1 = the image's id
    ids = torch.stack([torch.tensor([2, int(i), 3]) for i in txt_to_img])
    mask = torch.ones_like(ids, dtype=torch.bool)
    oracle = itm_rerank_metrics(_OracleITM(), images, ids, mask, txt_to_img, k=2 * n, ks=(1, 5))
    assert oracle["t2i_R@1"] == oracle["i2t_R@1"] == 1.0
    few = itm_rerank_metrics(_OracleITM(), images, ids, mask, txt_to_img, k=5, ks=(1, 5))
    assert few["t2i_R@1"] < 1.0  # positives outside the ITC top-5 are misses
    batch = tiny_batch(b=8)
    real = itm_rerank_metrics(tiny_model(), batch["image"], batch["text"], batch["text_mask"], torch.arange(8),
                              k=5, ks=(1, 5), batch_size=7)
    assert all(0.0 <= real[f"{d}_R@{k}"] <= 1.0 for d in ("t2i", "i2t") for k in (1, 5))
    assert real["t2i_R@1"] <= real["t2i_R@5"] and real["i2t_R@1"] <= real["i2t_R@5"]
    with pytest.raises(ValueError):
        itm_rerank_metrics(_OracleITM(), images, ids, mask, txt_to_img, k=3, ks=(1, 5))


def test_gradcam_at_the_last_fusion_layer_is_zero_for_every_word():
    """Why ``gradcam_layer`` may not be the last layer: there only [CLS]'s attention reaches the ITM score."""
    model = tiny_model().eval()
    batch = tiny_batch()
    v = model.image_encoder(batch["image"])
    w, mask = model.text_tokens(batch["text"], batch["text_mask"])
    first, last = model.gradcam_maps(v, w, mask, 0), model.gradcam_maps(v, w, mask, -1)
    assert first[:, 1:].abs().sum() > 0 and last[:, 1:].abs().sum() == 0 and last[:, 0].abs().sum() > 0


def test_eval_forward_is_deterministic_and_leaves_the_global_rng_alone():
    from polyalign.models.heads.gradcam import itm_gradcam

    model = tiny_model(soft_mask=True).eval()
    batch = tiny_batch()
    state = torch.get_rng_state()
    with torch.no_grad():
        a, b = model(batch), model(batch)
    assert torch.equal(torch.get_rng_state(), state)  # a validation pass mid-training keeps resumes exact
    assert torch.equal(a.itm_logits, b.itm_logits) and torch.equal(a.mlm_labels, b.mlm_labels)
    maps = itm_gradcam(model, batch["image"], batch["text"], batch["text_mask"])
    assert maps.shape == (6, 10, 4) and (maps[~batch["text_mask"]] == 0).all()


def test_word_gradcam_picture(tmp_path):
    from polyalign.app.gradcam_plot import plot_word_gradcam
    from polyalign.eval.pointing import upsample_map
    from polyalign.models.heads.gradcam import itm_gradcam

    up = upsample_map(torch.tensor([0.0, 1.0, 2.0, 3.0]), (8, 8))
    assert up.shape == (8, 8) and up.min() == 0 and up.max() == 1
    model, batch = tiny_model().eval(), tiny_batch()
    maps = itm_gradcam(model, batch["image"][:1], batch["text"][:1], batch["text_mask"][:1])[0]  # (L, 4)
    plot_word_gradcam(tmp_path / "cam.png", batch["image"][0], ["w1", "w2"], maps[1:3])
    assert (tmp_path / "cam.png").stat().st_size > 1000

