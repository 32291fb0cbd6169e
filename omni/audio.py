"""Audio front end: decode any input to 16 kHz mono, then Whisper's log-mel spectrogram (docs/model.md §7).

The numbers and formulas match openai-whisper's `audio.py`, so the encoder sees the same input.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import warnings
import wave
from pathlib import Path

import numpy as np
import torch

from .errors import AudioInputError

SAMPLE_RATE = 16000  # Whisper's input rate (Hz): every question is decoded to this
OUTPUT_SAMPLE_RATE = 24000  # the answer's rate (Hz): SNAC's 24 kHz model
PCM_SAMPLE_WIDTH = 2  # bytes per sample of int16 PCM, the answer's format
PCM_SCALE = 32768.0  # int16 full scale: float samples in [-1, 1) times this
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
DECODE_SECONDS = CHUNK_SECONDS + 1  # decoded at most: what the model hears, plus a margin to tell "longer"
DECODE_TIMEOUT_S = 10.0  # one decode's wall-clock limit; ffmpeg is killed on it
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768000  # Hz accepted for numpy input
# ffmpeg demuxers allowed to open an input: plain audio containers only. Playlists (hls), scripts (concat),
# manifests and image sequences, which can name other files or URLs, are not among them.
ACCEPTED_FORMATS = ("wav", "w64", "flac", "mp3", "ogg", "matroska", "webm", "mov", "mp4", "m4a", "aac",
                    "aiff", "caf", "amr", "au", "wv")
ACCEPTED_FORMATS_TEXT = "WAV, FLAC, MP3, Ogg/Opus/Vorbis, WebM/Matroska, MP4/M4A, AAC, AIFF, CAF, AMR, AU, WavPack"
TEMP_PREFIX = "omni-audio-"  # followed by the owning process id
STDERR_TAIL_BYTES = 4096  # of ffmpeg's error output, read for the message
ERROR_CHARS = 200  # longest decoder message passed on
MAX_CHANNELS = 8  # an (N, channels) array with more columns than this is taken for channels-first, and refused

AudioSource = str | Path | bytes | np.ndarray
# The sample questions of a checkout (data/samples); an installed wheel has none.
SAMPLES_DIR = Path(__file__).resolve().parent.parent / "data" / "samples"



def pcm_to_float(pcm: bytes | np.ndarray) -> np.ndarray:
    """int16 PCM (LE bytes, or an array of integer samples) -> float32 samples in [-1, 1)."""
    samples = np.frombuffer(pcm, dtype="<i2") if isinstance(pcm, (bytes, bytearray, memoryview)) else pcm
    return samples.astype(np.float32) / PCM_SCALE


def float_to_pcm(samples: np.ndarray) -> bytes:
    """float samples -> int16 LE bytes, clipped to [-1, 1) first (the official code lets +-1.0 wrap around)."""
    return (np.clip(samples, -1.0, 1.0 - 1.0 / PCM_SCALE) * PCM_SCALE).astype("<i2").tobytes()

def write_wav(path: str | Path, pcm: bytes, sample_rate: int) -> Path:
    """Write int16 LE mono PCM bytes as a playable WAV file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(PCM_SAMPLE_WIDTH)
        out.setframerate(sample_rate)
        out.writeframes(pcm)
    return path


def _ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise RuntimeError("ffmpeg is needed to decode audio files; install it (e.g. `apt-get install ffmpeg`)")
    return exe


def _temp_dir() -> tempfile.TemporaryDirectory:
    """A private directory for one decode, named after this process so a later start can sweep it."""
    return tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-")


