"""Tests of tag vocabularies, per-tag AP / mAP against scikit-learn, the tagging probe, evaluate()'s tagging keys."""
import logging

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from torch import nn

from polyalign.data.shapes import ShapesDataset
from polyalign.data.tags import multi_hot, tag_matrix, tag_vocabulary
from polyalign.eval import evaluate
from polyalign.eval.tagging import average_precision, mean_average_precision, scored_tags, tagging_probe


def test_tag_vocabulary_counts_once_per_item_orders_and_filters():
    items = [["b", "a", "a"], ["a", "c"], ["c", "b"], ["d"], ["c"], ["b"]]
    # per item: a 2, b 3, c 3, d 1 (the repeated "a" of item 0 counts once)
    assert tag_vocabulary(items, min_count=1) == ["b", "c", "a", "d"]  # ties (b, c) alphabetical
    assert tag_vocabulary(items, min_count=2) == ["b", "c", "a"]
    assert tag_vocabulary(items, min_count=3) == ["b", "c"]
    assert tag_vocabulary(items, min_count=1, max_tags=2) == ["b", "c"]
    assert tag_vocabulary(iter(items)) == []  # default min_count=5; a generator is fine
    assert tag_vocabulary([["x"]] * 5) == ["x"]


def test_multi_hot_and_tag_matrix():
    index = {"red": 0, "blue": 1, "star": 2}
    assert multi_hot(["star", "red", "unknown"], index).tolist() == [1.0, 0.0, 1.0]
    assert multi_hot([], index).dtype == torch.float32 and multi_hot([], index).tolist() == [0.0, 0.0, 0.0]

    class Tagged:
        def __len__(self):
            return 3

        def tags(self, i):
            return [["red"], ["blue", "star"], ["green"]][i]

    m = tag_matrix(Tagged(), ["red", "blue", "star"])
    assert m.dtype == torch.float32 and m.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    assert tag_matrix(Tagged(), ["star"], indices=[1, 0]).tolist() == [[1], [0]]


def test_average_precision_matches_sklearn_without_and_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(60, 7, generator=g)
    targets = (torch.rand(60, 7, generator=g) < 0.3).float()
    targets[0] = 1  # every column has a positive
    for s in (scores, torch.round(scores * 2) / 2):  # the second has many ties
        want = [average_precision_score(targets[:, t].numpy(), s[:, t].numpy()) for t in range(7)]
        assert torch.allclose(average_precision(s, targets), torch.tensor(want, dtype=torch.float64), atol=1e-12)


def test_ties_do_not_depend_on_item_order():
    scores = torch.tensor([[1.0], [1.0], [0.0]])
    # one positive tied with one negative at the top: precision at the group's end, 1/2, whatever the order
    assert average_precision(scores, torch.tensor([[1.0], [0.0], [0.0]])).item() == 0.5
    assert average_precision(scores, torch.tensor([[0.0], [1.0], [0.0]])).item() == 0.5


def test_perfect_reversed_and_missing_positives():
    n = 10
    targets = torch.zeros(n, 3)
    targets[:3, 0] = 1  # tag 0: 3 positives; tag 1: one positive, the last item; tag 2: none
    targets[n - 1, 1] = 1
    perfect = targets.clone()
    assert mean_average_precision(perfect, targets) == 1.0
    reversed_scores = torch.linspace(1, 0, n)[:, None].expand(n, 3)  # item 0 ranked first, item n-1 last
    ap = average_precision(reversed_scores, targets)
    assert ap[0].item() == 1.0 and ap[1].item() == pytest.approx(1 / n) and torch.isnan(ap[2])
    assert mean_average_precision(reversed_scores, targets) == pytest.approx((1 + 1 / n) / 2)  # tag 2 excluded


def test_mean_average_precision_rejects_no_positives():
    with pytest.raises(ValueError, match="none of the 4 tags has a positive"):
        mean_average_precision(torch.randn(5, 4), torch.zeros(5, 4))


def synthetic_tags(n, w, g, noise=0.3):
    """Multi-label data: 6 tags, tag t on when feature t of a 16-d Gaussian, plus noise, exceeds 0.5."""
    x = torch.randn(n, 16, generator=g)
    y = ((x[:, :6] + noise * torch.randn(n, 6, generator=g)) @ w > 0.5).float()
    return 3 * x + 7, y  # an offset and scale the probe's standardisation removes


def test_tagging_probe_separable_and_random_labels():
    g = torch.Generator().manual_seed(0)
    w = torch.eye(6)
    (x_tr, y_tr), (x_te, y_te) = synthetic_tags(400, w, g, noise=0.0), synthetic_tags(200, w, g, noise=0.0)
    assert tagging_probe(x_tr, y_tr, x_te, y_te) > 0.95
    rand_tr = (torch.rand(400, 6, generator=g) < 0.3).float()
    rand_te = (torch.rand(200, 6, generator=g) < 0.3).float()
    chance = mean_average_precision(torch.zeros(200, 6), rand_te)  # all tied: AP = prevalence
    assert abs(tagging_probe(x_tr, rand_tr, x_te, rand_te) - chance) < 0.08


