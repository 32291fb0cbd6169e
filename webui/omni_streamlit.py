"""Streamlit page: talk with the model hands-free, or press to talk.

    streamlit run webui/omni_streamlit.py [-- --server-url http://127.0.0.1:60808 --max-new-tokens N]

UI only. Hands-free, the browser's microphone (echo cancellation and noise suppression on) reaches the
page's Python side through streamlit-webrtc, and `webui.live.Relay` relays it to the server's
`/v1/realtime`; the answer's audio goes back into the same WebRTC stream as it arrives, the server's VAD
ends each turn, and speaking over an answer stops it. Press-to-talk (where WebRTC cannot start, or by
choice) records in the browser with `st.audio_input` and asks `/chat` through `webui.client`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

# `webui` is importable because ./setup.sh installs this project (pip install -e .).
from webui.client import Answer, Health, OmniClient, ServerError, add_server_arguments, server_options

INSTALL_HINT = ("the Streamlit page needs streamlit and streamlit-webrtc: pip install streamlit==1.67.0 "
                "streamlit-webrtc==0.79.0 (or the web extra: pip install .[web])")
RUN_HINT = "start the page with: streamlit run webui/omni_streamlit.py [-- --server-url URL]"
QUESTION_RATE = 16000  # Hz: what the model hears, so the browser records at that rate
SNAPSHOT_WIDTH = 160  # px: a camera snapshot as the history shows it
REFRESH_S = 0.3  # how often the live transcript and state are redrawn
HANDS_FREE, PRESS_TO_TALK = "Hands-free", "Press to talk"
MEDIA_WAIT_S = 8.0  # START without one microphone frame for this long: WebRTC media found no path
NO_MEDIA = ("No sound from your microphone has reached this page {wait:.0f} s after START: the browser and this "
            "page's Python side have no network path for WebRTC media between them. That happens when the page "
            "is reached through an SSH tunnel or a container's published port, where the only route is "
            "loopback; WebRTC needs an address both can reach (or a TURN server, --ice-servers). Use press to "
            "talk instead, or the server's own talk page at {talk_url} (no WebRTC: it works through a tunnel).")
STATES = {  # the press-to-talk state line
    "listening": "Listening: press the microphone, ask your question, press stop.",
    "thinking": "Thinking…",
    "answering": "Answering: the transcript streams in, the audio plays when it is complete.",
}
LIVE_STATES = {  # the hands-free state line, with Streamlit's own (bundled) icons
    "connecting": ("Connecting to the server…", ":material/sync:"),
    "listening": ("Listening: just talk. Talk over an answer to interrupt it.", ":material/hearing:"),
    "hearing you": ("Hearing you…", ":material/mic:"),
    "thinking": ("Thinking…", ":material/hourglass_top:"),
    "speaking": ("Speaking", ":material/volume_up:"),
    "closed": ("The conversation ended.", ":material/call_end:"),
    "stopped": ("Press START to talk.", ":material/play_arrow:"),
}
# Runs in the page (not in an iframe): can this browser give the page a microphone over WebRTC?
BROWSER_PROBE_JS = """
export default function({ setStateValue }) {
  const report = (permission) => setStateValue("browser", {
    secure: window.isSecureContext,
    webrtc: typeof window.RTCPeerConnection === "function",
    microphone: !!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia),
    permission,
  });
  if (!navigator.permissions) { report("unknown"); return; }
  navigator.permissions.query({ name: "microphone" }).then(
    (status) => { report(status.state); status.onchange = () => report(status.state); },
    () => report("unknown"));
}
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Streamlit page for the Mini-Omni server.")
    add_server_arguments(p)
    p.add_argument("--silence-ms", type=int, help="silence that ends a turn (server VAD; default: the server's)")
    p.add_argument("--transcribe", action="store_true", help="show what the model heard (one more model run a turn)")
    p.add_argument("--ice-servers", default="[]",
                   help='WebRTC ICE servers as JSON, e.g. [{"urls": "turn:host:3478", "username": "u", '
                        '"credential": "p"}] for browsers that cannot reach this machine directly')
    return p.parse_args(argv)


def why_not_hands_free(browser: dict | None) -> str | None:
    """Why this browser cannot talk hands-free, or None when it can (or has not said yet)."""
    if browser is None:
        return None
    if not browser.get("secure"):
        return ("This page is not a secure context, so the browser gives it no microphone: open it over HTTPS, "
                "or on this machine through an SSH tunnel (`ssh -L 8501:127.0.0.1:8501 host`, then "
                "http://localhost:8501).")
    if not browser.get("webrtc"):
        return "This browser has no WebRTC (RTCPeerConnection), which the hands-free conversation needs."
    if not browser.get("microphone"):
        return "This browser offers no microphone to pages (navigator.mediaDevices.getUserMedia is missing)."
    if browser.get("permission") == "denied":
        return ("The browser refused this page the microphone. Allow it (the icon left of the address) and "
                "reload the page.")
    return None


