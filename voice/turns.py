"""The turn state machine: who has the floor, driven by speech events and the answer's progress.

No audio and no devices here: events in, actions out, so the loop runs the same on files and devices.

    LISTENING --onset--> USER_SPEAKING --end--> THINKING --first audio--> SPEAKING --finished--> LISTENING
    THINKING / SPEAKING --onset--> INTERRUPTED (stop playback, cancel, take the new turn)
    INTERRUPTED --answer stopped--> USER_SPEAKING, or THINKING if the new utterance already ended
"""
from __future__ import annotations

from enum import Enum


class State(Enum):
    LISTENING = "listening"
    USER_SPEAKING = "user speaking"
    THINKING = "thinking"
    SPEAKING = "speaking"
    INTERRUPTED = "interrupted"


class Event(Enum):
    ONSET = "onset"  # the user's speech is confirmed
    END_OF_SPEECH = "end of speech"  # the user's utterance is complete
    FIRST_AUDIO = "first audio"  # the answer's first audio went to the sink
    FINISHED = "finished"  # the answer is generated and played out
    STOPPED = "stopped"  # a cancelled answer's generation has ended


class Action(Enum):
    TAKE_FRAME = "take frame"  # grab the camera's latest frame for this turn
    ASK = "ask"  # send the utterance (and frame) to the engine
    STOP_PLAYBACK = "stop playback"  # flush the sink and drop queued chunks
    CANCEL = "cancel"  # cancel the running generation


class TurnMachine:
    """Events in, actions out. An event that does not apply in the current state is ignored."""

    def __init__(self) -> None:
        self.state = State.LISTENING
        self.pending_question = False  # INTERRUPTED: the new utterance ended before the old answer stopped

    def handle(self, event: Event) -> list[Action]:
        handler = getattr(self, f"_{self.state.name.lower()}")
        return handler(event)

    def _listening(self, event: Event) -> list[Action]:
        if event is Event.ONSET:
            self.state = State.USER_SPEAKING
            return [Action.TAKE_FRAME]
        return []

    def _user_speaking(self, event: Event) -> list[Action]:
        if event is Event.END_OF_SPEECH:
            self.state = State.THINKING
            return [Action.ASK]
        return []

    def _thinking(self, event: Event) -> list[Action]:
        if event is Event.FIRST_AUDIO:
            self.state = State.SPEAKING
            return []
        return self._answering(event)

    def _speaking(self, event: Event) -> list[Action]:
        return self._answering(event)

    def _answering(self, event: Event) -> list[Action]:
        if event is Event.FINISHED:
            self.state = State.LISTENING
            return []
        if event is Event.ONSET:
            self.state = State.INTERRUPTED
            return [Action.STOP_PLAYBACK, Action.CANCEL, Action.TAKE_FRAME]
        return []

    def _interrupted(self, event: Event) -> list[Action]:
        if event is Event.END_OF_SPEECH:
            self.pending_question = True
            return []
        if event in (Event.STOPPED, Event.FINISHED):
            asked, self.pending_question = self.pending_question, False
            self.state = State.THINKING if asked else State.USER_SPEAKING
            return [Action.ASK] if asked else []
        return []
