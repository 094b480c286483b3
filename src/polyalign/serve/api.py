"""The Python API: ``polyalign.load(run)`` → an encoder of every tower of a trained run (or a connected run).

    >>> import polyalign
    >>> m = polyalign.load("runs/demo")                      # best checkpoint, else the latest; eval mode, CPU
    >>> m.encode_text(["a red circle"]).shape                # L2-normalised, no gradient
    torch.Size([1, 256])
    >>> m.encode_image(["cat.png", pil_image, array]).shape  # any size/mode: resized and normalised as in training

Images are prepared exactly as training prepared them (``polyalign.data.manifest.fit_image``: EXIF rotation, 8 bit,
transparency on white, shorter side resized, centre crop), so an image encodes here as ``polyalign embed`` wrote it.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from polyalign.errors import DataError, PolyalignError

IMAGE_TYPES = "PIL images, paths, numpy arrays (H, W[, C]) or tensors (3, H, W)"


class Preprocess:
    """Any image → the (3, S, S) float tensor in [0, 1] the run's image tower was trained on."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        from polyalign.data.manifest import BadRow, fit_image, load_image

        s = self.image_size
        if isinstance(image, (str, Path)):
            if not Path(image).is_file():
                raise DataError(f"image not found: {image}")
            try:
                return _to_float(load_image(Path(image), s))
            except BadRow as e:
                raise DataError(f"{image}: {e.reason}{f' ({e.detail})' if e.detail else ''}") from None
        if isinstance(image, Image.Image):
            return _to_float(fit_image(image, s))
        if isinstance(image, torch.Tensor):
            if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[1:] == (s, s):  # already the tower's input
                x = image.detach().cpu()
                x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
                return x.expand(3, s, s).contiguous()
            image = image.detach().cpu().numpy()
            if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):  # (C, H, W)
                image = image.transpose(1, 2, 0)
        if isinstance(image, np.ndarray):
            return _to_float(fit_image(_array_image(image), s))
        raise DataError(f"cannot read an image from {type(image).__name__}: give {IMAGE_TYPES}")


def _to_float(pixels: np.ndarray) -> torch.Tensor:
    """(S, S, 3) uint8 → (3, S, S) float in [0, 1], as the loader's ``uint8 / 255``."""
    return torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).float() / 255


def _array_image(a: np.ndarray):
    """(H, W), (H, W, 1|3|4) uint8, or floats in [0, 1] → a PIL image."""
    from PIL import Image

    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))) or 0 in a.shape:
        raise DataError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise DataError("an image array holds NaN or infinite values")
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(a)