def server_line(st, client: OmniClient) -> Health | None:
    """Say which server the page talks to and whether it is up."""
    try:
        health = client.health()
    except ServerError as e:
        st.error(str(e))
        return None
    st.caption(f"Server {client.url}: {health.status}" + (" · it can see" if health.can_see else ""))
    return health


@dataclass(frozen=True)
class Exchange:
    """One question and its answer, as the press-to-talk history shows them."""

    question: bytes  # the recording, a WAV file
    image: bytes | None  # the camera snapshot sent with it
    answer: bytes | None  # the answer as a WAV file; None when nothing came back
    text: str
    note: str  # timings, or why the answer failed
    failed: bool


class PressToTalk:
    """Record, press stop, hear the answer: one `/chat` request per turn."""

    def __init__(self, st, client: OmniClient, options: dict[str, int]) -> None:
        self.st = st
        self.client = client
        self.options = options
        st.session_state.setdefault("turns", [])
        st.session_state.setdefault("asked", 0)  # also names the recorder, so each turn gets a fresh one
        st.session_state.setdefault("autoplay", False)

    def render(self, can_see: bool) -> None:
        st = self.st
        self.history()
        state = st.empty()
        snapshot = st.camera_input("Camera snapshot (optional)", key="camera") if can_see else None
        question = st.audio_input("Your question", sample_rate=QUESTION_RATE, key=f"question-{st.session_state.asked}")
        if question is None:
            state.info(STATES["listening"])
            return
        image = snapshot.getvalue() if snapshot is not None else None
        st.session_state.turns.append(self.ask(state, question.getvalue(), image))
        st.session_state.asked += 1
        st.session_state.autoplay = True
        st.rerun()

    def ask(self, state, question: bytes, image: bytes | None) -> Exchange:
        st = self.st
        self.user_message(question, image)
        reply = Answer()
        with st.chat_message("assistant"):
            state.info(STATES["thinking"])
            live_text = st.empty()
            try:
                for chunk in self.client.ask(question, image, **self.options):
                    reply.add(chunk)
                    state.info(STATES["answering"])
                    live_text.text(reply.text)
            except ServerError as e:
                return Exchange(question, image, reply.wav() if reply.pcm else None, reply.text, str(e), failed=True)
        reply.finish()
        return Exchange(question, image, reply.wav(), reply.text, reply.timing(), failed=False)

    def user_message(self, question: bytes, image: bytes | None) -> None:
        with self.st.chat_message("user"):
            self.st.audio(question, format="audio/wav")
            if image is not None:
                self.st.image(image, width=SNAPSHOT_WIDTH)

    def history(self) -> None:
        st = self.st
        turns = st.session_state.turns
        for i, turn in enumerate(turns):
            self.user_message(turn.question, turn.image)
            with st.chat_message("assistant"):
                if turn.answer is not None:  # only the newest answer plays by itself, once
                    latest = i == len(turns) - 1 and st.session_state.autoplay
                    st.audio(turn.answer, format="audio/wav", autoplay=latest)
                if turn.text:
                    st.text(turn.text)  # plain: a transcript is no markdown
                (st.error if turn.failed else st.caption)(turn.note)
        st.session_state.autoplay = False


