"""A spoken answer's PCM in the formats OpenAI clients ask for, encoded as the audio is made.

`pcm` and `wav` are written here; `mp3`, `opus` (in Ogg, as OpenAI sends it), `aac` (ADTS) and `flac` go
through one ffmpeg process per answer, fed chunk by chunk, its output passed on as soon as it comes out.
"""
from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator

from omni import OUTPUT_SAMPLE_RATE
from .formats import wav_header

# response_format -> ffmpeg's output container and encoder.
FFMPEG_FORMATS = {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus"), "aac": ("adts", "aac"),
                  "flac": ("flac", "flac")}
AUDIO_FORMATS = ("wav", "pcm", *FFMPEG_FORMATS)
MIMETYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
             "flac": "audio/flac"}
READ_BYTES = 64 * 1024  # one read of ffmpeg's output
ENCODER_TAIL_S = 30.0  # after the last sample, ffmpeg has this long to finish the file


class EncoderError(RuntimeError):
    """ffmpeg could not encode the answer (missing, or failed); the message says which format."""


def encode_audio(fmt: str, pcm: Iterator[bytes], whole: bool) -> Iterator[bytes]:
    """`pcm` (int16 LE mono 24 kHz chunks) as `fmt` bytes. `whole`: the answer goes out in one piece, so a
    WAV header can carry the true sizes; else the header says "unknown size" and the samples stream."""
    if fmt == "pcm":
        return pcm
    if fmt == "wav":
        return _wav_whole(pcm) if whole else _wav_stream(pcm)
    return _through_ffmpeg(fmt, pcm)


def _wav_whole(pcm: Iterator[bytes]) -> Iterator[bytes]:
    data = b"".join(pcm)
    yield wav_header(len(data)) + data


def _wav_stream(pcm: Iterator[bytes]) -> Iterator[bytes]:
    yield wav_header()
    yield from pcm


def _ffmpeg_command(fmt: str) -> list[str]:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise EncoderError(f"response_format {fmt!r} needs ffmpeg on the server; use 'wav' or 'pcm'")
    container, codec = FFMPEG_FORMATS[fmt]
    return [exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "1",
            "-f", "s16le", "-ar", str(OUTPUT_SAMPLE_RATE), "-ac", "1", "-i", "pipe:0",
            "-c:a", codec, "-f", container, "-flush_packets", "1", "pipe:1"]


def _through_ffmpeg(fmt: str, pcm: Iterator[bytes]) -> Iterator[bytes]:
    """The caller's thread feeds ffmpeg; a reader thread drains it, so neither pipe can fill and block."""
    proc = subprocess.Popen(_ffmpeg_command(fmt), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    reader = threading.Thread(target=_read_all, args=(proc.stdout.fileno(), out), daemon=True)
    reader.start()
    try:
        for data in pcm:
            proc.stdin.write(data)
            proc.stdin.flush()
            yield from _ready(out)
        proc.stdin.close()
        while (data := _tail(out, fmt)) is not None:
            yield data
        if proc.wait(timeout=ENCODER_TAIL_S) != 0:
            raise EncoderError(f"ffmpeg failed to encode {fmt} (exit status {proc.returncode})")
    except BrokenPipeError as e:
        raise EncoderError(f"ffmpeg stopped while encoding {fmt}") from e
    finally:
        if proc.poll() is None:  # the client left, or the answer failed: the encoder goes too
            proc.kill()
            proc.wait()
        reader.join(ENCODER_TAIL_S)
        proc.stdout.close()
        if not proc.stdin.closed:
            proc.stdin.close()


def _read_all(fd: int, out: queue.SimpleQueue) -> None:
    while data := os.read(fd, READ_BYTES):
        out.put(data)
    out.put(None)


def _ready(out: queue.SimpleQueue) -> Iterator[bytes]:
    """What ffmpeg has written so far, without waiting (its end marker is left for `_tail`)."""
    while True:
        try:
            data = out.get_nowait()
        except queue.Empty:
            return
        if data is None:
            out.put(None)
            return
        yield data


def _tail(out: queue.SimpleQueue, fmt: str) -> bytes | None:
    try:
        return out.get(timeout=ENCODER_TAIL_S)
    except queue.Empty as e:
        raise EncoderError(f"ffmpeg took over {ENCODER_TAIL_S:.0f} s to finish the {fmt} file") from e
