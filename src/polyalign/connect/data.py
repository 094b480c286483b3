"""The training inputs of a connection (C-MCR, arXiv 2305.14381): B embedded in both spaces, memories of A and C."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from polyalign.config.connect import ConnectInputs
from polyalign.connect.embeddings import Log, check_embeddings, join_by_id, read_embeddings
from polyalign.errors import DataError


@dataclass
class ConnectData:
    """Training inputs: B in both spaces (row-aligned) and the memories of A (in X) and C (in Y) (None: not used,
    method.memories=false)."""

    b_x: torch.Tensor  # (N, Dx)
    b_y: torch.Tensor  # (N, Dy)
    memory_a: torch.Tensor | None = None  # (Ma, Dx)
    memory_c: torch.Tensor | None = None  # (Mc, Dy)

    def __post_init__(self):
        if (self.memory_a is None) != (self.memory_c is None):
            raise DataError("give both memories (memory_a, memory_c) or neither")
        for space, pair in (("X", ("b_x", "memory_a")), ("Y", ("b_y", "memory_c"))):
            dims = {k: getattr(self, k).shape[1] for k in pair if getattr(self, k) is not None}
            if len(set(dims.values())) > 1:
                raise DataError(f"space {space} dimensions disagree: {dims}")
        if self.b_x.shape[0] != self.b_y.shape[0]:
            raise DataError(f"b_x has {self.b_x.shape[0]} rows, b_y {self.b_y.shape[0]}: they must hold the same items")
        if self.b_x.shape[0] < 2:
            raise DataError("need at least 2 B items to train (in-batch negatives, BatchNorm)")

    @classmethod
    def from_tensors(cls, b_x, b_y, memory_a=None, memory_c=None, log: Log = print) -> ConnectData:
        """Checked and normalised tensors (or arrays); b_x and b_y row-aligned; memories None: none."""
        return cls(*(None if t is None else check_embeddings(t, n, log) for t, n in
                     ((b_x, "b_x"), (b_y, "b_y"), (memory_a, "memory_a"), (memory_c, "memory_c"))))

    @property
    def has_memories(self) -> bool:
        """Whether the memories are given (pseudo pairs can be built)."""
        return self.memory_a is not None

    @property
    def dims(self) -> tuple[int, int]:
        """(Dx, Dy)."""
        return self.b_x.shape[1], self.b_y.shape[1]


def load_shared(cfg: ConnectInputs, log: Log = print) -> tuple[torch.Tensor, torch.Tensor]:
    """The B files named in ``cfg``, joined by id: (B in X, B in Y), row-aligned."""
    return join_by_id(read_embeddings(cfg.b_x, "inputs.b_x", log), read_embeddings(cfg.b_y, "inputs.b_y", log),
                      cfg.partial_join, log)


def load_inputs(cfg: ConnectInputs, log: Log = print, memories: bool = True) -> ConnectData:
    """Read the four training files named in ``cfg`` (``memories=False``: the B files only, the memories neither
    needed nor read) and join the B files by id."""
    b_x, b_y = load_shared(cfg, log)
    if not memories:
        if cfg.memory_a or cfg.memory_c:
            log("method.memories=false: inputs.memory_a and inputs.memory_c are not read")
        return ConnectData(b_x, b_y)
    memory = [read_embeddings(getattr(cfg, k), f"inputs.{k}", log).vectors for k in ("memory_a", "memory_c")]
    return ConnectData(b_x, b_y, *memory)
