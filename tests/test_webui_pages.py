"""Both web pages in a real headless Chromium: the real server with the tiny checkpoint, the real page processes,
a real upload and a real (fake-device) microphone. Times are measured and printed, never asserted."""
import base64
import io
import subprocess
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from tests.http_client import Server
from tests.web_pages import CHROMIUM, chromium_args, gradio_page, streamlit_page
from webui.client import OmniClient

playwright = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (requirements.txt)")
if not Path(CHROMIUM).exists():
    pytest.skip(f"the browser tests need Debian's chromium at {CHROMIUM}: apt-get install chromium",
                allow_module_level=True)

# The pages' --max-new-tokens (alias --max-tokens) bounds the answer alone: the question's length (or an image)
# does not count, so each bound below is the answer's decode steps, whatever the recording's length.
MAX = 58  # a short answer to the uploaded sample on the tiny checkpoint
LONG_MAX = 1200  # an answer long enough to interrupt
RECORD_MAX = 70  # a short answer to a recorded question
RECORD_S = 1.5  # how long the test speaks into the fake microphone
ANSWER_TIMEOUT_MS = 120_000
AAC_SLACK_S = 3 * 1024 / 24000  # Gradio streams AAC: encoder priming and padding, up to three 1024-sample frames
SPEECH_RMS = 100  # int16 RMS above which a recording holds sound, not silence
CAMERA_WAIT_MS = 60_000  # for the fake camera's first frame, and for its snapshot after the clicks


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    srv = Server(tiny_ckpt, tmp_path_factory.mktemp("pages-server-tmp"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server_url(server):
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def browser(tmp_path_factory, sample_wav):
    """Chromium with a fresh profile; its fake microphone speaks the sample question over and over, its fake
    camera shows a test pattern."""
    with playwright.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"), executable_path=CHROMIUM, args=chromium_args(sample_wav),
            permissions=["microphone", "camera"], viewport={"width": 1280, "height": 900})
        yield context
        context.close()


@pytest.fixture
def tab(browser):
    """A new tab; the pages must load nothing from beyond this machine (fonts, icons, telemetry)."""
    page = browser.new_page()
    outside = []
    page.on("request", lambda r: outside.append(r.url) if r.url.startswith(("http:", "https:"))
            and not r.url.startswith("http://127.0.0.1:") else None)
    yield page
    page.close()
    assert outside == []


def _expected_answer(server_url: str, question: bytes, max_new_tokens: int,
                     image: bytes | None = None) -> tuple[bytes, str]:
    """What the server answers to this question when asked directly (answers are seeded: the same bytes)."""
    pcm, text = b"", ""
    for chunk in OmniClient(server_url).ask(question, image, max_new_tokens=max_new_tokens):
        pcm, text = pcm + chunk.pcm, text + chunk.text
    return pcm, text


def _decode(data: bytes, rate: int) -> np.ndarray:
    """Any audio file ffmpeg reads, as int16 mono samples at `rate`."""
    out = subprocess.run(["ffmpeg", "-v", "error", "-i", "pipe:0", "-f", "s16le", "-ac", "1", "-ar", str(rate),
                          "pipe:1"], input=data, capture_output=True, check=True).stdout
    return np.frombuffer(out, dtype="<i2")


def _wav(data: bytes) -> tuple[int, np.ndarray]:
    with wave.open(io.BytesIO(data)) as w:
        return w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def _rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))


# ---- Gradio ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gradio(server_url, tmp_path_factory):
    page = gradio_page(server_url, tmp_path_factory.mktemp("gradio-logs"), "--max-new-tokens", str(MAX))
    yield page
    page.stop()


def _open_gradio(tab, url: str) -> None:
    tab.goto(url)
    tab.wait_for_function("/Server http|⚠️/.test(document.querySelector('#server')?.innerText)",
                          timeout=ANSWER_TIMEOUT_MS)  # the health check


def _status_starts(tab, prefix: str) -> None:
    tab.wait_for_function("(p) => document.querySelector('#status')?.innerText.startsWith(p)", arg=prefix,
                          timeout=ANSWER_TIMEOUT_MS)


