"""Response encodings of a streamed answer. Each turns an iterator of events into body bytes.

- pcm: the official v1 stream, raw int16 LE mono 24 kHz PCM;
- wav: a WAV file with its true sizes, for downloads (`curl -o`): sent whole once the answer is complete;
- wav-stream: the same audio behind a streaming WAV header (sizes unknown, set to the maximum), for players;
- multipart: the official v2 layout (`boundary=frame`, an audio part then a text part per chunk);
- sse / ndjson: JSON events with the text delta and base64 audio per chunk, then a final event.
"""
from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from omni import OUTPUT_SAMPLE_RATE, PCM_SAMPLE_WIDTH, OmniChunk

CHANNELS = 1
BITS = 8 * PCM_SAMPLE_WIDTH
UNKNOWN_SIZE = 0xFFFFFFFF  # a streaming WAV's sizes are unknown: players read to the end
MULTIPART_BOUNDARY = "frame"


@dataclass(frozen=True)
class Summary:
    """The closing facts of an answer, sent as the last event where the format allows one."""

    outcome: str  # completed | cancelled | error
    text: str
    steps: int
    audio_seconds: float
    error: str | None = None


Event = OmniChunk | Summary


def wav_header(data_bytes: int | None = None) -> bytes:
    """A PCM WAV header for `data_bytes` of audio; None (a live stream) sets both sizes to the maximum."""
    byte_rate = OUTPUT_SAMPLE_RATE * CHANNELS * BITS // 8
    fmt = struct.pack("<HHIIHH", 1, CHANNELS, OUTPUT_SAMPLE_RATE, byte_rate, CHANNELS * BITS // 8, BITS)
    data_size = UNKNOWN_SIZE if data_bytes is None else data_bytes
    riff_size = UNKNOWN_SIZE if data_bytes is None else 4 + 8 + len(fmt) + 8 + data_bytes  # all after "RIFF" size
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", data_size))


def _pcm(events: Iterator[Event]) -> Iterator[bytes]:
    for event in events:
        if isinstance(event, OmniChunk) and event.pcm:
            yield event.pcm


def _wav_file(events: Iterator[Event]) -> Iterator[bytes]:
    # An HTTP body cannot be seeked back into to patch the sizes, and an answer is short: buffer it.
    pcm = b"".join(_pcm(events))
    yield wav_header(len(pcm)) + pcm


def _wav_stream(events: Iterator[Event]) -> Iterator[bytes]:
    yield wav_header()
    yield from _pcm(events)


def _multipart(events: Iterator[Event]) -> Iterator[bytes]:
    for event in events:
        if isinstance(event, OmniChunk):
            yield (f"\r\n--{MULTIPART_BOUNDARY}\r\nContent-Type: audio/wav\r\n\r\n".encode() + event.pcm
                   + f"\r\n--{MULTIPART_BOUNDARY}\r\nContent-Type: text/plain\r\n\r\n".encode() + event.text.encode())


def _json_events(events: Iterator[Event]) -> Iterator[tuple[str, dict]]:
    index = 0
    for event in events:
        if isinstance(event, OmniChunk):
            index += 1
            yield "chunk", {"index": index, "text": event.text, "steps": len(event.steps),
                            "audio": base64.b64encode(event.pcm).decode()}
        else:
            yield "done", {"done": True, **{k: v for k, v in vars(event).items() if v is not None}}


def _sse(events: Iterator[Event]) -> Iterator[bytes]:
    for name, data in _json_events(events):
        yield f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def _ndjson(events: Iterator[Event]) -> Iterator[bytes]:
    for _, data in _json_events(events):
        yield (json.dumps(data) + "\n").encode()


ENCODERS = {"pcm": _pcm, "wav": _wav_file, "wav-stream": _wav_stream, "multipart": _multipart, "sse": _sse, "ndjson": _ndjson}
# audio/L16 would be right for big-endian samples only, so the raw stream says what it is in headers.
MIMETYPES = {
    "pcm": "application/octet-stream",
    "wav": "audio/wav",
    "wav-stream": "audio/wav",
    "multipart": f"multipart/x-mixed-replace; boundary={MULTIPART_BOUNDARY}",
    "sse": "text/event-stream",
    "ndjson": "application/x-ndjson",
}
PCM_HEADERS = {"X-Sample-Rate": str(OUTPUT_SAMPLE_RATE), "X-Channels": str(CHANNELS), "X-Sample-Format": "s16le"}


def encode(fmt: str, events: Iterator[Event]) -> Iterator[bytes]:
    return ENCODERS[fmt](events)