def sweep_stale_temp_dirs() -> int:
    """Remove decode directories left by processes that no longer run (a server killed mid-request)."""
    removed = 0
    for path in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        pid = path.name.removeprefix(TEMP_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to sweep
        return True
    return True


def _last_error(stderr: bytes, tmp: str) -> str:
    """ffmpeg's last error line, without the server's temporary paths."""
    lines = stderr.decode(errors="replace").strip().splitlines() or ["unknown error"]
    if any("not on whitelist" in line for line in lines):
        return f"not an accepted audio format (accepted: {ACCEPTED_FORMATS_TEXT})"
    line = re.sub(r"^(file|pipe):\S*:\s*", "", lines[-1].replace(tmp, ""))  # "file:/tmp/...: " names the input
    return re.sub(r"/\S*", "(a path)", line)[:ERROR_CHARS]


def _run_ffmpeg(input_args: list[str], stdin: bytes | None, tmp: str, what: str, timeout_s: float,
                formats: tuple[str, ...] = ACCEPTED_FORMATS) -> np.ndarray:
    """Decode with ffmpeg to s16le 16 kHz mono (as Whisper does), at most DECODE_SECONDS, within `timeout_s`.

    Only the temporary file or pipe given here can be opened (no network, no other file), only plain audio
    containers are probed (a playlist or concat script is refused), and the process is killed on the time limit.
    A second output keeps the samples as float so that NaN or infinite samples, which s16 would hide as
    full-scale noise, are refused.
    """
    check_path = str(Path(tmp) / "check.f32")
    limit = ["-t", f"{DECODE_SECONDS:g}", "-map", "0:a:0", "-ac", "1", "-ar", str(SAMPLE_RATE)]
    cmd = [_ffmpeg(), "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "1",
           "-protocol_whitelist", "pipe" if stdin is not None else "file", "-format_whitelist", ",".join(formats), *input_args,
           *limit, "-f", "s16le", "-acodec", "pcm_s16le", "pipe:1",
           *limit, "-f", "f32le", "-acodec", "pcm_f32le", check_path]
    with open(Path(tmp) / "stderr", "w+b") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err)
        try:
            out, _ = proc.communicate(stdin, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            proc.kill()  # SIGKILL: ffmpeg may ignore SIGTERM while it waits on input
            proc.communicate()
            raise AudioInputError(f"decoding {what} took longer than {timeout_s:g} s; refused") from e
        if proc.returncode != 0:
            err.seek(max(0, err.seek(0, os.SEEK_END) - STDERR_TAIL_BYTES))
            raise AudioInputError(f"could not decode {what} as audio: {_last_error(err.read(), tmp)}")
    check = np.fromfile(check_path, np.float32)
    if not np.isfinite(check).all():
        raise AudioInputError(f"found NaN or infinite samples in {what}")
    return pcm_to_float(out)


def _from_array(samples: np.ndarray, sample_rate: int | None, timeout_s: float) -> np.ndarray:
    if sample_rate is None:
        raise AudioInputError("a numpy audio input needs its sample_rate")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
            or not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioInputError(f"sample_rate must be an integer from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz, "
                              f"got {sample_rate!r}")
    samples = np.asarray(samples)
    if samples.dtype.kind not in "iuf":
        raise AudioInputError(f"audio array must hold integer or float samples, got dtype {samples.dtype}")
    if samples.dtype.kind in "iu":  # int16 PCM
        samples = pcm_to_float(samples)
    if samples.ndim == 2 and samples.shape[1] > MAX_CHANNELS:
        raise AudioInputError(f"audio array of shape {samples.shape} looks channels-first; pass (N, channels) "
                              f"samples (at most {MAX_CHANNELS} channels), e.g. array.T")
    if samples.ndim == 2:  # (N, channels) -> mono
        samples = samples.mean(axis=1)
    if samples.ndim != 1:
        raise AudioInputError(f"audio array must be (N,) or (N, channels), got shape {samples.shape}")
    samples = samples[: int(DECODE_SECONDS * sample_rate)].astype(np.float32)
    if not np.isfinite(samples).all():
        raise AudioInputError("found NaN or infinite samples in the audio array")
    if sample_rate == SAMPLE_RATE or samples.size == 0:
        return samples
    with _temp_dir() as tmp:
        args = ["-f", "f32le", "-ar", str(int(sample_rate)), "-ac", "1", "-i", "pipe:0"]
        return _run_ffmpeg(args, samples.tobytes(), tmp, "the audio array", timeout_s, formats=("f32le",))


def load_audio(source: AudioSource, sample_rate: int | None = None,
               timeout_s: float = DECODE_TIMEOUT_S) -> np.ndarray:
    """An audio file (path or bytes) or array -> float32 mono samples at 16 kHz, at most DECODE_SECONDS long.

    Files may be any of ACCEPTED_FORMATS; input longer than DECODE_SECONDS is cut there without decoding the
    rest (the model hears 30 s). Raises AudioInputError for anything else, naming what was wrong.
    """
    if isinstance(source, np.ndarray):
        samples = _from_array(source, sample_rate, timeout_s)
    elif isinstance(source, (bytes, bytearray)):
        # A temporary file, not a pipe: some containers (mp4/m4a) need a seekable input.
        with _temp_dir() as tmp:
            path = Path(tmp) / "input"
            path.write_bytes(source)
            samples = _run_ffmpeg(["-i", f"file:{path}"], None, tmp, "the audio bytes", timeout_s)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"audio file not found: {source}")
        with _temp_dir() as tmp:
            samples = _run_ffmpeg(["-i", f"file:{path.resolve()}"], None, tmp, str(source), timeout_s)
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
