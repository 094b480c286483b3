"""Gradient caching: the gradients of one large contrastive batch computed a sub-batch at a time
("Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", Gao et al., arXiv 2101.06983).

1. embed every sub-batch without a graph, remembering the RNG state before each (dropout);
2. compute the full-batch loss on the cached outputs (as leaves) and its gradients w.r.t. them;
3. re-run each sub-batch with a graph, restoring its RNG state so dropout draws the same masks, and backpropagate
   the cached output gradients (``sum(out · grad)``).
Activations of only one sub-batch are alive at a time. Under DDP, gradients are synchronised on the last sub-batch.
Per-sample outputs (first dimension = sub-batch size) are cached; the others (a learnable temperature) are
taken from the first sub-batch and backpropagated once, with the last.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _tensor_fields(out) -> list[str]:
    """The output's tensor fields that are set (not its stats, gathered rows or offset)."""
    return [f.name for f in dataclasses.fields(out)
            if f.name not in ("stats", "gathered") and torch.is_tensor(getattr(out, f.name))]


def grad_cache_step(model, batch: dict, loss_fn, chunk: int, autocast=contextlib.nullcontext) -> dict:
    """Forward + backward of ``loss_fn(model(batch))`` in sub-batches of ``chunk`` rows; returns the losses dict.

    ``model`` may be DDP-wrapped; ``loss_fn`` maps the model output (``polyalign.models.outputs``) to ``{"loss": ..., ...}`` (it may gather
    across ranks). Parameter gradients equal those of one forward/backward over the whole batch with the same
    dropout masks. BatchNorm running statistics are updated once (by the second pass), not twice.
    """
    n = next(v.shape[0] for v in batch.values() if torch.is_tensor(v))
    starts = list(range(0, n, chunk))
    device = next(model.parameters()).device
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}

    states, outs = [], []
    with torch.no_grad():
        for s in starts:
            states.append(_rng_state(device))
            with autocast():
                outs.append(model({k: v[s : s + chunk] if torch.is_tensor(v) else v for k, v in batch.items()}))
    end_state = _rng_state(device)
    if buffers:
        model.load_state_dict(buffers, strict=False)  # pass 2 updates the running statistics

    sizes = [min(chunk, n - s) for s in starts]
    tensors = [k for k in _tensor_fields(outs[0])]
    per_sample = [k for k in tensors if getattr(outs[0], k).dim() > 0
                  and all(getattr(o, k).shape[0] == size for o, size in zip(outs, sizes))]
    leaves = {k: torch.cat([getattr(o, k) for o in outs]).detach().requires_grad_() for k in per_sample}
    leaves.update({k: getattr(outs[0], k).detach().requires_grad_(getattr(outs[0], k).is_floating_point())
                   for k in tensors if k not in leaves})
    with autocast():
        losses = loss_fn(dataclasses.replace(outs[0], **leaves))  # the first sub-batch's stats are logged
    wanted = [k for k, v in leaves.items() if v.requires_grad]
    grads = dict(zip(wanted, torch.autograd.grad(losses["loss"], [leaves[k] for k in wanted], allow_unused=True)))

    sync = getattr(model, "no_sync", None)
    for i, s in enumerate(starts):
        last = i == len(starts) - 1
        _set_rng_state(states[i], device)
        with (contextlib.nullcontext() if last or sync is None else sync()):
            with autocast():
                out = model({k: v[s : s + chunk] if torch.is_tensor(v) else v for k, v in batch.items()})
            surrogate = sum((getattr(out, k).float() * grads[k][s : s + chunk].float()).sum()
                            for k in per_sample if grads.get(k) is not None)
            if last:  # non-per-sample outputs (the temperature) carry their gradient once
                surrogate = surrogate + sum((getattr(out, k).float() * grads[k].float()).sum()
                                            for k in wanted if k not in per_sample and grads.get(k) is not None)
            surrogate.backward()
    _set_rng_state(end_state, device)
    return {k: v.detach() for k, v in losses.items()}