class Encoder:
    """A trained run's towers, ready to encode: ``encode_<modality>(items)`` for each of ``modalities``."""

    def __init__(self, model, tokenizer, config, run_dir: Path, step: int, device: torch.device):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.run_dir, self.step, self.device = run_dir, step, device
        self.modalities: tuple[str, ...] = tuple(model.modalities)
        self.preprocess = Preprocess(config.data.image_size)

    def __repr__(self) -> str:
        return f"polyalign.Encoder({str(self.run_dir)!r}, step {self.step}, towers {', '.join(self.modalities)})"

    @functools.cached_property
    def embed_dim(self) -> int:
        """E, the width of every tower's embeddings."""
        m = self.modalities[-1]
        blank = {"text": "a", "image": np.zeros((8, 8, 3), np.uint8), "audio": np.zeros(1600, np.float32),
                 "points": np.zeros((64, 3), np.float32)}[m]
        return int(self.encode(m, [blank]).shape[1])

    def _check(self, modality: str) -> None:
        if modality not in self.modalities:
            raise PolyalignError(f"{self.run_dir} has no {modality} tower (its towers: {', '.join(self.modalities)})")

    def encode(self, modality: str, items, batch_size: int = 64, numpy: bool = False):
        """``encode_<modality>(items)``."""
        return getattr(self, f"encode_{modality}")(items, batch_size=batch_size, numpy=numpy)

    def encode_image(self, images, batch_size: int = 64, numpy: bool = False):
        """(n, E) embeddings of images (any of: PIL, path, array, tensor; or a (B, 3, S, S) batch in [0, 1])."""
        self._check("image")
        items = _as_list(images, 3 if isinstance(images, torch.Tensor) else 0)
        return self._batched(items, batch_size, lambda chunk: (torch.stack([self.preprocess(x) for x in chunk]),),
                             self.model.encode_image, numpy)

    def encode_text(self, texts, batch_size: int = 256, numpy: bool = False):
        """(n, E) embeddings of texts (a string or a list of strings, none empty)."""
        self._check("text")
        items = _as_list(texts)
        bad = [i for i, t in enumerate(items) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise DataError(f"texts must be non-empty strings; item {bad[0]} is {items[bad[0]]!r}")
        return self._batched(items, batch_size, lambda chunk: self.tokenizer(list(chunk)), self.model.encode_text,
                             numpy)

    def encode_audio(self, clips, batch_size: int = 32, numpy: bool = False):
        """(n, E) embeddings of audio clips: paths (any format libsndfile reads) or mono float arrays at the run's
        sample rate."""
        from polyalign.data.audio import load_wav, pad_audio

        self._check("audio")
        rate = 16000  # every audio tower and dataset here works at 16 kHz

        def wave(x) -> torch.Tensor:
            if isinstance(x, (str, Path)):
                return load_wav(x, rate)
            return torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape(-1)

        return self._batched(_as_list(clips, 1), batch_size, lambda chunk: pad_audio([wave(x) for x in chunk]),
                             self.model.encode_audio, numpy)

    def encode_points(self, clouds, batch_size: int = 64, numpy: bool = False):
        """(n, E) embeddings of point clouds, each (N, 3)."""
        self._check("points")

        def cloud(x) -> torch.Tensor:
            p = torch.as_tensor(np.asarray(x, dtype=np.float32))
            if p.ndim != 2 or p.shape[1] != 3:
                raise DataError(f"a point cloud must be (N, 3), got shape {tuple(p.shape)}")
            return p

        return self._batched(_as_list(clouds, 2), batch_size, lambda chunk: (torch.stack([cloud(x) for x in chunk]),),
                             self.model.encode_points, numpy)

    def _batched(self, items: list, batch_size: int, prepare, encode, numpy: bool):
        if self.model.training:  # the model is in eval mode from load; walking every module costs 10% of a query
            self.model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                inputs = prepare(items[start : start + batch_size])
                out.append(encode(*(x.to(self.device) for x in inputs)).float().cpu())
        emb = torch.cat(out) if out else torch.zeros(0, 0)
        return emb.numpy() if numpy else emb


def _as_list(items, item_ndim: int = 0) -> list:
    """A list or tuple of items, or one batch array/tensor with one more dimension than an item → a list; anything
    else is one item."""
    if isinstance(items, (list, tuple)):
        return list(items)
    if isinstance(items, (np.ndarray, torch.Tensor)) and item_ndim and items.ndim == item_ndim + 1:
        return list(items)
    return [items]


def load_trained(run: Path, which: str = "auto", device: torch.device = torch.device("cpu")) -> Encoder:
    """The :class:`Encoder` of a ``polyalign train`` run."""
    from polyalign.app.runs import load_run
    from polyalign.train.checkpoint import find_checkpoint

    if which not in ("auto", "best", "latest"):
        raise PolyalignError(f"which must be auto, best or latest, got {which!r}")
    if which == "auto":
        which = "best" if (run / "checkpoints" / "best.json").is_file() else "latest"
    cfg, model, tok = load_run(run, which)
    step = find_checkpoint(run / "checkpoints", which)
    return Encoder(model.to(device), tok, cfg, run, int(step), device)
