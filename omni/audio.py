"""Audio front end: decode any input to 16 kHz mono, then Whisper's log-mel spectrogram (docs/model.md §7).

The numbers and formulas match openai-whisper's `audio.py`, so the encoder sees the same input.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import AudioInputError

SAMPLE_RATE = 16000  # Whisper's input rate (Hz): every question is decoded to this
OUTPUT_SAMPLE_RATE = 24000  # the answer's rate (Hz): SNAC's 24 kHz model
PCM_SAMPLE_WIDTH = 2  # bytes per sample of int16 PCM, the answer's format
PCM_SCALE = 32768.0  # int16 full scale: float samples in [-1, 1) times this
INT16_MAX, INT16_MIN = 32767, -32768
N_FFT = 400  # 25 ms analysis window
HOP_LENGTH = 160  # 10 ms hop -> 100 mel frames per second
N_MELS = 80
CHUNK_SECONDS = 30  # the encoder always sees 30 s: longer input is cut, shorter is zero-padded
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480,000 samples -> 3,000 mel frames -> 1,500 encoder frames
N_ENCODER_FRAMES = 1500
FEATURE_MS = 20  # one encoder frame per 20 ms of input
SAMPLES_PER_FEATURE = SAMPLE_RATE * FEATURE_MS // 1000  # 320: two mel hops
LOG_FLOOR = 1e-10  # clamp before log10
DYNAMIC_RANGE = 8.0  # log10 units kept below the loudest bin (80 dB)
SILENCE_PEAK = 1e-3  # -60 dBFS: a peak below this is treated as no speech at all

AudioSource = str | Path | bytes | np.ndarray


def _ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise RuntimeError("ffmpeg is needed to decode audio files; install it (e.g. `apt-get install ffmpeg`)")
    return exe


def _run_ffmpeg(args: list[str], stdin: bytes | None, what: str) -> np.ndarray:
    """Run ffmpeg and read its raw s16le 16 kHz mono output as float32 in [-1, 1)."""
    cmd = [_ffmpeg(), "-nostdin", "-threads", "0", *args,
           "-f", "s16le", "-ac", "1", "-acodec", "pcm_s16le", "-ar", str(SAMPLE_RATE), "-"]
    try:
        out = subprocess.run(cmd, input=stdin, capture_output=True, check=True).stdout
    except subprocess.CalledProcessError as e:
        reason = e.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["unknown error"]
        raise AudioInputError(f"could not decode {what} as audio: {reason[0]}") from e
    return np.frombuffer(out, np.int16).astype(np.float32) / PCM_SCALE


def _from_array(samples: np.ndarray, sample_rate: int | None) -> np.ndarray:
    if sample_rate is None:
        raise AudioInputError("a numpy audio input needs its sample_rate")
    samples = np.asarray(samples)
    if np.issubdtype(samples.dtype, np.integer):  # int16 PCM
        samples = samples.astype(np.float32) / PCM_SCALE
    if samples.ndim == 2:  # (N, channels) -> mono
        samples = samples.mean(axis=1)
    if samples.ndim != 1:
        raise AudioInputError(f"audio array must be (N,) or (N, channels), got shape {samples.shape}")
    samples = samples.astype(np.float32)
    if sample_rate == SAMPLE_RATE or samples.size == 0:
        return samples
    args = ["-f", "f32le", "-ar", str(int(sample_rate)), "-ac", "1", "-i", "pipe:0"]
    return _run_ffmpeg(args, samples.tobytes(), "the audio array")


def load_audio(source: AudioSource, sample_rate: int | None = None) -> np.ndarray:
    """Any common audio file (path or bytes) or array -> float32 mono samples at 16 kHz."""
    if isinstance(source, np.ndarray):
        samples = _from_array(source, sample_rate)
    elif isinstance(source, (bytes, bytearray)):
        # A temporary file, not a pipe: some containers (mp4/m4a) need a seekable input.
        with tempfile.TemporaryDirectory(prefix="omni-audio-") as tmp:
            path = Path(tmp) / "input"
            path.write_bytes(source)
            samples = _run_ffmpeg(["-i", str(path)], None, "the audio bytes")
    elif isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise FileNotFoundError(f"audio file not found: {source}")
        samples = _run_ffmpeg(["-i", str(source)], None, str(source))
    else:
        raise AudioInputError(f"unsupported audio input type {type(source).__name__}: pass a path, bytes or a numpy array")
    check_speech(samples)
    return samples


def check_speech(samples: np.ndarray) -> None:
    if samples.size == 0:
        raise AudioInputError("the audio is empty")
    if float(np.max(np.abs(samples))) < SILENCE_PEAK:
        raise AudioInputError("the audio is silent (peak below -60 dBFS): there is no question to answer")


def feature_frames(n_samples: int) -> int:
    """Encoder frames the model reads, L = floor(ms / 20) + 1 (official formula), at most 1,500."""
    duration_ms = (n_samples / SAMPLE_RATE) * 1000
    return min(int(duration_ms / FEATURE_MS) + 1, N_ENCODER_FRAMES)


def pad_or_trim(samples: np.ndarray, length: int = N_SAMPLES) -> np.ndarray:
    """Cut to 30 s (with a warning), then zero-pad to `length` samples (30 s unless trimming)."""
    if samples.size > N_SAMPLES:
        warnings.warn(f"input is {samples.size / SAMPLE_RATE:.1f} s; the model hears only the first {CHUNK_SECONDS} s",
                      stacklevel=3)
        return samples[:N_SAMPLES]
    return np.pad(samples, (0, length - samples.size))


def trimmed_length(n_samples: int) -> int:
    """Samples that give exactly the `feature_frames` encoder frames the model reads (20 ms each)."""
    return feature_frames(n_samples) * SAMPLES_PER_FEATURE


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    logstep = np.log(6.4) / 27.0
    mels = f / f_sp
    log_part = f >= min_log_hz
    mels[log_part] = min_log_hz / f_sp + np.log(f[log_part] / min_log_hz) / logstep
    return mels


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    freqs = f_sp * m
    log_part = m >= min_log_mel
    freqs[log_part] = min_log_hz * np.exp(logstep * (m[log_part] - min_log_mel))
    return freqs


def mel_filters(n_mels: int = N_MELS) -> np.ndarray:
    """Slaney-normalised triangular filters `(n_mels, 1 + N_FFT // 2)`, float32 as Whisper ships them."""
    fft_freqs = np.fft.rfftfreq(n=N_FFT, d=1.0 / SAMPLE_RATE)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([SAMPLE_RATE / 2]))[0], n_mels + 2))
    widths = np.diff(edges)
    ramps = np.subtract.outer(edges, fft_freqs)
    weights = np.zeros((n_mels, fft_freqs.size), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / widths[i]
        upper = ramps[i + 2] / widths[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:n_mels + 2] - edges[:n_mels]))[:, None]
    return weights


_MEL_CACHE: dict[torch.device, torch.Tensor] = {}


def log_mel(samples: np.ndarray, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """16 kHz samples (already padded to 30 s) -> Whisper's normalised log-mel `(80, 3000)`."""
    audio = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)).to(device)
    window = torch.hann_window(N_FFT, device=device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    if device not in _MEL_CACHE:
        _MEL_CACHE[device] = torch.from_numpy(mel_filters()).to(device)
    log_spec = torch.clamp(_MEL_CACHE[device] @ power, min=LOG_FLOOR).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - DYNAMIC_RANGE)
    return (log_spec + 4.0) / 4.0
