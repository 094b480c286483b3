"""C-MCR's pieces as pure functions: semantic consistency (soft retrieval from a memory; its nearest-row and
soft-pivot variants), semantic completion (noise), inter-space and intra-space alignment.

Paper: Wang et al., "Connecting Multi-modal Contrastive Representations", NeurIPS 2023, arXiv 2305.14381.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from polyalign.losses.contrastive import info_nce


@torch.no_grad()
def soft_retrieve(queries: torch.Tensor, memory: torch.Tensor, tau: float, query_chunk: int = 1024,
                  memory_chunk: int = 16384, dtype: torch.dtype = torch.float32,
                  normalize: bool = True, values: torch.Tensor | None = None) -> torch.Tensor:
    """``normalize(softmax(queries · memoryᵀ / tau) · memory)`` (Q, D), never holding more than a
    (query_chunk, memory_chunk) block of scores. With ``values`` (M, Dv), row-aligned with ``memory``: the weights
    come from ``memory`` and average ``values`` instead, (Q, Dv) (the soft pivot: B in one space weighs B in the other).

    The softmax runs online over memory chunks (running max ``m``, running sum ``l``, running weighted sum
    ``acc``, each rescaled by ``exp(m_old − m_new)`` when the max grows), so a million-row memory costs the
    memory itself plus one block. ``dtype`` is the precision of the two matrix products (bfloat16: faster on
    hardware with bf16 units; cosines are then rounded to ~3 digits, i.e. logits off by up to ~0.2 at tau 0.01);
    the softmax statistics are always float32. ``normalize=False`` returns the
    weighted mean itself (with ``memory = I`` that is the softmax weights). The memory may stay on the CPU while
    the queries are on a GPU: its chunks are moved (and cast) one at a time.
    """
    if queries.shape[-1] != memory.shape[-1]:
        raise ValueError(f"queries have dim {queries.shape[-1]}, memory has dim {memory.shape[-1]}")
    if memory.shape[0] == 0:
        raise ValueError("soft_retrieve: empty memory")
    if values is not None and values.shape[0] != memory.shape[0]:
        raise ValueError(f"values have {values.shape[0]} rows, memory {memory.shape[0]}: they must be row-aligned")
    values = memory if values is None else values
    out = torch.empty(queries.shape[0], values.shape[1], dtype=torch.float32, device=queries.device)
    for qs in range(0, queries.shape[0], query_chunk):
        q = queries[qs : qs + query_chunk].to(dtype)  # (q, D)
        run_max = torch.full((q.shape[0], 1), -torch.inf, device=q.device)  # (q, 1)
        run_sum = torch.zeros(q.shape[0], 1, device=q.device)  # (q, 1)
        acc = torch.zeros(q.shape[0], values.shape[1], device=q.device)  # (q, Dv)
        for ms in range(0, memory.shape[0], memory_chunk):
            m = memory[ms : ms + memory_chunk].to(device=q.device, dtype=dtype)  # (m, D); a copy only if cast or moved
            scores = (q @ m.T).float().mul_(1.0 / tau)  # (q, m) logits
            new_max = torch.maximum(run_max, scores.amax(dim=1, keepdim=True))
            rescale = torch.exp(run_max - new_max)  # (q, 1); exp(-inf) = 0 on the first chunk
            probs = scores.sub_(new_max).exp_()  # in place: one (q, m) block
            run_sum = run_sum * rescale + probs.sum(dim=1, keepdim=True)
            v = m if values is memory else values[ms : ms + memory_chunk].to(device=q.device, dtype=dtype)
            acc = acc * rescale + (probs.to(dtype) @ v).float()
            run_max = new_max
        out[qs : qs + q.shape[0]] = acc / run_sum
    return F.normalize(out, dim=-1) if normalize else out


@torch.no_grad()
def nearest_index(queries: torch.Tensor, memory: torch.Tensor, query_chunk: int = 1024, memory_chunk: int = 16384,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The row of ``memory`` with the highest dot product for each query (Q,) long, on the memory's device; blocks of
    (query_chunk, memory_chunk) scores as in :func:`soft_retrieve` (the first row wins a tie)."""
    if queries.shape[-1] != memory.shape[-1]:
        raise ValueError(f"queries have dim {queries.shape[-1]}, memory has dim {memory.shape[-1]}")
    if memory.shape[0] == 0:
        raise ValueError("nearest_index: empty memory")
    out = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
    for qs in range(0, queries.shape[0], query_chunk):
        q = queries[qs : qs + query_chunk].to(dtype)  # (q, D)
        best = torch.full((q.shape[0],), -torch.inf, device=q.device)
        arg = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        for ms in range(0, memory.shape[0], memory_chunk):
            scores = (q @ memory[ms : ms + memory_chunk].to(device=q.device, dtype=dtype).T).float()  # (q, m)
            top, i = scores.max(dim=1)
            better = top > best  # strictly: an earlier chunk keeps a tie
            best, arg = torch.where(better, top, best), torch.where(better, i + ms, arg)
        out[qs : qs + q.shape[0]] = arg
    return out.to(memory.device)


def add_noise(emb: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Semantic completion: ``normalize(emb + ε)``, ε ~ N(0, std² I) fresh on every call (std 0: just normalise)."""
    if std == 0:
        return F.normalize(emb, dim=-1)
    noise = torch.randn(emb.shape, generator=generator, device=emb.device, dtype=emb.dtype)
    return F.normalize(emb + std * noise, dim=-1)


def intra_alignment(b_x: torch.Tensor, a_x: torch.Tensor, b_y: torch.Tensor, c_y: torch.Tensor) -> torch.Tensor:
    """Attraction within each space, no negatives: ``mean(1 − cos(B̂x, Âx)) + mean(1 − cos(B̂y, Ĉy))``."""
    return (1 - F.cosine_similarity(b_x, a_x, dim=-1)).mean() + (1 - F.cosine_similarity(b_y, c_y, dim=-1)).mean()


def cmcr_loss(b_x: torch.Tensor, a_x: torch.Tensor | None, b_y: torch.Tensor, c_y: torch.Tensor | None,
              tau_native: float = 0.01, tau_pseudo: float = 0.01, intra_weight: float = 0.1) -> dict[str, torch.Tensor]:
    """C-MCR objective on projected, normalised (B, D) embeddings of one batch.

    ``native_loss``: symmetric InfoNCE between the same B item in both spaces (B̂x, B̂y; τ2);
    ``pseudo_loss``: symmetric InfoNCE between its pseudo A and pseudo C (Âx, Ĉy; τ3);
    ``intra_loss``: :func:`intra_alignment`; ``loss = native + pseudo + intra_weight · intra``.
    Without pseudo pairs (``a_x`` and ``c_y`` None: no memories) the pseudo and intra terms are 0: the native InfoNCE.
    """
    native = info_nce(b_x, b_y, 1.0 / tau_native)
    if a_x is None or c_y is None:
        if a_x is not None or c_y is not None:
            raise ValueError("cmcr_loss: give both pseudo embeddings (a_x, c_y) or neither")
        zero = native.new_zeros(())
        return {"native_loss": native, "pseudo_loss": zero, "intra_loss": zero, "loss": native}
    terms = {"native_loss": native,
             "pseudo_loss": info_nce(a_x, c_y, 1.0 / tau_pseudo),
             "intra_loss": intra_alignment(b_x, a_x, b_y, c_y)}
    terms["loss"] = terms["native_loss"] + terms["pseudo_loss"] + intra_weight * terms["intra_loss"]
    return terms
