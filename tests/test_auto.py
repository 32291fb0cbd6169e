"""`--mode auto`: exact where the measured exact step plus SNAC fits in REALTIME_SHARE of a frame, else fast;
measured once per machine, forced by an explicit mode, reported by the server."""
from types import SimpleNamespace

import pytest
import torch

import omni.auto
from omni.auto import FORCED_REASON, REALTIME_SHARE, choose_mode, resolve_auto
from omni.codec import SECONDS_PER_FRAME
from omni.config import ModelConfig
from omni.linear import Int8Head
from omni.rowkernels import RowsHead
from omni.runtime import MODES
from omni_engine import OmniEngine, Overrides
from serving import cli as server_cli
from tests.http_client import Server
from voice import cli as voice_cli

MAX = 120


@pytest.fixture
def fake_measure(monkeypatch):
    """Stand in for the measurement: it returns `seconds` and counts its calls (the engine is loaded in exact)."""
    fake = SimpleNamespace(calls=0, seconds={})

    def measure(engine):
        fake.calls += 1
        return dict(fake.seconds)
    monkeypatch.setattr(omni.auto, "measure_exact", measure)
    return fake


def test_the_choice_is_exact_within_the_share_and_fast_over_it():
    budget = SECONDS_PER_FRAME * REALTIME_SHARE
    within = choose_mode(step_s=budget * 0.7, snac_frame_s=budget * 0.2)
    over = choose_mode(step_s=budget * 0.9, snac_frame_s=budget * 0.2)
    assert within.mode == "exact" and "within 70%" in within.reason
    assert over.mode == "fast" and "over 70%" in over.reason and "85.3 ms" in over.reason


def test_a_gpu_runs_exact_without_measuring(fake_measure):
    choice = resolve_auto(torch.device("cuda"), torch.float16, ModelConfig(), Overrides(), lambda: None)
    assert choice.mode == "exact" and fake_measure.calls == 0


@pytest.mark.parametrize("share, mode", [(0.5, "exact"), (1.5, "fast")])
def test_auto_loads_the_mode_the_measurement_chose_once_per_machine(tiny_ckpt, tmp_path, fake_measure, share, mode):
    fake_measure.seconds = {"step": SECONDS_PER_FRAME * share, "snac_frame": 0.0}
    engines = [OmniEngine(tiny_ckpt, device="cpu", mode="auto", overrides=Overrides(cache=tmp_path))
               for _ in range(2)]
    assert fake_measure.calls == 1  # the second load read the cached measurement
    assert [e.mode for e in engines] == [mode, mode] and f"{share:.0%} of a frame" in engines[0].mode_reason
    assert isinstance(engines[0].model.lm_head, (Int8Head, RowsHead)) == (mode == "fast")


def test_a_measurement_that_chooses_fast_reloads_the_exact_engine_as_fast(tiny_ckpt, tmp_path, monkeypatch, sample_wav):
    monkeypatch.setattr(omni.auto, "REALTIME_SHARE", 0.0)  # the real measurement, then fast whatever it says
    engine = OmniEngine(tiny_ckpt, device="cpu", mode="auto", overrides=Overrides(cache=tmp_path))
    assert engine.mode == "fast" and isinstance(engine.model.lm_head, (Int8Head, RowsHead))
    assert engine.run(sample_wav, max_tokens=MAX).pcm


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_an_explicit_mode_forces_it_without_measuring(tiny_ckpt, tmp_path, fake_measure, mode):
    engine = OmniEngine(tiny_ckpt, device="cpu", mode=mode, overrides=Overrides(cache=tmp_path))
    assert engine.mode == mode and engine.mode_reason == FORCED_REASON and fake_measure.calls == 0


def test_the_live_surfaces_default_to_auto_and_take_every_mode():
    for parse in (server_cli.parse_args, voice_cli.parse_args):
        assert parse([]).mode == "auto"
        assert [parse(["--mode", m]).mode for m in MODES] == list(MODES)


def test_the_server_reports_the_mode_auto_chose(tiny_ckpt, tmp_path):
    srv = Server(tiny_ckpt, tmp_path / "tmp", mode="auto")
    try:
        health = srv.get_json("/health")
        assert health["mode"] in ("exact", "fast") and "of a frame's 85.3 ms of audio" in health["mode_reason"]
        assert f'omni_mode{{mode="{health["mode"]}"}} 1.0' in srv.get("/metrics")[2].decode()
    finally:
        srv.stop()
