import math

import pytest
import torch
import torch.nn.functional as F

from polyalign.losses.contrastive import info_nce
from polyalign.models.outputs import DualOutput


def naive_info_nce(a, b, scale):
    """Loop over rows: -log softmax of the matching pair, both directions."""
    B = a.shape[0]
    total = 0.0
    for i in range(B):
        li = torch.stack([scale * a[i] @ b[j] for j in range(B)])
        lt = torch.stack([scale * b[i] @ a[j] for j in range(B)])
        total = total - torch.log_softmax(li, 0)[i] - torch.log_softmax(lt, 0)[i]
    return total / (2 * B)


def test_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(7, 5, generator=g), dim=-1)
    b = F.normalize(torch.randn(7, 5, generator=g), dim=-1)
    assert torch.allclose(info_nce(a, b, 3.0), naive_info_nce(a, b, 3.0), atol=1e-5)


def test_identical_embeddings_large_scale_is_near_zero():
    a = F.normalize(torch.randn(16, 32), dim=-1)
    assert info_nce(a, a, 100.0).item() < 1e-3


def test_zero_scale_is_log_batch():
    a, b = F.normalize(torch.randn(10, 4), dim=-1), F.normalize(torch.randn(10, 4), dim=-1)
    assert math.isclose(info_nce(a, b, 0.0).item(), math.log(10), rel_tol=1e-6)


def test_symmetric_in_arguments():
    a, b = F.normalize(torch.randn(9, 6), dim=-1), F.normalize(torch.randn(9, 6), dim=-1)
    assert torch.allclose(info_nce(a, b, 5.0), info_nce(b, a, 5.0), atol=1e-6)


def test_gradient_flows_to_both_sides_and_scale():
    a = torch.randn(6, 4, requires_grad=True)
    b = torch.randn(6, 4, requires_grad=True)
    s = torch.tensor(2.0, requires_grad=True)
    info_nce(F.normalize(a, dim=-1), F.normalize(b, dim=-1), s).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0 and s.grad.abs() > 0


@pytest.mark.parametrize("batch,tile", [(37, 8), (64, 64), (50, 7), (5, 256)])
def test_tiled_equals_dense_in_value_and_gradients(batch, tile):
    from polyalign.losses.tiled import tiled_info_nce

    g = torch.Generator().manual_seed(batch)
    a0 = F.normalize(torch.randn(batch, 16, generator=g), dim=1)
    b0 = F.normalize(a0 + 0.5 * torch.randn(batch, 16, generator=g), dim=1)
    results = []
    for loss_fn in (info_nce, lambda a, b, s: tiled_info_nce(a, b, s, tile=tile)):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        s = torch.tensor(14.0, requires_grad=True)
        loss = loss_fn(a, b, s)
        results.append((loss, *torch.autograd.grad(loss * 3.0, [a, b, s])))  # a non-unit upstream gradient
    for dense, tiled in zip(*results):
        assert torch.allclose(dense, tiled, atol=1e-5, rtol=1e-5)


def test_tiled_cross_entropy_with_offset_equals_dense_rows():
    from polyalign.losses.tiled import tiled_cross_entropy

    g = torch.Generator().manual_seed(1)
    keys = F.normalize(torch.randn(24, 8, generator=g), dim=1).requires_grad_()
    q = F.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_()
    dense = F.cross_entropy(10.0 * q @ keys.T, torch.arange(6) + 12)
    tiled = tiled_cross_entropy(q, keys, 10.0, offset=12, tile=4)
    assert torch.allclose(dense, tiled, atol=1e-6)
    for x, y in zip(torch.autograd.grad(dense, [q, keys]), torch.autograd.grad(tiled, [q, keys])):
        assert torch.allclose(x, y, atol=1e-6)


def test_tiled_loss_is_selected_by_config():
    from polyalign.config import LossConfig
    from polyalign.losses.objective import Objective

    g = torch.Generator().manual_seed(2)
    out = DualOutput(first_emb=F.normalize(torch.randn(20, 8, generator=g), dim=1),
                     second_emb=F.normalize(torch.randn(20, 8, generator=g), dim=1), logit_scale=torch.tensor(5.0))
    dense = Objective(LossConfig())(out)["loss"]
    tiled = Objective(LossConfig(contrastive="tiled", tile=3))(out)["loss"]
    assert torch.allclose(dense, tiled, atol=1e-6)


def _vit_model(dropout):
    from polyalign.config import load_config
    from polyalign.models.build import build_model

    cfg = load_config(None, ["model.image.kind=vit", "model.image.width=16", "model.image.layers=1",
                             "model.image.heads=2", "model.image.patch_size=4", "data.image_size=8",
                             "model.text.width=16", "model.text.layers=1", "model.text.heads=2",
                             "model.embed_dim=8", f"model.image.dropout={dropout}", f"model.text.dropout={dropout}"])
    torch.manual_seed(0)
    return build_model(cfg.model, 8, vocab_size=30)


@pytest.mark.parametrize("chunk", [4, 5, 12])
def test_grad_cache_gives_the_big_batch_gradients_with_dropout(chunk):
    """Reference: one graph over the whole batch whose dropout masks are drawn sub-batch by sub-batch from the
    same RNG states; grad cache must match it, and without dropout it matches the plain big batch."""
    from polyalign.losses.objective import Objective
    from polyalign.train.gradcache import grad_cache_step

    g = torch.Generator().manual_seed(3)
    batch = {"image": torch.rand(12, 3, 8, 8, generator=g), "text": torch.randint(0, 30, (12, 6), generator=g),
             "text_mask": torch.ones(12, 6, dtype=torch.bool)}
    objective = Objective({"clip": 1.0})

    def grads_of(model):
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = _vit_model(0.2).train()
    torch.manual_seed(7)
    outs = [model({k: v[s : s + chunk] for k, v in batch.items()}) for s in range(0, 12, chunk)]
    full = {k: torch.cat([getattr(o, k) for o in outs]) for k in ("first_emb", "second_emb")}
    want_loss = objective(DualOutput(**full, logit_scale=outs[0].logit_scale))["loss"]
    want_loss.backward()
    want, want_rng = grads_of(model), torch.get_rng_state()

    model = _vit_model(0.2).train()
    torch.manual_seed(7)
    got_loss = grad_cache_step(model, batch, objective, chunk)["loss"]
    assert torch.allclose(got_loss, want_loss.detach(), atol=1e-6)
    assert torch.equal(torch.get_rng_state(), want_rng)  # the RNG stream continues as after one pass
    got = grads_of(model)
    assert got.keys() == want.keys() and "logit_scale" in got
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5, rtol=1e-4), name

    model = _vit_model(0.0)
    objective(model(batch))["loss"].backward()
    plain = grads_of(model)
    model = _vit_model(0.0)
    grad_cache_step(model, batch, objective, chunk)
    for name, value in grads_of(model).items():
        assert torch.allclose(value, plain[name], atol=1e-5, rtol=1e-4), name
