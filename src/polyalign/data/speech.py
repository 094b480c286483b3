"""Spoken captions: each caption of an image–text manifest read aloud by espeak-ng → an audio–text manifest.

Every clip gets a voice, speed and pitch drawn from (seed, row, caption), so a rebuild gives the same files.
Output: ``OUT/audio/<row>_<k>.wav`` (16 kHz mono PCM16) and ``OUT/speech.jsonl`` with rows
``{"audio", "caption", "voice", "speed", "pitch", "duration_s", "item", ...}``, where ``item`` is the source row's
line number and the source row's ``label``, ``concept_id``, ``category``, ``style`` and ``image`` are carried over
(``image`` stays relative to the source manifest).
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly
from tqdm import tqdm

from polyalign.errors import DataError
from polyalign.data.base import SkipReport, sample_rng
from polyalign.data.manifest import BadRow, read_rows, string_list

# espeak-ng English voices with male/female variants; all ship with the Debian package.
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-us+f3", "en-gb+f2", "en-us+m3", "en-gb-x-rp+f4")
SPEEDS = (150, 185)  # words per minute, drawn uniformly (narrow: duration should track caption length)
PITCHES = (30, 70)  # espeak-ng pitch 0..99
CARRY = ("label", "concept_id", "category", "subcategory", "style", "image")
INSTALL = "espeak-ng is not installed: run `apt-get install -y espeak-ng` (Debian/Ubuntu) or `make speech-deps`"


def find_espeak() -> str:
    """Path of the espeak-ng program, or a DataError saying how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise DataError(INSTALL)
    return path


def speak(text: str, voice: str, speed: int, pitch: int, sample_rate: int = 16000, program: str = "espeak-ng") -> np.ndarray:
    """Synthesise ``text`` → float32 mono waveform in [-1, 1] at ``sample_rate``."""
    done = subprocess.run([program, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                          capture_output=True, timeout=60)
    if done.returncode != 0 or not done.stdout:
        raise BadRow(f"espeak-ng failed: {done.stderr.decode(errors='replace').strip()[:200]}")
    with wave.open(io.BytesIO(done.stdout)) as w:
        rate, channels = w.getframerate(), w.getnchannels()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).reshape(-1, channels).mean(1)
    audio = pcm.astype(np.float32) / 32768.0
    if rate != sample_rate:
        g = np.gcd(rate, sample_rate)
        audio = resample_poly(audio, sample_rate // g, rate // g).astype(np.float32)
    return np.clip(audio, -1.0, 1.0)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM mono WAV."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes((audio * 32767).astype(np.int16).tobytes())


def build_speech(manifest: str | Path, out: str | Path, voices=VOICES, sample_rate: int = 16000, seed: int = 0,
                 captions_per_item: int = 1, limit: int | None = None, workers: int = 2) -> tuple[Path, SkipReport]:
    """Speak up to ``captions_per_item`` captions of each manifest row; returns the audio manifest and the skips."""
    program, manifest, out = find_espeak(), Path(manifest), Path(out)
    if not manifest.is_file():
        raise DataError(f"manifest not found: {manifest}")
    if not voices:
        raise DataError("no voices given")
    (out / "audio").mkdir(parents=True, exist_ok=True)
    report, jobs = SkipReport(), []
    rows = read_rows(manifest)[:limit]
    for number, row in rows:
        report.total += 1
        try:
            if isinstance(row, BadRow):  # not UTF-8, not a JSON object
                raise row
            caps = string_list(row.get("captions", []) or []) + string_list(row.get("caption", "") or "")
            if not caps:
                raise BadRow("empty caption")
        except BadRow as e:
            report.skip(e.reason, f"{manifest.name}:{number}", e.detail)
            continue
        for k, text in enumerate(caps[:captions_per_item]):
            rng = sample_rng(seed, k, number)
            jobs.append((number, k, text, voices[int(rng.integers(len(voices)))],
                         int(rng.integers(*SPEEDS)), int(rng.integers(*PITCHES)), row))

    def run(job):
        number, k, text, voice, speed, pitch, row = job
        try:
            audio = speak(text, voice, speed, pitch, sample_rate, program)
        except (BadRow, subprocess.TimeoutExpired) as e:
            return job, None, str(e) or "espeak-ng timed out"
        rel = f"audio/{number:06d}_{k}.wav"
        write_wav(out / rel, audio, sample_rate)
        entry = {"audio": rel, "caption": text, "voice": voice, "speed": speed, "pitch": pitch,
                 "duration_s": round(len(audio) / sample_rate, 3), "item": number}
        entry.update({key: row[key] for key in CARRY if key in row})
        return job, entry, None

    entries = []
    with ThreadPoolExecutor(max(1, workers)) as pool:  # espeak-ng runs as subprocesses: threads suffice
        for job, entry, error in tqdm(pool.map(run, jobs), total=len(jobs), desc="speak", disable=None):
            if error:
                report.skip("synthesis failed", f"{manifest.name}:{job[0]}")
            else:
                entries.append(entry)
    path = out / "speech.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(e) + "\n" for e in entries))
    tmp.replace(path)
    return path, report
