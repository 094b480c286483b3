"""One call that evaluates a model on a dataset: retrieval, zero-shot per label field, linear probe, tagging,
examples PNG. The model's towers may read any modalities (image–text, audio–text, points–image, ...)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from polyalign.data.tags import tag_matrix, tag_vocabulary
from polyalign.errors import ConfigError
from polyalign.eval.embed import embed_items, embed_texts
from polyalign.eval.plots import plot_retrieval_examples
from polyalign.eval.probe import ProbeDataError, linear_probe
from polyalign.eval.bootstrap import hit_interval
from polyalign.eval.containment import evaluate_containment, has_objects
from polyalign.eval.retrieval import rank_metrics, topk_chunked
from polyalign.eval.retrieval_any import concept_ids, relevance_pairs, retrieval_ranks
from polyalign.eval.tagging import TaggingDataError, head_scores, mean_average_precision, scored_tags, tagging_probe
from polyalign.eval.zeroshot import zeroshot_classifier, zeroshot_hits

logger = logging.getLogger(__name__)
RECALL_AT = (1, 5, 10)


def caption_table(dataset, max_captions: int) -> tuple[list[str], torch.Tensor]:
    """Up to ``max_captions`` captions per item, flattened, and the (M,) item index of each."""
    texts, owner = [], []
    for i in range(len(dataset)):
        caps = dataset.captions(i)[:max_captions]
        texts += caps
        owner += [i] * len(caps)
    return texts, torch.tensor(owner, dtype=torch.long)


def items_with_field(dataset, field: str) -> tuple[list[int], torch.Tensor]:
    """The items whose ``labels`` carry ``field``, and their (n,) class indices."""
    idx, ys = [], []
    for i in range(len(dataset)):
        y = dataset.labels(i).get(field)
        if y is not None:
            idx.append(i)
            ys.append(y)
    return idx, torch.tensor(ys, dtype=torch.long)


def zeroshot_fields_of(dataset, templates: dict | None) -> list[str]:
    """Label fields that have prompt templates (given ones first, then the dataset's)."""
    names = list(templates or {}) + list(getattr(dataset, "prompt_templates", None) or {})
    return [f for f in dict.fromkeys(names) if f in dataset.label_names]


def _templates_for(dataset, field: str, templates: dict | None) -> list[str]:
    found = (templates or {}).get(field) or (getattr(dataset, "prompt_templates", None) or {}).get(field)
    if not found:
        raise ValueError(f"no prompt templates for zero-shot field {field!r}")
    return found


def _subsample(idx: list[int], y: torch.Tensor, limit: int) -> tuple[list[int], torch.Tensor]:
    """At most ``limit`` items, drawn without replacement by a fixed-seed generator, kept in dataset order."""
    if len(idx) <= limit:
        return idx, y
    keep = np.sort(np.random.default_rng(0).choice(len(idx), size=limit, replace=False))
    return [idx[k] for k in keep], y[torch.from_numpy(keep)]


class _Features:
    """Pooled features (``<modality>_features``) per dataset item, embedded once and shared by the probes."""

    def __init__(self, model, batch_size: int, modality: str = "image"):
        self.model, self.batch_size, self.modality, self.rows = model, batch_size, modality, {}

    def __call__(self, dataset, idx: list[int]) -> torch.Tensor:
        """(len(idx), W) features of the items ``idx``; only items not embedded before are run through the model."""
        rows = self.rows.setdefault(id(dataset), {})
        missing = [i for i in dict.fromkeys(idx) if i not in rows]
        if missing:
            rows.update(zip(missing, embed_items(self.model, dataset, self.modality, self.batch_size, missing,
                                                 features=True)))
        return torch.stack([rows[i] for i in idx])


def _tagging(model, train_ds, test_ds, features: _Features, max_train: int, batch_size: int,
             tag_min_count: int = 5, max_tags: int = 1000) -> dict[str, float]:
    """``tagging/probe_mAP`` and ``tagging/n_tags`` (vocabulary from train_ds), plus ``tagging/head_mAP`` when the
    model has a tag head (``tag_logits`` over ``tag_names``); {} when the data has no usable tags."""
    vocab = tag_vocabulary((train_ds.tags(i) for i in range(len(train_ds))), tag_min_count, max_tags)
    if not vocab:
        return {}
    test_y = tag_matrix(test_ds, vocab)  # (M, T)
    if not test_y.any():
        logger.warning("tagging skipped: no test item carries any of the %d training tags", len(vocab))
        return {}
    train_idx, _ = _subsample(list(range(len(train_ds))), torch.zeros(len(train_ds)), max_train)
    train_y = tag_matrix(train_ds, vocab, train_idx)  # (N, T)
    test_idx = list(range(len(test_ds)))
    out = {}
    try:
        out["tagging/probe_mAP"] = tagging_probe(features(train_ds, train_idx), train_y, features(test_ds, test_idx),
                                                 test_y)
        out["tagging/n_tags"] = float(scored_tags(train_y, test_y).sum())
    except TaggingDataError as err:
        logger.warning("tagging probe skipped: %s", err)
    names = getattr(model, "tag_names", None)
    if names and callable(getattr(model, "tag_logits", None)):
        head_y = tag_matrix(test_ds, list(names))  # (M, T_head): the head's own vocabulary
        try:
            out["tagging/head_mAP"] = mean_average_precision(head_scores(model, test_ds, test_idx, batch_size), head_y)
        except TaggingDataError as err:
            logger.warning("tag head mAP skipped: %s", err)
    return out


def _retrieval_examples(path, test_ds, texts, txt_to_img, txt_emb, img_emb, n_examples, chunk_size) -> None:
    """PNG of the top-5 images for the first caption of ``n_examples`` items spread evenly over the test set; an
    image is framed green when it is a right answer as ``retrieval_any`` counts them (the query's own image, an
    image with the same caption text, or one of the same concept)."""
    firsts = torch.ones_like(txt_to_img, dtype=torch.bool)
    firsts[1:] = txt_to_img[1:] != txt_to_img[:-1]
    starts = torch.nonzero(firsts).flatten()
    queries = starts[torch.linspace(0, len(starts) - 1, min(n_examples, len(starts))).round().long()]
    _, top = topk_chunked(txt_emb[queries.to(txt_emb.device)], img_emb, 5, chunk_size)  # (n, 5)
    pj, pi = relevance_pairs(txt_to_img, len(test_ds), texts, concept_ids(test_ds))  # as retrieval_any counts
    right = set(zip(pj.tolist(), pi.tolist()))
    plot_retrieval_examples(
        path,
        [texts[int(q)] for q in queries],
        [[test_ds.image(int(i)) for i in row] for row in top.cpu()],
        [[(int(q), int(i)) in right for i in row] for q, row in zip(queries, top.cpu())],
    )


def evaluate(
    model,
    tokenizer,
    train_ds,
    test_ds,
    *,
    batch_size: int = 256,
    zeroshot_fields: list[str] | None = None,
    templates: dict[str, list[str]] | None = None,
    probe_field: str | None = None,
    probe_max_train: int = 10000,
    max_captions: int = 5,
    chunk_size: int = 8192,
    precision: str = "fp32",
    out_dir=None,
    n_examples: int = 5,
    tag_min_count: int = 5,
    max_tags: int = 1000,
    modalities: tuple[str, str] = ("image", "text"),
    bootstrap: int = 1000,
) -> dict[str, float]:
    """Flat metrics: ``retrieval/*`` on test_ds, ``retrieval_any/*`` (every right answer counts, with median ranks
    ``…_MdR``; see ``eval.retrieval_any``), ``zeroshot/<field>_acc``, ``probe/<field>_acc`` (trained on train_ds),
    ``tagging/*`` when the datasets have tags (see ``_tagging``), ``containment/*`` when the test items list their
    objects (``eval.containment``: shapes, shapes_clutter). Every retrieval and zero-shot figure gets a 95%
    bootstrap interval over its queries (``<key>_ci_low``, ``<key>_ci_high``; ``bootstrap`` resamples, 0 = none).

    ``modalities`` are the model's towers (first, second). Retrieval is between the first tower's items and the
    second's: captions (up to ``max_captions`` per item) when it is text, else each item's own input of that modality
    (e.g. its render); keys name the direction by initials (``t2i``/``i2t`` for image–text, ``t2a``/``a2t`` for
    audio–text, ``i2p``/``p2i`` for points–image). Zero-shot needs a text tower; probes read first-tower features."""
    results: dict[str, float] = {}
    first, second = modalities
    a_emb = embed_items(model, test_ds, first, batch_size)  # (N, D)
    if second == "text":
        texts, b_to_a = caption_table(test_ds, max_captions)
        b_emb = embed_texts(model, tokenizer, texts, batch_size)  # (M, D)
    else:
        b_emb, b_to_a = embed_items(model, test_ds, second, batch_size), torch.arange(len(test_ds))  # (N, D), (N,)
    dtype = torch.bfloat16 if precision == "bf16" else None
    names = {"t2i": f"{second[0]}2{first[0]}", "i2t": f"{first[0]}2{second[0]}"}
    ranks = retrieval_ranks(a_emb, b_emb, b_to_a, max(RECALL_AT), chunk_size, dtype,
                            texts if second == "text" else None, concept_ids(test_ds))
    for prefix, per_direction in ranks.items():  # retrieval (strict), retrieval_any
        figures = rank_metrics(per_direction, RECALL_AT, median=prefix == "retrieval_any", n_resamples=bootstrap,
                               tag=prefix + "/")
        for name, value in figures.items():
            direction, _, rest = name.partition("_")
            results[f"{prefix}/{names.get(direction, direction)}{'_' if rest else ''}{rest}"] = value

    fields = zeroshot_fields_of(test_ds, templates) if zeroshot_fields is None else list(zeroshot_fields)
    for field in fields if second == "text" else []:  # class prompts need the text tower
        if field not in test_ds.label_names:
            raise ConfigError(f"eval.zeroshot_fields: {field!r} is not a label field of the test set "
                              f"(fields: {', '.join(test_ds.label_names) or 'none'})")
        idx, y = items_with_field(test_ds, field)
        if len(torch.unique(y)) < 2:
            logger.warning("zero-shot %r skipped: %d class(es) present in the test items", field, len(torch.unique(y)))
            continue
        classifier = zeroshot_classifier(
            model, tokenizer, test_ds.label_names[field], _templates_for(test_ds, field, templates), batch_size
        )
        hits = zeroshot_hits(a_emb[torch.tensor(idx, device=a_emb.device)], y, classifier)  # (n,) per image
        results[f"zeroshot/{field}_acc"] = hits.float().mean().item()
        results |= hit_interval(f"zeroshot/{field}_acc", hits.cpu().numpy(), bootstrap)
    if second == "text" and has_objects(test_ds):  # scenes that list their objects: "contains ⟨colour shape⟩"
        results |= evaluate_containment(model, tokenizer, test_ds, a_emb, batch_size, bootstrap)

    features = _Features(model, batch_size, first)  # (n, W) pooled features, shared by the linear and tagging probes
    probe_field = probe_field or (fields[0] if fields else None)
    if probe_field is not None:
        train_idx, train_y = _subsample(*items_with_field(train_ds, probe_field), probe_max_train)
        test_idx, test_y = items_with_field(test_ds, probe_field)
        try:
            if not train_idx or not test_idx:
                raise ProbeDataError(f"{len(train_idx)} train and {len(test_idx)} test items carry the field")
            results[f"probe/{probe_field}_acc"] = linear_probe(features(train_ds, train_idx), train_y,
                                                               features(test_ds, test_idx), test_y)
        except ProbeDataError as err:
            logger.warning("linear probe on %r skipped: %s", probe_field, err)
    results |= _tagging(model, train_ds, test_ds, features, probe_max_train, batch_size, tag_min_count, max_tags)

    if out_dir is not None and n_examples > 0 and (first, second) == ("image", "text"):
        path = Path(out_dir) / "retrieval_examples.png"
        _retrieval_examples(path, test_ds, texts, b_to_a, b_emb, a_emb, n_examples, chunk_size)
    return results
