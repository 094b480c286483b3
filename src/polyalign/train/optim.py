"""AdamW with weight decay on weight matrices only, and the warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch

from polyalign.config import TrainConfig


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters: group 0 (decayed) holds the weight matrices (ndim ≥ 2, name ending
    in ``weight``), group 1 the rest (biases, norms, tokens/positions, temperatures), each in named_parameters order."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and name.endswith("weight") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Decay Linear/Conv/Embedding weights (ndim ≥ 2); never biases, norms, tokens/positions or temperatures."""
    return adamw(model, cfg.lr, cfg.weight_decay, cfg.betas, eps=1e-6)


def cosine_lr(step: int, total: int, lr: float, min_lr: float = 0.0, warmup: int = 0) -> float:
    """The learning rate before step ``step`` (0-based): linear warm-up to ``lr`` over ``warmup`` steps, then cosine
    decay to ``min_lr`` at step ``total`` (held there after it)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    return cosine_lr(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set every parameter group's learning rate; returns it."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
