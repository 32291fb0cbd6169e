import subprocess
import warnings

import numpy as np
import pytest

from omni.audio import (
    N_SAMPLES, SAMPLE_RATE, feature_frames, load_audio, log_mel, mel_filters, pad_or_trim,
)
from omni.errors import AudioInputError


def test_frame_count_follows_the_official_formula():
    assert feature_frames(int(1.941 * SAMPLE_RATE)) == 98  # docs/model.md §4's worked example
    assert feature_frames(SAMPLE_RATE) == 51
    assert feature_frames(45 * SAMPLE_RATE) == 1500  # capped at the encoder's 30 s


def test_log_mel_shape_and_range(sample_wav):
    mel = log_mel(pad_or_trim(load_audio(sample_wav)))
    assert mel.shape == (80, 3000)
    assert float(mel.max()) <= 2.5 and float(mel.max() - mel.min()) <= 2.0 + 1e-6  # 8 log10 units / 4


def test_mel_filters_are_slaney_triangles():
    f = mel_filters()
    assert f.shape == (80, 201) and f.dtype == np.float32 and (f >= 0).all()
    peaks = f.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all()  # centres rise with the band index


def test_file_bytes_and_array_inputs_agree(sample_wav):
    from_path = load_audio(sample_wav)
    from_bytes = load_audio(sample_wav.read_bytes())
    np.testing.assert_array_equal(from_path, from_bytes)
    from_array = load_audio(from_path, sample_rate=SAMPLE_RATE)
    np.testing.assert_array_equal(from_array, from_path)
    ints = (from_path * 32768).astype(np.int16)
    np.testing.assert_allclose(load_audio(np.stack([ints, ints], 1), sample_rate=SAMPLE_RATE), from_path, atol=1e-4)


def test_other_rates_are_resampled(sample_wav):
    wave = load_audio(sample_wav)
    up = np.interp(np.arange(wave.size * 3) / 3, np.arange(wave.size), wave).astype(np.float32)
    out = load_audio(up, sample_rate=48000)
    assert abs(out.size - wave.size) <= 2


@pytest.mark.parametrize("ext", ["mp3", "flac", "ogg", "m4a"])
def test_common_formats_decode(sample_wav, tmp_path, ext):
    path = tmp_path / f"q.{ext}"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(sample_wav), str(path)], check=True)
    wave = load_audio(path)
    assert abs(wave.size - load_audio(sample_wav).size) < 0.1 * SAMPLE_RATE  # codec padding only


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_audio("nope.wav")


@pytest.mark.parametrize("data, match", [
    (b"this is not audio at all", "could not decode"),
    (np.zeros(0, np.float32), "empty"),
    (np.zeros(SAMPLE_RATE, np.float32), "silent"),
])
def test_bad_audio_is_refused(data, match):
    with pytest.raises(AudioInputError, match=match):
        load_audio(data, sample_rate=SAMPLE_RATE)


def test_array_needs_a_rate_and_sane_shape():
    with pytest.raises(AudioInputError, match="sample_rate"):
        load_audio(np.ones(100, np.float32))
    with pytest.raises(AudioInputError, match="shape"):
        load_audio(np.ones((2, 2, 2), np.float32), sample_rate=SAMPLE_RATE)
    with pytest.raises(AudioInputError, match="unsupported"):
        load_audio(12345)


def test_long_input_is_truncated_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pad_or_trim(np.ones(N_SAMPLES + 5, np.float32))
    assert out.size == N_SAMPLES and any("30 s" in str(w.message) for w in caught)
