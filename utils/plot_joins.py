"""Draw docs/joins.png: one answer's audio around three chunk joins, official chunks against gapless streaming.

    python -m utils.plot_joins [--ckpt-dir DIR] [--out docs/joins.png]

Top row: the waveform within a few ms of each join, both decoders over the whole-answer decode; middle and
bottom rows: spectrograms around the same joins (a click shows as a vertical line). SNAC's noise blocks
are off so that the decoders differ only in how they join. Without --ckpt-dir the tiny random checkpoint
decodes the golden answer (random weights: the audio is noise, but its joins behave as real speech's do).
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from omni.audio import OUTPUT_SAMPLE_RATE, pcm_to_float
from omni.checkpoint import SNAC_DIR
from omni.codec import SAMPLES_PER_FRAME, SnacCodec, streams_to_frames
from utils.bench_codec import answer_steps, join_window, snr_db

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "joins.png"
STRIDE = 4  # frames per chunk, the engine's default
JOINS_SHOWN = (3, 8, 14)  # which joins (chunk boundaries) to draw
WAVE_MS = 3  # waveform half-width around a join
SPEC_MS = 120  # spectrogram half-width around a join
FFT = 256  # spectrogram window (10.7 ms) and its hop, in samples
HOP = 64
DPI = 80
SIZE_IN = (9.6, 5.6)
PALETTE = 96  # colours kept in the PNG: a small file for the README


def decode_all(codec: SnacCodec) -> dict[str, np.ndarray]:
    """The answer decoded whole, in official chunks and gapless, noise off: float samples in [-1, 1)."""
    steps = answer_steps()
    frames = streams_to_frames([list(s) for s in zip(*steps)])
    out = {"whole": codec.decode(frames, noise=False)}
    for joins in ("official", "gapless"):
        stream = codec.stream(STRIDE, joins=joins, noise=False)
        out[joins] = b"".join([stream.push(step) for step in steps] + [stream.flush()])
    return {name: pcm_to_float(pcm).astype(np.float64) for name, pcm in out.items()}


def draw(audio: dict[str, np.ndarray], out: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    joins = [j * STRIDE * SAMPLES_PER_FRAME for j in JOINS_SHOWN]
    fig, axes = plt.subplots(3, len(joins), figsize=SIZE_IN, dpi=DPI, sharey="row")
    wave_half, spec_half = OUTPUT_SAMPLE_RATE * WAVE_MS // 1000, OUTPUT_SAMPLE_RATE * SPEC_MS // 1000
    all_joins = np.arange(STRIDE * SAMPLES_PER_FRAME, audio["whole"].size, STRIDE * SAMPLES_PER_FRAME)
    near = join_window(all_joins, audio["whole"].size)
    snr = {k: snr_db(audio[k][near], audio["whole"][near]) for k in ("official", "gapless")}
    for col, join in enumerate(joins):
        span = np.arange(join - wave_half, join + wave_half)
        ms = (span - join) * 1000 / OUTPUT_SAMPLE_RATE
        ax = axes[0, col]
        ax.plot(ms, audio["whole"][span], color="0.6", lw=3, label="whole answer")
        ax.plot(ms, audio["official"][span], color="tab:red", lw=1, label="official chunks")
        ax.plot(ms, audio["gapless"][span], color="tab:blue", lw=1, ls="--", label="gapless")
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(f"join at {join / OUTPUT_SAMPLE_RATE:.2f} s", fontsize=9)
        ax.set_xlabel("ms from the join", fontsize=8)
        for row, name in ((1, "official"), (2, "gapless")):
            segment = audio[name][join - spec_half: join + spec_half]
            axes[row, col].specgram(segment, NFFT=FFT, noverlap=FFT - HOP, Fs=OUTPUT_SAMPLE_RATE, cmap="magma",
                                    xextent=(-SPEC_MS, SPEC_MS), vmin=-120)
            axes[row, col].set_xlabel("ms from the join", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="lower left")
    axes[0, 0].set_ylabel("waveform", fontsize=8)
    axes[1, 0].set_ylabel(f"official: Hz\n{snr['official']:.0f} dB at joins", fontsize=8)
    axes[2, 0].set_ylabel(f"gapless: Hz\n{snr['gapless']:.0f} dB at joins", fontsize=8)
    for ax in axes.flat:
        ax.tick_params(labelsize=7)
    fig.suptitle(f"Chunk joins, official against gapless ({label})", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas = io.BytesIO()
    fig.savefig(canvas, dpi=DPI)
    Image.open(canvas).convert("RGB").quantize(PALETTE).save(out, optimize=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt-dir", type=Path, help="a checkpoint with snac/ (default: the tiny random one)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--label", default="tiny random checkpoint", help="what decoded the answer, for the title")
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise SystemExit("plot_joins needs matplotlib: pip install -r requirements.txt") from e
    if args.ckpt_dir is None:
        from utils.make_checkpoint import make_checkpoint

        args.ckpt_dir = Path.home() / ".cache" / "mini-omni" / "bench-codec-tiny"
        if not (args.ckpt_dir / SNAC_DIR).is_dir():
            make_checkpoint(args.ckpt_dir, "tiny", seed=0)
    codec = SnacCodec.from_dir(args.ckpt_dir / SNAC_DIR, torch.device("cpu"))
    draw(decode_all(codec), args.out, args.label)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
