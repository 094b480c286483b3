"""FDT head: image and text tokens grounded to one shared codebook of finite discrete tokens.

"Revisiting Multimodal Representation in Contrastive Learning: From Patch and Token Embeddings to Finite
Discrete Tokens", Chen et al., CVPR 2023, arXiv 2303.14865. Sparsemax: Martins & Astudillo, arXiv 1602.02068.

    Q = query_m(tokens)                 (B, N, D)   per-modality MLP
    A = Q Fᵀ / sqrt(D) / T_fdt          (B, N, C)   relevance of every token to every codebook entry
    r = max (or mean) of A over tokens  (B, C)      padding never takes part
    w = sparsemax(r)                    (B, C)      (or softmax, sigmoid)
    z = normalize(w F)                  (B, D)      the embedding
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Sparsemax(torch.autograd.Function):
    """Euclidean projection of each row onto the probability simplex, sort-based (exact)."""

    @staticmethod
    def forward(ctx, x):
        z = x - x.amax(-1, keepdim=True)  # the projection is shift-invariant; this keeps the sums small
        zs = z.sort(-1, descending=True).values
        k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
        cums = zs.cumsum(-1)
        support = (1 + k * zs > cums).sum(-1, keepdim=True)  # size of the support, ≥ 1
        tau = (cums.gather(-1, support - 1) - 1) / support.to(z.dtype)
        p = (z - tau).clamp_min(0)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        on = (p > 0).to(g.dtype)
        mean_on = (g * on).sum(-1, keepdim=True) / on.sum(-1, keepdim=True)
        return on * (g - mean_on)  # g − mean(g over the support) on the support, 0 elsewhere


def sparsemax(x: torch.Tensor) -> torch.Tensor:
    """Sparsemax along the last dim: ``argmin_{p in simplex} ||p − x||²`` (non-negative, sums to 1, often sparse)."""
    return _Sparsemax.apply(x)


class _ChunkedMaxGrounding(torch.autograd.Function):
    """``max_n (q[:, n] · scale) @ codebookᵀ`` over the tokens n where ``mask`` holds, never holding (B, N, C).

    Forward: ``chunk`` tokens at a time, keeping a running max and argmax (B, C). Backward: each (b, c) sends its
    gradient to its winning token only, so the gradients are products with a sparse (B·N, C) matrix holding one
    entry per (b, c): O(B·C·D) work and O(B·C) memory, where recomputing the (B, chunk, C) blocks would cost the
    forward's O(B·N·C·D) again.
    """

    @staticmethod
    def forward(ctx, q, codebook, mask, scale, chunk):
        b, n, _ = q.shape
        best = q.new_full((b, codebook.shape[0]), -math.inf)
        arg = torch.full(best.shape, -1, dtype=torch.long, device=q.device)  # -1: no valid token (yet)
        for s in range(0, n, chunk):
            a = (q[:, s : s + chunk] * scale) @ codebook.T  # (B, chunk, C)
            if mask is not None:
                a.masked_fill_(~mask[:, s : s + chunk, None], -math.inf)
            m, i = a.max(1)  # (B, C)
            better = m > best  # strict: ties keep the earlier token, as one argmax does
            best, arg = torch.where(better, m, best), torch.where(better, i + s, arg)
        ctx.save_for_backward(q, codebook, arg)
        ctx.scale = scale
        return best.masked_fill(arg < 0, 0.0)  # a row without valid tokens scores 0 everywhere

    @staticmethod
    def backward(ctx, g):  # g (B, C)
        q, codebook, arg = ctx.saved_tensors
        b, n, d = q.shape
        won = arg >= 0
        rows = (arg + n * torch.arange(b, device=q.device)[:, None])[won]  # the winner's row in q.flatten(0, 1)
        cols = torch.arange(codebook.shape[0], device=q.device).expand(b, -1)[won]
        acc = torch.promote_types(q.dtype, torch.float32)  # bf16 under autocast: the products in fp32
        vals = g.to(acc)[won] * ctx.scale
        # m[b·N + n, c] = g[b, c]·scale where token n won entry c: dq = m @ codebook, dcodebook = mᵀ @ q
        c = codebook.shape[0]
        m = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (b * n, c), check_invariants=False)
        mt = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals, (c, b * n), check_invariants=False)
        dq = torch.sparse.mm(m.coalesce(), codebook.to(acc)).view(b, n, d)
        dcode = torch.sparse.mm(mt.coalesce(), q.to(acc).flatten(0, 1))
        return dq.to(q.dtype), dcode.to(codebook.dtype), None, None, None


def relevance(q: torch.Tensor, codebook: torch.Tensor, scale: float) -> torch.Tensor:
    """A = (q · scale) codebookᵀ: (B, N, D), (C, D) → (B, N, C)."""
    return (q * scale) @ codebook.T


def ground(q: torch.Tensor, codebook: torch.Tensor, mask: torch.Tensor | None, scale: float,
           pool: str = "max", chunk: int = 0) -> torch.Tensor:
    """Token-to-codebook relevance pooled over the tokens where ``mask`` is True: (B, N, D) → (B, C).

    ``max``: padding is set to −inf before the max (it never wins); ``chunk`` > 0 computes it ``chunk`` tokens
    at a time with a sparse backward (same values and gradients, memory O(B·chunk·C) instead of O(B·N·C)).
    ``mean``: the masked mean of ``q`` times codebookᵀ (the mean of A, since A is linear in q), no (B, N, C).
    A row with no valid token scores 0.
    """
    if pool == "mean":
        if mask is None:
            return (q.mean(1) * scale) @ codebook.T
        m = mask.unsqueeze(-1).to(q.dtype)
        return ((q * m).sum(1) / m.sum(1).clamp_min(1.0) * scale) @ codebook.T
    if pool != "max":
        raise ValueError(f"unknown FDT pooling {pool!r} (max | mean)")
    if chunk > 0:  # one dtype inside (under autocast q is bf16; the backward runs outside autocast)
        return _ChunkedMaxGrounding.apply(q, codebook.to(q.dtype), mask, scale, chunk)
    a = relevance(q, codebook, scale)  # (B, N, C)
    if mask is None:
        return a.max(1).values
    r = a.masked_fill(~mask[..., None], -math.inf).max(1).values
    return r.masked_fill(~mask.any(1, keepdim=True), 0.0)


def normalise(r: torch.Tensor, how: str) -> torch.Tensor:
    """Scores (B, C) → weights (B, C). ``sigmoid`` weights are used as they are: z is L2-normalised, so
    dividing them by their sum would not change the embedding."""
    if how == "sparsemax":
        return sparsemax(r)
    if how == "softmax":
        return r.softmax(-1)
    if how == "sigmoid":
        return r.sigmoid()
    raise ValueError(f"unknown FDT normalisation {how!r} (sparsemax | softmax | sigmoid)")


def active_fraction(r_image: torch.Tensor, r_text: torch.Tensor) -> float:
    """The mean of the images' and the captions' mean fraction of entries that sparsemax keeps (weight > 0)."""
    return 0.5 * (float((sparsemax(r_image) > 0).float().mean()) + float((sparsemax(r_text) > 0).float().mean()))


def query_mlp(in_dim: int, dim: int) -> nn.Sequential:
    """LN(d_in) → Linear(d_in, D) → GELU → LN(D) → Linear(D, D), as in the authors' code."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, dim), nn.GELU(),
                         nn.LayerNorm(dim), nn.Linear(dim, dim))


