"""Token ids, stream layout and prompt builders (docs/model.md §3, §4).

Convention used everywhere: a token tensor is `[B, 8, T]`; streams 0-6 are the seven SNAC
audio layers and stream 7 is the text stream. All eight streams index one shared embedding
table, so audio ids are shifted into their layer's slice of the vocabulary (`audio_id`).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from tokenizers import Tokenizer

# Text side: Qwen2's 151,936 ids plus 64 specials -> 152,000 text logits.
TEXT_VOCAB = 151936
TEXT_SPECIALS = 64
PADDED_TEXT_VOCAB = TEXT_VOCAB + TEXT_SPECIALS
EOT = TEXT_VOCAB  # end of text
PAD_T = TEXT_VOCAB + 1
INPUT_T = TEXT_VOCAB + 2
ANSWER_T = TEXT_VOCAB + 3
ASR_T = TEXT_VOCAB + 4

# Audio side (local ids within one layer): 4,096 SNAC codes plus 64 specials -> 4,160 per layer.
AUDIO_CODES = 4096
AUDIO_SPECIALS = 64
PADDED_AUDIO_VOCAB = AUDIO_CODES + AUDIO_SPECIALS
EOA = AUDIO_CODES  # end of audio
PAD_A = AUDIO_CODES + 1
INPUT_A = AUDIO_CODES + 2
ANSWER_A = AUDIO_CODES + 3
IMAGE = AUDIO_CODES + 5  # Mini-Omni2: opens the image span of the audio rows
EOIMAGE = AUDIO_CODES + 6  # Mini-Omni2: closes it

N_AUDIO_LAYERS = 7
N_STREAMS = N_AUDIO_LAYERS + 1
TEXT_STREAM = N_AUDIO_LAYERS
PADDED_VOCAB = PADDED_TEXT_VOCAB + N_AUDIO_LAYERS * PADDED_AUDIO_VOCAB  # 181,120 rows
# The layer whose EOA ends an answer: it starts last in the 7-layer stagger (docs/model.md §6).
STOP_LAYER = N_AUDIO_LAYERS - 1
# A prompt is its body (audio frames or text ids) plus these many framing tokens.
PROMPT_EXTRA = 3
# Whisper features replace the audio-stream embeddings from this position on (after INPUT_A).
AUDIO_FEATURE_START = 1
# Mini-Omni2 image questions: CLIP's 50 tokens (class + 7 x 7 patches) fill positions 1..50,
# between IMAGE and EOIMAGE.
IMAGE_TOKENS = 50
IMAGE_FEATURE_START = 1
# ...and the Whisper features start at 52, not 53: the official code overwrites INPUT_A (at 52) and
# leaves the last audio PAD_A a plain embedding (docs/model.md §8). Reproduced, since the weights learned it.
IMAGE_AUDIO_FEATURE_START = IMAGE_FEATURE_START + IMAGE_TOKENS + 1
# An image prompt is its audio frames plus these many tokens (IMAGE, 50 pads, EOIMAGE, INPUT_A, EOA, last).
IMAGE_PROMPT_EXTRA = IMAGE_TOKENS + 5


def audio_id(local: int, layer: int) -> int:
    """Global embedding row of local audio id `local` (0..4159) in SNAC layer `layer` (0..6)."""
    return PADDED_TEXT_VOCAB + layer * PADDED_AUDIO_VOCAB + local


def audio_logit_slice(layer: int) -> slice:
    """The columns of the shared head that score layer `layer`'s local audio ids."""
    start = PADDED_TEXT_VOCAB + layer * PADDED_AUDIO_VOCAB
    return slice(start, start + PADDED_AUDIO_VOCAB)


class Task(str, Enum):
    """What goes in (A1 = audio, T1 = text) and what comes out (A2 = speech and text, T2 = text)."""

    A1A2 = "A1A2"
    A1T2 = "A1T2"
    T1A2 = "T1A2"
    T1T2 = "T1T2"
    ASR = "ASR"

    @property
    def audio_in(self) -> bool:
        return self in (Task.A1A2, Task.A1T2, Task.ASR)

    @property
    def speaks(self) -> bool:
        return self in (Task.A1A2, Task.T1A2)


