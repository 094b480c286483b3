"""MCT where the intra-modal terms should matter (issue 21): view-specific augmentation, concept positives, MLP inter
heads, the momentum text tower, shuffle-BN, MoCo's τ, DDP = one process (the low-label regime: test_low_label.py)."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from polyalign import distributed
from polyalign.app.runs import prepare_views
from polyalign.config import LossConfig, load_config
from polyalign.data.build import build_datasets
from polyalign.data.loader import Collator, to_model_inputs
from polyalign.errors import ConfigError
from polyalign.losses.intra import moco_info_nce
from polyalign.losses.objective import TERMS, Objective
from polyalign.models.build import build_model
from polyalign.models.dual import DualEncoder, IntraHeads
from polyalign.models.heads.momentum import MomentumEncoder
from polyalign.models.heads.projection import ProjectionHead
from polyalign.models.outputs import DualOutput
from polyalign.tokenizer import Tokenizer

torch.set_num_threads(1)
INTRA = ["data.intra_augment.enabled=true", "loss.weights.image_image=1"]
ALL_TERMS = INTRA + ["loss.weights.text_text=0.5", "loss.weights.tags=1", "loss.weights.fdt=0.5",
                     "data.tag_min_count=2", "model.fdt.codebook_size=32", "model.intra_dim=16"]


def _datasets(overrides, tmp_path):
    cfg = load_config(None, overrides)
    datasets = build_datasets(cfg.data, cfg.train.seed, show_progress=False)
    tags = prepare_views(cfg, datasets, tmp_path)
    return cfg, datasets, tags


# --- 1. two augmentation pipelines ---
def test_intra_augment_defaults_allow_colour_and_data_augment_does_not():
    cfg = load_config(None, [])
    assert (cfg.data.intra_augment.color_jitter, cfg.data.intra_augment.color_jitter_p) == (0.8, 0.8)
    assert cfg.data.intra_augment.grayscale == 0.2 and not cfg.data.intra_augment.enabled
    assert cfg.data.augment.color_jitter == 0 and cfg.data.augment.grayscale == 0


def test_the_two_pipelines_are_independent_and_reproducible(tiny_overrides, tmp_path):
    base = tiny_overrides + INTRA + ["data.augment.enabled=true"]
    samples = {}
    for name, extra in {"a": [], "again": [], "caption_changed": ["data.augment.flip=1", "data.augment.crop_scale=[0.1,0.2]"],
                        "intra_changed": ["data.intra_augment.grayscale=1"]}.items():
        _, ds, _ = _datasets(base + extra, tmp_path)
        samples[name] = [ds["train"][(2, i)] for i in range(6)]
    for a, again, cap, intra in zip(*samples.values()):
        for key in ("image", "image_view1", "image_view2"):
            assert torch.equal(a[key], again[key])  # a function of (seed, epoch, index)
        assert not torch.equal(a["image"], cap["image"])  # data.augment moves the caption-paired image ...
        assert torch.equal(a["image_view1"], cap["image_view1"]) and torch.equal(a["image_view2"], cap["image_view2"])
        assert torch.equal(a["image"], intra["image"])  # ... data.intra_augment the views, and nothing else
        assert all(torch.equal(v[0], v[1]) and torch.equal(v[1], v[2]) for v in (intra["image_view1"], intra["image_view2"]))
        assert not torch.equal(a["image"][0], a["image"][1])  # the caption-paired image keeps its colours
        assert not torch.equal(a["image_view1"], a["image_view2"])
    assert not all(torch.equal(a["image_view1"], b["image_view1"]) for a, b in zip(samples["a"], samples["intra_changed"]))


def test_without_intra_augment_the_views_are_as_before(tiny_overrides, tmp_path):
    _, ds, _ = _datasets(tiny_overrides + ["data.augment.enabled=true", "loss.weights.image_image=1"], tmp_path)
    s = ds["train"][(0, 3)]
    assert "image_view1" not in s and "image_view2" in s  # the caption-paired image is the first view


@pytest.mark.parametrize("override, match", [
    ("data.intra_augment.colour_jitter=0.5", "did you mean data.intra_augment.color_jitter"),
    ("data.intra_augment.grayscale=1.5", "data.intra_augment.grayscale"),
    ("data.intra_augment.crop_scale=[0.9,0.2]", "data.intra_augment.crop_scale"),
    ("data.caption_fraction=0", "data.caption_fraction"), ("data.caption_fraction=1.5", "data.caption_fraction"),
    ("model.inter_head=deep", "model.inter_head"), ("data.intra_positive=concept", "data.intra_positive"),
    ("data.intra_positive=style", "data.intra_positive=style"), ("model.text_momentum=1", "model.text_momentum"),
    ("model.moco.shuffle_bn=2", "model.moco.shuffle_bn"),
])
def test_new_options_give_clear_errors(tiny_overrides, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, tiny_overrides + [override])


def test_caption_fraction_rules(tiny_overrides):
    with pytest.raises(ConfigError, match="dual encoder"):
        load_config(None, tiny_overrides + ["data.caption_fraction=0.5", "loss.weights.clip=0", "loss.weights.itc=1"])
    with pytest.raises(ConfigError, match="grad_cache_chunk"):
        load_config(None, tiny_overrides + ["data.caption_fraction=0.5", "train.grad_cache_chunk=8"])
    with pytest.raises(ConfigError, match="image–text data"):
        load_config(None, tiny_overrides + ["data.caption_fraction=0.5", "data.name=shapes_audio",
                                            "model.modalities=[audio,text]"])
    load_config(None, tiny_overrides + ["data.intra_augment.enabled=true", "loss.weights.image_image=1"])  # fine


# --- concept positives (emoji: the same concept in another style) ---
def _concept_manifest(tmp_path, shared=True):
    from PIL import Image

    rows = []
    for k, (concept, style, colour) in enumerate([("1f600", "google", (255, 0, 0)), ("1f600", "twitter", (0, 0, 255)),
                                                  ("1f431", "google", (0, 255, 0)), ("1f431", "twitter", (9, 9, 9)),
                                                  ("1f431", "google", (7, 7, 7))]):  # a second google cat
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{k}.png")
        rows.append({"image": f"{k}.png", "captions": [f"emoji {concept}"], "label": concept, "style": style,
                     "concept_id": concept if shared else f"{concept}-{style}"})
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["data.name=manifest", f"data.train_manifest={path}", "data.image_size=16", "train.batch_size=2",
            "loss.weights.image_image=1", "data.intra_positive=style"]


def test_style_positive_is_the_same_concept_in_another_style(tmp_path):
    cfg, ds, _ = _datasets(_concept_manifest(tmp_path), tmp_path)
    train = ds["train"]
    for i, allowed in enumerate([[1], [0], [3], [2, 4], [3]]):  # the google cats' only partner: the twitter one
        s = train[(0, i)]  # no augmentation: the views are the item's own image and its partner's
        assert torch.equal(s["image"], train.image(i))
        assert any(torch.equal(s["image_view2"], train.image(j)) for j in allowed)
    from polyalign.data.base import concept_partners

    partners = concept_partners(train)
    assert [sorted(p.tolist()) for p in partners] == [[1], [0], [3], [2, 4], [3]]  # never itself, never its own style


def test_style_positive_needs_shared_concepts(tmp_path):
    with pytest.raises(ConfigError, match="share a concept_id"):
        _datasets(_concept_manifest(tmp_path, shared=False), tmp_path)


# --- 3. the spec's pieces ---
def test_moco_temperature_defaults_to_0_2():
    assert LossConfig(image_image="moco").temperature("image_image") == 0.2
    assert LossConfig().temperature("image_image") == 0.1 and LossConfig().temperature("text_text") == 0.05
    assert LossConfig(image_image="moco", temperatures={"image_image": 0.3}).temperature("image_image") == 0.3
    z, k, q = (F.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(s)), dim=1) for s in (0, 1, 2))
    out = DualOutput(image_view1_emb=z, image_view2_emb=k, moco_key1_emb=k, moco_key2_emb=z, moco_queue=q)
    want = 0.5 * (moco_info_nce(z, z, q, 0.2) + moco_info_nce(k, k, q, 0.2))
    assert torch.allclose(TERMS["image_image"](out, LossConfig(image_image="moco")), want)


def test_mlp_inter_heads(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["model.inter_head=mlp"])
    model = build_model(cfg.model, cfg.data.image_size, 50, cfg.loss)
    assert isinstance(model.image_head.proj, nn.Sequential) and isinstance(model.text_head.proj, nn.Sequential)
    tokens = torch.randn(5, 4, cfg.model.image.width)
    one = model.image_head(tokens[:1])
    assert torch.allclose(one, model.image_head(tokens)[:1], atol=1e-6)  # no batch statistics in the inter heads
    assert torch.allclose(one.norm(dim=1), torch.ones(1))
    linear = build_model(load_config(None, tiny_overrides).model, cfg.data.image_size, 50, cfg.loss)
    assert isinstance(linear.image_head.proj, nn.Linear)


def test_momentum_text_tower(tiny_overrides, tmp_path):
    over = tiny_overrides + ["loss.weights.text_text=1", "model.text_momentum=0.9", "model.intra_dim=16"]
    cfg, ds, tags = _datasets(over, tmp_path)
    tok = Tokenizer.train(ds["train"].all_captions(), cfg.model.text.vocab_size, cfg.model.text.context_length)
    model = build_model(cfg.model, cfg.data.image_size, tok.vocab_size, cfg.loss, tags)
    assert model.text_momentum is not None and all(not p.requires_grad for p in model.text_momentum.parameters())
    out = model(to_model_inputs(Collator(tok)([ds["train"][(0, i)] for i in range(8)])))
    assert out.text_view1_emb.requires_grad and not out.text_view2_emb.requires_grad  # keys from the EMA tower
    before = next(model.text_momentum.encoder.parameters()).clone()
    with torch.no_grad():
        next(model.text_encoder.parameters()).add_(1.0)
    model.after_step(out)
    assert torch.allclose(next(model.text_momentum.encoder.parameters()),
                          0.9 * before + 0.1 * next(model.text_encoder.parameters()))
    plain = load_config(None, tiny_overrides + ["model.text_momentum=0.9"])
    off = build_model(plain.model, 32, 50, plain.loss)
    assert off.text_momentum is None  # no text_text term: nothing built


class _BatchMean(nn.Module):
    """A deliberately leaky encoder: each row's output is (nearly) the mean of its BatchNorm group, i.e. it carries
    nothing about the row itself, only which rows shared its batch statistics. x − √eps · BN_eps(x) ≈ μ_group."""

    width, pool, has_cls = 16, "mean", False

    def __init__(self):
        super().__init__()
        self.bn = distributed.GlobalBatchNorm2d(16, eps=1e8, affine=False)

    def forward(self, x, mask=None):
        return (x - 1e4 * self.bn(x)).flatten(1).unsqueeze(1)  # (B, 1, 16)


class _Normalise(nn.Module):
    def forward(self, tokens, mask=None):
        return F.normalize(tokens.mean(1), dim=1)


def _leak(shuffle_bn: bool, b: int = 64, batches: int = 16) -> float:
    """Fraction of queries whose positive key outscores every queue key (past batches' keys), when the encoder
    can only see batch statistics. Chance: 1 / (queue + 1)."""
    enc, head = _BatchMean(), _Normalise()
    model = DualEncoder((enc, nn.Identity()), (ProjectionHead(16, 4, "mean"), ProjectionHead(16, 4, "mean")),
                        intra=IntraHeads(image=head, momentum=MomentumEncoder(enc, head, 16, 1, 0.99, shuffle_bn)),
                        clip_on=False).train()
    g, keys, outs = torch.Generator().manual_seed(0), [], []
    for _ in range(batches):
        x = torch.randn(b, 16, 1, 1, generator=g)
        out = model({"image": x, "image_view2": x + 0.05 * torch.randn(b, 16, 1, 1, generator=g)})
        keys.append(out.moco_key2_emb)
        outs.append(out)
    out, queue = outs[-1], torch.cat(keys[:-1])  # (Q, 16): keys of the earlier batches
    pos = (out.image_view1_emb * out.moco_key2_emb).sum(1)
    return (pos > (out.image_view1_emb @ queue.T).max(1).values).float().mean().item()


def test_shuffle_bn_removes_the_batchnorm_leak():
    assert _leak(shuffle_bn=False) > 0.95  # query and positive key share all batch statistics: solved by BN alone
    assert _leak(shuffle_bn=True) < 0.2  # they share them with no other sample: near chance (1/961)


def test_shuffle_bn_groups_queries_and_keys_differently():
    enc = _BatchMean()
    m = DualEncoder((enc, nn.Identity()), (ProjectionHead(16, 4, "mean"),) * 2,
                    intra=IntraHeads(image=_Normalise(), momentum=MomentumEncoder(enc, _Normalise(), 16, 1, 0.9, True)),
                    clip_on=False).train()
    seen = []
    orig = distributed.batch_norm_groups
    try:
        distributed.batch_norm_groups = lambda ids, n: (seen.append((ids.tolist(), n)), orig(ids, n))[1]
        m({"image": torch.randn(10, 16, 1, 1), "image_view2": torch.randn(10, 16, 1, 1)})
    finally:
        distributed.batch_norm_groups = orig
    (q, nq), _, (k, nk) = seen  # encoder pass, intra head pass (queries), key pass; m = ⌈√10⌉ = 4
    assert q[:10] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2] and nq == 3 and k[:10] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1] and nk == 4
    for s in range(10):  # a query group and its positive key's group share that sample alone
        assert {t for t in range(10) if q[t] == q[s]} & {t for t in range(10) if k[t] == k[s]} == {s}


# --- DDP: 2 processes = 1 process on the full batch, with captionless rows and shuffle-BN ---
WORLD, BATCH = 2, 12
DDP_OVERRIDES = ["model.embed_dim=8", "model.image.width=16", "model.image.layers=2", "model.text.width=16",
                 "model.text.layers=1", "model.text.heads=2", "data.image_size=16", "model.intra_dim=8",
                 "loss.weights.image_image=1", "loss.image_image=moco", "model.moco.queue_size=8",
                 "loss.weights.text_text=1", "loss.weights.tags=1", "model.inter_head=mlp", "model.text_momentum=0.9",
                 "data.intra_augment.enabled=true", "data.caption_fraction=0.5", "data.tag_min_count=1"]


# captioned rows per rank (6 rows each): unequal; a single one on rank 1 (it alone enters the text heads' pooled
# BatchNorm statistics: with the blank rows in, text_text differs by ~0.26)
MASKS = {"5-2": [1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 1, 0], "5-1": [1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0]}


def _ddp_setup(mask="5-2"):
    cfg = load_config(None, DDP_OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.image_size, 50, cfg.loss, ["a", "b", "c"])
    g = torch.Generator().manual_seed(1)
    batch = {k: torch.rand(BATCH, 3, 16, 16, generator=g) for k in ("image", "image_view1", "image_view2")}
    for k in ("text", "text_view2"):
        batch[k] = torch.randint(0, 50, (BATCH, 8), generator=g)
        batch[f"{k}_mask"] = torch.ones(BATCH, 8, dtype=torch.bool)
    batch["tags"] = (torch.rand(BATCH, 3, generator=g) > 0.5).float()
    batch["captioned"] = torch.tensor(MASKS[mask], dtype=torch.bool)
    return model, Objective(cfg.loss), batch


def _ddp_worker(rank: int, init_file: str, out_file: str, mask: str):
    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model, objective, batch = _ddp_setup(mask)
    local = {k: v[rank * BATCH // WORLD: (rank + 1) * BATCH // WORLD] for k, v in batch.items()}
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    losses = objective(distributed.gather_embeddings(ddp(local)))
    losses["loss"].backward()
    shown = {k: distributed.mean_over_ranks(v) for k, v in losses.items()}
    if rank == 0:
        torch.save({"losses": shown, "grads": {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None}}, out_file)
    dist.barrier()
    os._exit(0)


@pytest.mark.parametrize("mask", sorted(MASKS))
def test_two_processes_equal_one_process_with_captionless_rows_and_shuffle_bn(tmp_path, mask):
    out_file = str(tmp_path / "rank0.pt")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), out_file, mask), nprocs=WORLD, join=True)
    got = torch.load(out_file)
    model, objective, batch = _ddp_setup(mask)
    losses = objective(model(batch))
    losses["loss"].backward()
    for k, v in losses.items():
        assert torch.allclose(got["losses"][k], v.detach(), atol=1e-5), k
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got["grads"]) == set(want)
    for name, g in want.items():
        assert torch.allclose(got["grads"][name], g, atol=1e-5, rtol=1e-4), name
