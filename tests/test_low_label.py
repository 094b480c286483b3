"""MCT's low-label regime (issue 21): data.caption_fraction hides captions and tags from every inter-modal term
while image-image sees every image; data.captioned_only and data.captioned_share compose the batches."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polyalign.config import LossConfig, load_config
from polyalign.data.base import captioned_items
from polyalign.data.loader import Collator, to_model_inputs
from polyalign.errors import ConfigError
from polyalign.losses.objective import INTER_FIELDS, TERMS, Objective
from polyalign.models.build import build_model
from polyalign.models.outputs import DualOutput
from polyalign.tokenizer import Tokenizer

from test_mct_intra import ALL_TERMS, _datasets

torch.set_num_threads(1)


# --- 2. the low-label regime ---
def test_captioned_items_are_a_fixed_seeded_fraction():
    a, b, c = captioned_items(1000, 0.05, 3), captioned_items(1000, 0.05, 3), captioned_items(1000, 0.05, 4)
    assert a.sum() == 50 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert captioned_items(10, 1.0, 0) is None and captioned_items(10, 0.01, 0).sum() == 1


def test_captionless_items_carry_no_caption_or_tags(tiny_overrides, tmp_path):
    cfg, ds, tags = _datasets(tiny_overrides + ALL_TERMS + ["data.caption_fraction=0.25"], tmp_path)
    train, keep = ds["train"], ds["train"].captioned
    assert keep.sum() == 64 and ds["val"].captioned is None  # validation keeps its captions
    for i in range(40):
        s = train[(1, i)]
        assert s["captioned"] == keep[i]
        if not keep[i]:
            assert s["caption"] == "" and s["caption_view2"] == "" and s["tags"].sum() == 0
        else:
            assert s["caption"] in train.captions(i)
        assert "image_view2" in s  # every image has its intra views
    assert set(train.all_captions()) == {c for i in np.flatnonzero(keep) for c in train.captions(i)}
    seen = {t for i in np.flatnonzero(keep) for t in train.tags(i)}
    assert set(tags) <= seen  # the tag vocabulary comes from the captioned items


def _synthetic_output(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda: F.normalize(torch.randn(b, 6, generator=g), dim=1).requires_grad_()  # noqa: E731
    keep = torch.tensor([True, False, True, True, False, False, True, False])[:b]
    out = DualOutput(first_emb=unit(), second_emb=unit(), logit_scale=torch.tensor(10.0), fdt_image_emb=unit(),
                     fdt_text_emb=unit(), fdt_logit_scale=torch.tensor(5.0), image_view1_emb=unit(),
                     image_view2_emb=unit(), text_view1_emb=unit(), text_view2_emb=unit(),
                     tag_logits=torch.randn(b, 5, generator=g).requires_grad_(),
                     tag_targets=(torch.rand(b, 5, generator=g) > 0.5).float(), caption_mask=keep)
    return out, keep


def test_every_term_is_classified_inter_or_intra():
    """A new loss term must be declared inter-modal (it reads captions or tags) or intra-image: else this fails."""
    assert set(TERMS) == set(INTER_FIELDS) | {"image_image", "itc", "itm", "mlm"}


@pytest.mark.parametrize("term", sorted(INTER_FIELDS))
def test_caption_fraction_hides_captionless_rows_from_every_inter_term(term):
    out, keep = _synthetic_output()
    cfg = LossConfig()
    # the reference: the term on an output holding the captioned rows alone
    ref = TERMS[term](dataclasses.replace(out, caption_mask=None, **{f: getattr(out, f)[keep] for f in INTER_FIELDS[term]}),
                      cfg)
    poisoned = dataclasses.replace(out, **{f: getattr(out, f).detach().clone().index_fill_(
        0, (~keep).nonzero().squeeze(1), float("nan")).requires_grad_() for f in INTER_FIELDS[term]})
    got = TERMS[term](poisoned, cfg)  # a captionless row that reached the loss would make it NaN
    assert torch.isfinite(got) and torch.allclose(got, ref)
    got.backward()
    for f in INTER_FIELDS[term]:
        grad = getattr(poisoned, f).grad
        if grad is not None:
            assert torch.all(grad[~keep] == 0) and grad[keep].abs().sum() > 0


def test_image_image_sees_every_image_and_no_captioned_row_gives_zero():
    out, keep = _synthetic_output()
    TERMS["image_image"](out, LossConfig()).backward()
    assert out.image_view1_emb.grad[~keep].abs().sum() > 0
    none = dataclasses.replace(out, caption_mask=torch.zeros_like(keep))
    zero = TERMS["clip"](none, LossConfig())
    assert zero.item() == 0 and zero.requires_grad


def test_captionless_captions_never_reach_the_losses_end_to_end(tiny_overrides, tmp_path):
    """Data → loader → model → objective: rewriting the captions and tags of the captionless items changes nothing,
    and the text tower reads the captioned rows only."""
    cfg, ds, tags = _datasets(tiny_overrides + ALL_TERMS + ["data.caption_fraction=0.5"], tmp_path)
    train, keep = ds["train"], ds["train"].captioned
    tok = Tokenizer.train(train.all_captions(), cfg.model.text.vocab_size, cfg.model.text.context_length)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.image_size, tok.vocab_size, cfg.loss, tags)
    objective, items = Objective(cfg.loss), [(0, i) for i in range(12)]
    rows = []
    model.text_encoder.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))

    def losses():
        torch.manual_seed(1)
        batch = to_model_inputs(Collator(tok)([train[k] for k in items]))
        return {k: v.item() for k, v in objective(model(batch)).items()}, batch

    before, batch = losses()
    assert set(before) == {"clip_loss", "fdt_loss", "image_image_loss", "text_text_loss", "tags_loss", "loss"}
    n = int(batch["captioned"].sum())
    assert 2 <= n < 12 and rows == [n, n]  # the caption and its second view, captioned rows only
    captions, tag_of = train.captions, train.tags
    train.captions = lambda i: captions(i) if keep[i] else ["red red red"] * len(captions(i))
    train.tags = lambda i: tag_of(i) if keep[i] else list(tags)
    after, _ = losses()
    assert after == before


def test_caption_fraction_trains_a_few_steps(tiny_overrides, tmp_path):
    from polyalign.app.training import train

    over = tiny_overrides + ALL_TERMS + ["data.caption_fraction=0.1", "loss.image_image=moco",
                                         "model.moco.queue_size=64", "model.text_momentum=0.9", "model.inter_head=mlp",
                                         "train.max_steps=3", "train.checkpoint_every=3", "eval.n_examples=0",
                                         "eval.bootstrap_resamples=0", "data.tag_min_count=1"]
    metrics = train(load_config(None, over), tmp_path / "run", show_progress=False)
    assert math.isfinite(metrics["tagging/head_mAP"])


def test_captioned_only_draws_every_batch_from_the_captioned_items():
    from polyalign.data.loader import GlobalBatchSampler

    keep = captioned_items(200, 0.1, 3)
    items = np.flatnonzero(keep)
    sampler = GlobalBatchSampler(200, 8, seed=3, items=items)
    it = iter(sampler)
    per_epoch = len(items) // 8
    seen = [i for _ in range(per_epoch) for _, i in next(it)]
    assert set(seen) <= set(items.tolist()) and len(seen) == len(set(seen)) == per_epoch * 8  # an epoch of them
    assert all(keep[i] for _, i in next(it))  # and on into the next epoch
    with pytest.raises(Exception, match="larger than the training items drawn from"):
        GlobalBatchSampler(200, 64, seed=3, items=items)


def test_captioned_share_fixes_the_captioned_rows_of_every_batch_and_resumes_exactly():
    from polyalign.data.loader import MixedBatchSampler

    keep = captioned_items(300, 0.1, 5)
    a, b = np.flatnonzero(keep), np.flatnonzero(~keep)
    first = iter(MixedBatchSampler(a, b, 4, 16, seed=5))
    batches = [next(first) for _ in range(20)]  # 20 steps: 2.7 epochs of the 30 captioned items
    assert all(sum(keep[i] for _, i in rows) == 4 and len(rows) == 16 for rows in batches)
    caps = [i for rows in batches[:7] for _, i in rows if keep[i]]
    assert len(caps) == len(set(caps)) == 28  # one epoch of the captioned group: no repeats
    resumed = iter(MixedBatchSampler(a, b, 4, 16, seed=5, start_step=13))
    assert [next(resumed) for _ in range(7)] == batches[13:]
    ranks = [iter(MixedBatchSampler(a, b, 4, 16, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert next(ranks[0]) + next(ranks[1]) == batches[0]  # the ranks' slices make up the global batch
    assert not all(keep[i] for _, i in batches[0][:4])  # the captioned rows are spread, not first


@pytest.mark.parametrize("how", ["data.captioned_only=true", "data.captioned_share=0.25"])
def test_captioned_only_trains_on_captioned_rows_only(tiny_overrides, tmp_path, how, monkeypatch):
    from polyalign.app.training import train

    over = tiny_overrides + ["data.caption_fraction=0.5", how, "train.max_steps=3",
                             "train.checkpoint_every=3", "eval.n_examples=0", "eval.bootstrap_resamples=0"]
    with pytest.raises(ConfigError, match="captioned_only"):
        load_config(None, tiny_overrides + ["data.captioned_only=true"])
    for bad in (["data.captioned_share=0.5"], ["data.caption_fraction=0.5", "data.captioned_share=1.5"],
                ["data.caption_fraction=0.5", "data.captioned_share=0.5", "data.captioned_only=true"]):
        with pytest.raises(ConfigError, match="captioned_share"):
            load_config(None, tiny_overrides + bad)
    cfg = load_config(None, over)
    seen = []
    from polyalign.data import base

    real = base.ImageTextDataset.__getitem__

    def spy(self, key):
        sample = real(self, key)
        if self.captioned is not None:
            seen.append(sample["captioned"])
        return sample

    monkeypatch.setattr(base.ImageTextDataset, "__getitem__", spy)
    train(cfg, tmp_path / "run", show_progress=False)
    b = cfg.train.batch_size
    assert len(seen) >= 3 * b
    if cfg.data.captioned_only:
        assert all(seen)  # every training sample was a captioned one
    else:  # the first 3 batches: a quarter of each captioned (evaluation reads no captioned flag: the test split)
        assert [sum(seen[k * b:(k + 1) * b]) for k in range(3)] == [round(0.25 * b)] * 3
