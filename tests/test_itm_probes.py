"""The ITM probes of issue 23 item 4 (polyalign.eval.itm_probes): the negatives are what they claim, an oracle scorer
gets 1, a constant one 0 (ties fail), a salient-only one fails exactly the less-salient probe, the pointing game
follows an oracle map, re-ranking agrees with eval.rerank / eval.retrieval_any, and the script runs on a tiny run."""
import importlib.util
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polyalign.data.manifest import ManifestDataset
from polyalign.data.shapes import COLOURS, SHAPES, ShapesDataset, _sprite, _sprite_sides
from polyalign.eval import itm_probes as P
from polyalign.eval import shape_scenes as S
from polyalign.eval.pointing import WORD_CLASSES, object_caption, pointing_by_class, scene_boxes
from polyalign.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
FACT = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")


@pytest.fixture(scope="module")
def shapes():
    ds = ShapesDataset("test", 160, image_size=48, seed=3)
    tok = Tokenizer.train(ShapesDataset("train", 256, image_size=48).all_captions(), 200, 32)
    return ds, tok, S.probe_scenes(ds, list(range(len(ds))))


def _key(u8: torch.Tensor) -> bytes:
    return u8.contiguous().numpy().tobytes()


def _area(p, k, h):
    return float(_sprite(SHAPES[p["shape"][0, k]], int(_sprite_sides(h)[p["size"][0, k], p["variant"][0, k]])).sum())


def _words(caption):
    return [w for w in caption.replace(",", " ").split() if w not in ("a", "an", "and")]


def _box_mask(ds, i, slot, margin=1):
    top, left, bottom, right = scene_boxes(ds, i)[slot]["box"]
    m = np.zeros((ds.image_size, ds.image_size), bool)
    rows = slice(max(0, int(top) - margin), int(np.ceil(bottom)) + margin)
    m[rows, max(0, int(left) - margin):int(np.ceil(right)) + margin] = True
    return m


def test_negatives_are_what_they_claim(shapes):
    ds, _, multi = shapes
    trials = P.shapes_trials(ds, multi, seed=0)
    by = {}
    for t in trials:
        by.setdefault(t.kind, []).append(t)
    assert set(by) == set(P.HARD_KINDS + P.ERASED_KINDS) and len(by["less_salient_attr_text"]) == len(multi)
    h = ds.image_size
    for i in multi[:5]:  # re-rendering the unchanged parameters gives the data set's own image
        assert torch.equal(S.render(ds, [S.scene_params(ds, i)])[0], ds.image(i))
    for t in by["less_salient_attr_text"] + by["salient_attr_text"] + by["less_salient_shape_text"]:
        p, objs = t.pos[0], ds.objects(t.item)
        facts = {(o["colour"], o["shape"]) for o in objs}
        assert set(FACT.findall(t.pos[1])) == facts and len(FACT.findall(t.pos[1])) == len(objs)
        diff = [(a, b) for a, b in zip(_words(t.pos[1]), _words(t.neg[1])) if a != b]
        assert len(diff) == 1, (t.pos[1], t.neg[1])
        old, new = diff[0]
        attr = "shape" if t.kind.startswith("less_salient_shape") else "colour"
        assert new not in {o[attr] for o in objs} and new in (SHAPES if attr == "shape" else COLOURS)
        changed = [o for o in objs if (o["colour"], o["shape"]) in facts - set(FACT.findall(t.neg[1]))]
        assert len(changed) == 1
        areas = [_area(p, k, h) for k in range(len(objs))]
        slot = objs.index(changed[0])
        assert areas[slot] == (max(areas) if t.kind.startswith("salient") else min(areas))
    for t in by["colour_swap_text"]:
        diff = [(k, a, b) for k, (a, b) in enumerate(zip(_words(t.pos[1]), _words(t.neg[1]))) if a != b]
        assert len(diff) == 2 and all(a in COLOURS for _, a, _ in diff)
        assert diff[0][1] == diff[1][2] and diff[0][2] == diff[1][1] and diff[0][1] != diff[0][2]
    for t in by["less_salient_attr_image"] + by["colour_swap_image"] + by["less_salient_shape_image"]:
        p, q = t.pos[0], t.neg[0]
        assert t.pos[1] == t.neg[1]
        key = "shape" if "shape" in t.kind else "colour"
        moved = np.flatnonzero(p[key][0] != q[key][0])
        assert len(moved) == (2 if t.kind.startswith("colour_swap") else 1)
        assert all(np.array_equal(p[k], q[k]) for k in p if k != key)
        if t.kind.startswith("colour_swap"):
            assert sorted(p["colour"][0]) == sorted(q["colour"][0])
        else:  # the new value is absent from the scene
            assert q[key][0, moved[0]] not in p[key][0, :p["count"][0]]
        a, b = S.render(ds, [p, q])
        outside = ~np.any([_box_mask(ds, t.item, k) for k in moved], 0)
        assert (a != b).any() and not (a != b)[:, outside].any()
    for t in by["erased_salient"]:
        p, gone, i = S.scene_params(ds, t.item), t.pos[0], t.item
        named = set(FACT.findall(t.pos[1]))
        (slot,) = [k for k, o in enumerate(ds.objects(i)) if (o["colour"], o["shape"]) not in named]  # the erased one
        assert _area(p, slot, h) == max(_area(p, k, h) for k in range(p["count"][0]))  # the most salient
        orig, erased, bare = S.render(ds, [p, gone, S.changed(p, 0) | {"count": np.zeros(1, int)}])
        inside = _box_mask(ds, i, slot)
        assert (orig != erased)[:, inside].any() and not (orig != erased)[:, ~inside].any()
        others = np.any([_box_mask(ds, i, k) for k in range(p["count"][0]) if k != slot], 0)
        assert torch.equal(erased[:, inside & ~others], bare[:, inside & ~others])  # the background shows through
        if slot == p["count"][0] - 1:  # the last object: erasing it is rendering one object fewer
            assert torch.equal(erased, S.render(ds, [S.changed(p, 0) | {"count": p["count"] - 1}])[0])
        rest = {(o["colour"], o["shape"]) for k, o in enumerate(ds.objects(i)) if k != slot}
        assert set(FACT.findall(t.pos[1])) == rest and len(set(FACT.findall(t.neg[1])) - rest) == 1


