"""The Realtime protocol's wire facts that its clients share: audio format and the dialects' event names.

Standard library only, so the web pages (`webui/`) read the same table as the server without loading
the model's code.
"""
from __future__ import annotations

API_RATE = 24000  # Hz: the protocol's pcm16 audio, in and out (the model speaks at this rate too)
PCM16_WIDTH = 2  # bytes per pcm16 sample
GA_NAMES = {  # beta server event name -> GA name, where they differ
    "response.audio.delta": "response.output_audio.delta",
    "response.audio.done": "response.output_audio.done",
    "response.audio_transcript.delta": "response.output_audio_transcript.delta",
    "response.audio_transcript.done": "response.output_audio_transcript.done",
    "response.text.delta": "response.output_text.delta",
    "response.text.done": "response.output_text.done",
}
BETA_NAMES = {ga: beta for beta, ga in GA_NAMES.items()}  # GA server event name -> its beta name


def beta_name(name: str) -> str:
    """A server event's beta name, whichever dialect spelled it."""
    return BETA_NAMES.get(name, name)
