"""FDT (arXiv 2303.14865): sparsemax against a brute-force simplex projection, masked and chunked grounding against
the naive head, the head and model wiring, the loss term (also under real 2-process DDP), config errors."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from polyalign import distributed
from polyalign.config import Config, load_config, set_key
from polyalign.errors import ConfigError
from polyalign.models.heads.fdt import FDTHead, ground, relevance, sparsemax
from polyalign.losses.contrastive import info_nce
from polyalign.models.build import build_model
from polyalign.losses.objective import Objective, fdt_term
from polyalign.models.outputs import DualOutput


def simplex_projection(x: torch.Tensor, iters: int = 200) -> torch.Tensor:
    """Reference: bisection on τ with Σ max(x − τ, 0) = 1, row by row, in float64."""
    x = x.double()
    lo, hi = x.min(-1, keepdim=True).values - 1, x.max(-1, keepdim=True).values
    for _ in range(iters):
        tau = (lo + hi) / 2
        over = (x - tau).clamp_min(0).sum(-1, keepdim=True) > 1
        lo, hi = torch.where(over, tau, lo), torch.where(over, hi, tau)
    return (x - (lo + hi) / 2).clamp_min(0)


# --- sparsemax ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spread", [0.1, 1.0, 10.0])
def test_sparsemax_is_the_simplex_projection(spread):
    x = torch.randn(6, 4, 33, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * spread
    p = sparsemax(x)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(6, 4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(p, simplex_projection(x), atol=1e-10)
    if spread == 10.0:
        assert (p == 0).any(-1).all()  # peaked scores: sparse rows


def test_sparsemax_closed_forms_and_shift_invariance():
    assert torch.equal(sparsemax(torch.tensor([3.0, 0.0, -1.0])), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(sparsemax(torch.tensor([0.6, 0.4, -5.0])), torch.tensor([0.6, 0.4, 0.0]))
    assert torch.allclose(sparsemax(torch.zeros(4)), torch.full((4,), 0.25))
    x = torch.randn(5, 17, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(sparsemax(x + 123.0), sparsemax(x), atol=1e-5)
    assert torch.allclose(sparsemax(x.float()), simplex_projection(x).float(), atol=1e-6)


def test_sparsemax_gradient():
    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    assert torch.autograd.gradcheck(sparsemax, (x.requires_grad_(),))
    # the closed form: g − mean(g over the support) on the support, 0 elsewhere
    g = torch.randn(4, 9, dtype=torch.float64)
    (grad,) = torch.autograd.grad(sparsemax(x), x, g)
    on = sparsemax(x) > 0
    want = torch.where(on, g - (g * on).sum(-1, keepdim=True) / on.sum(-1, keepdim=True), 0.0)
    assert torch.allclose(grad, want, atol=1e-12)


# --- grounding: masked, chunked, mean ---------------------------------------------------------------------------

def _inputs(dtype, b=4, n=11, d=6, c=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, d, generator=g, dtype=dtype)
    codebook = torch.randn(c, d, generator=g, dtype=dtype)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, 5:], mask[1, 1:], mask[3, :] = False, False, False  # row 3: nothing valid (scores 0, no gradient)
    return q, codebook, mask


@pytest.mark.parametrize("chunk", [0, 1, 3, 11, 64])
@pytest.mark.parametrize("pool", ["max", "mean"])
def test_padding_never_counts(pool, chunk):
    q, codebook, mask = _inputs(torch.float64)
    r = ground(q, codebook, mask, 0.5, pool, chunk)
    q2 = q.clone()
    q2[~mask] = 100.0 * torch.randn(int((~mask).sum()), q.shape[-1], dtype=torch.float64)  # huge padding
    assert torch.equal(r, ground(q2, codebook, mask, 0.5, pool, chunk))
    assert torch.equal(r[3], torch.zeros(13, dtype=torch.float64))
    a = relevance(q, codebook, 0.5)
    valid = a[0, :5].amax(0) if pool == "max" else a[0, :5].mean(0)
    assert torch.allclose(r[0], valid, atol=1e-12) and torch.allclose(r[1], a[1, 0], atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [1, 4, 11, 50])
@pytest.mark.parametrize("masked", [True, False])
def test_chunked_max_equals_naive_in_values_and_gradients(dtype, tol, chunk, masked):
    q0, code0, mask = _inputs(dtype, seed=chunk)
    mask = mask if masked else None
    g = torch.randn(4, 13, dtype=dtype)
    results = []
    for c in (0, chunk):
        q, code = q0.clone().requires_grad_(), code0.clone().requires_grad_()
        r = ground(q, code, mask, 0.3, "max", c)
        (r * g).sum().backward()
        results.append((r.detach(), q.grad, code.grad))
    for want, got in zip(*results):
        assert torch.allclose(got, want, atol=tol, rtol=tol)
    if masked:
        assert (results[1][1][~mask] == 0).all()  # padding never wins, so it gets no gradient


def test_chunked_max_gradcheck():
    q, code, mask = _inputs(torch.float64, b=4, n=5, d=3, c=4)
    fn = lambda q, code: ground(q, code, mask, 0.7, "max", 2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q.requires_grad_(), code.requires_grad_()))


# --- head --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["sparsemax", "softmax", "sigmoid"])
def test_head_shapes_and_normalisation(norm):
    torch.manual_seed(0)
    head = FDTHead(image_width=10, text_width=12, codebook_size=20, dim=8, t_fdt=0.1, norm=norm, chunk=3)
    z, w = head.image(torch.randn(3, 7, 10))
    assert z.shape == (3, 8) and w.shape == (3, 20)
    assert torch.allclose(z.norm(dim=-1), torch.ones(3), atol=1e-5) and (w >= 0).all()
    if norm != "sigmoid":
        assert torch.allclose(w.sum(-1), torch.ones(3), atol=1e-5)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    tokens = torch.randn(2, 6, 12)
    zt, wt = head.text(tokens, mask)
    assert zt.shape == (2, 8) and wt.shape == (2, 20)
    other = tokens.clone()
    other[0, 4:] = 50.0  # padded words change nothing
    assert torch.equal(head.text(other, mask)[0], zt)
    assert torch.allclose(zt, F.normalize(wt @ head.codebook.weight, dim=-1), atol=1e-6)  # z = normalize(w F)
    assert head.image_relevance(torch.randn(3, 7, 10)).shape == (3, 7, 20)
    a = head.text_relevance(tokens, mask)
    assert a.shape == (2, 6, 20) and torch.isinf(a[0, 4:]).all()
    assert 20.0 <= head.scale().item() <= 100.0


def test_sparsemax_head_is_sparse_at_a_small_temperature():
    torch.manual_seed(0)
    head = FDTHead(10, 10, codebook_size=64, dim=8, t_fdt=0.01)
    _, w = head.image(torch.randn(4, 5, 10))
    assert ((w > 0).sum(-1) < 64).all()


# --- model and objective -----------------------------------------------------------------------------------------

TINY = ["model.embed_dim=16", "model.image.width=16", "model.image.layers=2", "model.text.width=16",
        "model.text.layers=1", "model.text.heads=2", "data.image_size=16", "model.fdt.codebook_size=32",
        "model.fdt.chunk=3"]


def _setup(weights: dict, extra=(), batch_size: int = 6):
    cfg = load_config(None, TINY + [f"loss.weights.{k}={v}" for k, v in weights.items()] + list(extra)
                      + ([] if "clip" in weights else ["loss.weights.clip=0"]))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.image_size, vocab_size=50, loss=cfg.loss)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.rand(batch_size, 3, 16, 16, generator=g),
             "text": torch.randint(1, 50, (batch_size, 8), generator=g),
             "text_mask": torch.ones(batch_size, 8, dtype=torch.bool)}
    batch["text_mask"][::2, 5:] = False
    return model, Objective(cfg.loss), batch


@pytest.mark.parametrize("weights,extra", [({"fdt": 1}, []), ({"clip": 1, "fdt": 1}, []),
                                           ({"fdt": 1}, ["model.image.kind=vit", "model.image.patch_size=8",
                                                         "model.image.heads=2", "model.fdt.pool=mean"])],
                         ids=["fdt", "clip+fdt", "vit-mean"])
def test_model_trains_and_evaluates_with_fdt_embeddings(weights, extra):
    model, objective, batch = _setup(weights, extra)
    out = model(batch)
    losses = objective(out)
    assert set(losses) == {f"{k}_loss" for k in weights} | {"loss"} and torch.isfinite(losses["loss"])
    assert (out.first_emb is not None) == ("clip" in weights)
    assert 1 <= out.stats["fdt_image_active"].item() <= 32 and 1 <= out.stats["fdt_text_active"].item() <= 32
    losses["loss"].backward()
    unused = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    if "clip" in weights:
        assert not unused  # DDP runs without find_unused_parameters
    else:
        assert not model.clip_on  # the loop passes find_unused_parameters=True: the CLIP head is idle
        assert unused == {"logit_scale", "image_head.proj.weight", "text_head.proj.weight"}
    assert model.fdt.codebook.weight.grad.abs().sum() > 0 and model.text_encoder.embed.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        zi, zt = model.encode_image(batch["image"]), model.encode_text(batch["text"], batch["text_mask"])
        again = model(batch)
        n_patches = 4 if "model.image.kind=vit" in extra else 16  # 2×2 patches (the ViT's CLS dropped), 4×4 cells
        assert model.fdt_image_relevance(batch["image"][:2]).shape == (2, n_patches, 32)
        wi = model.fdt_image_weights(batch["image"])
        wt = model.fdt_text_weights(batch["text"], batch["text_mask"])
    assert zi.shape == zt.shape == (6, 16)
    assert torch.allclose(zi.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert torch.allclose(zt.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert torch.allclose(zi, again.fdt_image_emb, atol=1e-6) and torch.allclose(zt, again.fdt_text_emb, atol=1e-6)
    assert torch.allclose(wi.sum(-1), torch.ones(6), atol=1e-5) and wt.shape == (6, 32)


def test_fdt_logit_scale_is_kept_in_range_so_it_never_freezes():
    model, objective, batch = _setup({"fdt": 1})
    with torch.no_grad():
        model.fdt.logit_scale.fill_(1.0)  # an optimiser step took it below ln 20
    assert model.fdt.scale().item() == pytest.approx(20.0)
    model.after_step(DualOutput())
    objective(model(batch))["loss"].backward()
    assert model.fdt.logit_scale.grad.abs() > 0 and model.fdt.scale().item() == pytest.approx(20.0)


def test_no_fdt_head_without_the_term():
    model, _, batch = _setup({"clip": 1})
    out = model(batch)
    assert model.fdt is None and not any(k.startswith("fdt") for k in out.fields_set()) and not out.stats


def test_fdt_local_shares_average_to_the_global_loss():
    g = torch.Generator().manual_seed(0)
    a, b = (F.normalize(torch.randn(8, 5, generator=g), dim=-1) for _ in range(2))
    scale = torch.tensor(20.0)
    want = info_nce(a, b, scale)
    cfg = Objective({"fdt": 1}).cfg
    shares = [fdt_term(DualOutput(fdt_image_emb=a[s:s + 4], fdt_text_emb=b[s:s + 4], fdt_logit_scale=scale,
                                  gathered=DualOutput(fdt_image_emb=a, fdt_text_emb=b), rank_offset=s), cfg)
              for s in (0, 4)]
    assert torch.allclose(sum(shares) / 2, want, atol=1e-6)
    assert torch.allclose(fdt_term(DualOutput(fdt_image_emb=a, fdt_text_emb=b, fdt_logit_scale=scale), cfg), want)


WORLD = 2


def _worker(rank: int, init_file: str, out_file: str):
    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    got = {}
    for name, weights in (("fdt", {"fdt": 1}), ("both", {"clip": 1, "fdt": 1})):
        model, objective, batch = _setup(weights, batch_size=8)
        local = {k: v[rank * 4: (rank + 1) * 4] for k, v in batch.items()}
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=not model.clip_on)
        loss = objective(distributed.gather_embeddings(ddp(local)))["loss"]
        loss.backward()
        got[name] = {"loss": distributed.mean_over_ranks(loss),
                     "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}
    if rank == 0:
        torch.save(got, out_file)
    dist.barrier()
    os._exit(0)  # skip interpreter teardown (gloo threads can abort there)


def test_two_processes_equal_one_process_full_batch(tmp_path):
    out_file = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(str(tmp_path / "init"), out_file), nprocs=WORLD, join=True)
    got = torch.load(out_file)
    for name, weights in (("fdt", {"fdt": 1}), ("both", {"clip": 1, "fdt": 1})):
        model, objective, batch = _setup(weights, batch_size=8)
        loss = objective(model(batch))["loss"]
        loss.backward()
        want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert torch.allclose(got[name]["loss"], loss.detach(), atol=1e-5), name
        assert set(got[name]["grads"]) == set(want), name
        for n, g in want.items():
            assert torch.allclose(got[name]["grads"][n], g, atol=1e-5, rtol=1e-4), (name, n)


# --- config and logging ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,match", [("model.fdt.norm", "relu", "sparsemax, softmax, sigmoid"),
                                             ("model.fdt.pool", "cls", "max, mean"),
                                             ("model.fdt.codebook_size", 0, "codebook_size"),
                                             ("model.fdt.t_fdt", -1.0, "t_fdt"),
                                             ("model.fdt.chunk", -2, "chunk"),
                                             ("model.fdt.logit_scale_range", [100, 20], "logit_scale_range")])
def test_bad_fdt_config_is_a_clear_error(key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"{key}={json.dumps(value)}"])


def test_fdt_config_reaches_the_head():
    cfg = Config()
    for k, v in [("model.fdt.dim", 24), ("model.fdt.norm", "softmax"), ("model.fdt.pool", "mean"),
                 ("model.fdt.t_fdt", 10.0), ("loss.weights.fdt", 0.5)]:
        set_key(cfg, k, v)
    head = build_model(cfg.model, 48, 100, cfg.loss).fdt
    assert head.codebook.weight.shape == (1024, 24) and (head.norm, head.pool) == ("softmax", "mean")
    assert head.relevance_scale == pytest.approx(1 / (24 ** 0.5 * 10))


def test_training_log_has_the_sparsity(tmp_path, tiny_overrides):
    from polyalign.app.training import train

    over = tiny_overrides + ["loss.weights.fdt=1", "loss.weights.clip=0", "train.max_steps=2",
                             "train.checkpoint_every=2", "eval.n_examples=0", "model.fdt.codebook_size=64"]
    train(load_config(None, over), tmp_path / "run", show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert 1 <= r["fdt_image_active"] <= 64 and 1 <= r["fdt_text_active"] <= 64
        assert 20 <= r["fdt_logit_scale"] <= 100 and "fdt_loss" in r


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_inspect_fdt_report(tmp_path, tiny_overrides, kind):
    from polyalign.cli import main
    from polyalign.app.training import train

    over = tiny_overrides + ["loss.weights.fdt=1", "loss.weights.clip=0", "train.max_steps=2", f"model.image.kind={kind}",
                             "train.checkpoint_every=2", "eval.n_examples=0", "model.fdt.codebook_size=64",
                             "model.fdt.t_fdt=1"]
    train(load_config(None, over), tmp_path / "run", show_progress=False)
    assert main(["inspect", "fdt", str(tmp_path / "run"), "--samples", "3", "--tokens", "4"]) == 0
    out = tmp_path / "run" / "inspect-fdt"
    for name in ("samples.png", "tokens.png", "report.html"):
        assert (out / name).stat().st_size > 1000
    report = json.loads((out / "report.json").read_text())
    assert report["items"] == 96 and report["codebook_size"] == 64
    assert 1 <= report["mean_active_image"] <= 64 and 1 <= report["mean_active_text"] <= 64
    assert len(report["samples"]) == 3 and len(report["tokens"]) == 4
    for t in report["tokens"]:
        assert t["words"] and all(isinstance(w, str) and w and not w.startswith("[") for w, _ in t["words"])
        weights = t["image_weights"]
        assert weights == sorted(weights, reverse=True)  # the images that weigh the token most, in order
    for s in report["samples"]:  # listed tokens are the active ones, heaviest first
        assert all(v > 0 for _, v in s["image_tokens"]) and len(s["image_tokens"]) <= 8
        assert set(s["shared"]) <= {c for c, _ in s["image_tokens"]}


def test_inspect_fdt_needs_an_fdt_run(tmp_path, tiny_overrides):
    from polyalign.cli import main
    from polyalign.app.training import train

    train(load_config(None, tiny_overrides + ["train.max_steps=2", "train.checkpoint_every=2", "eval.n_examples=0"]),
          tmp_path / "run", show_progress=False)
    assert main(["inspect", "fdt", str(tmp_path / "run")]) == 1