def test_scenes_with_a_colour_the_renderer_wraps_are_left_out(shapes):
    """shapes._render_block writes colour + tint into uint8 unclipped: orange (red 245) with a red tint of 11 or 12
    is drawn with red ~0, so the object looks dark green. The probes leave such scenes (and such changes) out."""
    ds, _, kept = shapes
    sc = ds.scenes
    bad = [(i, k) for i in range(len(ds)) for k in range(sc["count"][i])
           if S.wraps(sc["colour"][i, k], sc["tint"][i, k])]
    assert bad and all(i not in kept for i, _ in bad)
    i, k = bad[0]
    red = ds.image(i)[0].numpy()[_box_mask(ds, i, k, margin=0)]  # the background's red is clipped to >= 6
    assert COLOURS["orange"][0] == 245 and (red <= 2).any()  # 245 + 11 + 0.5 wrapped to 0
    assert not S.wraps(list(COLOURS).index("yellow"), np.array([12, 12, 12]))  # 240 + 12: fits
    for t in P.shapes_trials(ds, kept, seed=0):
        for scene in (t.pos[0], t.neg[0]):
            assert not any(S.wraps(scene["colour"][0, j], scene["tint"][0, j]) for j in range(scene["count"][0]))


class SceneOracle:
    """ITM score 1 when every (colour, shape) the caption names is an object of the rendered scene (looked up by
    pixels from the scene parameters); ``salient_only``: 1 when the caption names the scene's most salient object."""

    def __init__(self, ds, tok, scenes, salient_only=False, constant=None):
        self.tok, self.constant, self.salient_only = tok, constant, salient_only
        self.facts = {}
        for p, img in zip(scenes, S.render(ds, scenes)):
            objs = S.objects_of(p)
            big = max(range(len(objs)), key=lambda k: _area(p, k, ds.image_size))
            self.facts[_key(img)] = ({(o["colour"], o["shape"]) for o in objs},
                                     (objs[big]["colour"], objs[big]["shape"]))

    def itm_scores(self, images, ids, mask):
        if self.constant is not None:
            return torch.full((images.shape[0],), self.constant)
        out = []
        for img, row, m in zip(images, ids, mask):
            found = self.facts.get(_key((img * 255).round().to(torch.uint8)))
            assert found is not None, "an image that is no rendering of the probes' scenes"
            facts, big = found
            named = set(FACT.findall(self.tok.decode(row[m])))
            out.append(float(big in named) if self.salient_only else float(named <= facts))
        return torch.tensor(out)


