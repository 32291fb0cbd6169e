"""Answer a spoken (or written) question from the command line, or drop in for the official class.

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
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from omni import (
    DEFAULT_MAX_TOKENS, DEFAULT_STREAM_STRIDE, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, EOA, EOT, FAMILIES,
    OFFICIAL_JOINS, PAD_T, to_streams,
)
from omni_engine import DEFAULT_MODE, MODE_HELP, MODE_NAMES, OmniEngine, OmniError, Task

from utils.audio_io import write_wav

SAMPLES_DIR = Path(__file__).parent / "data" / "samples"
SAMPLE_QUESTION = str(SAMPLES_DIR / "output1.wav")
SAMPLE_IMAGE = str(SAMPLES_DIR / "image1.jpg")
DEFAULT_OUT_DIR = Path("output")
DEFAULT_OUT = DEFAULT_OUT_DIR / "answer.wav"  # where a spoken answer goes without --out
PROGRESS_TEXT_CHARS = 40  # the tail of the answer text shown beside the step counter


class OmniInference:
    """The official `OmniInference` interface over `OmniEngine`, for code written against it: its chunks are
    decoded one by one (joins="official"), so it gives the official bytes.

    Unlike the official class, `device` defaults to "auto" (CUDA when available, else CPU).
    """

    def __init__(self, ckpt_dir: str = "./checkpoint", device: str = "auto") -> None:
        self.engine = OmniEngine(ckpt_dir, device=device)

    def warm_up(self, sample: str = SAMPLE_QUESTION) -> None:
        for _ in self.run_AT_batch_stream(sample):
            pass

    def run_AT_batch_stream(self, audio_path: str, stream_stride: int = DEFAULT_STREAM_STRIDE,
                            max_returned_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = DEFAULT_TEMPERATURE,
                            top_k: int = DEFAULT_TOP_K, top_p: float = DEFAULT_TOP_P,
                            eos_id_a: int = EOA, eos_id_t: int = EOT) -> Iterator[bytes]:
        """Yield the spoken answer to `audio_path` as int16 LE 24 kHz PCM chunks (16,384 bytes at stride 4)."""
        if (eos_id_a, eos_id_t) != (EOA, EOT):
            raise ValueError(f"only the model's own stop ids are supported (eos_id_a={EOA}, eos_id_t={EOT})")
        for chunk in self.engine.stream(audio_path, stream_stride=stream_stride, max_tokens=max_returned_tokens,
                                        temperature=temperature, top_k=top_k, top_p=top_p, joins=OFFICIAL_JOINS):
            if chunk.pcm:
                yield chunk.pcm


class OmniVisionInference(OmniInference):
    """The official Mini-Omni2 `OmniVisionInference` interface: spoken questions about an image.

    As in the official v2 code, the streams yield `(pcm_bytes, text_delta)` and can save the answer.
    """

    def __init__(self, ckpt_dir: str = "./checkpoint", device: str = "auto") -> None:
        self.engine = OmniEngine(ckpt_dir, device=device, family="mini-omni2")

    def warm_up(self, audio_sample: str = SAMPLE_QUESTION, image_sample: str = SAMPLE_IMAGE) -> None:
        for _ in self.run_vision_AA_batch_stream(audio_sample, image_sample, warm_up=True):
            pass

    def run_AT_batch_stream(self, audio_path: str, stream_stride: int = DEFAULT_STREAM_STRIDE,
                            max_returned_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = DEFAULT_TEMPERATURE,
                            top_k: int = DEFAULT_TOP_K, top_p: float = DEFAULT_TOP_P, eos_id_a: int = EOA,
                            eos_id_t: int = EOT, save_path: str | None = None) -> Iterator[tuple[bytes, str]]:
        """The spoken answer to `audio_path` as `(pcm, text_delta)` chunks; the whole answer to `save_path`."""
        yield from self._stream(audio_path, None, stream_stride, max_returned_tokens, temperature, top_k, top_p,
                                (eos_id_a, eos_id_t), save_path, False)

    def run_vision_AA_batch_stream(self, audio_path: str, image_path: str, stream_stride: int = DEFAULT_STREAM_STRIDE,
                                   max_returned_tokens: int = DEFAULT_MAX_TOKENS,
                                   temperature: float = DEFAULT_TEMPERATURE, top_k: int = DEFAULT_TOP_K,
                                   top_p: float = DEFAULT_TOP_P, eos_id_a: int = EOA, eos_id_t: int = EOT,
                                   pad_id: int = PAD_T, save_path: str | None = None,
                                   warm_up: bool = False) -> Iterator[tuple[bytes, str]]:
        """The spoken answer to a question about `image_path`, as `(pcm, text_delta)` chunks.

        `warm_up` stops after the first chunk, as the official warm-up does."""
        if pad_id != PAD_T:
            raise ValueError(f"only the model's own text pad id is supported (pad_id={PAD_T})")
        yield from self._stream(audio_path, image_path, stream_stride, max_returned_tokens, temperature, top_k, top_p,
                                (eos_id_a, eos_id_t), save_path, warm_up)

    def _stream(self, audio_path: str, image_path: str | None, stream_stride: int, max_tokens: int,
                temperature: float, top_k: int, top_p: float, stop_ids: tuple[int, int], save_path: str | None,
                first_only: bool) -> Iterator[tuple[bytes, str]]:
        if stop_ids != (EOA, EOT):
            raise ValueError(f"only the model's own stop ids are supported (eos_id_a={EOA}, eos_id_t={EOT})")
        pcm = []
        for chunk in self.engine.stream(audio_path, image=image_path, stream_stride=stream_stride,
                                        max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                        joins=OFFICIAL_JOINS):
            pcm.append(chunk.pcm)
            yield chunk.pcm, chunk.text
            if first_only and chunk.pcm:
                break
        if save_path is not None:
            write_wav(Path(save_path), b"".join(pcm), self.engine.sample_rate)


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