@dataclass(frozen=True)
class PromptSpec:
    """The two tokens that close a prompt; they tell the model which task to perform."""

    audio_last: int
    text_last: int


PROMPTS: dict[Task, PromptSpec] = {
    Task.A1A2: PromptSpec(ANSWER_A, ANSWER_T),
    Task.A1T2: PromptSpec(PAD_A, ANSWER_T),
    Task.ASR: PromptSpec(PAD_A, ASR_T),
    Task.T1A2: PromptSpec(ANSWER_A, ANSWER_T),
    Task.T1T2: PromptSpec(PAD_A, ANSWER_T),
}


def build_prompt(task: Task, n_audio_frames: int = 0, text_ids: list[int] | None = None) -> torch.Tensor:
    """One prompt as `[8, T]` global ids (docs/model.md §4).

    Audio input: audio rows `INPUT_A, PAD_A x L, EOA, last`, text row `INPUT_T, PAD_T x L, EOT, last`
    (T = L + 3). Text input: audio rows `PAD_A x (N + 2), last`, text row `INPUT_T, ids, EOT, last`.
    """
    spec = PROMPTS[task]
    if task.audio_in:
        if n_audio_frames <= 0:
            raise ValueError(f"task {task.value} needs audio features, got {n_audio_frames} frames")
        audio = [INPUT_A] + [PAD_A] * n_audio_frames + [EOA, spec.audio_last]
        text = [INPUT_T] + [PAD_T] * n_audio_frames + [EOT, spec.text_last]
    else:
        if not text_ids:
            raise ValueError(f"task {task.value} needs a non-empty text prompt")
        audio = [PAD_A] * (len(text_ids) + 2) + [spec.audio_last]
        text = [INPUT_T] + list(text_ids) + [EOT, spec.text_last]
    rows = [[audio_id(a, layer) for a in audio] for layer in range(N_AUDIO_LAYERS)]
    return torch.tensor(rows + [text], dtype=torch.long)


def build_image_prompt(task: Task, n_audio_frames: int) -> torch.Tensor:
    """One Mini-Omni2 image + audio prompt as `[8, L + 55]` global ids (docs/model.md §4).

    Audio rows `IMAGE, PAD_A x 50, EOIMAGE, INPUT_A, PAD_A x L, EOA, last`; the text row is
    `PAD_T x (L + 54), ANSWER_T` (no INPUT_T / EOT). Rows exist for A1A2 (last ANSWER_A) and
    A1T2 (last PAD_A), the two rows of the official batch.
    """
    if task not in (Task.A1A2, Task.A1T2):
        raise ValueError(f"image prompts exist for A1A2 and A1T2 only, not {task.value}")
    if n_audio_frames <= 0:
        raise ValueError(f"an image question needs audio features, got {n_audio_frames} frames")
    audio = ([IMAGE] + [PAD_A] * IMAGE_TOKENS + [EOIMAGE, INPUT_A] + [PAD_A] * n_audio_frames
             + [EOA, PROMPTS[task].audio_last])
    text = [PAD_T] * (len(audio) - 1) + [ANSWER_T]
    rows = [[audio_id(a, layer) for a in audio] for layer in range(N_AUDIO_LAYERS)]
    return torch.tensor(rows + [text], dtype=torch.long)


REPLACEMENT_CHAR = "\ufffd"  # what a byte-level BPE decode shows for a cut UTF-8 sequence


class TextStream:
    """Turns text ids into deltas, holding back a delta that ends inside a UTF-8 sequence."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.ended = False
        self.shown = ""

    def push(self, token: int) -> None:
        if token == EOT:
            self.ended = True
        elif not self.ended:
            self.ids.append(token)

    def delta(self, final: bool = False) -> str:
        text = self.tokenizer.decode(self.ids)
        if (text.endswith(REPLACEMENT_CHAR) and not final) or not text.startswith(self.shown):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new
