"""Random waveform views (``data.audio_augment``): gain, shift, crop, noise at an SNR and SpecAugment-style time and
frequency masks (Park et al., arXiv 1904.08779) applied to the waveform; a view is a function of (clip, generator)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

@dataclass
class AudioAugment:
    """Random waveform views; every op is skipped at its neutral value (0 masks, p_noise 0, ...).

    The SpecAugment masks (Park et al., arXiv 1904.08779) are applied to the waveform so that the encoder stays
    deterministic: a time mask zeroes a span of samples, a frequency mask removes a band (its position uniform on
    the mel scale) through the FFT — on the encoder's log-mel both show up as masked stripes.
    """

    gain_db: tuple[float, float] = (-6.0, 6.0)  # uniform gain
    shift: float = 0.1  # shift by up to this fraction of the clip, zero-filled (not circular)
    crop_s: float | None = None  # a random crop of this many seconds (zero-padded when the clip is shorter)
    p_noise: float = 0.5  # probability of white noise at a uniform SNR
    snr_db: tuple[float, float] = (10.0, 30.0)
    time_masks: int = 2
    time_width: float = 0.05  # largest time-mask width, a fraction of the clip
    freq_masks: int = 2
    freq_width_mel: float = 150.0  # largest frequency-mask width in mel (HTK)
    sample_rate: int = 16000


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def augment_audio(audio: torch.Tensor, g: torch.Generator, cfg: AudioAugment) -> torch.Tensor:
    """One random view of a clip (T,) → (T,) (or (crop_s · rate,) with ``crop_s``); a function of (clip, g state)."""
    x = audio.float().clone()
    if cfg.crop_s is not None:
        n = round(cfg.crop_s * cfg.sample_rate)
        x = torch.nn.functional.pad(x, (0, max(0, n - len(x))))
        start = int(torch.randint(len(x) - n + 1, (), generator=g))
        x = x[start:start + n]
    t = len(x)
    if not t:
        return x
    if cfg.shift > 0:
        s = round(_uniform(g, -cfg.shift, cfg.shift) * t)
        x = torch.roll(x, s)
        if s > 0:
            x[:s] = 0
        elif s < 0:
            x[s:] = 0
    x = x * 10 ** (_uniform(g, *cfg.gain_db) / 20)
    for _ in range(cfg.freq_masks):
        x = _band_stop(x, g, cfg)
    for _ in range(cfg.time_masks):
        w = int(_uniform(g, 0, cfg.time_width) * t)
        start = int(torch.randint(t - w + 1, (), generator=g))
        x[start:start + w] = 0
    if float(torch.rand((), generator=g)) < cfg.p_noise:
        power = x.pow(2).mean().clamp_min(1e-10)
        snr = _uniform(g, *cfg.snr_db)
        x = x + torch.randn(t, generator=g) * (power / 10 ** (snr / 10)).sqrt()
    return x


def _band_stop(x: torch.Tensor, g: torch.Generator, cfg: AudioAugment) -> torch.Tensor:
    """Remove a random band [lo, lo + width] mel from the signal through its FFT."""
    top = 2595 * np.log10(1 + cfg.sample_rate / 2 / 700)
    width = _uniform(g, 0, cfg.freq_width_mel)
    lo = _uniform(g, 0, max(top - width, 0.0))
    f_lo, f_hi = (700 * (10 ** (np.array([lo, lo + width]) / 2595) - 1)).tolist()
    spec = torch.fft.rfft(x)
    freqs = torch.fft.rfftfreq(len(x), 1 / cfg.sample_rate)
    spec[(freqs >= f_lo) & (freqs <= f_hi)] = 0
    return torch.fft.irfft(spec, n=len(x))


def torch_generator(rng: np.random.Generator) -> torch.Generator:
    """A torch Generator seeded from a numpy one (the datasets' per-sample randomness, see ``sample_rng``)."""
    return torch.Generator().manual_seed(int(rng.integers(2**62)))
