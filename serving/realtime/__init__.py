"""`/v1/realtime`: the OpenAI Realtime protocol over a WebSocket, in small rooms.

protocol.py (the two dialects, the one event-name table, session settings and shapes), input.py (pcm16 24 kHz
-> 16 kHz -> speech segments), conversation.py (items), responses.py (the response lifecycle, turns taken by
`voice/turns.py`'s machine), session.py (a thin dispatcher over those, sharing context.py's `Context`;
synchronous and socket-free), jobs.py (what a session asks of the engine), transport.py (the WebSocket route).
"""
from .jobs import CancelFlag, Job, JobChunk, JobEnd
from .session import RealtimeSession

__all__ = ["CancelFlag", "Job", "JobChunk", "JobEnd", "RealtimeSession"]