def _all_scenes(ds, multi, seed=0):
    scenes = [S.scene_params(ds, i) for i in multi]
    return scenes + [s for t in P.shapes_trials(ds, multi, seed) for s in (t.pos[0], t.neg[0])]


def test_oracle_scores_one_constant_zero_and_salient_only_fails_the_less_salient_probe(shapes):
    ds, tok, multi = shapes
    scenes, probes = _all_scenes(ds, multi), ("hard_negatives", "erased")
    oracle = P.itm_probe_metrics(SceneOracle(ds, tok, scenes), ds, tok, max_items=len(ds), probes=probes)
    accs = {k: v for k, v in oracle.items() if k.endswith("_acc")}
    assert len(accs) == 10 and all(v == 1.0 for v in accs.values()), accs
    assert oracle["itm_probe/colour_swap_text_n"] > 0.8 * len(multi)
    const = P.itm_probe_metrics(SceneOracle(ds, tok, scenes, constant=0.3), ds, tok, max_items=len(ds), probes=probes)
    assert set(const) == set(oracle) and all(const[k] == 0.0 for k in accs)  # ties fail: chance is 0.5, this is 0
    salient = P.itm_probe_metrics(SceneOracle(ds, tok, scenes, salient_only=True), ds, tok, max_items=len(ds),
                                  probes=probes)
    assert salient["itm_probe/less_salient_attr_text_acc"] == 0.0 and salient["itm_probe/salient_attr_text_acc"] == 1.0
    assert salient["itm_probe/less_salient_shape_text_acc"] == 0.0


def test_probes_are_deterministic_and_leave_the_global_rngs_alone(shapes):
    ds, tok, multi = shapes
    model = SceneOracle(ds, tok, _all_scenes(ds, multi, seed=5))
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    a = P.itm_probe_metrics(model, ds, tok, max_items=60, seed=5, probes=("hard_negatives",))
    b = P.itm_probe_metrics(model, ds, tok, max_items=60, seed=5, probes=("hard_negatives",))
    assert a == b and a["itm_probe/n_items"] == 60
    assert torch.equal(torch.get_rng_state(), states[0]) and np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]
    assert P.sample_items(160, 60, 5) != P.sample_items(160, 60, 6)  # the seed chooses the items