def test_tagging_probe_does_not_depend_on_the_feature_scale():
    # a randomly initialised EfficientNet in eval mode gives tiny features: the probe must read them as it reads
    # the same features at unit scale (an absolute std floor of 1e-6 turned them into chance mAP)
    g = torch.Generator().manual_seed(2)
    (x_tr, y_tr), (x_te, y_te) = synthetic_tags(300, torch.eye(6), g), synthetic_tags(150, torch.eye(6), g)
    unit = tagging_probe(x_tr, y_tr, x_te, y_te)
    assert unit > 0.8
    for scale in (1e-10, 1e-12, 1e4):
        assert tagging_probe(x_tr * scale, y_tr, x_te * scale, y_te) == pytest.approx(unit, abs=0.02)


def test_tagging_probe_skips_tags_unseen_in_train_and_is_deterministic():
    g = torch.Generator().manual_seed(1)
    (x_tr, y_tr), (x_te, y_te) = synthetic_tags(300, torch.eye(6), g), synthetic_tags(100, torch.eye(6), g)
    y_tr[:, 5] = 0  # never positive in train: not fitted, not scored
    y_te[:, 4] = 0  # never positive in test: fitted, not scored
    assert scored_tags(y_tr, y_te).tolist() == [True] * 4 + [False] * 2
    first = tagging_probe(x_tr, y_tr, x_te, y_te)
    assert first == tagging_probe(x_tr, y_tr, x_te, y_te)
    assert first == pytest.approx(tagging_probe(x_tr, y_tr[:, :5], x_te, y_te[:, :5]), abs=1e-4)
    with pytest.raises(ValueError, match="has a positive in both"):
        tagging_probe(x_tr, y_tr[:, 5:], x_te, y_te[:, 5:])


class GridModel(nn.Module):
    """Image features: 4×4 average-pooled RGB (48-d); text: a hashed bag of words. Counts embedded images."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))
        self.n_featurised = 0

    def image_features(self, images):
        self.n_featurised += len(images)
        return F.adaptive_avg_pool2d(images, 4).flatten(1)  # (B, 48)

    def encode_image(self, images):
        return F.normalize(F.adaptive_avg_pool2d(images, 4).flatten(1), dim=1)

    def encode_text(self, ids, mask):
        return F.normalize(F.one_hot(ids % 48, 48).float().mul(mask[..., None]).sum(dim=1) + 1e-3, dim=1)


class HeadModel(GridModel):
    """A tag head scoring "red" by the red channel and "blue" by the blue one."""

    tag_names = ["red", "blue"]

    def tag_logits(self, images):
        means = images.mean(dim=(2, 3))  # (B, 3)
        return means[:, [0, 2]] - means.mean(dim=1, keepdim=True)


def hash_tokenizer(texts):
    rows = [[sum(map(ord, w)) + 1 for w in t.split()] for t in texts]
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (length - len(r)) for r in rows])
    return ids, mask


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset("train", 160, image_size=16, seed=0), ShapesDataset("test", 60, image_size=16, seed=0)


def test_evaluate_reports_tagging_on_shapes_and_embeds_features_once(shapes):
    train, test = shapes
    model = GridModel()
    results = evaluate(model, hash_tokenizer, train, test, batch_size=32, zeroshot_fields=[], probe_field="count",
                       probe_max_train=100, n_examples=0)
    assert "probe/count_acc" in results and "tagging/head_mAP" not in results
    assert 0.0 < results["tagging/probe_mAP"] <= 1.0
    vocab = tag_vocabulary(train.tags(i) for i in range(len(train)))
    assert 0 < results["tagging/n_tags"] <= len(vocab) and isinstance(results["tagging/n_tags"], float)
    assert model.n_featurised == 100 + len(test)  # the linear and tagging probes share the same features


def test_evaluate_reports_tag_head_map(shapes):
    train, test = shapes
    results = evaluate(HeadModel(), hash_tokenizer, train, test, batch_size=32, zeroshot_fields=[], n_examples=0)
    assert 0.0 <= results["tagging/head_mAP"] <= 1.0
    red_blue = tag_matrix(test, HeadModel.tag_names)
    with torch.no_grad():
        images = torch.stack([test.image(i) for i in range(len(test))]).float() / 255
        want = mean_average_precision(HeadModel().tag_logits(images), red_blue)
    assert results["tagging/head_mAP"] == pytest.approx(want)


class Untagged(ShapesDataset):
    def tags(self, i):
        return []


def test_evaluate_skips_tagging_without_tags(caplog):
    train, test = Untagged("train", 40, image_size=16), Untagged("test", 20, image_size=16)
    with caplog.at_level(logging.WARNING, logger="polyalign.eval.run"):
        results = evaluate(HeadModel(), hash_tokenizer, train, test, zeroshot_fields=[], n_examples=0)
    assert not any(k.startswith("tagging/") for k in results)
