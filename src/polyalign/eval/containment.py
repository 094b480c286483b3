"""Containment metrics (``containment/*``): does a scene of several objects *contain* ⟨colour shape⟩?

The granularity task of ``data.name=shapes_clutter`` (and plain ``shapes``): a query names one object, and every
scene that holds an object of that colour and shape is a right answer (multi-positive). On a test set whose items
list their objects (``dataset.objects(i)`` → dicts with ``colour`` and ``shape``):

- ``containment/t2i_mAP``: for each query "a {colour} {shape}" over the pairs present in the test set, all test
  images ranked by similarity to the query's embedding; average precision against "the image contains it", mean
  over the queries. ``containment/t2i_R@1``: fraction of queries whose best-ranked image contains it;
  ``containment/n_queries``: how many queries.
- ``containment/zeroshot_mAP``: the multi-label zero-shot classifier. Each colour × shape class gets a prompt
  embedding (the renormalised mean of its normalised template embeddings, as ``zeroshot.zeroshot_classifier``);
  each image scores every class; AP per class over the images (classes with a positive), mean.
- ``containment/zeroshot_image_mAP``: the same scores ranked the other way, per image over the classes (label
  ranking AP): are the classes an image contains above those it lacks? A per-class score offset (a prompt that is
  close to every image) moves this one and not the per-class APs; a per-image offset the reverse.

APs follow ``tagging.average_precision`` (ties as in scikit-learn). Each figure gets a 95% bootstrap interval over
its queries (classes, images) when ``bootstrap`` > 0. Dense (N, C) scores: 2,000 images × 48 classes is nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from polyalign.data.shapes_clutter import with_article
from polyalign.eval.bootstrap import hit_interval
from polyalign.eval.embed import embed_texts
from polyalign.eval.tagging import average_precision

TEMPLATES = ("a {}", "there is a {}", "a picture with a {}")  # zero-shot prompts (a dataset may give its own)


def has_objects(dataset) -> bool:
    """Whether the items list their objects (``objects(i)``), which the containment metrics need."""
    return callable(getattr(dataset, "objects", None))


def object_classes(dataset) -> tuple[list[str], torch.Tensor]:
    """The classes "colour shape" (every colour × every shape seen in the dataset's objects, sorted) and the (N, C)
    bool matrix: item i contains an object of class c."""
    pairs = [{(o["colour"], o["shape"]) for o in dataset.objects(i)} for i in range(len(dataset))]
    colours = sorted({c for p in pairs for c, _ in p})
    shapes = sorted({s for p in pairs for _, s in p})
    names = [f"{c} {s}" for c in colours for s in shapes]
    column = {name: k for k, name in enumerate(names)}
    targets = torch.zeros(len(pairs), len(names), dtype=torch.bool)
    for i, p in enumerate(pairs):
        targets[i, [column[f"{c} {s}"] for c, s in p]] = True
    return names, targets


def ranking_scores(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``scores`` (N, Q) that has a positive in ``targets`` (N, Q): (Q',) AP and (Q',) top-1 hit (the
    highest-scoring row is a positive; ties go to the first row)."""
    keep = targets.any(dim=0)
    ap = average_precision(scores[:, keep], targets[:, keep])
    top = scores[:, keep].argmax(dim=0)  # (Q',)
    hit = targets[:, keep].gather(0, top[None].to(targets.device))[0]
    return ap, hit.float()


def containment_metrics(img_emb: torch.Tensor, query_emb: torch.Tensor, class_emb: torch.Tensor,
                        targets: torch.Tensor, bootstrap: int = 0) -> dict[str, float]:
    """``containment/*`` (module docstring) from (N, D) image embeddings, (C, D) query embeddings ("a {colour}
    {shape}"), (C, D) zero-shot class embeddings and (N, C) containment targets (classes without a positive are no
    query)."""
    img, targets = img_emb.detach().float().cpu(), targets.cpu().bool()
    ap, hit = ranking_scores(img @ query_emb.detach().float().cpu().T, targets)  # (Q,), (Q,)
    zs = img @ class_emb.detach().float().cpu().T  # (N, C)
    zs_ap, _ = ranking_scores(zs, targets)
    has = targets.any(dim=1)  # images with at least one object of a class (all, for scenes)
    image_ap = average_precision(zs[has].T, targets[has].T)  # (N',): per image, over the classes
    out = {"containment/t2i_mAP": ap.mean().item(), "containment/t2i_R@1": hit.mean().item(),
           "containment/n_queries": float(ap.numel()), "containment/zeroshot_mAP": zs_ap.mean().item(),
           "containment/zeroshot_image_mAP": image_ap.mean().item()}
    for key, values in (("t2i_mAP", ap), ("t2i_R@1", hit), ("zeroshot_mAP", zs_ap), ("zeroshot_image_mAP", image_ap)):
        out |= hit_interval(f"containment/{key}", values.numpy(), bootstrap)
    return out


def prompt_embeddings(model, tokenizer, names: list[str], templates, batch_size: int = 256) -> torch.Tensor:
    """(C, D) per class name, the renormalised mean of its normalised template embeddings ("a orange" → "an")."""
    texts = [with_article(t.format(name)) for name in names for t in templates]
    emb = embed_texts(model, tokenizer, texts, batch_size).view(len(names), len(templates), -1)  # (C, T, D)
    return F.normalize(F.normalize(emb.float(), dim=-1).mean(dim=1), dim=-1)


def evaluate_containment(model, tokenizer, dataset, img_emb: torch.Tensor, batch_size: int = 256,
                         bootstrap: int = 0) -> dict[str, float]:
    """``containment/*`` of a test set whose items list their objects, from its (N, D) image embeddings."""
    names, targets = object_classes(dataset)
    present = targets.any(dim=0)
    queries = prompt_embeddings(model, tokenizer, [n for n, p in zip(names, present) if p], ["a {}"], batch_size)
    query_emb = torch.zeros(len(names), queries.shape[1])
    query_emb[present] = queries  # classes absent from the test set are no query (ranking_scores drops them)
    templates = getattr(dataset, "containment_templates", None) or TEMPLATES
    class_emb = prompt_embeddings(model, tokenizer, names, templates, batch_size)
    return containment_metrics(img_emb, query_emb, class_emb, targets, bootstrap)


def attribute_baselines(dataset) -> dict[str, float]:
    """``containment/t2i_mAP`` of three reference scorers that need no model: ``colour`` (does the scene have the
    query's colour?), ``shape`` (its shape?) and ``bag`` (how many of the two: colours and shapes known, not which
    go together); with ``chance`` (the mean fraction of positives) and perfect binding at 1. How much of the metric a
    model can earn without binding colour to shape."""
    names, targets = object_classes(dataset)
    colours = sorted({n.split(" ", 1)[0] for n in names})
    shapes = sorted({n.split(" ", 1)[1] for n in names})
    index = {w: k for k, w in enumerate(colours + shapes)}  # colour and shape words: disjoint in the shapes data
    words = torch.zeros(len(dataset), len(index))  # (N, colours + shapes): which attributes each scene has
    for i in range(len(dataset)):
        for o in dataset.objects(i):
            words[i, [index[o["colour"]], index[o["shape"]]]] = 1
    query = torch.zeros(len(names), len(index))
    for k, n in enumerate(names):
        query[k, [index[w] for w in n.split(" ", 1)]] = 1
    is_colour = (torch.arange(len(index)) < len(colours)).float()
    out = {"chance": targets[:, targets.any(0)].float().mean().item()}
    for name, q in (("colour", query * is_colour), ("shape", query * (1 - is_colour)), ("bag", query)):
        out[name] = containment_metrics(words, q, q, targets)["containment/t2i_mAP"]
    return out
