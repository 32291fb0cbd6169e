"""The server's own talk page (`GET /`) in a real headless Chromium on loopback: the real server with the tiny
checkpoint, no other program. The fake microphone plays one file: a question, then, while the answer
plays, a second question. The only click is Start: turns end by themselves (the server's VAD).
The test waits on the page's own record of what it measured (`window.__talk`) and on the server's metrics,
never on a sleep; it prints the figures the page shows and the screenshots it took."""
import re
import subprocess
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest

from tests.http_client import ROOT, Server
from tests.web_pages import CHROMIUM, chromium_args

playwright = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (requirements.txt)")
if not Path(CHROMIUM).exists():
    pytest.skip(f"the browser tests need Debian's chromium at {CHROMIUM}: apt-get install chromium",
                allow_module_level=True)

MIC_RATE = 48000  # Hz: what Chromium's fake capture reads most reliably (mono s16)
LEAD_S = 4.0  # silence before the first question: Start, the microphone and the WebSocket happen meanwhile
GAP_S = 10.0  # from the end of the first question to the start of the second, spoken over the first answer
TAIL_S = 40.0  # silence after it, while the second answer plays
MAX_OUTPUT_TOKENS = 250  # a long first answer (~20 s on the tiny checkpoint), so the second question lands inside it
STOP_WITHIN_MS = 1500  # the second question's onset (as the server's VAD reports it) -> the first answer silent
WAIT_MS = 180_000
API_KEY = "talk-page-key"


def _microphone_file(path: Path) -> None:
    """Silence, question 1, a gap, question 2, silence (48 kHz mono s16)."""
    def load(name: str) -> np.ndarray:
        out = subprocess.run(["ffmpeg", "-v", "error", "-i", str(ROOT / "data" / "samples" / name), "-f", "s16le",
                              "-ac", "1", "-ar", str(MIC_RATE), "pipe:1"], capture_output=True, check=True).stdout
        return np.frombuffer(out, dtype="<i2")

    def silence(seconds: float) -> np.ndarray:
        return np.zeros(int(seconds * MIC_RATE), dtype="<i2")

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(MIC_RATE)
        w.writeframes(np.concatenate([silence(LEAD_S), load("output1.wav"), silence(GAP_S), load("output4.wav"),
                                      silence(TAIL_S)]).tobytes())


def _metric(server: Server, name: str, labels: str = "") -> float:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics",
                                     headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    srv = Server(tiny_ckpt, tmp_path_factory.mktemp("talk-server-tmp"), "--api-key", API_KEY)
    yield srv
    srv.stop()


@pytest.fixture
def tab(tmp_path):
    mic = tmp_path / "microphone.wav"
    _microphone_file(mic)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            tmp_path / "profile", executable_path=CHROMIUM, args=chromium_args(Path(f"{mic}%noloop")),
            permissions=["microphone", "camera"], viewport={"width": 1000, "height": 1000})
        page = browser.new_page()
        outside = []
        page.on("request", lambda r: outside.append(r.url) if r.url.startswith(("http:", "https:", "ws:"))
                and not r.url.startswith(("http://127.0.0.1:", "ws://127.0.0.1:")) else None)
        yield page
        browser.close()
    assert outside == [], "the page loaded something from beyond this server"


def test_routes_stay_reachable_as_json(server):
    for path, headers in (("/", {"Accept": "application/json"}), ("/routes", {})):
        status, _, body = server.request("GET", path, None, headers)
        assert status == 200 and b'"/v1/realtime"' in body and b'"/chat"' in body
    status, headers, body = server.get("/")  # a browser's request: the page, without the key
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"/talk/talk.js" in body
    assert API_KEY.encode() not in body
    assert server.get("/talk/talk.js")[0] == 200 and server.get("/talk/worklets.js")[0] == 200
    status, _, body = server.request("GET", "/talk/app.py", None, {"Authorization": f"Bearer {API_KEY}"})
    assert status == 404 and b"talk.js" in body
    assert server.get("/metrics")[0] == 401  # the other routes still need the key