class ColourPointer:
    """Grad-CAM stand-in: every token's map is the fraction of each 4×4 patch whose pixels have the colour the
    caption names (so the colour word's peak lands on the object of that colour)."""
    has_cls = False

    def __init__(self, tok, blank=False):
        self.tok, self.blank = tok, blank

    def image_encoder(self, images):
        return images

    def text_tokens(self, ids, mask):
        return ids, mask

    def gradcam_maps(self, v, w, m, layer=None):
        b, _, h, _ = v.shape
        maps = torch.zeros(b, w.shape[1], (h // 4) ** 2)
        for r in range(b):
            colour = next(c for c in COLOURS if c in self.tok.decode(w[r][m[r]]).split())
            near = ((v[r] * 255 - torch.tensor(COLOURS[colour])[:, None, None]).abs().amax(0) <= 30).float()
            if not self.blank:
                maps[r] = near.view(h // 4, 4, h // 4, 4).mean((1, 3)).flatten()
        return maps


def test_pointing_game_per_word_class_follows_an_oracle_map(shapes):
    ds, tok, multi = shapes
    caption, classes = object_caption({"size": "large", "colour": "orange", "shape": "star", "position": "top left"})
    assert caption == "a large orange star at the top left"
    word_of = tok.tok.encode(caption).word_ids
    assert [classes[w] for w in word_of if w is not None].count("position") >= 2
    out = pointing_by_class(ColourPointer(tok), ds, tok, multi, "cpu")
    assert set(out) == {f"itm_probe/pointing_{c}{s}" for c in WORD_CLASSES for s in ("", "_chance", "_n")}
    assert out["itm_probe/pointing_colour"] == 1.0 and out["itm_probe/pointing_colour_n"] > len(multi)
    assert out["itm_probe/pointing_shape_n"] == sum(ds.scenes["count"][i] for i in multi)  # one per object
    assert all(0.0 < out[f"itm_probe/pointing_{c}_chance"] < 0.3 for c in WORD_CLASSES)
    blank = pointing_by_class(ColourPointer(tok, blank=True), ds, tok, multi, "cpu")  # flat maps: peak at (0, 0)
    assert blank["itm_probe/pointing_colour"] < 0.2


def _png(path, colour):
    Image.new("RGB", (16, 16), colour).save(path)


@pytest.fixture(scope="module")
def emoji(tmp_path_factory):
    """Six concepts in two subcategories, two styles each (a distinct image per row), as the emoji manifests."""
    root = tmp_path_factory.mktemp("emoji")
    rows, n = [], 0
    for sub, names in (("animal-cat", ["cat face", "tiger", "lion"]), ("food-fruit", ["apple", "pear", "grapes"])):
        for c, name in enumerate(names):
            for style in ("google", "twitter"):
                _png(root / f"{n}.png", (20 * n, 255 - 20 * n, (97 * n) % 256))
                rows.append({"image": f"{n}.png", "captions": [name, f"an emoji of {name}"], "category": sub[:4],
                             "subcategory": sub, "concept_id": f"{sub}-{c}", "style": style})
                n += 1
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "m.jsonl"


class ConceptOracle:
    """ITM score 1 when the caption is one of the image's concept's captions."""

    def __init__(self, ds, tok):
        self.tok = tok
        self.concept = {_key(ds.image(i)): ds.concept_id(i) for i in range(len(ds))}
        self.caps = {}
        for i in range(len(ds)):
            for c in ds.captions(i):
                self.caps.setdefault(tok.decode(tok([c])[0][0]), set()).add(ds.concept_id(i))

    def itm_scores(self, images, ids, mask):
        concepts = [self.concept[_key((img * 255).round().to(torch.uint8))] for img in images]
        return torch.tensor([float(c in self.caps[self.tok.decode(r)]) for c, r in zip(concepts, ids)])


@pytest.mark.parametrize("fields", [("category", "subcategory"), ("label",)])
def test_same_subcategory_negatives(emoji, fields):
    """With subcategory as a label field, or read back from the manifest rows by concept_id."""
    ds = ManifestDataset(emoji, image_size=16, show_progress=False, label_fields=fields)
    subcats = P.subcategories(ds)
    assert subcats == [("animal-cat" if i < 6 else "food-fruit") for i in range(12)]
    tok = Tokenizer.train([c for i in range(len(ds)) for c in ds.captions(i)], 80, 16)
    trials = P.subcategory_trials(ds, list(range(len(ds))), subcats, seed=0)
    assert {t.kind for t in trials} == {"same_subcategory", "other_subcategory"} and len(trials) == 24
    owner = {c: ds.concept_id(i) for i in range(len(ds)) for c in ds.captions(i)}
    for t in trials:
        neg_concept = owner[t.neg[1]]
        assert neg_concept != ds.concept_id(t.item) and t.pos[1] in ds.captions(t.item)
        assert (neg_concept.rsplit("-", 1)[0] == subcats[t.item]) == (t.kind == "same_subcategory")
    out = P.itm_probe_metrics(ConceptOracle(ds, tok), ds, tok, probes=("subcategory",))
    assert out["itm_probe/same_subcategory_acc"] == 1.0 and out["itm_probe/same_subcategory_n"] == 12
    assert out["itm_probe/other_subcategory_acc"] == 1.0
    shapes_ds = ShapesDataset("test", 8, image_size=32)
    assert P.subcategories(shapes_ds) is None


FUSION_RUN = ["loss.weights.clip=0", "loss.weights.itc=1", "loss.weights.itm=1", "loss.weights.mlm=1",
              "model.image.kind=vit", "model.fusion.queue_size=64", "model.fusion.embed_dim=16", "eval.n_examples=0",
              "train.max_steps=2", "train.checkpoint_every=2", "eval.rerank_k=0", "model.text.context_length=32"]


def test_script_on_a_tiny_fusion_run_and_rerank_matches_the_evaluators(tmp_path, tiny_overrides):
    from polyalign.app.runs import load_run
    from polyalign.app.training import train
    from polyalign.config import load_config
    from polyalign.data.build import build_datasets
    from polyalign.eval.rerank import itm_rerank_metrics
    from polyalign.eval.retrieval_any import concept_ids, retrieval_ranks
    from polyalign.eval.run import caption_table

    run = tmp_path / "run"
    train(load_config(None, tiny_overrides + FUSION_RUN), run, show_progress=False)
    spec = importlib.util.spec_from_file_location("albef23_eval", ROOT / "experiments" / "albef23_eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(run), "--items", "60"]) == 0
    report = json.loads((run / "itm_probes.json").read_text())
    m = report["metrics"]
    for name in ("less_salient_attr_text", "less_salient_attr_image", "colour_swap_text", "colour_swap_image",
                 "erased_salient"):
        assert 0.0 <= m[f"itm_probe/{name}_acc"] <= 1.0 and m[f"itm_probe/{name}_n"] > 10, name
    for cls in WORD_CLASSES:
        assert 0.0 <= m[f"itm_probe/pointing_{cls}"] <= 1.0 and 0.0 < m[f"itm_probe/pointing_{cls}_chance"] < 0.5
    assert {"itm_probe/rerank_any_t2i_R@1", "itm_probe/itc_any_t2i_R@1", "itm_probe/rerank_any_t2i_R@5"} <= set(m)
    assert report["max_items"] == 60 and m["itm_probe/n_items"] == 60

    # on the whole split, re-ranking agrees with eval.rerank (strict) and the ITC order with eval.retrieval_any
    cfg, model, tok = load_run(run)
    ds = build_datasets(cfg.data, cfg.train.seed, show_progress=False)["test"]
    ours = P.itm_probe_metrics(model, ds, tok, max_items=len(ds), probes=("rerank",))
    texts, owner = caption_table(ds, 5)
    ids, mask = tok(texts)
    images = torch.stack([ds.image(i) for i in range(len(ds))]).float() / 255
    strict = itm_rerank_metrics(model, images, ids, mask, owner, k=16, ks=(1, 5))
    assert ours["itm_probe/rerank_t2i_R@1"] == pytest.approx(strict["t2i_R@1"])
    assert ours["itm_probe/rerank_t2i_R@5"] == pytest.approx(strict["t2i_R@5"])
    with torch.no_grad():
        ranks = retrieval_ranks(model.encode_image(images), model.encode_text(ids, mask), owner, texts=texts,
                                concepts=concept_ids(ds))["retrieval_any"]["t2i"]
    assert ours["itm_probe/itc_any_t2i_R@1"] == pytest.approx(float((ranks < 1).float().mean()), abs=2 / len(texts))
    assert ours["itm_probe/itc_any_t2i_R@5"] == pytest.approx(float((ranks < 5).float().mean()), abs=2 / len(texts))
    assert ours["itm_probe/rerank_any_t2i_R@1"] >= ours["itm_probe/rerank_t2i_R@1"]  # more right answers, never fewer


def test_point_hit_takes_the_peak_of_the_pictures_map():
    """The pointing game's hit is the peak of the map the pictures draw (eval.pointing.upsample_map)."""
    from polyalign.eval.pointing import point_hit, upsample_map

    g = torch.Generator().manual_seed(0)
    for n, size in ((16, 32), (36, 48), (64, 64)):
        cam = torch.rand(n, generator=g)
        y, x = divmod(int(upsample_map(cam, (size, size)).argmax()), size)
        assert point_hit(cam, (y, x, y + 1, x + 1), size)[0] and not point_hit(cam, (y + 2, x, y + 9, x + 1), size)[0]
    assert point_hit(torch.zeros(16), (0, 0, 8, 8), 32) == (True, 1 / 16)  # a flat map peaks at pixel (0, 0)
