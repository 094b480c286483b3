"""The ALBEF-style fusion model with soft masks, focal ITC and text-mask augmentation (arXiv 2107.07651,
arXiv 2304.00719): losses against closed forms and references, Grad-CAM against its formula, sampling and masking
statistics, momentum state, and the model end to end at a tiny size."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from polyalign.albef import FusionConfig, build_fusion_model, check_fusion_config, ema_update, enqueue
from polyalign.encoders.image import ConvNet, ViT
from polyalign.encoders.text import TextTransformer
from polyalign.errors import ConfigError
from polyalign.eval.rerank import first_hit, itm_rerank_metrics
from polyalign.heads.fusion import FusionEncoder
from polyalign.heads.gradcam import apply_soft_mask, gradcam, pick_words, word_masks
from polyalign.losses.albef import (IGNORE, focal_soft_cross_entropy, itc_loss, itc_positives, itc_term, itm_term,
                                    mask_tokens, mlm_term, sample_hard_negatives)
from polyalign.losses.contrastive import info_nce

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
    return build_fusion_model(enc, TextTransformer(VOCAB, 12, 32, 1, 2), FusionConfig(**kw), VOCAB, SPECIAL)


def total_loss(out):
    return sum(term(out, None) for term, key in ((itc_term, "itc_image"), (itm_term, "itm_logits"),
                                                  (mlm_term, "mlm_logits")) if key in out)


# --- focal ITC ---
def test_focal_gamma_zero_equals_soft_cross_entropy_in_values_and_grads():
    g = torch.Generator().manual_seed(0)
    logits0 = torch.randn(5, 9, generator=g)
    targets = torch.softmax(torch.randn(5, 9, generator=g), 1)
    a, b = logits0.clone().requires_grad_(), logits0.clone().requires_grad_()
    ours, ref = focal_soft_cross_entropy(a, targets, 0.0), F.cross_entropy(b, targets)
    ours.backward(), ref.backward()
    assert torch.allclose(ours, ref, atol=1e-6) and torch.allclose(a.grad, b.grad, atol=1e-7)


def test_itc_gamma_zero_without_queue_or_distillation_is_info_nce():
    g = torch.Generator().manual_seed(1)
    a0, b0 = F.normalize(torch.randn(6, 8, generator=g), dim=1), F.normalize(torch.randn(6, 8, generator=g), dim=1)
    grads = []
    for fn in (lambda a, b: itc_loss(a, b, a, b, 0.1, itc_positives(6, 6)), lambda a, b: info_nce(a, b, 10.0)):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        loss = fn(a, b)
        loss.backward()
        grads.append((loss.detach(), a.grad, b.grad))
    for x, y in zip(*grads):
        assert torch.allclose(x, y, atol=1e-5)


def test_focal_closed_form_on_two_by_two_down_weights_easy_pairs():
    logits, targets, gamma = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.eye(2), 2.0
    p_easy, p_hard = 1 / (1 + math.exp(-2.0)), 0.5
    focal_rows = [(1 - p_easy) ** gamma * -math.log(p_easy), (1 - p_hard) ** gamma * -math.log(p_hard)]
    assert math.isclose(focal_soft_cross_entropy(logits, targets, gamma).item(), sum(focal_rows) / 2, rel_tol=1e-5)
    # per row, focal / CE = (1 − p)^γ: the easy pair keeps 1.4% of its loss, the hard one 25%
    ce = F.cross_entropy(logits, torch.arange(2), reduction="none")
    ratio = [focal_soft_cross_entropy(logits[i:i + 1], targets[i:i + 1], gamma) / ce[i] for i in range(2)]
    assert math.isclose(ratio[0].item(), (1 - p_easy) ** 2, rel_tol=1e-5) and ratio[0] < 0.02 < ratio[1] == 0.25


def test_itc_distillation_targets_mix_teacher_and_positives():
    g = torch.Generator().manual_seed(2)
    a, b, am, bm = (F.normalize(torch.randn(4, 8, generator=g), dim=1) for _ in range(4))
    queue = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    keys_t, keys_i = torch.cat([bm, queue]), torch.cat([am, queue.flip(0)])
    pos, alpha = itc_positives(4, 7), 0.4
    y_i2t = alpha * torch.softmax(am @ keys_t.T / 0.1, 1) + (1 - alpha) * pos.float()
    y_t2i = alpha * torch.softmax(bm @ keys_i.T / 0.1, 1) + (1 - alpha) * pos.float()
    ref = 0.5 * (F.cross_entropy(a @ keys_t.T / 0.1, y_i2t) + F.cross_entropy(b @ keys_i.T / 0.1, y_t2i))
    assert torch.allclose(itc_loss(a, b, keys_i, keys_t, 0.1, pos, am, bm, alpha), ref, atol=1e-5)


def test_itc_positives_include_same_item_keys():
    pos = itc_positives(2, 5, 0, torch.tensor([7, 8]), torch.tensor([7, 8, -1, 8, 7]))
    assert pos.tolist() == [[True, False, False, False, True], [False, True, False, True, False]]


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


# --- ITM hard negatives, MLM masking ---
def test_hard_negatives_never_draw_the_positive_or_a_same_id_item():
    g = torch.Generator().manual_seed(7)
    sim = torch.randn(6, 6, generator=g) + 20 * torch.eye(6)  # the positive would win almost every draw
    index = torch.tensor([0, 1, 1, 2, 3, 3])  # items 1-2 and 4-5 share an id
    draws = torch.stack([sample_hard_negatives(sim, index, g) for _ in range(3000)])  # (3000, 6)
    same = index[draws] == index[None, :]
    assert not same.any()
    # the frequencies follow softmax(sim) over the allowed columns
    allowed = index[:, None] != index[None, :]
    expected = torch.softmax(sim.masked_fill(~allowed, -math.inf), 1)
    freq = F.one_hot(draws, 6).float().mean(0)
    assert (freq - expected).abs().max() < 0.04
    with pytest.raises(ValueError):
        sample_hard_negatives(sim[:2, :2], torch.tensor([5, 5]))


def test_mlm_masking_rates_and_specials():
    g = torch.Generator().manual_seed(8)
    b, length, vocab = 400, 40, 1000
    ids = torch.randint(5, vocab, (b, length), generator=g)
    ids[:, 0], ids[:, 30], ids[:, 31:] = 2, 3, 0  # [CLS] … [SEP] [PAD]…
    ids[:, 5] = 1  # an [UNK] token everywhere
    mask = ids != 0
    masked, labels = mask_tokens(ids, mask, vocab, 4, SPECIAL.values(), 0.15, g)
    chosen = labels != IGNORE
    assert not chosen[:, [0, 5, 30]].any() and not chosen[:, 31:].any()  # specials and padding never chosen
    assert torch.equal(masked[~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])
    assert abs(chosen.float().sum() / (b * 29) - 0.15) < 0.01  # 29 ordinary tokens per caption
    n = chosen.sum()
    to_mask = (masked[chosen] == 4).sum() / n
    kept = (masked[chosen] == ids[chosen]).sum() / n
    random = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(random - 0.1) < 0.015
    assert (masked[chosen & (masked != 4)] >= 5).all()  # random replacements are ordinary tokens


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
    assert torch.allclose(model.image_queue[:6], out["momentum_image_emb"])
    assert torch.allclose(model.text_queue[:6], out["momentum_text_emb"])
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
        assert out["itm_logits"].shape[0] == (4 if soft_mask else 3) * 6
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
    assert torch.isfinite(loss) and ("itc_image" in out) == bool(model.cfg.itc_weight)
    assert (model.mlm_head is None) == (not model.cfg.mlm_weight) and model.clip_on == bool(model.cfg.itc_weight)
    model.after_step(out)


def test_eval_forward_without_grad_keeps_the_soft_mask_pairs():
    model = tiny_model(soft_mask=True).eval()
    with torch.no_grad():
        out = model(tiny_batch())
    assert out["itm_logits"].shape == (24, 2) and torch.isfinite(total_loss(out))
    assert (out["index_queue"] == -1).all()  # the queue's (training) ids are not compared with another split's


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
        assert torch.equal(a[key], b[key])
    assert a["itc_alpha"] == b["itc_alpha"] > 0


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
    from polyalign.heads.gradcam import itm_gradcam

    model = tiny_model(soft_mask=True).eval()
    batch = tiny_batch()
    state = torch.get_rng_state()
    with torch.no_grad():
        a, b = model(batch), model(batch)
    assert torch.equal(torch.get_rng_state(), state)  # a validation pass mid-training keeps resumes exact
    assert torch.equal(a["itm_logits"], b["itm_logits"]) and torch.equal(a["mlm_labels"], b["mlm_labels"])
    maps = itm_gradcam(model, batch["image"], batch["text"], batch["text_mask"])
    assert maps.shape == (6, 10, 4) and (maps[~batch["text_mask"]] == 0).all()


def test_word_gradcam_picture(tmp_path):
    from polyalign.eval.gradcam_plot import plot_word_gradcam, upsample_map
    from polyalign.heads.gradcam import itm_gradcam

    up = upsample_map(torch.tensor([0.0, 1.0, 2.0, 3.0]), (8, 8))
    assert up.shape == (8, 8) and up.min() == 0 and up.max() == 1
    model, batch = tiny_model().eval(), tiny_batch()
    maps = itm_gradcam(model, batch["image"][:1], batch["text"][:1], batch["text_mask"][:1])[0]  # (L, 4)
    plot_word_gradcam(tmp_path / "cam.png", batch["image"][0], ["w1", "w2"], maps[1:3])
    assert (tmp_path / "cam.png").stat().st_size > 1000


FUSION_RUN = ["loss.weights.clip=0", "loss.weights.itc=1", "loss.weights.itm=1", "loss.weights.mlm=1",
              "model.image.kind=vit", "model.fusion.queue_size=64", "model.fusion.embed_dim=16", "eval.n_examples=0",
              "train.max_steps=3", "train.checkpoint_every=3", "eval.rerank_k=10"]


@pytest.mark.parametrize("extra,match", [
    (["loss.weights.clip=1"], r"loss terms itc.*clip belong to the dual encoder"),
    (["loss.weights.fdt=1"], r"fdt belong to the dual encoder"),
    (["train.grad_cache_chunk=8"], r"grad_cache_chunk is not supported by the fusion model"),
    (["eval.rerank_k=5"], r"eval.rerank_k must be 0 \(off\) or >= 10"),
    (["model.fusion.soft_mask=true", "loss.weights.itm=0"], r"model.fusion.soft_mask needs the ITM loss"),
])
def test_fusion_recipe_errors_name_the_key(tiny_overrides, extra, match):
    from polyalign.config import load_config
    from polyalign.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(None, tiny_overrides + FUSION_RUN + extra)


def test_fusion_run_trains_reranks_and_draws_gradcam(tmp_path, tiny_overrides):
    """loss.weights.{itc,itm,mlm} build the fusion model through the normal loop; evaluation adds ITM re-ranking;
    `polyalign inspect gradcam` draws per-word maps and scores the pointing game on shapes scenes."""
    import json

    from polyalign.cli import main
    from polyalign.config import load_config
    from polyalign.train.loop import train

    metrics = train(load_config(None, tiny_overrides + FUSION_RUN + ["model.fusion.soft_mask=true"]), tmp_path / "run",
                    show_progress=False)
    for key in ("retrieval/t2i_R@1", "retrieval_itm/t2i_R@1", "retrieval_itm/i2t_R@10", "zeroshot/colour_acc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert main(["inspect", "gradcam", str(tmp_path / "run"), "--items", "30", "--pictures", "2"]) == 0
    out = tmp_path / "run" / "inspect-gradcam"
    report = json.loads((out / "report.json").read_text())
    assert len(report["pictures"]) == 2 and all((out / p["png"]).stat().st_size > 1000 for p in report["pictures"])
    p = report["pointing"]
    assert p["trials"] >= 30 and 0.0 <= p["accuracy"] <= 1.0 and 0.0 < p["chance"] < 0.5
    assert sum(w["trials"] for w in p["by_word"].values()) == p["trials"]
