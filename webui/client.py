"""The web pages' HTTP client of `server.py`: ask a question, read the streamed answer, say what went wrong.

The pages hold no HTTP code of their own. `OmniClient.ask()` posts the official JSON body and reads the
`ndjson` format (text and audio together, one event per chunk); every failure becomes a `ServerError`
whose message is written for the person using the page.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field

import requests

from serving.security import API_KEY_ENV

DEFAULT_SERVER_URL = "http://127.0.0.1:60808"
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 300  # longest wait between two chunks: a first chunk on a slow CPU can take a while
HEALTH_TIMEOUT_S = 5
SAMPLE_WIDTH = 2  # bytes per int16 sample of the answer's PCM


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every page passes through to the server."""
    parser.add_argument("--server-url", default=DEFAULT_SERVER_URL, help="where `python server.py` listens")
    # The answer's length alone (the server's max_new_tokens, Realtime's max_output_tokens), so a long question
    # is never refused for leaving no room; --max-tokens is the older name, with this meaning on every page.
    parser.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, metavar="N",
                        help="the answer's length at most, in decode steps; the question does not count (default: "
                             "as long as the model allows after the question). --max-tokens is the same option")
    parser.add_argument("--first-stride", type=int, help="a smaller first chunk, so the answer starts sooner")


def server_options(args: argparse.Namespace) -> dict[str, int]:
    """The `ask()` options set on the command line."""
    given = {"max_new_tokens": args.max_new_tokens, "first_stride": args.first_stride}
    return {name: value for name, value in given.items() if value is not None}


class ServerError(Exception):
    """Something the page shows as it is: why the question got no (complete) answer."""


@dataclass(frozen=True)
class Health:
    status: str  # ready | loading | failed
    can_see: bool  # the model takes an image with the question (Mini-Omni2)


@dataclass(frozen=True)
class Chunk:
    pcm: bytes  # int16 LE mono
    text: str  # the transcript's next piece (may be empty)
    sample_rate: int  # Hz, from the response's X-Sample-Rate header


@dataclass
class Answer:
    """One answer as it streams in: its audio and transcript so far, and when they came."""

    sample_rate: int | None = None  # Hz, known from the first chunk
    pcm: bytearray = field(default_factory=bytearray)
    text: str = ""
    first_audio_s: float | None = None  # from sending the question to its first audio
    total_s: float | None = None  # from sending the question to the answer's end
    started: float = field(default_factory=time.monotonic)

    def add(self, chunk: Chunk) -> None:
        if chunk.pcm and self.first_audio_s is None:
            self.first_audio_s = time.monotonic() - self.started
        self.sample_rate = chunk.sample_rate
        self.pcm += chunk.pcm
        self.text += chunk.text

    def finish(self) -> None:
        self.total_s = time.monotonic() - self.started

    @property
    def seconds(self) -> float:
        return len(self.pcm) / SAMPLE_WIDTH / self.sample_rate if self.sample_rate else 0.0

    def wav(self) -> bytes:
        return wav_bytes(bytes(self.pcm), self.sample_rate)

    def timing(self) -> str:
        first = "-" if self.first_audio_s is None else f"{self.first_audio_s:.2f} s"
        total = "…" if self.total_s is None else f"{self.total_s:.2f} s"
        return f"first audio after {first} · total {total} · {self.seconds:.2f} s of speech"


def wav_bytes(pcm: bytes, sample_rate: int) -> bytes:
    """int16 LE mono PCM as the bytes of a complete WAV file."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(SAMPLE_WIDTH)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return out.getvalue()


def _error_text(resp: requests.Response) -> str:
    try:
        return resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return resp.text.strip() or resp.reason


def _refusal(resp: requests.Response) -> ServerError:
    reason = _error_text(resp)
    if resp.status_code == 503:
        wait = resp.headers.get("Retry-After", "a few")
        return ServerError(f"The server is busy ({reason}). Try again in {wait} s.")
    if 400 <= resp.status_code < 500:
        return ServerError(f"The server refused the question: {reason}")
    return ServerError(f"The server failed (HTTP {resp.status_code}): {reason}")


class OmniClient:
    """`server.py` at `url`, as the pages use it."""

    def __init__(self, url: str = DEFAULT_SERVER_URL, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        api_key = api_key or os.environ.get(API_KEY_ENV)  # a server started with --api-key needs it
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _unreachable(self, e: requests.RequestException) -> ServerError:
        if isinstance(e, requests.Timeout):
            return ServerError(f"The server at {self.url} did not answer in time.")
        if isinstance(e, requests.ConnectionError):
            return ServerError(f"Cannot reach the server at {self.url}: is `python server.py` running?")
        return ServerError(f"Talking to the server at {self.url} failed: {e}")

    def health(self) -> Health:
        try:
            resp = requests.get(f"{self.url}/health", timeout=HEALTH_TIMEOUT_S)
            body = resp.json()
        except requests.RequestException as e:
            raise self._unreachable(e) from e
        except ValueError as e:
            raise ServerError(f"{self.url} does not look like the Mini-Omni server (no JSON /health).") from e
        return Health(body.get("status", "unknown"), bool(body.get("can_see", False)))

    def ask(self, audio: bytes, image: bytes | None = None, **options: int) -> Iterator[Chunk]:
        """Send a question (the bytes of an audio file, optionally an image) and yield the answer's chunks.

        `options` are the server's `stream_stride`, `first_stride` and `max_new_tokens` (or `max_tokens`).
        Raises `ServerError` before the first chunk (refused, busy, unreachable) or during the answer.
        """
        body = {"audio": base64.b64encode(audio).decode(), **options}
        if image is not None:
            body["image"] = base64.b64encode(image).decode()
        try:
            with requests.post(f"{self.url}/chat?format=ndjson", json=body, stream=True, headers=self.headers,
                               timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as resp:
                if resp.status_code != 200:
                    raise _refusal(resp)
                yield from _events(resp)
        except requests.RequestException as e:
            raise self._unreachable(e) from e


def _events(resp: requests.Response) -> Iterator[Chunk]:
    sample_rate = int(resp.headers["X-Sample-Rate"])
    for line in resp.iter_lines():
        if not line:
            continue
        event = json.loads(line)
        if not event.get("done"):
            yield Chunk(base64.b64decode(event["audio"]), event["text"], sample_rate)
        elif event["outcome"] != "completed":
            raise ServerError(f"The answer stopped early ({event['outcome']}): {event.get('error', 'no reason given')}")
        else:
            return
    raise ServerError("The connection to the server closed before the answer ended.")
