"""Evaluation: embeddings, chunked retrieval recall (strict, and counting every right answer), bootstrap intervals,
zero-shot, linear probe, retrieval example pictures."""
from polyalign.eval.embed import embed_images, embed_texts
from polyalign.eval.plots import plot_retrieval_examples
from polyalign.eval.probe import linear_probe
from polyalign.eval.retrieval import rank_metrics, retrieval_metrics, topk_chunked
from polyalign.eval.retrieval_any import retrieval_ranks
from polyalign.eval.run import evaluate
from polyalign.eval.zeroshot import zeroshot_accuracy, zeroshot_classifier

__all__ = [
    "embed_images",
    "embed_texts",
    "evaluate",
    "linear_probe",
    "plot_retrieval_examples",
    "rank_metrics",
    "retrieval_metrics",
    "retrieval_ranks",
    "topk_chunked",
    "zeroshot_accuracy",
    "zeroshot_classifier",
]
