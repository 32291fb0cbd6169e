"""The web pages as their users start them, each in its own process on a free loopback port, and a headless
Chromium (Debian's, driven by Playwright) that stays off the network."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.http_client import ROOT, free_port

CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright downloads no browser of its own here
PAGE_READY_TIMEOUT_S = 120


def chromium_args(fake_microphone: Path) -> list[str]:
    """Headless, off the network, and with a fake microphone that plays `fake_microphone` (a WAV file)."""
    return [
        "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # nothing resolves but loopback
        "--autoplay-policy=no-user-gesture-required",  # the answer plays by itself, as it does after a click
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_microphone}",
    ]


class PageProcess:
    """A page's own process; ready once its front page answers."""

    def __init__(self, argv: list[str], port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + PAGE_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the page exited during start-up; see {log}"
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise TimeoutError(f"the page at {self.url} did not come up; see {log}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def gradio_page(server_url: str, logdir: Path, *extra: str) -> PageProcess:
    port = free_port()
    argv = [sys.executable, "-m", "webui.omni_gradio", "--server-url", server_url, "--port", str(port),
            *extra]
    return PageProcess(argv, port, logdir / f"gradio-{port}.log")


def streamlit_page(server_url: str, logdir: Path, *extra: str) -> PageProcess:
    port = free_port()
    argv = [sys.executable, "-m", "streamlit", "run", str(ROOT / "webui" / "omni_streamlit.py"),
            "--server.port", str(port), "--server.address", "127.0.0.1", "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--runner.postScriptGC", "false", "--", "--server-url", server_url, *extra]
    return PageProcess(argv, port, logdir / f"streamlit-{port}.log")
