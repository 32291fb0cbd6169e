"""Sample rates, the frame the loop works in, the pcm <-> float pair, and a streaming resampler (pure numpy).

`pcm_to_float` / `float_to_pcm` are `omni`'s one conversion between int16 PCM bytes and float samples,
here beside the rates for the voice loop, the Realtime server, the WAV helpers and the tools.
"""
from __future__ import annotations

from math import gcd

import numpy as np

from omni import INPUT_SAMPLE_RATE, float_to_pcm, pcm_to_float  # noqa: F401 - the one pcm<->float pair, for the loop's users

MIC_RATE = INPUT_SAMPLE_RATE  # Hz: what the microphone delivers and Silero VAD and the engine read
FRAME_SAMPLES = 512  # samples per loop frame: Silero's window at 16 kHz
FRAME_SECONDS = FRAME_SAMPLES / MIC_RATE  # 32 ms
RESAMPLE_ZEROS = 16  # sinc zero crossings on each side of the low-pass kernel
RESAMPLE_CUTOFF = 0.9  # pass band as a fraction of the lower Nyquist frequency


def db_to_gain(db: float) -> float:
    return float(10.0 ** (db / 20.0))


def energy(x: np.ndarray) -> float:
    return float(np.dot(x, x))


class Resampler:
    """Polyphase rational resampler that keeps its state between calls, so a stream resamples in pieces.

    Upsample by `up`, low-pass with a Hann-windowed sinc, keep every `down`-th sample. Feeding the
    pieces one by one gives the same output as feeding their concatenation.
    """

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        if src_rate <= 0 or dst_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {src_rate} -> {dst_rate}")
        g = gcd(src_rate, dst_rate)
        self.up, self.down = dst_rate // g, src_rate // g
        cutoff = RESAMPLE_CUTOFF / max(self.up, self.down)  # in cycles per upsampled sample, times 2
        half = RESAMPLE_ZEROS * max(self.up, self.down)
        n = np.arange(-half, half + 1)
        self.kernel = (self.up * cutoff * np.sinc(cutoff * n) * np.hanning(2 * half + 1)).astype(np.float32)
        self.history = np.zeros(len(self.kernel) - 1, np.float32)  # upsampled input not yet fully used
        self.phase = 0  # index of the next kept output within the upsampled stream

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.up == self.down:
            return np.asarray(x, np.float32)
        stuffed = np.zeros(len(x) * self.up, np.float32)
        stuffed[:: self.up] = x
        full = np.concatenate([self.history, stuffed])
        filtered = np.convolve(full, self.kernel, mode="valid")  # one output per new upsampled sample
        kept = filtered[self.phase:: self.down]
        self.phase = (self.phase - len(filtered)) % self.down
        self.history = full[len(full) - len(self.history):]
        return kept
