"""retrieval_any (every right answer counts) against a brute-force loop, the bootstrap intervals against a plain
resampling loop and the binomial width, and the concept ids a dataset gives."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from polyalign.eval.bootstrap import hit_interval, median_resamples, resample_histogram
from polyalign.eval.retrieval import rank_metrics, retrieval_metrics
from polyalign.eval.retrieval_any import concept_ids, relevance_pairs, retrieval_ranks


def brute_force_any(img, txt, owner, texts, concepts):
    """Ranks (0 = first) of the best relevant candidate by the definition, one pair at a time."""
    sim = (txt.double() @ img.double().T).tolist()
    owner = owner.tolist()
    norm = [" ".join(t.split()) for t in texts] if texts is not None else None
    n_img, n_txt = len(img), len(txt)
    caps_of = {i: {norm[j] for j in range(n_txt) if owner[j] == i} if norm else set() for i in range(n_img)}

    def relevant(j, i):
        same_text = norm is not None and norm[j] in caps_of[i]
        same_concept = concepts is not None and concepts[i] is not None and concepts[i] == concepts[owner[j]]
        return owner[j] == i or same_text or same_concept

    t2i = []
    for j in range(n_txt):
        best = max(sim[j][i] for i in range(n_img) if relevant(j, i))
        t2i.append(sum(sim[j][i] > best for i in range(n_img)))
    i2t = []
    for i in sorted(set(owner)):
        best = max(sim[j][i] for j in range(n_txt) if relevant(j, i))
        i2t.append(sum(sim[j][i] > best for j in range(n_txt)))
    return t2i, i2t


def random_case(seed, n_img=23, dim=6):
    g = torch.Generator().manual_seed(seed)
    n_caps = torch.randint(0, 4, (n_img,), generator=g)  # some images have no caption
    owner = torch.repeat_interleave(torch.arange(n_img), n_caps)
    vocab = ["a red circle", "a  red circle ", "a blue square", "two shapes", "a Red circle", "left", "right"]
    texts = [vocab[int(k)] for k in torch.randint(0, len(vocab), (len(owner),), generator=g)]
    concepts = [[None, "x", "y", "z"][int(k)] for k in torch.randint(0, 4, (n_img,), generator=g)]
    img = F.normalize(torch.randn(n_img, dim, generator=g), dim=1)
    txt = F.normalize(img[owner] + 1.5 * torch.randn(len(owner), dim, generator=g), dim=1)
    return img, txt, owner, texts, concepts


@pytest.mark.parametrize("seed,chunk_size", [(0, 1), (1, 4), (2, 1000), (3, 7)])
@pytest.mark.parametrize("use", ["both", "texts", "concepts"])
def test_any_ranks_match_brute_force(seed, chunk_size, use):
    img, txt, owner, texts, concepts = random_case(seed)
    texts, concepts = (texts if use != "concepts" else None), (concepts if use != "texts" else None)
    ranks = retrieval_ranks(img, txt, owner, 10, chunk_size, texts=texts, concepts=concepts)
    want_t2i, want_i2t = brute_force_any(img, txt, owner, texts, concepts)
    assert ranks["retrieval_any"]["t2i"].tolist() == want_t2i
    assert ranks["retrieval_any"]["i2t"].tolist() == want_i2t
    # the strict ranks are those of retrieval_metrics, and never better than the any-ranks
    strict = rank_metrics(ranks["retrieval"])
    assert strict == pytest.approx(retrieval_metrics(img, txt, owner, chunk_size=chunk_size))
    for d in ("t2i", "i2t"):
        assert (ranks["retrieval_any"][d].clamp(max=10) <= ranks["retrieval"][d]).all()
    got = rank_metrics(ranks["retrieval_any"], median=True)
    for k in (1, 5, 10):
        assert got[f"t2i_R@{k}"] == pytest.approx(np.mean(np.array(want_t2i) < k))
        assert got[f"i2t_R@{k}"] == pytest.approx(np.mean(np.array(want_i2t) < k))
    assert got["t2i_MdR"] == sorted(want_t2i)[(len(want_t2i) - 1) // 2] + 1


def test_the_random_case_has_shared_answers():
    img, txt, owner, texts, concepts = random_case(0)
    ranks = retrieval_ranks(img, txt, owner, 10, 5, texts=texts, concepts=concepts)
    strict, any_ = rank_metrics(ranks["retrieval"]), rank_metrics(ranks["retrieval_any"])
    assert strict["t2i_R@1"] < any_["t2i_R@1"] < 1 and strict["i2t_R@1"] < any_["i2t_R@1"] < 1


def test_relevance_pairs_by_hand():
    owner = torch.tensor([0, 0, 1, 2, 2, 3])
    texts = ["a", "b", " a ", "c", "d", "x"]
    pj, pi = relevance_pairs(owner, 5, texts, ["k", None, None, "k", "k"])  # item 4 has no caption
    want = {0: {0, 1, 3, 4}, 1: {0, 3, 4}, 2: {0, 1}, 3: {2}, 4: {2}, 5: {0, 3, 4}}
    assert {j: {i for jj, i in zip(pj.tolist(), pi.tolist()) if jj == j} for j in want} == want
    assert pj.tolist() == sorted(pj.tolist())
    assert relevance_pairs(owner, 5)[1].tolist() == owner.tolist()  # no texts, no concepts: the own items


def styles_case(n_concepts=4, n_styles=3, dim=8, captions_shared=True):
    """Emoji-like: every concept drawn in every style; a concept's images share every caption (or, without
    ``captions_shared``, only a concept id). A caption embeds at its concept, an image near it."""
    g = torch.Generator().manual_seed(0)
    concept = F.normalize(torch.randn(n_concepts, dim, generator=g), dim=1)
    items = [(c, s) for s in range(n_styles) for c in range(n_concepts)]
    img = F.normalize(torch.stack([concept[c] + 0.1 * torch.randn(dim, generator=g) for c, _ in items]), dim=1)
    texts, owner = [], []
    for i, (c, s) in enumerate(items):
        for t in range(2):
            texts.append(f"concept {c} caption {t}" + ("" if captions_shared else f" style {s}"))
            owner.append(i)
    owner = torch.tensor(owner)
    txt = concept[torch.tensor([items[i][0] for i in owner.tolist()])]
    return img, txt, owner, texts, [f"c{c}" for c, _ in items]


def test_strict_recall_is_capped_by_the_styles_and_any_recall_is_not():
    img, txt, owner, texts, concepts = styles_case()
    by_text = rank_metrics(retrieval_ranks(img, txt, owner, 10, 5, texts=texts)["retrieval_any"], median=True)
    ranks = retrieval_ranks(img, txt, owner, 10, 5, texts=texts, concepts=concepts)
    strict, any_ = rank_metrics(ranks["retrieval"]), rank_metrics(ranks["retrieval_any"], median=True)
    assert strict["t2i_R@1"] == pytest.approx(1 / 3)  # one caption text, three images: one of them is first
    assert any_["t2i_R@1"] == any_["i2t_R@1"] == by_text["t2i_R@1"] == 1.0 and any_["t2i_MdR"] == 1.0
    # captions that differ per style: only the concept id makes the other styles right
    img, txt, owner, texts, concepts = styles_case(captions_shared=False)
    text_only = rank_metrics(retrieval_ranks(img, txt, owner, 10, 5, texts=texts)["retrieval_any"])
    with_concepts = rank_metrics(retrieval_ranks(img, txt, owner, 10, 5, texts=texts,
                                                 concepts=concepts)["retrieval_any"])
    assert text_only["t2i_R@1"] == pytest.approx(1 / 3) and with_concepts["t2i_R@1"] == 1.0


def test_bf16_any_ranks_agree_with_fp32():
    g = torch.Generator().manual_seed(1)
    owner = torch.arange(200).repeat_interleave(2)
    img = F.normalize(torch.randn(200, 32, generator=g), dim=1)
    txt = F.normalize(img[owner] + 0.5 * torch.randn(400, 32, generator=g), dim=1)
    texts = [f"t{int(i) % 150}" for i in owner]  # some texts shared by two images
    fp32 = rank_metrics(retrieval_ranks(img, txt, owner, 10, 64, texts=texts)["retrieval_any"])
    bf16 = rank_metrics(retrieval_ranks(img, txt, owner, 10, 64, torch.bfloat16, texts=texts)["retrieval_any"])
    assert 0.2 < fp32["t2i_R@1"] < 1
    assert bf16 == pytest.approx(fp32, abs=0.03)


def test_bootstrap_interval_of_a_bernoulli_mean():
    hits = np.array([1] * 30 + [0] * 70)  # p = 0.3, n = 100
    ci = hit_interval("x", hits, 2000, seed=0)
    lo, hi = ci["x_ci_low"], ci["x_ci_high"]
    assert lo < 0.3 < hi
    normal = 2 * 1.96 * np.sqrt(0.3 * 0.7 / 100)  # 0.18: the binomial width
    assert 0.8 * normal < hi - lo < 1.2 * normal
    wider = hit_interval("x", hits[::4], 2000, seed=0)  # a quarter of the queries: about twice as wide
    assert 1.6 < (wider["x_ci_high"] - wider["x_ci_low"]) / (hi - lo) < 2.5
    assert hit_interval("x", hits, 2000, seed=0) == ci and hit_interval("x", hits, 2000, seed=1) != ci
    assert hit_interval("x", hits, 0) == {}
    assert hit_interval("x", np.ones(50), 500) == {"x_ci_low": 1.0, "x_ci_high": 1.0}


def test_histogram_resampling_matches_plain_resampling():
    rng = np.random.default_rng(3)
    ranks = rng.geometric(0.3, size=400) - 1  # 0-based ranks
    values, counts = resample_histogram(ranks, 4000, seed=0, tag="t")
    assert (counts.sum(axis=1) == 400).all() and counts.shape == (4000, len(values))
    plain = ranks[rng.integers(0, 400, size=(4000, 400))]  # (B, n): the textbook bootstrap
    for k in (1, 5):
        ours = np.quantile(counts[:, values < k].sum(axis=1) / 400, [0.025, 0.975])
        theirs = np.quantile((plain < k).mean(axis=1), [0.025, 0.975])
        assert ours == pytest.approx(theirs, abs=0.012)
    lower_median = np.sort(plain, axis=1)[:, (400 - 1) // 2]  # the textbook bootstrap of the (lower) median
    ours = median_resamples(ranks, 4000, seed=0, tag="m")
    assert np.mean(ours) == pytest.approx(np.mean(lower_median), abs=0.05)
    for q in (0.025, 0.5, 0.975):
        assert np.quantile(ours, q) == pytest.approx(np.quantile(lower_median, q), abs=1)
    assert median_resamples(ranks, 50, seed=0, tag="m").tolist() == ours[:50].tolist()  # seeded
    # 4 queries: the lower median of a resample is at position 1; P(median <= 0) = P(Bin(4, 1/4) >= 2) = 67/256
    small = median_resamples(np.array([0, 3, 5, 9]), 20000, seed=1)
    assert set(small) <= {0.0, 3.0, 5.0, 9.0} and np.mean(small == 0) == pytest.approx(67 / 256, abs=0.01)
    assert np.mean(small == 9) == pytest.approx(13 / 256, abs=0.006)  # P(at least 3 of 4 draws are 9)


def test_rank_metrics_intervals_contain_the_figures_and_are_seeded():
    img, txt, owner, texts, concepts = random_case(4, n_img=60)
    ranks = retrieval_ranks(img, txt, owner, 10, 16, texts=texts, concepts=concepts)["retrieval_any"]
    got = rank_metrics(ranks, median=True, n_resamples=500, tag="retrieval_any/")
    figures = [k for k in got if not k.endswith(("_ci_low", "_ci_high"))]
    assert figures == [f"{d}_R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)] + ["rsum", "t2i_MdR", "i2t_MdR"]
    for key in figures:
        assert got[f"{key}_ci_low"] <= got[key] <= got[f"{key}_ci_high"], key
    assert got["t2i_R@1_ci_low"] < got["t2i_R@1_ci_high"]
    assert rank_metrics(ranks, median=True, n_resamples=500, tag="retrieval_any/") == got
    assert rank_metrics(ranks, n_resamples=500, seed=1)["t2i_R@1_ci_low"] != got["t2i_R@1_ci_low"] or \
        rank_metrics(ranks, n_resamples=500, seed=1)["t2i_R@1_ci_high"] != got["t2i_R@1_ci_high"]


def _manifest(tmp_path, rows):
    for r in rows:
        if r["image"] != "missing.png":
            Image.new("RGB", (8, 8), "red").save(tmp_path / r["image"])
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_concept_ids_of_a_manifest_and_of_row_datasets(tmp_path):
    from polyalign.data.manifest import ManifestDataset

    rows = [{"image": f"{i}.png", "caption": "x", "concept_id": c} for i, c in enumerate(["1f600", "1f600", ""])]
    rows.append({"image": "3.png", "caption": "y"})
    ds = ManifestDataset(_manifest(tmp_path, rows), image_size=8, show_progress=False)
    assert concept_ids(ds) == ["1f600", "1f600", None, None]
    bad = ManifestDataset(_manifest(tmp_path, rows + [{"image": "missing.png", "caption": "z"}]), image_size=8,
                          show_progress=False, max_bad_fraction=0.5)
    assert bad.skip_report.n_skipped == 1
    assert concept_ids(bad) == ["1f600", "1f600", None, None]  # the dataset's accessor: right after a skipped row

    class Rows:
        rows = [{"concept_id": "a"}, {"concept_id": 7}, {}]

        def __len__(self):
            return 3

    class Accessor:
        def __len__(self):
            return 2

        def concept_id(self, i):
            return "c" if i else None

    assert concept_ids(Rows()) == ["a", "7", None] and concept_ids(Accessor()) == [None, "c"]
    assert concept_ids(type("Plain", (), {"__len__": lambda self: 2})()) is None


def test_the_examples_picture_frames_every_right_answer_green(monkeypatch, tmp_path):
    import polyalign.eval.run as run

    class Tiny:  # items 0 and 1: one concept in two styles; item 2 shares the caption "star" with item 0
        caps = [["smile", "star"], ["smile"], ["star"], ["moon"]]
        concepts = ["a", "a", None, "b"]

        def __len__(self):
            return 4

        def captions(self, i):
            return self.caps[i]

        def concept_id(self, i):
            return self.concepts[i]

        def image(self, i):
            return torch.zeros(3, 4, 4, dtype=torch.uint8)

    texts, owner = ["smile", "star", "smile", "star", "moon"], torch.tensor([0, 0, 1, 2, 3])
    img = torch.eye(4)
    txt = torch.eye(4)[owner] + 0.01  # every caption scores its own item first
    got = {}
    monkeypatch.setattr(run, "plot_retrieval_examples", lambda path, q, ims, ok: got.update(q=q, ok=ok))
    run._retrieval_examples(tmp_path / "x.png", Tiny(), texts, owner, txt, img, 4, 8192)
    ds = Tiny()
    firsts = [0, 2, 3, 4]  # the first caption of each item: the picture's queries
    assert got["q"] == [texts[j] for j in firsts]
    for j, row, flags in zip(firsts, torch.topk(txt @ img.T, 4, dim=1).indices[firsts], got["ok"]):
        query, own = texts[j], int(owner[j])
        expect = [i == own or query in ds.caps[i] or (ds.concepts[i] is not None and ds.concepts[i] == ds.concepts[own])
                  for i in row.tolist()]
        assert flags == expect
    assert sum(map(sum, got["ok"])) == 7  # 2 + 2 + 2 + 1 right answers in the top 4, not only the 4 own images
