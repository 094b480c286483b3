"""Audio encoders: waveforms (B, T) + sample mask (B, T) → tokens (B, N, D) along time. Pooling is the head's job.

Padding never changes a clip's real tokens: the log-mel uses no centring (a frame only sees samples of its own
clip), features past a clip's end are zeroed after every layer (so convolutions see the same zeros as at the end
of an unpadded clip), and normalisation is per position (a channel LayerNorm, no batch statistics). Tokens past the
end are zero; ``token_mask(mask)`` says which tokens are real, for the head's masked mean.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOG_MEAN, LOG_STD = -6.0, 4.0  # fixed input normalisation of the natural-log mel power


def hz_to_mel(f):
    """HTK mel scale: 2595 · log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m):
    """Inverse of ``hz_to_mel``."""
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """Triangular filters (n_mels, n_freqs) on the HTK mel scale, peak 1, no area normalisation (librosa's
    ``htk=True, norm=None``). Filter m rises from centre m-1 to centre m and falls to centre m+1, the n_mels + 2
    centres being evenly spaced in mel between f_min and f_max (default Nyquist)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    centres = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))  # (n_mels + 2,)
    freqs = np.linspace(0, sample_rate / 2, n_freqs)
    lo, mid, hi = centres[:-2, None], centres[1:-1, None], centres[2:, None]
    up, down = (freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)
    return torch.from_numpy(np.clip(np.minimum(up, down), 0, None)).float()


class LogMel(nn.Module):
    """Waveform (B, T) → natural-log mel power (B, n_mels, F), F = 1 + (T - n_fft) // hop (no centring; T ≥ n_fft).

    Hann window of ``win_length`` samples zero-padded to ``n_fft``, |STFT|² through ``mel_filterbank`` (HTK), then
    log(max(·, floor)). Defaults: 25 ms windows, 10 ms hop, 64 mels at 16 kHz. No learnable parameters.
    """

    def __init__(self, sample_rate: int = 16000, n_fft: int = 512, win_length: int = 400, hop: int = 160,
                 n_mels: int = 64, f_min: float = 0.0, f_max: float | None = None, floor: float = 1e-5):
        super().__init__()
        self.sample_rate, self.n_fft, self.win_length, self.hop, self.floor = sample_rate, n_fft, win_length, hop, floor
        f_max = sample_rate / 2 if f_max is None else f_max
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        self.register_buffer("fb", mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max), persistent=False)
        self.centre_hz = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))[1:-1]  # (n_mels,)

    def frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Samples per clip (B,) → its frames (B,); a clip shorter than one window is padded to one frame."""
        return 1 + (lengths.clamp_min(self.n_fft) - self.n_fft) // self.hop

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(audio.float(), self.n_fft, self.hop, self.win_length, self.window, center=False,
                          return_complex=True)  # (B, n_fft // 2 + 1, F)
        mel = torch.einsum("mf,bft->bmt", self.fb, spec.real.square() + spec.imag.square())
        return mel.clamp_min(self.floor).log()


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, H, W), at every position separately."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _keep(x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Zero the time steps (last axis) of (B, ..., F) at or past each clip's ``frames`` (B,)."""
    valid = torch.arange(x.shape[-1], device=x.device) < frames[:, None]  # (B, F)
    return x * valid.view(valid.shape[0], *[1] * (x.dim() - 2), valid.shape[1])


class AudioCNN(nn.Module):
    """Log-mel → ``layers`` residual 2D conv stages over (mel, time), each halving both axes (a stride-2 conv, then
    x + norm(conv(x)), GELU) → the mel axis flattened and projected → tokens (B, ⌈F / 2^layers⌉, width).

    ``forward(audio (B, T), mask (B, T) | None)``; ``mask`` marks real samples (left-aligned), None = all real.
    About ``hop`` samples (default 10 ms) per log-mel frame, times 2^layers per token; a larger hop makes the
    encoder proportionally cheaper.
    """

    pool = "mean"

    def __init__(self, width: int, layers: int = 3, sample_rate: int = 16000, n_mels: int = 64, hop: int = 160, **_):
        super().__init__()
        self.width, self.layers = width, layers
        self.logmel = LogMel(sample_rate, hop=hop, n_mels=n_mels)
        chans = [1] + [max(width // 2 ** (layers - i), 16) for i in range(layers)]
        self.stages = nn.ModuleList()
        for cin, cout in zip(chans[:-1], chans[1:]):
            down = nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), ChannelNorm(cout), nn.GELU())
            block = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1), ChannelNorm(cout))
            self.stages.append(nn.ModuleList([down, block]))
        mels = n_mels
        for _ in range(layers):
            mels = (mels + 1) // 2
        self.proj = nn.Linear(chans[-1] * mels, width)  # the mel axis is flattened: pitch stays explicit
        self.act = nn.GELU()

    def _frames(self, mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
        """Valid log-mel frames per clip (B,)."""
        lengths = torch.full((batch,), length) if mask is None else mask.sum(1)
        return self.logmel.frames(lengths)

    def token_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Sample mask (B, T) → token mask (B, N): which output tokens hold real audio."""
        frames = self._frames(mask, *mask.shape)
        total = self.logmel.frames(torch.tensor(mask.shape[1]))
        for _ in range(self.layers):
            frames, total = (frames + 1) // 2, (total + 1) // 2
        return torch.arange(int(total), device=mask.device) < frames[:, None]

    def forward(self, audio: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        frames = self._frames(mask, *audio.shape).to(audio.device)
        audio = F.pad(audio, (0, max(0, self.logmel.n_fft - audio.shape[1])))
        x = _keep(((self.logmel(audio) - LOG_MEAN) / LOG_STD).unsqueeze(1), frames)  # (B, 1, M, F)
        for down, block in self.stages:
            frames = (frames + 1) // 2  # a stride-2, kernel-3, padding-1 conv maps F frames to ⌈F / 2⌉
            x = _keep(down(x), frames)
            x = _keep(self.act(x + block(x)), frames)
        tokens = self.proj(x.permute(0, 3, 1, 2).flatten(2))  # (B, N, C · M') → (B, N, width)
        return _keep(tokens.transpose(1, 2), frames).transpose(1, 2)