class FDTHead(nn.Module):
    """A codebook F (C, D) shared by image and text, a query MLP per modality and the FDT loss's logit scale.

    ``image(tokens)`` / ``text(tokens, mask)`` return the embedding z (B, D) and the weights w (B, C).
    """

    def __init__(self, image_width: int, text_width: int, codebook_size: int = 1024, dim: int = 128,
                 t_fdt: float = 1000.0, norm: str = "sparsemax", pool: str = "max", chunk: int = 0,
                 init_logit_scale: float = 1 / 0.07, logit_scale_range: tuple[float, float] = (20.0, 100.0),
                 anneal: float = 1.0, anneal_steps: int = 0):
        super().__init__()
        # F: nn.Embedding's N(0, 1) init is the paper's randn, and its ``weight`` gets weight decay as in the paper
        self.codebook = nn.Embedding(codebook_size, dim)
        self.image_query, self.text_query = query_mlp(image_width, dim), query_mlp(text_width, dim)
        self.dim, self.anneal, self.anneal_steps = dim, float(anneal), int(anneal_steps)
        # T_fdt at step 0 (``calibrate`` may set it) and the completed optimiser steps (the anneal's clock): buffers,
        # so that a checkpoint holds them and a resumed run continues the schedule exactly
        self.register_buffer("t_start", torch.tensor(float(t_fdt), dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.norm, self.pool, self.chunk = norm, pool, chunk
        lo, hi = (math.log(v) for v in logit_scale_range)
        self.log_range = (lo, hi)
        self.logit_scale = nn.Parameter(torch.tensor(min(max(math.log(init_logit_scale), lo), hi)))

    def temperature(self) -> float:
        """T_fdt now: ``t_start · anneal^(min(step, anneal_steps) / anneal_steps)`` (``t_start`` when not annealing)."""
        t = float(self.t_start)
        if self.anneal == 1.0 or self.anneal_steps <= 0:
            return t
        return t * self.anneal ** (min(int(self.step), self.anneal_steps) / self.anneal_steps)

    @property
    def relevance_scale(self) -> float:
        """The factor of A = Q Fᵀ · scale: 1 / sqrt(D) / T_fdt."""
        return 1.0 / math.sqrt(self.dim) / self.temperature()

    @torch.no_grad()
    def advance(self) -> None:
        """After an optimiser step: one step further along the T_fdt schedule."""
        self.step += 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the schedule existed hold neither buffer: their T_fdt was the constructor's
        state_dict.setdefault(prefix + "t_start", self.t_start.clone())
        state_dict.setdefault(prefix + "step", self.step.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale(self) -> torch.Tensor:
        """The FDT loss's logit scale, clamped to ``logit_scale_range`` (the authors' [20, 100])."""
        return self.logit_scale.clamp(*self.log_range).exp()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """After an optimiser step: the parameter back into its range, where ``scale``'s clamp passes gradients
        (left outside it, the clamp would cut its gradient and freeze it there)."""
        self.logit_scale.clamp_(*self.log_range)

    @torch.no_grad()
    def calibrate(self, q_image: torch.Tensor, q_text: torch.Tensor, text_mask: torch.Tensor | None,
                  target: float, reduce=None) -> float:
        """Set ``t_start`` so that a fraction ``target`` of the C entries is active (sparsemax weight > 0), the mean of
        the images' and the captions' mean fractions, for these queries (B, N, D) (from a real training batch).

        The support of sparsemax(r / T) grows with T, so the fraction is monotone in T: a bisection on log T (60
        halvings of [1e-6, 1e8]) finds it. ``reduce`` (DDP: the mean over ranks) combines each rank's log T.
        Returns the new T_fdt."""
        if self.norm != "sparsemax":
            raise ValueError(f"T_fdt calibration needs sparsemax weights (with {self.norm} every entry is active)")
        r_image, r_text = self._scores(q_image, q_text, text_mask, 1.0)
        lo, hi = math.log(1e-6), math.log(1e8)
        for _ in range(60):
            mid = (lo + hi) / 2
            t = math.exp(mid)
            if active_fraction(r_image / t, r_text / t) < target:
                lo = mid  # too few active: a larger T flattens r
            else:
                hi = mid
        log_t = torch.tensor((lo + hi) / 2, dtype=torch.float64)
        if reduce is not None:
            log_t = reduce(log_t)
        self.t_start.fill_(float(log_t.exp()))
        return float(self.t_start)

    def _scores(self, q_image, q_text, text_mask, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled relevance r (B, C) of image and caption queries at T_fdt = ``t``."""
        scale = 1.0 / math.sqrt(self.dim) / t
        return (ground(q_image, self.codebook.weight, None, scale, self.pool, self.chunk).float(),
                ground(q_text, self.codebook.weight, text_mask, scale, self.pool, self.chunk).float())

    @torch.no_grad()
    def active_fraction(self, q_image: torch.Tensor, q_text: torch.Tensor, text_mask: torch.Tensor | None) -> float:
        """The mean of the images' and the captions' mean fraction of active entries at the current T_fdt."""
        return active_fraction(*self._scores(q_image, q_text, text_mask, self.temperature()))

    def embed(self, q: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries (B, N, D) → (z (B, D) L2-normalised, w (B, C))."""
        codebook = self.codebook.weight
        r = ground(q, codebook, mask, self.relevance_scale, self.pool, self.chunk)  # (B, C)
        w = normalise(r.float(), self.norm)  # (B, C), fp32 even under autocast (sparsemax sorts and sums)
        return F.normalize((w @ codebook).float(), dim=-1), w  # (B, D)

    def image(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens (B, N, W) without CLS → (z, w)."""
        return self.embed(self.image_query(tokens), None)

    def text(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens (B, L, W) and pad mask (B, L) → (z, w)."""
        return self.embed(self.text_query(tokens), mask)

    def image_relevance(self, tokens: torch.Tensor) -> torch.Tensor:
        """A before pooling, (B, N, C): every patch's relevance to every codebook entry (for heat maps)."""
        return relevance(self.image_query(tokens), self.codebook.weight, self.relevance_scale)

    def text_relevance(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """A before pooling, (B, L, C); padded positions are −inf."""
        a = relevance(self.text_query(tokens), self.codebook.weight, self.relevance_scale)
        return a if mask is None else a.masked_fill(~mask[..., None], -math.inf)
