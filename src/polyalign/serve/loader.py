"""``polyalign.load``: a training run or a connected run, whichever the folder holds."""
from __future__ import annotations

from pathlib import Path

import torch

from polyalign.serve.api import Encoder, load_trained
from polyalign.serve.connected import ConnectedEncoder, load_connected


def load(run: str | Path, which: str = "auto", device: str | torch.device = "cpu") -> Encoder | ConnectedEncoder:
    """A trained run (``polyalign train``) or a connected run (``polyalign connect``), ready to encode.

    ``which``: ``auto`` (the best checkpoint when the run kept one, else the latest), ``best`` or ``latest``.
    ``device``: ``cpu``, ``cuda``, ``cuda:1`` or ``auto``."""
    run = Path(run)
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    if (run / "connector.json").is_file():  # polyalign.connect.is_connect_run, without importing all of connect/
        return load_connected(run, which, device)
    return load_trained(run, which, device)