def _gradio_answer(tab, question, pcm: bytes, text: str, screenshot) -> str:
    """Upload `question` to the open page, check the streamed answer against the server's `pcm` and `text`,
    save a screenshot and return the measured times."""
    assert pcm  # an answer to hear
    expected_s = len(pcm) / 2 / 24000
    tab.evaluate("""() => { window.firstAudio = null; window.uploaded = performance.now();
        document.addEventListener('playing', () => { window.firstAudio ??= performance.now(); }, true); }""")
    tab.locator("#question input[type=file]").set_input_files(question)
    _status_starts(tab, "Generated")  # the whole answer has arrived; the player may still be playing it
    done_ms = tab.evaluate("performance.now() - window.uploaded")
    tab.wait_for_function("window.firstAudio !== null", timeout=ANSWER_TIMEOUT_MS)
    first_audio_ms = tab.evaluate("window.firstAudio - window.uploaded")
    player = tab.locator("#answer audio")
    # The player's duration grows as it fetches the streamed segments: wait until it holds the whole answer.
    tab.wait_for_function("([el, least]) => isFinite(el.duration) && el.duration >= least",
                          arg=[player.element_handle(), expected_s - AAC_SLACK_S], timeout=ANSWER_TIMEOUT_MS)
    assert abs(player.evaluate("el => el.duration") - expected_s) <= AAC_SLACK_S
    assert tab.locator("#transcript textarea").input_value() == text
    download = tab.locator("#answer a[download]").get_attribute("href")  # the whole streamed answer, as one file
    samples = _decode(tab.request.get(download).body(), 24000)
    assert abs(samples.size - len(pcm) // 2) <= AAC_SLACK_S * 24000 and _rms(samples) > SPEECH_RMS
    tab.screenshot(path=screenshot, full_page=True)
    return (f"upload to first audio playing {first_audio_ms / 1000:.2f} s, to the end of the answer "
            f"{done_ms / 1000:.2f} s, {expected_s:.2f} s of speech; the page says: {tab.inner_text('#status')}; "
            f"screenshot {screenshot}")


def test_gradio_upload_streams_a_playable_answer(tab, gradio, server_url, sample_wav, tmp_path):
    pcm, text = _expected_answer(server_url, sample_wav.read_bytes(), MAX)
    _open_gradio(tab, gradio.url)
    assert "ready" in tab.inner_text("#server")
    assert not tab.locator("#image").is_visible()  # the tiny v1 model cannot see: no image input
    print("\ngradio page:", _gradio_answer(tab, sample_wav, pcm, text, tmp_path / "gradio-answer.png"))


@pytest.fixture(scope="module")
def v2_server(vision_ckpt, tmp_path_factory):
    srv = Server(vision_ckpt, tmp_path_factory.mktemp("v2-server-tmp"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def v2_gradio(v2_server, tmp_path_factory):
    page = gradio_page(f"http://127.0.0.1:{v2_server.port}", tmp_path_factory.mktemp("v2-gradio-logs"),
                       "--max-tokens", str(MAX))
    yield page
    page.stop()


def test_gradio_sends_the_image_to_a_model_that_sees(tab, v2_server, v2_gradio, sample_wav, sample_image, tmp_path):
    pcm, text = _expected_answer(f"http://127.0.0.1:{v2_server.port}", sample_wav.read_bytes(), MAX,
                                 sample_image.read_bytes())
    _open_gradio(tab, v2_gradio.url)
    assert "It can see" in tab.inner_text("#server")
    tab.locator("#image input[type=file]").set_input_files(sample_image)
    tab.wait_for_selector("#image img", timeout=ANSWER_TIMEOUT_MS)
    print("\ngradio page, Mini-Omni2 with an image:",
          _gradio_answer(tab, sample_wav, pcm, text, tmp_path / "gradio-image-answer.png"))


@pytest.fixture(scope="module")
def long_gradio(server_url, tmp_path_factory):
    """A page whose answers are long enough to be interrupted."""
    page = gradio_page(server_url, tmp_path_factory.mktemp("long-gradio-logs"), "--max-tokens", str(LONG_MAX))
    yield page
    page.stop()


def _metric(server, name: str) -> float:
    """One sample of the server's /metrics (0 when it has none yet)."""
    for line in server.get("/metrics")[2].decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _cancelled(server) -> float:
    return _metric(server, 'omni_requests_total{outcome="cancelled"}')


def _until(condition, what: str, timeout_s: float = ANSWER_TIMEOUT_MS / 1000) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.1)


def test_gradio_new_question_and_stop_end_the_running_answer(tab, server, long_gradio, sample_wav):
    cancelled = _cancelled(server)
    _open_gradio(tab, long_gradio.url)
    tab.locator("#question input[type=file]").set_input_files(sample_wav)
    _status_starts(tab, "Speaking")
    tab.locator("#ask").click()  # ask again while the answer streams
    # The first answer is cancelled and the second question reaches the server (it is not dropped).
    _until(lambda: _cancelled(server) >= cancelled + 1, "the first answer's cancellation")
    _until(lambda: _metric(server, "omni_in_flight") >= 1, "the second question")
    tab.locator("#stop").click()
    _status_starts(tab, "Stopped")
    _until(lambda: _cancelled(server) >= cancelled + 2 and not server.get_json("/health")["busy"],
           "the second answer's cancellation")
    assert tab.inner_text("#status").startswith("Stopped")  # no late status from either answer


# ---- Streamlit ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def streamlit(server_url, tmp_path_factory):
    page = streamlit_page(server_url, tmp_path_factory.mktemp("streamlit-logs"), "--max-new-tokens",
                          str(RECORD_MAX))
    yield page
    page.stop()


def _open_streamlit(tab, url: str) -> None:
    """Open the page in its press-to-talk mode (hands-free is tested in test_webui_live.py)."""
    tab.goto(url)
    tab.locator("button", has_text="Press to talk").click(timeout=ANSWER_TIMEOUT_MS)
    tab.wait_for_selector("[data-testid=stAudioInput]", timeout=ANSWER_TIMEOUT_MS)


def _speak(tab) -> None:
    """Record RECORD_S of what the fake microphone plays, the way a person presses record and stop.

    Timed by the recorder's own clock: on a busy machine recording starts well after the click, and a sleep
    of RECORD_S from the click could stop it with too little recorded.
    """
    tab.locator("[data-testid=stAudioInputActionButton][aria-label='Record']").click()
    stop = tab.locator("[data-testid=stAudioInputActionButton][aria-label='Stop recording']")
    stop.wait_for(timeout=ANSWER_TIMEOUT_MS)  # recording has started
    tab.wait_for_function("""(least) => {
        const shown = document.querySelector('[data-testid=stAudioInputWaveformTimeCode]')?.innerText ?? '';
        const parts = shown.trim().split(':').map(Number);
        return parts.every(Number.isFinite) && parts.reduce((s, p) => 60 * s + p, 0) >= least; }""",
                          arg=RECORD_S, timeout=ANSWER_TIMEOUT_MS)
    stop.click()


def _turn_ended(tab) -> None:
    tab.wait_for_function("document.body.innerText.includes('first audio after') || document.querySelector("
                          "'[data-testid=stChatMessage] [data-testid=stAlert], [data-testid=stException]')",
                          timeout=ANSWER_TIMEOUT_MS)
    assert tab.locator("[data-testid=stException]").count() == 0, tab.inner_text("body")


def _streamlit_turn(tab, server_url: str, screenshot, max_new_tokens: int, image: bytes | None = None) -> str:
    """Speak a question into the open page, check that it was heard and that the page shows and plays the
    server's answer to exactly that recording (and `image`); save a screenshot and return the measured times."""
    started = time.monotonic()
    _speak(tab)
    _turn_ended(tab)
    turn_s = time.monotonic() - started - RECORD_S
    messages = tab.locator("[data-testid=stChatMessage]")
    # The timing line shows first; the answer's player comes with the page's next rerun, which a busy machine
    # can delay past Playwright's default 30 s (the flaky failure): wait for both players, as long as for an answer.
    tab.wait_for_function("document.querySelectorAll('[data-testid=stChatMessage] audio').length >= 2",
                          timeout=ANSWER_TIMEOUT_MS)
    assert messages.count() == 2
    question_src, answer_src = (messages.nth(i).locator("audio").get_attribute("src") for i in range(2))
    question = tab.request.get(question_src).body()
    rate, heard = _wav(question)
    assert rate == 16000 and heard.size > 0.5 * RECORD_S * rate and _rms(heard) > SPEECH_RMS  # it heard speech
    pcm, text = _expected_answer(server_url, question, max_new_tokens, image)
    assert pcm  # an answer to hear
    rate, answer = _wav(tab.request.get(answer_src).body())
    assert rate == 24000 and answer.tobytes() == pcm  # the page played the server's answer to what it sent
    assert " ".join(text.split()) in " ".join(messages.nth(1).inner_text().split())
    tab.screenshot(path=screenshot, full_page=True)
    return (f"{heard.size / 16000:.2f} s question recorded, answered in {turn_s:.2f} s "
            f"({len(pcm) / 2 / 24000:.2f} s of speech); screenshot {screenshot}")


def test_streamlit_microphone_turn_is_answered(tab, streamlit, server_url, tmp_path):
    _open_streamlit(tab, streamlit.url)
    assert tab.locator("[data-testid=stCameraInput]").count() == 0  # the tiny v1 model cannot see: no camera
    print("\nstreamlit page:", _streamlit_turn(tab, server_url, tmp_path / "streamlit-turn.png", RECORD_MAX))


def test_streamlit_without_webrtc_says_why_and_offers_press_to_talk(tab, streamlit, server_url, tmp_path):
    tab.add_init_script("delete window.RTCPeerConnection; delete window.webkitRTCPeerConnection;")
    tab.goto(streamlit.url)
    tab.wait_for_selector("[data-testid=stAudioInput]", timeout=ANSWER_TIMEOUT_MS)  # no mode to choose
    assert "has no WebRTC" in tab.inner_text("[data-testid=stAlert]")
    assert tab.locator("iframe[title*=webrtc]").count() == 0
    print("\nstreamlit page without WebRTC:",
          _streamlit_turn(tab, server_url, tmp_path / "streamlit-no-webrtc.png", RECORD_MAX))



RELAY_ONLY = """(() => { const Native = window.RTCPeerConnection; if (!Native) return;
  window.RTCPeerConnection = function (config, ...rest) {
    return new Native({ ...(config || {}), iceTransportPolicy: "relay" }, ...rest); };
  window.RTCPeerConnection.prototype = Native.prototype; })();"""


def test_streamlit_hands_free_without_a_media_path_offers_press_to_talk(tab, streamlit, server_url, tmp_path):
    """WebRTC signalling works (it goes over HTTP) but media finds no path, as through an SSH tunnel: the
    browser may use relayed candidates only and has no TURN server, so ICE cannot connect (on a machine with
    a network address besides loopback media would otherwise find its way). The page says so in words,
    offers press to talk and the server's talk page, and press to talk then answers."""
    tab.add_init_script(RELAY_ONLY)  # in every frame of this tab: streamlit-webrtc's iframe too
    tab.goto(streamlit.url)
    tab.wait_for_selector("iframe[title*=webrtc]", timeout=ANSWER_TIMEOUT_MS)
    tab.frame_locator("iframe[title*=webrtc]").get_by_role("button", name="START").click()
    tab.wait_for_function("document.body.innerText.includes('No sound from your microphone')",
                          timeout=ANSWER_TIMEOUT_MS)
    assert f"{server_url}/" in tab.inner_text("body")  # the server's own talk page
    tab.screenshot(path=tmp_path / "streamlit-no-media-path.png", full_page=True)
    tab.get_by_role("button", name="Use press to talk").click()
    tab.wait_for_selector("[data-testid=stAudioInput]", timeout=ANSWER_TIMEOUT_MS)
    print("\nstreamlit page, no media path, press to talk:",
          _streamlit_turn(tab, server_url, tmp_path / "streamlit-no-media-fallback.png", RECORD_MAX))


@pytest.fixture(scope="module")
def v2_streamlit(v2_server, tmp_path_factory):
    page = streamlit_page(f"http://127.0.0.1:{v2_server.port}", tmp_path_factory.mktemp("v2-streamlit-logs"),
                          "--max-tokens", str(RECORD_MAX))
    yield page
    page.stop()


CAMERA_PLAYING = """() => {
  const video = document.querySelector('[data-testid=stCameraInput] video');
  return video !== null && video.readyState >= 2 && video.videoWidth > 0;
}"""
CAMERA_CLICKS = 3


def test_streamlit_sends_a_camera_snapshot_to_a_model_that_sees(tab, v2_server, v2_streamlit, tmp_path):
    _open_streamlit(tab, v2_streamlit.url)
    assert "it can see" in tab.inner_text("[data-testid=stCaptionContainer]")
    # The button takes a photo only once the camera's video plays: wait for its first frame, then click
    # (again, a bounded number of times, if the page re-rendered the widget under the click).
    tab.wait_for_function(CAMERA_PLAYING, timeout=CAMERA_WAIT_MS)
    for _ in range(CAMERA_CLICKS):
        tab.locator("[data-testid=stCameraInputButton]").click()  # the fake camera's test pattern
        try:
            tab.locator("[data-testid=stCameraInput] img").wait_for(timeout=CAMERA_WAIT_MS // CAMERA_CLICKS)
            break
        except playwright.TimeoutError:
            continue
    snapshot_url = tab.locator("[data-testid=stCameraInput] img").get_attribute("src")
    snapshot = base64.b64decode(snapshot_url.removeprefix("data:image/jpeg;base64,"))
    print("\nstreamlit page, Mini-Omni2 with a camera snapshot:",
          _streamlit_turn(tab, f"http://127.0.0.1:{v2_server.port}", tmp_path / "streamlit-camera.png",
                          RECORD_MAX, snapshot))


# ---- The server goes away ----------------------------------------------------------------------------------

@pytest.fixture
def doomed(tiny_ckpt, tmp_path):
    """A server of its own, which the test stops while its page is open."""
    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    srv = Server(tiny_ckpt, server_tmp)
    yield srv
    srv.stop()


@pytest.fixture
def doomed_gradio(doomed, tmp_path):
    page = gradio_page(f"http://127.0.0.1:{doomed.port}", tmp_path, "--max-tokens", str(MAX))
    yield page
    page.stop()


@pytest.fixture
def doomed_streamlit(doomed, tmp_path):
    page = streamlit_page(f"http://127.0.0.1:{doomed.port}", tmp_path, "--max-tokens", str(RECORD_MAX))
    yield page
    page.stop()


def test_gradio_says_the_server_stopped(tab, doomed, doomed_gradio, sample_wav, tmp_path):
    _open_gradio(tab, doomed_gradio.url)
    assert "ready" in tab.inner_text("#server")
    doomed.stop()
    tab.wait_for_function("document.querySelector('#server').innerText.includes('Cannot reach the server')",
                          timeout=ANSWER_TIMEOUT_MS)  # the server line is refreshed, not left at "ready"
    tab.locator("#question input[type=file]").set_input_files(sample_wav)
    tab.wait_for_function("document.querySelector('#status').innerText.includes('Cannot reach the server')",
                          timeout=ANSWER_TIMEOUT_MS)
    assert "Traceback" not in tab.inner_text("body")
    tab.screenshot(path=tmp_path / "gradio-server-stopped.png", full_page=True)


def test_streamlit_says_the_server_stopped(tab, doomed, doomed_streamlit, tmp_path):
    _open_streamlit(tab, doomed_streamlit.url)
    assert "ready" in tab.inner_text("[data-testid=stCaptionContainer]")
    doomed.stop()
    _speak(tab)
    _turn_ended(tab)
    error = tab.locator("[data-testid=stChatMessage] [data-testid=stAlert]")
    assert "Cannot reach the server" in error.inner_text() and "Traceback" not in tab.inner_text("body")
    tab.screenshot(path=tmp_path / "streamlit-server-stopped.png", full_page=True)
