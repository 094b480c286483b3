"""Procedural 3D shapes: surface point clouds and images of the same objects rendered from random viewpoints.

Ten classes, each a small triangle mesh (``CLASSES``): surfaces of revolution (sphere, cylinder, cone, torus,
capsule, dome) and polyhedra (cube, pyramid, prism, bipyramid). An item is one object: its class, a random
anisotropic stretch (0.75–1.3 per axis), a random turn about the up axis (z) and a colour, drawn from
(seed, split, item). Its mesh is centred (bounding box) and scaled so that its farthest vertex — hence its farthest
surface point — lies on the unit sphere. Point clouds are area-weighted surface samples of that mesh. Images are
orthographic renders from random viewpoints (azimuth uniform, elevation −20°…60°): a dense surface sample splatted
through a z-buffer (2 × 2 px per point) with two-sided Lambert shading, in the item's flat colour on a gray
background. Class names avoid leading vowels, so the prompt "a {}" reads well for every class.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polyalign.errors import DataError
from polyalign.data.base import SkipReport, cached_array, sample_rng, stable_hash

VERSION = "shapes3d-v1"  # bump whenever meshes, sampling or rendering change: it keys the on-disk cache
SPLITS = ("train", "val", "test")
BLOCK = 128  # items rendered at once (~0.3 GB of splat buffers at 48 px and 4 views)
PALETTE = np.array([[215, 35, 35], [35, 160, 55], [35, 75, 215], [240, 205, 30], [135, 50, 175], [245, 130, 20],
                    [30, 170, 190], [200, 60, 150]], np.float32)
TEMPLATES = ["a {}", "a 3D model of a {}", "a rendering of a {}", "a point cloud of a {}", "a {} shape"]
LIGHT = np.array([-0.4, 0.5, 0.75]) / np.linalg.norm([-0.4, 0.5, 0.75])  # camera coordinates: from upper left front


def _revolve(profile: list[tuple[float, float]], segments: int = 32, closed: bool = False):
    """Surface of revolution about z of a (radius, height) polyline → vertices (K·S, 3), triangles (F, 3)."""
    r, z = np.array(profile, np.float64).T
    a = 2 * np.pi * np.arange(segments) / segments
    verts = np.stack([r[:, None] * np.cos(a), r[:, None] * np.sin(a), np.repeat(z[:, None], segments, 1)], -1)
    k, s = np.meshgrid(np.arange(len(r) if closed else len(r) - 1), np.arange(segments), indexing="ij")
    k1, s1 = (k + 1) % len(r), (s + 1) % segments
    at = lambda kk, ss: (kk * segments + ss).ravel()  # noqa: E731
    quads = [at(k, s), at(k1, s), at(k1, s1), at(k, s1)]  # two triangles per quad of the grid
    tris = np.concatenate([np.stack(quads[:3], 1), np.stack([quads[0], quads[2], quads[3]], 1)])
    return verts.reshape(-1, 3), tris  # triangles at the axis (r = 0) have zero area: never sampled


def _arc(a0: float, a1: float, n: int, radius: float = 1.0, r0: float = 0.0, z0: float = 0.0):
    """(radius, height) profile points on a circle around (r0, z0), angles a0 → a1 measured from +z."""
    return [(r0 + radius * np.sin(a), z0 + radius * np.cos(a)) for a in np.linspace(a0, a1, n)]


def _polyhedron(verts: list, faces: list[list[int]]):
    """Vertices and convex polygonal faces → vertices (V, 3), triangles (F, 3) (fan triangulation)."""
    return np.array(verts, np.float64), np.array([[f[0], f[j], f[j + 1]] for f in faces for j in range(1, len(f) - 1)])


def _meshes() -> dict:
    cube = [[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]
    prism = [[np.cos(a), np.sin(a), z] for z in (-0.9, 0.9) for a in 2 * np.pi * np.arange(3) / 3 + np.pi / 2]
    return {
        "cube": _polyhedron(cube, [[0, 1, 3, 2], [4, 5, 7, 6], [0, 1, 5, 4], [2, 3, 7, 6], [0, 2, 6, 4], [1, 3, 7, 5]]),
        "sphere": _revolve(_arc(0, np.pi, 17)),
        "cylinder": _revolve([(0, 1), (0.8, 1), (0.8, -1), (0, -1)]),
        "cone": _revolve([(0, 1), (0.9, -0.8), (0, -0.8)]),
        "torus": _revolve(_arc(0, 2 * np.pi, 17, 0.3, r0=0.7)[:-1], closed=True),
        "pyramid": _polyhedron([[-1, -1, -0.7], [1, -1, -0.7], [1, 1, -0.7], [-1, 1, -0.7], [0, 0, 1]],
                               [[0, 1, 2, 3], [0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]]),
        "capsule": _revolve(_arc(0, np.pi / 2, 9, 0.5, z0=0.7) + _arc(np.pi / 2, np.pi, 9, 0.5, z0=-0.7)),
        "prism": _polyhedron(prism, [[0, 1, 2], [3, 4, 5], [0, 1, 4, 3], [1, 2, 5, 4], [2, 0, 3, 5]]),
        "bipyramid": _polyhedron([[1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0], [0, 0, 1.2], [0, 0, -1.2]],
                                 [[j, (j + 1) % 4, apex] for apex in (4, 5) for j in range(4)]),
        "dome": _revolve(_arc(0, np.pi / 2, 9, z0=-0.4) + [(0, -0.4)]),
    }


MESHES = _meshes()
CLASSES = list(MESHES)


def yaw(theta: float) -> np.ndarray:
    """Rotation (3, 3) by ``theta`` about the up axis z."""
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def item_mesh(label: int, stretch: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """A class mesh stretched per axis, turned about z, centred and scaled into the unit ball: (V, 3), (F, 3)."""
    verts, tris = MESHES[CLASSES[label]]
    v = (verts * stretch) @ yaw(theta).T
    v -= (v.min(0) + v.max(0)) / 2
    return v / np.linalg.norm(v, axis=1).max(), tris


def sample_surface(verts: np.ndarray, tris: np.ndarray, n: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted uniform surface sample → points (n, 3) float32 and their unit face normals (n, 3)."""
    a, b, c = verts[tris[:, 0]], verts[tris[:, 1]], verts[tris[:, 2]]
    cross = np.cross(b - a, c - a)
    area = np.linalg.norm(cross, axis=1)
    face = np.minimum(np.searchsorted(np.cumsum(area), rng.random(n) * area.sum(), side="right"), len(tris) - 1)
    u, v = rng.random((2, n, 1))
    flip = u + v > 1  # fold the unit square onto the triangle
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    points = a[face] + u * (b - a)[face] + v * (c - a)[face]
    return points.astype(np.float32), (cross[face] / area[face, None]).astype(np.float32)


