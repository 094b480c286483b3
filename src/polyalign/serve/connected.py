"""``polyalign.load`` of a connected run (``polyalign connect``): each modality of the two source runs, encoded by its
run's tower and projected into the common space.

The source runs are found through the ``.meta.json`` that ``polyalign embed`` writes next to each embedding file
(``inputs.b_x`` names space X's run, ``inputs.b_y`` space Y's). The pivot modality B lives in both spaces: it is
encoded in X unless ``space="y"`` is asked for."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from polyalign.errors import PolyalignError


def _source_run(embedding_file: str, key: str, run: Path) -> Path:
    """The training run that wrote an embedding file, from its ``.meta.json``."""
    if not embedding_file:
        raise PolyalignError(f"{run / 'config.yaml'} names no {key}")
    f = Path(embedding_file)
    meta = Path(str(f)[: -len(".npy")] + ".meta.json") if f.name.endswith(".npy") else Path(str(f) + ".meta.json")
    if not meta.is_file():
        raise PolyalignError(f"{key} = {f} has no {meta.name} (it was not written by `polyalign embed`), so the run "
                             f"that encodes space {key[-1].upper()} is unknown: encode with that run yourself and "
                             f"map the embeddings with ConnectedSpaces.load({str(run)!r}).embed(x, space)")
    source = Path(json.loads(meta.read_text())["run"])
    for candidate in (source, meta.parent / source):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise PolyalignError(f"the run that wrote {f} ({source}, from {meta.name}) is not found")


class ConnectedEncoder:
    """The towers of two runs joined by a connector: ``encode_<modality>`` → common-space embeddings (n, dim)."""

    def __init__(self, run: Path, connector, spaces: dict):
        self.run_dir, self.connector, self.spaces = run, connector, spaces  # spaces: {"x": Encoder, "y": Encoder}
        self.modalities = tuple(dict.fromkeys(m for enc in spaces.values() for m in enc.modalities))
        self.tokenizer = spaces["x"].tokenizer if "text" in spaces["x"].modalities else spaces["y"].tokenizer
        image_space = "x" if "image" in spaces["x"].modalities else "y"
        self.preprocess = spaces[image_space].preprocess if "image" in self.modalities else None

    def __repr__(self) -> str:
        return (f"polyalign.ConnectedEncoder({str(self.run_dir)!r}, X: {self.spaces['x'].run_dir}, "
                f"Y: {self.spaces['y'].run_dir}, modalities {', '.join(self.modalities)})")

    @property
    def embed_dim(self) -> int:
        return int(self.connector.info["dim"])

    def space_of(self, modality: str) -> str:
        """The space whose run encodes ``modality`` (X for the pivot, which both have)."""
        for space in ("x", "y"):
            if modality in self.spaces[space].modalities:
                return space
        raise PolyalignError(f"neither source run of {self.run_dir} has a {modality} tower "
                             f"(modalities: {', '.join(self.modalities)})")

    def encode(self, modality: str, items, batch_size: int = 64, numpy: bool = False, space: str | None = None):
        """Common-space embeddings of ``items``, encoded in ``space`` (default :meth:`space_of`)."""
        space = space or self.space_of(modality)
        if space not in ("x", "y") or modality not in self.spaces[space].modalities:
            raise PolyalignError(f"space {space!r} has no {modality} tower")
        native = self.spaces[space].encode(modality, items, batch_size=batch_size)
        out = self.connector.embed(native, space).float()
        return out.numpy() if numpy else out

    def encode_image(self, images, batch_size: int = 64, numpy: bool = False, space: str | None = None):
        return self.encode("image", images, batch_size, numpy, space)

    def encode_text(self, texts, batch_size: int = 256, numpy: bool = False, space: str | None = None):
        return self.encode("text", texts, batch_size, numpy, space)

    def encode_audio(self, clips, batch_size: int = 32, numpy: bool = False, space: str | None = None):
        return self.encode("audio", clips, batch_size, numpy, space)

    def encode_points(self, clouds, batch_size: int = 64, numpy: bool = False, space: str | None = None):
        return self.encode("points", clouds, batch_size, numpy, space)


def load_connected(run: Path, which: str = "auto", device: torch.device = torch.device("cpu")) -> ConnectedEncoder:
    """The :class:`ConnectedEncoder` of a ``polyalign connect`` run."""
    from polyalign.connect.model import ConnectedSpaces
    from polyalign.config.connect import load_connect_config
    from polyalign.serve.api import load_trained

    cfg = load_connect_config(run / "config.yaml")
    spaces = {s: load_trained(_source_run(getattr(cfg.inputs, f"b_{s}"), f"inputs.b_{s}", run), which, device)
              for s in ("x", "y")}
    return ConnectedEncoder(run, ConnectedSpaces.load(run), spaces)
