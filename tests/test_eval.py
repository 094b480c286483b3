"""Tests of polyalign.eval: chunked retrieval vs a dense reference, zero-shot, linear probe, evaluate() end to end."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polyalign.data.base import ImageTextDataset, SkipReport
from polyalign.eval import (
    embed_images,
    evaluate,
    linear_probe,
    retrieval_metrics,
    topk_chunked,
    zeroshot_accuracy,
    zeroshot_classifier,
)

COLORS = ["red", "green", "blue"]
SIZES = ["small", "large"]
VOCAB = COLORS + SIZES  # one embedding axis per word; every other word is ignored


class ToyDataset(ImageTextDataset):
    """Flat-coloured 8×8 images: the colour channel names the colour, its brightness the size."""

    label_names = {"color": COLORS, "size": SIZES}
    prompt_templates = {"color": ["a {} thing", "a photo of a {} object"], "size": ["a {} thing"]}

    def __init__(self, n=40, offset=0):
        self.n, self.offset, self.skip_report = n, offset, SkipReport()

    def __len__(self):
        return self.n

    def _classes(self, i):
        return (i + self.offset) % 3, ((i + self.offset) // 3) % 2

    def image(self, i):
        color, size = self._classes(i)
        img = torch.randint(0, 20, (3, 8, 8), generator=torch.Generator().manual_seed(i))
        img[color] += 230 if size else 100
        return img.to(torch.uint8)

    def captions(self, i):
        color, size = self._classes(i)
        return [f"a {SIZES[size]} {COLORS[color]} thing", f"{COLORS[color]} and {SIZES[size]}", "one more"][: 1 + i % 3]

    def labels(self, i):
        color, size = self._classes(i)
        return {"color": color} if i % 4 == 3 else {"color": color, "size": size}  # some items lack "size"


class ToyModel(nn.Module):
    """An oracle for ToyDataset: images and texts both map to (colour one-hot, size one-hot), normalised."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))
        self.modes_seen = set()

    def image_features(self, images):
        self.modes_seen.add(self.training)
        return images.mean(dim=(2, 3))  # (B, 3)

    def encode_image(self, images):
        m = self.image_features(images)
        size = F.one_hot((m.max(dim=1).values > 0.7).long(), 2)
        return F.normalize(torch.cat([F.one_hot(m.argmax(dim=1), 3), size], dim=1).float(), dim=1)

    def encode_text(self, ids, mask):
        self.modes_seen.add(self.training)
        words = F.one_hot(ids, len(VOCAB) + 1)[..., 1:] * mask[..., None]  # id 0: unknown word
        return F.normalize(words.sum(dim=1).float(), dim=1)


def toy_tokenizer(texts):
    rows = [[VOCAB.index(w) + 1 if w in VOCAB else 0 for w in t.split()] for t in texts]
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (length - len(r)) for r in rows])
    return ids, mask


def naive_retrieval(img, txt, txt_to_img, ks):
    """Dense reference: rank = number of keys scoring strictly above the best correct one."""
    sim = txt @ img.T  # (M, N)
    own = sim[torch.arange(len(txt)), txt_to_img]
    t2i_rank = (sim > own[:, None]).sum(dim=1)
    i2t_rank = torch.stack(
        [(sim[:, n] > sim[txt_to_img == n, n].max()).sum() for n in range(len(img)) if (txt_to_img == n).any()]
    )
    out = {f"t2i_R@{k}": (t2i_rank < k).float().mean().item() for k in ks}
    out |= {f"i2t_R@{k}": (i2t_rank < k).float().mean().item() for k in ks}
    out["rsum"] = sum(out.values())
    return out


