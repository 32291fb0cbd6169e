"""The hands-free Streamlit page in a real headless Chromium, talking to the real server over `/v1/realtime`.

The fake microphone plays one file: a question, then, while the answer plays, a second question. No click
but START. WebRTC media never goes over 127.0.0.1 (aioice offers no loopback candidate, and tests may reach
only addresses of their own): the test re-runs itself inside a network namespace of its own (`unshare -n`),
with `lo` and a veth pair carrying a private address, and the server, the page and Chromium all inside.
Inside, a script in the WebRTC iframe watches the microphone and the played answer with WebAudio analysers;
the test waits on those, the page's text and the server's metrics, never on a sleep.
"""
import contextlib
import os
import re
import subprocess
import sys
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import NETNS_ENV
from tests.http_client import ROOT, Server
from tests.web_pages import CHROMIUM, chromium_args, streamlit_page

INSIDE = NETNS_ENV  # set inside the namespace: its media address
CKPT = "MINI_OMNI_LIVE_CKPT"  # the outer run's tiny checkpoints, so the inner run builds none
VISION_CKPT = "MINI_OMNI_LIVE_VISION_CKPT"
MEDIA_ADDR = "10.231.7.1"  # on a veth inside the test's own namespace: reachable from nowhere else
NETNS_SETUP = (f"ip link set lo up && ip link add omni0 type veth peer name omni1 && "
               f"ip addr add {MEDIA_ADDR}/24 dev omni0 && ip link set omni0 up && ip link set omni1 up")
INNER_TIMEOUT_S = 900
BROWSER_NICE, SERVER_NICE = -5, 5  # the page, aiortc and Chromium first; the model takes what is left
MIC_RATE = 48000  # Hz: what Chromium's fake capture reads most reliably (mono s16)
LEAD_S = 4.0  # silence before the first question: START, signalling and ICE happen meanwhile
GAP_S = 10.0  # from the end of the first question to the start of the second, spoken over the first answer
TAIL_S = 40.0  # silence after it, while the second answer plays
MAX_TOKENS = 250  # a long first answer (~20 s on the tiny checkpoint), so the second question lands inside it
STOP_WITHIN_MS = 1500  # second question's first sound -> the first answer silent in the browser
WAIT_MS = 180_000
LEVEL = 0.003  # RMS (full scale 1) above which the browser counts a track as sounding (~-50 dBFS)

# Runs in every frame; in the streamlit-webrtc iframe it taps the microphone (getUserMedia) and the remote
# answer track (RTCPeerConnection) with analysers, and keeps each track's sounding segments in Date.now() ms.
PROBE_JS = """
(() => {
  if (!window.RTCPeerConnection || !navigator.mediaDevices) return;
  const probe = window.__omni = { connectedAt: null, states: [], local: [], remote: [] };
  let ctx = null;
  const taps = {};
  function tap(name, stream) {
    ctx ??= new AudioContext();
    const a = ctx.createAnalyser(); a.fftSize = 1024;
    ctx.createMediaStreamSource(stream).connect(a);
    taps[name] = { a, buf: new Float32Array(1024), on: false, quietSince: null };
  }
  const gum = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = async (c) => { const s = await gum(c); tap("local", s); return s; };
  const Native = window.RTCPeerConnection;
  window.RTCPeerConnection = function (...args) {
    const pc = new Native(...args);
    pc.addEventListener("connectionstatechange", () => {
      probe.states.push(pc.connectionState);
      if (pc.connectionState === "connected") probe.connectedAt ??= Date.now(); });
    pc.addEventListener("track", (e) => { if (e.track.kind === "audio") tap("remote", new MediaStream([e.track])); });
    return pc;
  };
  window.RTCPeerConnection.prototype = Native.prototype;
  setInterval(() => {  // a segment starts at the first loud frame and ends after 200 ms below the level
    const now = Date.now();
    for (const [name, t] of Object.entries(taps)) {
      t.a.getFloatTimeDomainData(t.buf);
      let s = 0; for (const x of t.buf) s += x * x;
      const loud = Math.sqrt(s / t.buf.length) > LEVEL;
      const segs = probe[name];
      if (loud) { t.quietSince = null; if (!t.on) { t.on = true; segs.push([now, null]); } }
      else if (t.on) {
        t.quietSince ??= now;
        if (now - t.quietSince >= 200) { t.on = false; segs[segs.length - 1][1] = t.quietSince; }
      }
    }
  }, 10);
})();
""".replace("LEVEL", str(LEVEL))


