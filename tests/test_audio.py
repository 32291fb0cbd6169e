import os
import struct
import subprocess
import tempfile
import warnings

import numpy as np
import pytest

from omni.audio import (
    DECODE_SECONDS, N_SAMPLES, SAMPLE_RATE, TEMP_PREFIX, feature_frames, load_audio, log_mel, mel_filters,
    pad_or_trim, sweep_stale_temp_dirs,
)
from omni.errors import AudioInputError


def test_frame_count_follows_the_official_formula():
    assert feature_frames(int(1.941 * SAMPLE_RATE)) == 98  # the spec's worked example
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


def _float_wav(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """A 32-bit float WAV file: the one common format that can hold NaN and infinity."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)  # format 3: IEEE float
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", len(data)) + data)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("rate", [SAMPLE_RATE, 22050])
def test_non_finite_samples_are_refused(bad, rate):
    tone = (0.3 * np.sin(np.arange(rate) / 10)).astype(np.float32)
    tone[5000:5100] = bad
    with pytest.raises(AudioInputError, match="NaN or infinite"):
        load_audio(_float_wav(tone, rate))
    with pytest.raises(AudioInputError, match="NaN or infinite"):
        load_audio(tone, sample_rate=rate)


@pytest.mark.parametrize("rate", [0, -16000, 16000.5, True, 10**9])
def test_impossible_sample_rates_are_refused(rate):
    with pytest.raises(AudioInputError, match="sample_rate must be an integer"):
        load_audio(np.zeros(100, np.float32), sample_rate=rate)


@pytest.mark.parametrize("array", [np.array([0.1, "x", None], dtype=object), np.ones(10, complex),
                                   np.array(["a", "b"])])
def test_arrays_of_non_numbers_are_refused(array):
    with pytest.raises(AudioInputError, match="integer or float samples"):
        load_audio(array, sample_rate=SAMPLE_RATE)


def test_playlists_and_scripts_are_not_opened(tmp_path, sample_wav):
    """An HLS playlist or concat script names other files; only plain audio containers are read."""
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{sample_wav}\n#EXT-X-ENDLIST\n".encode()
    concat = f"ffconcat version 1.0\nfile '{sample_wav}'\n".encode()
    for upload in (playlist, concat):
        with pytest.raises(AudioInputError, match="not an accepted audio format") as refused:
            load_audio(upload)
        assert str(sample_wav) not in str(refused.value)


@pytest.mark.parametrize("upload", [b"hello, I am text", b"RIFF\x10\x00\x00\x00WAVEfmt garbage", b"\x00" * 4096])
def test_decoder_messages_carry_no_paths(upload):
    with pytest.raises(AudioInputError, match="could not decode") as refused:
        load_audio(upload)
    assert tempfile.gettempdir() not in str(refused.value) and TEMP_PREFIX not in str(refused.value)


def test_input_beyond_the_models_30_s_is_not_decoded(tmp_path):
    """Three hours of FLAC decode to 30 s plus a margin, not 170 M samples."""
    path = tmp_path / "long.flac"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=1:sample_rate=8000", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono",
                    "-filter_complex", "[0][1]concat=n=2:v=0:a=1", "-t", "10800", str(path)], check=True)
    assert load_audio(path.read_bytes()).size == DECODE_SECONDS * SAMPLE_RATE


def test_decoding_is_killed_at_its_time_limit(sample_wav, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None  # read TMPDIR again
    try:
        with pytest.raises(AudioInputError, match="took longer than"):
            load_audio(sample_wav.read_bytes(), timeout_s=1e-4)
    finally:
        tempfile.tempdir = None
    assert list(tmp_path.iterdir()) == []  # its temporary directory is gone too


def test_stale_temporary_directories_are_swept(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None
    try:
        gone = subprocess.Popen(["true"])  # a process id that no longer runs
        gone.wait()
        stale = tmp_path / f"{TEMP_PREFIX}{gone.pid}-abc"
        live = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-def"
        for d in (stale, live):
            d.mkdir()
            (d / "input").write_bytes(b"x")
        assert sweep_stale_temp_dirs() == 1
        assert not stale.exists() and live.exists()
    finally:
        tempfile.tempdir = None
