"""The fusion model's pure loss functions (losses/fusion.py, arXiv 2107.07651 and 2304.00719): focal ITC against
plain ITC and its closed form, distillation targets, hard-negative sampling and MLM masking statistics."""
import math

import pytest
import torch
import torch.nn.functional as F

from polyalign.losses.fusion import focal_soft_cross_entropy, itc_loss, itc_positives
from polyalign.models.sampling import IGNORE, mask_tokens, sample_hard_negatives
from polyalign.losses.contrastive import info_nce

SPECIAL = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
VOCAB = 40


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
