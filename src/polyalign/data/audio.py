"""Audio data: reading WAVs, waveform augmentation, sounds of the shapes scenes, and the spoken-caption manifest.

Waveforms are float32 mono in [-1, 1], (T,) per clip and (B, T) + a bool mask (B, T) per batch (``pad_audio``).
``ShapesAudio`` turns each scene of ``ShapesDataset`` into a short "score" of the picture:

- time ↔ column: a clip has three equal time slots, an object sounds in the slot of its column (left → right);
- pitch ↔ colour: one fundamental per colour, four semitones apart (A3 … F5);
- timbre ↔ shape: a harmonic recipe and an envelope per shape (``TIMBRES``);
- loudness and length ↔ size: a large object is louder and lasts longer;
- tremolo ↔ row: top objects flutter fast, centre ones are steady, bottom ones wobble slowly;
- count ↔ number of notes.

Per-item variation (partial phases, ±1.5 % pitch, ±15 % loudness, onset jitter, background noise at 25–45 dB SNR)
is drawn from (seed, split, item), so item i always sounds the same and ``ShapesAudio(split, n, seed)[i]`` is the
scene of ``ShapesDataset(split, n, seed=seed)[i]`` (same captions, labels, tags).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

from polyalign.errors import DataError
from polyalign.data.audio_augment import AudioAugment, augment_audio, torch_generator  # noqa: F401
from polyalign.data.base import SkipReport, sample_rng, stable_hash
from polyalign.data.manifest import BadRow, read_rows
from polyalign.data.shapes import COLOURS, SHAPES, SIZES, ShapesDataset


def resample(audio: np.ndarray, rate: int, sample_rate: int) -> np.ndarray:
    """Polyphase resampling (scipy's Kaiser-windowed FIR) of a 1-D float32 signal from ``rate`` to ``sample_rate``."""
    if rate == sample_rate or not len(audio):
        return audio
    g = np.gcd(rate, sample_rate)
    return resample_poly(audio, sample_rate // g, rate // g).astype(np.float32)


def load_wav(path: str | Path, sample_rate: int = 16000) -> torch.Tensor:
    """Decode an audio file (any format libsndfile reads) → float32 mono (T,) at ``sample_rate``.

    Channels are averaged; a file at another rate is resampled. A clip without samples gives a (0,) tensor (the
    datasets count it as "empty audio"); a missing or undecodable file raises ``DataError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"audio file not found: {path}")
    try:
        audio, rate = sf.read(path, dtype="float32", always_2d=True)  # (T, C)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise DataError(f"cannot decode audio file {path}: {e}") from None
    return torch.from_numpy(resample(audio.mean(1), rate, sample_rate))


def pad_audio(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips (T_b,) → zero-padded batch (B, T) and mask (B, T), True on real samples (left-aligned)."""
    length = max(max(len(w) for w in waves), 1)
    audio = torch.zeros(len(waves), length)
    mask = torch.zeros(len(waves), length, dtype=torch.bool)
    for b, w in enumerate(waves):
        audio[b, : len(w)] = w
        mask[b, : len(w)] = True
    return audio, mask


# ---------------------------------------------------------------------------------------------------------------
# sounds of the shapes scenes

PITCHES = {c: 220.0 * 2 ** (4 * k / 12) for k, c in enumerate(COLOURS)}  # red 220 Hz … orange 698 Hz
_ODD = ((1, 3, 5, 7, 9), (1, 1 / 3, 1 / 5, 1 / 7, 1 / 9))
_SAW = ((1, 2, 3, 4, 5, 6, 7, 8), tuple(1 / n for n in range(1, 9)))
_OCTAVES = ((1, 2, 4), (1, 0.5, 0.25))
TIMBRES = {  # shape → (partial frequency ratios, amplitudes, envelope); the fundamental is always the loudest
    "circle": ((1,), (1.0,), "sustain"),
    "square": (*_ODD, "sustain"),
    "heart": (*_OCTAVES, "sustain"),
    "triangle": (*_SAW, "pluck"),
    "star": (*_ODD, "pluck"),
    "diamond": (*_OCTAVES, "swell"),
    "cross": (*_SAW, "swell"),
    "ring": ((1, 2.76, 5.40, 8.93), (1, 0.5, 0.3, 0.15), "bell"),  # inharmonic partials of a struck bar
}
LOUDNESS = {"small": 0.14, "large": 0.3}  # peak amplitude of a note; three large notes at once stay below 1
LENGTH = {"small": 0.55, "large": 0.9}  # fraction of the time slot
TREMOLO_HZ = (11.0, 0.0, 3.0)  # per grid row: top, centre, bottom
assert set(TIMBRES) == set(SHAPES) and set(LOUDNESS) == set(LENGTH) == set(SIZES)


def _envelope(kind: str, n: int, sample_rate: int) -> np.ndarray:
    """Amplitude envelope (n,) in [0, 1] with 5 ms fades at both ends (no clicks)."""
    t = np.arange(n, dtype=np.float32) / sample_rate
    if kind == "pluck":
        env = np.exp(-t / 0.07)
    elif kind == "bell":
        env = np.exp(-t / 0.18)
    elif kind == "swell":
        env = np.minimum(t / (0.8 * t[-1] + 1e-6), 1.0)
    else:
        env = np.ones(n, np.float32)
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.005)
    return (env * fade).astype(np.float32)


def scene_sound(objects: list[dict[str, str]], rng: np.random.Generator, sample_rate: int = 16000,
                duration: float = 1.0) -> np.ndarray:
    """Synthesise one scene → float32 (round(duration · rate),) in [-1, 1].

    ``objects`` are ``ShapesDataset.objects(i)`` dicts (shape, colour, size, cell); ``rng`` draws the per-item
    variation (phases, jitter, noise).
    """
    total = round(duration * sample_rate)
    out = np.zeros(total, np.float32)
    slot = total // 3
    for o in objects:
        ratios, amps, env_kind = TIMBRES[o["shape"]]
        n = int(LENGTH[o["size"]] * slot)
        start = slot * (o["cell"] % 3) + int(rng.integers(0, slot - n + 1)) // 4  # onset jitter, inside the slot
        f0 = PITCHES[o["colour"]] * (1 + rng.uniform(-0.015, 0.015))
        t = np.arange(n, dtype=np.float32) / sample_rate
        omega = np.asarray(ratios, np.float32)[:, None] * np.float32(2 * np.pi * f0)  # (P, 1), float32 throughout
        phases = rng.uniform(0, 2 * np.pi, (len(ratios), 1)).astype(np.float32)
        note = np.asarray(amps, np.float32) @ np.sin(omega * t + phases) / sum(amps)  # (n,), peak ≤ 1
        note *= _envelope(env_kind, n, sample_rate)
        rate = TREMOLO_HZ[o["cell"] // 3]
        if rate:
            note *= 1 - 0.35 * (1 - np.cos(2 * np.pi * rate * t))
        out[start:start + n] += LOUDNESS[o["size"]] * rng.uniform(0.85, 1.15) * note
    power = float(np.mean(out**2))
    out += rng.standard_normal(total, np.float32) * np.float32(np.sqrt(power / 10 ** (rng.uniform(25, 45) / 10)))
    return np.clip(out, -1.0, 1.0)


class ShapesAudio(torch.utils.data.Dataset):
    """The shapes scenes as sounds (see the module docstring): item i ↔ ``ShapesDataset(split, size, seed=seed)[i]``.

    ``dataset[(epoch, i)]`` → ``{"audio": float32 (T,), "caption": str, "index": i, "labels": dict}``; the caption
    is drawn per (sample_seed, epoch, i), and ``augment`` (an ``AudioAugment``) gives a random view per epoch.
    """

    def __init__(self, split: str, size: int, seed: int = 0, sample_rate: int = 16000, duration: float = 1.0):
        # the scene parameters, captions and labels of ShapesDataset (tiny images: rendering 10k costs ~0.25 s)
        self.scenes = ShapesDataset(split, size, image_size=16, seed=seed)
        self.split, self.size, self.seed = split, size, seed
        self.sample_rate, self.duration = sample_rate, duration
        self.label_names, self.prompt_templates = self.scenes.label_names, self.scenes.prompt_templates
        self.skip_report = SkipReport(total=size)
        self.sample_seed = 0
        self.augment: AudioAugment | None = None

    def __len__(self) -> int:
        return self.size

    def waveform(self, i: int) -> torch.Tensor:
        """The clip of item i, float32 (round(duration · sample_rate),); the same on every call."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, stable_hash(f"audio:{self.split}"), i])
        return torch.from_numpy(scene_sound(self.scenes.objects(i), rng, self.sample_rate, self.duration))

    def captions(self, i: int) -> list[str]:
        return self.scenes.captions(i)

    def labels(self, i: int) -> dict[str, int]:
        return self.scenes.labels(i)

    def tags(self, i: int) -> list[str]:
        return self.scenes.tags(i)

    def all_captions(self):
        return self.scenes.all_captions()

    def __getitem__(self, key) -> dict:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        rng = sample_rng(self.sample_seed, epoch, i)
        caps = self.captions(i)
        caption = caps[int(rng.integers(len(caps)))]
        audio = self.waveform(i)
        if self.augment is not None:
            audio = augment_audio(audio, torch_generator(rng), self.augment)
        return {"audio": audio, "caption": caption, "index": i, "labels": self.labels(i)}


# ---------------------------------------------------------------------------------------------------------------
# spoken captions


class SpeechManifest(torch.utils.data.Dataset):
    """The audio–text manifest written by ``data.speech.build_speech`` (``speech.jsonl``): one clip per row.

    Rows are checked at construction (header only: file present, decodable, not empty); bad rows are skipped and
    counted in ``skip_report`` by reason, and more than ``max_bad_fraction`` of them is a ``DataError``. Clips are
    decoded lazily. ``dataset[(epoch, i)]`` → ``{"audio": (T,), "caption", "index", "id", "item", "labels"}``: ``id``
    is the clip's path in the manifest, ``item`` the source image–text row (several clips may share one).
    """

    def __init__(self, path: str | Path, sample_rate: int = 16000, max_bad_fraction: float = 0.01,
                 label_fields: tuple[str, ...] | list[str] = ("label",), label_names: dict[str, list[str]] | None = None):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"audio manifest not found: {path}")
        self.path, self.sample_rate = path, sample_rate
        rows = read_rows(path)
        self.skip_report = SkipReport(total=len(rows))
        self.rows = []
        for number, row in rows:
            problem = row if isinstance(row, BadRow) else _check_row(row, path.parent)
            if problem is not None:
                self.skip_report.skip(problem.reason, f"{path.name}:{number}", problem.detail)
            else:
                self.rows.append(row)
        bad = self.skip_report.n_skipped / max(len(rows), 1)
        if bad > max_bad_fraction or not self.rows:
            raise DataError(f"{path}: {self.skip_report.n_skipped} of {len(rows)} rows are bad ({bad:.1%}, allowed "
                            f"{max_bad_fraction:.1%}). First bad rows: {'; '.join(self.skip_report.examples)}")
        if label_names is None:  # a test split passes the training split's, so class indices agree
            found = {f: sorted({r[f] for r in self.rows if isinstance(r.get(f), str)}) for f in label_fields}
            label_names = {f: names for f, names in found.items() if names}
        self.label_names = label_names
        self.prompt_templates = {f: ["{}", "a {}"] for f in label_names}
        self._label_index = {f: {c: k for k, c in enumerate(names)} for f, names in label_names.items()}
        self.sample_seed = 0
        self.augment: AudioAugment | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def waveform(self, i: int) -> torch.Tensor:
        return load_wav(self.path.parent / self.rows[i]["audio"], self.sample_rate)

    def captions(self, i: int) -> list[str]:
        return [self.rows[i]["caption"].strip()]

    def id(self, i: int) -> str:
        return self.rows[i]["audio"]

    def labels(self, i: int) -> dict[str, int]:
        """Class index per label field; a class the vocabulary lacks (a test-only class) is left out."""
        row = self.rows[i]
        return {f: index[row[f]] for f, index in self._label_index.items() if isinstance(row.get(f), str) and row[f] in index}

    def tags(self, i: int) -> list[str]:
        return []

    def all_captions(self):
        for row in self.rows:
            yield row["caption"].strip()

    def __getitem__(self, key) -> dict:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        audio = self.waveform(i)
        if self.augment is not None:
            audio = augment_audio(audio, torch_generator(sample_rng(self.sample_seed, epoch, i)), self.augment)
        return {"audio": audio, "caption": self.captions(i)[0], "index": i, "id": self.id(i),
                "item": self.rows[i].get("item"), "labels": self.labels(i)}


def _check_row(row: dict, root: Path) -> BadRow | None:
    """Why a manifest row is unusable, or None."""
    if not isinstance(row.get("audio"), str) or not isinstance(row.get("caption"), str):
        return BadRow("bad row")
    if not row["caption"].strip():
        return BadRow("empty caption")
    file = root / row["audio"]
    if not file.is_file():
        return BadRow("missing audio")
    try:
        frames = sf.info(file).frames
    except (sf.LibsndfileError, RuntimeError):
        return BadRow("corrupt audio")
    return BadRow("empty audio") if frames == 0 else None
