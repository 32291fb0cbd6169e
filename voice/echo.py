"""Echo guard: keep the answer's own voice, heard back by the microphone, from counting as the user.

The reference is what the sink actually played, resampled to the microphone rate and aligned with the
microphone frames. Each frame the guard finds the echo path's bulk delay by cross-correlation, fits a short
FIR filter there by least squares (a block echo canceller, so it needs no time to converge) and subtracts
the fitted echo. The VAD then reads the residual, and during playback a frame counts as the user only if
the residual stays well above what an imperfect canceller would leave of the echo (double-talk test).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .signal import FRAME_SAMPLES, MIC_RATE, energy

MAX_DELAY_MS = 300  # longest echo delay searched: device output + input latency plus the room
FIT_FRAMES = 4  # frames (128 ms) the delay search and the filter fit look at
TAPS = 64  # FIR length of the fitted echo path (4 ms at 16 kHz: direct sound plus early reflections)
TAPS_BEFORE_PEAK = 8  # filter taps placed before the correlation peak (resampler and speaker smear)
ASSUMED_ERLE_DB = 15.0  # echo a canceller removes in a real room at least (dB); the rest may leak
DOUBLE_TALK_MARGIN_DB = 6.0  # the user must be this far above the leaked echo to count
SILENT_REFERENCE = 1e-6  # reference energy per sample below which nothing is playing
RIDGE = 1e-3  # relative Tikhonov regularisation of the least-squares fit


@dataclass(frozen=True)
class EchoConfig:
    enabled: bool = True  # False: the VAD reads the raw microphone (for measuring the guard's effect)
    max_delay_ms: int = MAX_DELAY_MS
    taps: int = TAPS
    assumed_erle_db: float = ASSUMED_ERLE_DB
    margin_db: float = DOUBLE_TALK_MARGIN_DB

    def __post_init__(self) -> None:
        if self.max_delay_ms < 0 or self.taps <= TAPS_BEFORE_PEAK:
            raise ValueError(f"need max_delay_ms >= 0 and taps > {TAPS_BEFORE_PEAK}, "
                             f"got {self.max_delay_ms} and {self.taps}")

    @property
    def min_residual_ratio(self) -> float:
        """Residual / echo energy a frame needs during playback to count as the user."""
        return float(10.0 ** ((self.margin_db - self.assumed_erle_db) / 10.0))


@dataclass(frozen=True)
class EchoCheck:
    residual: np.ndarray  # the frame with the fitted echo removed (float32, 16 kHz)
    echo_energy: float  # energy of the fitted echo over the fit window
    residual_energy: float  # energy of the residual over the fit window
    delay_ms: float  # the echo path's bulk delay found (0 when nothing plays)


class EchoGuard:
    """Block least-squares echo canceller plus a double-talk gate, one microphone frame at a time."""

    def __init__(self, config: EchoConfig) -> None:
        self.config = config
        self.window = FIT_FRAMES * FRAME_SAMPLES
        self.max_delay = config.max_delay_ms * MIC_RATE // 1000
        self.mic = np.zeros(self.window, np.float32)
        self.reference = np.zeros(self.window + self.max_delay + config.taps, np.float32)

    def process(self, frame: np.ndarray, played: np.ndarray) -> EchoCheck:
        """`frame`: one microphone frame; `played`: the reference for the same span (16 kHz, same length)."""
        assert frame.shape == played.shape == (FRAME_SAMPLES,), (frame.shape, played.shape)
        self.mic = np.concatenate([self.mic[FRAME_SAMPLES:], frame])
        self.reference = np.concatenate([self.reference[FRAME_SAMPLES:], played])
        silent = energy(self.reference) < SILENT_REFERENCE * len(self.reference)
        if not self.config.enabled or silent:
            return EchoCheck(frame, 0.0, energy(self.mic), 0.0)
        delay, dots = self._delay()
        echo = self._fit(delay, dots)
        residual = self.mic - echo
        return EchoCheck(residual[-FRAME_SAMPLES:].astype(np.float32), energy(echo), energy(residual),
                         1000.0 * delay / MIC_RATE)

    def gate(self, prob: float, check: EchoCheck) -> float:
        """The speech probability to act on: zero when the frame is explained by the echo."""
        if check.echo_energy == 0.0:
            return prob
        return prob if check.residual_energy >= check.echo_energy * self.config.min_residual_ratio else 0.0

    def _delay(self) -> tuple[int, np.ndarray]:
        """Bulk delay (samples) maximising the normalised cross-correlation, and the correlation per lag.

        Returns `(delay, dots)` where dots[lag] is the dot product of the microphone window with the
        reference as it was `lag` samples earlier, for every lag a filter tap may use.
        """
        n = len(self.reference) + self.window
        size = 1 << (n - 1).bit_length()
        reference = self.reference.astype(np.float64)
        spectrum = np.fft.rfft(reference[::-1], size) * np.fft.rfft(self.mic.astype(np.float64), size)
        corr = np.fft.irfft(spectrum, size)
        lags = np.arange(self.max_delay + self.config.taps)
        dots = corr[self.window - 1 + lags]  # microphone . reference lagged by each lag
        squares = np.cumsum(np.concatenate([[0.0], reference ** 2]))
        ends = len(reference) - lags[: self.max_delay + 1]
        norms = squares[ends] - squares[ends - self.window] + SILENT_REFERENCE
        best = np.argmax(dots[: self.max_delay + 1] ** 2 / norms)
        return int(best), dots

    def _fit(self, delay: int, dots: np.ndarray) -> np.ndarray:
        """Least-squares FIR echo estimate over the fit window, taps starting a little before `delay`.

        The normal equations are built from lagged products and running sums rather than a matrix
        product: no multi-threaded BLAS call, which on a busy machine stalls against the engine's threads.
        """
        taps = self.config.taps
        first = max(0, delay - TAPS_BEFORE_PEAK)
        end = len(self.reference) - first
        span = self.reference[end - self.window - taps + 1:end].astype(np.float64)  # oldest lag first
        gram = np.empty((taps, taps))
        for d in range(taps):
            products = np.cumsum(np.concatenate([[0.0], span[d:] * span[: len(span) - d]]))
            sums = products[self.window:self.window + taps - d] - products[: taps - d]  # window starts v = 0..
            v = np.arange(taps - d)
            gram[taps - 1 - v - d, taps - 1 - v] = sums
            gram[taps - 1 - v, taps - 1 - v - d] = sums
        gram += RIDGE * np.trace(gram) / taps * np.eye(taps)
        weights = np.linalg.solve(gram, dots[first:first + taps])
        return np.convolve(span, weights, mode="valid").astype(np.float32)  # sum_i w_i * reference lagged first+i
