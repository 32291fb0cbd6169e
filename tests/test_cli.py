"""inference.py as a user runs it (a real subprocess), and the official-compatible class."""
import importlib.util
import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import pytest

from inference import OmniInference

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "inference.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("task", ["A1A2", "A1T2", "ASR", "T1A2", "T1T2"])
def test_dump_tokens_for_every_task(tiny_ckpt, sample_wav, tmp_path, task):
    question = ["--text", "What is your name?"] if task.startswith("T") else ["--input", sample_wav]
    out = ["--out", tmp_path / "a.wav"] if task in ("A1A2", "T1A2") else []
    proc = run_cli("--ckpt-dir", tiny_ckpt, "--task", task, *question, *out, "--max-tokens", 120,
                   "--dump-tokens", tmp_path / "t.json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    streams = json.loads((tmp_path / "t.json").read_text())["streams"]
    assert len(streams) == 8 and len(streams[7]) > 1
    if out:
        assert all(len(s) == len(streams[7]) for s in streams)
        assert all(0 <= t < 4160 for s in streams[:7] for t in s)
        with wave.open(str(tmp_path / "a.wav")) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
            assert w.getnframes() == (len(streams[7]) - 7) * 2048
    else:
        assert streams[:7] == [[]] * 7
    assert "first chunk" in proc.stdout


def test_a_spoken_answer_without_out_goes_to_output(tiny_ckpt, sample_wav, tmp_path):
    proc = run_cli("--ckpt-dir", tiny_ckpt, "--input", sample_wav, "--max-tokens", 100, "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wrote output/answer.wav" in proc.stdout
    with wave.open(str(tmp_path / "output" / "answer.wav")) as w:
        assert w.getnframes() > 0


@pytest.mark.parametrize("args, message", [
    (["--task", "T1T2"], "needs --text"),
    (["--task", "A1A2", "--text", "hi"], "--text needs a text-input task"),
    (["--task", "A1T2", "--input", "x.wav", "--out", "a.wav"], "text only"),
    (["--input", "a.wav", "--text", "hi"], "not both"),
    (["--task", "B2B2"], "invalid choice"),
])
def test_wrong_argument_combinations(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2 and message in proc.stderr


def test_missing_input_file_is_reported(tiny_ckpt, tmp_path):
    proc = run_cli("--ckpt-dir", tiny_ckpt, "--input", tmp_path / "nope.wav", "--device", "cpu")
    assert proc.returncode == 1 and "error: audio file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_official_class_streams_pcm_chunks(tiny_ckpt, sample_wav):
    omni = OmniInference(str(tiny_ckpt), "cpu")
    chunks = list(omni.run_AT_batch_stream(str(sample_wav), max_returned_tokens=120))
    assert all(isinstance(c, bytes) for c in chunks)
    assert all(len(c) == 16384 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 16384
    with pytest.raises(ValueError, match="stop ids"):
        next(omni.run_AT_batch_stream(str(sample_wav), eos_id_a=1))


def test_examples_run(tiny_ckpt, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # as after `pip install -e .`
    for script in ("answer_question.py", "stream_answer.py"):
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--ckpt-dir", str(tiny_ckpt),
                               "--max-tokens", "100"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
    with wave.open(str(tmp_path / "output" / "response.wav")) as w:
        assert w.getframerate() == 24000 and w.getnframes() > 0
    assert "chunk 1" in proc.stdout


def test_examples_load_no_model_at_import():
    for script in ("answer_question", "stream_answer"):
        spec = importlib.util.spec_from_file_location(script, ROOT / "examples" / f"{script}.py")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))  # would fail on the missing ./checkpoint
