"""Batch invariance: a request's logits are bit-identical alone or in any company, at any place in a batch.

Each formulation this machine offers is forced in turn (its block still measured); the logits of a
decode step are compared bitwise, not only the tokens (a changed sum rarely changes a greedy token).
"""
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from omni.audio import load_audio
from omni.generate import Sequence, decode_step
from omni.model import Segment
from omni.sampling import GenerationConfig
from omni.tokens import Task
from omni.tuning import available_formulations
from omni_engine import OmniEngine

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = json.loads((Path(__file__).parent / "golden" / "official_tokens.json").read_text())
MAX_TOKENS = 400
STEPS = 6  # decode positions compared per test
# The company: requests of every task, with prompts of different lengths (audio cut to different lengths).
COMPANY = [("A1A2", 1.0), ("T1A2", "Tell me a story."), ("A1T2", 0.6), ("T1T2", "Hi"), ("ASR", 0.8),
           ("A1A2", 0.5), ("T1A2", "What is the weather like on the moon today?"), ("A1A2", 0.8)]


def formulations() -> list[str]:
    return [f for f in available_formulations() if f != "f32rows"] + (
        ["f32rows"] if "f32rows" in available_formulations() else [])


@pytest.fixture(scope="module", params=formulations())
def forced_engine(request, tiny_ckpt):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINI_OMNI_PRODUCTS", request.param)
        yield OmniEngine(tiny_ckpt, device="cpu")


def new_sequence(engine: OmniEngine, task: str, what, seed: int) -> Sequence:
    """A prefilled request: `what` is the text question, or how much of the sample question's audio."""
    task = Task(task)
    samples, text_ids = None, None
    if task.audio_in:
        full = load_audio(ROOT / GOLDEN["question_audio"])
        samples = np.ascontiguousarray(full[:max(1, int(full.size * what))])
    else:
        text_ids = engine.tokenizer.encode(what).ids
    inputs = engine.prepare(task, samples, text_ids)
    cfg = GenerationConfig(max_tokens=MAX_TOKENS, top_k=None if seed % 2 else 1, seed=seed)
    sequence = Sequence(engine.model, inputs.prompt, inputs.decoder, cfg, inputs.audio_features,
                        inputs.image_features, engine.runtime.cost, torch.Generator().manual_seed(seed))
    for _ in sequence.prefill():
        pass
    return sequence


@torch.inference_mode()
def step_logits(model, sequences: list[Sequence]) -> list[list[torch.Tensor]]:
    """The logits of each sequence's next decode step, computed together as `decode_step` does,
    without advancing them (the step's keys and values are written again at the same positions)."""
    idx = torch.cat([s.decoder.next_input() for s in sequences])
    segments, row = [], 0
    for s in sequences:
        segments.append(Segment(slice(row, row + s.rows), s.cache, s.pos))
        row += s.rows
    h = model.run(model.embed(idx), segments)[:, -1]
    logits = model.lm_head.rows(h, [part for s in sequences for part in s.decoder.parts])
    return [logits[seg.rows] for seg in segments]


def test_logits_are_the_same_alone_and_in_any_batch(forced_engine):
    """One request beside 1 to 8 others of other tasks and lengths, at every place in the batch."""
    model = forced_engine.model
    target = new_sequence(forced_engine, "A1A2", 1.0, seed=0)
    others = [new_sequence(forced_engine, task, what, seed=i + 1) for i, (task, what) in enumerate(COMPANY)]
    for step in range(STEPS):
        alone = step_logits(model, [target])[0]
        n_others = 1 + step % len(others)
        for place in sorted({0, n_others // 2, n_others}):
            batch = others[:n_others]
            batch = [*batch[:place], target, *batch[place:]]
            together = step_logits(model, batch)[place]
            for a, b in zip(alone, together):
                assert torch.equal(a, b), f"step {step}, {n_others} others, place {place}"
        decode_step(model, [target, *others])  # on to the next position (a stopped text row just goes on)


def test_every_task_is_the_same_alone_and_beside_a_full_batch(forced_engine):
    """Each request of the company, alone and then as the last of all nine, at a later position."""
    model = forced_engine.model
    everyone = [new_sequence(forced_engine, task, what, seed=i) for i, (task, what) in enumerate(COMPANY)]
    for _ in range(3):
        decode_step(model, everyone)
    together = step_logits(model, everyone)
    for s, theirs in zip(everyone, together):
        for a, b in zip(step_logits(model, [s])[0], theirs):
            assert torch.equal(a, b)


def test_fast_mode_keeps_batch_invariance(tiny_ckpt):
    engine = OmniEngine(tiny_ckpt, device="cpu", mode="fast")
    everyone = [new_sequence(engine, task, what, seed=i) for i, (task, what) in enumerate(COMPANY)]
    together = step_logits(engine.model, everyone)
    for s, theirs in zip(everyone, together):
        for a, b in zip(step_logits(engine.model, [s])[0], theirs):
            assert torch.equal(a, b)


CONCURRENT_THREADS = 3
CONCURRENT_ROUNDS = 3
ROUND_TIMEOUT_S = 300
TASKS = ["A1A2", "T1A2", "A1T2", "T1T2", "ASR"]


@pytest.mark.parametrize("ckpt", ["tiny", "stop"])
def test_official_tokens_under_concurrency(request, ckpt):
    """Threads asking at once, ungated (they join and leave the batch wherever their timing puts them),
    one task after another each, for a few rounds: every answer is its official golden."""
    engine = request.getfixturevalue("engine" if ckpt == "tiny" else "stop_engine")
    golden = GOLDEN["checkpoints"][ckpt]
    failures: list[str] = []

    def ask(thread: int, round_: int) -> None:
        for k in range(2):
            task = TASKS[(thread + round_ + k * CONCURRENT_THREADS) % len(TASKS)]
            kwargs = ({"text": GOLDEN["question_text"]} if task.startswith("T")
                      else {"audio": ROOT / GOLDEN["question_audio"]})
            try:
                streams = engine.run(kwargs.pop("audio", None), task=task, max_tokens=golden["max_tokens"],
                                     **kwargs).streams
            except Exception as e:  # noqa: BLE001 - reported below
                failures.append(f"round {round_} thread {thread} {task}: {e!r}")
                continue
            if streams != golden["streams"][task]:
                failures.append(f"round {round_} thread {thread} {task}: other tokens")

    for round_ in range(CONCURRENT_ROUNDS):
        threads = [threading.Thread(target=ask, args=(i, round_)) for i in range(CONCURRENT_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(ROUND_TIMEOUT_S)
        assert not any(t.is_alive() for t in threads), f"round {round_} did not finish"
    assert not failures, failures
