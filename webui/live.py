"""The hands-free page's relay: the browser's media from streamlit-webrtc to `/v1/realtime` and back.

streamlit-webrtc hands every microphone frame (Chromium sends 20 ms of 48 kHz stereo) and camera frame to
callbacks on aiortc's event loop thread. The relay resamples the audio to the protocol's 24 kHz mono pcm16
and queues it for the WebSocket without waiting; answer audio goes back through the `Conversation` into
the WebRTC stream's `PcmAudioSource` as each delta arrives. No Streamlit calls here: the page reads
`view()` from its own script runs.
"""
from __future__ import annotations

import io
import threading

import av

from serving.realtime.wire import API_RATE
from webui.realtime_client import Conversation, Playback, RealtimeConnection, TurnView, View, append_event

JPEG_QUALITY = 85


class Relay:
    """One browser session's live conversation; it outlives the page's reruns (kept in session state) and
    keeps the turns of earlier conversations when the user stops and starts again."""

    def __init__(self, url: str, session: dict, camera: bool, headers: dict[str, str] | None = None) -> None:
        self.url = url  # ws://host:port/v1/realtime
        self.session = session  # the session.update event sent first
        self.camera = camera
        self.headers = headers
        self._lock = threading.Lock()
        self._connection: RealtimeConnection | None = None
        self._conversation: Conversation | None = None
        self._past: tuple[TurnView, ...] = ()  # turns of conversations that ended
        self._resampler: av.AudioResampler | None = None
        self._frame: av.VideoFrame | None = None  # the camera's latest frame
        self.frames_in = 0  # microphone frames received since the conversation started (none: no media path)

    @property
    def running(self) -> bool:
        return self._connection is not None

    def start(self, playback: Playback) -> None:
        """Open the WebSocket (in the background) unless a conversation is open; one that the server ended (or
        never let start) is tried again, so the page's next run after a failure reconnects."""
        if self._conversation is not None and self._conversation.view().state == "closed":
            self.stop()
        with self._lock:
            if self._connection is not None:
                return
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=API_RATE)
            self.frames_in = 0
            conversation = Conversation(playback, self._send, self._take_frame if self.camera else None)
            self._conversation = conversation
            self._connection = RealtimeConnection(self.url, conversation.handle, conversation.closed, self.headers)
            self._connection.send(self.session)

    def stop(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._past += self._conversation.view().turns
            self._connection = self._conversation = None
            self.frames_in = 0

    def view(self) -> View | None:
        conversation = self._conversation
        if conversation is None:
            return View("stopped", self._past) if self._past else None
        now = conversation.view()
        return View(now.state, self._past + now.turns, now.error)

    def on_audio(self, frame: av.AudioFrame) -> None:
        """A microphone frame (aiortc's thread): to 24 kHz mono pcm16, then to the server."""
        self.frames_in += 1
        with self._lock:
            connection, resampler = self._connection, self._resampler
            if connection is None:
                return
            pcm = b"".join(out.to_ndarray().tobytes() for out in resampler.resample(frame))
        if pcm:
            connection.send(append_event(pcm))

    def on_video(self, frame: av.VideoFrame) -> None:
        self._frame = frame  # only the latest is kept: the one at speech start goes with the question

    def _send(self, event: dict) -> None:
        connection = self._connection
        if connection is not None:
            connection.send(event)

    def _take_frame(self) -> bytes | None:
        frame = self._frame
        if frame is None:
            return None
        out = io.BytesIO()
        frame.to_image().save(out, format="JPEG", quality=JPEG_QUALITY)
        return out.getvalue()
