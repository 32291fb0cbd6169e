"""The `mini-omni` command (`python inference.py` in a checkout): answer a spoken (or written) question.

    python inference.py                                   # answer data/samples/*.wav with ./checkpoint
    python inference.py --ckpt-dir DIR --input q.wav      # the spoken answer goes to output/answer.wav
    python inference.py --task T1T2 --text "What is your name?" --dump-tokens output/tokens.json
    python inference.py --ckpt-dir DIR --input q.wav --image photo.jpg --out output/photo.wav   # Mini-Omni2

While it answers, a step counter (with the text so far) shows on a terminal's stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .audio import SAMPLES_DIR, write_wav
from .auto import MODE_HELP
from .checkpoint import FAMILIES
from .engine import OmniEngine
from .errors import OmniError
from .generate import to_streams
from .runtime import DEFAULT_MODE, MODE_NAMES
from .sampling import DEFAULT_MAX_TOKENS, DEFAULT_STREAM_STRIDE
from .tokens import Task

DEFAULT_OUT_DIR = Path("output")
DEFAULT_OUT = DEFAULT_OUT_DIR / "answer.wav"  # where a spoken answer goes without --out
PROGRESS_TEXT_CHARS = 40  # the tail of the answer text shown beside the step counter


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Mini-Omni: answer a question with speech and text.")
    p.add_argument("--ckpt-dir", default="checkpoint", help="checkpoint directory (downloaded if it does not exist)")
    p.add_argument("--task", default="A1A2", type=str.upper, choices=[t.value for t in Task],
                   help="A1A2 speech->speech (default), A1T2 speech->text, ASR, T1A2 text->speech, T1T2 text->text")
    p.add_argument("--input", help="question audio file (any format ffmpeg reads)")
    p.add_argument("--text", help="question text for T1A2 / T1T2")
    p.add_argument("--image", help="a picture the spoken question is about (Mini-Omni2 checkpoints, task A1A2)")
    p.add_argument("--family", choices=FAMILIES,
                   help="which model to download when --ckpt-dir does not exist (default: mini-omni2 with --image)")
    p.add_argument("--out", help=f"where to write the spoken answer (.wav, 24 kHz; default {DEFAULT_OUT})")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="prompt + answer positions (official max_returned_tokens)")
    p.add_argument("--stream-stride", type=int, default=DEFAULT_STREAM_STRIDE, help="SNAC frames per streamed chunk")
    p.add_argument("--first-stride", type=int, help="frames in the first chunk (smaller: audio starts sooner)")
    p.add_argument("--dump-tokens", help='write {"streams": [s0..s7]} (the sampled tokens per stream) to this JSON file')
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--mode", default=DEFAULT_MODE, choices=MODE_NAMES,
                   help=f"{MODE_HELP}. Default {DEFAULT_MODE}: offline, with nothing to keep up with, it keeps exact")
    args = p.parse_args(argv)
    task = Task(args.task)
    if args.input and args.text:
        p.error("give --input (audio question) or --text (text question), not both")
    if args.text and task.audio_in:
        p.error(f"--text needs a text-input task (T1A2 or T1T2), not {task.value}")
    if args.input and not task.audio_in:
        p.error(f"--input needs an audio-input task (A1A2, A1T2, ASR), not {task.value}")
    if not task.audio_in and not args.text:
        p.error(f"task {task.value} needs --text")
    if args.out and not task.speaks:
        p.error(f"task {task.value} answers in text only; drop --out")
    if args.image and (task != Task.A1A2 or not args.input):
        p.error("--image goes with a spoken question: --input q.wav and task A1A2")
    args.family = args.family or ("mini-omni2" if args.image else "mini-omni")
    return args


def answer(engine: OmniEngine, args: argparse.Namespace, audio: str | None, out: Path | None) -> None:
    """Stream one answer with a step counter, report the first chunk's latency, and write the requested files."""
    start = time.perf_counter()
    first, pcm, text, steps = None, [], [], []
    chunks = engine.stream(audio, text=args.text, task=args.task, image=args.image, max_tokens=args.max_tokens,
                           stream_stride=args.stream_stride, first_stride=args.first_stride)
    # disable=None: the counter shows on a terminal only, so piped output stays plain.
    with tqdm(desc="answering", unit="step", disable=None, leave=False) as progress:
        for chunk in chunks:
            if first is None and (chunk.pcm or chunk.text):
                first = time.perf_counter() - start
            pcm.append(chunk.pcm)
            text.append(chunk.text)
            steps.extend(chunk.steps)
            progress.update(len(chunk.steps))
            progress.set_postfix_str("".join(text)[-PROGRESS_TEXT_CHARS:].replace("\n", " "), refresh=False)
    total = time.perf_counter() - start
    audio_s = len(b"".join(pcm)) / 2 / engine.sample_rate
    print(f"answer: {''.join(text).strip()!r}")
    print(f"first chunk {first or 0:.2f} s, total {total:.2f} s, {len(steps)} steps, {audio_s:.2f} s of audio")
    if out is not None:
        print(f"wrote {write_wav(out, b''.join(pcm), engine.sample_rate)}")
    if args.dump_tokens:
        Path(args.dump_tokens).write_text(json.dumps({"streams": to_streams(steps)}))
        print(f"wrote {args.dump_tokens}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (OmniError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> None:
    samples = [] if args.input or args.text else sorted(SAMPLES_DIR.glob("*.wav"))
    if not (args.input or args.text or samples):
        raise FileNotFoundError(f"no question given and no bundled samples in {SAMPLES_DIR}: pass --input or --text")
    engine = OmniEngine(args.ckpt_dir, device=args.device, mode=args.mode, family=args.family)
    print(f"loaded {engine.family} from {args.ckpt_dir} on {engine.device} ({engine.dtype}, {engine.mode} mode)")
    if args.input or args.text:
        speaks = Task(args.task).speaks
        answer(engine, args, args.input, Path(args.out or DEFAULT_OUT) if speaks else None)
        return
    for sample in samples:  # no question given: answer the bundled samples
        print(f"question: {sample.name}")
        answer(engine, args, str(sample), DEFAULT_OUT_DIR / sample.name if Task(args.task).speaks else None)


if __name__ == "__main__":
    sys.exit(main())
