"""Memory-efficient InfoNCE: the B×B logits are never held at once (tiles of rows, online log-sum-exp, and
recomputation in backward), with values and gradients equal to the dense loss.

The idea follows the tiled contrastive losses of "Breaking the Memory Barrier: Near Infinite Batch Size Scaling
for Contrastive Loss" (Inf-CL, arXiv 2410.17243) and gradient caching; the code here is our own. Peak extra memory
is O(tile × N) instead of O(B × N).
"""
from __future__ import annotations

import torch

DEFAULT_TILE = 256
TILE_BYTES = 16 * 2**20  # a (rows × N) fp32 tile is kept at or below this size: large N get fewer rows per tile


def tile_rows(tile: int, n: int) -> int:
    """Rows per tile: at most ``tile``, and few enough that one (rows, ``n``) fp32 tile fits in ``TILE_BYTES``."""
    return max(1, min(tile, max(16, TILE_BYTES // (4 * max(n, 1)))))


class _TiledCrossEntropy(torch.autograd.Function):
    """Mean over rows i of ``lse_j(s q_i·k_j) − s q_i·k_{offset+i}``; with ``both`` (q and k the same size, offset 0)
    also the column direction, computed from the same tiles: ``0.5 (row term + column term)``."""

    @staticmethod
    def forward(ctx, q, k, scale, offset: int, tile: int, both: bool):
        b, n = q.shape[0], k.shape[0]
        row_lse = torch.empty(b, dtype=torch.float32, device=q.device)
        col_lse = torch.full((n,), -torch.inf, dtype=torch.float32, device=q.device) if both else None
        for i0 in range(0, b, tile):
            logits = scale * (q[i0 : i0 + tile] @ k.T)  # (t, N): the only large tensor, one tile at a time
            row_lse[i0 : i0 + tile] = torch.logsumexp(logits, dim=1)
            if both:
                col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits, dim=0))
        target = scale * (q * k[offset : offset + b]).sum(dim=1)  # (b,)
        loss = (row_lse - target).mean()
        if both:
            loss = 0.5 * (loss + (col_lse - target).mean())
        ctx.save_for_backward(q, k, scale, row_lse, col_lse if both else row_lse)
        ctx.offset, ctx.tile, ctx.both = offset, tile, both
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        q, k, scale, row_lse, col_lse = ctx.saved_tensors
        offset, tile, both = ctx.offset, ctx.tile, ctx.both
        b = q.shape[0]
        w = grad_out * (0.5 if both else 1.0) / b  # d loss / d logit per softmax entry
        dq, dk = torch.empty_like(q), torch.zeros_like(k)
        dscale = torch.zeros((), dtype=torch.float32, device=q.device)
        for i0 in range(0, b, tile):
            qt = q[i0 : i0 + tile]
            sim = qt @ k.T  # (t, N), recomputed
            logits = scale * sim
            g = torch.sub(logits, row_lse[i0 : i0 + tile, None]).exp_()  # row softmax
            if both:
                g += logits.sub_(col_lse[None, :]).exp_()  # column softmax (reuses the logits' memory)
            del logits
            g *= w
            dq[i0 : i0 + tile] = scale * (g @ k)
            dk.addmm_(g.T, qt, alpha=float(scale))
            dscale += (g * sim).sum()
        # the target logits s q_i·k_{offset+i}: once per direction
        w_target = grad_out / b
        kt = k[offset : offset + b]
        dq -= w_target * scale * kt
        dk[offset : offset + b] -= w_target * scale * q
        dscale -= w_target * (q * kt).sum()
        return dq, dk, dscale.reshape(scale.shape), None, None, None


def tiled_cross_entropy(q: torch.Tensor, k: torch.Tensor, logit_scale, offset: int = 0,
                        tile: int = DEFAULT_TILE) -> torch.Tensor:
    """Cross-entropy of rows ``q`` (b, D) against all ``k`` (N, D); row i's positive is ``k[offset + i]``."""
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=q.device)
    return _TiledCrossEntropy.apply(q.float(), k.float(), scale, offset, tile_rows(tile, k.shape[0]), False)


def tiled_info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """Symmetric InfoNCE of matched rows of ``a`` and ``b`` (B, D), equal to ``info_nce``; one sweep serves
    both directions (row and column log-sum-exp from the same tiles)."""
    if a.shape != b.shape:
        raise ValueError(f"tiled_info_nce needs matched rows, got {tuple(a.shape)} and {tuple(b.shape)}")
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=a.device)
    return _TiledCrossEntropy.apply(a.float(), b.float(), scale, 0, tile_rows(tile, b.shape[0]), True)
