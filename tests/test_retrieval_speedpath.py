"""The tiled counting sweep of positive_ranks / retrieval_metrics against a naive full-matrix reference, on small
data with exact ties, several captions per image and images without captions."""
from __future__ import annotations

import pytest
import torch

import polyalign.eval.retrieval as retrieval
from polyalign.eval.retrieval import positive_ranks, retrieval_metrics


def naive_ranks(txt, img, owner, k):
    """Full (M, N) matrix in float64 (the data are dyadic, so every product is exact)."""
    s = txt.double() @ img.double().T
    pos = s.gather(1, owner[:, None])
    t2i = (s > pos).sum(1)
    if k is not None:  # a capped rank is a position: an equal image with a lower index goes first
        t2i = t2i + ((s == pos) & (torch.arange(img.shape[0])[None, :] < owner[:, None])).sum(1)
    own = owner[:, None] == torch.arange(img.shape[0])[None, :]
    best = s.masked_fill(~own, -torch.inf).amax(0)
    i2t = ((s > best[None, :]) & ~own).sum(0)
    if k is None:
        return t2i, i2t
    return t2i.clamp(max=k), i2t.clamp(max=k)


def dyadic_data(seed, n=240, m=600, d=32):
    """Multiples of 1/64: exact in fp32 whatever the summation order, with duplicated images and captions."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(-64, 65, (n, d), generator=g).float() / 64
    img[::9] = img[4]  # exact ties among images
    owner = torch.randint(0, n - 15, (m,), generator=g)  # several captions per image; the last images have none
    txt = ((img[owner] * 0.5 + torch.randint(-24, 25, (m, d), generator=g).float() / 64).clamp(-1, 1) * 64).round() / 64
    txt[::7] = txt[2]  # exact ties among captions of different images
    return txt, img, owner


@pytest.fixture(params=[(256, 4096), (16, 48)], ids=["default-tiles", "small-tiles"])
def tiles(request, monkeypatch):
    monkeypatch.setattr(retrieval, "_TILE_ROWS", request.param[0])
    monkeypatch.setattr(retrieval, "_TILE_COLS", request.param[1])
    return request.param


@pytest.mark.parametrize("k", [1, 5, 10, None])
@pytest.mark.parametrize("chunk_size", [7, 8192])
def test_counts_match_full_matrix_reference(tiles, k, chunk_size):
    for seed in range(3):
        txt, img, owner = dyadic_data(seed)
        t2i, i2t = positive_ranks(txt, img, owner, k, chunk_size)
        want_t2i, want_i2t = naive_ranks(txt, img, owner, k)
        assert torch.equal(t2i, want_t2i), (seed, (t2i != want_t2i).sum())
        assert torch.equal(i2t, want_i2t), (seed, (i2t != want_i2t).sum())


def test_recall_matches_reference_with_ties(tiles):
    txt, img, owner = dyadic_data(7)
    got = retrieval_metrics(img, txt, owner, ks=(1, 5, 10), chunk_size=50)
    t2i, i2t = naive_ranks(txt, img, owner, 10)
    captioned = torch.unique(owner)
    for kk in (1, 5, 10):
        assert got[f"t2i_R@{kk}"] == pytest.approx((t2i < kk).double().mean().item())
        assert got[f"i2t_R@{kk}"] == pytest.approx((i2t[captioned] < kk).double().mean().item())


def test_duplicates_of_non_dyadic_embeddings_are_ties(tiles):
    """Duplicated float embeddings (whose products round differently in a row-wise sum and in a matmul) are ties:
    the lower image index goes first, and an equal caption of another image never counts."""
    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1)
    img = torch.cat([img, img])  # image i + 50 is image i
    owner = torch.arange(50)
    txt = img[:50] + 0.01 * torch.randn(50, 16, generator=g)
    t2i, i2t = positive_ranks(txt, img, owner, 10)
    assert torch.equal(t2i, torch.zeros(50, dtype=torch.long))  # the twin has a higher index: it comes second
    t2i, _ = positive_ranks(txt, img, owner + 50, 10)
    assert torch.equal(t2i, torch.ones(50, dtype=torch.long))  # the twin (lower index) goes first
    txt2 = torch.cat([txt, txt])  # every image's caption also belongs to its twin
    t2i, i2t = positive_ranks(txt2, img, torch.cat([owner, owner + 50]), 10)
    assert torch.equal(i2t, torch.zeros(100, dtype=torch.long))  # an equal caption of another image never counts


def test_observers_see_every_block_and_match():
    txt, img, owner = dyadic_data(1)
    seen = []

    class Observer:
        def update(self, start, sims):
            seen.append((start, sims.shape[0]))
            assert sims.shape[1] == img.shape[0]
            torch.testing.assert_close(sims, txt[start : start + sims.shape[0]] @ img.T)

    t2i, i2t = positive_ranks(txt, img, owner, 10, 64, None, [Observer()])
    assert [s for s, _ in seen] == list(range(0, txt.shape[0], 64)) and sum(c for _, c in seen) == txt.shape[0]
    want = naive_ranks(txt, img, owner, 10)
    assert torch.equal(t2i, want[0]) and torch.equal(i2t, want[1])


def test_bf16_products_close_to_fp32():
    g = torch.Generator().manual_seed(5)
    img = torch.nn.functional.normalize(torch.randn(400, 32, generator=g), dim=1)
    owner = torch.arange(400).repeat_interleave(2)
    txt = torch.nn.functional.normalize(img[owner] + 0.3 * torch.randn(800, 32, generator=g), dim=1)
    fp32 = positive_ranks(txt, img, owner, 10)
    bf16 = positive_ranks(txt, img, owner, 10, dtype=torch.bfloat16)
    for a, b in zip(fp32, bf16):
        assert (a == b).float().mean() > 0.9


def test_default_fp32_products_on_cpu_go_through_onednn():
    mm = retrieval._matmul(torch.float32, torch.device("cpu"))
    a, b = torch.randn(5, 8), torch.randn(7, 8)
    torch.testing.assert_close(mm(a, b), a @ b.T)
