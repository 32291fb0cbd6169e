"""Text to speech through Mini-Omni's audio tokens and the SNAC decoder, step by step.

    python demo_snac_token_decode.py "What a lovely day."          # T1A2, text in, speech out: output/speech.wav
    python demo_snac_token_decode.py --tokens output/t.json -o output/t.wav   # decode a --dump-tokens file

Each decode step emits 7 audio tokens, one per SNAC layer, staggered: layer j starts j + 1 steps
after the text. Frame k takes layer j's token from step k + j + 1; its 7 tokens are SNAC's codes
in depth-first order (level 0: [t0], level 1: [t1, t4], level 2: [t2, t3, t5, t6]); each frame
decodes to 2,048 samples at 24 kHz.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from omni import (
    AUDIO_CODES, DEFAULT_MAX_TOKENS, DEFAULT_STREAM_STRIDE, EOA, LEVEL_OF_SLOT, N_AUDIO_LAYERS, N_LEVELS,
    OUTPUT_SAMPLE_RATE, SAMPLES_PER_FRAME, Frame, GenerationConfig, OmniEngine, OmniError, SnacCodec, Task,
    frames_to_codes, frames_to_streams, resolve_device, snac_dir, streams_to_frames, to_streams,
)
from omni import write_wav

SHOWN_FRAMES = 3  # frames printed in the walk-through


def speak(text: str, args: argparse.Namespace) -> tuple[list[list[int]], bytes]:
    """Answer `text` with task T1A2, showing progress: the 8 token streams and the engine's audio."""
    engine = OmniEngine(args.ckpt_dir, device=args.device)
    steps, pcm = [], []
    with tqdm(desc="decode steps", unit="step") as bar:
        for chunk in engine.stream(text=text, task=Task.T1A2, max_tokens=args.max_tokens):
            steps.extend(chunk.steps)
            pcm.append(chunk.pcm)
            bar.update(len(chunk.steps))
    return to_streams(steps), b"".join(pcm)


def explain(streams: list[list[int]], frames: list[Frame]) -> None:
    """Print how the first frames are gathered from the staggered streams and split into SNAC levels."""
    print(f"{len(streams[0])} decode steps x 7 audio streams -> {len(frames)} complete frames "
          f"(layer j is read from step k + j + 1)")
    for k, frame in enumerate(frames[:SHOWN_FRAMES]):
        gathered = ", ".join(f"L{j}[{k + j + 1}]={code}" for j, code in enumerate(frame))
        levels = [[code for slot, code in enumerate(frame) if LEVEL_OF_SLOT[slot] == level] for level in range(N_LEVELS)]
        print(f"  frame {k}: {gathered}\n           -> SNAC level 0 {levels[0]}, level 1 {levels[1]}, level 2 {levels[2]}")
    shapes = [tuple(c.shape) for c in frames_to_codes(frames)]
    specials = sum(code >= AUDIO_CODES for frame in frames for code in frame)
    print(f"SNAC codes per level: {shapes}; {specials} special tokens inside frames (decoded as code 0)")


def decode(frames: list[Frame], args: argparse.Namespace) -> bytes:
    """SNAC-decode the frames step by step in chunks of the default stream stride, as the engine streams them.
    SNAC's decoder adds noise; seeded as the engine seeds a request's (from the request's seed), a greedy
    answer's dump decodes to that answer's audio."""
    codec = SnacCodec.from_dir(snac_dir(Path(args.ckpt_dir)), resolve_device(args.device))
    stream = codec.stream(DEFAULT_STREAM_STRIDE, noise_seed=GenerationConfig().seed)
    steps = list(zip(*frames_to_streams(frames, fill=EOA)))  # the stagger the model made them in
    return b"".join([stream.push(step) for step in tqdm(steps, desc="SNAC decode", unit="step")] + [stream.flush()])


def read_dump(path: str) -> list[list[int]]:
    try:
        streams = json.loads(Path(path).read_text())["streams"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a --dump-tokens file ({{\"streams\": [s0, ..., s7]}}): {e}") from e
    if len(streams) < N_AUDIO_LAYERS or not all(isinstance(t, int) for s in streams for t in s):
        raise ValueError(f"{path}: expected at least 7 lists of integer tokens")
    return streams


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Text to speech through Mini-Omni's SNAC tokens.")
    p.add_argument("text", nargs="?", help="what to say (task T1A2)")
    p.add_argument("--tokens", help="decode this --dump-tokens JSON file instead of generating")
    p.add_argument("-o", "--out", default="output/speech.wav", help="the wav to write (24 kHz mono)")
    p.add_argument("--ckpt-dir", default="checkpoint", help="checkpoint directory (--tokens needs only its snac/)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="prompt + answer positions")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    args = p.parse_args(argv)
    if (args.text is None) == (args.tokens is None):
        p.error("give the text to speak or --tokens FILE (one of them)")
    if args.tokens and not Path(args.ckpt_dir).is_dir():  # else SNAC would be fetched from the hub, unasked
        p.error(f"--tokens decodes with the SNAC of a checkpoint: no directory {args.ckpt_dir!r}; give the one "
                "the tokens came from with --ckpt-dir DIR")
    try:
        streams, pcm = (read_dump(args.tokens), None) if args.tokens else speak(args.text, args)
        frames = streams_to_frames(streams[:N_AUDIO_LAYERS])
        if not frames:
            raise ValueError(f"the streams hold no complete frame (it takes more than {N_AUDIO_LAYERS} steps)")
        explain(streams, frames)
        pcm = pcm if pcm is not None else decode(frames, args)
    except (OmniError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = write_wav(Path(args.out), pcm, OUTPUT_SAMPLE_RATE)
    print(f"wrote {out}: {len(pcm) // 2 / OUTPUT_SAMPLE_RATE:.2f} s ({len(pcm) // 2 // SAMPLES_PER_FRAME} frames)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