class HandsFree:
    """The live conversation: streamlit-webrtc for the media, `Relay` for `/v1/realtime`."""

    def __init__(self, st, args: argparse.Namespace, client: OmniClient, can_see: bool) -> None:
        from webui.live import Relay
        from webui.realtime_client import realtime_url, session_update

        self.st = st
        self.args = args
        self.can_see = can_see
        if "relay" not in st.session_state or st.session_state.relay.camera != can_see:
            session = session_update(args.max_new_tokens, args.silence_ms, args.transcribe)
            st.session_state.relay = Relay(realtime_url(args.server_url), session, camera=can_see,
                                           headers=client.headers)  # the API key, when the server wants one
        self.relay = st.session_state.relay

    def render(self) -> None:
        from streamlit_webrtc import (WebRtcMode, create_audio_sink_track, create_pcm_audio_source_track,
                                      create_video_sink_track, webrtc_streamer)
        from serving.realtime.wire import API_RATE

        st, relay = self.st, self.relay
        playback = create_pcm_audio_source_track(key="answer", sample_rate=API_RATE)
        video = create_video_sink_track(relay.on_video, key="camera") if self.can_see else None
        audio = {"echoCancellation": True, "noiseSuppression": True, "autoGainControl": True}
        self._keep_context()
        ctx = webrtc_streamer(
            key="conversation", mode=WebRtcMode.SENDRECV, rtc_configuration={"iceServers": self.ice_servers()},
            media_stream_constraints={"audio": audio, "video": self.can_see},
            sink_audio_track=create_audio_sink_track(relay.on_audio, key="microphone"),
            sink_video_track=video, source_audio_track=playback.track, sendback_video=False,
            video_html_attrs={"autoPlay": True, "muted": True, "style": {"width": "160px"}})
        if ctx.state.playing:
            relay.start(playback)
        else:
            relay.stop()
        started = ctx.state.playing or ctx.state.signalling  # START pressed, whether or not media flows
        st.session_state.started_at = (st.session_state.get("started_at") or time.monotonic()) if started else None
        st.fragment(run_every=REFRESH_S)(self.live)()

    def _keep_context(self) -> None:
        """This page draws the streamer on every full run, so streamlit-webrtc's check for a component that
        was not drawn (multi-page apps) can only misfire here: it compares Streamlit's run counter, which the
        server bumps when it sends a run's end, and a burst of reruns during signalling moves it by two and
        stops a healthy connection. Forget the last drawn run, so the check never fires."""
        context = self.st.session_state.get("conversation")
        if context is not None and hasattr(context, "_last_rendered_run_count"):
            context._last_rendered_run_count = None

    def ice_servers(self) -> list[dict]:
        try:
            servers = json.loads(self.args.ice_servers)
        except ValueError as e:
            raise SystemExit(f"--ice-servers is not JSON: {e}") from e
        return servers

    def no_media(self) -> bool:
        """START was pressed MEDIA_WAIT_S ago and not one microphone frame has come: signalling worked (it goes
        over the page's own HTTP) but ICE found no path for the media."""
        started_at = self.st.session_state.get("started_at")
        return (started_at is not None and time.monotonic() - started_at > MEDIA_WAIT_S
                and self.relay.frames_in == 0)

    def live(self) -> None:
        """The state line, the transcript and each turn's latency; redrawn every REFRESH_S."""
        st = self.st
        view = self.relay.view()
        if self.no_media():
            st.warning(NO_MEDIA.format(wait=MEDIA_WAIT_S, talk_url=self.args.server_url.rstrip("/") + "/"),
                       icon=":material/wifi_off:")
            if st.button("Use press to talk", on_click=use_press_to_talk, key="fallback"):
                st.rerun(scope="app")  # the button is in the fragment: the whole page must redraw in the new mode
        else:
            text, icon = LIVE_STATES[view.state if view is not None else "stopped"]
            st.info(text, icon=icon)
        if view is None:
            return
        if view.error:
            st.error(view.error)
        for turn in view.turns:
            with st.chat_message("user"):
                st.text(turn.question_text or question_note(turn))
                if turn.image:
                    st.caption(":material/photo_camera: the camera frame went with this question")
            if turn.status == "hearing you":
                continue
            with st.chat_message("assistant"):
                st.text(turn.answer_text or "…")
                st.caption(turn_note(turn))


def use_press_to_talk() -> None:
    """The fallback button's callback: runs before the next script run, so it may set the mode widget's value."""
    import streamlit as st

    st.session_state.mode = PRESS_TO_TALK


def question_note(turn) -> str:
    if turn.status == "hearing you":
        return "(speaking…)"
    return "(speech)" if turn.question_s is None else f"({turn.question_s:.1f} s of speech)"


def turn_note(turn) -> str:
    """An answer's outcome and latency, as its caption says them."""
    parts = [{"thinking": "thinking", "speaking": "speaking", "done": "answered", "interrupted": "interrupted",
              "failed": f"failed: {turn.error}"}.get(turn.status, turn.status)]
    if turn.first_audio_ms is not None:
        parts.append(f"first audio {turn.first_audio_ms:.0f} ms after you stopped speaking ({turn.vad_ms} ms of it "
                     "the server's wait for silence; WebRTC's own delay not counted)")
    if turn.answer_s:
        parts.append(f"{turn.answer_s:.1f} s of speech")
    return " · ".join(parts)


def browser_support(st) -> dict | None:
    """What this browser offers (None until its first report)."""
    probe = st.components.v2.component("omni_browser_probe", js=BROWSER_PROBE_JS)
    return probe(key="browser_probe", on_browser_change=lambda: None, height=0).get("browser")


def main() -> None:
    try:
        import streamlit as st
        import streamlit_webrtc  # noqa: F401 - only to fail early with the install hint
        from streamlit import runtime
    except ImportError as e:
        raise SystemExit(INSTALL_HINT) from e
    if not runtime.exists():
        raise SystemExit(RUN_HINT)
    args = parse_args(sys.argv[1:])
    st.set_page_config(page_title="Mini-Omni")
    st.title("Mini-Omni")
    client = OmniClient(args.server_url)
    health = server_line(st, client)
    can_see = health is not None and health.can_see
    problem = why_not_hands_free(browser_support(st))
    if problem is not None:
        st.warning(problem + " Press to talk below instead.")
        mode = PRESS_TO_TALK
    else:
        mode = st.segmented_control("Mode", [HANDS_FREE, PRESS_TO_TALK], default=HANDS_FREE, key="mode",
                                    label_visibility="collapsed") or HANDS_FREE
    if mode == HANDS_FREE:
        HandsFree(st, args, client, can_see).render()
        return
    if "relay" in st.session_state:
        st.session_state.relay.stop()  # the streamer is gone from the page: end its conversation too
    PressToTalk(st, client, server_options(args)).render(can_see)


if __name__ == "__main__":
    main()