def view_rotation(azimuth: float, elevation: float) -> np.ndarray:
    """World → camera rotation (3, 3), rows (right, up, towards the camera), for a camera at (azimuth, elevation)."""
    towards = np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)])
    right = np.array([-np.sin(azimuth), np.cos(azimuth), 0.0])
    return np.stack([right, np.cross(towards, right), towards])


def render(points: torch.Tensor, normals: torch.Tensor, rotation: torch.Tensor, colour: torch.Tensor,
           background: torch.Tensor, image_size: int) -> torch.Tensor:
    """Orthographic z-buffered point splats → uint8 images (B, 3, S, S).

    points, normals (B, M, 3) in the unit ball; rotation (B, 3, 3) world → camera; colour (B, 3) and background
    (B,) in 0–255. Each point covers 2 × 2 pixels; the nearest wins (ties: the brighter), shaded 0.3 + 0.7 |n · l|.
    One scatter-min does the z-test: a splat's key packs its depth (high bits) above its inverted shade (low 10).
    """
    b, s = points.shape[0], image_size
    q = points @ rotation.transpose(1, 2)  # (B, M, 3) camera coordinates; z grows towards the camera
    shade = 0.3 + 0.7 * (normals @ rotation.transpose(1, 2) @ torch.tensor(LIGHT, dtype=points.dtype)).abs()
    col = ((q[..., 0] * 0.92 + 1) / 2 * s - 0.5).long().clamp_(0, s - 2)  # top-left pixel of each 2 × 2 splat
    row = ((1 - q[..., 1] * 0.92) / 2 * s - 0.5).long().clamp_(0, s - 2)
    pixel = (torch.arange(b)[:, None] * s + row) * s + col  # (B, M)
    key = ((1 - q[..., 2]) * 2**19).long() << 10 | ((1 - shade) * 1023).long()  # depth in [0, 2^20), shade in 10 bits
    empty = 1 << 40
    splats = (pixel[..., None] + torch.tensor([0, 1, s, s + 1])).reshape(-1)  # (B·M·4,)
    best = torch.full((b * s * s,), empty).scatter_reduce_(0, splats, key[..., None].expand(-1, -1, 4).reshape(-1), "amin")
    light = (1 - (best & 1023).float() / 1023).view(b, 1, s, s)
    hit = (best < empty).view(b, 1, s, s)
    img = torch.where(hit, colour[:, :, None, None] * light, background[:, None, None, None])
    return img.round().clamp(0, 255).to(torch.uint8)


