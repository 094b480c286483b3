"""Audio: WAV reading and resampling, clear errors, log-mel, a padding-invariant encoder, augmentation, the shapes
sounds (aligned with the shapes scenes, one pitch per colour) and the spoken-caption manifest."""
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from polyalign.data import audio
from polyalign.data.audio import (AudioAugment, PITCHES, ShapesAudio, SpeechManifest, augment_audio, load_wav,
                                  pad_audio, scene_sound)
from polyalign.data.shapes import COLOURS, ShapesDataset
from polyalign.models.encoders.audio import AudioCNN, LogMel, mel_filterbank
from polyalign.errors import DataError

SR = 16000


def _tone(freq: float, seconds: float, rate: int = SR, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def _peak_hz(x: np.ndarray, rate: int = SR) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spec.argmax()])


def test_pcm16_round_trip(tmp_path):
    x = _tone(440, 0.5)
    sf.write(tmp_path / "a.wav", x, SR, subtype="PCM_16")
    y = load_wav(tmp_path / "a.wav")
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert np.abs(y.numpy() - x).max() <= 1 / 32768 + 1e-7


def test_stereo_file_at_another_rate_is_mixed_down_and_resampled(tmp_path):
    left, right = _tone(440, 1.0, 22050), _tone(440, 1.0, 22050, amp=0.25)
    sf.write(tmp_path / "s.flac", np.stack([left, right], 1), 22050)
    y = load_wav(tmp_path / "s.flac", sample_rate=SR).numpy()
    assert len(y) == SR  # 1 s at 22.05 kHz → 1 s at 16 kHz
    assert abs(_peak_hz(y) - 440) <= 2
    assert np.sqrt(np.mean(y[1000:-1000] ** 2)) == pytest.approx(0.375 / np.sqrt(2), rel=0.02)  # mean of channels


def test_missing_and_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found.*nope.wav"):
        load_wav(tmp_path / "nope.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x01garbage, not audio" * 10)
    with pytest.raises(DataError, match="cannot decode.*bad.wav"):
        load_wav(tmp_path / "bad.wav")


def test_empty_file_gives_an_empty_clip(tmp_path):
    sf.write(tmp_path / "e.wav", np.zeros(0, np.float32), SR)
    assert load_wav(tmp_path / "e.wav").shape == (0,)


