import math

import torch
import torch.nn.functional as F

from polyalign.losses.contrastive import info_nce


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