@dataclass
class PointAugment:
    """Random point-cloud views: rotation (``"up"``: about z, ``"so3"``: uniform, ``"none"``), per-axis scale,
    Gaussian jitter (clipped), and point dropout (dropped points replaced by the first point, so N is kept)."""

    rotate: str = "up"
    scale: tuple[float, float] = (0.8, 1.25)
    jitter: float = 0.01
    jitter_clip: float = 0.05
    dropout: float = 0.2  # largest fraction of points dropped; the fraction is uniform in [0, dropout]


def augment_points(points: torch.Tensor, g: torch.Generator, cfg: PointAugment) -> torch.Tensor:
    """One random view of a cloud (N, 3) → (N, 3); a function of (points, g state)."""
    if cfg.rotate == "so3":
        quat = torch.randn(4, generator=g)
        w, x, y, z = (quat / quat.norm()).tolist()
        rot = torch.tensor([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    elif cfg.rotate == "up":
        rot = torch.from_numpy(yaw(2 * np.pi * float(torch.rand((), generator=g)))).float()
    elif cfg.rotate == "none":
        rot = torch.eye(3)
    else:
        raise DataError(f"unknown point rotation {cfg.rotate!r} (up | so3 | none)")
    lo, hi = cfg.scale
    x = points.float() @ rot.T * (lo + (hi - lo) * torch.rand(3, generator=g))
    x = x + (cfg.jitter * torch.randn(x.shape, generator=g)).clamp(-cfg.jitter_clip, cfg.jitter_clip)
    drop = torch.rand(len(x), generator=g) < cfg.dropout * float(torch.rand((), generator=g))
    drop[0] = False
    return torch.where(drop[:, None], x[0], x)


class Shapes3D(torch.utils.data.Dataset):
    """Procedural 3D objects as (points, rendered image, class captions) — see the module docstring.

    ``dataset[(epoch, i)]`` → ``{"points": float32 (n_points, 3), "image": uint8 (3, S, S) (one of ``views``
    renders, drawn per (sample_seed, epoch, i)), "caption", "index", "labels": {"shape": class}}``. The point cloud
    of an item is fixed; ``augment`` (a ``PointAugment``) gives it a random view per epoch. Renders are made once at
    construction (``views`` per item) and cached under ``cache_dir`` when given.
    """

    captions_per_item = len(TEMPLATES)
    label_names = {"shape": CLASSES}
    prompt_templates = {"shape": TEMPLATES[:3]}

    def __init__(self, split: str, size: int, seed: int = 0, n_points: int = 1024, image_size: int = 48,
                 views: int = 4, cache_dir: str | Path | None = None):
        if split not in SPLITS:
            raise DataError(f"unknown shapes3d split {split!r}; valid splits: {', '.join(SPLITS)}")
        if size < 1 or n_points < 1 or image_size < 16 or views < 1:
            raise DataError(f"shapes3d needs size, n_points, views >= 1 and image_size >= 16; got {size}, {n_points}, "
                            f"{views}, {image_size}")
        self.split, self.size, self.seed = split, size, seed
        self.n_points, self.image_size, self.views = n_points, image_size, views
        self.skip_report = SkipReport(total=size)
        self.sample_seed = 0
        self.augment: PointAugment | None = None
        params = [self._rng(i, 0) for i in range(size)]
        self.label = np.array([r.integers(len(CLASSES)) for r in params])
        self.stretch = np.stack([r.uniform(0.75, 1.3, 3) for r in params])
        self.theta = np.array([r.uniform(0, 2 * np.pi) for r in params])
        self.colour = np.array([r.integers(len(PALETTE)) for r in params])
        self.images = self._load_or_render(cache_dir)  # (size, views, S, S, 3) uint8

    def _rng(self, i: int, stream: int) -> np.random.Generator:
        """Item i's generator for a purpose: 0 parameters, 1 point cloud, 2 render sample and views."""
        return np.random.default_rng([self.seed & 0xFFFFFFFF, stable_hash(f"shapes3d:{self.split}"), i, stream])

    def mesh(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return item_mesh(int(self.label[i]), self.stretch[i], float(self.theta[i]))

    def points(self, i: int) -> torch.Tensor:
        """Item i's surface sample (n_points, 3) float32, inside the unit ball; the same on every call."""
        return torch.from_numpy(sample_surface(*self.mesh(i), self.n_points, self._rng(i, 1))[0])

    def _load_or_render(self, cache_dir: str | Path | None) -> np.ndarray:
        name = f"{VERSION}-{self.split}-n{self.size}-px{self.image_size}-v{self.views}-seed{self.seed}.npy"
        return cached_array(Path(cache_dir) / name if cache_dir else None, self.render_all)

    def render_all(self) -> np.ndarray:
        """Every item from ``views`` random viewpoints → (size, views, S, S, 3) uint8, a block of items at a time."""
        s, m = self.image_size, 2 * self.image_size**2  # ~6 splats per covered pixel on a sphere
        out = np.empty((self.size, self.views, s, s, 3), np.uint8)
        for start in range(0, self.size, BLOCK):
            items = range(start, min(start + BLOCK, self.size))
            pts, nrm, rot, bg = [], [], [], []
            for i in items:
                rng = self._rng(i, 2)
                p, n = sample_surface(*self.mesh(i), m, rng)
                pts.append(p)
                nrm.append(n)
                rot += [view_rotation(rng.uniform(0, 2 * np.pi), np.radians(rng.uniform(-20, 60)))
                        for _ in range(self.views)]
                bg += list(rng.uniform(150, 235, self.views))
            rep = lambda a: torch.from_numpy(np.stack(a)).repeat_interleave(self.views, 0)  # noqa: E731
            images = render(rep(pts), rep(nrm), torch.from_numpy(np.stack(rot)).float(),
                            rep([PALETTE[self.colour[i]] for i in items]), torch.tensor(bg, dtype=torch.float32), s)
            out[start:start + len(items)] = images.permute(0, 2, 3, 1).reshape(len(items), self.views, s, s, 3).numpy()
        return out

    def __len__(self) -> int:
        return self.size

    def image(self, i: int, view: int = 0) -> torch.Tensor:
        """Render ``view`` of item i, uint8 (3, S, S)."""
        return torch.from_numpy(self.images[i, view]).permute(2, 0, 1)

    def captions(self, i: int) -> list[str]:
        return [t.format(CLASSES[self.label[i]]) for t in TEMPLATES]

    def labels(self, i: int) -> dict[str, int]:
        return {"shape": int(self.label[i])}

    def tags(self, i: int) -> list[str]:
        return [CLASSES[self.label[i]]]

    def all_captions(self):
        for i in range(self.size):
            yield from self.captions(i)

    def __getitem__(self, key) -> dict:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        rng = sample_rng(self.sample_seed, epoch, i)
        caps = self.captions(i)
        caption, view = caps[int(rng.integers(len(caps)))], int(rng.integers(self.views))
        points = self.points(i)
        if self.augment is not None:
            points = augment_points(points, torch.Generator().manual_seed(int(rng.integers(2**62))), self.augment)
        return {"points": points, "image": self.image(i, view), "caption": caption, "index": i,
                "labels": self.labels(i)}
