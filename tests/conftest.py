"""Shared fixtures: tiny random checkpoints built once per test session, and a CPU engine."""
from __future__ import annotations

import email.message
import io
import os
from pathlib import Path

import pytest
import torch

from omni_engine import OmniEngine
from utils.make_checkpoint import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent

SAMPLE = ROOT / "data" / "samples" / "output1.wav"
IMAGE = ROOT / "data" / "samples" / "image1.jpg"


class FakeResponse(io.BytesIO):
    """A download's HTTP response without the network (torch.hub reads its headers, then its body)."""

    def info(self) -> email.message.Message:
        return email.message.Message()  # no Content-Length: the progress bar counts without a total


# Seed of the --likely-stop checkpoint whose answer to SAMPLE ends by EOA after emitting EOT.
STOP_SEED = 1


# Servers started by the tests admit by a fixed frame time that fits every batch (MINI_OMNI_FRAME_SECONDS),
# not by their own measurement: on a busy machine a tiny model's measured steps would refuse a test's second
# conversation now and then. Admission by capacity is tested with tables of its own (tests/test_server.py).
TEST_FRAME_SECONDS = "1=0.001"


@pytest.fixture(scope="session", autouse=True)
def fixed_frame_times():
    from serving.capacity import FRAME_SECONDS_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FRAME_SECONDS_ENV, os.environ.get(FRAME_SECONDS_ENV, TEST_FRAME_SECONDS))
        yield


@pytest.fixture(scope="session", autouse=True)
def product_choices_cache(tmp_path_factory):
    """Keep the measured product choices of the tiny models out of the user's cache directory."""
    previous = os.environ.get("MINI_OMNI_CACHE")
    os.environ["MINI_OMNI_CACHE"] = str(tmp_path_factory.mktemp("mini-omni-cache"))
    yield
    if previous is None:
        del os.environ["MINI_OMNI_CACHE"]
    else:
        os.environ["MINI_OMNI_CACHE"] = previous


# Set by tests/test_webui_live.py for the run it starts inside its own network namespace.
NETNS_ENV = "MINI_OMNI_LIVE_NETNS"


def pytest_collection_modifyitems(config, items):
    # The hands-free page's tests run only inside the namespace that their outer test makes: elsewhere
    # they are deselected (not skipped), as that outer test runs them.
    if not os.environ.get(NETNS_ENV):
        inner = [item for item in items if "netns_inner" in item.keywords]
        if inner:
            config.hook.pytest_deselected(items=inner)
            items[:] = [item for item in items if "netns_inner" not in item.keywords]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def stop_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "stop", "tiny", seed=STOP_SEED, likely_stop=True)


@pytest.fixture(scope="session")
def engine(tiny_ckpt) -> OmniEngine:
    return OmniEngine(tiny_ckpt, device="cpu")


@pytest.fixture(scope="session")
def stop_engine(stop_ckpt) -> OmniEngine:
    return OmniEngine(stop_ckpt, device="cpu")


@pytest.fixture(scope="session")
def sample_wav() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def vision_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "vision", "tiny", seed=0, family="mini-omni2")


@pytest.fixture(scope="session")
def vision_stop_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "vision-stop", "tiny", seed=STOP_SEED, likely_stop=True,
                           family="mini-omni2")


@pytest.fixture(scope="session")
def vision_engine(vision_ckpt) -> OmniEngine:
    return OmniEngine(vision_ckpt, device="cpu")


@pytest.fixture(scope="session")
def sample_image() -> Path:
    return IMAGE
