"""The conversation's items: what the client adds, truncates, deletes and reads back, and what each response
answers (the latest user message, with the latest image when the checkpoint can see).

Mini-Omni has no multi-turn context, so earlier turns are kept for the client but do not reach the model.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from voice.signal import MIC_RATE
from .context import Context, new_id
from .input import MAX_BUFFER_S, to_model_rate
from .jobs import Job, JobEnd
from .protocol import API_RATE, GA, ProtocolError, answer_part, decode_b64

MAX_TRANSCRIPT_TOKENS = 256  # decode steps of a transcription (30 s of speech is well under 150 words)
MAX_ITEMS = 256  # conversation items kept; older ones are forgotten (the model does not read them)
# Characters of text in one message, checked before anything tokenizes it: the model reads at most 2049
# positions (about 8,000 characters of English), so a longer question could not be answered anyway.
MAX_TEXT_CHARS = 8192
# Bytes of user audio (float32 16 kHz: 1.9 MB per 30 s) and images one session keeps; its text is bounded by
# MAX_TEXT_CHARS x MAX_ITEMS. Past it the oldest audio goes first, then the oldest images: the items stay listed
# (id, transcript); the bytes mattered only to a later answer about those old items (the model reads no history).
MAX_KEPT_BYTES = 32 * 1024 * 1024
IMAGE_DATA_PREFIX = "data:"


@dataclass
class Item:
    id: str
    role: str  # user | assistant
    kind: str  # audio | text | image | answer
    audio: np.ndarray | None = None  # float32 16 kHz, user audio
    text: str = ""  # user text, or the transcript of user audio
    image: bytes | None = None
    speaks: bool = True  # answers: audio (+ transcript) or text
    status: str = "completed"
    audio_ms: int = 0  # answers: milliseconds of audio sent
    has_image: bool = False  # listed with an input_image part, also once the image is dropped (MAX_KEPT_BYTES)

    @property
    def kept_bytes(self) -> int:
        return (self.audio.nbytes if self.audio is not None else 0) + (len(self.image) if self.image else 0)


class Conversation:
    """The items in order, oldest first; handlers of the `conversation.item.*` client events."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.items: OrderedDict[str, Item] = OrderedDict()

    def last_id(self) -> str | None:
        return next(reversed(self.items), None)

    def add(self, item: Item) -> list[dict]:
        """Append `item`; a user's audio is transcribed too when the session asks for it."""
        previous = self.last_id()
        self.items[item.id] = item
        while len(self.items) > MAX_ITEMS:
            self.items.popitem(last=False)
        self._drop_oldest_media(item)
        out = self.added(item, previous)
        if item.kind == "audio" and self.ctx.config.transcribe:
            self.ctx.submit(Job(item.id, "transcription", "ASR", audio=item.audio,
                                max_output_tokens=MAX_TRANSCRIPT_TOKENS))
        return out

    def _drop_oldest_media(self, newest: Item) -> None:
        """Audio first, then images, oldest first, until the session keeps at most MAX_KEPT_BYTES."""
        kept = sum(item.kept_bytes for item in self.items.values())
        for field in ("audio", "image"):
            for item in self.items.values():
                if kept <= MAX_KEPT_BYTES:
                    return
                if item is not newest and getattr(item, field) is not None:
                    kept -= item.kept_bytes
                    setattr(item, field, None)
                    kept += item.kept_bytes

    def add_audio(self, item_id: str, audio: np.ndarray) -> list[dict]:
        """The input buffer's committed audio (float32 16 kHz) as a user item."""
        out = [self.ctx.event("input_audio_buffer.committed", previous_item_id=self.last_id(), item_id=item_id)]
        return out + self.add(Item(item_id, "user", "audio", audio=audio))

    def added(self, item: Item, previous: str | None) -> list[dict]:
        ctx = self.ctx
        if ctx.dialect == GA:
            added = ctx.event("conversation.item.added", previous_item_id=previous, item=self.render(item))
            if item.role == "assistant":  # its conversation.item.done comes with response.output_item.done
                return [added]
            return [added, ctx.event("conversation.item.done", previous_item_id=previous, item=self.render(item))]
        return [ctx.event("conversation.item.created", previous_item_id=previous, item=self.render(item))]

    def render(self, item: Item) -> dict:
        if item.role == "assistant":
            content = [answer_part(item.speaks, self.ctx.dialect, item.text, in_item=True)] \
                if item.status != "new" else []
        else:  # audio and image data are not sent back (as the protocol does with audio)
            content = [{"type": "input_audio", "transcript": item.text or None}] if item.kind == "audio" else \
                [{"type": "input_text", "text": item.text}] if item.text else []
            content += [{"type": "input_image"}] if item.has_image else []
        status = "in_progress" if item.status == "new" else item.status
        return {"id": item.id, "object": "realtime.item", "type": "message", "status": status, "role": item.role,
                "content": content}

    def question(self, item_id: str | None = None) -> tuple[Item, bytes | None]:
        """The user message a response answers (`item_id`, else the latest), and the image it is asked about."""
        items = list(reversed(self.items.values()))
        if item_id is not None and item_id not in self.items:  # never an older message in its place
            raise ProtocolError(f"the turn's question (item {item_id}) was deleted before its answer could start: "
                                "nothing is answered", "item_not_found", "item_id")
        question = self.items[item_id] if item_id is not None else \
            next((i for i in items if i.role == "user" and i.kind in ("audio", "text")), None)
        if question is None:
            raise ProtocolError("there is no user message to answer: commit audio or create a message first",
                                "no_user_message")
        if question.kind == "audio" and question.audio is None:
            raise ProtocolError(f"the audio of item {question.id} was dropped to keep the session's audio and images "
                                f"under {MAX_KEPT_BYTES} bytes (MAX_KEPT_BYTES): ask about a newer one",
                                "item_audio_dropped", "item_id")
        return question, self.image()

    def image(self) -> bytes | None:
        """The latest image: what a spoken question is asked about (on a checkpoint that sees)."""
        return next((i.image for i in reversed(self.items.values()) if i.image is not None), None)

    # -- client events ------------------------------------------------------------------------------------------

    def create(self, event: dict) -> list[dict]:
        item = event.get("item")
        if not isinstance(item, dict):
            raise ProtocolError("conversation.item.create needs an 'item' object", "missing_required_parameter", "item")
        if item.get("type", "message") != "message" or item.get("role") not in ("user", "system"):
            raise ProtocolError("only user messages are accepted (type 'message', role 'user'); this model has no "
                                "tools or instructions", param="item.role")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise ProtocolError("a message needs 'content': a list of parts", "missing_required_parameter",
                                "item.content")
        parts = [self._user_part(p, f"item.content[{i}]") for i, p in enumerate(content)]
        chars = sum(len(value) for kind, value in parts if kind == "text")
        if chars > MAX_TEXT_CHARS:  # refused before anything tokenizes it
            raise ProtocolError(f"the message's text has {chars} characters; a message holds at most "
                                f"{MAX_TEXT_CHARS} (MAX_TEXT_CHARS), more than the model can read", "text_too_long",
                                "item.content")
        item_id = item.get("id") if isinstance(item.get("id"), str) and item["id"] else new_id("item")
        if item_id in self.items:
            raise ProtocolError(f"an item with id {item_id!r} already exists", "item_already_exists", "item.id")
        return self.add(_merge(Item(item_id, item["role"], "text"), parts))

    def _user_part(self, part: Any, param: str) -> tuple[str, Any]:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_text" and isinstance(part.get("text"), str):
            return "text", part["text"]
        if kind == "input_audio" and isinstance(part.get("audio"), str):
            pcm = decode_b64(part["audio"], f"{param}.audio")
            if len(pcm) % 2 or len(pcm) // 2 > MAX_BUFFER_S * API_RATE:
                raise ProtocolError(f"{param}.audio must be pcm16 {API_RATE // 1000} kHz mono of at most "
                                    f"{MAX_BUFFER_S:.0f} s", param=f"{param}.audio")
            return "audio", to_model_rate(pcm)
        if kind == "input_image":
            return "image", self._image(part, param)
        raise ProtocolError(f"{param} must be an input_text part with 'text', an input_audio part with 'audio' "
                            f"or an input_image part with 'image_url'", param=param)

    def _image(self, part: dict, param: str) -> bytes:
        if not self.ctx.can_see:
            raise ProtocolError("this checkpoint cannot see (Mini-Omni v1): image parts need a Mini-Omni2 "
                                "checkpoint", "image_input_not_supported", param)
        url = part.get("image_url")
        if not isinstance(url, str) or not url.startswith(IMAGE_DATA_PREFIX) or ";base64," not in url:
            raise ProtocolError(f"{param}.image_url must be a data URL: data:image/jpeg;base64,...",
                                param=f"{param}.image_url")
        return decode_b64(url.split(";base64,", 1)[1], f"{param}.image_url")

    def truncate(self, event: dict) -> list[dict]:
        item = self._find(event.get("item_id"))
        ms = event.get("audio_end_ms")
        if item.role != "assistant" or not item.speaks:
            raise ProtocolError("only assistant audio can be truncated", param="item_id")
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
            raise ProtocolError("audio_end_ms must be an integer >= 0", param="audio_end_ms")
        if event.get("content_index", 0) != 0:  # the event echoes a literal 0, never what the client sent
            raise ProtocolError("content_index must be 0: an answer has one content part", param="content_index")
        if ms > item.audio_ms:
            raise ProtocolError(f"audio_end_ms {ms} is beyond the item's {item.audio_ms} ms of audio",
                                param="audio_end_ms")
        item.audio_ms = ms
        if self.ctx.metrics:
            self.ctx.metrics.truncated()
        return [self.ctx.event("conversation.item.truncated", item_id=item.id,
                               content_index=0, audio_end_ms=ms)]

    def delete(self, event: dict) -> list[dict]:
        item = self._find(event.get("item_id"))
        del self.items[item.id]
        return [self.ctx.event("conversation.item.deleted", item_id=item.id)]

    def retrieve(self, event: dict) -> list[dict]:
        item = self._find(event.get("item_id"))
        return [self.ctx.event("conversation.item.retrieved", item=self.render(item))]

    def _find(self, item_id: Any) -> Item:
        if not isinstance(item_id, str) or item_id not in self.items:
            raise ProtocolError(f"no item with id {item_id!r} in the conversation", "item_not_found", "item_id")
        return self.items[item_id]

    # -- the engine ---------------------------------------------------------------------------------------------

    def transcribed(self, end: JobEnd) -> list[dict]:
        """A user item's transcription has ended."""
        if end.status == "cancelled":
            return []
        if end.status != "completed":
            return [self.ctx.event("conversation.item.input_audio_transcription.failed", item_id=end.key,
                                   content_index=0, error={"type": "transcription_error", "code": "engine_error",
                                                           "message": end.error})]
        item = self.items.get(end.key)
        if item is not None:
            item.text = end.text.strip()
        seconds = round(len(item.audio) / MIC_RATE, 3) if item is not None and item.audio is not None else 0.0
        return [self.ctx.event("conversation.item.input_audio_transcription.completed", item_id=end.key,
                               content_index=0, transcript=end.text.strip(),
                               usage={"type": "duration", "seconds": seconds})]


def _merge(merged: Item, parts: list[tuple[str, Any]]) -> Item:
    """A user message's parts as one item (a system message is kept, not read: the model takes no instructions)."""
    for kind, value in parts:
        if kind == "audio":
            merged.kind, merged.audio = "audio", value
        elif kind == "text":
            merged.text = (merged.text + " " + value).strip()
        else:
            merged.image, merged.has_image = value, True
    if merged.audio is None and not merged.text:
        merged.kind = "image"
    return merged