def random_retrieval_data(n_img=37, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_caps = torch.randint(0, 4, (n_img,), generator=g)  # some images have no caption
    txt_to_img = torch.repeat_interleave(torch.arange(n_img), n_caps)
    img = F.normalize(torch.randn(n_img, dim, generator=g), dim=1)
    txt = F.normalize(img[txt_to_img] + torch.randn(len(txt_to_img), dim, generator=g), dim=1)
    return img, txt, txt_to_img


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_retrieval_matches_dense_reference(chunk_size):
    img, txt, txt_to_img = random_retrieval_data()
    got = retrieval_metrics(img, txt, txt_to_img, ks=(1, 5, 10), chunk_size=chunk_size)
    want = naive_retrieval(img, txt, txt_to_img, (1, 5, 10))
    assert got == pytest.approx(want)
    assert 0 < got["t2i_R@1"] < got["t2i_R@10"] < 1 and 0 < got["i2t_R@1"] < 1  # the data is not trivial


def test_topk_chunked_matches_dense_topk():
    img, txt, _ = random_retrieval_data()
    scores, idx = topk_chunked(txt, img, 4, chunk_size=7)
    dense = torch.topk(txt @ img.T, 4, dim=1)
    assert torch.equal(idx, dense.indices) and torch.allclose(scores, dense.values)


def test_perfect_embeddings_recall_everything():
    img, _, txt_to_img = random_retrieval_data(dim=32)
    got = retrieval_metrics(img, img[txt_to_img], txt_to_img, chunk_size=5)
    assert all(v == 1.0 for k, v in got.items() if k != "rsum") and got["rsum"] == pytest.approx(6.0)


def test_hand_made_case_with_known_recall():
    img = torch.eye(3)
    txt = F.normalize(torch.tensor([[1.0, 0, 0], [0, 0.5, 1], [0.6, 0, 1]]), dim=1)
    # caption 1 is closer to image 2 than to its own image 1; image 2's nearest caption is caption 1, not its own 2
    got = retrieval_metrics(img, txt, torch.tensor([0, 1, 2]), ks=(1, 2), chunk_size=2)
    assert got == pytest.approx({"t2i_R@1": 2 / 3, "t2i_R@2": 1.0, "i2t_R@1": 2 / 3, "i2t_R@2": 1.0, "rsum": 10 / 3})


def test_retrieval_rejects_bad_caption_owners():
    img, txt, txt_to_img = random_retrieval_data()
    with pytest.raises(ValueError, match="values in"):
        retrieval_metrics(img, txt, torch.full_like(txt_to_img, len(img)))


def test_zeroshot_classifier_is_renormalised_mean_of_template_embeddings():
    classifier = zeroshot_classifier(ToyModel(), toy_tokenizer, ["red", "blue"], ["a {} thing", "{} small"])
    red, blue, small = torch.eye(5)[[0, 2, 3]]
    want = torch.stack([F.normalize(red + F.normalize(red + small, dim=0), dim=0),
                        F.normalize(blue + F.normalize(blue + small, dim=0), dim=0)])
    assert torch.allclose(classifier, want, atol=1e-6)


class RawTextModel(ToyModel):
    """Text embeddings left unnormalised, so only a classifier that normalises each template passes."""

    def encode_text(self, ids, mask):
        return (F.one_hot(ids, len(VOCAB) + 1)[..., 1:] * mask[..., None]).sum(dim=1).float()


def test_zeroshot_classifier_normalises_each_template_first():
    classifier = zeroshot_classifier(RawTextModel(), toy_tokenizer, ["red"], ["a {} thing", "{} small"])
    red, small = torch.eye(5)[[0, 3]]
    assert torch.allclose(classifier[0], F.normalize(red + F.normalize(red + small, dim=0), dim=0), atol=1e-6)


def test_zeroshot_accuracy_separable_and_permuted():
    model, ds = ToyModel(), ToyDataset(30)
    img_emb = embed_images(model, ds, batch_size=8)
    labels = torch.tensor([ds.labels(i)["color"] for i in range(len(ds))])
    classifier = zeroshot_classifier(model, toy_tokenizer, COLORS, ToyDataset.prompt_templates["color"])
    assert zeroshot_accuracy(img_emb, labels, classifier) == 1.0
    assert zeroshot_accuracy(img_emb, labels, classifier[[1, 2, 0]]) == 0.0


def test_linear_probe_on_separable_blobs():
    g = torch.Generator().manual_seed(0)
    centers = 4 * torch.randn(3, 10, generator=g)
    y_train, y_test = torch.arange(3).repeat(60), torch.arange(3).repeat(30)
    x_train = centers[y_train] + torch.randn(len(y_train), 10, generator=g)
    x_test = centers[y_test] + torch.randn(len(y_test), 10, generator=g)
    assert linear_probe(x_train, y_train, x_test, y_test) > 0.95


def test_linear_probe_standardises_features():
    g = torch.Generator().manual_seed(0)

    def data(n):  # one tiny-scale informative feature among 20 unit-scale noise features
        y = torch.arange(2).repeat(n)
        signal = 1e-3 * (y[:, None] + 0.1 * torch.randn(len(y), 1, generator=g))
        return torch.cat([signal, torch.randn(len(y), 20, generator=g)], dim=1), y

    (x_train, y_train), (x_test, y_test) = data(40), data(40)
    assert linear_probe(x_train, y_train, x_test, y_test) > 0.95  # unscaled, L2 would favour the noise features


def test_linear_probe_rejects_unusable_labels():
    x = torch.randn(12, 4)
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe(x, torch.zeros(12, dtype=torch.long), x, torch.zeros(12, dtype=torch.long))


def test_linear_probe_keeps_rare_classes_in_the_fit():
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 30 + [1] * 30 + [2] * 2)  # class 2 is too rare to hold any out for choosing C
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    x = centres[y] + 0.3 * torch.randn(len(y), 2, generator=g)
    assert linear_probe(x, y, centres, torch.arange(3)) == 1.0  # the rare class is still learned


