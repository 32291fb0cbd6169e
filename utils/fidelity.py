"""Teacher-forced fidelity: how closely a model follows a reference answer, stream by stream.

A developer's tool (bench.py --fidelity, the mode tests), not part of answering: it feeds a reference
answer's tokens and compares the model's next-token distributions with the reference's.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from omni.generate import SpeechDecoder, Step
from omni.model import OmniLM
from omni.tokens import EOT, N_AUDIO_LAYERS, PADDED_AUDIO_VOCAB, PADDED_TEXT_VOCAB


@torch.inference_mode()
def teacher_forced_agreement(model: OmniLM, prompt: torch.Tensor, decoder: SpeechDecoder,
                             steps: list[Step], audio_features: torch.Tensor | None = None) -> list[float]:
    """Feed a reference answer's tokens and report, per stream, how often this model's greedy pick
    matches the reference's next token (8 fractions; text counted up to the reference's EOT)."""
    return fidelity(model, prompt, decoder, steps, audio_features)["top1"]


@torch.inference_mode()
def teacher_forced_logits(model: OmniLM, prompt: torch.Tensor, decoder: SpeechDecoder, steps: list[Step],
                          audio_features: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Feed a reference answer's tokens; yield, per position, the `(7, 4160)` audio and `(152000,)`
    text logits this model gives before seeing that position's reference step."""
    B, _, T = prompt.shape
    cache = model.new_cache(B, T + len(steps))
    h = model(prompt, 0, audio_features, cache=cache)
    for i in range(len(steps)):
        if i:
            h = model(decoder.feedback(steps[i - 1], prompt.device), T + i - 1, cache=cache)
        logits = model.lm_head.rows(h[:, -1], decoder.parts)
        audio_row = logits[0][PADDED_TEXT_VOCAB:] if decoder.parts[0] == "all" else logits[0]
        yield audio_row.view(N_AUDIO_LAYERS, PADDED_AUDIO_VOCAB), logits[-1][:PADDED_TEXT_VOCAB]


def fidelity(model: OmniLM, prompt: torch.Tensor, decoder: SpeechDecoder, steps: list[Step],
             audio_features: torch.Tensor | None = None, reference: list | None = None) -> dict[str, list[float]]:
    """Teacher-forced agreement with a reference answer, per stream (7 audio layers, then text):
    `top1`, how often the greedy pick equals the reference token; with `reference` (the reference
    model's own logits, as `teacher_forced_logits` yields them), `kl`, the mean KL(reference || this).
    Text counts up to the reference's EOT."""
    n = N_AUDIO_LAYERS + 1
    hits, kl, counts = [0.0] * n, [0.0] * n, [0] * n
    text_open = True
    for i, (audio, text) in enumerate(teacher_forced_logits(model, prompt, decoder, steps, audio_features)):
        rows = [(layer, audio[layer], steps[i].audio[layer]) for layer in range(N_AUDIO_LAYERS)]
        if text_open:
            rows.append((n - 1, text, steps[i].text))
            text_open = steps[i].text != EOT
        for stream, row, ref in rows:
            hits[stream] += int(row.argmax()) == ref
            counts[stream] += 1
            if reference is not None:
                ref_row = reference[i][0][stream] if stream < N_AUDIO_LAYERS else reference[i][1]
                kl[stream] += float(torch.sum(ref_row.softmax(-1) * (ref_row.log_softmax(-1) - row.log_softmax(-1))))
    out = {"top1": [h / max(c, 1) for h, c in zip(hits, counts)]}
    if reference is not None:
        out["kl"] = [k / max(c, 1) for k, c in zip(kl, counts)]
    return out
