"""Token-level equivalence with the official code.

`golden/official_tokens.json` holds the token streams that the official mini-omni code produced,
run unmodified on CPU, for the two tiny checkpoints these tests build (same maker, same seeds)
and the bundled sample. Our engine must reproduce every stream of every task exactly; the
second checkpoint makes answers stop on their own, so EOT forcing and the EOA stop are covered.
"""
import json
from pathlib import Path

import pytest

GOLDEN = json.loads((Path(__file__).parent / "golden" / "official_tokens.json").read_text())
TASKS = ["A1A2", "A1T2", "ASR", "T1A2", "T1T2"]


@pytest.mark.parametrize("ckpt", ["tiny", "stop"])
@pytest.mark.parametrize("task", TASKS)
def test_streams_equal_the_official_ones(request, ckpt, task):
    engine = request.getfixturevalue("engine" if ckpt == "tiny" else "stop_engine")
    golden = GOLDEN["checkpoints"][ckpt]
    root = Path(__file__).resolve().parent.parent
    kwargs = {"text": GOLDEN["question_text"]} if task.startswith("T") else {}
    audio = None if kwargs else root / GOLDEN["question_audio"]
    result = engine.run(audio, task=task, max_tokens=golden["max_tokens"], **kwargs)
    assert result.streams == golden["streams"][task]


@pytest.mark.parametrize("ckpt", ["tiny", "stop"])
def test_our_chunks_are_the_official_ones_plus_the_tail(request, ckpt, sample_wav):
    engine = request.getfixturevalue("engine" if ckpt == "tiny" else "stop_engine")
    golden = GOLDEN["checkpoints"][ckpt]
    chunks = [c for c in engine.stream(sample_wav, max_tokens=golden["max_tokens"], joins="official") if c.pcm]
    official = golden["official_a1a2_chunks"]
    assert all(len(c.pcm) == 16384 for c in chunks[:official])
    assert len(chunks) == official + 1 and 0 < len(chunks[-1].pcm) < 16384  # the tail: under one stride


@pytest.mark.parametrize("plan", [("linear", None), ("linear", 1), ("linear", 4), ("wxt", 2), ("wxt", 8),
                                  ("onednn", 2), ("onednn", 4), ("f32rows", None)])
def test_every_measured_choice_gives_the_official_tokens(tiny_ckpt, monkeypatch, plan):
    """Exact mode's products are chosen by timing on each machine; every choice must keep the tokens."""
    import omni.runtime
    from omni.linear import Products
    from omni_engine import OmniEngine

    from omni.tuning import available_formulations
    from omni.rowkernels import F32Table

    if plan[0] not in available_formulations():
        pytest.skip(f"this machine has no {plan[0]}")
    chosen = Products(*plan)
    monkeypatch.setattr(omni.runtime, "tune_products", lambda groups, overrides: {name: chosen for name in groups})
    engine = OmniEngine(tiny_ckpt, device="cpu")
    if chosen.kernel:
        assert isinstance(engine.model.lm_head.table, F32Table) and engine.model.transformer.wte.table is engine.model.lm_head.table
    else:
        assert engine.model.lm_head.products == chosen
    root = Path(__file__).resolve().parent.parent
    golden = GOLDEN["checkpoints"]["tiny"]
    result = engine.run(root / GOLDEN["question_audio"], max_tokens=golden["max_tokens"])
    assert result.streams == golden["streams"]["A1A2"]
    text = engine.run(text=GOLDEN["question_text"], task="T1A2", max_tokens=golden["max_tokens"])
    assert text.streams == golden["streams"]["T1A2"]
