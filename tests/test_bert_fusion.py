"""Issue 23, item 2: ALBEF's split of a pretrained BERT (MiniLM-L6): the lower layers encode text, the upper layers +
new cross-attention fuse. The text path is checked against transformers' own layers; the split model trains."""
import pytest
import torch

from polyalign.config import load_config
from polyalign.errors import ConfigError
from polyalign.models.build import build_model
from polyalign.models.encoders.text import HFTextEncoder
from polyalign.models.heads.bert_fusion import BertFusionEncoder
from polyalign.tokenizer import special_ids_of

transformers = pytest.importorskip("transformers")


def _ids(enc, texts):
    from polyalign.config.checks import resolve_hf_path

    tok = transformers.AutoTokenizer.from_pretrained(str(resolve_hf_path("minilm")), local_files_only=True)
    batch = tok(texts, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"].bool()


TEXTS = ["a small green star next to a red circle", "an emoji of a cat", "two"]


def test_the_split_halves_reproduce_the_full_model():
    full = HFTextEncoder("minilm").eval()
    ids, mask = _ids(full, TEXTS)
    with torch.no_grad():
        hidden = full.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
    lower = HFTextEncoder("minilm", keep_layers=3).eval()
    assert len(lower.model.encoder.layer) == 3 and len(lower.upper_layers) == 3
    with torch.no_grad():
        out = lower(ids, mask)
        assert torch.allclose(out[mask], hidden[3][mask], atol=1e-5)
        # the fusion layers without their cross-attention are BERT's layers 3–5: self-attention + feed-forward
        fusion = BertFusionEncoder(lower.upper_layers, image_width=8, heads=full.model.config.num_attention_heads).eval()
        x = out
        for i, block in enumerate(fusion.blocks):
            x = block.feed_forward(block.self_attention(x, mask))
            assert torch.allclose(x[mask], hidden[4 + i][mask], atol=1e-4), i


def test_bad_splits_are_clear_errors():
    with pytest.raises(ConfigError, match="text_split=6"):
        HFTextEncoder("minilm", keep_layers=6)
    with pytest.raises(ConfigError, match="model.text.kind=hf"):
        load_config(None, ["loss.weights.clip=0", "loss.weights.itc=1", "loss.weights.itm=1",
                           "model.fusion.text_split=2"])
    with pytest.raises(ConfigError, match="text_split=6: 'minilm' has 6 layers; keep 1 to 5"):
        load_config(None, ["loss.weights.clip=0", "loss.weights.itc=1", "loss.weights.itm=1", "model.text.kind=hf",
                           "model.text.hf_path=minilm", "model.fusion.text_split=6"])
    # the Grad-CAM layer is checked against the fusion layers the split leaves (MiniLM-L6 split at 4: 2 layers)
    with pytest.raises(ConfigError, match="gradcam_layer"):
        load_config(None, ["loss.weights.clip=0", "loss.weights.itc=1", "loss.weights.itm=1", "model.text.kind=hf", "model.text.hf_path=minilm",
                           "model.fusion.text_split=4", "model.fusion.soft_mask=true", "model.fusion.gradcam_layer=1"])


def test_split_fusion_model_trains_and_explains(tmp_path):
    over = ["data.image_size=32", "model.image.width=16", "model.image.layers=2", "model.text.kind=hf",
            "model.text.hf_path=minilm", "model.text.context_length=16", "loss.weights.clip=0", "loss.weights.itc=1",
            "loss.weights.itm=1", "loss.weights.mlm=1", "model.fusion.text_split=3", "model.fusion.queue_size=16",
            "model.fusion.gradcam_layer=1", "model.fusion.soft_mask=true"]
    cfg = load_config(None, over)
    from polyalign.config.checks import resolve_hf_path
    from polyalign.tokenizer import Tokenizer

    tok = Tokenizer.load(resolve_hf_path("minilm") / "tokenizer.json", 16)
    torch.manual_seed(0)
    model = build_model(cfg.model, 32, tok.vocab_size, cfg.loss, special_ids=special_ids_of(tok), train_steps=10)
    assert len(model.text_encoder.model.encoder.layer) == 3 and len(model.fusion.blocks) == 3
    assert model.cfg.fusion_layers == 3 and model.cfg.fusion_heads == 12
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names))
    assert any(n.startswith("fusion.blocks.0.layer.attention.self.query") for n in names)  # the pretrained weights
    ids, mask = tok(TEXTS * 2)
    batch = {"image": torch.rand(6, 3, 32, 32), "text": ids, "text_mask": mask, "index": torch.arange(6)}
    model.train()
    out = model(batch)
    from tests.test_albef import total_loss

    loss = total_loss(out)
    assert torch.isfinite(loss)
    loss.backward()
    grads = dict(model.named_parameters())
    for name in ("fusion.blocks.2.layer.output.dense.weight", "fusion.blocks.0.cross_kv.weight",
                 "text_encoder.model.encoder.layer.2.output.dense.weight", "itm_head.weight"):
        assert grads[name].grad is not None and grads[name].grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        tokens = model.image_encoder(batch["image"])
        text_tokens, text_mask = model.text_tokens(ids, mask)
        maps = model.gradcam_maps(tokens, text_tokens, text_mask)
        assert maps.shape == (6, text_tokens.shape[1], tokens.shape[1]) and maps.abs().sum() > 0
        assert model.itm_scores(batch["image"], ids, mask).shape == (6,)
    # the momentum teacher holds its own copy of the (split) text tower and of the fusion encoder
    assert len(model.momentum.text_encoder.model.encoder.layer) == 3 and not model.momentum.text_encoder.upper_layers