def test_filterbank_shape_and_no_empty_filter():
    fb = mel_filterbank(257, 64, SR)
    assert fb.shape == (64, 257)
    assert (fb.sum(1) > 0).all() and fb.max() <= 1
    assert (fb.argmax(1).diff() >= 0).all()  # centres rise with the filter index


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3500.0])
def test_pure_tone_peaks_in_the_mel_bin_of_its_frequency(freq):
    mel = LogMel()
    spec = mel(torch.from_numpy(_tone(freq, 0.3))[None])[0]  # (M, F)
    assert spec.shape == (64, 1 + (4800 - 512) // 160)
    assert int(spec.mean(1).argmax()) == int(np.abs(mel.centre_hz - freq).argmin())
    silent = mel(torch.zeros(1, 4800))
    assert torch.allclose(silent, torch.tensor(np.log(1e-5), dtype=torch.float32))  # the floor


def test_audio_encoder_tokens_ignore_padding():
    torch.manual_seed(0)
    enc = AudioCNN(32, layers=2, n_mels=32).eval()
    clips = [torch.randn(6000) * 0.1, torch.randn(2500) * 0.1, torch.randn(300) * 0.1]  # the last is under one window
    batch, mask = pad_audio(clips)
    with torch.no_grad():
        tokens = enc(batch, mask)
        keep = enc.token_mask(mask)
        assert tokens.shape == (3, 9, 32)  # 6000 samples: 1 + (6000 - 512) // 160 = 35 frames → 18 → 9 tokens
        assert keep.sum(1).tolist() == [9, 4, 1]  # 2500 samples: 13 frames → 7 → 4; 300: one (padded) window
        for b, clip in enumerate(clips):
            alone = enc(clip[None])[0]
            n = int(keep[b].sum())
            assert alone.shape[0] == n
            assert torch.allclose(tokens[b, :n], alone, atol=1e-5)
            assert (tokens[b, n:] == 0).all()
        pooled = (tokens * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        assert torch.allclose(pooled[1], enc(clips[1][None]).mean(1)[0], atol=1e-5)


def test_audio_encoder_with_a_longer_hop_still_ignores_padding():
    torch.manual_seed(0)
    enc = AudioCNN(32, layers=2, n_mels=32, hop=320).eval()
    clips = [torch.randn(6000) * 0.1, torch.randn(2500) * 0.1]
    batch, mask = pad_audio(clips)
    with torch.no_grad():
        tokens, keep = enc(batch, mask), enc.token_mask(mask)
        assert keep.sum(1).tolist() == [5, 2]  # 1 + (6000 - 512) // 320 = 18 frames → 9 → 5; 2500: 7 → 4 → 2
        for b, clip in enumerate(clips):
            n = int(keep[b].sum())
            assert torch.allclose(tokens[b, :n], enc(clip[None])[0], atol=1e-5) and (tokens[b, n:] == 0).all()


def test_augment_is_reproducible_and_each_op_acts():
    x = torch.from_numpy(_tone(500, 1.0))
    cfg = AudioAugment()
    a = augment_audio(x, torch.Generator().manual_seed(1), cfg)
    assert torch.equal(a, augment_audio(x, torch.Generator().manual_seed(1), cfg))
    assert not torch.equal(a, augment_audio(x, torch.Generator().manual_seed(2), cfg))
    quiet = dict(shift=0.0, p_noise=0.0, time_masks=0, freq_masks=0)
    gain = augment_audio(x, torch.Generator().manual_seed(3), AudioAugment(gain_db=(6.0, 6.0), **quiet))
    assert torch.allclose(gain, x * 10 ** (6 / 20))
    noisy = augment_audio(x, torch.Generator().manual_seed(4), AudioAugment(gain_db=(0, 0), **{**quiet, "p_noise": 1.0},
                                                                               snr_db=(20.0, 20.0)))
    snr = 10 * torch.log10(x.pow(2).mean() / (noisy - x).pow(2).mean())
    assert abs(float(snr) - 20) < 0.5
    cfg = AudioAugment(gain_db=(0, 0), **{**quiet, "time_masks": 1}, time_width=0.2)
    masked = augment_audio(x, torch.Generator().manual_seed(5), cfg)
    assert 0 < int((masked == 0).sum()) - int((x == 0).sum()) <= 0.2 * len(x)
    noise = torch.randn(SR, generator=torch.Generator().manual_seed(0))
    cfg = AudioAugment(gain_db=(0, 0), **{**quiet, "freq_masks": 1}, freq_width_mel=400.0)
    band = augment_audio(noise, torch.Generator().manual_seed(6), cfg)
    assert 0 < int((torch.fft.rfft(band).abs() < 1e-3).sum()) < SR // 2  # a removed band, not everything
    cropped = augment_audio(x, torch.Generator().manual_seed(7), AudioAugment(crop_s=0.25, **quiet))
    assert cropped.shape == (4000,)


def test_shapes_audio_follows_the_shapes_scenes_and_is_deterministic():
    sounds, scenes = ShapesAudio("val", 40, seed=2), ShapesDataset("val", 40, image_size=16, seed=2)
    assert [sounds.captions(i) for i in range(40)] == [scenes.captions(i) for i in range(40)]
    assert [sounds.labels(i) for i in range(40)] == [scenes.labels(i) for i in range(40)]
    again, other_seed = ShapesAudio("val", 40, seed=2), ShapesAudio("val", 40, seed=3)
    assert all(torch.equal(sounds.waveform(i), again.waveform(i)) for i in range(5))
    assert not torch.equal(sounds.waveform(0), other_seed.waveform(0))
    item = sounds[(1, 3)]
    assert item["audio"].shape == (SR,) and item["caption"] in scenes.captions(3) and item["index"] == 3
    assert item["audio"].abs().max() <= 1 and item["audio"].std() > 0.01


def test_colours_set_the_pitch_shapes_the_timbre_size_the_loudness():
    def sound(colour="red", shape="circle", size="large", cell=4, seed=0):
        obj = {"shape": shape, "colour": colour, "size": size, "cell": cell}
        return scene_sound([obj], np.random.default_rng(seed))

    peaks = {c: _peak_hz(sound(c, "square")) for c in COLOURS}
    for c, hz in peaks.items():
        assert hz == pytest.approx(PITCHES[c], rel=0.03)
    assert len({round(h) for h in peaks.values()}) == len(COLOURS)
    harmonic = lambda x, f: np.abs(np.fft.rfft(x))[round(3 * f)]  # 1 s clip: bin k is k Hz  # noqa: E731
    assert harmonic(sound(shape="square"), PITCHES["red"]) > 20 * harmonic(sound(shape="circle"), PITCHES["red"])
    rms = lambda x: np.sqrt(np.mean(x**2))  # noqa: E731
    assert rms(sound(size="large")) > 1.5 * rms(sound(size="small"))
    left, right = sound(cell=3), sound(cell=5)  # column → time slot
    assert rms(left[:5000]) > 10 * rms(left[-5000:]) and rms(right[-5000:]) > 10 * rms(right[:5000])


def _write_manifest(tmp_path):
    sf.write(tmp_path / "a.wav", _tone(300, 0.5), SR)
    sf.write(tmp_path / "b.wav", np.stack([_tone(300, 0.5, 22050)] * 2, 1), 22050)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), SR)
    (tmp_path / "bad.wav").write_bytes(b"not a wav at all" * 20)
    rows = [{"audio": "a.wav", "caption": "a red circle", "item": 1, "label": "circle"},
            {"audio": "b.wav", "caption": "a blue star", "item": 1, "label": "star"},
            {"audio": "gone.wav", "caption": "x", "item": 2}, {"audio": "empty.wav", "caption": "x", "item": 3},
            {"audio": "bad.wav", "caption": "x", "item": 4}, {"audio": "a.wav", "caption": " ", "item": 5}]
    path = tmp_path / "speech.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
    return path


