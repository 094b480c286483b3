"""Spoken captions with espeak-ng: readable 16 kHz WAVs, deterministic voices, counted skips, clear errors."""
import json
import shutil
import wave

import numpy as np
import pytest

from polyalign.data import speech
from polyalign.errors import DataError

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (make speech-deps)")


def _manifest(tmp_path, captions):
    rows = [{"image": f"{i}.png", "caption": c, "label": "x", "concept_id": f"c{i}"} for i, c in enumerate(captions)]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"image": "e.png", "caption": "  "}\n{oops\n')
    return path


def test_missing_espeak_is_a_one_line_instruction(tmp_path, monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="apt-get install -y espeak-ng"):
        speech.build_speech(_manifest(tmp_path, ["a red circle"]), tmp_path / "out")


@needs_espeak
def test_wavs_are_readable_and_grow_with_caption_length(tmp_path, monkeypatch):
    monkeypatch.setattr(speech, "SPEEDS", (170, 171))  # one speed and pitch: duration depends on the text alone
    monkeypatch.setattr(speech, "PITCHES", (50, 51))
    caps = ["red", "a red circle", "a small red circle on the left",
            "a small red circle to the left of a big blue star at the top right of the picture"]
    path, report = speech.build_speech(_manifest(tmp_path, caps), tmp_path / "out", voices=("en-us",))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["caption"] for r in rows] == caps and rows[0]["concept_id"] == "c0"
    assert report.skipped == {"empty caption": 1, "bad row": 1}
    durations = []
    for r in rows:
        with wave.open(str(tmp_path / "out" / r["audio"])) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
        assert np.sqrt(np.mean((pcm / 32768.0) ** 2)) > 0.01  # speech, not silence
        durations.append(len(pcm) / 16000)
    assert durations == sorted(durations) and durations[-1] > 2 * durations[0]
    assert [r["duration_s"] for r in rows] == pytest.approx(durations, abs=1e-3)


@needs_espeak
def test_voice_choice_is_deterministic_and_varied(tmp_path):
    caps = [f"a caption number {i}" for i in range(16)]
    a, _ = speech.build_speech(_manifest(tmp_path, caps), tmp_path / "a")
    b, _ = speech.build_speech(_manifest(tmp_path, caps), tmp_path / "b")
    ra = [json.loads(line) for line in a.read_text().splitlines()]
    rb = [json.loads(line) for line in b.read_text().splitlines()]
    key = lambda r: (r["voice"], r["speed"], r["pitch"])  # noqa: E731
    assert list(map(key, ra)) == list(map(key, rb))
    assert len({r["voice"] for r in ra}) > 3 and len({r["speed"] for r in ra}) > 3
