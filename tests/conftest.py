"""Shared fixtures: a tiny recipe that trains in seconds."""
import pytest

TINY = [
    "data.train_size=256", "data.val_size=64", "data.test_size=96", "data.cache_dir=",
    "model.embed_dim=16", "model.image.width=32", "model.image.layers=1", "model.image.heads=2",
    "model.image.patch_size=8", "data.image_size=32", "model.text.width=32", "model.text.layers=1", "model.text.heads=2",
    "model.text.vocab_size=200", "model.text.context_length=16",
    "train.batch_size=32", "train.max_steps=12", "train.warmup_steps=2", "train.log_every=1",
    "train.checkpoint_every=4", "train.precision=fp32", "train.lr=3e-3",
    "eval.probe_max_train=128", "eval.n_examples=2",
]


@pytest.fixture
def tiny_overrides():
    return list(TINY)
