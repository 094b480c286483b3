"""ITM probes that target the soft-mask mechanism (issue 23, item 4).

"Improving Visual-Language Matching with Text-Driven Soft Masks and Multimodal Data Augmentation" (Park & Han,
CVPR 2023, arXiv 2304.00719) claims that soft masks make the ITM head look beyond the most salient word / region.
These probes ask that question of a fusion model directly. Every accuracy is the fraction of (positive, negative)
pairs where the positive's ITM match logit is **strictly** higher: a tie counts as a failure, so a constant scorer
gets 0 and chance (a random scorer) is 0.5.

**Salience** (shapes scenes): the most salient object is the one that paints the most pixels, its sprite's
anti-aliased coverage (``shapes._sprite``) summed: size class, size variant and shape together (a large cross covers
less than a large square). Ties go to the object the positive caption names first; the *least* salient object is
the one with the smallest coverage (ties: the one named last). Colour contrast with the background is not counted:
coverage is what the renderer decides exactly, and it is what a patch grid sees.

Shapes probes (scenes of 2–3 objects among ``max_items`` items drawn with ``seed``; captions are built from the
scene parameters in the training grammar's listing form, "a red circle and a blue square", objects in a seeded
order; a caption that the tokenizer would truncate is left out; so are scenes with an object whose colour the
renderer wraps around, see ``wraps``: ``n_multi_object`` counts the scenes used):

- ``less_salient_attr``: the least salient object's colour becomes one that no object of the scene has;
  ``less_salient_shape``: its shape becomes one absent from the scene; ``salient_attr``: the most salient object's
  colour is changed instead (the control: the claim predicts a smaller gap to it with soft masks);
  ``colour_swap``: two objects of different colours swap colours (the most and least salient when they differ).
  ``…_text_acc``: one image, true vs changed caption; ``…_image_acc``: one caption, the scene vs the scene
  re-rendered with the same change (``shapes._render_block``), so only pixels of the changed object differ.
- ``erased_salient``: the scene re-rendered without its most salient object; positive = the listing of the
  remaining objects, negative = the same with the least salient object's colour changed (to a colour absent from
  the original scene). ``erased_salient_acc`` on the erased image, ``erased_salient_original_image_acc`` the
  same captions on the original image; ``…_logit_original`` / ``…_logit_erased``: mean match logit of the remaining
  objects' caption on the original and on the erased image (a model reading only the salient object drops).
- ``pointing_<class>`` for colour, shape, size and position words: for each object, the caption "a small red
  circle at the top left"; the Grad-CAM map of a word (summed over its pieces; a position phrase is one word) must
  peak inside that object's box (``app.inspect_gradcam.point_hit``). A colour or size word counts only when no
  other object of the scene shares it. ``…_chance``: the mean box fraction of those trials.

Emoji-style manifests (rows with ``concept_id`` and ``subcategory``): ``same_subcategory_acc``, the item's image
with one of its captions vs a caption of another concept of the same subcategory; ``other_subcategory_acc`` the
same with a concept of another subcategory (the easy control).

Any dataset: ``rerank_any_t2i_R@k`` (k = 1, 5), text→image retrieval over the sampled items whose ITC top-16 is
re-ranked by ITM, counting every relevant image as ``eval.retrieval_any`` does (same caption text or same
concept); ``itc_any_t2i_R@k`` is the ITC order of the same candidates, ``rerank_t2i_R@k`` the strict ITM figure
(own image only). ``eval.rerank`` alone gives only the strict one.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from polyalign.data.shapes import SHAPES, ShapesDataset
from polyalign.eval.embed import inference
from polyalign.eval.rerank import _rescore, first_hit
from polyalign.eval.pointing import pointing_by_class
from polyalign.eval.retrieval import topk_chunked
from polyalign.eval.retrieval_any import concept_ids, normalise_caption, relevance_pairs
from polyalign.eval.shape_scenes import (COLOUR_NAMES, changed, erased, fits, listing, objects_of, probe_scenes,
                                         render, salient_slots, scene_params, swapped_colours, with_values, wraps)

PROBES = ("hard_negatives", "erased", "pointing", "subcategory", "rerank")


def itm_probe_metrics(model, dataset, tokenizer, device="cpu", max_items: int = 500, seed: int = 0,
                      probes=PROBES, batch_size: int = 64) -> dict[str, float]:
    """The ``itm_probe/*`` metrics (module docstring) that apply to ``dataset``: accuracies in [0, 1], means of
    logits, and ``…_n`` trial counts. ``model`` (already on ``device``) needs ``itm_scores``; the pointing game
    also its Grad-CAM and the re-ranking its encoders. Runs in eval mode without gradients; every random choice
    comes from ``seed``, not from the global RNGs."""
    items = sample_items(len(dataset), max_items, seed)
    out: dict[str, float] = {"itm_probe/n_items": float(len(items))}
    with inference(model):
        if isinstance(dataset, ShapesDataset):
            scenes = probe_scenes(dataset, items)
            out["itm_probe/n_multi_object"] = float(len(scenes))
            kinds = {"hard_negatives": HARD_KINDS, "erased": ERASED_KINDS}
            wanted = tuple(k for p in probes if p in kinds for k in kinds[p])
            if wanted:
                trials = [t for t in shapes_trials(dataset, scenes, seed) if t.kind in wanted]
                out |= _accuracies(_score_trials(model, dataset, tokenizer, trials, device, batch_size))
            if "pointing" in probes:
                out |= pointing_by_class(model, dataset, tokenizer, scenes, device, batch_size)
        if "subcategory" in probes and (subcats := subcategories(dataset)) is not None:
            out |= _accuracies(_score_trials(model, dataset, tokenizer, subcategory_trials(dataset, items, subcats,
                                                                                          seed), device, batch_size))
        if "rerank" in probes:
            out |= rerank_any(model, dataset, tokenizer, items, device, batch_size=batch_size)
    return out


def sample_items(n: int, max_items: int, seed: int) -> list[int]:
    """All items when there are at most ``max_items``, else ``max_items`` of them drawn without replacement."""
    if n <= max_items:
        return list(range(n))
    return sorted(np.random.default_rng([seed, 23]).choice(n, max_items, replace=False).tolist())


def _rng(seed: int, *parts) -> random.Random:
    return random.Random(":".join(map(str, ("itm_probe", seed, *parts))))  # str seeds: the same in every process


# --- trials: (positive scene, caption) vs (negative scene, caption) ---
@dataclass
class Trial:
    kind: str  # the metric it counts for, e.g. "less_salient_attr_text"
    item: int
    pos: tuple  # (scene parameters or item index, caption)
    neg: tuple


HARD_KINDS = tuple(f"{k}_{m}" for k in ("less_salient_attr", "less_salient_shape", "salient_attr", "colour_swap")
                   for m in ("text", "image"))
ERASED_KINDS = ("erased_salient", "erased_salient_original_image")


def shapes_trials(ds: ShapesDataset, items: list[int], seed: int) -> list[Trial]:
    """The hard-negative and erased-object trials of the multi-object scenes ``items`` (module docstring); a new
    colour is never one that ``wraps`` with the tint of the object it goes to."""
    trials = []
    for i in items:
        p, rng = scene_params(ds, i), _rng(seed, "shapes", i)
        objs = objects_of(p)
        if len(objs) < 2:
            continue
        objs = rng.sample(objs, len(objs))  # the caption's order
        top, low = salient_slots(p, [o["slot"] for o in objs], ds.image_size)
        free_colours = [c for c in range(len(COLOUR_NAMES)) if c not in p["colour"][0, :len(objs)]]
        drawable = lambda slot: [c for c in free_colours if not wraps(c, p["tint"][0, slot])]  # 2+ of the 3+ free
        free_shapes = [s for s in range(len(SHAPES)) if s not in p["shape"][0, :len(objs)]]
        caption = listing(objs)

        def both(kind, scene, caps_objs):
            trials.append(Trial(f"{kind}_text", i, (p, caption), (p, listing(caps_objs))))
            trials.append(Trial(f"{kind}_image", i, (p, caption), (scene, caption)))

        c = rng.choice(drawable(low))
        both("less_salient_attr", changed(p, low, colour=c), with_values(objs, low, colour=COLOUR_NAMES[c]))
        c = rng.choice(drawable(top))
        both("salient_attr", changed(p, top, colour=c), with_values(objs, top, colour=COLOUR_NAMES[c]))
        s = rng.choice(free_shapes)
        both("less_salient_shape", changed(p, low, shape=s), with_values(objs, low, shape=SHAPES[s]))
        colour = {o["slot"]: o["colour"] for o in objs}
        fine = lambda a, b: not (wraps(p["colour"][0, b], p["tint"][0, a])  # each colour drawable in the other's tint
                                 or wraps(p["colour"][0, a], p["tint"][0, b]))
        pairs = [(a, b) for a in sorted(colour) for b in sorted(colour)
                 if a < b and colour[a] != colour[b] and fine(a, b)]
        if pairs:
            a, b = (top, low) if (min(top, low), max(top, low)) in pairs else rng.choice(pairs)
            swapped = with_values(with_values(objs, a, colour=colour[b]), b, colour=colour[a])
            both("colour_swap", swapped_colours(p, a, b), swapped)
        # erased: the remaining objects, renumbered as erased() moves their slots up
        gone, c = erased(p, top), COLOUR_NAMES[rng.choice(free_colours)]
        rest = [o | {"slot": o["slot"] - (o["slot"] > top)} for o in objs if o["slot"] != top]
        new_low = low - (low > top)
        pos, neg = listing(rest), listing(with_values(rest, new_low, colour=c))
        trials.append(Trial("erased_salient", i, (gone, pos), (gone, neg)))
        trials.append(Trial("erased_salient_original_image", i, (p, pos), (p, neg)))  # the control
    return trials


def subcategories(ds) -> list | None:
    """Each item's subcategory name (None where unknown), or None when the data set has none: from its
    ``subcategory`` label field, else from its manifest rows by ``concept_id``."""
    names = (getattr(ds, "label_names", None) or {}).get("subcategory")
    if names:
        out = [names[lab["subcategory"]] if "subcategory" in (lab := ds.labels(i)) else None for i in range(len(ds))]
    else:
        concepts, path = concept_ids(ds), getattr(ds, "path", None)
        if concepts is None or path is None:
            return None
        from polyalign.data.manifest import read_rows

        by_concept = {str(r["concept_id"]): r["subcategory"] for _, r in read_rows(path)
                      if isinstance(r, dict) and r.get("concept_id") not in (None, "") and r.get("subcategory")}
        out = [by_concept.get(c) for c in concepts]
    return out if any(s is not None for s in out) else None


def subcategory_trials(ds, items: list[int], subcats: list, seed: int) -> list[Trial]:
    """An item's image with one of its captions vs a caption of another concept, of the same subcategory
    (``same_subcategory``) or of another (``other_subcategory``)."""
    concept = concept_ids(ds) or [None] * len(ds)
    concept = [c if c is not None else f"item:{i}" for i, c in enumerate(concept)]  # no id: each item its own concept
    groups: dict = {}
    for j, s in enumerate(subcats):
        if s is not None:
            groups.setdefault(s, []).append(j)
    labelled = [j for j, s in enumerate(subcats) if s is not None]
    trials = []
    for i in items:
        if subcats[i] is None:
            continue
        rng, own = _rng(seed, "subcategory", i), {normalise_caption(c) for c in ds.captions(i)}
        positive = rng.choice(ds.captions(i))
        same = [j for j in groups[subcats[i]] if concept[j] != concept[i]]
        other = next((j for j in (rng.choice(labelled) for _ in range(100)) if subcats[j] != subcats[i]), None)
        for kind, j in (("same_subcategory", rng.choice(same) if same else None), ("other_subcategory", other)):
            caps = [] if j is None else [c for c in ds.captions(j) if normalise_caption(c) not in own]
            if caps:  # (a caption the item has too is no negative)
                trials.append(Trial(kind, i, (i, positive), (i, rng.choice(caps))))
    return trials


def _score_trials(model, ds, tokenizer, trials: list[Trial], device, batch_size: int) -> list[tuple[str, float, float]]:
    """(kind, positive logit, negative logit) of the trials whose captions fit the tokenizer's context, each
    distinct (image, caption) pair scored once."""
    trials = [t for t in trials if fits(tokenizer, t.pos[1]) and fits(tokenizer, t.neg[1])]
    keys, images, pairs = {}, [], {}
    for t in trials:
        for scene, caption in (t.pos, t.neg):
            key = _scene_key(scene)
            if key not in keys:
                keys[key] = len(images)
                images.append(scene)
            pairs.setdefault((keys[key], caption), len(pairs))
    if not trials:
        return []
    scenes = [s for s in images if isinstance(s, dict)]  # re-rendered scenes; ints: the data set's own items
    drawn = iter(render(ds, scenes) if scenes else ())
    stored = [next(drawn) if isinstance(s, dict) else ds.image(s) for s in images]
    order = list(pairs)
    scores = torch.empty(len(order))
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        batch = torch.stack([stored[k] for k, _ in chunk]).float().div(255).to(device)
        ids, mask = tokenizer([c for _, c in chunk])
        scores[s:s + len(chunk)] = model.itm_scores(batch, ids.to(device), mask.to(device)).float().cpu()
    score = lambda side: float(scores[pairs[(keys[_scene_key(side[0])], side[1])]])
    return [(t.kind, score(t.pos), score(t.neg)) for t in trials]


def _scene_key(scene) -> tuple:
    return ("item", scene) if not isinstance(scene, dict) else tuple((k, v.tobytes()) for k, v in sorted(scene.items()))


def _accuracies(scored: list[tuple[str, float, float]]) -> dict[str, float]:
    """``itm_probe/<kind>_acc`` (positive strictly above negative; ties fail) and ``…_n`` per kind; for the erased
    probe also the mean logits of the remaining objects' caption on the original and the erased image."""
    out = {}
    for kind in dict.fromkeys(k for k, _, _ in scored):
        rows = [(p, n) for k, p, n in scored if k == kind]
        out[f"itm_probe/{kind}_acc"] = float(np.mean([p > n for p, n in rows]))
        out[f"itm_probe/{kind}_n"] = float(len(rows))
        if kind == "erased_salient":
            out["itm_probe/erased_salient_logit_erased"] = float(np.mean([p for p, _ in rows]))
        if kind == "erased_salient_original_image":
            out["itm_probe/erased_salient_logit_original"] = float(np.mean([p for p, _ in rows]))
    return out


# --- ITM re-ranking with every relevant image counted ---
def rerank_any(model, ds, tokenizer, items: list[int], device, k: int = 16, ks=(1, 5), max_captions: int = 5,
               batch_size: int = 64) -> dict[str, float]:
    """t2i R@k over the gallery of ``items``: ITC top-``k`` re-ranked by ITM (``rerank_any_t2i_R@k``), the same
    candidates in ITC order (``itc_any_t2i_R@k``), both counting every relevant image (``eval.retrieval_any``), and
    the strict ITM figure (``rerank_t2i_R@k``: the caption's own image only)."""
    texts, owner = [], []
    for n, i in enumerate(items):
        caps = ds.captions(i)[:max_captions]
        texts += caps
        owner += [n] * len(caps)
    owner = torch.tensor(owner, dtype=torch.long)
    concepts = concept_ids(ds)
    pj, pi = relevance_pairs(owner, len(items), texts, [concepts[i] for i in items] if concepts else None)
    relevant = torch.zeros(len(texts), len(items), dtype=torch.bool)
    relevant[pj, pi] = True
    ids, mask = tokenizer(texts)
    length = max(int(mask.sum(1).max()), 1)  # one width for all captions, as eval.rerank
    ids, mask = ids[:, :length].to(device), mask[:, :length].to(device)
    v = torch.cat([model.image_encoder(torch.stack([ds.image(i) for i in items[s:s + batch_size]]).float().div(255)
                                       .to(device)) for s in range(0, len(items), batch_size)])  # (N, 1+P, Dv)
    w = torch.cat([model.text_encoder(ids[s:s + batch_size], mask[s:s + batch_size])
                   for s in range(0, len(texts), batch_size)])  # (M, L, D)
    img_emb = torch.cat([model.image_proj(v[s:s + batch_size]) for s in range(0, len(items), batch_size)])
    txt_emb = torch.cat([model.text_proj(w[s:s + batch_size], mask[s:s + batch_size])
                         for s in range(0, len(texts), batch_size)])
    sim, cand = topk_chunked(txt_emb, img_emb, k)  # (M, k)
    itm = _rescore(model, w, v, cand, True, mask, batch_size).cpu()
    sim, cand = sim.float().cpu(), cand.cpu()
    hit_any = relevant.gather(1, cand)
    ranks = {"rerank_any": first_hit(itm, hit_any), "itc_any": first_hit(sim, hit_any),
             "rerank": first_hit(itm, cand == owner[:, None])}
    out = {f"itm_probe/{name}_t2i_R@{r}": float((rank < r).float().mean()) for name, rank in ranks.items() for r in ks}
    return out | {"itm_probe/rerank_n_queries": float(len(texts)), "itm_probe/rerank_n_gallery": float(len(items))}