def test_hands_free_page_in_its_own_network_namespace(tiny_ckpt, vision_ckpt, tmp_path):
    """The outer run: start the real test inside a fresh network namespace and report what it printed."""
    if os.environ.get(INSIDE):
        pytest.skip("already inside the namespace")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"the browser tests need Debian's chromium at {CHROMIUM}: apt-get install chromium")
    probe = subprocess.run(["unshare", "-n", "--", "sh", "-c", NETNS_SETUP], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace here (needs root and `unshare`): {probe.stderr.strip()}")
    inner = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'in'}",
             "-k", "not namespace", str(Path(__file__).relative_to(ROOT))]
    env = {**os.environ, INSIDE: MEDIA_ADDR, CKPT: str(tiny_ckpt), VISION_CKPT: str(vision_ckpt)}
    # At a higher priority (children inherit it; the server is set back to a lower one), so that other work on
    # the machine does not starve the page's event loop or Chromium.
    priority = ["nice", "-n", str(BROWSER_NICE)] if os.geteuid() == 0 else []
    run = subprocess.run(["unshare", "-n", "--", *priority, "sh", "-c", NETNS_SETUP + ' && exec "$@"', "sh", *inner],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=INNER_TIMEOUT_S)
    print(run.stdout[-6000:], run.stderr[-3000:])
    assert run.returncode == 0, "the test inside the namespace failed (its output is above)"
    assert re.search(r"^2 passed", run.stdout, re.MULTILINE), "the tests inside did not both run"


# ---- inside the namespace ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inside():
    assert os.environ.get(INSIDE), "runs only inside its own network namespace (see the test above)"


def _microphone_file(path: Path) -> tuple[float, float]:
    """The fake microphone's recording: silence, question 1, a gap, question 2, silence (48 kHz mono s16).
    Returns where the two questions start, in seconds."""
    def load(name: str) -> np.ndarray:
        out = subprocess.run(["ffmpeg", "-v", "error", "-i", str(ROOT / "data" / "samples" / name), "-f", "s16le",
                              "-ac", "1", "-ar", str(MIC_RATE), "pipe:1"], capture_output=True, check=True).stdout
        return np.frombuffer(out, dtype="<i2")

    def silence(seconds: float) -> np.ndarray:
        return np.zeros(int(seconds * MIC_RATE), dtype="<i2")

    q1, q2 = load("output1.wav"), load("output4.wav")
    parts = [silence(LEAD_S), q1, silence(GAP_S), q2, silence(TAIL_S)]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(MIC_RATE)
        w.writeframes(np.concatenate(parts).tobytes())
    return LEAD_S, LEAD_S + q1.size / MIC_RATE + GAP_S


