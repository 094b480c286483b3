"""The connected model of C-MCR: one projector per space into a common space.

Paper: Wang et al., "Connecting Multi-modal Contrastive Representations", NeurIPS 2023, arXiv 2305.14381;
``mode="anchor_x"`` (X fixed, Y mapped into X by a residual projector initialised at identity) is inspired by
"Extending Multi-modal Contrastive Representations" (Ex-MCR), arXiv 2310.08884, but is not its released recipe.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from polyalign.config.connect import EXMCR_RENAMED, ConnectConfig, ConnectMethod
from polyalign.config.tree import to_dict
from polyalign.connect.projectors import CMCRProjector, FixedSpace, ResidualProjector
from polyalign.errors import ConfigError, DataError
from polyalign.train.files import atomic_write, write_json


class ConnectedSpaces(nn.Module):
    """Two projectors into a common space; ``embed(x, space)`` maps either space's embeddings there."""

    def __init__(self, dim_x: int, dim_y: int, dim: int = 0, mode: str = "cmcr", projector: str = "mlp"):
        super().__init__()
        if mode == "exmcr":
            raise ConfigError(EXMCR_RENAMED)
        if mode == "anchor_x":  # X is the base: Y is mapped into it
            if dim not in (0, dim_x):
                raise ConfigError(f"method.mode=anchor_x maps Y into X: method.dim must be 0 or {dim_x}, got {dim}")
            dim = dim_x
            self.proj_x, self.proj_y = FixedSpace(), ResidualProjector(dim_y, dim)
        elif mode == "cmcr":
            if dim == 0 and dim_x != dim_y:
                raise ConfigError(f"the spaces have dims {dim_x} (X) and {dim_y} (Y); set method.dim (common space)")
            dim = dim or dim_x
            self.proj_x, self.proj_y = CMCRProjector(dim_x, dim, projector), CMCRProjector(dim_y, dim, projector)
        else:
            raise ConfigError(f"unknown mode {mode!r} (cmcr | anchor_x)")
        self.info = {"dim_x": dim_x, "dim_y": dim_y, "dim": dim, "mode": mode, "projector": projector}

    @classmethod
    def from_config(cls, method: ConnectMethod, dim_x: int, dim_y: int) -> ConnectedSpaces:
        """The model ``method`` describes, for spaces of dims ``dim_x`` and ``dim_y``."""
        return cls(dim_x, dim_y, method.dim, method.mode, method.projector)

    def projector(self, space: str) -> nn.Module:
        """The module shared by both modalities of ``space`` (x: A and B; y: B and C)."""
        if space not in ("x", "y"):
            raise ValueError(f"space must be 'x' or 'y', got {space!r}")
        return self.proj_x if space == "x" else self.proj_y

    def forward(self, b_x, a_x, b_y, c_y) -> dict[str, torch.Tensor | None]:
        """Projected (B, dim) embeddings, keyed as :func:`cmcr_loss` takes them. Both modalities of a space go
        through its projector as one batch, so BatchNorm's statistics are those of the mixture it sees at inference.
        ``a_x`` and ``c_y`` None (no memories): B alone, and None for them."""
        if a_x is None or c_y is None:
            return {"b_x": self.proj_x(b_x), "a_x": None, "b_y": self.proj_y(b_y), "c_y": None}
        n = b_x.shape[0]
        px, py = self.proj_x(torch.cat([b_x, a_x])), self.proj_y(torch.cat([b_y, c_y]))  # (2B, dim) each
        return {"b_x": px[:n], "a_x": px[n:], "b_y": py[:n], "c_y": py[n:]}

    @torch.no_grad()
    def embed(self, x: torch.Tensor, space: str = "x", batch_size: int = 8192) -> torch.Tensor:
        """Common-space embeddings (N, dim), L2-normalised, of ``space``'s embeddings (N, D); in eval mode (BatchNorm's
        running statistics), whatever mode the model is in."""
        proj, was_training = self.projector(space), self.training
        x = torch.as_tensor(x).float()
        if x.shape[-1] != self.info[f"dim_{space}"]:
            raise ValueError(f"space {space} embeddings have dim {self.info[f'dim_{space}']}, got {x.shape[-1]}")
        x = torch.nn.functional.normalize(x.reshape(-1, x.shape[-1]), dim=-1)
        device = next(self.parameters()).device
        self.eval()
        try:
            out = [proj(x[i : i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else x.new_zeros(0, self.info["dim"])

    def save(self, out_dir: str | Path, config: ConnectConfig | None = None) -> None:
        """Write ``connector.safetensors`` (weights, BN statistics), then ``connector.json`` (dims, mode, config);
        each file is replaced atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(out / "connector.safetensors", lambda p: save_file(weights, str(p)))
        write_json(out / "connector.json", {**self.info, "config": to_dict(config) if config is not None else None},
                   sort_keys=False)

    @classmethod
    def load(cls, out_dir: str | Path) -> ConnectedSpaces:
        """The model :meth:`save` wrote, in eval mode."""
        out = Path(out_dir)
        for name in ("connector.json", "connector.safetensors"):
            if not (out / name).is_file():
                raise DataError(f"{out} holds no connected model ({name} is missing)")
        meta = json.loads((out / "connector.json").read_text())
        mode = "anchor_x" if meta["mode"] == "exmcr" else meta["mode"]  # saved before the rename: the same model
        model = cls(meta["dim_x"], meta["dim_y"], meta["dim"], mode, meta["projector"])
        model.load_state_dict(load_file(str(out / "connector.safetensors")))
        return model.eval()
