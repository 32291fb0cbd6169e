"""Speculative turn ends: a spoken turn's answer starts when the server VAD first hears silence after speech,
not once the whole `silence_duration_ms` has passed.

The committed utterance ends with the first frame of the silence that ends it (`voice.vad.Segment`), so at
that frame the audio the turn will commit is already known. The answer starts then, unannounced: the engine's
chunks are held here. If the silence lasts, the turn ends as it always does and this answer becomes its
response (announced then, its held chunks sent after the announcement), when it asks exactly what a fresh
answer would (same audio, image, task and limit). If speech resumes first, the answer is cancelled and the
client hears nothing of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .jobs import Job, JobChunk, JobEnd


@dataclass
class Speculation:
    job: Job  # submitted: the engine works on it while the silence goes on
    held: list[JobChunk | JobEnd] = field(default_factory=list)  # its progress, unsent
    used: bool = False  # it became the turn's answer

    def answers(self, fresh: Job) -> bool:
        """Whether this answer is the one `fresh` asks for: the same question, and not failed (a refused
        speculation, e.g. a full queue, is started again the ordinary way)."""
        mine = self.job
        failed = any(isinstance(u, JobEnd) and u.status == "failed" for u in self.held)
        return (not failed and (mine.task, mine.text, mine.image, mine.max_output_tokens) ==
                (fresh.task, fresh.text, fresh.image, fresh.max_output_tokens)
                and mine.audio is not None and fresh.audio is not None and np.array_equal(mine.audio, fresh.audio))
