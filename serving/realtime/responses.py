"""Responses: their lifecycle from `response.created` to `response.done`, with turns taken by the shared turn
machine of `voice/turns.py` (the same one the desktop loop runs).

The server VAD's onset and end of speech, the client's `response.create`, the first audio delta and the
engine's end of an answer are the machine's events; its actions say when to cancel an answer (barge-in)
and when to answer a finished utterance: at once, or once the interrupted answer has stopped. An answer to
a turn that may be ending starts early, unannounced (`speculation.py`).
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from omni import PCM_SAMPLE_WIDTH, OmniChunk
from voice.turns import Action, Event, State, TurnMachine
from .context import Context, new_id
from .conversation import Conversation, Item
from .jobs import SPECULATION_DROPPED, Job, JobChunk, JobEnd
from .protocol import API_RATE, GA, ProtocolError, answer_part, render_response, response_options, usage
from .speculation import Speculation


@dataclass
class Response:
    id: str
    item: Item
    speaks: bool
    max_output_tokens: int | None
    job: Job
    audio_in: bool
    speech_end: float | None = None  # clock time of the end of speech that asked it (server VAD)
    first_audio: float | None = None


class Responses:
    """At most one response at a time; handlers of `response.create` / `response.cancel` and the engine's answers."""

    def __init__(self, ctx: Context, conversation: Conversation) -> None:
        self.ctx, self.conversation = ctx, conversation
        self.machine = TurnMachine()
        self.current: Response | None = None
        self.speech_end: float | None = None  # the end of the utterance the machine asks next
        self.question_id: str | None = None  # that utterance's user item: it is asked, or nothing is
        self.speculation: Speculation | None = None  # the answer started at a pause of the current speech

    # -- turns (the input buffer's server VAD) --------------------------------------------------------------------

    def speech_started(self) -> list[dict]:
        self.machine.barge_in = self.ctx.config.turn_detection.interrupt_response
        if Action.CANCEL in self.machine.handle(Event.ONSET):
            if self.ctx.metrics:
                self.ctx.metrics.barge_in()
            self._cancel("turn_detected")  # response.done follows once the engine has stopped
        return []

    def speech_stopped(self, item_id: str, speech_end: float) -> list[dict]:
        """The utterance is a user item now: answer it when the session says so and the floor is free."""
        if not self.ctx.config.turn_detection.create_response:
            self.machine.handle(Event.DROPPED)
            return []
        self.speech_end, self.question_id = speech_end, item_id
        return self._act(self.machine.handle(Event.END_OF_SPEECH))

    def speech_dropped(self) -> None:
        self.speech_resumed()
        self.machine.handle(Event.DROPPED)

    def speech_paused(self, spoken: np.ndarray) -> None:
        """Silence after speech: if it lasts, `spoken` is the turn's question, so its answer starts now, unheard
        (when the floor is free: no answer runs, and the turn will be answered)."""
        config = self.ctx.config
        if (not self.ctx.speculative or not config.turn_detection.create_response or self.current is not None
                or self.speculation is not None or self.machine.state is not State.USER_SPEAKING):
            return
        job = self._job(config.speaks, config.max_output_tokens, spoken, None, self.conversation.image())
        self.speculation = Speculation(job)
        self.ctx.submit(job)

    def speech_resumed(self) -> None:
        """The turn goes on (or is over without a question): the answer started at its pause is not its answer."""
        self._drop(self.speculation)
        self.speculation = None

    def hold(self, update: JobChunk | JobEnd) -> bool:
        """Keep the speculative answer's progress until it is the turn's answer; False: not its update."""
        if self.speculation is None or update.key != self.speculation.job.key:
            return False
        self.speculation.held.append(update)
        return True

    def _drop(self, speculation: Speculation | None) -> None:
        if speculation is None or speculation.used:
            return
        speculation.job.cancel.set(SPECULATION_DROPPED)
        self.ctx.jobs.pop(speculation.job.key, None)  # its end, even one already held, concerns no one now
        if self.ctx.metrics:
            self.ctx.metrics.speculative_turn("dropped")

    def _act(self, actions: list[Action]) -> list[dict]:
        ahead, self.speculation = self.speculation, None
        try:
            if Action.ASK not in actions:
                return []
            config = self.ctx.config
            try:
                return self._start(config.speaks, config.max_output_tokens, self.speech_end, self.question_id, ahead)
            except ProtocolError as e:  # its question was deleted while an earlier answer stopped
                self.machine.handle(Event.FINISHED)
                return [self.ctx.error(e.message, e.code, e.param)]
        finally:
            self._drop(ahead)  # unless it became the answer

    # -- client events ------------------------------------------------------------------------------------------

    def create(self, event: dict) -> list[dict]:
        if self.current is not None:
            raise ProtocolError(f"response {self.current.id} is still in progress: wait for its response.done or "
                                "cancel it", "conversation_already_has_active_response")
        speaks, limit = response_options(self.ctx.config, event.get("response"), self.ctx.dialect)
        self.speech_resumed()  # the client asks now: an answer to the speech under way would wait behind it
        out = self._start(speaks, limit, None)
        self.machine.handle(Event.ASKED)
        return out

    def cancel(self, event: dict) -> list[dict]:
        if self.current is None or event.get("response_id") not in (None, self.current.id):
            raise ProtocolError("there is no response in progress to cancel", "response_cancel_not_active")
        self._cancel("client_cancelled")
        return []

    def _cancel(self, reason: str) -> None:
        """Ask the engine to stop; `response.done` follows once it has (within one decode step)."""
        self.current.job.cancel.set(reason)

    @staticmethod
    def _job(speaks: bool, limit: int | None, audio: np.ndarray | None, text: str | None,
             image: bytes | None) -> Job:
        task = ("A1" if audio is not None else "T1") + ("A2" if speaks else "T2")
        return Job(new_id("resp"), "response", task, audio=audio, text=text,
                   image=image if audio is not None else None, max_output_tokens=limit)

    def _start(self, speaks: bool, limit: int | None, speech_end: float | None, question_id: str | None = None,
               ahead: Speculation | None = None) -> list[dict]:
        """Answer the user item `question_id` (a spoken turn's), or the latest user message (response.create);
        with the answer already started at the turn's pause (`ahead`) when it asks the same."""
        assert self.current is None, self.current.id
        question, image = self.conversation.question(question_id)
        audio_in = question.kind == "audio"
        job = self._job(speaks, limit, question.audio if audio_in else None, None if audio_in else question.text,
                        image)
        if ahead is not None and ahead.answers(job):
            ahead.used, job = True, ahead.job
            if self.ctx.metrics:
                self.ctx.metrics.speculative_turn("used")
        response_id = job.key
        item = Item(new_id("item"), "assistant", "answer", speaks=speaks, status="new")
        self.current = Response(response_id, item, speaks, limit, job, audio_in, speech_end)
        created = self.ctx.event("response.created", response=self._render("in_progress"))
        previous = self.conversation.last_id()
        self.conversation.items[item.id] = item
        out = [created, self.ctx.event("response.output_item.added", response_id=response_id, output_index=0,
                                       item=self.conversation.render(item))]
        out += self.conversation.added(item, previous)
        item.status = "in_progress"
        out.append(self._part_event("response.content_part.added", part=answer_part(speaks, self.ctx.dialect)))
        if ahead is None or not ahead.used:
            self.ctx.submit(job)
            return out
        for update in ahead.held:  # what the engine made meanwhile, now that the client knows the response
            out += self.on_chunk(update.chunk) if isinstance(update, JobChunk) else self.on_end(update)
        return out

    # -- the engine's answer ----------------------------------------------------------------------------------------

    def on_chunk(self, chunk: OmniChunk) -> list[dict]:
        response = self.current
        if response.job.cancel.is_set():  # the client no longer wants it: say nothing more
            return []
        out = []
        if chunk.pcm and response.speaks:
            if response.first_audio is None:
                self._first_audio(response)
            response.item.audio_ms += len(chunk.pcm) * 1000 // (PCM_SAMPLE_WIDTH * API_RATE)
            out.append(self._part_event("response.audio.delta", delta=base64.b64encode(chunk.pcm).decode()))
        if chunk.text:
            response.item.text += chunk.text
            name = "response.audio_transcript.delta" if response.speaks else "response.text.delta"
            out.append(self._part_event(name, delta=chunk.text))
        return out

    def _first_audio(self, response: Response) -> None:
        response.first_audio = self.ctx.clock()
        if response.speech_end is not None and self.ctx.metrics:
            self.ctx.metrics.first_audio(response.first_audio - response.speech_end)
        self.machine.handle(Event.FIRST_AUDIO)

    def on_end(self, end: JobEnd) -> list[dict]:
        """The engine is done with the answer: close the response, then give the floor to the next turn."""
        response, self.current = self.current, None
        self.ctx.jobs.pop(response.id, None)
        status, details = _outcome(response.job, end)
        item = response.item
        item.status = "completed" if status == "completed" else "incomplete"
        out = self._done_events(response)
        if self.ctx.dialect == GA:
            out.append(self.ctx.event("conversation.item.done", previous_item_id=None,
                                      item=self.conversation.render(item)))
        used = usage(end.prompt_tokens, end.steps, response.audio_in, response.speaks) if end.prompt_tokens else None
        out.append(self.ctx.event("response.done", response=self._render(status, details, used, response)))
        if self.ctx.metrics:
            self.ctx.metrics.response_done(status)
        actions = self.machine.handle(Event.STOPPED if status == "cancelled" else Event.FINISHED)
        return out if self.ctx.closed else out + self._act(actions)

    def _done_events(self, response: Response) -> list[dict]:
        item, speaks = response.item, response.speaks
        if speaks:
            out = [self._part_event("response.audio.done", response),
                   self._part_event("response.audio_transcript.done", response, transcript=item.text)]
        else:
            out = [self._part_event("response.text.done", response, text=item.text)]
        out.append(self._part_event("response.content_part.done", response,
                                    part=answer_part(speaks, self.ctx.dialect, item.text)))
        out.append(self.ctx.event("response.output_item.done", response_id=response.id, output_index=0,
                                  item=self.conversation.render(item)))
        return out

    # -- rendering ----------------------------------------------------------------------------------------------

    def _render(self, status: str, details: dict | None = None, usage_: dict | None = None,
                response: Response | None = None) -> dict:
        r = response or self.current
        output = [self.conversation.render(r.item)] if status != "in_progress" else []
        return render_response(self.ctx.dialect, r.id, status, r.speaks, r.max_output_tokens, output, details,
                               usage_, self.ctx.conversation_id)

    def _part_event(self, name: str, response: Response | None = None, **fields) -> dict:
        r = response or self.current
        return self.ctx.event(name, response_id=r.id, item_id=r.item.id, output_index=0, content_index=0, **fields)


def _outcome(job: Job, end: JobEnd) -> tuple[str, dict | None]:
    """A finished answer's response status and status_details."""
    if job.cancel.is_set():
        return "cancelled", {"type": "cancelled", "reason": job.cancel.reason}
    if end.status == "failed":
        return "failed", {"type": "failed", "error": {"type": "server_error", "code": "engine_error",
                                                      "message": end.error}}
    if end.hit_limit:
        return "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
    return end.status, None
