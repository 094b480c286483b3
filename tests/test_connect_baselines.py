"""C-MCR's fair baselines and options (arXiv 2305.14381): nearest/soft/random pseudo pairs, noise scaled by dimension,
no memories, the soft pivot with τ chosen on validation pairs, and the renamed anchor_x mode."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from polyalign.connect import ConnectData, ConnectedSpaces, connect, load_connect_config, pseudo_pairs, run_connect
from polyalign.connect import train as train_module
from polyalign.connect.evaluate import TAU_GRID, ClassifySet, _recalls, choose_tau, evaluate, soft_pivot
from polyalign.eval.bootstrap import paired_difference, seed_query_resamples
from polyalign.connect.train import noise_stds, train_connection
from polyalign.errors import ConfigError
from polyalign.losses.cmcr import soft_retrieve
from test_connect import QUIET, one_torch_thread, save_npy, small_cfg, synthetic, unit  # noqa: F401 (autouse fixture)


def raw_data(seed=0, n=50, m=103, dx=16, dy=24) -> ConnectData:
    """B rows normalised, memories deliberately *not* normalised: a pseudo pair copied as it is stays unnormalised."""
    g = torch.Generator().manual_seed(seed)
    return ConnectData(unit(n, dx, seed=seed), unit(n, dy, seed=seed + 1), 3 * torch.randn(m, dx, generator=g),
                       0.5 * torch.randn(m, dy, generator=g))


# ── pseudo pairs ─────────────────────────────────────────────────────────────────────────────────────────────────
def test_nearest_pseudo_pairs_are_the_raw_memory_row_of_highest_dot_product():
    data = raw_data()
    method = small_cfg("method.pseudo_pairs=nearest", "method.query_chunk=7", "method.memory_chunk=5").method
    a_x, c_y = pseudo_pairs(data, method, torch.Generator().manual_seed(0))
    for b, memory, got in ((data.b_x, data.memory_a, a_x), (data.b_y, data.memory_c, c_y)):
        best = torch.tensor([max(range(len(memory)), key=lambda j: float(q @ memory[j])) for q in b])  # brute force
        assert torch.equal(got, memory[best])  # bit-identical: no averaging, no normalisation
        assert not torch.allclose(got.norm(dim=1), torch.ones(len(b)))  # the memory rows' own norms kept


def test_soft_pseudo_pairs_equal_a_brute_force_softmax():
    data = raw_data(seed=3)
    method = small_cfg("method.tau_memory=0.05", "method.query_chunk=8", "method.memory_chunk=6").method
    a_x, c_y = pseudo_pairs(data, method, torch.Generator().manual_seed(0))
    for b, memory, got in ((data.b_x, data.memory_a, a_x), (data.b_y, data.memory_c, c_y)):
        logits = [[float(q @ r) / 0.05 for r in memory.double()] for q in b.double()]
        weights = torch.tensor([[math.exp(x - max(row)) for x in row] for row in logits], dtype=torch.float64)
        ref = F.normalize((weights / weights.sum(1, keepdim=True)) @ memory.double(), dim=-1).float()
        assert torch.allclose(got, ref, atol=1e-5)
    nearest = pseudo_pairs(data, small_cfg("method.pseudo_pairs=nearest").method, torch.Generator())[0]
    assert not torch.allclose(a_x, F.normalize(nearest, dim=-1), atol=1e-3)  # soft is an average, not the nearest row


def test_random_pseudo_pairs_are_memory_rows_not_the_nearest():
    data = raw_data()
    a_x, _ = pseudo_pairs(data, small_cfg("method.pseudo_pairs=random").method, torch.Generator().manual_seed(0))
    rows = {tuple(r.tolist()) for r in data.memory_a}
    assert all(tuple(r.tolist()) in rows for r in a_x)
    near, _ = pseudo_pairs(data, small_cfg("method.pseudo_pairs=nearest").method, torch.Generator())
    assert (a_x == near).all(1).float().mean() < 0.2


def test_replaced_keys_and_values_fail_with_the_new_name(tmp_path):
    with pytest.raises(ConfigError, match=r"replaced by method\.pseudo_pairs \(soft \| nearest \| random\)"):
        load_connect_config(None, ["method.semantic_consistency=false"])
    (tmp_path / "c.yaml").write_text("method: {semantic_consistency: true}\n")
    with pytest.raises(ConfigError, match="method.pseudo_pairs"):
        load_connect_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="method.pseudo_pairs.*soft, nearest, random"):
        load_connect_config(None, ["method.pseudo_pairs=hard"])
    for make in (lambda: load_connect_config(None, ["method.mode=exmcr"]), lambda: ConnectedSpaces(8, 8, mode="exmcr")):
        with pytest.raises(ConfigError, match="renamed method.mode=anchor_x.*not its released recipe"):
            make()
    with pytest.raises(ConfigError, match="eval.a_val and eval.c_val"):
        load_connect_config(None, ["eval.a_val=a.npy"])
    assert load_connect_config(None, ["method.mode=anchor_x"]).method.mode == "anchor_x"


def test_a_model_saved_as_exmcr_loads_as_anchor_x(tmp_path):
    model = ConnectedSpaces(8, 12, mode="anchor_x")
    model.save(tmp_path)
    meta = json.loads((tmp_path / "connector.json").read_text())
    (tmp_path / "connector.json").write_text(json.dumps({**meta, "mode": "exmcr"}))
    again = ConnectedSpaces.load(tmp_path)
    assert again.info["mode"] == "anchor_x"
    assert torch.allclose(again.embed(unit(3, 12), "y"), model.embed(unit(3, 12), "y"))


# ── noise scaled by dimension ────────────────────────────────────────────────────────────────────────────────────
def test_noise_scaled_by_dimension_per_space(monkeypatch):
    fixed, dim = small_cfg().method, small_cfg("method.noise_scale=dim").method
    assert noise_stds(fixed, (128, 512)) == (math.sqrt(0.004), math.sqrt(0.004))
    sx, sy = noise_stds(dim, (128, 512))
    assert sx**2 == pytest.approx(4 * 0.004) and sy**2 == pytest.approx(0.004)  # 512 is the reference
    assert noise_stds(small_cfg("method.noise_scale=dim", "method.noise_var=0").method, (128, 64)) == (0.0, 0.0)
    # training adds noise of exactly those stds: X's to b_x and a_x, Y's to b_y and c_y
    seen, add = [], train_module.add_noise
    monkeypatch.setattr(train_module, "add_noise", lambda e, std, g: (seen.append((e.shape[1], std)), add(e, std, g))[1])
    data = ConnectData(unit(64, 128), unit(64, 32, seed=1), unit(80, 128, seed=2), unit(80, 32, seed=3))
    logs = []
    train_connection(data, small_cfg("method.noise_scale=dim", "method.dim=16", "train.epochs=1",
                                     "train.batch_size=32"), logs.append)
    assert seen and set(seen) == {(128, math.sqrt(0.004 * 4)), (32, math.sqrt(0.004 * 16))}
    assert any(f"noise std {math.sqrt(0.016):.4g} in X (d = 128)" in m for m in logs)


# ── no memories ──────────────────────────────────────────────────────────────────────────────────────────────────
def test_without_memories_it_trains_on_b_pairs_alone_and_ignores_memories():
    data, test = synthetic(n_b=800, n_mem=300, n_test=100)
    cfg = small_cfg("method.memories=false", "train.epochs=8", "train.log_every=1")
    other = synthetic(seed=5, n_b=10, n_mem=400, n_test=2)[0]  # other memories, another size
    models, rows = [], []
    for memories in ((data.memory_a, data.memory_c), (other.memory_a, other.memory_c), (None, None)):
        m, r = train_connection(ConnectData(data.b_x, data.b_y, *memories), cfg, QUIET)
        models.append(m.state_dict())
        rows.append(r)
    for sd in models[1:]:
        assert all(torch.equal(sd[k], models[0][k]) for k in sd)  # the memories make no difference
    assert all(r["pseudo_loss"] == 0 and r["intra_loss"] == 0 and r["loss"] == r["native_loss"] for r in rows[0])
    assert rows[0][-1]["loss"] < 0.7 * rows[0][0]["loss"]  # it learns
    model = connect(data.b_x, data.b_y, cfg=cfg, log=QUIET)  # the Python API without memories, or ignoring them
    ignored = connect(data.b_x, data.b_y, other.memory_a, other.memory_c[:7], cfg=cfg, log=QUIET).state_dict()
    assert all(torch.equal(model.state_dict()[k], ignored[k]) for k in ignored)
    m = evaluate(model, (data.b_x, data.b_y), test)
    assert m["connected/a2c_R@1"] > 5 * m["chance/a2c_R@1"]
    with pytest.raises(ConfigError, match="memory_a"):  # memories on, none given
        train_connection(ConnectData(data.b_x, data.b_y), small_cfg(), QUIET)


# ── the soft pivot ───────────────────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("tau", [0.01, 0.3])
def test_soft_pivot_equals_brute_force(tau):
    queries, b_from, b_to = unit(21, 16, seed=1), unit(57, 16, seed=2), unit(57, 24, seed=3)
    w = torch.softmax(queries.double() @ b_from.double().T / tau, dim=1)
    ref = (w @ b_to.double()) / (w @ b_to.double()).norm(dim=1, keepdim=True)
    assert torch.allclose(soft_pivot(queries, b_from, b_to, tau), ref.float(), atol=1e-5)
    chunked = soft_retrieve(queries, b_from, tau, query_chunk=4, memory_chunk=9, values=b_to)
    assert torch.allclose(chunked, ref.float(), atol=1e-5)
    hard = b_to[(queries @ b_from.T).argmax(1)]  # a very small τ: the hard pivot
    assert torch.allclose(soft_pivot(queries, b_from, b_to, 1e-4), hard, atol=1e-4)


def test_soft_pivot_tau_is_chosen_on_validation_pairs():
    data, test = synthetic(n_b=500, n_mem=10, n_test=60)
    _, val = synthetic(n_b=10, n_mem=10, n_test=60)  # the same spaces (seed 0), other pairs
    b = {"x": data.b_x, "y": data.b_y}
    tau, score = choose_tau(val, b, chunk=16)
    ref = []
    for t in TAU_GRID:  # brute force: mean R@1 of both directions of the soft pivot on the val pairs
        a2c = _recalls(soft_pivot(val.a, b["x"], b["y"], t), val.c, val.c_to_a, 8)["a2c_R@1"]
        c2a = _recalls(val.a, soft_pivot(val.c, b["y"], b["x"], t), val.c_to_a, 8)["c2a_R@1"]
        ref.append((a2c + c2a) / 2)
    assert score == pytest.approx(max(ref)) and tau == TAU_GRID[ref.index(max(ref))]
    model = ConnectedSpaces(32, 32).eval()
    with_val = evaluate(model, (data.b_x, data.b_y), test, val=val, tau=0.123)
    assert with_val["soft_pivot/tau"] == tau and with_val["soft_pivot/tau_from"] == "val"
    default = evaluate(model, (data.b_x, data.b_y), test, tau=0.123)
    assert default["soft_pivot/tau"] == 0.123 and default["soft_pivot/tau_from"] == "default"
    keys = {f"{d}_{k}" for d in ("a2c", "c2a") for k in ("R@1", "R@5", "R@10", "MdR")}
    assert {f"soft_pivot/{k}" for k in keys} <= set(default) and {f"pivot/{k}" for k in keys} <= set(default)
    a2c = _recalls(soft_pivot(test.a, data.b_x, data.b_y, 0.123), test.c, test.c_to_a, 8)["a2c_R@1"]
    assert default["soft_pivot/a2c_R@1"] == pytest.approx(a2c)
    assert not any(k.startswith("soft_pivot/") for k in evaluate(model, retrieval=test))  # no B: no pivots


def test_cli_run_without_memories_with_validation_pairs(tmp_path):
    data, test = synthetic(n_b=400, n_mem=10, n_test=80)
    _, val = synthetic(n_b=10, n_mem=10, n_test=40)
    for name, x in {"b_x": data.b_x, "b_y": data.b_y, "a_test": test.a, "c_test": test.c, "a_val": val.a,
                    "c_val": val.c}.items():
        save_npy(tmp_path / f"{name}.npy", x)
    cfg = {"inputs": {"b_x": "b_x.npy", "b_y": "b_y.npy"},
           "eval": {k: f"{k}.npy" for k in ("a_test", "c_test", "a_val", "c_val")},
           "method": {"memories": False, "noise_scale": "dim"}, "train": {"batch_size": 100, "epochs": 2,
                                                                          "threads": 1, "log_every": 4}}
    (tmp_path / "connect.yaml").write_text(yaml.safe_dump(cfg))
    metrics = run_connect(load_connect_config(tmp_path / "connect.yaml"), tmp_path / "run", log=QUIET)
    assert metrics["inputs/n_memory_a"] == 0 and metrics["soft_pivot/tau_from"] == "val"
    assert metrics["soft_pivot/tau"] in TAU_GRID and 0 <= metrics["soft_pivot/c2a_R@1"] <= 1
    assert metrics["train/noise_std_x"] == pytest.approx(math.sqrt(0.004 * 512 / 32))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["soft_pivot/tau"] == metrics["soft_pivot/tau"]
    assert np.isfinite(metrics["train/final_loss"])
    ranks = np.load(tmp_path / "run" / "ranks.npz")  # per-query ranks of every method, for intervals over queries
    assert {f"{m}.{d}" for m in ("connected", "pivot", "soft_pivot") for d in ("c2a", "a2c")} == set(ranks.files)
    for m in ("connected", "pivot", "soft_pivot"):
        assert (ranks[f"{m}.c2a"] < 10).mean() == pytest.approx(metrics[f"{m}/c2a_R@10"])
        assert np.median(ranks[f"{m}.a2c"]) + 1 == pytest.approx(metrics[f"{m}/a2c_MdR"], abs=0.5)


# ── per-query values and intervals over seeds and queries ────────────────────────────────────────────────────────
def test_per_query_values_are_what_the_figures_summarise():
    data, test = synthetic(n_b=300, n_mem=10, n_test=70)
    model = ConnectedSpaces(32, 32).eval()
    g = torch.Generator().manual_seed(5)
    classify = ClassifySet(unit(6, 32, seed=8), test.c, torch.randint(0, 6, (70,), generator=g), "x")
    per_query = {}
    m = evaluate(model, (data.b_x, data.b_y), test, classify, chunk_size=16, per_query=per_query)
    for method in ("connected", "pivot", "soft_pivot"):
        c2a, a2c, hit = (per_query[f"{method}/{k}"] for k in ("c2a", "a2c", "classify_hit"))
        assert c2a.shape == (70,) and a2c.shape == (torch.unique(test.c_to_a).numel(),)
        for k in (1, 5, 10):
            assert (c2a < k).float().mean().item() == pytest.approx(m[f"{method}/c2a_R@{k}"])
            assert (a2c < k).float().mean().item() == pytest.approx(m[f"{method}/a2c_R@{k}"])
        assert c2a.float().median().item() + 1 == m[f"{method}/c2a_MdR"]
        assert hit.float().mean().item() == pytest.approx(m[f"{method}/classify_acc"])
    # brute force: the connected model's C → A rank = how many A items score strictly higher than the positive
    a, c = model.embed(test.a, "x"), model.embed(test.c, "y")
    sims = c @ a.T
    ref = (sims > sims[torch.arange(70), test.c_to_a][:, None]).sum(1)
    assert torch.equal(per_query["connected/c2a"], ref)


def test_seed_query_bootstrap_is_paired_and_covers_the_seeds():
    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 50, size=(3, 200))
    recall = lambda r: (r < 10).mean(-1)  # noqa: E731
    observed, samples = seed_query_resamples(ranks, ranks, recall, 500)
    assert observed == 0 and np.all(samples == 0)  # the same draw for both methods: no difference ever
    assert paired_difference(np.zeros((3, 40)), np.full((3, 40), 99), recall, 300) == (1.0, 1.0, 1.0)
    per_seed = np.repeat(np.array([[0], [20], [20]]), 30, axis=1)  # seeds differ, queries within a seed do not
    diff, low, high = paired_difference(per_seed, np.full((3, 30), 99), recall, 2000)
    assert diff == pytest.approx(1 / 3) and low == 0 and high == 1  # only resampling the seeds moves the figure
    # queries are resampled too: one seed, R@10 ≈ 0.3 over 400 queries: the interval is the binomial ±1.96 σ
    ranks_one_seed = np.where(rng.random((1, 400)) < 0.3, 0, 20)  # rank 0 (a hit) or 20 (a miss)
    diff, low, high = paired_difference(ranks_one_seed, np.full((1, 400), 99), recall, 4000)
    sd = (diff * (1 - diff) / 400) ** 0.5
    assert high - low == pytest.approx(2 * 1.96 * sd, rel=0.15)
    with pytest.raises(ValueError, match="one shape"):
        seed_query_resamples(ranks, ranks[:, :10], recall)


def test_soft_pivot_tau_is_chosen_on_validation_items_to_classify(tmp_path):
    data, test = synthetic(n_b=300, n_mem=10, n_test=60)
    g = torch.Generator().manual_seed(2)
    classes = unit(5, 32, seed=9)
    val = ClassifySet(classes, test.c[:30], torch.randint(0, 5, (30,), generator=g), "x")
    b = {"x": data.b_x, "y": data.b_y}
    tau, acc = choose_tau(val, b)
    ref = []
    for t in TAU_GRID:  # brute force: each item → softmax over B in Y → X, nearest class
        w = torch.softmax(val.items.double() @ data.b_y.double().T / t, dim=1)
        ref.append(((w @ data.b_x.double()) @ classes.double().T).argmax(1).eq(val.labels).double().mean().item())
    assert acc == pytest.approx(max(ref)) and tau == TAU_GRID[ref.index(max(ref))]
    # from files: eval.items_val + eval.labels_val choose τ; the metrics say so
    save_npy(tmp_path / "b_x.npy", data.b_x), save_npy(tmp_path / "b_y.npy", data.b_y)
    save_npy(tmp_path / "classes.npy", classes, [f"c{k}" for k in range(5)])
    for name, items, labels in (("items", test.c[30:], val.labels), ("items_val", val.items, val.labels)):
        save_npy(tmp_path / f"{name}.npy", items)
        (tmp_path / f"{name}.labels.txt").write_text("".join(f"c{k}\n" for k in labels.tolist()))
    cfg = {"inputs": {"b_x": "b_x.npy", "b_y": "b_y.npy"}, "method": {"memories": False},
           "eval": {"classes": "classes.npy", "items": "items.npy", "labels": "items.labels.txt",
                    "items_val": "items_val.npy", "labels_val": "items_val.labels.txt"},
           "train": {"batch_size": 100, "epochs": 1, "threads": 1, "log_every": 4}}
    (tmp_path / "connect.yaml").write_text(yaml.safe_dump(cfg))
    metrics = run_connect(load_connect_config(tmp_path / "connect.yaml"), tmp_path / "run", log=QUIET)
    assert metrics["soft_pivot/tau"] == tau and metrics["soft_pivot/val_acc"] == pytest.approx(acc)
    assert set(np.load(tmp_path / "run" / "ranks.npz").files) == {f"{m}.classify_hit" for m in
                                                                  ("connected", "pivot", "soft_pivot")}
    cfg["eval"].pop("labels_val")
    (tmp_path / "half.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="both eval.items_val and eval.labels_val"):
        load_connect_config(tmp_path / "half.yaml")