def test_evaluate_end_to_end(tmp_path):
    model = ToyModel().train()
    results = evaluate(model, toy_tokenizer, ToyDataset(60, offset=7), ToyDataset(40), batch_size=16,
                       probe_max_train=45, max_captions=2, chunk_size=13, out_dir=tmp_path)
    figures = {f"{p}/{d}_R@{k}" for p in ("retrieval", "retrieval_any") for d in ("t2i", "i2t") for k in (1, 5, 10)}
    figures |= {"retrieval/rsum", "retrieval_any/rsum", "retrieval_any/t2i_MdR", "retrieval_any/i2t_MdR",
                "zeroshot/color_acc", "zeroshot/size_acc"}
    with_ci = figures | {f"{k}_ci_{end}" for k in figures for end in ("low", "high")}
    assert set(results) == with_ci | {"probe/color_acc"}
    assert all(isinstance(v, float) for v in results.values())
    assert all(results[f"{k}_ci_low"] <= results[k] <= results[f"{k}_ci_high"] for k in figures)
    assert results["zeroshot/color_acc"] == results["zeroshot/size_acc"] == 1.0
    assert results["retrieval/t2i_R@10"] == 1.0  # every colour×size group (≤ 7 images) is tied at the top
    # the oracle puts a right image first for every caption, but not always the caption's own image
    assert results["retrieval/t2i_R@1"] < 1.0 and results["retrieval_any/t2i_R@1"] == 1.0
    assert results["retrieval_any/i2t_R@1"] == 1.0 and results["retrieval_any/t2i_MdR"] == 1.0
    assert results["probe/color_acc"] > 0.9
    assert model.training and model.modes_seen == {False}
    assert (tmp_path / "retrieval_examples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class OneSizeDataset(ToyDataset):
    """Only small items carry the "size" label."""

    def labels(self, i):
        color, size = self._classes(i)
        return {"color": color} if size else {"color": color, "size": size}


def test_evaluate_skips_single_class_field_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="polyalign.eval.run"):
        results = evaluate(ToyModel(), toy_tokenizer, OneSizeDataset(30), OneSizeDataset(30), zeroshot_fields=["size"])
    assert not any(k.startswith(("zeroshot/", "probe/")) for k in results)
    assert "zero-shot 'size' skipped" in caplog.text and "linear probe on 'size' skipped" in caplog.text


def test_prompt_names_read_as_words():
    from polyalign.eval.zeroshot import prompt_name

    assert prompt_name("face-smiling") == "face smiling"
    assert prompt_name("golden_retriever") == "golden retriever"
    assert prompt_name("Smileys & Emotion") == "Smileys & Emotion"


def test_bf16_retrieval_agrees_with_fp32_on_separated_data():
    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(300, 32, generator=g), dim=1)
    owner = torch.arange(300).repeat_interleave(2)
    txt = F.normalize(img[owner] + 0.3 * torch.randn(600, 32, generator=g), dim=1)
    fp32 = retrieval_metrics(img, txt, owner, chunk_size=64)
    bf16 = retrieval_metrics(img, txt, owner, chunk_size=64, dtype=torch.bfloat16)
    assert 0.2 < fp32["t2i_R@1"] < 1.0
    for key in fp32:
        assert bf16[key] == pytest.approx(fp32[key], abs=0.03), key


class AntiModel(ToyModel):
    """The oracle turned around: every caption scores its right images lowest."""

    def encode_text(self, ids, mask):
        return -super().encode_text(ids, mask)


class OneConcept(ToyDataset):
    def concept_id(self, i):
        return "the same concept"


def test_evaluate_counts_items_of_the_query_concept_as_right():
    kwargs = dict(zeroshot_fields=[], max_captions=2, n_examples=0, bootstrap=0)
    plain = evaluate(AntiModel(), toy_tokenizer, ToyDataset(30), ToyDataset(40), **kwargs)
    assert plain["retrieval_any/t2i_R@1"] < 0.5 and not any(k.endswith(("_ci_low", "_ci_high")) for k in plain)
    one = evaluate(AntiModel(), toy_tokenizer, ToyDataset(30), OneConcept(40), **kwargs)  # every image is right
    assert one["retrieval_any/t2i_R@1"] == one["retrieval_any/i2t_R@1"] == one["retrieval_any/t2i_MdR"] == 1.0
    assert one["retrieval/t2i_R@1"] == plain["retrieval/t2i_R@1"]
