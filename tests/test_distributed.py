"""Real 2-process gloo runs (spawned processes, no mocks): the loss and gradients of one step equal the
1-process full-batch ones, for the dense and the tiled loss, with BatchNorm in the image tower."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from polyalign import distributed
from polyalign.config import LossConfig, load_config
from polyalign.errors import PolyalignError
from polyalign.models.build import build_model
from polyalign.losses.objective import Objective

WORLD, BATCH = 2, 16


def _setup(contrastive: str):
    cfg = load_config(None, ["model.embed_dim=16", "model.image.width=16", "model.image.layers=2",
                             "model.text.width=16", "model.text.layers=1", "model.text.heads=2",
                             "data.image_size=16", f"loss.contrastive={contrastive}", "loss.tile=5"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.image_size, vocab_size=50)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.rand(BATCH, 3, 16, 16, generator=g),
             "text": torch.randint(0, 50, (BATCH, 8), generator=g), "text_mask": torch.ones(BATCH, 8, dtype=torch.bool)}
    batch["text_mask"][:, 6:] = False
    return model, Objective(cfg.loss), batch


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, init_file: str, contrastive: str, out_file: str):
    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model, objective, batch = _setup(contrastive)
    local = {k: v[rank * BATCH // WORLD: (rank + 1) * BATCH // WORLD] for k, v in batch.items()}
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loss = objective(distributed.gather_embeddings(ddp(local)))["loss"]
    loss.backward()
    shown = distributed.mean_over_ranks(loss)
    if rank == 0:
        torch.save({"loss": shown, "grads": _grads(model)}, out_file)
    dist.barrier()  # both ranks are done with every collective
    os._exit(0)  # skip interpreter teardown: gloo's threads occasionally abort there (SIGABRT) under a loaded suite


@pytest.mark.parametrize("contrastive", ["dense", "tiled"])
def test_two_processes_equal_one_process_full_batch(tmp_path, contrastive):
    out_file = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(str(tmp_path / "init"), contrastive, out_file), nprocs=WORLD, join=True)
    got = torch.load(out_file)
    model, objective, batch = _setup(contrastive)
    loss = objective(model(batch))["loss"]
    loss.backward()
    want = _grads(model)
    assert torch.allclose(got["loss"], loss.detach(), atol=1e-5)
    assert set(got["grads"]) == set(want)
    for name, g in want.items():
        assert torch.allclose(got["grads"][name], g, atol=1e-5, rtol=1e-4), name


def test_single_process_helpers_are_identities():
    x = torch.randn(3, 4, requires_grad=True)
    assert distributed.all_gather_with_grad(x) is x and distributed.world_size() == 1
    out = {"image_emb": x}
    assert distributed.gather_embeddings(out) is out


def test_collective_timeout_from_environment(monkeypatch):
    monkeypatch.delenv("POLYALIGN_DIST_TIMEOUT_S", raising=False)
    assert distributed._timeout_from_env() == {}
    monkeypatch.setenv("POLYALIGN_DIST_TIMEOUT_S", "90")
    assert distributed._timeout_from_env()["timeout"].total_seconds() == 90
    for bad in ("ten", "0", "-5", "nan"):
        monkeypatch.setenv("POLYALIGN_DIST_TIMEOUT_S", bad)
        with pytest.raises(PolyalignError, match="POLYALIGN_DIST_TIMEOUT_S must be a positive number"):
            distributed._timeout_from_env()
