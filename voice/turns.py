"""The turn state machine: who has the floor, driven by speech events and the answer's progress.

No audio and no devices here: events in, actions out, so the desktop loop runs the same on files and devices,
and the Realtime server (`serving/realtime/responses.py`) takes its turns from the same machine.

    LISTENING --onset--> USER_SPEAKING --end--> THINKING --first audio--> SPEAKING --finished--> LISTENING
    THINKING / SPEAKING --onset--> INTERRUPTED (stop playback, cancel, take the new turn)
    INTERRUPTED --answer stopped--> USER_SPEAKING, or THINKING if the new utterance already ended

Two events come only from the server: ASKED, an answer the client asked for without a spoken turn
(LISTENING -> THINKING; while the user speaks, -> INTERRUPTED, the answer running under the new turn), and
DROPPED, a turn that ends without a question (its speech cleared, or not to be answered). With `barge_in`
off (the client's `interrupt_response: false`) an onset during an answer takes the new turn without
stopping the answer: INTERRUPTED then means "a new turn while an answer still runs", and the new question
is asked once that answer has ended.
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
    ASKED = "asked"  # an answer started without a spoken turn (the Realtime client's response.create)
    DROPPED = "dropped"  # the user's turn ends without a question: its speech was cleared or is not answered


class Action(Enum):
    TAKE_FRAME = "take frame"  # grab the camera's latest frame for this turn
    ASK = "ask"  # send the utterance (and frame) to the engine
    STOP_PLAYBACK = "stop playback"  # flush the sink and drop queued chunks
    CANCEL = "cancel"  # cancel the running generation


class NextTurn(Enum):
    """INTERRUPTED: where the user's new turn is while the earlier answer still runs."""

    SPEAKING = "speaking"  # the user is still talking
    ENDED = "ended"  # the utterance is complete: ask it once the answer has stopped
    NONE = "none"  # the turn was dropped: nothing to ask


class TurnMachine:
    """Events in, actions out. An event that does not apply in the current state is ignored."""

    def __init__(self, barge_in: bool = True) -> None:
        self.state = State.LISTENING
        self.barge_in = barge_in  # an onset during an answer stops it (False: the answer plays on)
        self.next_turn = NextTurn.NONE  # INTERRUPTED: the user's new turn, asked once the old answer stopped
        self.stopping = False  # the running answer has been cancelled

    def handle(self, event: Event) -> list[Action]:
        handler = getattr(self, f"_{self.state.name.lower()}")
        return handler(event)

    def _listening(self, event: Event) -> list[Action]:
        if event is Event.ONSET:
            self.state = State.USER_SPEAKING
            return [Action.TAKE_FRAME]
        if event is Event.ASKED:
            self.state = State.THINKING
        return []

    def _user_speaking(self, event: Event) -> list[Action]:
        if event is Event.END_OF_SPEECH:
            self.state = State.THINKING
            return [Action.ASK]
        if event is Event.DROPPED:
            self.state = State.LISTENING
        elif event is Event.ASKED:
            self.state, self.next_turn = State.INTERRUPTED, NextTurn.SPEAKING
        return []

    def _thinking(self, event: Event) -> list[Action]:
        if event is Event.FIRST_AUDIO:
            self.state = State.SPEAKING
            return []
        return self._answering(event)

    def _speaking(self, event: Event) -> list[Action]:
        return self._answering(event)

    def _answering(self, event: Event) -> list[Action]:
        if event in (Event.FINISHED, Event.STOPPED):  # STOPPED: the server's client cancelled the answer
            self.state, self.stopping = State.LISTENING, False
            return []
        if event is Event.ONSET:
            return self._interrupt()
        return []

    def _interrupt(self) -> list[Action]:
        """An onset while an answer runs: the new turn takes the floor; the answer stops, unless barge-in is off."""
        self.state, self.next_turn = State.INTERRUPTED, NextTurn.SPEAKING
        if not self.barge_in or self.stopping:
            return [Action.TAKE_FRAME]
        self.stopping = True
        return [Action.STOP_PLAYBACK, Action.CANCEL, Action.TAKE_FRAME]

    def _interrupted(self, event: Event) -> list[Action]:
        if event is Event.ONSET:  # the user talks on: the question is not complete yet
            return self._interrupt()
        if event is Event.END_OF_SPEECH:
            self.next_turn = NextTurn.ENDED
        elif event is Event.DROPPED:
            self.next_turn = NextTurn.NONE
        elif event in (Event.STOPPED, Event.FINISHED):
            return self._answer_ended()
        return []

    def _answer_ended(self) -> list[Action]:
        """The earlier answer is over: the floor goes to the user's new turn, as far as it has got."""
        next_turn, self.next_turn, self.stopping = self.next_turn, NextTurn.NONE, False
        if next_turn is NextTurn.ENDED:
            self.state = State.THINKING
            return [Action.ASK]
        self.state = State.USER_SPEAKING if next_turn is NextTurn.SPEAKING else State.LISTENING
        return []