def _metric(server: Server, name: str, labels: str = "") -> float:
    """A counter's value from the server's /metrics (0 when it has no sample yet)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@contextlib.contextmanager
def _live_page(ckpt: Path, tmp_path: Path, mic: Path, max_tokens: int):
    """The server, the page and Chromium (its fake microphone playing `mic`), all inside the namespace.
    Yields the open tab and the server; screenshots go into `shots`, the last one taken on the way out."""
    (tmp_path / "server-tmp").mkdir()
    server = Server(ckpt, tmp_path / "server-tmp")
    _lower_priority(server.proc.pid)
    page = streamlit_page(f"http://127.0.0.1:{server.port}", tmp_path, "--max-tokens", str(max_tokens))
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                tmp_path / "profile", executable_path=CHROMIUM, args=chromium_args(Path(f"{mic}%noloop")),
                permissions=["microphone", "camera"], viewport={"width": 1100, "height": 1000})
            browser.add_init_script(PROBE_JS)
            tab = browser.new_page()
            tab.goto(page.url)
            try:
                yield tab, server
            finally:
                browser.close()
    finally:
        page.stop()
        server.stop()


@pytest.mark.netns_inner
def test_hands_free_conversation(inside, tmp_path):
    mic = tmp_path / "microphone.wav"
    q1_at, q2_at = _microphone_file(mic)
    shots: list[Path] = []
    with _live_page(Path(os.environ[CKPT]), tmp_path, mic, MAX_TOKENS) as (tab, server):
        try:
            _converse(tab, server, tmp_path, shots, q2_at - q1_at)
        finally:
            _shot(tab, tmp_path, shots, "last")
    print("\nscreenshots:", *shots, sep="\n  ")


@pytest.mark.netns_inner
def test_hands_free_camera_frame_goes_with_the_question(inside, tmp_path):
    """A Mini-Omni2 server: the page adds Chromium's fake camera to the stream, and the server takes the frame
    from the start of the question (the page shows it only once the server has created the image item)."""
    mic = tmp_path / "microphone.wav"
    _microphone_file(mic)
    shots: list[Path] = []
    with _live_page(Path(os.environ[VISION_CKPT]), tmp_path, mic, MAX_TOKENS) as (tab, server):
        try:
            _wait_text(tab, "it can see", started=False)  # the server's /health, as the page reports it
            _start(tab, tmp_path, shots)
            _wait_text(tab, "the camera frame went with this question")
            _wait_text(tab, "first audio")  # the question about the picture was answered
            assert tab.locator("[data-testid=stAlertContentError]").count() == 0, tab.inner_text("body")
        finally:
            _shot(tab, tmp_path, shots, "camera")
    print("\nscreenshots:", *shots, sep="\n  ")


def _lower_priority(pid: int) -> None:
    """The model takes what CPU the page, aiortc and Chromium leave: on two shared cores a busy engine can
    otherwise starve the page's event loop long enough for Chromium to call the connection dropped. Every
    thread (torch's pool included) is reniced; threads started later inherit it."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.setpriority(os.PRIO_PROCESS, int(task.name), SERVER_NICE)


def _shot(tab, tmp_path: Path, shots: list, name: str) -> None:
    path = tmp_path / f"live-{len(shots) + 1}-{name}.png"
    tab.screenshot(path=path, full_page=True)
    shots.append(path)


# Thrown inside a wait: the WebRTC connection ended (streamlit-webrtc then shows START again), so the test
# fails at once, saying so, instead of waiting for its timeout.
DROPPED = """if (document.body.innerText.includes("Press START to talk.") || document.body.innerText.includes(
  "The conversation ended.")) throw new Error("the conversation stopped: " + document.body.innerText);"""
PC_DROPPED = """if (window.__omni.states.some(s => ["disconnected", "failed", "closed"].includes(s)))
  throw new Error("the WebRTC connection dropped: " + window.__omni.states.join(" -> "));"""


# The browser heard answer audio after the microphone's last question ended.
SECOND_ANSWER_HEARD = """(() => { const l = window.__omni.local, r = window.__omni.remote;
  return l.length >= 2 && l[l.length - 1][1] !== null && r.some(s => s[0] > l[l.length - 1][1]); })()"""


def _wait_text(tab, pattern: str, started: bool = True) -> None:
    """Until the page's text matches `pattern` (a JavaScript regular expression)."""
    check = DROPPED if started else ""
    tab.wait_for_function(f"p => {{ {check} return new RegExp(p).test(document.body.innerText); }}", arg=pattern,
                          timeout=WAIT_MS)


def _wait_heard(frame, condition: str) -> None:
    """Until `condition` holds for the iframe's measurements (`window.__omni`)."""
    frame.wait_for_function(f"() => {{ {PC_DROPPED} return {condition}; }}", timeout=WAIT_MS)


def _probe(tab):
    """The WebRTC iframe, where the probe script keeps its measurements (`window.__omni`)."""
    return tab.locator("iframe[title*=webrtc]").element_handle().content_frame()


def _start(tab, tmp_path: Path, shots: list) -> None:
    tab.wait_for_selector("iframe[title*=webrtc]", timeout=WAIT_MS)
    _shot(tab, tmp_path, shots, "ready")
    webrtc = tab.frame_locator("iframe[title*=webrtc]")
    webrtc.get_by_role("button", name="START").click()  # the only click: turns end by themselves
    _wait_text(tab, "Listening: just talk", started=False)
    _shot(tab, tmp_path, shots, "listening")


def _converse(tab, server: Server, tmp_path: Path, shots: list, q2_offset_s: float) -> None:
    _start(tab, tmp_path, shots)
    frame = _probe(tab)
    _wait_text(tab, "Hearing you")
    _shot(tab, tmp_path, shots, "hearing-you")
    _wait_text(tab, "Thinking|Speaking")  # a short state: the page may already be speaking
    _shot(tab, tmp_path, shots, "thinking" if "Thinking" in tab.inner_text("body") else "speaking-already")
    _wait_heard(frame, "window.__omni.remote.length >= 1")
    # The first answer is heard: the server has not finished generating it.
    assert _metric(server, "omni_realtime_responses_total", '{status="completed"}') == 0
    assert _metric(server, "omni_realtime_responses_total", '{status="cancelled"}') == 0
    _shot(tab, tmp_path, shots, "speaking")
    _wait_text(tab, "interrupted")  # the second question, spoken over the first answer
    _shot(tab, tmp_path, shots, "interrupted")
    _wait_text(tab, "first audio[\\s\\S]*first audio")  # the second answer has started
    _wait_heard(frame, SECOND_ANSWER_HEARD)
    _shot(tab, tmp_path, shots, "second-answer")
    probe = frame.evaluate("() => window.__omni")
    _check_timeline(probe, server, q2_offset_s)
    _check_transcript(tab)


def _check_timeline(probe: dict, server: Server, q2_offset_s: float) -> None:
    """The browser's own timeline (Date.now() ms): the questions on the microphone, the answers heard.
    `q2_offset_s`: how far into the file the second question starts after the first."""
    local, remote = probe["local"], probe["remote"]
    print("\nconnected", probe["connectedAt"], "microphone", local, "answers heard", remote)
    assert local, "the microphone played nothing"
    q1_start = local[0][0]
    q2_from = q1_start + 1000 * q2_offset_s - 500  # a pause inside a question can split it into segments
    q1_end = max(end for start, end in local if start < q2_from)
    q2 = [seg for seg in local if seg[0] >= q2_from]
    assert q2, f"the second question was not heard on the microphone: {local}"
    (q2_start, q2_end) = q2[0]
    assert probe["connectedAt"] < q1_start, "WebRTC connected after the first question began: LEAD_S is too short"
    heard = [seg for seg in remote if seg[0] > q1_end]
    assert heard and heard[0][0] < q2_start, "the first answer did not start playing before the second question"
    first = [seg for seg in heard if seg[0] < q2_start + STOP_WITHIN_MS]
    second = [seg for seg in heard if seg[0] >= q2_start + STOP_WITHIN_MS]
    silent_at = first[-1][1]
    assert silent_at is not None and silent_at <= q2_start + STOP_WITHIN_MS, \
        f"the first answer still played {STOP_WITHIN_MS} ms after the second question began"
    assert second and second[0][0] > q2_end, "no answer to the second question was heard"
    # The server learns of the interruption either way: it cancels the first answer if it is still generating
    # (the engine slower than real time), or, once generated, the page truncates it where playback stopped.
    cancelled = _metric(server, "omni_realtime_responses_total", '{status="cancelled"}')
    assert (_metric(server, "omni_realtime_barge_ins_total") >= 1 and cancelled == 1) or (
        cancelled == 0 and _metric(server, "omni_realtime_truncations_total") >= 1)
    print(f"end of the first question -> its answer heard: {heard[0][0] - q1_end} ms; second question's onset "
          f"-> first answer silent: {silent_at - q2_start} ms; end of the second question -> its answer heard: "
          f"{second[0][0] - q2_end} ms")


def _check_transcript(tab) -> None:
    messages = tab.locator("[data-testid=stChatMessage]")
    assert messages.count() == 4, tab.inner_text("body")
    first, second = messages.nth(1).inner_text(), messages.nth(3).inner_text()
    assert "interrupted" in first and "first audio" in first
    assert ("speaking" in second or "answered" in second) and "first audio" in second
    for text in (first, second):
        assert text.split("\n")[0].strip() not in ("", "…"), "an answer without transcript"
