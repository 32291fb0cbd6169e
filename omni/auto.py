"""`mode="auto"`: the exact mode where this machine speaks it in real time with margin, else fast.

A GPU runs exact. On a CPU the choice rests on one measurement of the loaded model in exact mode (a
warm-up answer's decode steps and SNAC chunks), taken once per machine and checkpoint shape and kept
with the other measured choices (`omni.tuning.measured_once`): exact when one decode step plus the
SNAC work of its frame take at most REALTIME_SHARE of the audio that frame plays, fast otherwise.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from .audio import PCM_SAMPLE_WIDTH
from .codec import SAMPLES_PER_FRAME, SECONDS_PER_FRAME
from .config import ModelConfig
from .tuning import Overrides, measured_once

# Exact mode's share of each frame's playing time at most: the rest is margin for the encoder's turn, a
# second request in the batch and whatever else the machine is doing, so the audio never runs dry.
REALTIME_SHARE = 0.70
FORCED_REASON = "set explicitly, not auto"  # the reason of a mode the caller chose
# The --mode help of the commands (omni/cli.py, serving/cli.py, voice/cli.py); the modes are defined in
# runtime.py. Each command adds its default.
MODE_HELP = ("auto: exact on a GPU, and on a CPU where a measured exact decode step plus its audio decoding "
             f"takes at most {round(REALTIME_SHARE * 100)}%% of the audio it makes, else fast (measured once per "
             "machine and cached); exact: fp32, the official tokens; fast: on CPU, int8 weights for the linear "
             "layers and the embedding, several times faster, tokens differ from exact (on a GPU fast is exact); "
             "baseline: the official tokens at the official cost (full head on both rows, attention over the whole "
             "cache), kept to measure speed-ups against")


class Measured(Protocol):
    """What the measurement uses of an `OmniEngine` (which imports this module)."""

    last_timings: Any  # the engine's `Timings` of its latest answer

    def warmup(self) -> None: ...
    def warmup_question(self) -> dict[str, Any]: ...
    def stream(self, audio: Any = None, **kwargs: Any) -> Iterator[Any]: ...


@dataclass(frozen=True)
class ModeChoice:
    """The mode `auto` resolved to, and why (printed at load, reported by the server's /health)."""

    mode: str
    reason: str


def choose_mode(step_s: float, snac_frame_s: float) -> ModeChoice:
    """exact if a decode step plus SNAC per frame (seconds) fits in REALTIME_SHARE of a frame, else fast."""
    share = (step_s + snac_frame_s) / SECONDS_PER_FRAME
    why = (f"exact decode step {step_s * 1e3:.1f} ms + SNAC {snac_frame_s * 1e3:.1f} ms per frame = {share:.0%} "
           f"of a frame's {SECONDS_PER_FRAME * 1e3:.1f} ms of audio")
    if share <= REALTIME_SHARE:
        return ModeChoice("exact", f"{why}, within {REALTIME_SHARE:.0%}")
    return ModeChoice("fast", f"{why}, over {REALTIME_SHARE:.0%}")


def resolve_auto(device: torch.device, dtype: torch.dtype, config: ModelConfig, overrides: Overrides,
                 load_exact: Callable[[], Measured]) -> ModeChoice:
    """What `auto` means for a model of `config` on `device`; to measure, `load_exact()` loads the engine's
    models in exact mode (kept if exact is chosen) and returns the engine."""
    if device.type != "cpu":
        return ModeChoice("exact", f"a {device.type} device: auto is exact on a GPU, not measured")
    if dtype != torch.float32:
        return ModeChoice("exact", f"dtype {dtype}: fast mode quantizes fp32 weights")
    what = {"auto": asdict(config)}  # the checkpoint's shape; measured_once adds the CPU
    seconds = measured_once(what, lambda: measure_exact(load_exact()), overrides.cache)
    return choose_mode(seconds["step"], seconds["snac_frame"])


def measure_exact(engine: Measured) -> dict[str, float]:
    """Time a warm-up answer of `engine` (loaded in exact mode), after one that pays the first-call costs:
    the median decode step and SNAC's seconds per frame of audio (its chunks' time over their frames)."""
    engine.warmup()
    chunks = list(engine.stream(**engine.warmup_question()))
    frames = [len(chunk.pcm) / (PCM_SAMPLE_WIDTH * SAMPLES_PER_FRAME) for chunk in chunks]
    timings = engine.last_timings
    assert len(timings.snac) == sum(n > 0 for n in frames), (timings.snac, frames)  # one SNAC call per pcm chunk
    return {"step": statistics.median(timings.decode_steps), "snac_frame": sum(timings.snac) / sum(frames)}