def test_a_conversation_with_barge_in(server, tab, tmp_path):
    shots: list[Path] = []
    tab.goto(f"http://127.0.0.1:{server.port}/")
    _wait(tab, "document.getElementById('server').textContent.includes('ready')")
    tab.locator("summary", has_text="Settings").click()
    tab.fill("#key", API_KEY)
    tab.fill("#max-tokens", str(MAX_OUTPUT_TOKENS))
    try:
        _converse(tab, server, tmp_path, shots)
    finally:
        _shot(tab, tmp_path, shots, "last")
        print("\nscreenshots:", *shots, sep="\n  ")


def test_a_wrong_key_is_named(server, tab):
    tab.goto(f"http://127.0.0.1:{server.port}/")
    tab.locator("summary", has_text="Settings").click()
    tab.fill("#key", "not-the-key")
    tab.click("#talk")
    _wait(tab, "window.__talk.state === 'error'")
    assert "API key is wrong" in tab.inner_text("#state")


def _converse(tab, server: Server, tmp_path: Path, shots: list) -> None:
    tab.click("#talk")  # the only click
    _wait(tab, "window.__talk.state === 'listening'")
    _shot(tab, tmp_path, shots, "listening")
    _wait(tab, "window.__talk.state === 'hearing you'")
    _shot(tab, tmp_path, shots, "hearing-you")
    _wait(tab, "window.__talk.turns.length >= 1")  # the first turn ended by itself
    _shot(tab, tmp_path, shots, "thinking" if tab.evaluate("window.__talk.state") == "thinking" else "speaking-already")
    _wait(tab, "window.__talk.turns[0].playStart !== null")
    first = tab.evaluate("window.__talk.turns[0]")
    assert first["generationEnd"] is None, "the first answer began to play only after it was generated"
    _shot(tab, tmp_path, shots, "speaking")
    _wait(tab, "window.__talk.turns[0].interrupted && window.__talk.turns[0].playEnd !== null")
    _shot(tab, tmp_path, shots, "interrupted")
    _wait(tab, "window.__talk.turns.length >= 2 && window.__talk.turns[1].playStart !== null")
    _shot(tab, tmp_path, shots, "second-answer")
    talk = tab.evaluate("window.__talk")
    _check(talk, server)
    _wait(tab, "document.querySelectorAll('#transcript li').length === 2 && "
               "[...document.querySelectorAll('#transcript .a')].every(a => a.textContent !== '…')")
    items = [tab.inner_text(f"#transcript li:nth-child({i})") for i in (1, 2)]
    assert "interrupted" in items[0] and "first audio" in items[0] and "first audio" in items[1], items
    assert talk["errors"] == [], talk["errors"]


def _check(talk: dict, server: Server) -> None:
    first, second = talk["turns"][:2]
    stopped_after = first["playEnd"] - first["interruptedAt"]
    assert stopped_after < STOP_WITHIN_MS, f"the first answer played on {stopped_after:.0f} ms after the barge-in"
    assert first["played"] > 0 and second["speechEnd"] > first["interruptedAt"]
    # The server learns of the interruption either way: it cancels the first answer if it is still generating,
    # or, once generated, the page truncates it where playback stopped.
    cancelled = _metric(server, "omni_realtime_responses_total", '{status="cancelled"}')
    truncated = _metric(server, "omni_realtime_truncations_total")
    assert cancelled >= 1 or truncated >= 1, (cancelled, truncated)
    for n, turn in enumerate((first, second), 1):
        print(f"turn {n}: first audio {turn['playStart'] - turn['speechEnd']:.0f} ms after the end of speech "
              f"(VAD silence {turn['vadMs']} ms), status {turn['status']}")
    print(f"barge-in -> first answer silent: {stopped_after:.0f} ms; cancelled {cancelled:.0f}, truncated "
          f"{truncated:.0f}; underruns {talk['underruns']}")


def _wait(tab, condition: str) -> None:
    """Until `condition` (JavaScript) holds; a page error fails at once, saying what the page says."""
    tab.wait_for_function(f"() => {{ if (window.__talk && window.__talk.state === 'error' && !({condition})) "
                          f"throw new Error(document.getElementById('state').textContent); return {condition}; }}",
                          timeout=WAIT_MS)


def _shot(tab, tmp_path: Path, shots: list, name: str) -> None:
    path = tmp_path / f"talk-{len(shots) + 1}-{name}.png"
    tab.screenshot(path=path, full_page=True)
    shots.append(path)
