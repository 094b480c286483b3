"""C-MCR connection (arXiv 2305.14381) on precomputed embeddings: pieces, model, training, evaluation, CLI."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from polyalign.cli import main
from polyalign.config.tree import parse_override, set_key
from polyalign.connect import (ConnectConfig, ConnectData, ConnectedSpaces, connect, load_connect_config, pseudo_pairs,
                               train_connection)
from polyalign.connect.embeddings import Embeddings, join_by_id, read_embeddings
from polyalign.connect.evaluate import RetrievalSet, _chance_recalls, _recalls, evaluate
from polyalign.eval.retrieval import retrieval_metrics
from polyalign.errors import ConfigError, DataError
from polyalign.losses.cmcr import add_noise, cmcr_loss, intra_alignment, soft_retrieve

QUIET = lambda msg: None  # noqa: E731


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: one thread is fastest, and steady on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def synthetic(seed=0, k=8, d=32, n_b=2000, n_mem=2000, n_test=200, noise=0.05, gap=0.5):
    """Latent z → A, B in space X (rotation U_x) and B, C in space Y (rotation U_y), each modality with its own
    offset (a modality gap) and noise. Training sees B in both spaces and unpaired memories of A and C; the test
    pairs (A, C) share a latent and are never used in training."""
    g = torch.Generator().manual_seed(seed)
    rot = lambda: torch.linalg.qr(torch.randn(d, d, generator=g))[0][:, :k]  # noqa: E731  (d, k)
    u_x, u_y = rot(), rot()
    gaps = {m: gap * F.normalize(torch.randn(d, generator=g), dim=0) for m in ("a", "bx", "by", "c")}
    def emb(z, u, m):  # (n, d)
        return F.normalize(z @ u.T + gaps[m] + noise * torch.randn(len(z), d, generator=g), dim=-1)

    latent = lambda n: F.normalize(torch.randn(n, k, generator=g), dim=-1)  # noqa: E731
    z_b, z_a, z_c, z_t = latent(n_b), latent(n_mem), latent(n_mem), latent(n_test)
    data = ConnectData(emb(z_b, u_x, "bx"), emb(z_b, u_y, "by"), emb(z_a, u_x, "a"), emb(z_c, u_y, "c"))
    test = RetrievalSet(emb(z_t, u_x, "a"), emb(z_t, u_y, "c"), torch.arange(n_test))
    return data, test


def small_cfg(*overrides) -> ConnectConfig:
    cfg = ConnectConfig()
    for text in ("train.batch_size=256", "train.epochs=10", "train.threads=1", "train.log_every=1000", *overrides):
        set_key(cfg, *parse_override(text))
    return cfg


@pytest.fixture(scope="module")
def problem():
    return synthetic()


@pytest.fixture(scope="module")
def trained(problem):
    """One short C-MCR run per ablation on the synthetic problem: (model, logged rows, metrics)."""
    data, test = problem
    runs = {}
    for name, overrides in {"cmcr": (), "random_pairs": ("method.pseudo_pairs=random",),
                            "no_noise": ("method.noise_var=0",), "no_intra": ("method.intra_weight=0",),
                            "anchor_x": ("method.mode=anchor_x",)}.items():
        model, rows = train_connection(data, small_cfg("train.log_every=7", *overrides), QUIET)
        runs[name] = (model, rows, evaluate(model, (data.b_x, data.b_y), test))
    return runs


# ── semantic consistency, noise, losses ──────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("tau", [0.01, 0.001])
def test_soft_retrieval_weights_sum_to_one_and_equal_brute_force(tau):
    queries = unit(37, 50, seed=1)
    eye = torch.eye(50)  # memory = identity basis: the weighted mean *is* the softmax weights
    weights = soft_retrieve(queries, eye, tau, query_chunk=8, memory_chunk=7, normalize=False)
    assert torch.allclose(weights.sum(1), torch.ones(37), atol=1e-5)
    assert torch.allclose(weights, torch.softmax(queries @ eye.T / tau, dim=1), atol=1e-6)
    memory = unit(103, 50, seed=2)
    brute = F.normalize(torch.softmax(queries @ memory.T / tau, dim=1) @ memory, dim=-1)
    chunked = soft_retrieve(queries, memory, tau, query_chunk=8, memory_chunk=7)
    assert torch.allclose(chunked, brute, atol=1e-5)
    assert torch.allclose(soft_retrieve(queries, memory, tau, query_chunk=1000, memory_chunk=1000), brute, atol=1e-5)


def test_soft_retrieval_bf16_is_close():
    queries, memory = unit(20, 64, seed=3), unit(500, 64, seed=4)
    fp32 = soft_retrieve(queries, memory, 0.05, memory_chunk=64)
    bf16 = soft_retrieve(queries, memory, 0.05, memory_chunk=64, dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and (fp32 * bf16).sum(1).min() > 0.98


def test_noise_keeps_unit_norm_is_fresh_and_off_at_zero():
    x = unit(64, 16, seed=0)
    g = torch.Generator().manual_seed(1)  # not x's seed: noise parallel to x would vanish in the normalisation
    a, b = add_noise(x, 0.063, g), add_noise(x, 0.063, g)
    for e in (a, b):
        assert torch.allclose(e.norm(dim=1), torch.ones(64), atol=1e-6)
    assert not torch.allclose(a, b) and not torch.allclose(a, x)
    assert 0.9 < (a * x).sum(1).mean() < 0.999  # a perturbation, not a new vector
    assert torch.equal(add_noise(x, 0.0, g), F.normalize(x, dim=-1))


def test_loss_terms():
    b_x, a_x, b_y, c_y = (unit(8, 16, seed=s) for s in range(4))
    assert torch.allclose(intra_alignment(b_x, b_x, b_y, b_y), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(intra_alignment(b_x, -b_x, b_y, b_y), torch.tensor(2.0), atol=1e-6)
    t = cmcr_loss(b_x, a_x, b_y, c_y, 0.05, 0.1, 0.3)
    assert torch.allclose(t["loss"], t["native_loss"] + t["pseudo_loss"] + 0.3 * t["intra_loss"])
    swapped = cmcr_loss(b_y, c_y, b_x, a_x, 0.05, 0.1, 0.3)  # symmetric in the two spaces
    assert torch.allclose(t["loss"], swapped["loss"], atol=1e-5)


# ── projectors and the connected model ───────────────────────────────────────────────────────────────────────
def test_projector_is_shared_by_both_modalities_of_a_space():
    model = ConnectedSpaces(16, 24, dim=12).train()
    seen = {"x": [], "y": []}
    for space in "xy":
        model.projector(space).register_forward_hook(lambda m, inp, out, s=space: seen[s].append(inp[0].shape[0]))
    out = model(unit(5, 16), unit(5, 16, seed=1), unit(5, 24), unit(5, 24, seed=1))
    assert seen == {"x": [10], "y": [10]}  # one module per space, both modalities in one batch
    assert {k: v.shape for k, v in out.items()} == {k: (5, 12) for k in ("b_x", "a_x", "b_y", "c_y")}
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"proj_x", "proj_y"}
    model.eval()
    out = model(unit(5, 16), unit(5, 16, seed=1), unit(5, 24), unit(5, 24, seed=1))
    assert torch.allclose(out["a_x"], model.embed(unit(5, 16, seed=1), "x"), atol=1e-6)
    assert torch.allclose(out["c_y"], model.embed(unit(5, 24, seed=1), "y"), atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_batchnorm_runs_in_eval_mode_at_inference(kind, tmp_path):
    model = ConnectedSpaces(16, 16, projector=kind).train()
    for seed in range(5):  # move the running statistics away from their init
        model(*(unit(32, 16, seed=seed * 4 + i) * 3 + 1 for i in range(4)))
    items = unit(10, 16, seed=99)
    one = model.embed(items[:1], "x")
    assert one.shape == (1, 16) and torch.equal(one, model.embed(items[:1], "x"))
    assert torch.allclose(one, model.embed(items, "x")[:1], atol=1e-6)  # independent of the batch: running stats
    assert model.training  # embed restores the mode it found
    assert torch.allclose(model.embed(items, "y").norm(dim=1), torch.ones(10), atol=1e-5)
    model.save(tmp_path)
    again = ConnectedSpaces.load(tmp_path)
    assert not again.training and torch.allclose(again.embed(items, "x"), model.embed(items, "x"), atol=1e-6)


def test_anchor_x_keeps_x_fixed_and_starts_from_identity():
    model = ConnectedSpaces(16, 16, mode="anchor_x")
    x = unit(6, 16)
    assert list(model.proj_x.parameters()) == []
    assert torch.allclose(model.embed(x, "x"), x) and torch.allclose(model.embed(x, "y"), x, atol=1e-6)
    with pytest.raises(ConfigError, match="method.dim"):
        ConnectedSpaces(16, 16, dim=8, mode="anchor_x")
    with pytest.raises(ConfigError, match="set method.dim"):
        ConnectedSpaces(16, 24)


# ── training on a synthetic problem ──────────────────────────────────────────────────────────────────────────
def test_connection_beats_chance_without_any_ac_pair(trained):
    m = trained["cmcr"][2]
    assert m["chance/a2c_R@1"] == pytest.approx(1 / 200)
    assert m["connected/a2c_R@1"] > 0.3 and m["connected/c2a_R@1"] > 0.3  # chance: 0.005
    assert m["connected/a2c_R@10"] > 0.8
    assert {"pivot/a2c_R@1", "pivot/c2a_R@10"} <= set(m)


def test_training_is_deterministic_given_a_seed(problem):
    data, _ = problem
    runs = [train_connection(data, small_cfg("train.epochs=1", f"train.seed={s}"), QUIET)[0] for s in (0, 0, 1)]
    w = [m.state_dict()["proj_x.net.0.weight"] for m in runs]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


def test_ablation_switches_change_behaviour(problem, trained):
    data, _ = problem
    full, no_sc = trained["cmcr"], trained["random_pairs"]
    # with random pseudo pairs (the ablation) they are plain memory rows, and A↔C retrieval collapses
    off = small_cfg("method.pseudo_pairs=random").method
    a_rand, _ = pseudo_pairs(data, off, torch.Generator().manual_seed(0))
    assert (a_rand @ data.memory_a.T).amax(dim=1).min() > 1 - 1e-5  # every row is a memory row
    a_soft, _ = pseudo_pairs(data, small_cfg().method, torch.Generator().manual_seed(0))
    assert ((a_soft @ data.memory_a.T).amax(dim=1) > 1 - 1e-5).float().mean() < 0.5  # soft means: most are not
    assert no_sc[2]["connected/a2c_R@1"] < 0.5 * full[2]["connected/a2c_R@1"]
    # noise off: the same seed gives different training
    assert [r["loss"] for r in trained["no_noise"][1]] != [r["loss"] for r in full[1]]
    # intra off: the objective is the two InfoNCE terms alone
    for row in trained["no_intra"][1]:
        assert row["loss"] == pytest.approx(row["native_loss"] + row["pseudo_loss"])
    for row in full[1]:
        assert row["loss"] == pytest.approx(row["native_loss"] + row["pseudo_loss"] + 0.1 * row["intra_loss"])
    # anchor_x: X stays the base space, Y is mapped into it, and A↔C still connects
    ex_model, _, ex = trained["anchor_x"]
    assert torch.allclose(ex_model.embed(data.b_x[:5], "x"), data.b_x[:5], atol=1e-6)
    assert ex["connected/a2c_R@1"] > 0.2


def test_python_api_takes_arrays_and_evaluates_without_pivot(problem, capsys):
    data, test = problem
    model = connect(2 * data.b_x[:500].numpy(), data.b_y[:500], data.memory_a, data.memory_c,
                    small_cfg("train.epochs=2"))
    assert "b_x: rows were not L2-normalised" in capsys.readouterr().out
    assert not model.training
    m = evaluate(model, retrieval=test)
    assert "connected/a2c_R@1" in m and "chance/c2a_R@5" in m and not any(k.startswith("pivot/") for k in m)
    with pytest.raises(ValueError, match="dim 32, got 31"):
        model.embed(test.a[:, :31], "x")


def test_recalls_and_median_ranks_equal_brute_force():
    a, c = unit(4, 4, seed=1), unit(14, 4, seed=2)
    c[0] = -a[0]  # A item 0's only C pair points away from it: its rank runs past the number of A items
    c_to_a = torch.tensor([0, 1, 1, 2, 2, 2, 2, 1, 1, 2, 1, 2, 1, 2])  # A item 3 has no C pair
    sims = c @ a.T
    c2a = torch.tensor([int((sims[j] > sims[j, c_to_a[j]]).sum()) + 1 for j in range(14)]).float()
    a2c = []
    for i in range(3):  # an A query's best C pair, ranked among the C items not paired with it
        own = c_to_a == i
        a2c.append(int((sims[~own, i] > sims[own, i].max()).sum()) + 1)
    a2c = torch.tensor(a2c).float()
    assert a2c.max() > 4  # the case a rank cap at the A count would get wrong
    m = _recalls(a, c, c_to_a, chunk=3)
    assert m["c2a_MdR"] == c2a.median().item() and m["a2c_MdR"] == a2c.median().item()
    for k in (1, 5, 10):
        assert m[f"c2a_R@{k}"] == pytest.approx((c2a <= k).float().mean().item())
        assert m[f"a2c_R@{k}"] == pytest.approx((a2c <= k).float().mean().item())
    # the same recalls as the training-side retrieval metric (top-k positions) on the same sets
    r = retrieval_metrics(a, c, c_to_a, (1, 5, 10), 4)
    assert [m[f"c2a_R@{k}"] for k in (1, 5, 10)] == pytest.approx([r[f"t2i_R@{k}"] for k in (1, 5, 10)])


def test_chance_recall_closed_form():
    c = _chance_recalls(torch.tensor([0, 0, 1, 2]), 3, ks=(1, 2))
    assert c["c2a_R@1"] == pytest.approx(1 / 3) and c["c2a_R@2"] == pytest.approx(2 / 3)
    # A→C among 4 C: item 0 has 2 positives (P(hit@1) = 1/2), items 1, 2 one each (1/4)
    assert c["a2c_R@1"] == pytest.approx((0.5 + 0.25 + 0.25) / 3)
    assert c["a2c_R@2"] == pytest.approx(((1 - 2 / 4 * 1 / 3)) / 3 + 2 * (2 / 4) / 3)


# ── inputs ───────────────────────────────────────────────────────────────────────────────────────────────────
def save_npy(path, x, ids=None):
    np.save(path, np.asarray(x, dtype=np.float32))
    if ids is not None:
        path.with_suffix("").with_name(path.stem + ".ids.txt").write_text("\n".join(map(str, ids)) + "\n")


def test_join_by_id_aligns_rows_and_reports_mismatches(tmp_path):
    x = Embeddings(unit(4, 8), ["a", "b", "c", "d"], "b_x")
    y = Embeddings(unit(4, 6), ["d", "c", "b", "z"], "b_y")
    with pytest.raises(DataError, match=r"b_x has 4 ids and b_y 4; 3 shared, 1 only in b_x.*'a'.*1 only in b_y.*'z'"):
        join_by_id(x, y)
    bx, by = join_by_id(x, y, partial=True, log=QUIET)
    assert torch.equal(bx, x.vectors[1:]) and torch.equal(by, y.vectors[[2, 1, 0]])
    with pytest.raises(DataError, match="duplicate ids"):
        join_by_id(Embeddings(unit(2, 8), ["a", "a"], "b_x"), y)
    with pytest.raises(DataError, match="neither has ids"):
        join_by_id(Embeddings(unit(3, 8), None, "b_x"), Embeddings(unit(4, 8), None, "b_y"))


def test_read_embeddings_checks_and_normalises(tmp_path, capsys):
    save_npy(tmp_path / "e.npy", 3 * unit(5, 8), ids=range(5))
    e = read_embeddings(tmp_path / "e.npy", "inputs.b_x")
    assert e.ids == ["0", "1", "2", "3", "4"] and torch.allclose(e.vectors.norm(dim=1), torch.ones(5))
    assert "normalised" in capsys.readouterr().out
    bad = unit(5, 8).numpy()
    bad[2, 3] = np.nan
    save_npy(tmp_path / "nan.npy", bad)
    with pytest.raises(DataError, match="1 of 5 rows hold NaN.*row 2"):
        read_embeddings(tmp_path / "nan.npy", "inputs.b_x")
    save_npy(tmp_path / "empty.npy", np.zeros((0, 8)))
    with pytest.raises(DataError, match="non-empty"):
        read_embeddings(tmp_path / "empty.npy", "inputs.b_x")
    with pytest.raises(DataError, match="file not found"):
        read_embeddings(tmp_path / "missing.npy", "inputs.b_x")
    from safetensors.torch import save_file

    save_file({"embeddings": unit(3, 8), "ids": torch.tensor([7, 8, 9])}, str(tmp_path / "s.safetensors"))
    assert read_embeddings(tmp_path / "s.safetensors", "x").ids == ["7", "8", "9"]
    with pytest.raises(DataError, match="space X dimensions disagree"):
        ConnectData(unit(4, 8), unit(4, 8), unit(4, 6), unit(4, 8))


def test_config_keys_are_checked_and_do_not_collide_with_the_training_config():
    with pytest.raises(ConfigError, match="did you mean method.noise_var"):
        load_connect_config(None, ["method.noise_vra=0"])
    with pytest.raises(ConfigError, match="method.mode.*cmcr, anchor_x"):
        load_connect_config(None, ["method.mode=clip"])
    with pytest.raises(ConfigError, match="eval.c_test"):
        load_connect_config(None, ["eval.a_test=a.npy"])


# ── command line ─────────────────────────────────────────────────────────────────────────────────────────────
def test_cli_connects_user_embedding_files(tmp_path, capsys):
    data, test = synthetic(n_b=600, n_mem=600, n_test=100)
    d = tmp_path / "emb"
    d.mkdir()
    perm = torch.randperm(600, generator=torch.Generator().manual_seed(0))
    save_npy(d / "b_x.npy", data.b_x, ids=[f"b{i}" for i in range(600)])
    save_npy(d / "b_y.npy", data.b_y[perm], ids=[f"b{i}" for i in perm.tolist()])  # another order: joined by id
    save_npy(d / "mem_a.npy", data.memory_a)
    save_npy(d / "mem_c.npy", 2 * data.memory_c)  # unnormalised: normalised with a note
    save_npy(d / "a_test.npy", test.a, ids=[f"t{i}" for i in range(100)])
    save_npy(d / "c_test.npy", test.c.flip(0), ids=[f"t{i}" for i in reversed(range(100))])
    centres = [0, 1, 2, 3]  # classify C items against A-side class embeddings (4 test A items as "prompts")
    save_npy(d / "classes.npy", test.a[centres], ids=["k0", "k1", "k2", "k3"])
    save_npy(d / "items.npy", test.c[centres])
    (d / "labels.txt").write_text("k0\nk1\nk2\nk3\n")
    config = {"inputs": {"b_x": "emb/b_x.npy", "b_y": "emb/b_y.npy", "memory_a": "emb/mem_a.npy",
                         "memory_c": "emb/mem_c.npy"},
              "eval": {"a_test": "emb/a_test.npy", "c_test": "emb/c_test.npy", "classes": "emb/classes.npy",
                       "items": "emb/items.npy", "labels": "emb/labels.txt"},
              "train": {"batch_size": 200, "epochs": 15, "threads": 1, "log_every": 20}}
    (tmp_path / "connect.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert main(["connect", str(tmp_path / "connect.yaml"), "train.seed=1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mem_c.npy): rows were not L2-normalised" in printed and "step 45/45" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["connected/a2c_R@1"] > 10 * metrics["chance/a2c_R@1"]
    assert metrics["chance/classify_acc"] == 0.25 and 0 <= metrics["pivot/classify_acc"] <= 1
    assert (out / "loss.png").is_file() and yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == 1
    model = ConnectedSpaces.load(out)
    assert model.embed(test.a[:1], "x").shape == (1, 32)
    # `polyalign eval` of the connect run: the same figures; eval.* overrides point it at other test files
    (out / "metrics.json").unlink()
    assert main(["eval", str(out)]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert {k: again[k] for k in metrics if not k.startswith(("train/", "inputs/"))} == \
        {k: v for k, v in metrics.items() if not k.startswith(("train/", "inputs/"))}
    save_npy(d / "c_half.npy", test.c[:50], ids=[f"t{i}" for i in range(50)])
    assert main(["eval", str(out), f"eval.c_test={d / 'c_half.npy'}"]) == 0
    assert json.loads((out / "metrics.json").read_text())["chance/c2a_MdR"] == 50.5  # the 100 A items, (100 + 1) / 2
    assert main(["eval", str(out), "train.epochs=3"]) == 2  # a config error
    assert "only eval.* and inputs.*" in capsys.readouterr().err
    # errors: a missing file and a missing key, each named, non-zero exit, no traceback
    assert main(["connect", str(tmp_path / "connect.yaml"), "inputs.memory_a=nowhere.npy", "--out", str(out)]) == 1
    assert "nowhere.npy" in capsys.readouterr().err
    assert main(["connect", str(tmp_path / "connect.yaml"), "inputs.b_y=", "--out", str(out)]) == 2
    assert "inputs.b_y is not set" in capsys.readouterr().err