def test_speech_manifest_reads_clips_and_counts_bad_rows(tmp_path):
    path = _write_manifest(tmp_path)
    with pytest.raises(DataError, match="5 of 7 rows are bad"):
        SpeechManifest(path)
    ds = SpeechManifest(path, max_bad_fraction=1.0)
    assert len(ds) == 2
    assert ds.skip_report.skipped == {"missing audio": 1, "empty audio": 1, "corrupt audio": 1, "empty caption": 1,
                                      "bad row": 1}
    item = ds[(0, 1)]
    assert item["audio"].shape == (8000,) and item["caption"] == "a blue star" and item["id"] == "b.wav"
    assert item["item"] == 1 and ds.label_names == {"label": ["circle", "star"]} and item["labels"] == {"label": 1}


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (make speech-deps)")
def test_speech_manifest_reads_what_build_speech_writes(tmp_path):
    from polyalign.data.speech import build_speech
    source = tmp_path / "m.jsonl"
    source.write_text("".join(json.dumps({"image": f"{i}.png", "caption": c}) + "\n"
                              for i, c in enumerate(["a red circle", "two blue stars"])))
    path, _ = build_speech(source, tmp_path / "out", voices=("en-us",), workers=1)
    ds = SpeechManifest(path)
    assert [ds.captions(i)[0] for i in range(2)] == ["a red circle", "two blue stars"]
    assert ds.waveform(1).std() > 0.01


def test_dataset_augmentation_is_a_function_of_epoch_and_index():
    ds = ShapesAudio("train", 8, seed=0)
    ds.augment = AudioAugment()
    assert torch.equal(ds[(0, 2)]["audio"], ds[(0, 2)]["audio"])
    assert not torch.equal(ds[(0, 2)]["audio"], ds[(1, 2)]["audio"])
    assert audio.torch_generator(np.random.default_rng(0)).initial_seed() == audio.torch_generator(
        np.random.default_rng(0)).initial_seed()
