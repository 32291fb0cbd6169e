"""demo_snac_token_decode.py as a user runs it: text to speech, and a token dump decoded to a wav."""
import subprocess
import sys
import wave

from tests.conftest import ROOT


def test_demo_speaks_text_and_decodes_a_dump(vision_ckpt, tmp_path):
    demo = [sys.executable, str(ROOT / "demo_snac_token_decode.py"), "--ckpt-dir", str(vision_ckpt)]
    spoken, dump, decoded = tmp_path / "s.wav", tmp_path / "t.json", tmp_path / "d.wav"
    proc = subprocess.run([*demo, "What is your name?", "-o", str(spoken), "--max-tokens", "60"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "SNAC level 0" in proc.stdout and "decode steps" in proc.stderr  # the walk-through and the progress bar
    subprocess.run([sys.executable, str(ROOT / "inference.py"), "--ckpt-dir", str(vision_ckpt), "--task", "T1A2",
                    "--text", "What is your name?", "--max-tokens", "60", "--dump-tokens", str(dump),
                    "--out", str(tmp_path / "a.wav")],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    proc = subprocess.run([*demo, "--tokens", str(dump), "-o", str(decoded)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert decoded.read_bytes() == spoken.read_bytes()  # a greedy answer's dump decodes to the same audio
    with wave.open(str(decoded)) as w:
        assert w.getframerate() == 24000 and w.getnframes() % 2048 == 0 and w.getnframes() > 0
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    proc = subprocess.run([*demo, "--tokens", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "not a --dump-tokens file" in proc.stderr
