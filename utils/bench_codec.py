"""SNAC's decoders compared on one answer: streamed audio against the whole answer decoded at once.

    python -m utils.bench_codec [--ckpt-dir DIR] [--stride 4] [--rounds 5] [--json out.json]
    python bench.py --codec [--ckpt-dir DIR]      # the same, on bench.py's checkpoint

Per decoder: SNR of the streamed audio against the whole decode (overall, and within 20 ms of each join;
SNAC's noise blocks off on both sides, as its noise is random by design), SNAC seconds per second of
audio (noise on, as served; the decoders take turns for `--rounds` rounds and the median counts, so
a busy machine slows them alike), the first chunk's SNAC time, the decode step that first audio
leaves at, and the look-ahead. The answer is the official code's A1A2 token streams on the tiny
checkpoint (tests/golden), 130 frames: codes are codes to any SNAC 24 kHz decoder.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from omni.audio import OUTPUT_SAMPLE_RATE, pcm_to_float
from omni.checkpoint import SNAC_DIR
from omni.codec import LOOKAHEAD_FRAMES, SAMPLES_PER_FRAME, FrameScheduler, SnacCodec, streams_to_frames

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "official_tokens.json"
JOIN_WINDOW = OUTPUT_SAMPLE_RATE // 50  # 20 ms each side of a join
OVERLAP_FRAMES = 2  # the fallback's context on each side of a chunk: the receptive field (notes/snac-joins)
DEFAULT_STRIDE = 4
DEFAULT_ROUNDS = 5


def snr_db(got: np.ndarray, reference: np.ndarray) -> float:
    """10 log10(signal / error) of `got` against `reference`; inf where they are equal."""
    error = float(np.sum((got - reference) ** 2))
    return float("inf") if error == 0 else 10 * np.log10(float(np.sum(reference ** 2)) / error)


def join_window(joins: np.ndarray, length: int) -> np.ndarray:
    """The sample indices within `JOIN_WINDOW` of any join."""
    near = np.concatenate([np.arange(j - JOIN_WINDOW, j + JOIN_WINDOW) for j in joins]) if len(joins) else []
    return np.unique(np.clip(near, 0, length - 1)).astype(int)


class OverlapStream:
    """The fallback: each chunk decoded again with `OVERLAP_FRAMES` frames of context on each side, its middle
    kept. No state is carried, at (stride + 2 * context) / stride times the official compute."""

    def __init__(self, codec: SnacCodec, stride: int, noise: bool = True) -> None:
        self.codec, self.stride, self.noise = codec, stride, noise
        self.frames = FrameScheduler(1)
        self.seen: list = []
        self.sent = 0  # frames out

    def push(self, audio) -> bytes:
        self.seen += self.frames.push(audio)
        if len(self.seen) < self.sent + self.stride + OVERLAP_FRAMES:
            return b""
        return self._chunk(self.sent + self.stride)

    def flush(self) -> bytes:
        self.seen += self.frames.flush()
        return self._chunk(len(self.seen))

    def _chunk(self, end: int) -> bytes:
        start = max(0, self.sent - OVERLAP_FRAMES)
        pcm = self.codec.decode(self.seen[start: end + OVERLAP_FRAMES], noise=self.noise)
        skip = (self.sent - start) * SAMPLES_PER_FRAME * 2  # int16 bytes
        self.sent, count = end, (end - self.sent) * SAMPLES_PER_FRAME * 2
        return pcm[skip: skip + count]


DECODERS = {  # name -> (look-ahead in frames, a function making the stream)
    "official (each chunk alone)": (0, lambda c, s, noise: c.stream(s, joins="official", noise=noise)),
    f"overlap windows ({OVERLAP_FRAMES}+{OVERLAP_FRAMES} frames)": (OVERLAP_FRAMES, OverlapStream),
    f"gapless (default, 1st: {LOOKAHEAD_FRAMES})": (LOOKAHEAD_FRAMES, lambda c, s, noise: c.stream(s, noise=noise)),
    "gapless, all exact": (None, lambda c, s, noise: c.stream(s, noise=noise, lookahead=None)),
}


def answer_steps() -> list[tuple[int, ...]]:
    """The golden answer's per-step audio tokens (7 a step, staggered as the model makes them)."""
    streams = json.loads(GOLDEN.read_text())["checkpoints"]["tiny"]["streams"]["A1A2"]
    return list(zip(*streams[:7]))


