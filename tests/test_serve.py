"""Using a trained run: ``polyalign.load``, ``polyalign index`` (shards, resume, torchrun), ``polyalign search``, and
the HTTP service's answers to good and bad requests."""
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import polyalign
from polyalign.app.training import train
from polyalign.cli import main
from polyalign.config import load_config
from polyalign.errors import DataError, PolyalignError

from conftest import TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "run"
    train(load_config(None, TINY + ["train.threads=1"]), out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Eight PNGs of different sizes and modes, one corrupt file, one missing file."""
    root = tmp_path_factory.mktemp("manifest")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        a = (rng.random((20 + 7 * i, 30 + 3 * i, 3)) * 255).astype(np.uint8)
        im = Image.fromarray(a).convert(["RGB", "L", "RGBA", "P"][i % 4])
        im.save(root / f"im{i}.png")
        rows.append({"image": f"im{i}.png", "caption": f"picture {i}", "id": f"p{i}"})
    (root / "bad.png").write_bytes(b"not a png")
    rows += [{"image": "bad.png", "caption": "broken", "id": "bad"}, {"image": "gone.png", "caption": "x", "id": "gone"}]
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "m.jsonl"


def test_load_encodes_every_kind_of_image_and_text(run):
    m = polyalign.load(run)
    assert m.modalities == ("image", "text") and m.embed_dim == 16 and m.step == 12
    a = (np.random.default_rng(1).random((50, 70, 3)) * 255).astype(np.uint8)
    pil = Image.fromarray(a)
    emb = m.encode_image([pil, a, a.astype(np.float32) / 255, torch.from_numpy(a).permute(2, 0, 1).float() / 255])
    assert emb.shape == (4, 16) and torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(emb[0], emb[1], atol=1e-6)  # PIL and its uint8 array prepare the same
    assert torch.allclose(emb[1], emb[2], atol=1e-4) and torch.allclose(emb[1], emb[3], atol=1e-4)
    batch = torch.rand(3, 3, 32, 32)  # already the tower's size: used as given
    assert torch.allclose(m.encode_image(batch), m.model.encode_image(batch), atol=1e-6)
    t = m.encode_text(["a red circle", "a blue square"], numpy=True)
    assert isinstance(t, np.ndarray) and t.shape == (2, 16)
    assert np.allclose(m.encode_text("a red circle", numpy=True)[0], t[0], atol=1e-6)
    ids, mask = m.tokenizer(["a red circle"])
    assert torch.allclose(m.encode_text(["a red circle"]), m.model.encode_text(ids, mask), atol=1e-6)
    assert m.preprocess(pil).shape == (3, 32, 32)


def test_load_errors_are_clear(run, tmp_path):
    m = polyalign.load(run)
    with pytest.raises(DataError, match="non-empty"):
        m.encode_text(["ok", " "])
    with pytest.raises(DataError, match="not found"):
        m.encode_image(tmp_path / "none.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="corrupt image"):
        m.encode_image(str(tmp_path / "bad.png"))
    with pytest.raises(DataError, match="cannot read an image"):
        m.encode_image([{"not": "an image"}])
    with pytest.raises(PolyalignError, match="no audio tower"):
        m.encode_audio([np.zeros(100)])
    with pytest.raises(PolyalignError, match="not a polyalign run"):
        polyalign.load(tmp_path)
    with pytest.raises(PolyalignError, match="which must be"):
        polyalign.load(run, which="newest")


def test_load_equals_polyalign_embed(run, manifest, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(line + "\n" for line in manifest.read_text().splitlines()[:8]))
    for name in [f"im{i}.png" for i in range(8)]:
        (tmp_path / name).write_bytes((manifest.parent / name).read_bytes())
    assert main(["embed", str(run), "--modality", "image", "--manifest", str(good), "--out", str(tmp_path / "e")]) == 0
    written = np.load(tmp_path / "e.npy")
    m = polyalign.load(run)
    mine = m.encode_image([Image.open(tmp_path / f"im{i}.png") for i in range(8)], numpy=True)
    assert np.abs(mine - written).max() <= 1e-6
    assert np.abs(m.encode_image([tmp_path / "im3.png"], numpy=True) - written[3]).max() <= 1e-6


def _index(run, out, **kw):
    from polyalign.serve.index import build_index

    return build_index(run, out, **kw)


def test_index_of_a_manifest_skips_bad_rows_and_searches(run, manifest, tmp_path, capsys):
    info = _index(run, tmp_path / "idx", manifest=str(manifest), id_field="id", shard_size=3)
    assert info["parts"]["image"]["items"] == 8 and info["parts"]["image"]["shards"] == 3  # 9 files, 3 per shard
    assert info["skipped"] == {"corrupt image": 1, "missing image": 1}
    assert info["parts"]["text"]["items"] == 10 - 2  # the distinct captions of the good rows
    m = polyalign.load(run)
    assert main(["search", str(tmp_path / "idx"), "--image", str(manifest.parent / "im5.png"), "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[1] == "p5" and float(lines[1].split()[2]) == pytest.approx(1.0, abs=1e-4)
    from polyalign.serve.search import Searcher

    s = Searcher(tmp_path / "idx", encoder=m)
    hits = s.search(text="picture 2", k=8)
    q = m.encode_text(["picture 2"], numpy=True)[0]
    emb = m.encode_image([manifest.parent / f"im{i}.png" for i in range(8)], numpy=True)
    assert [h.id for h in hits] == [f"p{i}" for i in np.argsort(-(emb @ q), kind="stable")]
    assert [h.caption for h in s.search(text="picture 2", k=2, target="text")][0] in {f"picture {i}" for i in range(8)}


def test_index_refuses_foreign_folders_and_other_jobs(run, manifest, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(PolyalignError, match="not a polyalign index"):
        _index(run, tmp_path / "mine", split="test")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    _index(run, tmp_path / "idx", split="test", shard_size=50)
    with pytest.raises(PolyalignError, match="another job"):
        _index(run, tmp_path / "idx", split="test", shard_size=20)


def test_killed_index_resumes_from_its_last_shard(run, tmp_path, monkeypatch):
    from polyalign.serve import index as index_mod

    full = _index(run, tmp_path / "full", split="test", shard_size=20)
    real, calls = index_mod._write_shard, []

    def dying(out, name, emb, meta):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while writing the third shard
        real(out, name, emb, meta)

    monkeypatch.setattr(index_mod, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        _index(run, tmp_path / "killed", split="test", shard_size=20)
    monkeypatch.setattr(index_mod, "_write_shard", lambda *a: calls.append(a[1]) or real(*a))
    calls.clear()
    resumed = _index(run, tmp_path / "killed", split="test", shard_size=20)
    assert calls[:3] == ["image-00002", "image-00003", "image-00004"]  # the two finished shards are not redone
    for part in ("image", "text"):
        a = index_mod.read_part(tmp_path / "full", part, full["parts"][part]["shards"])
        b = index_mod.read_part(tmp_path / "killed", part, resumed["parts"][part]["shards"])
        assert np.array_equal(a[0], b[0]) and a[1] == b[1]


def test_torchrun_index_equals_one_process(run, tmp_path):
    one = _index(run, tmp_path / "one", split="test", shard_size=16)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "polyalign", "index",
           str(run), "--split", "test", "--out", str(tmp_path / "two"), "--shard-size", "16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                                 "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    from polyalign.serve.index import read_part

    for part, p in one["parts"].items():
        a, b = read_part(tmp_path / "one", part, p["shards"]), read_part(tmp_path / "two", part, p["shards"])
        assert np.allclose(a[0], b[0], atol=1e-6) and a[1] == b[1]


def test_approximate_kinds_store_their_measured_recall(tmp_path):
    from polyalign.serve.faiss_index import build_faiss, read_index

    g = np.random.default_rng(0)
    emb = g.standard_normal((5000, 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    queries = emb[:200] + 0.1 * g.standard_normal((200, 32)).astype(np.float32)
    for kind in ("hnsw", "ivfpq"):
        info = build_faiss(emb, kind, tmp_path / f"{kind}.faiss", queries)
        assert 0 < info["recall@10"] <= 1 and info["recall_queries"] == 200
        index = read_index(tmp_path / f"{kind}.faiss", info)
        exact = np.argsort(-(queries @ emb.T), axis=1)[:, :10]
        _, ids = index.search(queries, 10)
        measured = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
        assert measured == pytest.approx(info["recall@10"], abs=1e-6)
    assert build_faiss(emb, "hnsw", tmp_path / "h.faiss", queries)["recall@10"] >= 0.95


@pytest.fixture(scope="module")
def client(run, tmp_path_factory):
    from fastapi.testclient import TestClient

    from polyalign.serve.http import create_app

    idx = tmp_path_factory.mktemp("idx") / "idx"
    _index(run, idx, split="test")
    return TestClient(create_app(idx, max_upload_bytes=200_000))


def _png(size=(40, 40), colour="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def test_http_search_items_and_health(client, run):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["items"] == 96 and h["dim"] == 16
    r = client.get("/search", params={"text": "a red circle", "k": 5}).json()
    assert [x["rank"] for x in r["results"]] == [1, 2, 3, 4, 5] and r["target"] == "image"
    scores = [x["score"] for x in r["results"]]
    assert scores == sorted(scores, reverse=True)
    m = polyalign.load(run)
    first = r["results"][0]
    pixels = Image.open(io.BytesIO(client.get(first["image_url"]).content))
    assert pixels.format == "PNG" and max(pixels.size) <= 160
    assert client.get(first["item_url"]).json()["caption"] == first["caption"]
    like = client.get("/search", params={"like": first["id"], "k": 3}).json()
    assert like["results"][0]["id"] == first["id"] and like["results"][0]["score"] == pytest.approx(1, abs=1e-4)
    up = client.post("/search", files={"file": ("red.png", _png(), "image/png")}, data={"k": "4", "target": "text"})
    assert up.status_code == 200 and len(up.json()["results"]) == 4 and up.json()["target"] == "text"
    expected = m.encode_image([Image.open(io.BytesIO(_png()))], numpy=True)[0]
    assert up.json()["results"][0]["score"] == pytest.approx(float(expected @ m.encode_text(
        [up.json()["results"][0]["caption"]], numpy=True)[0]), abs=1e-4)
    assert client.get("/").status_code == 200 and "text/html" in client.get("/").headers["content-type"]


@pytest.mark.parametrize("method,kwargs,status,words", [
    ("get", {"params": {"text": ""}}, 400, "empty"),
    ("get", {"params": {"text": "   "}}, 400, "empty"),
    ("get", {"params": {"text": "a", "k": 0}}, 400, "between 1 and 100"),
    ("get", {"params": {"text": "a", "k": 101}}, 400, "between 1 and 100"),
    ("get", {"params": {"text": "a", "k": "ten"}}, 400, "whole number"),
    ("get", {"params": {"text": "a", "target": "audio"}}, 400, "target must be"),
    ("get", {"params": {}}, 400, "exactly one"),
    ("get", {"params": {"text": "a", "like": "1"}}, 400, "exactly one"),
    ("get", {"params": {"like": "no-such-id"}}, 404, "no item"),
    ("post", {"files": {"file": ("notes.txt", b"hello", "text/plain")}}, 415, "not an image"),
    ("post", {"files": {"file": ("empty.png", b"", "image/png")}}, 400, "empty"),
    ("post", {"files": {"file": ("big.png", b"0" * 300_000, "image/png")}}, 413, "at most"),
    ("post", {"data": {"k": "3"}}, 400, "file"),
])
def test_http_bad_requests_get_a_clear_4xx(client, method, kwargs, status, words):
    r = getattr(client, method)("/search", **kwargs)
    assert r.status_code == status and r.json()["status"] == status and words in r.json()["error"]


def test_http_unknown_items_and_pages_are_404_json(client):
    for url in ("/items/nope", "/items/nope/image", "/no/such/page"):
        r = client.get(url)
        assert r.status_code == 404 and "error" in r.json()


def test_concurrent_queries_get_their_own_answers(client):
    queries = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square", "star")]
    serial = {q: client.get("/search", params={"text": q, "k": 5}).json()["results"] for q in queries}
    answers, errors = {}, []

    def ask(q):
        try:
            answers[q] = client.get("/search", params={"text": q, "k": 5}).json()["results"]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(q,)) for q in queries * 2]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    for q in queries:
        assert [x["id"] for x in answers[q]] == [x["id"] for x in serial[q]]
        assert np.allclose([x["score"] for x in answers[q]], [x["score"] for x in serial[q]], atol=1e-5)


def test_the_readmes_python_example_runs(run, tmp_path, monkeypatch):
    """The README's ``polyalign.load`` block, run as printed on a stand-in for ``runs/clip``; each line's comment
    that shows a value or shape is checked."""
    import re
    import shutil

    block = re.search(r"```python\n(import polyalign\n.*?)```", (Path(__file__).parents[1] / "README.md").read_text(),
                      re.S)[1]
    monkeypatch.chdir(tmp_path)
    shutil.copytree(run, "runs/clip")
    Image.new("RGB", (64, 48), "orange").save("cat.png")
    Image.new("RGB", (30, 60), "grey").save("dog.jpg")
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["m"].modalities == ("image", "text")
    assert scope["img"].shape == (2, 16) and scope["txt"].shape == (2, 16) and scope["scores"].shape == (2, 2)
    assert scope["x"].shape == (3, 32, 32) and 0 <= float(scope["x"].min()) and float(scope["x"].max()) <= 1
    assert "# ('image', 'text')" in block


def test_a_connected_run_loads_and_encodes_into_the_common_space(run, tmp_path, monkeypatch):
    from polyalign.connect.model import ConnectedSpaces
    from polyalign.serve.connected import ConnectedEncoder

    monkeypatch.chdir(tmp_path)
    Path("texts.txt").write_text("a red circle\na blue square\na green star\na yellow heart\n")
    for name in ("b_x", "b_y"):
        assert main(["embed", str(run), "--modality", "text", "--texts", "texts.txt", "--out", f"emb/{name}"]) == 0
    assert main(["embed", str(run), "--modality", "image", "--split", "test", "--out", "emb/images"]) == 0
    Path("connect.yaml").write_text("inputs: {b_x: emb/b_x.npy, b_y: emb/b_y.npy, memory_a: emb/images.npy, "
                                    "memory_c: emb/images.npy}\ntrain: {batch_size: 2, epochs: 2}\n")
    assert main(["connect", "connect.yaml", "--out", "connected"]) == 0
    m = polyalign.load("connected")
    assert isinstance(m, ConnectedEncoder) and m.modalities == ("image", "text") and m.embed_dim == 16
    native = polyalign.load(run)
    connector = ConnectedSpaces.load("connected")
    texts = ["a red circle", "two stars"]
    assert torch.allclose(m.encode_text(texts), connector.embed(native.encode_text(texts), "x"), atol=1e-6)
    assert torch.allclose(m.encode_text(texts, space="y"), connector.embed(native.encode_text(texts), "y"), atol=1e-6)
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.allclose(m.encode_image(pixels), connector.embed(native.encode_image(pixels), "x"), atol=1e-6)
    Path("emb/b_y.meta.json").unlink()  # a file from elsewhere: the run of space Y is unknown
    with pytest.raises(PolyalignError, match="not written by `polyalign embed`"):
        polyalign.load("connected")


def test_a_fusion_run_loads_and_indexes(tmp_path):
    """ALBEF-style runs declare their towers too (the Model protocol): load, encode, index, search."""
    albef = ["loss.weights.clip=0", "loss.weights.itc=1", "loss.weights.itm=1", "model.image.kind=vit",
             "model.fusion.queue_size=64", "model.fusion.embed_dim=16", "model.fusion.fusion_layers=1",
             "train.max_steps=4", "eval.rerank_k=0"]
    train(load_config(None, TINY + albef + ["train.threads=1"]), tmp_path / "albef", show_progress=False)
    m = polyalign.load(tmp_path / "albef")
    assert m.modalities == ("image", "text") and m.encode_text(["a red circle"]).shape == (1, 16)
    info = _index(tmp_path / "albef", tmp_path / "idx", split="test")
    from polyalign.serve.search import Searcher

    pixels = m.preprocess(Image.open(tmp_path / "idx" / "thumbs" / "7.png"))
    hits = Searcher(tmp_path / "idx", encoder=m).search(image=pixels, k=1)
    assert info["parts"]["image"]["items"] == 96 and hits[0].id == "7" and hits[0].score == pytest.approx(1, abs=1e-4)


def test_index_of_an_image_folder_from_the_cli(run, tmp_path, capsys):
    (tmp_path / "pics" / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(tmp_path / "pics" / "red_square.png")
    Image.new("RGB", (20, 50), "blue").save(tmp_path / "pics" / "sub" / "blue-thing.jpg")
    (tmp_path / "pics" / "notes.txt").write_text("not an image")
    assert main(["index", str(run), "--folder", str(tmp_path / "pics"), "--out", str(tmp_path / "idx")]) == 0
    assert "image: 2 items" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "idx"), "--image", str(tmp_path / "pics" / "sub" / "blue-thing.jpg"),
                 "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["id"] for h in hits][0] == "sub/blue-thing.jpg" and {h["caption"] for h in hits} == {"red square",
                                                                                                   "blue thing"}
    assert main(["index", str(run), "--folder", str(tmp_path / "nowhere"), "--out", str(tmp_path / "i2")]) != 0
    assert "image folder not found" in capsys.readouterr().err and not (tmp_path / "i2").exists()
