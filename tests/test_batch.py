"""Many requests at once: the engine decodes them in one batch, and each answer equals its solo answer.

Every test holds the engine's decode steps at a gate (a cancel callable that waits) until all its
requests have been submitted, so they really share steps, whatever the machine's speed.
"""
import json
import threading
import time
from pathlib import Path

import pytest

from omni.batch import Scheduler
from omni_engine import OmniEngine

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = json.loads((Path(__file__).parent / "golden" / "official_tokens.json").read_text())
SUBMIT_TIMEOUT_S = 120
JOIN_TIMEOUT_S = 300


def golden_request(task: str, max_tokens: int) -> dict:
    if task.startswith("T"):
        return {"text": GOLDEN["question_text"], "task": task, "max_tokens": max_tokens}
    return {"audio": ROOT / GOLDEN["question_audio"], "task": task, "max_tokens": max_tokens}


def run_together(engine: OmniEngine, requests: list[dict]) -> list:
    """Run `requests` (keyword arguments of `engine.run`) from one thread each, their decode steps
    held until all are submitted; each one's result, or the exception it raised."""
    gate = threading.Event()
    results: list = [None] * len(requests)
    before = engine.scheduler.stats.queue_waits

    def held(cancel=None):
        def poll() -> bool:
            gate.wait(SUBMIT_TIMEOUT_S)
            return bool(cancel and cancel())
        return poll

    def ask(i: int, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        kwargs["cancel"] = held(kwargs.get("cancel"))
        try:
            results[i] = engine.run(kwargs.pop("audio", None), **kwargs)
        except Exception as e:  # noqa: BLE001 - returned for the test to look at
            results[i] = e

    threads = [threading.Thread(target=ask, args=(i, r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + SUBMIT_TIMEOUT_S
    while engine.scheduler.stats.queue_waits + engine.scheduler.waiting - before < len(requests):
        assert time.monotonic() < deadline, "the requests were not all submitted"
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads)
    return results


def batch_sizes(engine: OmniEngine) -> set[int]:
    return set(engine.scheduler.stats.steps)


@pytest.mark.parametrize("ckpt", ["tiny", "stop"])
def test_five_tasks_at_once_give_the_official_tokens(request, ckpt):
    """All five tasks decoding together (max_batch at a time: the others join mid-stream) give the official goldens."""
    engine = request.getfixturevalue("engine" if ckpt == "tiny" else "stop_engine")
    golden = GOLDEN["checkpoints"][ckpt]
    tasks = ["A1A2", "T1A2", "A1T2", "T1T2", "ASR"]
    results = run_together(engine, [golden_request(task, golden["max_tokens"]) for task in tasks])
    for task, result in zip(tasks, results):
        assert not isinstance(result, Exception), result
        assert result.streams == golden["streams"][task], task
    assert max(batch_sizes(engine)) == engine.scheduler.max_batch


def test_a_cancelled_request_leaves_the_others_unchanged(engine):
    golden = GOLDEN["checkpoints"]["tiny"]
    polls = {"n": 0}

    def cancel_after_fifteen_steps() -> bool:
        polls["n"] += 1
        return polls["n"] > 15

    requests = [golden_request("A1A2", golden["max_tokens"]),
                {**golden_request("A1A2", golden["max_tokens"]), "cancel": cancel_after_fifteen_steps},
                golden_request("T1A2", golden["max_tokens"])]
    kept, cancelled, text = run_together(engine, requests)
    assert kept.streams == golden["streams"]["A1A2"]
    assert text.streams == golden["streams"]["T1A2"]
    # what was streamed before the cancel (whole chunks: 16 steps ran) is the start of the full answer
    n = len(cancelled.streams[-1])
    assert 11 <= n <= 16
    assert cancelled.streams == [stream[:n] for stream in golden["streams"]["A1A2"]]


def test_different_lengths_and_a_late_joiner_match_their_solo_answers(engine, sample_wav):
    """Requests of different lengths (one over several prefill chunks), the fifth joining once a place
    frees up, each equal to its solo answer: audio, text and tokens."""
    samples = sorted((ROOT / "data" / "samples").glob("output*.wav"))
    requests = [{"audio": s, "max_tokens": 150 + 20 * i} for i, s in enumerate(samples)]
    solo = [engine.run(r["audio"], max_tokens=r["max_tokens"]) for r in requests]
    together = run_together(engine, requests)
    for alone, batched in zip(solo, together):
        assert batched.streams == alone.streams
        assert batched.pcm == alone.pcm and batched.text == alone.text


def test_fast_mode_rows_are_independent_of_their_batch(tiny_ckpt, sample_wav):
    engine = OmniEngine(tiny_ckpt, device="cpu", mode="fast", max_batch=3)
    requests = [{"audio": sample_wav, "max_tokens": 120}, {"text": "what is the weather like", "task": "T1A2",
                "max_tokens": 80}, {"audio": sample_wav, "task": "A1T2", "max_tokens": 100}]
    solo = [engine.run(r.get("audio"), **{k: v for k, v in r.items() if k != "audio"}) for r in requests]
    together = run_together(engine, requests)
    assert [r.streams for r in together] == [r.streams for r in solo]
    assert max(batch_sizes(engine)) == 3


def test_an_image_question_batched_with_others(vision_engine, sample_wav, sample_image):
    requests = [{"audio": sample_wav, "image": sample_image, "max_tokens": 140},
                {"audio": sample_wav, "max_tokens": 120},
                {"text": "describe the picture", "task": "T1T2", "max_tokens": 90}]
    solo = [vision_engine.run(r.get("audio"), **{k: v for k, v in r.items() if k != "audio"}) for r in requests]
    together = run_together(vision_engine, requests)
    assert [r.streams for r in together] == [r.streams for r in solo]
    assert [r.pcm for r in together] == [r.pcm for r in solo]


def test_a_failing_request_fails_alone(engine):
    """An error inside one request (here its cancel callable) reaches its caller; the batch goes on."""
    golden = GOLDEN["checkpoints"]["tiny"]
    polls = {"n": 0}

    def broken() -> bool:
        polls["n"] += 1
        if polls["n"] > 3:
            raise RuntimeError("the cancel callable broke")
        return False

    requests = [golden_request("A1A2", golden["max_tokens"]),
                {**golden_request("T1A2", golden["max_tokens"]), "cancel": broken},
                golden_request("T1T2", golden["max_tokens"])]
    kept, failed, text = run_together(engine, requests)
    assert isinstance(failed, RuntimeError) and "broke" in str(failed)
    assert kept.streams == golden["streams"]["A1A2"]
    assert text.streams == golden["streams"]["T1T2"]


def test_max_batch_is_validated(engine):
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(engine.model, 0)


def test_the_asking_thread_runs_the_model_and_a_dropped_answer_leaves(engine, sample_wav):
    """No thread of the engine's own: the caller's thread runs its answer; closing a stream mid-way
    takes the request out of the batch at once."""
    names = []
    real = engine.scheduler._turn
    engine.scheduler._turn = lambda: (names.append(threading.current_thread().name), real())[1]
    try:
        chunks = engine.stream(sample_wav, max_tokens=200)
        next(chunks)
        assert engine.scheduler.active == 1
        chunks.close()
        assert engine.scheduler.active == 0 and engine.scheduler.idle
    finally:
        del engine.scheduler._turn
    assert set(names) == {threading.current_thread().name}


def test_the_idle_work_runs_once_each_time_the_work_runs_out(engine, sample_wav, monkeypatch):
    """The engine gives freed heap pages back when no request is left (`on_idle`), not between steps."""
    calls = []
    monkeypatch.setattr(engine.scheduler, "on_idle", lambda: calls.append(engine.scheduler.active))
    for expected in (1, 2):
        engine.run(sample_wav, max_tokens=100)
        assert engine.scheduler.idle
        assert calls == [0] * expected