def run(stream, steps: list) -> tuple[list[bytes], list[float], int]:
    """Stream an answer: its chunks, the SNAC time of each call that gave audio, and the first audio's step."""
    chunks, times, first = [], [], None
    for i, step in enumerate([*steps, None]):
        start = time.perf_counter()
        pcm = stream.push(step) if step is not None else stream.flush()
        if pcm:
            times.append(time.perf_counter() - start)
            chunks.append(pcm)
            first = i if first is None else first
    return chunks, times, first


def measure(codec: SnacCodec, stride: int = DEFAULT_STRIDE, rounds: int = DEFAULT_ROUNDS) -> list[dict]:
    """One row per decoder (see the module's docstring)."""
    steps = answer_steps()
    frames = streams_to_frames([list(s) for s in zip(*steps)])
    whole = pcm_to_float(codec.decode(frames, noise=False)).astype(np.float64)
    seconds = len(frames) * SAMPLES_PER_FRAME / OUTPUT_SAMPLE_RATE
    rows = []
    for name, (lookahead, make) in DECODERS.items():
        chunks, _, first = run(make(codec, stride, False), steps)
        got = pcm_to_float(b"".join(chunks)).astype(np.float64)
        near = join_window(np.cumsum([len(c) // 2 for c in chunks])[:-1], got.size)
        rows.append({"decoder": name, "snr_db": snr_db(got, whole), "snr_joins_db": snr_db(got[near], whole[near]),
                     "lookahead_frames": lookahead if lookahead is not None
                     else round(codec.streaming.lookahead / SAMPLES_PER_FRAME, 2),
                     "first_audio_step": first, "times": [], "first": []})
    for _ in range(rounds):  # the decoders take turns, so a load that comes and goes hits them alike
        for row, (lookahead, make) in zip(rows, DECODERS.values()):
            _, times, _ = run(make(codec, stride, True), steps)
            row["times"].append(sum(times) / seconds)
            row["first"].append(times[0])
    for row in rows:
        row["snac_s_per_audio_s"] = statistics.median(row.pop("times"))
        row["first_chunk_ms"] = 1000 * statistics.median(row.pop("first"))
    return rows


def print_table(rows: list[dict], stride: int) -> None:
    print(f"SNAC decoders, chunks of {stride} frames; SNR against the whole-answer decode (noise off)")
    heads = ("SNR dB", 8), ("at joins", 9), ("SNAC s/s", 9), ("1st chunk", 10), ("1st step", 9), ("look-ahead", 11)
    print(f"{'decoder':32} " + " ".join(f"{name:>{width}}" for name, width in heads))
    for r in rows:
        print(f"{r['decoder']:32} {r['snr_db']:8.1f} {r['snr_joins_db']:9.1f} {r['snac_s_per_audio_s']:9.4f} "
              f"{r['first_chunk_ms']:8.1f}ms {r['first_audio_step']:9d} {r['lookahead_frames']:>11}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt-dir", type=Path, help="a checkpoint with snac/ (default: a tiny random one, made once)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--stride", type=int, default=DEFAULT_STRIDE, help="frames per chunk")
    ap.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="timed turns per decoder; medians")
    ap.add_argument("--json", type=Path, help="write the rows here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    if args.ckpt_dir is None:
        from utils.make_checkpoint import make_checkpoint

        args.ckpt_dir = Path.home() / ".cache" / "mini-omni" / "bench-codec-tiny"
        if not (args.ckpt_dir / SNAC_DIR).is_dir():
            make_checkpoint(args.ckpt_dir, "tiny", seed=0)
    codec = SnacCodec.from_dir(args.ckpt_dir / SNAC_DIR, torch.device(args.device))
    rows = measure(codec, args.stride, args.rounds)
    print_table(rows, args.stride)
    print(json.dumps(rows, indent=2))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
