"""The fusion model's sampling steps (ALBEF, arXiv 2107.07651): BERT's token masking for MLM and the hard
negatives of ITM. Both run without gradient; a ``generator`` makes them reproducible (evaluation)."""
from __future__ import annotations

import torch

IGNORE = -100  # label of tokens that are not predicted


@torch.no_grad()
def sample_hard_negatives(sim: torch.Tensor, index: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """For each row of ``sim`` (B, B), one column drawn ∝ softmax(row) with the diagonal and the columns of the
    same item id (``index`` (B,)) excluded: (B,) indices. Raises ValueError when a row has no valid column."""
    invalid = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    if index is not None:
        invalid |= index[:, None] == index[None, :]
    if invalid.all(1).any():
        raise ValueError("hard negatives: a row has no other item in the batch (batch size 1, or every item "
                         "has the same id); ITM needs at least two distinct items per batch (per process)")
    sim = sim.float()
    top = sim.masked_fill(invalid, torch.finfo(sim.dtype).min).amax(1, keepdim=True)  # the best allowed column
    weights = (sim - top).masked_fill(invalid, 0.0).exp() * ~invalid  # ∝ softmax over the allowed columns, 0 elsewhere
    return torch.multinomial(weights, 1, generator=generator)[:, 0]  # (multinomial normalises the rows)


@torch.no_grad()
def mask_tokens(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int, mask_id: int, special_ids,
                prob: float = 0.15, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each real, non-special token is chosen with probability ``prob``; a chosen token becomes
    [MASK] (80%), a random non-special token (10%) or stays (10%). Returns (masked ids, labels) (B, L) each, labels
    = the original id at chosen positions and ``IGNORE`` elsewhere. [CLS]/[SEP]/[PAD] (``special_ids``) and padding
    are never chosen."""
    specials = torch.as_tensor(sorted(set(special_ids)), dtype=ids.dtype, device=ids.device)
    candidates = mask.bool() & ~torch.isin(ids, specials)

    def draw(p):
        return torch.rand(ids.shape, generator=generator, device=ids.device) < p

    chosen = draw(prob) & candidates
    to_mask = chosen & draw(0.8)
    to_random = chosen & ~to_mask & draw(0.5)
    allowed = torch.arange(vocab_size, device=ids.device)
    allowed = allowed[~torch.isin(allowed, specials)]  # random replacements are ordinary tokens
    random_ids = allowed[torch.randint(len(allowed), ids.shape, generator=generator, device=ids.device)]
    out = torch.where(to_mask, torch.full_like(ids, mask_id), torch.where(to_random, random_ids, ids))
    return out, torch.where(chosen, ids, torch.full_like(ids, IGNORE))
